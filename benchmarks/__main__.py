"""`python -m benchmarks [compare|fileapp|hosts]`: start each server, load it with ab and wrk, report the table."""
from __future__ import annotations

import argparse
import math
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Callable

from . import bigloads, compressloads, loads, prereqs, proxies, report, tlsloads
from .loads import MANY_CLIENTS, MANY_THREADS, MANY_TOOL, LoadError, Measurement
from .prereqs import FILES, FileSet, MissingPrerequisite
from .report import Row
from .servers import KINDS, NAMES, NGINX_CONNECTIONS, PEER_THREADS, REFERENCES, Running, ServerError, ServerSpec, serve
from .usage import charged

RESULTS = Path(__file__).resolve().parent / "results"
STARTED = time.monotonic()


def progress(message: str) -> None:
    """Progress goes to stderr so stdout carries only the table."""
    print(f"[{time.monotonic() - STARTED:6.1f}s] {message}", file=sys.stderr, flush=True)


@dataclass
class Plan:
    """What one run measures and how hard."""

    suite: str
    specs: list[ServerSpec]
    ab_requests: int
    ab_concurrency: int
    repeat: int
    wrk_connections: int
    wrk_seconds: int
    wrk_files: list[str]  # labels of the files wrk loads
    # wrk -t{many_threads} -c{many_clients} keep-alive on the 1 KiB file, for these kinds of server
    # only (issue 11: gows' proxy processes against nginx and Apache with many clients).
    many_kinds: list[str]
    # Big downloads and the many-files load (issue 12, benchmarks/bigloads.py) for these kinds.
    big_kinds: list[str] = field(default_factory=list)
    # The compression load (issue 15, benchmarks/compressloads.py) for these kinds.
    compress_kinds: list[str] = field(default_factory=list)
    # HTTPS loads (issue 13, benchmarks/tlsloads.py) for these kinds (gows: front cache on only).
    tls_kinds: list[str] = field(default_factory=list)
    files: FileSet = field(default_factory=prereqs.many_files)
    many_clients: int = MANY_CLIENTS
    many_threads: int = MANY_THREADS


def build_plan(args: argparse.Namespace) -> Plan:
    """The suite's servers and loads, adjusted by --quick, --workers, --requests, --repeat, --duration, --only."""
    workers = args.workers or ([2] if args.quick else [2, 10, 100])
    if args.suite == "fileapp":
        kinds = ("fileapp", "fileapp-worker", "whitenoise", "whitenoise-worker", "werkzeug")
        specs = [ServerSpec(kind, 2) for kind in kinds]
        requests, wrk_files, many_kinds = 20000, [label for _, _, label in FILES], []
        big_kinds: list[str] = []
        compress_kinds: list[str] = []
        tls_kinds: list[str] = []
    else:
        specs = [ServerSpec("apache"), ServerSpec("nginx")]
        for n in workers:
            specs += [ServerSpec("gows", n, True), ServerSpec("gows", n, False), ServerSpec("whitenoise", n)]
        # The cost of metrics (issue 5): cache on, where the proxy does least besides them.
        specs.insert(3, ServerSpec("gows-metrics", workers[0], True))
        requests, wrk_files = 5000, [FILES[0][2]]
        # Not gunicorn+whitenoise: a gthread worker holds 1000 connections; nor the metrics cost's twins.
        many_kinds = ["apache", "nginx", "gows"]
        # Every gows row (cache on and off): about 31 s a server, 4 minutes of a full run.
        big_kinds = ["apache", "nginx", "gows"]
        compress_kinds = compressloads.KINDS
        # nginx and gows with its front cache on (each worker count): about 20 s a server.
        tls_kinds = ["nginx", "gows"]
    if args.only:
        specs = [s for s in specs if s.kind in args.only]
    if args.suite == "compare" and any(s.kind not in REFERENCES for s in specs):
        # The references again at the end of the run: the machine's speed drifts while it lasts
        # (10-15% within an hour on a shared host), which would favour whichever servers are
        # measured nearest to a reference measured once.
        specs += [replace(s, again=True) for s in specs if s.kind in REFERENCES]
    return Plan(
        suite=args.suite,
        specs=specs,
        ab_requests=args.requests or (1000 if args.quick else requests),
        ab_concurrency=100 if args.quick else 500,
        repeat=args.repeat or (1 if args.quick else 3),
        wrk_connections=100,
        wrk_seconds=args.duration or (2 if args.quick else 10),
        wrk_files=wrk_files,
        many_kinds=many_kinds,
        big_kinds=big_kinds,
        compress_kinds=compress_kinds,
        tls_kinds=tls_kinds,
    )


def wants_tls(spec: ServerSpec, plan: Plan) -> bool:
    """Whether a server gets the HTTPS loads (and so is started with an HTTPS listener)."""
    return spec.kind in plan.tls_kinds and spec.cache is not False


def planned_loads(spec: ServerSpec, plan: Plan) -> list[tuple[str, str]]:
    """The (tool, file label) of every row a server gets, in the order they are measured."""
    out = [("ab", label) for _, _, label in FILES]
    out += [("wrk", label) for _, _, label in FILES if label in plan.wrk_files]
    if spec.kind in plan.big_kinds:
        out += bigloads.planned(plan.files)
    if spec.kind in plan.compress_kinds:
        out += compressloads.planned()
    if wants_tls(spec, plan):
        out += tlsloads.planned()
    if spec.kind in plan.many_kinds:
        out.append((MANY_TOOL, FILES[0][2]))
    return out


# A server with twins is measured in 2 × `repeat` sessions, each with fresh processes (identical
# servers differ by up to ±3% from one start to the next), of TWIN_ROUNDS rounds of each load:
# wrk runs of wrk_seconds / TWIN_ROUNDS and ab runs of at least TWIN_AB_REQUESTS, since two
# identical servers measured in turn on this machine differ by ±10% run to run (±30% for ab
# runs of 5000 requests).
TWIN_ROUNDS = 4
TWIN_AB_REQUESTS = 20000


def twins_of(spec: ServerSpec) -> list[ServerSpec]:
    """The servers a spec is measured beside, load by load, when a ratio must resolve a few
    percent: the twin its ratio is taken against, and a second identical twin whose ratio to the
    first is the noise floor of that method in the same run."""
    if spec.kind != "gows-metrics":
        return []
    twin = ServerSpec("gows-noadmin", spec.workers, spec.cache)
    return [twin, twin]


def ratios(runs: list[Measurement], *baselines: list[Measurement]) -> list[float]:
    """Each round's req/s over the baselines' in the same round (their geometric mean when
    there are several); empty without baselines."""
    out = []
    for m, *base in zip(runs, *baselines):
        if base and all(b.rps > 0 for b in base):
            out.append(m.rps / math.prod(b.rps for b in base) ** (1 / len(base)))
    return out


def measure(spec: ServerSpec, plan: Plan, docroot: Path, workdir: Path,
            rows: list[Row], series: dict[ServerSpec, list[float]],
            certificate: tuple[Path, Path] | None = None) -> None:
    """All loads on one server, appended to `rows` as they finish (so an interrupt keeps them); the
    per-request times of its median ab 1 KiB run go to `series` for the chart. A spec with twins
    runs beside them, all taking turns on every load, in several sessions; the first twin's
    figures go in `Row.paired`, each round's ratios in `Row.paired_ratios` and `Row.control_ratios`."""
    twin_specs = twins_of(spec)
    sessions = 2 * plan.repeat if twin_specs else 1
    ab_rounds = TWIN_ROUNDS if twin_specs else plan.repeat
    wrk_rounds = TWIN_ROUNDS if twin_specs else 1
    requests = max(plan.ab_requests, TWIN_AB_REQUESTS) if twin_specs else plan.ab_requests
    seconds = max(1, plan.wrk_seconds // TWIN_ROUNDS) if twin_specs else plan.wrk_seconds
    results: dict[tuple[str, str], list[list[Measurement]]] = {}  # (tool, file): each round, server first

    def row(tool: str, label: str, **extra) -> Row:
        """The row of the server's median run, with its twins' figures when it has them."""
        runs = results[tool, label]
        mine = [r[0] for r in runs]
        median = loads.median_run(mine)
        if not twin_specs:
            return Row(spec, label, tool, median, **extra)
        twin, control = [r[1] for r in runs], [r[2] for r in runs]
        return Row(spec, label, tool, median, paired=loads.median_run(twin), paired_ratios=ratios(mine, twin, control),
                   control_ratios=ratios(control, twin), **extra)

    try:
        for session in range(sessions):
            last = session == sessions - 1
            started = time.monotonic()
            progress(f"{spec.label}: starting" + (f" (session {session + 1}/{sessions})" if sessions > 1 else ""))
            with ExitStack() as stack:
                # Each session starts the servers in another order: where a process lands when it
                # starts is worth a few percent, and that must not always favour the same one.
                order = [(0, spec, workdir / f"s{session}" if sessions > 1 else workdir)] + [
                    (k + 1, t, workdir / f"s{session}-twin{k}") for k, t in enumerate(twin_specs)]
                order = order[session % len(order):] + order[:session % len(order)]
                started_in_order = {k: stack.enter_context(serve(s, docroot, d, certificate if k == 0 and
                                                                 wants_tls(spec, plan) else None))
                                    for k, s, d in order}
                server, twins = started_in_order[0], [started_in_order[k + 1] for k in range(len(twin_specs))]
                state = "ready and idle" if server.idle else "ready but still busy (measuring anyway)"
                progress(f"{spec.label}: {state} on port {server.port} after {time.monotonic() - started:.1f}s")
                targets = [server, *twins]
                for target in targets:
                    for name, _, label in FILES:  # warm-up, not counted: caches, worker pools, lazy imports
                        loads.ab(target.url(name), min(1000, plan.ab_requests), 50)

                def in_turn(i: int, load) -> list[Measurement]:
                    """`load` on the server and each twin (in that order in the result); which one
                    goes first rotates with the round `i`."""
                    first = i % len(targets)
                    done = {j: load(targets[j], j == 0) for j in (*range(first, len(targets)), *range(first))}
                    return [done[j] for j in range(len(targets))]

                for name, _, label in FILES:
                    runs = results.setdefault(("ab", label), [])
                    for _ in range(ab_rounds):
                        tsv = workdir / f"ab-{name}-{len(runs)}.tsv"
                        runs.append(in_turn(len(runs), lambda target, own: observed(
                            target, lambda: loads.ab(target.url(name), requests, plan.ab_concurrency,
                                                                gnuplot=tsv if own else None))))
                        m = runs[-1][0]
                        progress(f"{spec.label}: ab {label} run {len(runs)}/{ab_rounds * sessions}: {m.rps:,.0f} "
                                 f"req/s, {m.failed} failed, {m.non2xx} non-2xx{per_proxy(m)}"
                                 + (f" (twins {' / '.join(f'{t.rps:,.0f}' for t in runs[-1][1:])})" if twins else ""))
                    if last:
                        rows.append(row("ab", label, runs_rps=[r[0].rps for r in runs]))
                        if name == FILES[0][0]:
                            median_round = next(i for i, r in enumerate(runs) if r[0] is rows[-1].result)
                            series[spec] = loads.read_gnuplot(workdir / f"ab-{name}-{median_round}.tsv")
                for name, _, label in FILES:
                    if label in plan.wrk_files:
                        runs = results.setdefault(("wrk", label), [])
                        for _ in range(wrk_rounds):
                            runs.append(in_turn(len(runs), lambda target, own: observed(
                                target, lambda: loads.wrk(target.url(name), plan.wrk_connections, seconds))))
                        if last:
                            rows.append(row("wrk", label))
                            m, paired = rows[-1].result, rows[-1].paired
                            progress(f"{spec.label}: wrk {label}: {m.rps:,.0f} req/s, {m.failed} socket errors, "
                                     f"{m.non2xx} non-2xx{per_proxy(m)}"
                                     + (f" (twin {paired.rps:,.0f})" if paired else ""))
                if last and spec.kind in plan.big_kinds:
                    for tool, label, load in bigloads.runs(server, plan.files, plan.wrk_seconds, workdir):
                        m = observed(server, load)
                        rows.append(Row(spec, label, tool, m))
                        progress(f"{spec.label}: {tool} {label}: {bigloads.describe(m, tool)}{per_proxy(m)}")
                if last and spec.kind in plan.compress_kinds:
                    compressloads.warm_up(server.url, plan.ab_requests)
                    for label, runs in compressloads.run(
                            server.url, plan.ab_requests, plan.ab_concurrency, plan.repeat,
                            lambda load: observed(server, load)).items():
                        rows.append(Row(spec, label, compressloads.TOOL, loads.median_run(runs),
                                        runs_rps=[m.rps for m in runs]))
                        m = rows[-1].result
                        progress(f"{spec.label}: {compressloads.TOOL} {label}: {m.rps:,.0f} req/s, "
                                 f"{m.failed} failed, {m.non2xx} non-2xx{per_proxy(m)}")
                if last and wants_tls(spec, plan):
                    for tool, label, load in tlsloads.runs(server, plan.ab_requests, plan.ab_concurrency,
                                                           plan.wrk_connections, plan.wrk_seconds):
                        m = observed(server, load)
                        rows.append(Row(spec, label, tool, m))
                        progress(f"{spec.label}: {tool} {label}: {m.rps:,.0f} req/s, p99 {m.p99_ms:g} ms, "
                                 f"{m.failed} failed, {m.non2xx} non-2xx{per_proxy(m)}")
                if last and spec.kind in plan.many_kinds:
                    # Last, so the other loads never meet the churn of 5000 connections closing.
                    name, _, label = FILES[0]
                    m = observed(server, lambda: loads.wrk(
                        server.url(name), plan.many_clients, plan.wrk_seconds, plan.many_threads))
                    rows.append(Row(spec, label, MANY_TOOL, m))
                    progress(f"{spec.label}: {MANY_TOOL} {label}: {m.rps:,.0f} req/s, p99 {m.p99_ms:g} ms, "
                             f"{m.failed} socket errors, {m.non2xx} non-2xx{per_proxy(m)}")
    except (ServerError, LoadError) as exc:
        progress(f"{spec.label}: FAILED: {exc}")
        done = {(r.tool, r.file) for r in rows if r.spec == spec}
        rows += [Row(spec, label, tool, error=str(exc)) for tool, label in planned_loads(spec, plan)
                 if (tool, label) not in done]
    progress(f"{spec.label}: stopped")


def observed(server: Running, load: Callable[[], Measurement]) -> Measurement:
    """Run `load` on `server`, noting each proxy's share of it and its processes' CPU a request."""
    return charged(server, lambda: proxies.counted(server.admin_port, load))


def per_proxy(m: Measurement) -> str:
    """`, per proxy 51%/49%` for a progress line; "" when the proxies were not counted."""
    text = proxies.fmt_shares(m.proxies)
    return f", per proxy {text}" if text else ""


def notes(plan: Plan, load_before: float, fd_limit: int) -> list[str]:
    """What the reader needs to trust the numbers: tools, settings, machine, method."""
    limit = "unlimited" if fd_limit == sys.maxsize else f"{fd_limit:,}"
    tools = {"ab": ["ab", "-V"], "wrk": ["wrk", "-v"], "apache": ["apache2", "-v"], "nginx": ["nginx", "-v"]}
    kinds = {s.kind for s in plan.specs}
    used = [k for k in tools if k in ("ab", "wrk") or k in kinds]
    return [
        f"machine: {os.cpu_count()} CPUs, {platform.system()} {platform.release()}, Python {platform.python_version()}; "
        f"load average before the run {load_before:.2f} (other jobs may share the machine)",
        "steal: the share of the machine's CPU time its hypervisor gave to other guests during the row's run "
        "(/proc/stat; ab rows: the median run's); a ratio between rows with unlike steal compares unlike "
        "machines, and a target's line names both when either reaches 1%",
        "tools: " + "; ".join(prereqs.version([prereqs.which(tools[k][0]) or tools[k][0], *tools[k][1:]])
                              for k in used),
        f"ab -n {plan.ab_requests} -c {plan.ab_concurrency} (no keep-alive): figures are the median of "
        f"{plan.repeat} run(s) by req/s; p50/p99 are ab's whole milliseconds",
        f"wrk -t1 -c{plan.wrk_connections} -d{plan.wrk_seconds}s --latency (keep-alive); its 'failed' counts socket "
        "errors, which include connections the server closes at its keep-alive limit (Apache: 100 requests)",
        *([f"{MANY_TOOL}: wrk -t{plan.many_threads} -c{plan.many_clients} -d{plan.wrk_seconds}s --latency "
           f"(keep-alive, wrk's default 2 s timeout) on the 1 KiB file, last on each server, for "
           f"{', '.join(NAMES[k] for k in plan.many_kinds)}; open file limit {limit} (wrk and the servers "
           f"inherit it); nginx with worker_connections {NGINX_CONNECTIONS} (Debian's 768 cannot hold them), "
           "Apache and gows with their defaults"] if plan.many_kinds else []),
        *bigloads.notes(plan.big_kinds, plan.files, plan.wrk_seconds),
        *compressloads.notes(plan.compress_kinds, plan.ab_requests, plan.ab_concurrency),
        *tlsloads.notes([k for k in plan.tls_kinds if k in kinds], plan.ab_requests, plan.ab_concurrency,
                        plan.wrk_connections, plan.wrk_seconds),
        "each server warmed up with ab -n 1000 -c 50 on each file before measuring; Python peers run "
        f"gunicorn -k gthread --threads {PEER_THREADS} with the listed workers (fileapp: create_app(root); "
        "'fileapp (gows worker)', 'whitenoise (gows worker)': the same apps under -k fileapp.worker.GowsThreadWorker, "
        "as gows' workers run it)",
        "Apache and nginx run with Debian's default configuration, access logs included (nginx: but for "
        f"worker_connections {NGINX_CONNECTIONS})",
        "ratios are requests/s over the baseline's on the same file and tool (whitenoise: same worker count); "
        "Apache and nginx are measured at the start of the run and again at its end ('again'), and a ratio to "
        "either is over the geometric mean of its two figures, so that the machine's drift during the run "
        "favours no server (a reference's own rows show the drift: their two ratios to it)",
        "gows runs with its admin listener on (so every response's latency is recorded); 'per proxy' is each "
        "proxy process's share of a run's requests, from /status.json's proxies before and after it "
        "(empty when the master lists none)",
        "gows+metrics (the same server) runs beside a twin 'gows (no admin)' without the admin listener and a "
        f"second identical twin, the three taking turns in {2 * plan.repeat} sessions (fresh processes) "
        f"of {TWIN_ROUNDS} rounds of each load (ab -n {max(plan.ab_requests, TWIN_AB_REQUESTS)}, wrk "
        f"{max(1, plan.wrk_seconds // TWIN_ROUNDS)}s each; each session starts the three in another order); its "
        "cost target is the median of the rounds' ratios to the twins (their geometric mean), and the second "
        "twin's ratio to the first is the noise floor",
    ]


def run(plan: Plan, keep: bool) -> int:
    """Measure every server of the plan, then print and write the report; exit status 1 if a server failed."""
    kinds = {s.kind for s in plan.specs}
    tls = any(wants_tls(s, plan) for s in plan.specs)
    prereqs.ensure_tools(["ab", "wrk"] + [cmd for kind, cmd in (("apache", "apache2"), ("nginx", "nginx"))
                                          if kind in kinds] + (["openssl"] if tls else []), log=progress)
    prereqs.ensure_python_modules(["gunicorn", "matplotlib"] + sorted(kinds & {"whitenoise", "werkzeug"}))
    fd_limit = prereqs.raise_open_file_limit()
    if plan.many_kinds and fd_limit < plan.many_clients + 1024:
        progress(f"the open file limit ({fd_limit}) is below {MANY_TOOL}'s {plan.many_clients} connections: "
                 "expect connect errors from wrk itself (raise the hard limit, ulimit -Hn)")
    load_before = os.getloadavg()[0]
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path(tempfile.mkdtemp(prefix="gows-bench-"))
    rows: list[Row] = []
    series: dict[ServerSpec, list[float]] = {}
    interrupted = False
    try:
        docroot = prereqs.make_docroot(base)
        if any(s.kind in plan.big_kinds for s in plan.specs):
            progress(f"writing {len(prereqs.DOWNLOADS)} downloads and {plan.files.label} files")
            prereqs.add_big_files(docroot, plan.files)
        if any(s.kind in plan.compress_kinds for s in plan.specs):
            compressloads.add_files(docroot)
        certificate = tlsloads.make_certificate(base) if tls else None
        for i, spec in enumerate(plan.specs, 1):
            progress(f"[{i}/{len(plan.specs)}] {spec.label} (load average {os.getloadavg()[0]:.2f})")
            measure(spec, plan, docroot, base / f"{i:02d}-{spec.kind}", rows, series, certificate)
    except KeyboardInterrupt:
        interrupted = True
        progress("interrupted: servers stopped, writing what was measured")
    finally:
        if keep:
            progress(f"kept work files in {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)
    if not rows:
        return 130 if interrupted else 1
    RESULTS.mkdir(exist_ok=True)
    stem = RESULTS / f"{plan.suite}-{stamp}"
    chart_path = None
    if series:
        chart_path = stem.with_suffix(".png")
        report.chart(chart_path, series, f"ab -n {plan.ab_requests} -c {plan.ab_concurrency}, 1 KiB file "
                                         f"(median of {plan.repeat} runs): response time by percentile of requests")
    checks = report.check_targets(plan.suite, rows)
    title = f"gows benchmark: {plan.suite} suite, {stamp}" + (" (interrupted)" if interrupted else "")
    run_notes = notes(plan, load_before, fd_limit)
    stem.with_suffix(".md").write_text(report.markdown(title, run_notes, rows, checks, chart_path))
    settings = {k: v for k, v in asdict(plan).items() if k != "specs"}
    report.write_json(stem.with_suffix(".json"), {"suite": plan.suite, "stamp": stamp, "settings": settings,
                                                  "notes": run_notes, "interrupted": interrupted}, rows, checks)
    print(report.table(rows))
    if checks:
        print("\nTargets:\n" + report.targets_text(checks))
    print(f"\nwritten: {stem}.md, .json" + (", .png" if chart_path else ""))
    if interrupted:
        return 130
    return 1 if any(r.error for r in rows) else 0


def int_list(text: str) -> list[int]:
    """`2,10,100` -> [2, 10, 100] (argparse type for --workers)."""
    return [int(n) for n in text.split(",")]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; a bad value exits 2 with argparse's one-line message."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("suite", nargs="?", default="compare", choices=["compare", "fileapp", "hosts"],
                        help="compare: Apache, nginx, gows (2/10/100 workers, front cache on/off) and "
                             "gunicorn+whitenoise (issue 4), with wrk -t2 -c5000 on Apache, nginx and gows "
                             "(issue 11), 10/100 MiB downloads and many files on them (issue 12); fileapp: "
                             "fileapp (also under gows' worker "
                             "class) vs whitenoise vs SharedDataMiddleware under gunicorn gthread, 2 workers (issue 2); "
                             "hosts: an edge gows and three nodes in network namespaces (root), round robin vs "
                             "consistent hash: req/s and the nodes' aggregate front-cache hit ratio (issue 14)")
    parser.add_argument("--front-cache-kib", type=int, default=4096, metavar="KIB",
                        help="hosts suite: each node's front cache; the working set is 3x this (default 4096)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: ab -n 1000 -c 100 once, every wrk load 2s, 2 workers")
    parser.add_argument("--only", type=lambda s: s.split(","), action="extend",
                        metavar="SERVER[,SERVER]", help=f"measure only these servers: {', '.join(KINDS)}")
    parser.add_argument("--workers", type=int_list, metavar="N[,N]",
                        help="gows/whitenoise worker counts for the compare suite (default 2,10,100)")
    parser.add_argument("--requests", type=int, metavar="N", help="requests per ab run (default 5000; fileapp 20000)")
    parser.add_argument("--repeat", type=int, metavar="R", help="ab runs per file, the median is reported (default 3)")
    parser.add_argument("--duration", type=int, metavar="S", help="seconds per wrk run, every wrk load (default 10)")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (configs, server logs, ab -g files)")
    args = parser.parse_args(argv)
    for name in ("requests", "repeat", "duration"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    if args.workers is not None and any(n < 1 for n in args.workers):
        parser.error("--workers must be positive")
    unknown = set(args.only or []) - set(KINDS)
    if unknown:
        parser.error(f"--only: unknown server {', '.join(sorted(unknown))} (choose from {', '.join(KINDS)})")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the chosen suite; the exit status is 0 (all measured), 1 (a server failed), 2 (usage), 130 (interrupted)."""
    args = parse_args(argv)
    if args.suite == "hosts":
        from . import hosts
        return hosts.main(args.duration or (2 if args.quick else 10), args.front_cache_kib, keep=args.keep)
    plan = build_plan(args)
    if not plan.specs:
        print(f"nothing to measure: --only {','.join(args.only)} matches no server of the {plan.suite} suite",
              file=sys.stderr)
        return 2
    outside = sorted(set(args.only or []) - {s.kind for s in plan.specs})
    if outside:
        progress(f"--only: {', '.join(outside)} not part of the {plan.suite} suite, ignored")
    # TERM (e.g. from a CI timeout) stops the servers and writes results like Ctrl-C does.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        return run(plan, args.keep)
    except MissingPrerequisite as exc:
        print(exc, file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
