"""What the proxy sees of worker health, and the proxy process's copy of it.

The master's WorkerTable is the one writer of worker state (checks, rise/fall, up/down). The
proxy only reads it and reports what it saw go wrong: in the master that is the table itself; in
a proxy process it is a MirrorTable, which the master keeps current by pushing every change over
the control channel, and which passes passive failures back the same way.
"""
from __future__ import annotations

from typing import Callable, Iterable, Iterator, Protocol

from ..state import WorkerIndex, WorkerState

# One worker as the master pushes it: host, port, local, its Unix socket (None: reach it over
# TCP), pid (None: no process), up, where its requests are counted (WorkerState.slot), its
# weight, slow start, comeback time and end of ejection (monotonic, None: none).
Row = tuple[str, int, bool, "str | None", "int | None", bool, int, int, float, "float | None", "float | None"]


class WorkerView(Protocol):
    """The proxy's side of worker health (the balancer, the pool and the relay use only this)."""

    generation: int  # changes whenever membership or up/down changes
    ever_healthy: bool  # some worker has been up since the table began (gows is past its start)

    @property
    def healthy(self) -> tuple[WorkerState, ...]:
        """The workers that may be chosen, in a stable order."""

    def get(self, host: str, port: int) -> WorkerState | None: ...

    def __iter__(self) -> Iterator[WorkerState]: ...

    def record_passive_failure(self, worker: WorkerState, error: str) -> None:
        """A connection to `worker` failed while forwarding a request (refused, reset, timed out)."""

    def record_outlier(self, worker: WorkerState, reason: str) -> None:
        """`worker` failed outlierDetection.consecutiveFailures times in a row here: the master
        decides whether to eject it."""

    def on_leave(self, listener: Callable[[WorkerState], None]) -> None:
        """Call `listener(worker)` when a worker still in the table stops being chosen."""


def rows(workers: Iterable[WorkerState]) -> list[Row]:
    """The master's table as pushed to proxies."""
    return [(w.host, w.port, w.local, w.unix_path, w.pid, w.up, w.slot, w.weight, w.slow_start, w.recovered_at,
             w.ejected_until) for w in workers]


class MirrorTable(WorkerIndex):
    """A proxy process's copy of the master's worker table.

    A worker keeps its WorkerState object while its address stays in the table, so the balancer's
    and the pool's references stay valid; its pid changes when the master replaces its process,
    which is what makes the pool drop connections opened to the old one.
    """

    def __init__(self, report: Callable[[WorkerState, str], None],
                 report_outlier: Callable[[WorkerState, str], None] | None = None) -> None:
        super().__init__()
        self._report = report
        self._report_outlier = report_outlier

    def record_passive_failure(self, worker: WorkerState, error: str) -> None:
        self._report(worker, error)

    def record_outlier(self, worker: WorkerState, reason: str) -> None:
        if self._report_outlier is not None:
            self._report_outlier(worker, reason)

    def apply(self, pushed: Iterable[Row]) -> None:
        """Take the master's current table."""
        fresh: dict[tuple[str, int], WorkerState] = {}
        for host, port, local, unix_path, pid, up, slot, weight, slow_start, recovered_at, ejected_until in pushed:
            worker = self._workers.get((host, port))
            if worker is None or worker.local != local:
                worker = WorkerState(host, port, local=local)
            worker.unix_path, worker.pid, worker.up, worker.slot = unix_path, pid, up, slot
            worker.weight, worker.slow_start, worker.recovered_at = weight, slow_start, recovered_at
            worker.ejected_until = ejected_until
            fresh[worker.key] = worker
        self._workers = fresh
        self._reindex()
