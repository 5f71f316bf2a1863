"""Active health checks: a tiny HTTP probe per worker on the master's loop, feeding WorkerTable.

A probe is deliberately minimal (connect, one `GET`, read the status line, close) and bounded
by the configured timeout; it is not a client and parses nothing beyond the status code.
"""
from __future__ import annotations

import asyncio
import logging
import re
import time
from typing import Callable

from .config import HealthCheck
from .state import WorkerState, WorkerTable

log = logging.getLogger("gows.health")
_STATUS_LINE = re.compile(rb"HTTP/1\.[01] ([1-5][0-9][0-9])[ \r\n]")


async def probe(host: str, port: int, path: str, timeout: float) -> str | None:
    """Check one worker: None when it answered 2xx within `timeout` seconds, else why not."""
    try:
        return await asyncio.wait_for(_probe(host, port, path), timeout)
    except asyncio.TimeoutError:
        return f"no answer within {timeout:.3g}s"
    except OSError as e:
        return e.strerror or str(e) or type(e).__name__


async def _probe(host: str, port: int, path: str) -> str | None:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {authority}\r\nUser-Agent: gows-health\r\n"
                     f"Connection: close\r\n\r\n".encode("ascii"))
        line = await reader.readline()
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
    """One checking task per worker in the table: probe every `interval`, record the result.

    Local workers with no running process are skipped (nothing would answer); a result is
    dropped when the worker's process changed while the probe was in flight or the worker is
    held (during a reload swap the supervisor probes it itself).
    """

    def __init__(self, table: WorkerTable, settings: HealthCheck,
                 on_result: Callable[[WorkerState], None] | None = None) -> None:
        self.table = table
        self.settings = settings
        self.on_result = on_result
        self._tasks: dict[WorkerState, asyncio.Task] = {}
        self._kicks: dict[WorkerState, asyncio.Event] = {}
        self._held: set[WorkerState] = set()

    def sync(self) -> None:
        """Start checking workers added to the table and stop checking removed ones."""
        current = set(self.table)
        for worker in current - self._tasks.keys():
            self._kicks[worker] = asyncio.Event()
            self._tasks[worker] = asyncio.get_running_loop().create_task(self._run(worker))
        for worker in self._tasks.keys() - current:
            self._tasks.pop(worker).cancel()
            self._kicks.pop(worker, None)

    def kick(self, worker: WorkerState) -> None:
        """Check `worker` now instead of at its next interval (e.g. it was just started)."""
        event = self._kicks.get(worker)
        if event is not None:
            event.set()

    def hold(self, worker: WorkerState) -> None:
        """Stop recording checks of `worker` until release() (its owner probes it itself)."""
        self._held.add(worker)

    def release(self, worker: WorkerState) -> None:
        """Resume checking `worker`, starting now."""
        self._held.discard(worker)
        self.kick(worker)

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
        kick = self._kicks[worker]
        while True:
            kick.clear()
            if self._wanted(worker):
                pid, settings = worker.pid, self.settings
                started = time.perf_counter()  # uvloop's loop.time() counts whole milliseconds
                error = await probe(worker.host, worker.port, settings.path, settings.timeout)
                if worker.pid == pid and self._wanted(worker) and self.table.get(*worker.key) is worker:
                    if error:
                        log.debug("check of %s failed: %s", worker.address, error)
                    self.table.record_check(worker, error is None, time.perf_counter() - started, error or "")
                    if self.on_result is not None:
                        self.on_result(worker)
            if kick.is_set():
                continue
            try:
                await asyncio.wait_for(kick.wait(), self.settings.interval)
            except asyncio.TimeoutError:
                pass
