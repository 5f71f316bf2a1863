"""`python -m benchmarks [compare|fileapp]`: start each server, load it with ab and wrk, report the table."""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

from . import loads, prereqs, report
from .loads import LoadError, Measurement
from .prereqs import FILES, MissingPrerequisite
from .report import Row
from .servers import KINDS, PEER_THREADS, ServerError, ServerSpec, serve

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


def build_plan(args: argparse.Namespace) -> Plan:
    """The suite's servers and loads, adjusted by --quick, --workers, --requests, --repeat, --duration, --only."""
    workers = args.workers or ([2] if args.quick else [2, 10, 100])
    if args.suite == "fileapp":
        specs = [ServerSpec(kind, 2) for kind in ("fileapp", "fileapp-worker", "whitenoise", "werkzeug")]
        requests, wrk_files = 20000, [label for _, _, label in FILES]
    else:
        specs = [ServerSpec("apache"), ServerSpec("nginx")]
        for n in workers:
            specs += [ServerSpec("gows", n, True), ServerSpec("gows", n, False), ServerSpec("whitenoise", n)]
        # The cost of metrics (issue 5): cache on, where the proxy does least besides them.
        specs.insert(3, ServerSpec("gows-metrics", workers[0], True))
        requests, wrk_files = 5000, [FILES[0][2]]
    if args.only:
        specs = [s for s in specs if s.kind in args.only]
    return Plan(
        suite=args.suite,
        specs=specs,
        ab_requests=args.requests or (1000 if args.quick else requests),
        ab_concurrency=100 if args.quick else 500,
        repeat=args.repeat or (1 if args.quick else 3),
        wrk_connections=100,
        wrk_seconds=args.duration or (2 if args.quick else 10),
        wrk_files=wrk_files,
    )


def twin_of(spec: ServerSpec) -> ServerSpec | None:
    """The server a spec is measured against load by load, when a ratio must resolve a few
    percent: runs of one server minutes apart differ by more than that."""
    return ServerSpec("gows", spec.workers, spec.cache) if spec.kind == "gows-metrics" else None


def measure(spec: ServerSpec, plan: Plan, docroot: Path, workdir: Path,
            rows: list[Row], series: dict[ServerSpec, list[float]]) -> None:
    """All loads on one server, appended to `rows` as they finish (so an interrupt keeps them); the
    per-request times of its median ab 1 KiB run go to `series` for the chart. A spec with a twin
    runs beside it, the two taking turns on every load; the twin's figures go in `Row.paired`."""
    started = time.monotonic()
    progress(f"{spec.label}: starting")
    twin_spec = twin_of(spec)
    try:
        with serve(spec, docroot, workdir) as server, \
                (serve(twin_spec, docroot, workdir / "twin") if twin_spec else nullcontext()) as twin:
            state = "ready and idle" if server.idle else "ready but still busy (measuring anyway)"
            progress(f"{spec.label}: {state} on port {server.port} after {time.monotonic() - started:.1f}s")
            for target in filter(None, (server, twin)):
                for name, _, label in FILES:  # warm-up, not counted: caches, worker pools, lazy imports
                    loads.ab(target.url(name), min(1000, plan.ab_requests), 50)

            def in_turn(i: int, load) -> tuple[Measurement, Measurement | None]:
                """`load` on the server and on its twin, the twin first on even rounds."""
                first = load(twin, False) if twin is not None and i % 2 == 0 else None
                m = load(server, True)
                return m, first if first is not None else (load(twin, False) if twin is not None else None)

            for name, _, label in FILES:
                runs: list[tuple[Measurement, Path]] = []
                twin_runs: list[Measurement] = []
                for i in range(plan.repeat):
                    tsv = workdir / f"ab-{name}-{i}.tsv"
                    m, t = in_turn(i, lambda target, own: loads.ab(
                        target.url(name), plan.ab_requests, plan.ab_concurrency, gnuplot=tsv if own else None))
                    progress(f"{spec.label}: ab {label} run {i + 1}/{plan.repeat}: {m.rps:,.0f} req/s, "
                             f"{m.failed} failed, {m.non2xx} non-2xx" + (f" (twin {t.rps:,.0f})" if t else ""))
                    runs.append((m, tsv))
                    twin_runs += [t] if t else []
                median = loads.median_run([m for m, _ in runs])
                paired = loads.median_run(twin_runs) if twin_runs else None
                rows.append(Row(spec, label, "ab", median, [m.rps for m, _ in runs], paired=paired))
                if name == FILES[0][0]:
                    series[spec] = loads.read_gnuplot(next(t for m, t in runs if m is median))
            for name, _, label in FILES:
                if label in plan.wrk_files:
                    pairs = [in_turn(i, lambda target, own: loads.wrk(
                        target.url(name), plan.wrk_connections, plan.wrk_seconds)) for i in range(plan.repeat if twin else 1)]
                    m = loads.median_run([m for m, _ in pairs])
                    paired = loads.median_run([t for _, t in pairs]) if twin else None
                    progress(f"{spec.label}: wrk {label}: {m.rps:,.0f} req/s, {m.failed} socket errors, "
                             f"{m.non2xx} non-2xx" + (f" (twin {paired.rps:,.0f})" if paired else ""))
                    rows.append(Row(spec, label, "wrk", m, paired=paired))
    except (ServerError, LoadError) as exc:
        progress(f"{spec.label}: FAILED: {exc}")
        done = {(r.file, r.tool) for r in rows if r.spec == spec}
        for _, _, label in FILES:
            for tool in ("ab", "wrk"):
                if (label, tool) not in done and (tool == "ab" or label in plan.wrk_files):
                    rows.append(Row(spec, label, tool, error=str(exc)))
    progress(f"{spec.label}: stopped")


def version(argv: list[str]) -> str:
    """First line a tool prints about its version (for the report's notes)."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    lines = (done.stdout + done.stderr).strip().splitlines()
    line = next((l for l in lines if any(ch.isdigit() for ch in l)), "?")
    return line.removeprefix("This is ").split(" <$")[0].split(" Copyright")[0].strip()


def notes(plan: Plan, load_before: float) -> list[str]:
    """What the reader needs to trust the numbers: tools, settings, machine, method."""
    tools = {"ab": ["ab", "-V"], "wrk": ["wrk", "-v"], "apache": ["apache2", "-v"], "nginx": ["nginx", "-v"]}
    kinds = {s.kind for s in plan.specs}
    used = [k for k in tools if k in ("ab", "wrk") or k in kinds]
    return [
        f"machine: {os.cpu_count()} CPUs, {platform.system()} {platform.release()}, Python {platform.python_version()}; "
        f"load average before the run {load_before:.2f} (other jobs may share the machine)",
        "tools: " + "; ".join(version([prereqs.which(tools[k][0]) or tools[k][0], *tools[k][1:]]) for k in used),
        f"ab -n {plan.ab_requests} -c {plan.ab_concurrency} (no keep-alive): figures are the median of "
        f"{plan.repeat} run(s) by req/s; p50/p99 are ab's whole milliseconds",
        f"wrk -t1 -c{plan.wrk_connections} -d{plan.wrk_seconds}s --latency (keep-alive); its 'failed' counts socket "
        "errors, which include connections the server closes at its keep-alive limit (Apache: 100 requests)",
        "each server warmed up with ab -n 1000 -c 50 on each file before measuring; Python peers run "
        f"gunicorn -k gthread --threads {PEER_THREADS} with the listed workers (fileapp: create_app(root); "
        "'fileapp (gows worker)': the same app under -k fileapp.worker.GowsThreadWorker, as gows' workers run it)",
        "Apache and nginx run with Debian's default configuration, access logs included",
        "ratios are requests/s over the baseline's on the same file and tool (whitenoise: same worker count)",
        "gows+metrics (admin listener on, so every response's latency is recorded) runs beside a twin gows "
        "without it, the two taking turns on every ab and wrk run; its cost target is against that twin",
    ]


def run(plan: Plan, keep: bool) -> int:
    """Measure every server of the plan, then print and write the report; exit status 1 if a server failed."""
    kinds = {s.kind for s in plan.specs}
    prereqs.ensure_tools(["ab", "wrk"] + [cmd for kind, cmd in (("apache", "apache2"), ("nginx", "nginx"))
                                          if kind in kinds], log=progress)
    prereqs.ensure_python_modules(["gunicorn", "matplotlib"] + sorted(kinds & {"whitenoise", "werkzeug"}))
    prereqs.raise_open_file_limit()
    load_before = os.getloadavg()[0]
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path(tempfile.mkdtemp(prefix="gows-bench-"))
    rows: list[Row] = []
    series: dict[ServerSpec, list[float]] = {}
    interrupted = False
    try:
        docroot = prereqs.make_docroot(base)
        for i, spec in enumerate(plan.specs, 1):
            progress(f"[{i}/{len(plan.specs)}] {spec.label} (load average {os.getloadavg()[0]:.2f})")
            measure(spec, plan, docroot, base / f"{i:02d}-{spec.kind}", rows, series)
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
                                         f"(median of {plan.repeat} runs): response time of each request")
    checks = report.check_targets(plan.suite, rows)
    title = f"gows benchmark: {plan.suite} suite, {stamp}" + (" (interrupted)" if interrupted else "")
    run_notes = notes(plan, load_before)
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
    parser.add_argument("suite", nargs="?", default="compare", choices=["compare", "fileapp"],
                        help="compare: Apache, nginx, gows (2/10/100 workers, front cache on/off) and "
                             "gunicorn+whitenoise (issue 4); fileapp: fileapp (also under gows' worker "
                             "class) vs whitenoise vs SharedDataMiddleware under gunicorn gthread, 2 workers (issue 2)")
    parser.add_argument("--quick", action="store_true", help="smoke run: ab -n 1000 -c 100 once, wrk 2s, 2 workers")
    parser.add_argument("--only", type=lambda s: s.split(","), action="extend",
                        metavar="SERVER[,SERVER]", help=f"measure only these servers: {', '.join(KINDS)}")
    parser.add_argument("--workers", type=int_list, metavar="N[,N]",
                        help="gows/whitenoise worker counts for the compare suite (default 2,10,100)")
    parser.add_argument("--requests", type=int, metavar="N", help="requests per ab run (default 5000; fileapp 20000)")
    parser.add_argument("--repeat", type=int, metavar="R", help="ab runs per file, the median is reported (default 3)")
    parser.add_argument("--duration", type=int, metavar="S", help="seconds per wrk run (default 10)")
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
