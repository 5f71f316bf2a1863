"""A proxy's side of outlier detection (Envoy's): counting each worker's failures in a row.

A failure is what the worker did: an answer of 500, 502, 503 or 504 (not 501 or 505, which
answer a client's mistake, nor a 503 with Retry-After: a worker shedding load on purpose, as
fileapp does past its concurrent listings, which clients could otherwise provoke until healthy
workers are ejected), or a connection it refused, reset or let time out. The proxy's own
errors and shortages are never counted, and a failure is charged to the worker that was asked.
Any other answer starts the count again. At `threshold` in a row the proxy reports the worker to
the master, which alone decides an ejection (arbiter/state.py: it sees every worker, so it can
cap how many are out at once).
"""
from __future__ import annotations

from ..state import WorkerState
from .view import WorkerView

UPSTREAM_FAILURES = frozenset((500, 502, 503, 504))


class Outliers:
    """Failures in a row per worker (kept on the proxy's WorkerState); 0 `threshold`: off."""

    __slots__ = ("table", "threshold")

    def __init__(self, table: WorkerView, threshold: int = 0) -> None:
        self.table = table
        self.threshold = threshold

    def answered(self, worker: WorkerState, status: int, shedding: bool = False) -> None:
        """`worker` answered with `status` (`shedding`: a 503 with Retry-After)."""
        if status in UPSTREAM_FAILURES and not shedding:
            self.failed(worker, f"HTTP {status}")
        elif worker.failure_streak:
            worker.failure_streak = 0

    def failed(self, worker: WorkerState, reason: str) -> None:
        """`worker` failed a request (its fault: see the module docstring)."""
        if not self.threshold:
            return
        worker.failure_streak += 1
        if worker.failure_streak >= self.threshold:
            worker.failure_streak = 0
            self.table.record_outlier(worker, f"{self.threshold} failures in a row, the last: {reason}")
