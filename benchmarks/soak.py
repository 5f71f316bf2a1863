"""`python -m benchmarks.soak` (`make soak`): gows under mixed load and chaos for SOAK_SECONDS (300).

It starts its own master (admin listener, 2 local workers, front cache on) on free loopback
ports and keeps wrk's mixed cacheable/uncacheable load on it while it SIGKILLs a worker every
10 s and a proxy process every minute, reloads every minute, adds and removes a worker, and
sends 200 aborted uploads and 200 slow readers a minute (benchmarks/schedule.py has the
timetable). Every 10 s it samples the RSS and open descriptors of the master, the workers and
the proxy processes (which hold the client connections, their buffers and the front cache). It
fails (exit 1, one line per reason) on any response outside 2xx/3xx or socket error that no
worker or proxy kill explains (benchmarks/verdict.py), when RSS or descriptors grew by more than
10% after the first minute, when a killed proxy is not replaced, or when the master does not
serve with all its workers and proxies up at the end.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import shutil
import signal
import sys
import tempfile
import time
import urllib.error
import urllib.request
from datetime import datetime
from pathlib import Path
from typing import Any

from arbiter.addresses import host_port

from . import chaos, loads, prereqs, procstat, schedule, soak_proxies, verdict
from .__main__ import RESULTS, progress
from .loads import LoadError, MixEntry
from .prereqs import MissingPrerequisite
from .schedule import Action, Event
from .servers import REPO, Running, ServerError, ServerSpec, log_tail, serve
from .soak_record import Record, WrkRun, log_digest, sample_line, samples_table, summary, write_record, wrk_table
from .verdict import Sample

WORKERS = 2
CONNECTIONS = 50  # wrk's keep-alive connections (far below proxy.maxConnections, 4096)
WRK_TIMEOUT = 10  # seconds wrk waits for a response before it counts a timeout
POLL_EVERY = 1.0  # seconds between two reads of /status.json (the truncation counter's clock)
STATUS_TIMEOUT = 5.0
ADMIN_SILENCE = 10.0  # longer without an answer from /status.json fails the run
END_TIMEOUT = 30.0  # seconds the master has after the load to serve again with every worker up
BIG_FILE = 64 << 20  # the slow readers' file: bigger than every buffer on the way
LARGE_FILE = 2 << 20  # above frontCache.maxObjectBytes (1 MiB): always streamed from a worker
SMALL_FILE = 150_000  # www/downloads/sample-150k.bin

# wrk's mix, one request each in turn: 6 the front cache answers, 4 it never does
# (Range requests bypass it, and LARGE_FILE is above its object limit).
MIX = [
    MixEntry("/"), MixEntry("/index.html"), MixEntry("/style.css"), MixEntry("/logo.png"),
    MixEntry("/1k.txt"), MixEntry("/downloads/sample-150k.bin"),
    MixEntry("/downloads/sample-150k.bin", 4096, SMALL_FILE), MixEntry("/soak/big.bin", 65536, BIG_FILE),
    MixEntry("/150k.txt", 1000, 150_000), MixEntry("/soak/large.bin"),
]


def make_docroot(base: Path) -> Path:
    """The bundled site plus the benchmark files and the soak's large ones (the big one sparse)."""
    root = prereqs.make_docroot(base)
    shutil.copytree(REPO / "www", root, dirs_exist_ok=True)
    (root / "soak").mkdir()
    (root / "soak" / "large.bin").write_bytes(prereqs.deterministic_text(LARGE_FILE, "large"))
    with open(root / "soak" / "big.bin", "wb") as f:
        f.truncate(BIG_FILE)
    return root


def fetch(url: str, timeout: float = STATUS_TIMEOUT) -> tuple[int, bytes]:
    """GET `url`: (status, body); OSError when there is no answer."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


class Soak:
    """One soak against a running master: the load, the chaos on schedule, the samples."""

    def __init__(self, server: Running, admin: str, record: Record, script: Path, connections: int) -> None:
        self.server = server
        self.host = "127.0.0.1"
        self.status_url = f"http://{admin}/status.json"
        self.record = record
        self.script = script
        self.connections = connections
        self.t0 = time.monotonic()
        self.tasks: set[asyncio.Task] = set()
        self.rng = random.Random()
        self.proxies_at_start: list[dict[str, Any]] = []  # /status.json's "proxies" rows at the start
        self.handlers = {Action.SAMPLE: self.sample, Action.KILL: self.kill, Action.HUP: self.signal_master,
                         Action.TTIN: self.signal_master, Action.TTOU: self.signal_master,
                         Action.SLOW_READERS: self.slow_readers, Action.ABORTED_UPLOADS: self.aborted_uploads,
                         Action.PROXY_KILL: lambda event: soak_proxies.kill(self, event)}

    def clock(self) -> float:
        """Seconds since the load started."""
        return time.monotonic() - self.t0

    @property
    def origin(self) -> str:
        """The master's public URL, without a path."""
        return f"http://{host_port(self.host, self.server.port)}"

    @property
    def public_port(self) -> int:
        """The master's public port (the proxies' shared listening socket)."""
        return self.server.port

    @property
    def master_pid(self) -> int:
        """The master's pid: the process serve() started."""
        return self.server.proc.pid

    def master_alive(self) -> bool:
        """Whether the master still runs; the first time it does not, that is a reason to fail."""
        if self.server.proc.poll() is None:
            return True
        problem = f"the master exited with status {self.server.proc.returncode} during the soak"
        if problem not in self.record.problems:
            self.record.problems.append(problem)
            progress(problem)
        return False

    async def fetch_status(self) -> dict[str, Any] | None:
        """/status.json now, or None when the admin listener does not answer."""
        try:
            status, body = await asyncio.to_thread(fetch, self.status_url)
            return json.loads(body) if status == 200 else None
        except (OSError, ValueError):
            return None

    def local_workers(self, status: dict[str, Any] | None, up_only: bool = False) -> list[int]:
        """Pids of the master's own workers in `status` (checked against /proc: our master's children)."""
        pids = [w["pid"] for w in (status or {}).get("workers", [])
                if w["local"] and w["pid"] and (w["up"] or not up_only)]
        return [pid for pid in pids if procstat.parent_of(pid) == self.master_pid]

    # -- the chaos, one handler per action ----------------------------------------------------
    async def sample(self, event: Event) -> None:
        """RSS and fds of the master, its workers and its proxy processes (its children titled
        `gows: proxy N`), with the master's counters and its rows of the proxies."""
        status = await self.fetch_status()
        ports = {w["port"] for w in (status or {}).get("workers", [])}
        workers, proxies = self.local_workers(status), sorted(procstat.proxies(self.master_pid).values())
        found = procstat.usage([self.master_pid, *workers, *proxies], ports)
        read = lambda pids: [u for u in (found[pid] for pid in pids) if u is not None]  # noqa: E731
        sample = Sample(event.at, found[self.master_pid], read(workers), read(proxies))
        self.record.samples.append(sample)
        counters = {"requests": status["totals"]["requests"], "responses": status["totals"]["responses"],
                    **status["proxy"], "front_cache_bytes": status["front_cache"]["bytes"],
                    "proxies": status.get("proxies", [])} if status else {}
        self.record.master_counters.append(counters)
        if status:
            share = status["front_cache"]["max_bytes"] // max(1, len(counters["proxies"]))
            self.record.proxy_cache_kib = share // 1024
        progress(sample_line(sample, counters, self.record.master_counters[0]))

    async def kill(self, event: Event) -> None:
        """SIGKILL one of the master's workers that are up (never the last one up)."""
        pids = self.local_workers(await self.fetch_status(), up_only=True)
        if len(pids) < 2:
            # Killing the last worker up would make 503s no server could avoid.
            self.record.skipped_kills.append(event.at)
            progress(f"{event.at:g} s: {len(pids)} worker up, no kill")
            return
        pid = self.rng.choice(pids)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        self.record.kills.append(self.clock())
        self.record.killed_pids.append(pid)

    async def signal_master(self, event: Event) -> None:
        """HUP, TTIN or TTOU to the master."""
        signum = {Action.HUP: signal.SIGHUP, Action.TTIN: signal.SIGTTIN, Action.TTOU: signal.SIGTTOU}[event.action]
        os.kill(self.master_pid, signum)
        self.record.signals.append((self.clock(), signum.name))
        progress(f"{event.at:g} s: {signum.name} to the master")

    async def slow_readers(self, event: Event) -> None:
        """A batch of slow readers of the big file."""
        await self._clients(event, lambda: chaos.slow_reader(self.host, self.server.port, "/soak/big.bin", self.clock))

    async def aborted_uploads(self, event: Event) -> None:
        """A batch of aborted uploads."""
        await self._clients(event, lambda: chaos.aborted_upload(self.host, self.server.port, "/upload", self.clock))

    async def _clients(self, event: Event, client) -> None:
        """`event.count` clients at once; their outcomes go to the record."""
        outcomes = await asyncio.gather(*(client() for _ in range(event.count)))
        self.record.clients.extend(outcomes)

    # -- the loops -------------------------------------------------------------------------
    async def run_schedule(self, events: list[Event]) -> None:
        """Each event at its time; attacks run in the background so the schedule never slips."""
        for event in events:
            await asyncio.sleep(max(0.0, event.at - self.clock()))
            if not self.master_alive():
                return
            task = asyncio.create_task(self.handlers[event.action](event))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
            if event.action is Action.SAMPLE:
                await task  # the samples are the record's spine: one at a time, in order

    async def run_wrk(self) -> None:
        """wrk runs back to back until the soak's time is up, each ending at the next kill's time."""
        url = f"{self.origin}/"
        while self.record.seconds - self.clock() >= 1 and self.master_alive():
            started = self.clock()
            seconds = max(1, round(schedule.wrk_run_end(started, self.record.seconds) - started))
            try:
                text = await asyncio.to_thread(loads.wrk_script_run, url, self.script, self.connections,
                                               seconds, WRK_TIMEOUT)
                measured = loads.parse_wrk(text)
            except LoadError as exc:
                self.record.problems.append(f"wrk failed (the tool, not the server): {exc}")
                return
            self.record.wrk_runs.append(WrkRun(started, self.clock(), measured.requests, measured.rps,
                                               loads.wrk_errors(text), loads.parse_wrk_statuses(text)))

    async def poll(self, stop: asyncio.Event) -> None:
        """Read the master's truncation counter every POLL_EVERY seconds, timing the admin's silences."""
        answered = self.clock()
        while not stop.is_set():
            status = await self.fetch_status()
            now = self.clock()
            if status is not None:
                self.record.polls.append((now, status["proxy"]["truncated_responses"]))
                answered = now
            self.record.admin_silence = max(self.record.admin_silence, now - answered)
            try:
                await asyncio.wait_for(stop.wait(), POLL_EVERY)
            except asyncio.TimeoutError:
                pass

    async def run(self) -> None:
        """The whole soak: load, schedule and polling, then the checks at the end."""
        stop = asyncio.Event()
        poller = asyncio.create_task(self.poll(stop))
        start, *events = schedule.schedule(self.record.seconds)
        await self.sample(start)  # at rest, before wrk connects
        self.proxies_at_start = self.record.master_counters[0].get("proxies", [])
        if not self.proxies_at_start:
            self.record.problems.append("/status.json listed no proxy process at the start")
        await asyncio.gather(self.run_schedule(events), self.run_wrk())
        if self.tasks:  # clients still out: each has its own deadline
            await asyncio.gather(*list(self.tasks))
        stop.set()
        await poller
        if self.record.admin_silence > ADMIN_SILENCE:
            self.record.problems.append(f"/status.json went unanswered for {self.record.admin_silence:.0f} s")
        if self.master_alive():
            await self.check_end()

    async def check_end(self) -> None:
        """After the load: the master serves the small and the large file, with every worker up and
        as many proxies ready as at the start; it restarted proxies only when the soak killed one."""
        deadline = time.monotonic() + END_TIMEOUT
        last = "no answer"
        while time.monotonic() < deadline:
            status = await self.fetch_status()
            up = len(self.local_workers(status, up_only=True))
            proxies = soak_proxies.ready(status, self.master_pid)
            if proxies is None or len(proxies) != len(self.proxies_at_start):
                last = f"{len(proxies or ())} of {len(self.proxies_at_start)} proxies ready"
            elif up == WORKERS:
                if self.record.proxy_restarts is None:
                    soak_proxies.check_restarts(self.record, self.proxies_at_start, status["proxies"])
                try:
                    small, _ = await asyncio.to_thread(fetch, f"{self.origin}/1k.txt")
                    large, body = await asyncio.to_thread(
                        fetch, f"{self.origin}/soak/large.bin", 30.0)
                    if small == 200 and large == 200 and len(body) == LARGE_FILE:
                        return
                    last = f"GET /1k.txt: {small}, GET /soak/large.bin: {large} with {len(body):,} bytes"
                except OSError as exc:
                    last = f"GET failed: {exc}"
            else:
                last = f"{up} of {WORKERS} workers up"
            await asyncio.sleep(0.5)
        self.record.problems.append(f"{END_TIMEOUT:g} s after the load the master did not serve with every "
                                    f"worker and proxy up ({last})")


def minute_text() -> str:
    """The minute's timetable in words: `slow readers ×40 at +1, +11 s; hup at +22 s; ...`."""
    offsets: dict[tuple[Action, int], list[str]] = {}
    for offset, action, count in schedule.MINUTE:
        offsets.setdefault((action, count), []).append(f"+{offset}")
    return "; ".join(f"{action.value}{f' ×{count}' if count > 1 else ''} at {', '.join(at)} s"
                     for (action, count), at in offsets.items())


def notes(seconds: int, connections: int) -> list[str]:
    """What the reader needs to judge the run: machine, settings, load, chaos, method."""
    baseline, final = schedule.growth_windows(seconds)
    return [
        f"machine: {os.cpu_count()} CPUs, {platform.system()} {platform.release()}, Python {platform.python_version()}; "
        f"load average at the start {os.getloadavg()[0]:.2f}",
        f"master: {WORKERS} local workers, front cache on, admin listener on, other settings default (one proxy "
        "process per CPU)",
        f"load: wrk -t1 -c{connections} --timeout {WRK_TIMEOUT}s in runs of {schedule.KILL_EVERY} s (the one a proxy "
        f"kill falls in ends {verdict.KILL_WINDOW:g} s after it), each connection cycling through {len(MIX)} "
        "requests: " + ", ".join(e.path + (f" (Range {e.range_bytes} B)" if e.range_bytes else "") for e in MIX),
        f"chaos: SIGKILL of a worker every {schedule.KILL_EVERY} s (one of those up, when two are), and each minute "
        + minute_text() + " (proxy kill: SIGKILL of a proxy process other than the longest-running one, when "
        "every proxy is ready and there are two at least)"
        + f"; aborted upload: 1 MiB declared, 960 KiB sent; slow reader: {BIG_FILE >> 20} MiB file, "
        "64 KiB/s for 1 s after the head",
        f"samples every {schedule.SAMPLE_EVERY} s; growth compares the samples at {verdict.span(baseline)} with "
        f"those at {verdict.span(final)}; workers by the largest one (pids change with every kill), proxies' RSS "
        "by the longest-running one (never killed), allowed its share of the front cache besides the 10% (a HUP "
        "purges the cache, the load fills it again: the phase at the baseline is chance), proxies' fds by their "
        "sum; fds besides the established connections to or from a worker (the proxies' keep-alive pool)",
    ]


# -- the command ----------------------------------------------------------------------------------

def soak(seconds: int, connections: int, keep: bool) -> int:
    """Run one soak; 0 when everything held, 1 when it failed."""
    prereqs.ensure_tools(["wrk"], log=progress)
    prereqs.raise_open_file_limit()
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    run_notes = notes(seconds, connections)
    base = Path(tempfile.mkdtemp(prefix="gows-soak-"))
    record = Record(seconds)
    log, digest = "", []
    try:
        root = make_docroot(base)
        script = base / "mix.lua"
        script.write_text(loads.wrk_mix_script(MIX))
        workdir = base / "gows"
        progress(f"starting gows ({WORKERS} workers, front cache on, admin on)")
        with serve(ServerSpec("gows-metrics", WORKERS, True), root, workdir) as server:
            admin = json.loads((workdir / "gows.conf.json").read_text())["admin"]
            progress(f"gows on port {server.port}, admin {admin}; soaking for {seconds} s")
            asyncio.run(Soak(server, admin, record, script, connections).run())
        # The master is stopped: its log is complete.
        log = log_tail(server.log_path, 40)
        digest = log_digest(server.log_path.read_text(errors="replace"))
        RESULTS.mkdir(exist_ok=True)
        shutil.copyfile(server.log_path, RESULTS / f"soak-{stamp}.log")
    except ServerError as exc:
        record.problems.append(f"gows did not start: {exc}")
    finally:
        if keep:
            progress(f"kept work files in {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)
    run_notes.append(f"load average at the end {os.getloadavg()[0]:.2f} (other jobs may share the machine)")
    reasons = record.reasons()
    RESULTS.mkdir(exist_ok=True)
    stem = RESULTS / f"soak-{stamp}"
    write_record(record, stem, f"gows soak, {seconds} s, {stamp}", run_notes, reasons, log, digest)
    print(samples_table(record) + "\n\n" + wrk_table(record) + "\n")
    print("\n".join(summary(record)))
    if digest:
        print("master log:\n  " + "\n  ".join(digest))
    print(f"\nwritten: {stem}.md, .json" + (", .log (the master's)" if stem.with_suffix(".log").exists() else ""))
    if reasons:
        print("\nFAILED:\n" + "\n".join(reasons))
        return 1
    print("\npassed: every error explained by a worker or proxy kill, every killed proxy replaced, no growth "
          f"above {verdict.GROWTH_LIMIT:.0%}, master serving with every worker and proxy up")
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; SOAK_SECONDS sets the default duration. A bad value exits 2 with one line."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.soak", description=__doc__.split("\n\n")[0])
    env = os.environ.get("SOAK_SECONDS", "300")
    parser.add_argument("--seconds", default=env, help="how long the load runs (default: SOAK_SECONDS or 300)")
    parser.add_argument("--connections", type=int, default=CONNECTIONS, help=f"wrk connections (default {CONNECTIONS})")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (docroot, config, master log)")
    args = parser.parse_args(argv)
    try:
        args.seconds = int(args.seconds)
    except ValueError:
        parser.error(f"SOAK_SECONDS/--seconds must be a whole number of seconds, not {args.seconds!r}")
    if args.seconds < 2 * schedule.SAMPLE_EVERY:
        parser.error(f"SOAK_SECONDS/--seconds must be at least {2 * schedule.SAMPLE_EVERY}")
    if args.connections < 1:
        parser.error("--connections must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    """Exit status 0 (held), 1 (failed), 2 (usage or missing tool), 130 (interrupted)."""
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        return soak(args.seconds, args.connections, args.keep)
    except MissingPrerequisite as exc:
        print(exc, file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        progress("interrupted: the master is stopped")
        return 130


if __name__ == "__main__":
    sys.exit(main())
