"""Workers given by DNS name: each address the name yields is a member of the worker table.

The master resolves every name at start and then every `resolveInterval` seconds, with the
loop's getaddrinfo (run in the default executor, never on the loop itself). A new address joins
the table (down until its checks pass `rise` times); an address the name no longer yields leaves
it, which drains it: the proxies send it nothing new and let what is in flight finish. A name
that does not resolve is a warning, and keeps the members it had (nginx's `resolve` does so):
a resolver's bad minute must not empty the pool.

The table stays the one place worker state is written; this only adds and removes members.
"""
from __future__ import annotations

import asyncio
import logging
import socket

from .config import Config
from .health import HealthChecker
from .state import WorkerState, WorkerTable

log = logging.getLogger("gows.resolve")


RESOLVE_TIMEOUT = 5.0  # seconds one resolution may take before it counts as failed (a start waits for it)
# Members one name may have (HAProxy's server-template takes a fixed number too): every member is
# health-checked every second and counted apart (state.WORKER_SLOTS for all workers), so a
# resolver answering thousands of addresses must not make the master probe thousands of hosts.
# Past it the members a name has are kept first, then the lowest new addresses.
MAX_MEMBERS = 256


async def addresses(name: str, port: int) -> set[str]:
    """The IP addresses `name` resolves to now (TCP), off the event loop; OSError when none."""
    loop = asyncio.get_running_loop()
    try:
        infos = await asyncio.wait_for(loop.getaddrinfo(name, port, type=socket.SOCK_STREAM), RESOLVE_TIMEOUT)
    except asyncio.TimeoutError:
        raise OSError(f"no answer within {RESOLVE_TIMEOUT:g}s") from None
    return {info[4][0] for info in infos}


class NamedUpstreams:
    """The members of the configured named workers, kept current by one task."""

    def __init__(self, table: WorkerTable, checker: HealthChecker) -> None:
        self.table = table
        self.checker = checker
        self.names: tuple[tuple[str, int], ...] = ()
        self.interval = 30.0
        self._task: asyncio.Task | None = None
        self.entries: dict = {}
        self._failing: set[tuple[str, int]] = set()  # names whose last resolution failed (warned once)
        self._capped: set[tuple[str, int]] = set()  # names yielding over MAX_MEMBERS addresses (warned once)

    async def configure(self, config: Config) -> None:
        """Take the config's named workers (at start and at a reload): resolve them now, then
        every resolveInterval; members of names no longer configured leave the table."""
        self.entries = {(w.host, w.port): w for w in config.workers if w.named}
        self.names = tuple(self.entries)
        self.interval = config.resolve_interval
        for worker in self.table:
            if worker.name and (worker.name, worker.port) not in self.names:
                self._drop(worker, "no longer configured")
        await self.refresh()
        if self._task is None and self.names:
            self._task = asyncio.ensure_future(self._run())

    async def refresh(self) -> None:
        """Resolve every name once and converge the table on what they yield."""
        results = await asyncio.gather(*(addresses(n, p) for n, p in self.names), return_exceptions=True)
        for (name, port), result in zip(self.names, results):
            if isinstance(result, BaseException):
                if not isinstance(result, OSError):
                    raise result
                if (name, port) not in self._failing:
                    self._failing.add((name, port))
                    log.warning("worker %s:%d: cannot resolve %r (%s); keeping its %d members, trying again "
                                "every %gs", name, port, name, result.strerror or result,
                                len(self._members(name, port)), self.interval)
                continue
            if (name, port) in self._failing:
                self._failing.discard((name, port))
                log.info("worker %s:%d: %r resolves again", name, port, name)
            self._converge(name, port, result)
        self.checker.sync()

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    def _members(self, name: str, port: int) -> list[WorkerState]:
        return [w for w in self.table if w.name == name and w.port == port]

    def _converge(self, name: str, port: int, found: set[str]) -> None:
        current = {w.host: w for w in self._members(name, port)}
        found = self._capped_to(name, port, found, current.keys())
        for host in sorted(found - current.keys()):
            taken = self.table.get(host, port)
            if taken is not None:  # another entry (an address, or another name) has it already
                log.debug("worker %s:%d: address %s is already a worker (%s)", name, port, host, taken.name or "by address")
                continue
            entry = self.entries[(name, port)]
            self.table.add(WorkerState(host, port, local=False, name=name, weight=entry.weight,
                                       slow_start=entry.slow_start))
            log.info("worker %s:%d: member %s joins", name, port, host)
        for host in current.keys() - found:
            self._drop(current[host], f"{name} no longer resolves to it")

    def _capped_to(self, name: str, port: int, found: set[str], current) -> set[str]:
        """At most MAX_MEMBERS of `found`: those that are members already first."""
        if len(found) <= MAX_MEMBERS:
            self._capped.discard((name, port))
            return found
        if (name, port) not in self._capped:
            self._capped.add((name, port))
            log.warning("worker %s:%d: %r resolves to %d addresses; taking %d of them (the most a name may have)",
                        name, port, name, len(found), MAX_MEMBERS)
        kept = sorted(found & set(current))[:MAX_MEMBERS]
        return set(kept + sorted(found - set(kept))[:MAX_MEMBERS - len(kept)])

    def _drop(self, worker: WorkerState, why: str) -> None:
        """Out of the table: the proxies choose it no more, its requests in flight finish."""
        self.table.remove(worker)
        log.info("worker %s:%d: member %s leaves, draining (%s)", worker.name, worker.port, worker.host, why)

    async def _run(self) -> None:
        me = asyncio.current_task()
        while self._task is me:  # (not only until cancelled: see HealthChecker._run)
            await asyncio.sleep(self.interval)
            try:
                await self.refresh()
            except Exception:  # one bad round must not end the re-resolution for good
                log.exception("resolving worker names failed")
