"""Worker state: the one place health flows into (checks, passive failures, the supervisor)
and the proxy and admin page read from.

All methods run on the master's event loop thread; nothing here blocks or locks.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

from .addresses import host_port

log = logging.getLogger("gows.state")
WORKER_SLOTS = 1024  # workers whose requests the proxies count apart (proxy/counters.py)
KEPT_LOG_INTERVAL = 10.0  # seconds between two warnings about a worker too many to eject


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
    # A proxy's connections to it in use (answering, or connecting): each holds at most one of its
    # threads, however many requests are pipelined on it (a thread answers those in turn).
    connections: int = 0
    slot: int = 0  # its place among the proxies' per-worker counters (WORKER_SLOTS: none of its own)
    name: str = ""  # how the config names it (a host name), when not its address
    weight: int = 1  # its share of the requests against the others' (the config's workers[].weight)
    slow_start: float = 0.0  # seconds a comeback ramps over (workers[].slowStart); 0: none
    # Monotonic time (CLOCK_MONOTONIC: the same in the master and its proxies) it last came back
    # (down to up, or out of an ejection) and ramps from; None: at full weight.
    recovered_at: float | None = None
    been_up: bool = False  # a master's first up of a worker is no comeback: no slow start
    ejections: int = 0  # times ejected by outlier detection, in a row (the next one lasts twice as long)
    ejections_total: int = 0
    ejected_until: float | None = None  # monotonic end of its current ejection; None: not ejected
    ejection_ended: float = 0.0  # monotonic end of its last ejection
    failure_streak: int = 0  # a proxy's own count of its failures in a row (outlier detection)

    @property
    def address(self) -> str:
        return host_port(self.host, self.port)

    @property
    def label(self) -> str:
        """Its name where the config gives one, else its address (status page, metrics)."""
        return self.name or self.address

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
        # Whether some worker has been up (chosen from) since the table began: gows is past its
        # start, when requests wait for a first worker rather than get 503 (the proxy's `hold`).
        self.ever_healthy = False
        self._leaving: list[Callable[[WorkerState], None]] = []

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

    def on_leave(self, listener: Callable[[WorkerState], None]) -> None:
        """Call `listener(worker)` when a worker still in the table stops being chosen (marked
        down or ejected; not one removed, which drains), so requests waiting on it can go elsewhere."""
        self._leaving.append(listener)

    def _reindex(self) -> None:
        self.generation += 1
        old = self._healthy
        self._healthy = tuple(sorted((w for w in self._workers.values() if w.up and w.ejected_until is None),
                                     key=lambda w: (w.port, w.host)))
        if self._healthy:
            self.ever_healthy = True
        if self._leaving and old:
            kept = set(self._healthy)
            for worker in old:
                if worker not in kept and self._workers.get(worker.key) is worker:
                    for listener in self._leaving:
                        listener(worker)


class WorkerTable(WorkerIndex):
    """All workers, their up/down state and the rules that move a worker between the two.

    Active checks need `fall` consecutive failures to mark a worker down and `rise` consecutive
    successes to mark it up (HAProxy's inter/rise/fall). Passive failures seen by the proxy
    (refused, reset, timed out) mark a worker down when `max_fails` of them fall within
    `fail_timeout` seconds (nginx's max_fails/fail_timeout); active checks then bring it back.

    Outlier ejection (Envoy's) lives here too, beside up/down, because it needs what only the
    one writer has: every worker's state, to cap the share ejected at once, and one count of
    ejections per worker whichever proxy saw the failures. A proxy counts a worker's failures
    in a row itself (it sees every response; a message per response would cost more than the
    response) and reports a streak; an ejected worker stays up but is not chosen for
    `ejection_base` x 2^(ejections in a row - 1) seconds, at most `ejection_max`.
    """

    def __init__(self, rise: int = 2, fall: int = 3, max_fails: int = 3, fail_timeout: float = 10.0,
                 ejection_base: float = 30.0, ejection_max: float = 300.0, ejection_percent: int = 50,
                 clock: Callable[[], float] = time.monotonic,
                 schedule: Callable[[float, Callable[[], None]], object] | None = None) -> None:
        """`clock` and `schedule(delay, callback)` (the running loop's call_later by default)
        time ejections; tests inject their own."""
        super().__init__()
        self.set_rules(rise, fall, max_fails, fail_timeout, ejection_base, ejection_max, ejection_percent)
        self.clock = clock
        self._kept_logged = -KEPT_LOG_INTERVAL  # when a worker too many to eject was last logged
        self.schedule = schedule or (lambda delay, callback: asyncio.get_running_loop().call_later(delay, callback))
        self._listeners: list[Listener] = []
        self._watchers: list[Callable[[], None]] = []

    def set_rules(self, rise: int, fall: int, max_fails: int, fail_timeout: float, ejection_base: float,
                  ejection_max: float, ejection_percent: int) -> None:
        """The rules above (a reload changes them for the workers already in the table)."""
        self.rise, self.fall = rise, fall
        self.max_fails, self.fail_timeout = max_fails, fail_timeout
        self.ejection_base, self.ejection_max, self.ejection_percent = ejection_base, ejection_max, ejection_percent

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

    def tune(self, worker: WorkerState, weight: int, slow_start: float) -> None:
        """Take a worker's (new) weight and slow start, as at a reload."""
        if (worker.weight, worker.slow_start) != (weight, slow_start):
            worker.weight, worker.slow_start = weight, slow_start
            self._changed()

    # -- transitions ---------------------------------------------------------------------
    def spawned(self, worker: WorkerState, pid: int) -> None:
        """A new incarnation of a local worker started: it is down until checks pass `rise` times."""
        worker.pid = pid
        worker.started_at = time.monotonic()
        worker.consecutive_failures = 0
        worker.consecutive_successes = 0
        worker.passive_failure_times.clear()
        worker.ejected_until = None  # a new process: its predecessor's ejection is not its own
        self._set(worker, False, "spawned")
        self._notify()

    def handover(self, worker: WorkerState, pid: int) -> None:
        """A reloaded incarnation proved healthy and took over from the old one: still up."""
        worker.pid = pid
        worker.started_at = time.monotonic()
        worker.passive_failure_times.clear()
        self._notify()

    def exited(self, worker: WorkerState, reason: str, deliberate: bool = False) -> None:
        """The worker's process is gone; it serves nothing until it is replaced. `deliberate`:
        the master ended it (a stop, a reload): logged as news, not as a warning."""
        worker.pid = None
        worker.last_error = reason
        self._set(worker, False, reason, logging.INFO if deliberate else logging.WARNING)
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

    def record_outlier(self, worker: WorkerState, reason: str) -> bool:
        """A proxy saw `worker` fail outlierDetection.consecutiveFailures times in a row: eject
        it, unless that would eject more than `ejection_percent` of the workers or the last one
        up. Returns whether it was ejected."""
        if worker.ejected_until is not None or not worker.up or self._workers.get(worker.key) is not worker:
            return False
        ejected = sum(1 for w in self._workers.values() if w.ejected_until is not None)
        if (ejected + 1) * 100 > self.ejection_percent * len(self._workers) or self._healthy == (worker,):
            now = self.clock()
            if now - self._kept_logged >= KEPT_LOG_INTERVAL:
                self._kept_logged = now
                log.warning("worker %s: %s, but not ejected: %d of %d workers are out already (outlierDetection."
                            "maxEjectionPercent, or the last one up; logged at most every %gs)", worker.address,
                            reason, len(self._workers) - len(self._healthy), len(self._workers), KEPT_LOG_INTERVAL)
            return False
        now = self.clock()
        if worker.ejections and now - worker.ejection_ended > self.ejection_max:
            worker.ejections = 0  # it behaved for a long while: a fresh start
        worker.ejections += 1
        worker.ejections_total += 1
        duration = min(self.ejection_base * 2 ** min(worker.ejections - 1, 40), self.ejection_max)
        worker.ejected_until = now + duration
        log.warning("worker %s is ejected for %gs (ejection %d in a row): %s", worker.address, duration,
                    worker.ejections, reason)
        self._changed()
        token = worker.ejections_total
        self.schedule(duration, lambda: self._readmit(worker, token))
        return True

    def _readmit(self, worker: WorkerState, token: int) -> None:
        """Ejection number `token` is over (unless a newer one or a new process replaced it)."""
        if worker.ejected_until is None or worker.ejections_total != token:
            return
        worker.ejected_until = None
        worker.ejection_ended = now = self.clock()
        if worker.up and worker.slow_start > 0:
            worker.recovered_at = now
        if worker.key in self._workers:
            log.info("worker %s is back from its ejection", worker.address)
        self._changed()

    def _set(self, worker: WorkerState, up: bool, reason: str, down_level: int = logging.WARNING) -> None:
        if worker.up == up:
            return
        worker.up = up
        worker.since = time.time()
        if up:
            # A comeback ramps up (slow start); a worker's first up, at the master's start, does not.
            worker.recovered_at = self.clock() if worker.been_up and worker.slow_start > 0 else None
            worker.been_up = True
        if worker.key in self._workers:
            log.log(logging.INFO if up else down_level, "worker %s is %s (%s)",
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
