"""Request latency counters of the front proxy: a preallocated fixed-bucket histogram that the
proxy bumps once per completed response, and a once-a-second sampler that turns it into rates
and percentiles over sliding windows (the admin page and /metrics read both)."""
from __future__ import annotations

import time
from bisect import bisect_right
from collections import deque
from typing import Any, Sequence

# Upper bounds (seconds) of the latency buckets; one more bucket past the last holds the rest.
BOUNDS: tuple[float, ...] = (
    0.0001, 0.00015, 0.0002, 0.0003, 0.0005, 0.0007, 0.001, 0.0015, 0.002, 0.003, 0.005, 0.007,
    0.01, 0.015, 0.02, 0.03, 0.05, 0.07, 0.1, 0.15, 0.2, 0.3, 0.5, 0.7,
    1.0, 1.5, 2.0, 3.0, 5.0, 7.0, 10.0, 15.0, 20.0, 30.0, 60.0,
)
WINDOWS = (10, 300)  # seconds: the "last 10 s" and "last 5 min" of the admin page


class RequestStats:
    """Latency histogram of completed responses. `record` is the proxy's per-request hook: an
    int bump and a float add, nothing allocated; everything else is read-side."""

    __slots__ = ("buckets", "seconds")

    def __init__(self) -> None:
        self.buckets = [0] * (len(BOUNDS) + 1)
        self.seconds = 0.0

    def record(self, client: Any, req: Any, _now=time.perf_counter, _bucket=bisect_right, _bounds=BOUNDS) -> None:
        """One response is complete: count its time since the request began."""
        dt = _now() - req.born
        self.buckets[_bucket(_bounds, dt)] += 1
        self.seconds += dt

    @property
    def count(self) -> int:
        return sum(self.buckets)


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


class Window:
    """Once-a-second samples of the counters, enough to answer "over the last N seconds"."""

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
