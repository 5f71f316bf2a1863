"""The master's access log: Apache's combined format plus the request time in microseconds
(Apache's %D), one line per response the front proxy completes.

The event loop only queues the raw fields of a line (a tuple, no formatting); a writer thread
formats them and writes in batches, so a slow disk never stalls requests. The queue is bounded:
past MAX_QUEUED unwritten lines, new ones are counted as dropped instead of growing memory
without limit; lines a write fails on (a full disk) are counted as dropped too. Either trouble
is logged when it starts, then at most once per REPORT_INTERVAL with the count lost meanwhile:
a full disk must not turn every request into an error line. SIGUSR1 reopens the file
(logrotate) in the writer thread.
"""
from __future__ import annotations

import logging
import os
import queue
import re
import select
import stat
import sys
import threading
import time
from pathlib import Path
from typing import Any

from ..config import STDOUT, ConfigError
from .logs import Throttle, open_append

log = logging.getLogger("gows.access")

MAX_QUEUED = 65536  # unwritten lines held at most (a few MiB)
BATCH = 512  # lines formatted and written per write call at most
REPORT_INTERVAL = 10.0  # seconds between two log lines about the same trouble at most
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_REOPEN, _STOP = object(), object()
_UNSAFE = re.compile(rb'[^\x20-\x7e]|["\\]')


def _escape(value: bytes) -> str:
    """Quote-safe, printable text as Apache writes request fields (\\" and \\xhh)."""
    if _UNSAFE.search(value) is not None:
        value = _UNSAFE.sub(lambda m: b'\\"' if m.group() == b'"' else b"\\\\" if m.group() == b"\\"
                            else b"\\x%02x" % m.group()[0], value)
    return value.decode("ascii")


def _timestamp(t: float) -> str:
    """Apache's %t: [10/Oct/2000:13:55:36 -0700], local time, month names not localised."""
    tm = time.localtime(t)
    offset = tm.tm_gmtoff // 60
    sign = "-" if offset < 0 else "+"
    offset = abs(offset)
    return (f"[{tm.tm_mday:02d}/{_MONTHS[tm.tm_mon - 1]}/{tm.tm_year}:{tm.tm_hour:02d}:{tm.tm_min:02d}:"
            f"{tm.tm_sec:02d} {sign}{offset // 60:02d}{offset % 60:02d}]")


def _header(fwd: list[bytes], name: bytes) -> bytes | None:
    """A request header from the proxy's forwarded-header list (name, ": ", value, CRLF)*."""
    for i in range(0, len(fwd), 4):
        if fwd[i].lower() == name:
            return fwd[i + 2]
    return None


def format_line(peer: bytes, end: float, seconds: float, method: bytes, target: bytes, http10: bool,
                status: int, length: Any, fwd: list[bytes]) -> str:
    """One combined-format line (with the trailing request time in microseconds)."""
    referer = _header(fwd, b"referer")
    agent = _header(fwd, b"user-agent")
    if isinstance(length, bytes):
        length = int(length)
    size = str(length) if length else "-"
    return (f'{peer.decode("ascii", "replace")} - - {_timestamp(end - seconds)} '
            f'"{_escape(method)} {_escape(target)} HTTP/1.{0 if http10 else 1}" {status or "-"} {size} '
            f'"{_escape(referer) if referer is not None else "-"}" '
            f'"{_escape(agent) if agent is not None else "-"}" {round(seconds * 1e6)}\n')


def open_target(target: Path | None) -> Any:
    """The binary stream for `target`: a file opened for appending, or None for stdout."""
    if target is None:
        return None
    return open(open_append(target), "ab", buffering=0)


class AccessLog:
    """Queue of pending lines plus the thread that writes them to a file or stdout."""

    @classmethod
    def open(cls, setting: Path | str | None) -> AccessLog | None:
        """The access log of the `logging.accessLog` setting (None: off; "-": stdout; a path);
        ConfigError naming the key when the file cannot be opened."""
        if setting is None:
            return None
        target = None if setting == STDOUT else Path(setting)
        try:
            return cls(target)
        except OSError as e:
            raise ConfigError(f"logging.accessLog: cannot open {target}: {e.strerror or e}") from None

    def __init__(self, target: Path | None) -> None:
        self.target = target  # None: stdout
        self.stream = open_target(target)
        # Each counter has one writer thread; readers (status, metrics) only read.
        self.queue_full = 0  # lines dropped by the loop: the writer was MAX_QUEUED lines behind
        self.write_failed = 0  # lines the writer could not write
        self.error = ""  # why the last write failed; "" while writes succeed
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._seen_full = 0
        self._behind = Throttle(REPORT_INTERVAL)
        self._failing = Throttle(REPORT_INTERVAL)
        self._thread = threading.Thread(target=self._run, name="gows access log", daemon=True)
        self._thread.start()

    @property
    def dropped(self) -> int:
        """Lines lost so far, for whatever reason."""
        return self.queue_full + self.write_failed

    # -- the loop's side ---------------------------------------------------------------------
    def observe(self, client: Any, req: Any) -> None:
        """The proxy's per-response hook while the log is on: queue the line's fields."""
        q = self._queue
        if q.qsize() >= MAX_QUEUED:
            self.queue_full += 1
            return
        q.put((client.remote(), time.time(), (time.perf_counter_ns() - req.born) / 1e9, req.method, req.target, req.http10,
               req.status, req.length, req.fwd))

    def reopen(self) -> None:
        """Reopen the file (after logrotate moved it); done by the writer, in order with the lines."""
        self._queue.put(_REOPEN)

    def close(self, wait: bool = True, timeout: float = 5.0) -> None:
        """Let the writer write what is queued and close the file; `wait` for it (up to `timeout`)."""
        self._queue.put(_STOP)
        if wait:
            self._thread.join(timeout)

    # -- the writer thread ---------------------------------------------------------------------
    def _run(self) -> None:
        q = self._queue
        while True:
            item = q.get()
            lines: list[str] = []
            control = None
            while True:
                if item is _REOPEN or item is _STOP:
                    control = item
                    break
                try:
                    lines.append(format_line(*item))
                except Exception:  # one odd request must not end the log
                    log.exception("cannot format an access log line")
                if len(lines) >= BATCH or q.empty():
                    break
                item = q.get()
            if lines:
                self._write("".join(lines).encode("ascii", "replace"))
            if self.queue_full != self._seen_full:
                lost = self._behind.due(self.queue_full - self._seen_full)
                self._seen_full = self.queue_full
                if lost:
                    log.warning("access log: %d lines dropped: the writer fell %d lines behind (%d dropped in all; "
                                "reported at most every %gs)", lost, MAX_QUEUED, self.dropped, REPORT_INTERVAL)
            if control is _STOP:
                behind, failed = self._behind.flush(), self._failing.flush()
                if behind or failed:
                    log.error("access log: %d more lines were lost before it was closed (%s)", behind + failed,
                              self.error or "the writer fell behind")
                if self.stream is not None:
                    self.stream.close()
                return
            if control is _REOPEN:
                self._reopen()

    def _write(self, data: bytes) -> None:
        """Write whole lines; every line not (completely) written counts as dropped.

        Every proxy process appends to the same log. A file opened for appending takes each
        write whole; a pipe or terminal (stdout) only up to PIPE_BUF bytes, so there the lines
        go in pieces of at most that many, cut between lines, and never tear."""
        fd = self.stream.fileno() if self.stream is not None else sys.stdout.fileno()
        view = memoryview(data)
        written = 0
        piece = len(data) if self._whole_writes(fd) else select.PIPE_BUF
        try:
            while written < len(data):
                end = len(data)
                if end - written > piece:
                    cut = data.rfind(b"\n", written, written + piece)
                    end = cut + 1 if cut >= 0 else data.find(b"\n", written + piece) + 1 or len(data)
                while written < end:
                    written += os.write(fd, view[written:end])
        except OSError as e:
            lost = data.count(b"\n", written)  # a line cut short is lost too
            self.write_failed += lost
            self.error = e.strerror or str(e)
            reported = self._failing.due(lost)
            if reported:
                log.error("access log: cannot write to %s: %s; %d lines lost (%d dropped in all; reported at "
                          "most every %gs)", self.target or "stdout", self.error, reported, self.dropped,
                          REPORT_INTERVAL)
            return
        if self.error:
            self.error = ""
            unreported = self._failing.flush()
            log.warning("access log: writing to %s again%s", self.target or "stdout",
                        f" after {unreported} more lines were lost" if unreported else "")

    @staticmethod
    def _whole_writes(fd: int) -> bool:
        """Whether one write of any size lands whole among other processes' (a regular file)."""
        try:
            return stat.S_ISREG(os.fstat(fd).st_mode)
        except OSError:
            return False

    def _reopen(self) -> None:
        if self.target is None:
            return
        try:
            fresh = open_target(self.target)
        except OSError as e:
            log.error("access log: cannot reopen %s: %s; still writing to the old file", self.target, e.strerror or e)
            return
        old, self.stream = self.stream, fresh
        old.close()
        log.info("reopened access log %s", self.target)
