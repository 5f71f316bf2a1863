"""Request latency counters of the front proxy: a histogram that the proxy bumps once per
completed response, and a once-a-second sampler that turns it into rates and percentiles over
sliding windows (the admin page and /metrics read both)."""
from __future__ import annotations

import time
from collections import deque
from typing import Any, NamedTuple, Sequence

# A duration of d ns is counted in slot d.bit_length(), so slot i holds [2**(i-1), 2**i) ns: one
# int operation per response. Bisecting float bounds cost twice as much, and on a keep-alive
# front-cache hit (about 5 µs of master CPU) that alone was 3% of the proxy's requests/s.
SLOTS = 64
SUM = SLOTS  # the extra slot after them: the sum of all durations, ns
# The sum wraps to 0 here instead of overflowing its signed 64-bit slot (a proxy's counters live
# in shared memory: counts of every incarnation of a slot add up there). 2**63 ns is 292 years
# of request time, which a slot with 5000 slow downloads in flight sums in 3 weeks; Prometheus
# reads the wrap of gows_http_request_duration_seconds_sum as a counter reset.
SUM_WRAP = 2 ** 63
_FIRST, _LAST = 13, 36  # the slots shown as buckets: up to 8.192 µs ... up to 68.7 s
# Upper bounds (seconds) of the latency buckets as read (powers of two, like Prometheus' native
# histograms); one more bucket past the last holds the rest.
BOUNDS: tuple[float, ...] = tuple(2 ** i / 1e9 for i in range(_FIRST, _LAST + 1))
WINDOWS = (10, 300)  # seconds: the "last 10 s" and "last 5 min" of the admin page


class RequestStats:
    """Latency histogram of completed responses. The proxy counts into `counts` in line, once per
    response (ClientProtocol.finish: slot `ns.bit_length()`, and the sum in slot SUM);
    everything else is read-side."""

    __slots__ = ("counts",)

    def __init__(self, counts: list[int] | memoryview | None = None) -> None:
        self.counts = counts if counts is not None else [0] * (SLOTS + 1)

    @property
    def buckets(self) -> list[int]:
        """Responses per bucket of BOUNDS, the last one for those beyond its last bound."""
        counts = self.counts
        return [sum(counts[:_FIRST + 1]), *counts[_FIRST + 1:_LAST + 1], sum(counts[_LAST + 1:SLOTS])]

    @property
    def seconds(self) -> float:
        """Sum of all counted durations."""
        return self.counts[SUM] / 1e9

    @property
    def count(self) -> int:
        return sum(self.counts[:SLOTS])


def quantile(q: float, buckets: Sequence[int]) -> float | None:
    """The q-quantile (0..1) of a bucketed distribution, interpolated linearly inside its
    bucket (as Prometheus' histogram_quantile); None without observations."""
    total = sum(buckets)
    if total == 0:
        return None
    rank = q * total
    seen = 0
    for i, n in enumerate(buckets):
        if n and seen + n >= rank:
            lower = BOUNDS[i - 1] if i > 0 else 0.0
            if i == len(BOUNDS):
                return BOUNDS[-1]  # beyond the last bound: all we can say is "at least this"
            return lower + (BOUNDS[i] - lower) * (rank - seen) / n
        seen += n
    return BOUNDS[-1]


class Second(NamedTuple):
    """One interval between two samples (about a second): its end as seconds before now, its
    requests per second, and its p99 latency (None when no response completed in it)."""

    age: float
    rate: float
    p99: float | None


class Window:
    """Once-a-second samples of the counters, enough to answer "over the last N seconds": a
    ring of the last 302 samples (5 minutes and the two ends), the master's only history."""

    def __init__(self, stats: RequestStats, clock=time.monotonic) -> None:
        self.stats = stats
        self.clock = clock
        self.samples: deque[tuple[float, tuple[int, ...]]] = deque(maxlen=max(WINDOWS) + 2)
        self.sample()

    def sample(self) -> None:
        """Take one sample (the admin listener calls this every second)."""
        self.samples.append((self.clock(), tuple(self.stats.buckets)))

    def over(self, seconds: float) -> dict[str, Any]:
        """Requests per second and p50/p99 latency over (about) the last `seconds` seconds,
        measured from now back to the oldest sample within reach."""
        now = self.clock()
        current = self.stats.buckets
        base_t, base = self.samples[-1]
        for t, counts in reversed(self.samples):
            if now - t > seconds:
                break
            base_t, base = t, counts
        diff = [a - b for a, b in zip(current, base)]
        span = now - base_t
        n = sum(diff)
        return {
            "seconds": round(span, 1),
            "requests": n,
            "rate": n / span if span > 0 else 0.0,
            "p50": quantile(0.5, diff),
            "p99": quantile(0.99, diff),
        }

    def history(self) -> list[Second]:
        """Each interval between two consecutive samples in the ring, oldest first (at most
        max(WINDOWS) + 1): its rate, and its p99 from the difference of the two histograms."""
        now = self.clock()
        out = []
        samples = list(self.samples)
        for (t0, before), (t1, after) in zip(samples, samples[1:]):
            diff = [a - b for a, b in zip(after, before)]
            span = t1 - t0
            out.append(Second(now - t1, sum(diff) / span if span > 0 else 0.0, quantile(0.99, diff)))
        return out
