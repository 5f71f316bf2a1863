"""The master's local worker slots, one LocalWorker per local port (workers.py): added at start,
by a reload and by TTIN; retired by TTOU and a reload, to drain in the background; stopped and
waited for together when the master stops."""
from __future__ import annotations

import asyncio
import logging
import socket

from .backoff import Pool
from .health import HealthChecker
from .ops.logs import LogSink
from .sockets import ListenError, RuntimeDir, bind_listener
from .state import WorkerState, WorkerTable
from .worker_command import WorkerOptions
from .workers import LocalWorker

log = logging.getLogger("gows.arbiter")
MAX_TTIN_PORT_TRIES = 100

Key = tuple[str, int]


class LocalSlots:
    """The slots serving (`serving`, by host and port) and those retired and still draining."""

    def __init__(self, table: WorkerTable, checker: HealthChecker, sink: LogSink) -> None:
        self.table, self.checker, self.sink = table, checker, sink
        self.serving: dict[Key, LocalWorker] = {}
        self.retiring: dict[asyncio.Task, LocalWorker] = {}  # each one's drain, then close
        self.pool = Pool()  # the same slots, kept from all backing off at once
        # Where local workers' Unix sockets live, made by open() (None: the proxies reach them
        # over TCP).
        self.runtime: RuntimeDir | None = None

    def open(self) -> None:
        """Make the directory for the workers' Unix sockets (before the first add)."""
        self.runtime = RuntimeDir.create()

    def remove(self) -> None:
        """Remove that directory, once the workers are gone."""
        if self.runtime is not None:
            self.runtime.remove()

    def add(self, host: str, port: int, sock: socket.socket, options: WorkerOptions,
            weight: int = 1, slow_start: float = 0.0) -> LocalWorker:
        """Start a slot serving on `sock` (host:port), in the table from now on."""
        runtime = self.runtime
        unix = runtime.bind(port) if runtime is not None else None
        state = self.table.add(WorkerState(host, port, local=True, unix_path=unix.path if unix is not None else None,
                                           weight=weight, slow_start=slow_start))
        slot = LocalWorker(state, sock, self.table, self.checker, options, self.sink, self.pool, unix,
                           (lambda: runtime.bind(port)) if runtime is not None else None)
        self.serving[state.key] = slot
        slot.start()
        return slot

    def retire(self, slot: LocalWorker) -> None:
        """Take a slot out of service: out of the table first (no new requests), then drain it."""
        del self.serving[slot.state.key]
        self.table.remove(slot.state)
        self.checker.sync()
        slot.stop(graceful=True)

        async def finish() -> None:
            await slot.task
            slot.close()

        task = asyncio.ensure_future(finish())
        self.retiring[task] = slot
        task.add_done_callback(self.retiring.pop)

    def draining(self, keys: set[Key]) -> list[asyncio.Task]:
        """The drains under way of retired slots whose port is one of `keys`."""
        return [task for task, slot in self.retiring.items() if slot.state.key in keys]

    def bind_next(self, taken: set[int]) -> tuple[str, int, socket.socket] | None:
        """A listener on the first port after the highest local one that is neither in `taken`
        nor busy, on that slot's host (TTIN); None, logged, when there is none within reach."""
        last = max(self.serving.values(), key=lambda s: s.state.port).state
        port = last.port
        for _ in range(MAX_TTIN_PORT_TRIES):
            port += 1
            if port > 65535:
                break
            if port in taken:
                continue
            try:
                return last.host, port, bind_listener(last.host, port)
            except ListenError as e:
                log.debug("SIGTTIN: %s", e)
        log.error("SIGTTIN ignored: no free port after %d", last.port)
        return None

    def stop(self, graceful: bool) -> None:
        """Tell every slot, serving or retired, to end: drain, or quit at once."""
        for slot in [*self.serving.values(), *self.retiring.values()]:
            slot.stop(graceful)

    def ended(self) -> asyncio.Future:
        """A future done when every slot, serving or retired, has ended."""
        return asyncio.ensure_future(asyncio.gather(*(s.task for s in self.serving.values()), *self.retiring))

    def close(self) -> None:
        """Close the serving slots' sockets, once their processes are gone, and forget them."""
        for slot in self.serving.values():
            slot.close()
        self.serving.clear()

    async def wait_up(self, slots: list[LocalWorker], timeout: float) -> None:
        """Wait until every one of `slots` is up, or `timeout` seconds (their supervisors keep
        trying after)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while any(not s.state.up for s in slots) and loop.time() < deadline:
            await asyncio.sleep(0.05)
        for s in slots:
            if not s.state.up:
                log.warning("reload: new worker %s is not healthy yet (%s)", s.state.address,
                            s.state.last_error or "starting")
