"""What a soak observed, its verdict, and how it is written down: tables, summary, .md and .json."""
from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from . import schedule, verdict
from .verdict import ClientOutcome, ProxyKill, Sample, WrkTotals, longest_running


@dataclass
class WrkRun:
    """One wrk run of the soak: when, and what it counted."""

    started: float
    ended: float
    requests: int
    rps: float
    errors: dict[str, int]
    statuses: dict[int, int]


@dataclass
class Record:
    """Everything a soak observed; the JSON record is this, the verdict is computed from it."""

    seconds: int
    samples: list[Sample] = field(default_factory=list)
    master_counters: list[dict[str, Any]] = field(default_factory=list)  # at each sample
    wrk_runs: list[WrkRun] = field(default_factory=list)
    clients: list[ClientOutcome] = field(default_factory=list)
    kills: list[float] = field(default_factory=list)
    killed_pids: list[int] = field(default_factory=list)
    skipped_kills: list[float] = field(default_factory=list)  # fewer than two workers were up
    proxy_kills: list[ProxyKill] = field(default_factory=list)
    skipped_proxy_kills: list[float] = field(default_factory=list)  # not every proxy ready, or only one
    proxy_restarts: int | None = None  # the master's count over the run ("restarts" of /status.json's proxies)
    signals: list[tuple[float, str]] = field(default_factory=list)
    polls: list[tuple[float, int]] = field(default_factory=list)  # (t, truncated_responses)
    admin_silence: float = 0.0  # longest time without an answer from /status.json
    problems: list[str] = field(default_factory=list)  # reasons found outside the verdict module
    # A proxy's share of the front cache: its RSS may grow by that much whatever the cache held at
    # the baseline (a HUP purges it, the load fills it again).
    proxy_cache_kib: int = 0

    def wrk_totals(self) -> WrkTotals:
        """wrk's counts summed over its runs."""
        totals = WrkTotals()
        for run in self.wrk_runs:
            totals.requests += run.requests
            for kind, n in run.errors.items():
                setattr(totals, kind, getattr(totals, kind) + n)
            totals.statuses.update(run.statuses)
        return totals

    def reasons(self) -> list[str]:
        """Every reason the soak failed (empty: it held)."""
        return (list(self.problems)
                + verdict.error_reasons(self.wrk_totals(), self.clients, self.polls, self.kills, self.wrk_runs,
                                        self.proxy_kills)
                + verdict.growth_reasons(self.samples, *schedule.growth_windows(self.seconds),
                                         allowances={verdict.PROXY_RSS: self.proxy_cache_kib}))


def mib(kib: int | None) -> str:
    """KiB as MiB with one decimal, a dash for nothing."""
    return "–" if kib is None else f"{kib / 1024:.1f}"


def sample_row(sample: Sample, counters: dict[str, Any], start: dict[str, Any]) -> list[str]:
    """One row of the samples table; the master's counters since the `start` sample (its boot probes
    got 503s before any worker was up)."""
    rss = [w.rss_kib for w in sample.workers]
    fds = [w.fds for w in sample.workers]
    proxy_rss = [p.rss_kib for p in sample.proxies]
    oldest = longest_running(sample.proxies)
    master = sample.master

    def since(value: Any, before: Any) -> str:
        return "–" if value is None else f"{value - (before or 0):,}"

    return [f"{sample.t:g}", mib(master.rss_kib if master else None), str(master.fds) if master else "–",
            str(master.own_fds) if master else "–",
            str(len(sample.workers)), mib(max(rss, default=None)), mib(sum(rss) if rss else None),
            str(max(fds, default="–")), str(max((w.own_fds for w in sample.workers), default="–")),
            str(sum(fds)) if fds else "–",
            str(len(sample.proxies)), mib(max(proxy_rss, default=None)), mib(sum(proxy_rss) if proxy_rss else None),
            mib(oldest.rss_kib if oldest else None),
            str(sum(p.fds for p in sample.proxies)) if sample.proxies else "–",
            str(sum(p.own_fds for p in sample.proxies)) if sample.proxies else "–",
            since(counters.get("requests"), start.get("requests")),
            since(counters.get("responses", {}).get("5xx"), start.get("responses", {}).get("5xx")),
            since(counters.get("truncated_responses"), start.get("truncated_responses")),
            str(counters.get("client_connections", "–"))]


# "besides pool": without the established connections to or from a worker (benchmarks/procstat.py);
# "proxy RSS oldest": the longest-running proxy, the one the growth check follows.
SAMPLE_HEAD = ["t s", "master RSS MiB", "master fds", "besides pool", "workers", "worker RSS max MiB",
               "worker RSS sum MiB", "worker fds max", "besides pool", "worker fds sum", "proxies",
               "proxy RSS max MiB", "proxy RSS sum MiB", "proxy RSS oldest MiB", "proxy fds sum", "besides pool",
               "responses", "5xx", "truncated", "client conns"]


def sample_line(sample: Sample, counters: dict[str, Any], start: dict[str, Any]) -> str:
    """A sample as one progress line."""
    return "sample " + ", ".join(f"{h} {v}" for h, v in zip(SAMPLE_HEAD, sample_row(sample, counters, start)))


def markdown_table(head: list[str], rows: list[list[str]]) -> str:
    """A Markdown table with right-aligned columns padded to their widest cell."""
    lines = [head, *rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    render = lambda cells: "| " + " | ".join(c.rjust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([render(head), "|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|",
                      *(render(r) for r in rows)])


def samples_table(record: Record) -> str:
    """One row per sample."""
    start = record.master_counters[0] if record.master_counters else {}
    return markdown_table(SAMPLE_HEAD, [sample_row(s, c, start) for s, c in zip(record.samples, record.master_counters)])


def wrk_table(record: Record) -> str:
    """One row per wrk run."""
    head = ["from s", "to s", "requests", "req/s", "non-2xx/3xx", "connect", "read", "write", "timeout"]
    rows = [[f"{r.started:.0f}", f"{r.ended:.0f}", f"{r.requests:,}", f"{r.rps:,.0f}",
             str(sum(verdict.bad_statuses(Counter(r.statuses)).values())),
             *(str(r.errors[k]) for k in ("connect", "read", "write", "timeout"))] for r in record.wrk_runs]
    return markdown_table(head, rows)


# The master's /status.json proxy counters the summary reports, as changes over the run.
MASTER_COUNTERS = ("no_healthy_worker", "retries", "upstream_errors", "timeouts", "truncated_responses",
                   "rejected_connections", "rejected_requests")


def client_counts(clients: list[ClientOutcome]) -> dict[str, Counter]:
    """How the soak's own clients ended: {kind: {result: count}}."""
    by_kind: dict[str, Counter] = {}
    for c in clients:
        by_kind.setdefault(c.kind, Counter())[c.result] += 1
    return by_kind


def rss_at(record: Record, t: float) -> str:
    """RSS in MiB of the master, the proxies together and the longest-running proxy in the sample at
    `t` seconds: `a / b / c`."""
    found = next((s for s in record.samples if s.t == t), None)
    if found is None:
        return "– / – / –"
    oldest = longest_running(found.proxies)
    return (f"{mib(found.master.rss_kib if found.master else None)} / "
            f"{mib(sum(p.rss_kib for p in found.proxies) if found.proxies else None)} / "
            f"{mib(oldest.rss_kib if oldest else None)}")


def proxy_lines(record: Record) -> list[str]:
    """The proxy kills: the connections each took, how soon every proxy was ready again, the
    wrk errors they explain, and the master's count of proxy restarts."""
    kills = record.proxy_kills
    back = sorted(k.back_after for k in kills if k.back_after is not None)
    _, by_proxy = verdict.charge_cuts(record.clients, record.kills, kills)
    read, write = verdict.proxy_kill_errors(record.wrk_runs, kills, by_proxy)
    restarts = "–" if record.proxy_restarts is None else str(record.proxy_restarts)
    return [
        "proxy kills: " + (", ".join(f"proxy {k.index} at {k.at:.1f} s holding {k.connections} client connections"
                                     for k in kills) or "none"),
        "every proxy ready again after a kill: " + (f"within {back[0]:.1f}–{back[-1]:.1f} s" if back else "–")
        + (f", {len(kills) - len(back)} times not in time" if len(back) < len(kills) else ""),
        f"errors explained by the proxy kills: wrk read {read}, wrk write {write}, soak clients {len(by_proxy)}; "
        f"proxy restarts counted by the master over the run: {restarts}",
    ]


def summary(record: Record) -> list[str]:
    """The soak in a few lines: load, chaos, client outcomes, truncations, memory."""
    wrk = record.wrk_totals()
    near, far = verdict.master_truncations(record.polls, record.kills)
    by_kind = client_counts(record.clients)
    signals = Counter(name for _, name in record.signals)
    counters = {}
    if record.master_counters and record.master_counters[-1]:
        first, last = record.master_counters[0], record.master_counters[-1]
        counters = {key: last[key] - first.get(key, 0) for key in MASTER_COUNTERS if key in last}
    lines = [
        f"wrk: {wrk.requests:,} requests, statuses {dict(sorted(wrk.statuses.items()))}, socket errors: connect "
        f"{wrk.connect}, read {wrk.read}, write {wrk.write}, timeout {wrk.timeout}",
        "chaos: " + ", ".join([f"{len(record.kills)} workers SIGKILLed ({len(record.skipped_kills)} kills skipped: "
                               "fewer than two workers up)",
                               f"{len(record.proxy_kills)} proxies SIGKILLed ({len(record.skipped_proxy_kills)} kills "
                               "skipped: not every proxy ready, or fewer than two)",
                               *(f"{n} {name}" for name, n in sorted(signals.items()))]),
        *proxy_lines(record),
        f"truncated by the master: {near} within {verdict.KILL_WINDOW:g} s of a worker kill, {far} otherwise",
        f"longest silence of /status.json: {record.admin_silence:.1f} s",
        "the master's counters over the run: " + ", ".join(f"{key} {n:,}" for key, n in counters.items()),
        "RSS MiB, master / proxies together / longest-running proxy: "
        + ", ".join(f"{rss_at(record, t)} at {t:g} s" for t in sorted({0, min(schedule.BASELINE_AT, record.seconds),
                                                                        record.seconds})),
    ]
    lines += [f"{kind}s: " + ", ".join(f"{result} {n}" for result, n in outcomes.most_common())
              for kind, outcomes in sorted(by_kind.items())]
    return lines


def log_digest(text: str, top: int = 8) -> list[str]:
    """The master log's warnings and errors, by message with numbers, addresses and pids blanked out,
    most frequent first (a worker replaced after failed health checks shows here)."""
    counts: Counter = Counter()
    for line in text.splitlines():
        match = re.search(r"\[(WARNING|ERROR|CRITICAL)\] (.*)", line)
        if match:
            counts[f"{match.group(1)} {re.sub(r'[0-9]+', '#', match.group(2))[:160]}"] += 1
    return [f"{n} × {message}" for message, n in counts.most_common(top)]


def write_record(record: Record, stem: Path, title: str, run_notes: list[str], reasons: list[str],
                 log: str, digest: list[str]) -> None:
    """`stem`.json (everything observed; of the 2,000 clients a 5-minute run sends, those that did not
    end as planned and counts of the rest) and `stem`.md (the tables and the verdict)."""
    data = asdict(record)
    data.update(title=title, notes=run_notes, reasons=reasons, passed=not reasons, master_log_digest=digest,
                clients=[asdict(c) for c in record.clients if c.result != "ok"],
                client_counts=client_counts(record.clients))
    stem.with_suffix(".json").write_text(json.dumps(data, indent=1, default=str))
    verdict_text = "\n".join(f"- {r}" for r in reasons) if reasons else "- everything held"
    stem.with_suffix(".md").write_text(
        f"# {title}\n\n" + "\n".join(f"- {n}" for n in run_notes)
        + f"\n\n## Verdict: {'FAILED' if reasons else 'passed'}\n\n{verdict_text}\n\n## Summary\n\n"
        + "\n".join(f"- {line}" for line in summary(record))
        + "\n\n## Warnings and errors in the master's log\n\n" + ("\n".join(f"- {line}" for line in digest) or "- none")
        + f"\n\n## Samples\n\n{samples_table(record)}\n\n## wrk runs\n\n{wrk_table(record)}\n"
        + (f"\n## End of the master's log\n\n```\n{log}\n```\n" if reasons and log else ""))
