"""The soak's verdict: which errors a worker or proxy kill explains, and whether memory or
descriptors grew.

A SIGKILLed worker takes the responses it was sending with it: the proxy can only close those
client connections (the master counts them as `truncated_responses`), and wrk sees a read error.
A SIGKILLed proxy takes its client connections with it: each of wrk's on it fails once (a read
or a write error) and reconnects to the shared listening socket. That, and only that, is
excused. A truncation is charged to a worker kill only when it happened within KILL_WINDOW
seconds after one; a wrk error to a proxy kill only in the wrk run during which it happened
(which ends about KILL_WINDOW seconds after it), and no more of them than the client
connections that proxy held; every other error fails the run.
"""
from __future__ import annotations

import statistics
from collections import Counter
from dataclasses import dataclass, field
from typing import Mapping, Protocol, Sequence

KILL_WINDOW = 2.0  # seconds after a SIGKILL in which clients may still see its errors
GROWTH_LIMIT = 0.10
PROXY_RSS = "proxy RSS (the longest-running proxy)"
# How a soak client's connection can end when the proxy holding it is killed (benchmarks/chaos.py).
PROXY_CUTS = ("truncated", "closed before the head", "reset before the head")


@dataclass(frozen=True)
class Usage:
    """One process's resident memory and open descriptors, of which `pooled` are established
    connections to or from a worker's port: a proxy's or a worker's keep-alive pool, a health
    check of the master (benchmarks/procstat.py says why they are apart);
    `started` orders processes by age (clock ticks after boot, 0: unknown)."""

    pid: int
    rss_kib: int
    fds: int
    pooled: int = 0
    started: int = 0

    @property
    def own_fds(self) -> int:
        """The descriptors besides the connections to or from a worker."""
        return self.fds - self.pooled


def longest_running(processes: Sequence[Usage]) -> Usage | None:
    """The process of `processes` that started first (the lowest pid among equals); None for none."""
    return min(processes, key=lambda p: (p.started, p.pid), default=None)


@dataclass
class Sample:
    """What the soak read at `t` seconds: the master, and every local worker and proxy process
    that could be read."""

    t: float
    master: Usage | None  # None: the master could not be read (gone)
    workers: list[Usage] = field(default_factory=list)
    proxies: list[Usage] = field(default_factory=list)

    def metrics(self) -> dict[str, int | None]:
        """The values the growth check compares. Worker pids change with every kill, so workers are
        compared by the largest one (a fresh worker is smaller; a leak shows in the survivors).
        Proxies' memory is followed in the longest-running one, which the soak never kills: the
        others are younger each minute, and a leak restarts with them. Their descriptors are summed:
        wrk's connections spread unevenly over the proxies, and their sum does not depend on it."""
        oldest = longest_running(self.proxies)
        return {
            "master RSS": self.master.rss_kib if self.master else None,
            "master fds (besides worker connections)": self.master.own_fds if self.master else None,
            "worker RSS (max over workers)": max((w.rss_kib for w in self.workers), default=None),
            "worker fds (besides proxy connections, max over workers)":
                max((w.own_fds for w in self.workers), default=None),
            PROXY_RSS: oldest.rss_kib if oldest else None,
            "proxy fds (besides worker connections, sum over proxies)":
                sum(p.own_fds for p in self.proxies) if self.proxies else None,
        }


@dataclass
class WrkTotals:
    """wrk's counts summed over every run of the soak."""

    requests: int = 0
    connect: int = 0
    read: int = 0
    write: int = 0
    timeout: int = 0
    statuses: Counter = field(default_factory=Counter)


@dataclass
class ProxyKill:
    """A SIGKILL of a proxy process: when, which one, how many client connections it held just
    before (each can fail one client request), and how many seconds passed until every proxy was
    ready again (None: not within the time the soak allows)."""

    at: float
    index: int
    pid: int
    connections: int
    back_after: float | None = None


class RunErrors(Protocol):
    """A wrk run's span on the soak's clock and its socket errors by kind (soak_record.WrkRun)."""

    started: float
    ended: float
    errors: dict[str, int]


@dataclass(frozen=True)
class ClientOutcome:
    """How one of the soak's own clients (a slow reader, an aborted upload) ended.

    `result` is "ok" (it ended as planned), "refused" (an upload the server turned away early,
    as a body budget may: no error), "truncated" (the response stopped before the client was
    done with it), or the name of any other error (connect, reset before the head, ...)."""

    kind: str
    started: float
    ended: float
    result: str
    status: int | None = None


def after_kill(start: float, end: float, kills: Sequence[float], window: float = KILL_WINDOW) -> bool:
    """Whether something that happened between `start` and `end` can be a kill's doing: some kill
    at or before `end` whose window reaches `start`."""
    return any(kill <= end and start <= kill + window for kill in kills)


def master_truncations(polls: list[tuple[float, int]], kills: list[float]) -> tuple[int, int]:
    """The master's `truncated_responses` counter, polled as (time, value) in time order, split into
    the increments that fall in a kill's window and the others. A drop of the counter (a new
    master) counts nothing."""
    near = far = 0
    for (before, old), (now, new) in zip(polls, polls[1:]):
        grew = max(0, new - old)
        if after_kill(before, now, kills):
            near += grew
        else:
            far += grew
    return near, far


def bad_statuses(counts: Counter) -> Counter:
    """Statuses outside 2xx/3xx, with their counts."""
    return Counter({status: n for status, n in counts.items() if not 200 <= status < 400 and n})


def _counts(counter: Counter) -> str:
    return ", ".join(f"{key} ×{n}" for key, n in sorted(counter.items(), key=lambda item: str(item[0])))


def charge_cuts(clients: list[ClientOutcome], kills: list[float], proxy_kills: Sequence[ProxyKill]
                ) -> tuple[list[ClientOutcome], list[ClientOutcome]]:
    """The soak's clients cut within KILL_WINDOW after a worker kill, and after a proxy kill. One
    cut near both is the worker kill's (the master counted it among its truncations)."""
    by_worker = [c for c in clients if c.result == "truncated" and after_kill(c.ended, c.ended, kills)]
    proxy_times = [k.at for k in proxy_kills]
    by_proxy = [c for c in clients if c.result in PROXY_CUTS and c not in by_worker
                and after_kill(c.ended, c.ended, proxy_times)]
    return by_worker, by_proxy


def proxy_kill_errors(runs: Sequence[RunErrors], proxy_kills: Sequence[ProxyKill],
                      clients_cut: Sequence[ClientOutcome] = ()) -> tuple[int, int]:
    """wrk's (read, write) errors that proxy kills explain: in each run during which proxies were
    killed, at most as many as the client connections they held, less those of the soak's own
    clients that the kills cut (`clients_cut`). Write errors first: nothing else explains them."""
    read = write = 0
    for run in runs:
        kills = [k for k in proxy_kills if run.started <= k.at <= run.ended]
        if not kills:
            continue
        ours = sum(1 for c in clients_cut if after_kill(c.ended, c.ended, [k.at for k in kills]))
        budget = max(0, sum(k.connections for k in kills) - ours)
        written = min(run.errors.get("write", 0), budget)
        read += min(run.errors.get("read", 0), budget - written)
        write += written
    return read, write


def error_reasons(wrk: WrkTotals, clients: list[ClientOutcome], polls: list[tuple[float, int]],
                  kills: list[float], runs: Sequence[RunErrors] = (),
                  proxy_kills: Sequence[ProxyKill] = ()) -> list[str]:
    """One line per kind of error no worker or proxy kill explains (empty when every error is
    excused). `runs` are wrk's runs, whose totals `wrk` holds."""
    reasons = []
    statuses = bad_statuses(wrk.statuses + Counter(c.status for c in clients if c.status is not None))
    if statuses:
        reasons.append(f"{sum(statuses.values())} responses outside 2xx/3xx: {_counts(statuses)}")
    by_worker, by_proxy = charge_cuts(clients, kills, proxy_kills)
    proxy_read, proxy_write = proxy_kill_errors(runs, proxy_kills, by_proxy)
    others = {"connect": wrk.connect, "write": wrk.write - proxy_write, "timeout": wrk.timeout}
    if any(others.values()):
        reasons.append("wrk socket errors no kill explains: " + ", ".join(f"{k} {n}" for k, n in others.items() if n))
    near, far = master_truncations(polls, kills)
    cut = [c for c in clients if c.result == "truncated" and c not in by_worker and c not in by_proxy]
    if cut:
        reasons.append(f"{len(cut)} slow readers cut off with no worker or proxy kill in the {KILL_WINDOW:g} s before")
    # Truncations the master made near kills and that our own clients did not see went to wrk.
    read_budget = max(0, near - len(by_worker))
    if wrk.read - proxy_read > read_budget:
        reasons.append(f"{wrk.read - proxy_read - read_budget} wrk read errors beyond the {read_budget} responses the "
                       f"master truncated within {KILL_WINDOW:g} s of a worker kill"
                       + (f" (and {proxy_read} the proxy kills explain)" if proxy_read else ""))
    if far:
        reasons.append(f"the master truncated {far} responses with no worker kill in the {KILL_WINDOW:g} s before")
    failed = Counter(f"{c.kind}: {c.result}" for c in clients
                     if c.result not in ("ok", "refused", "truncated") and c not in by_proxy)
    if failed:
        reasons.append(f"{sum(failed.values())} soak clients failed: {_counts(failed)}")
    return reasons


def growth_reasons(samples: list[Sample], baseline: tuple[float, float], final: tuple[float, float],
                   limit: float = GROWTH_LIMIT, allowances: Mapping[str, int] | None = None) -> list[str]:
    """One line per metric whose median over the `final` samples (a time range) exceeds its median
    over the `baseline` samples by more than `limit`, and by more than that metric's allowance
    (what a bounded store may legitimately add whatever phase it was in at the baseline: a
    proxy's front cache fills again after a HUP's purge)."""
    first = [s for s in samples if baseline[0] <= s.t <= baseline[1]]
    last = [s for s in samples if final[0] <= s.t <= final[1]]
    if not first or not last:
        missing = "after the first minute" if not first else "at the end"
        return [f"no sample {missing} to measure growth with (the soak ended early)"]
    reasons = []
    for name in first[0].metrics():
        old, new = _median(first, name), _median(last, name)
        allowed = (allowances or {}).get(name, 0)
        if old is None or new is None:
            reasons.append(f"{name}: nothing to read {'after the first minute' if old is None else 'at the end'}")
        elif new > old * (1 + limit) + allowed:
            unit = " KiB" if "RSS" in name else ""
            bound = f"limit {limit:.0%}" + (f" + {allowed:,}{unit}" if allowed else "")
            reasons.append(f"{name} grew {new / old - 1:.0%}: {old:,}{unit} at {span(baseline)}, "
                           f"{new:,}{unit} at {span(final)} ({bound})")
    return reasons


def _median(samples: list[Sample], name: str) -> int | None:
    values = [v for v in (s.metrics()[name] for s in samples) if v is not None]
    return statistics.median_low(values) if values else None


def span(window: tuple[float, float]) -> str:
    """A window of samples as the verdict and the notes name it: `60 s`, `60–110 s (median)`."""
    first, last = window
    return f"{first:g} s" if first == last else f"{first:g}–{last:g} s (median)"
