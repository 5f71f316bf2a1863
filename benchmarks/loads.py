"""Run ApacheBench and wrk against a URL and parse what they print into one Measurement shape."""
from __future__ import annotations

import re
import resource
import statistics
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from .proxies import ProxyShare


# The many-clients keep-alive load (issue 11): wrk from two threads holding 5000 connections.
MANY_CLIENTS, MANY_THREADS = 5000, 2
MANY_TOOL = f"wrk -c{MANY_CLIENTS}"  # the tool column of its rows ("wrk" alone is -t1 -c100)
# Big downloads (issue 12): wrk from one thread over 8 connections, judged by bytes per second.
# A timeout is a download not done in DOWNLOAD_TIMEOUT s: wrk's default 2 s would flag a 100 MiB
# response at 8 connections whenever a server is below 420 MB/s, which nginx is on a busy 2-core box.
DOWNLOAD_CONNECTIONS, DOWNLOAD_TIMEOUT = 8, 10
DOWNLOAD_TOOL = f"wrk -c{DOWNLOAD_CONNECTIONS}"
# Many distinct files (issue 12): wrk -t1 -c100 with a Lua script picking a file at random per request.
FILES_TOOL = "wrk files"


class LoadError(RuntimeError):
    """A load tool failed or printed something we cannot read."""


@dataclass
class Measurement:
    """One load run, in the same units for ab and wrk."""

    requests: int  # completed requests
    rps: float  # requests per second
    mean_ms: float  # mean time per request as one client sees it (ab: per concurrent request; wrk: latency avg)
    transfer_kbs: float  # KiB/s received
    failed: int  # ab: "Failed requests"; wrk: socket errors (connect, read, write, timeout)
    non2xx: int  # responses outside 2xx (wrk: outside 2xx/3xx)
    p50_ms: float
    p99_ms: float
    # Each gows proxy process's share of this run (benchmarks/proxies.py); None: not counted.
    proxies: list[ProxyShare] | None = None
    # The share of the machine's CPU time its hypervisor gave to other guests while the run went
    # on (/proc/stat's steal): a row with some ran on a slower machine than one without; None:
    # not known (no /proc/stat).
    steal: float | None = None
    # CPU time (user + system) a completed request cost, in µs: the server's processes
    # (usage.charged) and the load tool's own. Both share the machine, so a server that makes
    # its client work harder leaves itself less; None: not measured (or no request completed).
    server_cpu_us: float | None = None
    client_cpu_us: float | None = None


_WRK_TIME = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}
_WRK_BYTES = {"B": 1 / 1024, "KB": 1.0, "MB": 1024.0, "GB": 1024.0**2, "TB": 1024.0**3}


def _search(pattern: str, text: str, tool: str) -> re.Match:
    match = re.search(pattern, text, re.M)
    if match is None:
        tail = "\n".join(text.strip().splitlines()[-5:])
        raise LoadError(f"{tool} output has no line matching {pattern!r}; it ended with:\n{tail}")
    return match


def _count(pattern: str, text: str) -> int:
    """An optional counter line (ab and wrk print some only when non-zero)."""
    match = re.search(pattern, text, re.M)
    return int(match.group(1)) if match else 0


def parse_ab(text: str) -> Measurement:
    """Parse ApacheBench's report (`ab -n N -c C URL`)."""
    return Measurement(
        requests=int(_search(r"^Complete requests:\s+(\d+)", text, "ab").group(1)),
        rps=float(_search(r"^Requests per second:\s+([\d.]+)", text, "ab").group(1)),
        mean_ms=float(_search(r"^Time per request:\s+([\d.]+) \[ms\] \(mean\)$", text, "ab").group(1)),
        transfer_kbs=float(_search(r"^Transfer rate:\s+([\d.]+) \[Kbytes/sec\]", text, "ab").group(1)),
        failed=int(_search(r"^Failed requests:\s+(\d+)", text, "ab").group(1)),
        non2xx=_count(r"^Non-2xx responses:\s+(\d+)", text),
        p50_ms=float(_search(r"^\s+50%\s+(\d+)", text, "ab").group(1)),
        p99_ms=float(_search(r"^\s+99%\s+(\d+)", text, "ab").group(1)),
    )


def _wrk_ms(value: str, unit: str) -> float:
    return float(value) * _WRK_TIME[unit]


def parse_wrk(text: str) -> Measurement:
    """Parse wrk's report (`wrk --latency ...`)."""
    avg = _search(r"^\s+Latency\s+([\d.]+)(us|ms|s|m|h)\s", text, "wrk")
    p50 = _search(r"^\s+50%\s+([\d.]+)(us|ms|s|m|h)\s*$", text, "wrk")
    p99 = _search(r"^\s+99%\s+([\d.]+)(us|ms|s|m|h)\s*$", text, "wrk")
    transfer = _search(r"^Transfer/sec:\s+([\d.]+)([KMGT]?B)$", text, "wrk")
    return Measurement(
        requests=int(_search(r"^\s+(\d+) requests in ", text, "wrk").group(1)),
        rps=float(_search(r"^Requests/sec:\s+([\d.]+)", text, "wrk").group(1)),
        mean_ms=_wrk_ms(*avg.groups()),
        transfer_kbs=float(transfer.group(1)) * _WRK_BYTES[transfer.group(2)],
        failed=sum(wrk_errors(text).values()),
        non2xx=_count(r"^\s+Non-2xx or 3xx responses:\s+(\d+)", text),
        p50_ms=_wrk_ms(*p50.groups()),
        p99_ms=_wrk_ms(*p99.groups()),
    )


def median_run(runs: list[Measurement]) -> Measurement:
    """The run with the median requests/s (a real run, so its fields stay consistent with each other)."""
    if not runs:
        raise ValueError("no runs")
    ordered = sorted(runs, key=lambda m: m.rps)
    return ordered[(len(ordered) - 1) // 2]


def spread(runs: list[Measurement]) -> float:
    """Relative spread of requests/s across repeated runs, (max - min) / median."""
    values = [m.rps for m in runs]
    middle = statistics.median(values)
    return (max(values) - min(values)) / middle if middle else 0.0


def read_gnuplot(path: Path) -> list[float]:
    """Total time (ms) of each request from `ab -g FILE`, in the order ab writes them (sorted by time)."""
    times = []
    for line in path.read_text().splitlines()[1:]:
        fields = line.split("\t")
        if len(fields) == 6:
            times.append(float(fields[4]))
    return times


def cpu_times(path: str = "/proc/stat") -> tuple[int, int] | None:
    """(stolen, total) CPU time of all the machine's CPUs since boot, in clock ticks, from
    /proc/stat's first line; None where it cannot be read."""
    try:
        with open(path) as f:
            fields = f.readline().split()
    except OSError:
        return None
    if len(fields) < 9 or fields[0] != "cpu":
        return None
    # user nice system idle iowait irq softirq steal; guest and guest_nice are counted in user and nice.
    ticks = [int(v) for v in fields[1:9]]
    return ticks[7], sum(ticks)


def stolen(before: tuple[int, int] | None, after: tuple[int, int] | None) -> float | None:
    """The share of the CPU time between two cpu_times() readings that went to steal."""
    if before is None or after is None or after[1] <= before[1]:
        return None
    return (after[0] - before[0]) / (after[1] - before[1])


def children_cpu() -> float:
    """CPU seconds (user + system) of this process's children that have ended: a load tool's own
    once subprocess.run has waited for it."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def per_request(cpu_seconds: float, requests: int) -> float | None:
    """`cpu_seconds` spread over `requests`, in µs each; None when no request completed."""
    return cpu_seconds * 1e6 / requests if requests > 0 else None


def _measured(argv: list[str], timeout: float, parse: Callable[[str], Measurement]) -> Measurement:
    """Run a load tool, parse what it printed, and note the CPU steal while it ran and the tool's
    own CPU time a request."""
    before, tool_before = cpu_times(), children_cpu()
    result = parse(_run(argv, timeout))
    result.steal = stolen(before, cpu_times())
    result.client_cpu_us = per_request(children_cpu() - tool_before, result.requests)
    return result


def _run(argv: list[str], timeout: float) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise LoadError(f"{argv[0]} did not finish within {timeout:.0f}s") from None
    if done.returncode != 0 and not done.stdout:
        raise LoadError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()[-500:]}")
    return done.stdout


def ab(url: str, requests: int, concurrency: int, gnuplot: Path | None = None,
       headers: dict[str, str] | None = None, protocol: str | None = None) -> Measurement:
    """`ab -n requests -c concurrency [-H 'Name: value'...] URL`, no keep-alive; -r counts socket
    errors instead of aborting; `protocol`: ab's -f for an https URL (TLS1.2: that version only)."""
    argv = ["ab", "-q", "-r", "-n", str(requests), "-c", str(concurrency)]
    for name, value in (headers or {}).items():
        argv += ["-H", f"{name}: {value}"]
    if protocol is not None:
        argv += ["-f", protocol]
    if gnuplot is not None:
        argv += ["-g", str(gnuplot)]
    return _measured(argv + [url], 120 + requests / 50, parse_ab)


def wrk(url: str, connections: int, seconds: int, threads: int = 1, timeout: int | None = None,
        script: Path | None = None) -> Measurement:
    """`wrk -tT -cN -dS --latency [--timeout T] [-s script] URL`: keep-alive load (each connection
    needs a descriptor in wrk and in the server: the caller raises RLIMIT_NOFILE, which both inherit)."""
    argv = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "--latency"]
    argv += [f"--timeout={timeout}s"] if timeout is not None else []
    argv += ["-s", str(script)] if script is not None else []
    return _measured(argv + [url], seconds + (timeout or 2) + 60, parse_wrk)


@dataclass(frozen=True)
class MixEntry:
    """One request of wrk's mixed load: a path, or a random `range_bytes` slice of a file of `size` bytes
    (a Range request, which the front cache never answers)."""

    path: str
    range_bytes: int = 0
    size: int = 0


def _lua_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def wrk_mix_script(mix: list[MixEntry]) -> str:
    """A wrk Lua script that sends the mix's requests in turn (each thread from its own point) and
    prints `soak-status CODE COUNT` for every status it received, summed over its threads."""
    entries = ",\n".join(f"  {{{_lua_string(e.path)}, {e.range_bytes}, {e.size}}}" for e in mix)
    return f"""-- written by benchmarks/loads.py: mixed cacheable and uncacheable requests
local mix = {{
{entries}
}}
local threads = {{}}
local next_id = 0

function setup(thread)
  next_id = next_id + 1
  thread:set("id", next_id)
  table.insert(threads, thread)
end

function init(args)
  statuses = {{}}
  math.randomseed(os.time() * 1000 + id)
  turn = id % #mix
  prepared = {{}}
  for i, e in ipairs(mix) do
    prepared[i] = wrk.format("GET", e[1])
  end
end

function request()
  turn = turn % #mix + 1
  local e = mix[turn]
  if e[2] > 0 then
    local first = math.random(0, e[3] - e[2])
    return wrk.format("GET", e[1], {{["Range"] = string.format("bytes=%d-%d", first, first + e[2] - 1)}})
  end
  return prepared[turn]
end

function response(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
end

function done(summary, latency, requests)
  local total = {{}}
  for _, thread in ipairs(threads) do
    for status, n in pairs(thread:get("statuses")) do
      total[status] = (total[status] or 0) + n
    end
  end
  for status, n in pairs(total) do
    io.write(string.format("soak-status %d %d\\n", status, n))
  end
end
"""


def wrk_files_script(paths: list[str], seed: int = 12) -> str:
    """A wrk Lua script that requests one of `paths` at random, uniformly, for each request; the
    same sequence on every run (a fixed seed per thread), so every server gets the same requests.
    No `response` hook: with one, wrk hands every response to Lua, which costs more than the request."""
    entries = ",\n".join(f"  {_lua_string(path)}" for path in paths)
    return f"""-- written by benchmarks/loads.py: {len(paths)} distinct files, one at random per request
local paths = {{
{entries}
}}
local next_id = 0

function setup(thread)
  next_id = next_id + 1
  thread:set("id", next_id)
end

function init(args)
  math.randomseed({seed} * 1000 + id)
  prepared = {{}}
  for i, path in ipairs(paths) do
    prepared[i] = wrk.format("GET", path)
  end
end

function request()
  return prepared[math.random(#prepared)]
end
"""


def parse_wrk_statuses(text: str) -> dict[int, int]:
    """The `soak-status CODE COUNT` lines of wrk_mix_script, as {status: count}."""
    return {int(code): int(n) for code, n in re.findall(r"^soak-status (\d+) (\d+)$", text, re.M)}


def wrk_errors(text: str) -> dict[str, int]:
    """wrk's socket errors by kind (connect, read, write, timeout); all zero when it printed none."""
    match = re.search(r"^\s+Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text, re.M)
    counts = [int(n) for n in match.groups()] if match else [0, 0, 0, 0]
    return dict(zip(("connect", "read", "write", "timeout"), counts))


def wrk_script_run(url: str, script: Path, connections: int, seconds: int, timeout: int) -> str:
    """`wrk -t1 -cN -dS --timeout T --latency -s script URL`; its whole output."""
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", f"--timeout={timeout}s", "--latency",
            "-s", str(script), url]
    return _run(argv, timeout=seconds + timeout + 60)
