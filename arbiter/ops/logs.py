"""Logging of the master and its workers: one destination (stderr or a file), reopened on USR1.

With a log file, workers' output is piped through the master so that a reopen (log rotation)
covers every line; with stderr, workers simply inherit it.
"""
from __future__ import annotations

import asyncio
import errno
import logging
import math
import os
import subprocess
import sys
import time
from typing import Callable

from fileapp import logs as worker_logs

from ..config import LoggingConfig

log = logging.getLogger("gows.logs")

MAX_RELAYED_LINE = 65536  # bytes of a worker's output held at most while its line is not ended


def open_append(path: str | os.PathLike) -> int:
    """A descriptor appending to the log file `path` (created when missing), for the error log and
    the access log alike. It is opened without blocking: a plain open() of a FIFO that no process
    reads waits for a reader for ever, and a log moved away and replaced by one before a USR1 hung
    the master's loop in its reopen (no health check, no admin answer, no signal handled, TERM
    included). Such a FIFO fails at once here (ENXIO, said plainly); writes block as before."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NONBLOCK, 0o666)
    except OSError as e:
        if e.errno == errno.ENXIO:
            raise OSError(errno.ENXIO, "a FIFO that no process reads", str(path)) from None
        raise
    os.set_blocking(fd, True)
    return fd


class LogFileHandler(logging.FileHandler):
    """logging's FileHandler, opening its file (at start and at each reopen) with open_append."""

    def _open(self):  # (logging's hook: the stream of self.baseFilename)
        return open(open_append(self.baseFilename), self.mode, encoding=self.encoding, errors=self.errors)


class LogSink:
    """The master's log handler plus the relay of workers' output into the same file."""

    def __init__(self, settings: LoggingConfig) -> None:
        self.handler: logging.Handler | None = None
        self.apply(settings)

    def apply(self, settings: LoggingConfig) -> None:
        """Install (or switch to) the handler and level of `settings`; OSError if the file cannot be opened."""
        if settings.file is not None:
            handler: logging.Handler = LogFileHandler(settings.file, encoding="utf-8")
        else:
            handler = logging.StreamHandler(sys.stderr)
        # The workers' own format (fileapp.logs), so that master and workers read as one program.
        self.handler = worker_logs.configure(settings.format, settings.level, handler=handler)
        self.settings = settings

    def reopen(self) -> None:
        """Reopen the log file (after rotation); a no-op on stderr."""
        handler = self.handler
        if isinstance(handler, logging.FileHandler):
            with handler.lock:
                try:
                    fresh = handler._open()
                except OSError as e:
                    log.error("cannot reopen %s: %s; still writing to the old file", handler.baseFilename, e.strerror)
                    return
                old, handler.stream = handler.stream, fresh
                if old is not None:
                    old.close()
            log.info("reopened log file %s", handler.baseFilename)

    @property
    def worker_stdout(self) -> int | None:
        """What a worker's stdout/stderr go to: a pipe to relay (log file) or inherited (stderr)."""
        return subprocess.PIPE if isinstance(self.handler, logging.FileHandler) else None

    async def relay(self, stream: asyncio.StreamReader) -> None:
        """Copy a worker's (or a proxy's) output into the current log file, whole lines at a time;
        a line longer than MAX_RELAYED_LINE goes in pieces of that size, each ended as a line:
        output that never says newline (a dump of binary data) must not grow the master's memory."""
        pending = b""
        while True:
            chunk = await stream.read(65536)
            if not chunk:
                break
            pending += chunk
            cut = pending.rfind(b"\n") + 1
            if not cut and len(pending) >= MAX_RELAYED_LINE:
                self._write(pending + b"\n")
                pending = b""
            elif cut:
                self._write(pending[:cut])
                pending = pending[cut:]
        if pending:
            self._write(pending + b"\n")

    def _write(self, data: bytes) -> None:
        handler = self.handler
        stream = getattr(handler, "stream", None)
        if stream is None:
            return
        with handler.lock:
            stream.flush()
            try:
                os.write(stream.fileno(), data)
            except OSError:
                pass  # a full disk must not take the master down; the master's own lines report it


class Throttle:
    """Rate limit for the log lines about one recurring problem: the first occurrence is reported
    at once, later ones at most once per `interval` seconds with how many there were meanwhile,
    so a failure repeating thousands of times a second costs a line per interval, not one each.

    Not thread-safe: each instance belongs to one thread.
    """

    def __init__(self, interval: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self.clock = clock
        self.pending = 0  # occurrences not reported yet
        self._next = -math.inf

    def due(self, count: int = 1) -> int:
        """Note `count` occurrences; how many to report now (0: hold the line back)."""
        self.pending += count
        now = self.clock()
        if now < self._next:
            return 0
        self._next = now + self.interval
        reported, self.pending = self.pending, 0
        return reported

    def flush(self) -> int:
        """The problem is over: the occurrences not reported yet; the next one is reported at once."""
        reported, self.pending = self.pending, 0
        self._next = -math.inf
        return reported
