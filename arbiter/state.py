"""Worker state: the one place health flows into (checks, passive failures, the supervisor)
and the proxy and admin page read from.

All methods run on the master's event loop thread; nothing here blocks or locks.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

from .addresses import host_port

log = logging.getLogger("gows.state")
WORKER_SLOTS = 1024  # workers whose requests the proxies count apart (proxy/counters.py)


@dataclass(eq=False)
class WorkerState:
    """What the master knows about one worker, local (spawned here) or remote (only checked)."""

    host: str
    port: int
    local: bool = True
    # The worker's Unix socket, which the proxies connect to instead of host:port (health checks
    # stay on TCP); None for remote workers, or when the master could not bind one.
    unix_path: str | None = None
    pid: int | None = None
    up: bool = False
    since: float = field(default_factory=time.time)  # wall clock of the last up/down change
    started_at: float | None = None  # monotonic time the current incarnation was spawned
    consecutive_failures: int = 0
    consecutive_successes: int = 0
    restarts: int = 0
    last_check_latency: float | None = None  # seconds, of the last successful active check
    last_error: str = ""
    passive_failure_times: list[float] = field(default_factory=list)
    requests: int = 0  # requests the proxies sent to this worker (kept current by the master)
    in_flight: int = 0  # requests the proxy has outstanding on this worker
    slot: int = 0  # its place among the proxies' per-worker counters (WORKER_SLOTS: none of its own)
    name: str | None = None  # the DNS name this address was resolved from (resolve.py), if any

    @property
    def address(self) -> str:
        return host_port(self.host, self.port)

    @property
    def key(self) -> tuple[str, int]:
        return (self.host, self.port)


Listener = Callable[[WorkerState, bool], None]


class WorkerIndex:
    """Workers by address, and the ones up: what every reader of worker health looks at (the
    master's WorkerTable, a proxy process's MirrorTable)."""

    def __init__(self) -> None:
        self._workers: dict[tuple[str, int], WorkerState] = {}
        self._healthy: tuple[WorkerState, ...] = ()
        # Bumped whenever membership or up/down changes, so readers (the balancer's hash
        # ring) can rebuild lazily instead of on every request.
        self.generation = 0

    @property
    def healthy(self) -> tuple[WorkerState, ...]:
        """Workers the proxy may choose, in a stable order (by port, then host)."""
        return self._healthy

    def get(self, host: str, port: int) -> WorkerState | None:
        return self._workers.get((host, port))

    def __iter__(self) -> Iterator[WorkerState]:
        return iter(list(self._workers.values()))

    def __len__(self) -> int:
        return len(self._workers)

    def _reindex(self) -> None:
        self.generation += 1
        self._healthy = tuple(sorted((w for w in self._workers.values() if w.up), key=lambda w: (w.port, w.host)))


class WorkerTable(WorkerIndex):
    """All workers, their up/down state and the rules that move a worker between the two.

    Active checks need `fall` consecutive failures to mark a worker down and `rise` consecutive
    successes to mark it up (HAProxy's inter/rise/fall). Passive failures seen by the proxy
    (refused, reset, timed out) mark a worker down when `max_fails` of them fall within
    `fail_timeout` seconds (nginx's max_fails/fail_timeout); active checks then bring it back.
    """

    def __init__(self, rise: int = 2, fall: int = 3, max_fails: int = 3, fail_timeout: float = 10.0) -> None:
        super().__init__()
        self.rise = rise
        self.fall = fall
        self.max_fails = max_fails
        self.fail_timeout = fail_timeout
        self._listeners: list[Listener] = []
        self._watchers: list[Callable[[], None]] = []

    # -- membership ---------------------------------------------------------------------
    def add(self, worker: WorkerState) -> WorkerState:
        taken = {w.slot for w in self._workers.values()}
        worker.slot = next((i for i in range(WORKER_SLOTS) if i not in taken), WORKER_SLOTS)
        self._workers[worker.key] = worker
        self._changed()
        return worker

    def remove(self, worker: WorkerState) -> None:
        if self._workers.pop(worker.key, None) is not None:
            self._changed()

    def subscribe(self, listener: Listener) -> None:
        """Call `listener(worker, up)` after every up/down transition."""
        self._listeners.append(listener)

    def watch(self, watcher: Callable[[], None]) -> None:
        """Call `watcher()` after any change a reader's copy must follow: membership, up/down,
        a worker's pid (the proxy processes' tables are kept so)."""
        self._watchers.append(watcher)

    # -- transitions ---------------------------------------------------------------------
    def spawned(self, worker: WorkerState, pid: int) -> None:
        """A new incarnation of a local worker started: it is down until checks pass `rise` times."""
        worker.pid = pid
        worker.started_at = time.monotonic()
        worker.consecutive_failures = 0
        worker.consecutive_successes = 0
        worker.passive_failure_times.clear()
        self._set(worker, False, "spawned")
        self._notify()

    def handover(self, worker: WorkerState, pid: int) -> None:
        """A reloaded incarnation proved healthy and took over from the old one: still up."""
        worker.pid = pid
        worker.started_at = time.monotonic()
        worker.passive_failure_times.clear()
        self._notify()

    def exited(self, worker: WorkerState, reason: str) -> None:
        """The worker's process is gone; it serves nothing until it is replaced."""
        worker.pid = None
        worker.last_error = reason
        self._set(worker, False, reason)
        self._notify()

    def record_check(self, worker: WorkerState, ok: bool, latency: float | None = None, error: str = "") -> None:
        """Feed one active health-check result."""
        if ok:
            worker.consecutive_successes += 1
            worker.consecutive_failures = 0
            worker.last_check_latency = latency
            if not worker.up and worker.consecutive_successes >= self.rise:
                self._set(worker, True, f"{worker.consecutive_successes} checks passed")
        else:
            worker.consecutive_failures += 1
            worker.consecutive_successes = 0
            worker.last_error = error
            if worker.up and worker.consecutive_failures >= self.fall:
                self._set(worker, False, f"{worker.consecutive_failures} checks failed: {error}")

    def record_passive_failure(self, worker: WorkerState, error: str) -> None:
        """Feed a connection failure the proxy saw while forwarding a request."""
        now = time.monotonic()
        times = worker.passive_failure_times
        times.append(now)
        while times and now - times[0] > self.fail_timeout:
            times.pop(0)
        worker.last_error = error
        if worker.up and len(times) >= self.max_fails:
            worker.consecutive_successes = 0
            self._set(worker, False, f"{len(times)} proxy failures in {self.fail_timeout:g}s: {error}")

    def _set(self, worker: WorkerState, up: bool, reason: str) -> None:
        if worker.up == up:
            return
        worker.up = up
        worker.since = time.time()
        if worker.key in self._workers:
            log.log(logging.INFO if up else logging.WARNING, "worker %s is %s (%s)",
                    worker.address, "up" if up else "down", reason)
        self._changed()
        for listener in self._listeners:
            listener(worker, up)

    def _changed(self) -> None:
        self._reindex()
        self._notify()

    def _notify(self) -> None:
        for watcher in self._watchers:
            watcher()
