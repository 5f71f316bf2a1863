"""Active health checks: a tiny HTTP probe per worker on the master's loop, feeding WorkerTable.

A probe is deliberately minimal (connect, one `GET`, read the status line, close) and bounded
by the configured timeout; it is not a client and parses nothing beyond the status code.

A probe the master cannot make because it is itself out of descriptors or memory (EMFILE,
ENFILE, ENOBUFS, ENOMEM) is no check at all: it raises ProbeSkipped, nothing is recorded, and
a warning about the master (not the worker) is logged at most every SHORTAGE_REPORT_INTERVAL.
"""
from __future__ import annotations

import asyncio
import logging
import math
import random
import re
import time
from typing import Callable

from .addresses import host_port
from .config import HealthCheckConfig
from .ops.logs import Throttle
from .sockets import local_shortage
from .state import WorkerState, WorkerTable

log = logging.getLogger("gows.health")
_STATUS_LINE = re.compile(rb"HTTP/1\.[01] ([1-5][0-9][0-9])[ \r\n]")
# Longest status line a probe reads (the asyncio stream's buffer limit): a worker sending more
# before its line ends fails the check.
STATUS_LINE_LIMIT = 4096
SHORTAGE_REPORT_INTERVAL = 10.0  # seconds between two warnings about skipped checks at most
# A worker that is not up (starting, or down) is checked at least this often, so that it passes
# its `rise` checks within seconds, and a local one within its boot timeout, whatever the interval.
DOWN_INTERVAL = 1.0
# Each wait between two checks of a worker is shortened by a random part of up to this share of
# it (HAProxy's spread-checks): the checks of workers started together drift apart instead of
# waking a hundred idle processes in the same millisecond every idleInterval, a burst of CPU that
# stalls the traffic meanwhile. Never longer than configured: fall x interval still bounds the
# time to notice a failure.
SPREAD = 0.2
# And each wait ends on a grid of interval / WAKE_SLOTS, so that however many workers there are
# the master wakes at most this many times an interval for their checks, to look at several each
# time: a wake-up of its loop costs more than the look it makes (100 idle workers: 1.2-1.5% of a
# core against 1.8%, spread off the grid).
WAKE_SLOTS = 20


class Alarm:
    """What a worker's checking task sleeps on: its next turn's time or a kick, whichever comes
    first. A future and a timer per sleep: a task per sleep (asyncio.wait on Event.wait), then
    cancelled at each timeout, made an idle master with 100 workers spend most of its CPU on
    the sleeps themselves."""

    __slots__ = ("kicked", "_sleeper")

    def __init__(self) -> None:
        self.kicked = False  # since the task last looked (take_kick)
        self._sleeper: asyncio.Future | None = None

    def kick(self) -> None:
        self.kicked = True
        self._wake()

    def take_kick(self) -> bool:
        """Whether a kick came since the last call."""
        kicked, self.kicked = self.kicked, False
        return kicked

    async def sleep_until(self, when: float) -> None:
        """Sleep until the loop's time is `when`, or a kick; not at all after an untaken kick."""
        if self.kicked:
            return
        loop = asyncio.get_running_loop()
        self._sleeper = loop.create_future()
        timer = loop.call_at(when, self._wake)
        try:  # (a cancellation of the task cancels the future: never swallowed)
            await self._sleeper
        finally:
            timer.cancel()
            self._sleeper = None

    def _wake(self) -> None:
        sleeper = self._sleeper
        if sleeper is not None and not sleeper.done():
            sleeper.set_result(None)


class ProbeSkipped(Exception):
    """The master could not probe: it is out of descriptors or memory itself. The message says
    what it is short of; the worker was not asked anything."""


async def probe(host: str, port: int, path: str, timeout: float) -> str | None:
    """Check one worker: None when it answered 2xx within `timeout` seconds, else why not;
    ProbeSkipped when the master could not ask (see the module docstring)."""
    try:
        return await asyncio.wait_for(_probe(host, port, path), timeout)
    except asyncio.TimeoutError:
        return f"no answer within {timeout:.3g}s"
    except OSError as e:
        shortage = local_shortage(e)
        if shortage is not None:
            raise ProbeSkipped(shortage) from None
        return e.strerror or str(e) or type(e).__name__


async def _probe(host: str, port: int, path: str) -> str | None:
    reader, writer = await asyncio.open_connection(host, port, limit=STATUS_LINE_LIMIT)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {host_port(host, port)}\r\nUser-Agent: gows-health\r\n"
                     f"Connection: close\r\n\r\n".encode("ascii"))
        line = await reader.readline()
    except ValueError:  # (readline past the limit; it escaped the checking task, which ended)
        return f"malformed status line (over {STATUS_LINE_LIMIT} bytes)"
    finally:
        writer.close()
    if not line:
        return "connection closed without a response"
    m = _STATUS_LINE.match(line)
    if m is None:
        return f"malformed status line {line[:40]!r}"
    status = int(m.group(1))
    return None if 200 <= status < 300 else f"HTTP {status}"


class HealthChecker:
    """One checking task per worker in the table: probe every `interval` (every DOWN_INTERVAL
    at most while the worker is not up), less a random part of up to SPREAD (and to the grid of
    WAKE_SLOTS), and record the result. A local worker that is up and was sent no request
    since its last probe is probed every `idle_interval` only (a probe is all that wakes its
    process); its task still looks every `interval` whether a request went to it since, and
    then probes it at once. Remote workers are probed every `interval` whatever
    their traffic (for an edge, a check is how it learns a node is gone or leaving), and so is
    an ejected one (it gets no requests because it failed them: a suspect, not an idle one).

    Local workers with no running process are skipped (nothing would answer); a result is
    dropped when the worker's process changed while the probe was in flight or the worker is
    held (during a reload swap the supervisor probes it itself).
    """

    def __init__(self, table: WorkerTable, settings: HealthCheckConfig,
                 on_result: Callable[[WorkerState], None] | None = None,
                 sent: Callable[[WorkerState], int] | None = None) -> None:
        """`sent(worker)`: how many requests the proxies have sent `worker` so far (None: every
        worker is probed every interval, as a remote one always is)."""
        self.table = table
        self.settings = settings
        self.on_result = on_result
        self.sent = sent
        self._tasks: dict[WorkerState, asyncio.Task] = {}
        self._alarms: dict[WorkerState, Alarm] = {}
        self._held: set[WorkerState] = set()
        self._short = Throttle(SHORTAGE_REPORT_INTERVAL)

    def sync(self) -> None:
        """Start checking workers added to the table and stop checking removed ones."""
        current = set(self.table)
        for worker in current - self._tasks.keys():
            self._alarms[worker] = Alarm()
            self._tasks[worker] = asyncio.get_running_loop().create_task(self._run(worker))
        for worker in self._tasks.keys() - current:
            self._tasks.pop(worker).cancel()
            self._alarms.pop(worker, None)

    def kick(self, worker: WorkerState) -> None:
        """Check `worker` now instead of at its next interval (e.g. it was just started)."""
        alarm = self._alarms.get(worker)
        if alarm is not None:
            alarm.kick()

    def hold(self, worker: WorkerState) -> None:
        """Stop recording checks of `worker` until release() (its owner probes it itself)."""
        self._held.add(worker)

    def release(self, worker: WorkerState) -> None:
        """Resume checking `worker`, starting now."""
        self._held.discard(worker)
        self.kick(worker)

    def skipped(self, worker: WorkerState, why: ProbeSkipped) -> None:
        """A probe of `worker` was skipped (the master's shortage): warn, at most once per interval."""
        count = self._short.due()
        if count:
            log.warning("%s: %d health checks skipped (the last one of worker %s) and not counted against the "
                        "workers; reported at most every %gs", why, count, worker.address, SHORTAGE_REPORT_INTERVAL)

    async def close(self) -> None:
        """Stop every checking task."""
        tasks = list(self._tasks.values())
        self._tasks.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _wanted(self, worker: WorkerState) -> bool:
        return worker not in self._held and (not worker.local or worker.pid is not None)

    async def _run(self, worker: WorkerState) -> None:
        alarm = self._alarms[worker]
        me = asyncio.current_task()
        # Until close() or sync() forgets this task, not merely until it is cancelled: on Python
        # < 3.12, asyncio.wait_for (the probe's deadline) returns the result of an awaitable that
        # finishes just as the task is cancelled and swallows the cancellation, and a loop that
        # only stopped on CancelledError then probed on for ever (close() never returned).
        last_probe, last_sent = -math.inf, None
        while self._tasks.get(worker) is me:
            kicked = alarm.take_kick()
            sent = self.sent(worker) if self.sent is not None and worker.local else None
            now = time.monotonic()
            idle = sent is not None and sent == last_sent and worker.up and worker.ejected_until is None
            if self._wanted(worker) and (kicked or not idle or now - last_probe >= self.settings.idle_interval):
                last_probe, last_sent = now, sent
                pid, settings = worker.pid, self.settings
                started = time.perf_counter()  # uvloop's loop.time() counts whole milliseconds
                try:
                    error = await probe(worker.host, worker.port, settings.path, settings.timeout)
                except ProbeSkipped as why:
                    self.skipped(worker, why)
                else:
                    self._record(worker, pid, error, time.perf_counter() - started)
            interval = self.settings.interval if worker.up else min(self.settings.interval, DOWN_INTERVAL)
            clock, slot = asyncio.get_running_loop().time(), interval / WAKE_SLOTS
            await alarm.sleep_until(math.floor((clock + interval * (1.0 - SPREAD * random.random())) / slot) * slot)

    def _record(self, worker: WorkerState, pid: int | None, error: str | None, latency: float) -> None:
        """Feed one check's result, unless the worker changed process, is held or was removed meanwhile."""
        if worker.pid == pid and self._wanted(worker) and self.table.get(*worker.key) is worker:
            if error:
                log.debug("check of %s failed: %s", worker.address, error)
            self.table.record_check(worker, error is None, latency, error or "")
            if self.on_result is not None:
                self.on_result(worker)
