"""Turn measurements into the table (stdout and Markdown), the JSON record, the target checks and the chart."""
from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .loads import Measurement
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


TARGETS = {
    "compare": [
        Target("front cache on, ab 1 KiB, 0 failed", "gows", True, "apache", 1.0, tools=("ab",), zero_failed=True),
        Target("front cache on, wrk keep-alive", "gows", True, "nginx", 0.5, tools=("wrk",)),
        Target("front cache off vs whitenoise, same workers", "gows", False, "whitenoise", 0.8,
               files=("1 KiB", "150 KB")),
        Target("counters and histograms cost at most 5%", "gows-metrics", True, "gows", 0.95, paired=True),
    ],
    "fileapp": [
        Target("fileapp on cache hits", "fileapp", None, "whitenoise", 1.2, files=("1 KiB", "150 KB")),
        Target("fileapp on cache hits, under gows' worker", "fileapp-worker", None, "whitenoise", 1.2,
               files=("1 KiB", "150 KB")),
    ],
}


def baseline_row(row: Row, rows: list[Row], kind: str, same_workers: bool) -> Row | None:
    """The measured row of server `kind` on the same file and tool (and worker count if asked,
    and front cache setting where the baseline has one)."""
    for other in rows:
        if (other.spec.kind == kind and other.file == row.file and other.tool == row.tool
                and other.result is not None and other.result.rps > 0
                and (other.spec.cache is None or other.spec.cache == row.spec.cache)
                and (not same_workers or other.spec.workers == row.spec.workers)):
            return other
    return None


def ratio(row: Row, rows: list[Row], kind: str, same_workers: bool = False) -> float | None:
    """Requests/s of `row` over its baseline's, or None when either is missing."""
    base = baseline_row(row, rows, kind, same_workers)
    if row.result is None or base is None:
        return None
    return row.result.rps / base.result.rps  # type: ignore[union-attr]


def fmt_ratio(value: float | None) -> str:
    """`1.23×`, or a dash when there is nothing to compare with."""
    return "–" if value is None else f"{value:.2f}×"


def fmt_number(value: float, digits: int = 0) -> str:
    """Thousands separated, for req/s and KB/s."""
    return f"{value:,.{digits}f}"


def table(rows: list[Row]) -> str:
    """A Markdown table of every row, with a ratio column for each baseline that was measured."""
    kinds = {r.spec.kind for r in rows if r.result is not None}
    baselines = [b for b in BASELINES if b[1] in kinds]
    head = ["server", "workers", "cache", "file", "tool", "req/s", "mean ms", "KB/s", "failed", "non-2xx",
            "p50 ms", "p99 ms", *(title for title, _, _ in baselines)]
    lines = [head]
    for row in rows:
        cells = [row.spec.name, row.spec.workers_label, row.spec.cache_label, row.file, row.tool]
        m = row.result
        if m is None:
            cells += [f"error: {(row.error or '').splitlines()[0][:60]}"] + [""] * (len(head) - len(cells) - 1)
        else:
            cells += [fmt_number(m.rps), f"{m.mean_ms:.2f}", fmt_number(m.transfer_kbs), str(m.failed),
                      str(m.non2xx), f"{m.p50_ms:g}", f"{m.p99_ms:g}"]
            cells += [fmt_ratio(ratio(row, rows, kind, same)) for _, kind, same in baselines]
        lines.append(cells)
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    right = set(range(5, len(head)))

    def render(cells: list[str]) -> str:
        return "| " + " | ".join(c.rjust(w) if i in right else c.ljust(w)
                                 for i, (c, w) in enumerate(zip(cells, widths))) + " |"

    rule = "|" + "|".join(("-" * (w + 1)) + (":" if i in right else "-") for i, w in enumerate(widths)) + "|"
    return "\n".join([render(lines[0]), rule, *(render(cells) for cells in lines[1:])])


def check_targets(suite: str, rows: list[Row]) -> list[dict]:
    """Each target of the suite, checked on every row it covers: ratio, threshold and whether it is met."""
    checks = []
    for target in TARGETS.get(suite, []):
        same_workers = next((same for _, kind, same in BASELINES if kind == target.baseline), True)
        for row in rows:
            if (row.spec.kind != target.kind or row.spec.cache != target.cache
                    or row.file not in target.files or row.tool not in target.tools):
                continue
            if target.paired:
                # Median of the rounds' ratios: a slow phase of the machine hits both runs of a round.
                value = statistics.median(row.paired_ratios) if row.result and row.paired_ratios else None
                control = statistics.median(row.control_ratios) if row.control_ratios else None
            else:
                value = ratio(row, rows, target.baseline, same_workers)
            failed = row.result.failed + row.result.non2xx if row.result else None
            # None when the row or its baseline was not measured: neither met nor missed.
            met = None if value is None else (value >= target.minimum and (not target.zero_failed or failed == 0))
            checks.append({"target": target.text, "server": row.spec.label, "file": row.file, "tool": row.tool,
                           "baseline": target.baseline, "ratio": value, "minimum": target.minimum,
                           "failed": failed, "met": met, **({"noise_floor": control} if target.paired else {})})
    return checks


def targets_text(checks: list[dict]) -> str:
    """One line per checked target: the ratio reached, the threshold, met / MISSED / not measured."""
    lines = []
    for c in checks:
        status = {True: "met", False: "MISSED", None: "not measured"}[c["met"]]
        got = f"no {c['baseline']} figure" if c["ratio"] is None else f"{c['ratio']:.2f}× {c['baseline']}"
        extra = "" if c["failed"] in (0, None) else f", {c['failed']} failed/non-2xx"
        if c.get("noise_floor") is not None:
            extra += f"; identical twins: {c['noise_floor']:.2f}×"
        lines.append(f"- {c['server']}, {c['tool']} {c['file']}: {got} (target ≥ {c['minimum']}×{extra}) — {status}")
    return "\n".join(lines)


def markdown(title: str, notes: list[str], rows: list[Row], checks: list[dict], chart: Path | None) -> str:
    """The whole report as a Markdown document."""
    parts = [f"# {title}", "", *(f"- {n}" for n in notes), "", table(rows), ""]
    repeats = [r for r in rows if len(r.runs_rps) > 1]
    if repeats:
        parts += ["## Every ab run (req/s; the table shows the median)", ""]
        parts += [f"- {r.spec.label}, {r.file}: " + " / ".join(fmt_number(v) for v in r.runs_rps) for r in repeats]
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
        parts += [f"![response time of each request]({chart.name})", ""]
    return "\n".join(parts)


def row_record(row: Row) -> dict:
    """A row as plain JSON data."""
    return {"server": row.spec.name, "kind": row.spec.kind, "workers": row.spec.workers,
            "cache": row.spec.cache, "file": row.file, "tool": row.tool,
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
    style = {"whitenoise": ":", "werkzeug": "-.", "gows-metrics": (0, (5, 1, 1, 1))}.get(spec.kind, "--" if spec.cache is False else "-")
    return {"color": colour, "linestyle": style, "linewidth": 2.0 if spec.kind in ("apache", "nginx") else 1.5}


def chart(path: Path, series: dict[ServerSpec, list[float]], title: str) -> None:
    """Response time of each request (ms, log scale) by request number, one line per server (2018 style)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, FuncFormatter

    gows_workers = sorted({s.workers for s in series if s.kind == "gows" and s.workers is not None})
    fig, ax = plt.subplots(figsize=(12, 6), dpi=110)
    for spec, times in series.items():
        ax.plot(range(1, len(times) + 1), times, label=spec.label, **line_style(spec, gows_workers))
    # ab records whole milliseconds, so fast servers have requests at 0 ms: linear below 1 ms.
    ax.set_yscale("symlog", linthresh=1.0, linscale=0.3)
    ax.set_ylim(bottom=0)
    ax.yaxis.set_major_locator(FixedLocator([0, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000]))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    ax.set_xlabel("request number (ordered by response time, as ab -g writes them)")
    ax.set_ylabel("response time (ms, log scale)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the plot, over no line
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
