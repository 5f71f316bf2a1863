"""Turn measurements into the table (stdout and Markdown), the JSON record, the target checks and the chart."""
from __future__ import annotations

import json
import math
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import compressloads
from .loads import DOWNLOAD_TOOL, FILES_TOOL, MANY_TOOL, Measurement
from .tlsloads import TLS_TOOLS
from .prereqs import DOWNLOADS, many_files
from .proxies import evenness, fmt_counts, fmt_shares
from .servers import ServerSpec

# Baselines that get a ratio column when they were measured: (column title, server kind, same workers?).
BASELINES = [("×Apache", "apache", False), ("×nginx", "nginx", False), ("×whitenoise", "whitenoise", True),
             ("×whitenoise (gows worker)", "whitenoise-worker", True)]


@dataclass
class Row:
    """One server measured with one tool on one file (or the error that prevented it)."""

    spec: ServerSpec
    file: str
    tool: str  # "ab" or "wrk"
    result: Measurement | None = None
    runs_rps: list[float] = field(default_factory=list)  # every repeat of an ab run
    error: str | None = None
    paired: Measurement | None = None  # its twin's figures, measured in turn with it (twins_of)
    paired_ratios: list[float] = field(default_factory=list)  # req/s over the twin's, round by round
    control_ratios: list[float] = field(default_factory=list)  # an identical second twin's over the twin's


@dataclass
class Target:
    """A goal from the issues: `kind` (with `cache`) reaches `minimum` × `baseline` on matching rows."""

    text: str
    kind: str
    cache: bool | None
    baseline: str
    minimum: float
    files: tuple[str, ...] = ("1 KiB",)
    tools: tuple[str, ...] = ("ab", "wrk")
    zero_failed: bool = False
    paired: bool = False  # against the row's twin, measured in turn with it, not a separate run
    # Set: a latency target instead, p99 at most the baseline's p99 + this many ms (`minimum` unused).
    p99_slack_ms: float | None = None
    # Set: the baseline is the same server's row on this file (same tool); `baseline` names it.
    baseline_file: str | None = None


# A check's line names the CPU steal of its row and its baseline's from this share of the
# machine's CPU time. A share averages over the run, and steal comes in bursts that cost more than
# their share: three ab runs of a side run (5 s) had 9% steal between them, and one of the three
# ran a third slower than the other two.
STEAL_NOTED = 0.01
DOWNLOAD_LABELS = tuple(label for _, _, label in DOWNLOADS)
ISSUE_12_FILES = many_files().label

TARGETS = {
    "compare": [
        Target("front cache on, ab 1 KiB, 0 failed", "gows", True, "apache", 1.0, tools=("ab",), zero_failed=True),
        Target("front cache on, wrk keep-alive", "gows", True, "nginx", 0.5, tools=("wrk",)),
        Target("front cache off vs whitenoise, same workers", "gows", False, "whitenoise", 0.8,
               files=("1 KiB", "150 KB")),
        Target("counters and histograms cost at most 5%", "gows-metrics", True, "gows-noadmin", 0.95, paired=True),
        Target("issue 11: proxy processes at least as fast as nginx, front cache on, 0 failed", "gows", True,
               "nginx", 1.0, files=("1 KiB", "150 KB"), tools=("ab", "wrk", MANY_TOOL), zero_failed=True),
        Target("issue 11: p99 at most nginx's p99 + 1 ms, wrk -c100", "gows", True, "nginx", 0.0, tools=("wrk",),
               p99_slack_ms=1.0),
        Target("issue 12: front cache off at least as fast as Apache, 0 failed", "gows", False, "apache", 1.0,
               files=("1 KiB", "150 KB"), tools=("ab", "wrk"), zero_failed=True),
        *(Target(f"issue 12: 10 MiB and 100 MiB downloads at least 0.8× nginx's MB/s, front cache {state}",
                 "gows", cache, "nginx", 0.8, files=DOWNLOAD_LABELS, tools=(DOWNLOAD_TOOL,))
          for cache, state in ((True, "on"), (False, "off"))),
        Target("issue 13: HTTPS at least 0.8× nginx with the same certificate, front cache on, 0 failed", "gows",
               True, "nginx", 0.8, tools=TLS_TOOLS, zero_failed=True),
        *(Target(f"issue 12: many files (4× the front cache) at least as fast as Apache, front cache {state}",
                 "gows", cache, "apache", 1.0, files=(ISSUE_12_FILES,), tools=(FILES_TOOL,))
          for cache, state in ((True, "on"), (False, "off"))),
        Target("issue 15: a 100 KB text compressed on the fly at least 0.9× the req/s of a precompressed "
               "sidecar, front cache on (the default)", "gows", True, "br sidecar", 0.9,
               files=(compressloads.ON_THE_FLY[1],), tools=(compressloads.TOOL,),
               baseline_file=compressloads.SIDECAR[1]),
    ],
    "fileapp": [
        Target("fileapp on cache hits", "fileapp", None, "whitenoise", 1.2, files=("1 KiB", "150 KB")),
        Target("fileapp on cache hits, under gows' worker", "fileapp-worker", None, "whitenoise", 1.2,
               files=("1 KiB", "150 KB")),
    ],
}


def rate(m: Measurement, tool: str) -> float:
    """What a row is judged by: bytes per second (KiB/s) for a download, requests per second otherwise."""
    return m.transfer_kbs if tool == DOWNLOAD_TOOL else m.rps


def same_server_row(row: Row, rows: list[Row], file: str) -> Row | None:
    """The measured row of the same server and tool on `file`."""
    return next((o for o in rows if o.spec == row.spec and o.file == file and o.tool == row.tool
                 and o.result is not None and o.result.rps > 0), None)


def baseline_rows(row: Row, rows: list[Row], kind: str, same_workers: bool) -> list[Row]:
    """The measured rows of server `kind` on the same file and tool (and worker count if asked,
    and front cache setting where the baseline has one): one, or two for a reference measured
    at both ends of the run."""
    return [other for other in rows
            if other.spec.kind == kind and other.file == row.file and other.tool == row.tool
            and other.result is not None and rate(other.result, other.tool) > 0
            and (other.spec.cache is None or other.spec.cache == row.spec.cache)
            and (not same_workers or other.spec.workers == row.spec.workers)]


def baseline_rate(base: list[Row]) -> float:
    """The rate `base` stands for: the geometric mean of its rows' (the drift of the machine
    between a reference's two runs cancels out for a server measured between them)."""
    return math.prod(rate(b.result, b.tool) for b in base) ** (1 / len(base))  # type: ignore[arg-type]


def ratio(row: Row, rows: list[Row], kind: str, same_workers: bool = False) -> float | None:
    """Requests/s (a download: bytes/s) of `row` over its baseline's, or None when either is missing."""
    return ratio_over(row, baseline_rows(row, rows, kind, same_workers))


def ratio_over(row: Row, base: list[Row]) -> float | None:
    """Requests/s (a download: bytes/s) of `row` over that of the baseline rows `base`."""
    if row.result is None or not base:
        return None
    return rate(row.result, row.tool) / baseline_rate(base)


def fmt_ratio(value: float | None) -> str:
    """`1.23×`, or a dash when there is nothing to compare with."""
    return "–" if value is None else f"{value:.2f}×"


def fmt_number(value: float, digits: int = 0) -> str:
    """Thousands separated, for req/s and KB/s."""
    return f"{value:,.{digits}f}"


def fmt_steal(steal: float | None) -> str:
    """`2.5%` of the machine's CPU time stolen during a run, or blank when not known."""
    return "" if steal is None else f"{steal:.1%}"


def fmt_cpu(us: float | None) -> str:
    """CPU µs a request, or blank when not measured."""
    return "" if us is None else fmt_number(us)


def table(rows: list[Row]) -> str:
    """A Markdown table of every row, with a ratio column for each baseline that was measured, the
    CPU time a request cost the server and the load tool where it was read, a `steal` column where
    the CPU steal was, and a `per proxy` column when some row's proxy processes were counted."""
    kinds = {r.spec.kind for r in rows if r.result is not None}
    baselines = [b for b in BASELINES if b[1] in kinds]
    counted = any(r.result is not None and fmt_shares(r.result.proxies) for r in rows)
    downloads = any(r.result is not None and r.tool == DOWNLOAD_TOOL for r in rows)
    steals = any(r.result is not None and r.result.steal is not None for r in rows)
    cpus = any(r.result is not None and r.result.server_cpu_us is not None for r in rows)
    head = ["server", "workers", "cache", "file", "tool", "req/s", *(["MB/s"] if downloads else []), "mean ms",
            "KB/s", "failed", "non-2xx", "p50 ms", "p99 ms", *(title for title, _, _ in baselines),
            *(["server CPU µs", "client CPU µs"] if cpus else []), *(["steal"] if steals else []),
            *(["per proxy"] if counted else [])]
    lines = [head]
    for row in rows:
        cells = [row.spec.name, row.spec.workers_label, row.spec.cache_label, row.file, row.tool]
        m = row.result
        if m is None:
            cells += [f"error: {(row.error or '').splitlines()[0][:60]}"] + [""] * (len(head) - len(cells) - 1)
        else:
            mbs = [fmt_number(m.transfer_kbs / 1024) if row.tool == DOWNLOAD_TOOL else ""] if downloads else []
            cells += [fmt_number(m.rps, 1 if row.tool == DOWNLOAD_TOOL else 0), *mbs, f"{m.mean_ms:.2f}",
                      fmt_number(m.transfer_kbs), str(m.failed), str(m.non2xx), f"{m.p50_ms:g}", f"{m.p99_ms:g}"]
            cells += [fmt_ratio(ratio(row, rows, kind, same)) for _, kind, same in baselines]
            cells += [fmt_cpu(m.server_cpu_us), fmt_cpu(m.client_cpu_us)] if cpus else []
            cells += [fmt_steal(m.steal)] if steals else []
            cells += [fmt_shares(m.proxies)] if counted else []
        lines.append(cells)
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    right = set(range(5, len(head)))

    def render(cells: list[str]) -> str:
        return "| " + " | ".join(c.rjust(w) if i in right else c.ljust(w)
                                 for i, (c, w) in enumerate(zip(cells, widths))) + " |"

    rule = "|" + "|".join(("-" * (w + 1)) + (":" if i in right else "-") for i, w in enumerate(widths)) + "|"
    return "\n".join([render(lines[0]), rule, *(render(cells) for cells in lines[1:])])


def check_targets(suite: str, rows: list[Row]) -> list[dict]:
    """Each target of the suite, checked on every row it covers (see `check`)."""
    return [check(target, row, rows) for target in TARGETS.get(suite, []) for row in rows
            if row.spec.kind == target.kind and row.spec.cache == target.cache
            and row.file in target.files and row.tool in target.tools]


def check(target: Target, row: Row, rows: list[Row]) -> dict:
    """One target on one row: the figure reached (a ratio, or a p99 and its bound), whether it is met
    (None when the row or its baseline was not measured: neither met nor missed), and each proxy's
    share of the row's requests where they were counted."""
    m = row.result
    failed = m.failed + m.non2xx if m else None
    out: dict = {"target": target.text, "server": row.spec.label, "file": row.file, "tool": row.tool,
                 "baseline": target.baseline, "failed": failed}
    same_workers = next((same for _, kind, same in BASELINES if kind == target.baseline), True)
    # Another server's rows (not the same server's other file, nor paired twins).
    others = (baseline_rows(row, rows, target.baseline, same_workers)
              if target.baseline_file is None and not target.paired else [])
    if target.p99_slack_ms is not None:
        limit = (statistics.mean(b.result.p99_ms for b in others)  # type: ignore[union-attr]
                 + target.p99_slack_ms if others else None)
        value = m.p99_ms if m and limit is not None else None
        out |= {"p99_ms": value, "baseline_p99_ms": None if limit is None else limit - target.p99_slack_ms,
                "slack_ms": target.p99_slack_ms, "limit_ms": limit}
        good = value is not None and limit is not None and value <= limit
        margin = None if value is None else limit - value  # type: ignore[operator]
    elif target.baseline_file is not None:
        base = same_server_row(row, rows, target.baseline_file)
        value = m.rps / base.result.rps if m and base else None  # type: ignore[union-attr]
        out |= {"ratio": value, "minimum": target.minimum}
        good = value is not None and value >= target.minimum
        margin = None if value is None else value / target.minimum - 1
    elif target.paired:
        # Median of the rounds' ratios: a slow phase of the machine hits both runs of a round.
        value = statistics.median(row.paired_ratios) if m and row.paired_ratios else None
        control = statistics.median(row.control_ratios) if row.control_ratios else None
        out |= {"ratio": value, "minimum": target.minimum, "noise_floor": control}
        good = value is not None and value >= target.minimum
        margin = None if value is None else value / target.minimum - 1
    else:
        value = ratio_over(row, others)
        out |= {"ratio": value, "minimum": target.minimum}
        good = value is not None and value >= target.minimum
        margin = None if value is None else value / target.minimum - 1
        if row.tool == DOWNLOAD_TOOL and value is not None and m:
            out |= {"mb_s": m.transfer_kbs / 1024, "baseline_mb_s": baseline_rate(others) / 1024}
    if m is not None and m.server_cpu_us is not None:
        out |= cpu_figures(m, others)
    if m is not None and m.steal is not None:
        out["steal"] = m.steal
        steals = [b.result.steal for b in others if b.result is not None and b.result.steal is not None]
        if steals:
            out["baseline_steal"] = max(steals)
    out["met"] = None if value is None else (good and (not target.zero_failed or failed == 0))
    # How far from the bound: the ratio over the minimum less 1 (+0.12: 12% above), or for p99 the
    # milliseconds under the limit (negative: over it).
    out["margin"] = margin
    if m is not None and fmt_shares(m.proxies):
        out |= {"per_proxy": fmt_shares(m.proxies), "evenness": evenness(m.proxies)}
    return out


def cpu_figures(m: Measurement, others: list[Row]) -> dict:
    """The CPU time a request of `m` cost the server and the load tool, and the same for the
    baseline's rows (their mean), where measured: how efficient each server is whatever share of
    the machine it got."""
    out: dict = {"server_cpu_us": m.server_cpu_us, "client_cpu_us": m.client_cpu_us}
    for key in ("server_cpu_us", "client_cpu_us"):
        base = [v for v in (getattr(b.result, key, None) for b in others) if v is not None]
        if base:
            out["baseline_" + key] = statistics.mean(base)
    return out


def verdict(c: dict) -> str:
    """`met (12% above the target)`, `MISSED (14% below the target)`, `MISSED: 3 failed/non-2xx
    (4% above the target)`, `MISSED (0.10 ms over the bound)` or `not measured`."""
    if c["met"] is None:
        return "not measured"
    margin = c.get("margin")
    if margin is None:
        return "met" if c["met"] else "MISSED"
    if "limit_ms" in c:
        how = f"{abs(margin):.2f} ms {'under' if margin >= 0 else 'over'} the bound"
    else:
        how = f"{abs(margin):.1%} {'above' if margin >= 0 else 'below'} the target"
    if c["met"]:
        return f"met ({how})"
    return f"MISSED: {c['failed']} failed/non-2xx ({how})" if margin >= 0 else f"MISSED ({how})"


def check_line(c: dict) -> str:
    """A check as one line: the figure reached, the bound, failures, the per-proxy spread and the verdict."""
    status = verdict(c)
    extra = "" if c["failed"] in (0, None) else f", {c['failed']} failed/non-2xx"
    if "limit_ms" in c:
        got = (f"no {c['baseline']} figure" if c["p99_ms"] is None
               else f"p99 {c['p99_ms']:g} ms, {c['baseline']} {c['baseline_p99_ms']:g} ms")
        bound = f"target ≤ {c['baseline']}'s + {c['slack_ms']:g} ms"
    else:
        got = f"no {c['baseline']} figure" if c["ratio"] is None else f"{c['ratio']:.2f}× {c['baseline']}"
        if c.get("mb_s") is not None:
            got += f", {c['mb_s']:,.0f} MB/s against {c['baseline_mb_s']:,.0f}"
        bound = f"target ≥ {c['minimum']}×"
    if c.get("noise_floor") is not None:
        extra += f"; identical twins: {c['noise_floor']:.2f}×"
    if c.get("per_proxy"):
        extra += f"; per proxy {c['per_proxy']}"
    if c.get("server_cpu_us") is not None:
        extra += "; CPU a request: " + ", ".join(
            f"{who} {c[key]:,.0f} µs" + ("" if c.get("baseline_" + key) is None
                                        else f" ({c['baseline']} {c['baseline_' + key]:,.0f})")
            for who, key in (("server", "server_cpu_us"), ("client", "client_cpu_us")) if c.get(key) is not None)
    if max(c.get("steal") or 0.0, c.get("baseline_steal") or 0.0) >= STEAL_NOTED:
        extra += f"; CPU steal {c['steal']:.1%}"
        if c.get("baseline_steal") is not None:
            extra += f", {c['baseline']} {c['baseline_steal']:.1%}"
    return f"{c['server']}, {c['tool']} {c['file']}: {got} ({bound}{extra}) — {status}"


def targets_text(checks: list[dict]) -> str:
    """The checks under their target, one line each (check_line)."""
    lines: list[str] = []
    heading = None
    for c in checks:
        if c["target"] != heading:
            heading = c["target"]
            lines.append(f"- {heading}:")
        lines.append(f"  - {check_line(c)}")
    return "\n".join(lines)


def markdown(title: str, notes: list[str], rows: list[Row], checks: list[dict], chart: Path | None) -> str:
    """The whole report as a Markdown document."""
    parts = [f"# {title}", "", *(f"- {n}" for n in notes), "", table(rows), ""]
    repeats = [r for r in rows if len(r.runs_rps) > 1]
    if repeats:
        parts += ["## Every ab run (req/s; the table shows the median)", ""]
        parts += [f"- {r.spec.label}, {r.file}: " + " / ".join(fmt_number(v) for v in r.runs_rps) for r in repeats]
        parts += [""]
    counted = [r for r in rows if r.result is not None and fmt_shares(r.result.proxies)]
    if counted:
        parts += ["## Requests per proxy process (in the run the table shows; least: the least-loaded "
                  "proxy's requests over an even share)", ""]
        parts += [f"- {r.spec.label}, {r.tool} {r.file}: {fmt_counts(r.result.proxies)}"  # type: ignore[union-attr]
                  for r in counted]
        parts += [""]
    paired = [r for r in rows if r.paired_ratios]
    if paired:
        parts += ["## Paired rounds (req/s over the twin's, each round; the target takes the median)", ""]
        for r in paired:
            parts.append(f"- {r.spec.label}, {r.tool} {r.file}: " + " / ".join(f"{v:.3f}" for v in r.paired_ratios))
            if r.control_ratios:
                parts.append("  - identical second twin: " + " / ".join(f"{v:.3f}" for v in r.control_ratios))
        parts += [""]
    if checks:
        parts += ["## Targets", "", targets_text(checks), ""]
    if chart is not None:
        parts += [f"![response time by percentile of requests]({chart.name})", ""]
    return "\n".join(parts)


def row_record(row: Row) -> dict:
    """A row as plain JSON data."""
    return {"server": row.spec.name, "kind": row.spec.kind, "workers": row.spec.workers,
            "cache": row.spec.cache, "again": row.spec.again, "file": row.file, "tool": row.tool,
            "result": asdict(row.result) if row.result else None, "runs_rps": row.runs_rps, "error": row.error,
            "paired": asdict(row.paired) if row.paired else None, "paired_ratios": row.paired_ratios,
            "control_ratios": row.control_ratios}


def write_json(path: Path, meta: dict, rows: list[Row], checks: list[dict]) -> None:
    """The machine-readable record of a run: `meta`, every row and every target check."""
    path.write_text(json.dumps({**meta, "rows": [row_record(r) for r in rows], "targets": checks}, indent=2) + "\n")


# Chart styles: gows and the whitenoise run with the same worker count share a colour; the line
# style tells them apart (gows cache on solid, off dashed; whitenoise dotted).
_KIND_COLOURS = {"apache": "black", "nginx": "tab:green", "fileapp": "tab:blue", "fileapp-worker": "tab:cyan",
                 "whitenoise": "tab:orange", "whitenoise-worker": "gold",
                 "werkzeug": "tab:red"}
_WORKER_COLOURS = ["tab:blue", "tab:purple", "tab:red", "tab:brown", "tab:cyan"]


def line_style(spec: ServerSpec, gows_workers: list[int]) -> dict:
    """Matplotlib keywords for one server's line; `gows_workers` are the gows worker counts charted."""
    if spec.kind in ("gows", "gows-metrics", "whitenoise") and spec.workers in gows_workers:
        colour = _WORKER_COLOURS[gows_workers.index(spec.workers) % len(_WORKER_COLOURS)]
    else:
        colour = _KIND_COLOURS.get(spec.kind, "tab:gray")
    style = {"whitenoise": ":", "werkzeug": "-.", "gows-metrics": (0, (5, 1, 1, 1))}.get(
        spec.kind, "--" if spec.cache is False or spec.again else "-")
    return {"color": colour, "linestyle": style, "linewidth": 2.0 if spec.kind in ("apache", "nginx") else 1.5}


def percentile_points(times: list[float]) -> tuple[list[float], list[float]]:
    """Each request's response time (sorted) against its percentile rank, 100·i/n for the i-th of n:
    runs of any length share the 0–100 axis, and the last request sits at 100%."""
    ordered = sorted(times)
    n = len(ordered)
    return [100.0 * i / n for i in range(1, n + 1)], ordered


def nearest_rank(times: list[float], q: float) -> float | None:
    """The q-quantile (0 < q <= 1) by nearest rank: the smallest time with at least q of the requests
    at or below it (as ab's "percentage served within" table); None for no requests."""
    if not times:
        return None
    ordered = sorted(times)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


MARKS = ((0.5, "p50", "o"), (0.99, "p99", "D"))  # the percentiles marked on every line


def chart(path: Path, series: dict[ServerSpec, list[float]], title: str) -> None:
    """Response time (ms, log scale) against the percentile of requests, one line per server, with
    each line's p50 and p99 marked: runs of 5,000 and 20,000 requests share the axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, FuncFormatter

    gows_workers = sorted({s.workers for s in series if s.kind == "gows" and s.workers is not None})
    fig, ax = plt.subplots(figsize=(12, 6), dpi=110)
    for spec, times in series.items():
        style = line_style(spec, gows_workers)
        xs, ys = percentile_points(times)
        ax.plot(xs, ys, label=f"{spec.label} ({len(times):,} requests)", **style)
        for q, _, marker in MARKS:
            value = nearest_rank(times, q)
            if value is not None:
                ax.plot([q * 100], [value], marker=marker, color=style["color"], markersize=5, linestyle="none")
    for q, name, _ in MARKS:
        ax.axvline(q * 100, color="gray", linewidth=0.8, linestyle=":")
        inside = q < 0.9  # a label near the right edge goes left of its line
        ax.annotate(name, (q * 100, 1.0), xycoords=("data", "axes fraction"), xytext=(3 if inside else -3, -12),
                    textcoords="offset points", ha="left" if inside else "right", color="gray", fontsize="small")
    # ab records whole milliseconds, so fast servers have requests at 0 ms: linear below 1 ms.
    ax.set_yscale("symlog", linthresh=1.0, linscale=0.3)
    ax.set_ylim(bottom=0)
    ax.yaxis.set_major_locator(FixedLocator([0, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000]))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    ax.set_xlim(0, 100)
    ax.xaxis.set_major_locator(FixedLocator(range(0, 101, 10)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}%"))
    ax.set_xlabel("percentile of requests (each run's requests ordered by response time; "
                  "markers: ○ p50, ◇ p99)")
    ax.set_ylabel("response time (ms, log scale)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the plot, over no line
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
