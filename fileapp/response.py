"""How a response leaves gows' worker without a serving thread ever waiting for its client.

The app's status and headers become the head's bytes once per status, header list and
connection outcome; only the Date line (made once a second) is put in per response. The head
waits for the first body bytes, so both leave in one gathering sendmsg. Files
go with sendfile. What a slow client has not taken yet is returned to the worker as a Transfer
(fileapp.transfer), which its poller finishes whenever the socket turns writable: so a few slow
readers cannot take every thread and starve health checks and other clients.

The rules are gunicorn's Response's, kept here so that gunicorn's per-request machinery (about
40 µs a request) is not: header names and values checked, hop-by-hop headers dropped, no body
on HEAD/1xx/204/304, no Content-Length on 1xx/204, never more than Content-Length bytes,
chunked framing for HTTP/1.1 bodies of unknown length, "Connection: close" when the length is
unknown otherwise.
"""
from __future__ import annotations

import io
import logging
import os
import socket
import time

from . import gunicorn_compat as compat
from .headers import Headers
from .transfer import Transfer

log = logging.getLogger("fileapp.response")

# Seconds a client may take nothing at all of a response before the worker gives up on it.
WRITE_TIMEOUT = 30.0
# Bytes of a many-part streamed body kept for a slow client: the app would fill memory if every
# part were kept, so past this the thread waits for the client after all. fileapp's own bodies
# (one byte string, files, multipart ranges as file ranges) never get there.
HELD_LIMIT = 1 << 20
# Bytes of answers held for the answers after them (a bound: past it they all leave at once).
HOLD_LIMIT = 64 * 1024
_LAST_CHUNK = b"0\r\n\r\n"
_SERVER_LINE = "Server: %s\r\n" % compat.SERVER
_NAMES_KNOWN = 512  # header names remembered as valid tokens (a bound: apps may invent names)

# Header lists remembered as checked, and heads as formatted: one per file version served, so a
# site's few thousand files each get theirs once (at 1024, the 4096 files of `make bench`'s
# many-files load cleared them over and over: 13% of the worker's time). A bound all the same,
# as apps may vary headers per request: about 1.7 KB a file for both, 14 MB when full.
_PREPARED_LIMIT = 8192

_valid_names: set[str] = set()
_date: tuple[int, bytes] = (0, b"")
# Heads by all they are made of but their Date line: (the bytes before it, the bytes after it).
# The same few (a status, a prepared header list, keep-alive or close) answer most requests.
_heads: dict[tuple, tuple[bytes, bytes]] = {}
# What start_response makes of a header list, by its content: the headers kept, Content-Length,
# whether it upgrades, and their lines for the head. fileapp answers every request for a file
# version with the same list, so its head is checked and formatted once per version.
_prepared: dict[tuple, tuple[Headers, int | None, bool, str]] = {}
_valid_statuses: set[str] = set()


def _remember(memo: dict, key: tuple, value: object) -> None:
    """Keep `value` under `key` in `memo`, forgetting all it holds first when it is full."""
    if len(memo) >= _PREPARED_LIMIT:
        memo.clear()
    memo[key] = value


def date_line() -> bytes:
    """The Date header line, made once a second (a tuple swap: safe from any thread)."""
    global _date
    now = int(time.time())
    if _date[0] != now:
        _date = (now, b"Date: %s\r\n" % compat.http_date(now).encode("latin-1"))
    return _date[1]


def _check_name(name) -> None:
    if name in _valid_names:
        return
    if not isinstance(name, str):
        raise TypeError("%r is not a string" % name)
    if not compat.TOKEN_RE.fullmatch(name):
        raise compat.InvalidResponseHeaderName("%r" % name)
    if len(_valid_names) < _NAMES_KNOWN:
        _valid_names.add(name)


def _line(header: tuple[str, str]) -> str:
    return "%s: %s\r\n" % header


def _prepare(headers) -> tuple[Headers, int | None, bool, str]:
    """Check an app's header list as gunicorn does (TypeError, ValueError or gunicorn's
    InvalidResponseHeader[Name]); the headers kept (hop-by-hop ones dropped, values stripped),
    Content-Length, whether it upgrades, and the kept headers' lines."""
    kept: list[tuple[str, str]] = []
    length = None
    upgrade = False
    value_ok = compat.HEADER_VALUE_RE.fullmatch
    for name, value in headers:
        _check_name(name)
        if not isinstance(value, str):
            raise TypeError("%r is not a string" % value)
        if not value_ok(value):
            raise compat.InvalidResponseHeader("%r" % name)  # (the value may be secret)
        value = value.strip(" \t")
        lname = name.lower()
        if lname == "content-length":
            length = int(value)
        elif lname in compat.HOP_HEADERS:
            if lname == "connection":
                if value.lower() == "upgrade":
                    upgrade = True
            elif lname == "upgrade" and value.lower() == "websocket":
                kept.append((name, value))
            continue
        kept.append((name, value))
    return tuple(kept), length, upgrade, "".join(map(_line, kept))


class Response:
    """One response: start_response, write and close for the app, as gunicorn's Response."""

    __slots__ = ("req", "sock", "status", "status_code", "headers", "response_length", "chunked",
                 "must_close", "upgrade", "headers_sent", "sent", "omits_body", "held", "rest",
                 "write_timeout", "lines", "hold", "tried", "_mark")

    def __init__(self, req, sock: socket.socket, write_timeout: float = WRITE_TIMEOUT,
                 before: Transfer | None = None) -> None:
        """`before`: the answers before this one, held for it (not offered to the socket yet)."""
        self.req, self.sock = req, sock
        self.status: str | None = None
        self.status_code: int | None = None
        self.headers: Headers = ()
        self.response_length: int | None = None
        self.chunked = False
        self.must_close = False
        self.upgrade = False
        self.headers_sent = False
        self.sent = 0  # body bytes, for the access log
        self.omits_body = False
        self.held: bytes | None = None  # the head, built but not sent yet
        self.rest: Transfer | None = before  # what the client has not taken (or been offered) yet
        # Whether this answer may wait to leave with the next one (set by fileapp.serving when
        # the app gave it whole and another request is ready); past HOLD_LIMIT it leaves anyway.
        self.hold = False
        self.tried = False  # whether anything was offered to the socket yet
        self._mark = None if before is None else before.mark()  # where this answer's parts begin
        self.write_timeout = write_timeout  # for when a thread must wait after all
        self.lines: str | None = None  # the header lines of `headers`, when prepared

    def force_close(self) -> None:
        self.must_close = True

    def should_close(self) -> bool:
        if self.must_close or not self.req.keep_alive:
            return True
        if self.response_length is not None or self.chunked or self.omits_body:
            return False
        return True  # a body delimited by the end of the connection

    def start_response(self, status, headers, exc_info=None):
        if exc_info:
            try:
                if self.status and self.headers_sent:
                    raise exc_info[1].with_traceback(exc_info[2])
            finally:
                exc_info = None
            self.headers, self.response_length, self.upgrade, self.lines = (), None, False, None
        elif self.status is not None:
            raise AssertionError("Response headers already set!")
        if status not in _valid_statuses:
            if not isinstance(status, str):
                raise TypeError("%r is not a string" % status)
            if not compat.STATUS_RE.fullmatch(status):
                raise ValueError("Invalid status %r" % status)
            if len(_valid_statuses) < _PREPARED_LIMIT:
                _valid_statuses.add(status)
        self.status = status
        code = self.status_code = int(status[:3])
        try:
            key: tuple | None = tuple(headers)
            prepared = _prepared.get(key)
        except TypeError:  # (a header given as a list: checked below, not remembered)
            key = prepared = None
        if prepared is None:
            prepared = _prepare(headers)
            if key is not None:
                _remember(_prepared, key, prepared)
        self.headers, self.response_length, self.upgrade, self.lines = prepared
        self.omits_body = self.req.method == "HEAD" or code in (204, 304) or 100 <= code < 200
        if code == 204 or 100 <= code < 200:  # RFC 9110 6.4.2: no Content-Length there
            self.headers = tuple((k, v) for k, v in self.headers if k.lower() != "content-length")
            self.response_length = self.lines = None
        self.chunked = (self.response_length is None and self.req.version > (1, 0)
                        and not self.omits_body)
        return self.write

    def send_headers(self) -> None:
        """Build the head; it leaves with the first body bytes, or when the response closes."""
        if self.headers_sent:
            return
        connection = ("upgrade" if self.upgrade else "close" if self.should_close()
                      else "keep-alive")
        key = (self.req.version[1], self.status, connection, self.chunked, self.lines)
        parts = _heads.get(key) if self.lines is not None else None
        if parts is None:
            parts = (("HTTP/1.%d %s\r\n%s" % (key[0], self.status, _SERVER_LINE)).encode("latin-1"),
                     ("Connection: %s\r\n%s%s\r\n" % (
                         connection, "Transfer-Encoding: chunked\r\n" if self.chunked else "",
                         self.lines if self.lines is not None else "".join(map(_line, self.headers)))
                      ).encode("latin-1"))
            if self.lines is not None:
                _remember(_heads, key, parts)
        self.held = parts[0] + date_line() + parts[1]
        self.headers_sent = True

    def write(self, data: bytes) -> None:
        self.send_headers()
        if not isinstance(data, bytes):
            raise TypeError("%r is not a byte" % data)
        if self.omits_body:
            return
        size = len(data)
        if self.response_length is not None:
            if self.sent >= self.response_length:
                return  # never more than Content-Length
            if size > self.response_length - self.sent:
                size = self.response_length - self.sent
                data = data[:size]
        if not size:
            return
        self.sent += size
        if self.chunked:
            buffers = [b"%X\r\n" % size, data, b"\r\n"]
            size += len(buffers[0]) + 2
        else:
            buffers = [data]
        head = self.held
        if head is not None:
            self.held = None
            buffers.insert(0, head)
            size += len(head)
        self._send(buffers, size)

    def _send(self, buffers: list[bytes], size: int) -> None:
        """Send `buffers` (`size` bytes in all) after anything still waiting, as far as the
        socket takes them now; keep the rest."""
        rest = self.rest
        if self.hold or (rest is not None and not self.tried):  # holding, or answers held for it
            if rest is None:
                self.rest = rest = Transfer()
            rest.add(buffers)
            if (not self.hold or rest.held > HOLD_LIMIT) and self._offer(rest):
                self.rest = None
            return
        if rest is None:
            self.tried = True
            try:
                sent = self.sock.sendmsg(buffers, (), socket.MSG_DONTWAIT)
            except BlockingIOError:
                sent = 0
            if sent == size:
                return
            self.rest = rest = Transfer()
            rest.add(buffers, sent)
            return
        if rest.held > HELD_LIMIT:
            rest.finish(self.sock, self.write_timeout)
        rest.add(buffers)

    def write_file(self, respiter) -> None:
        """A wsgi.file_wrapper body: sent with sendfile when it has a descriptor."""
        if not self.sendfile(respiter):
            for item in respiter:
                self.write(item)

    def sendfile(self, respiter) -> bool:
        filelike = respiter.filelike
        segments = getattr(filelike, "segments", None)
        if segments is not None and not self.chunked:
            parts = segments()  # fileapp's multipart ranges: byte strings and file ranges
        elif compat.has_fileno(filelike):
            fd = filelike.fileno()
            try:  # as gunicorn's: from the current offset, Content-Length bytes or to the end
                offset = os.lseek(fd, 0, os.SEEK_CUR)
                count = self.response_length
                if count is None:
                    count = os.fstat(fd).st_size - offset
            except (OSError, io.UnsupportedOperation):
                return False
            parts = [(fd, offset, offset + count)]
        else:
            return False
        self.send_headers()
        if self.omits_body:  # HEAD: the head alone, sent on close
            return True
        rest = self.rest = self.rest or Transfer()
        if self.held is not None:
            rest.add([self.held])
            self.held = None
        size = sum(len(p) if isinstance(p, bytes) else p[2] - p[1] for p in parts)
        self.sent += size
        if self.chunked:
            rest.add([b"%X\r\n" % size])
        for part in parts:
            if isinstance(part, bytes):
                rest.add([part])
            else:
                fd, start, stop = part
                rest.add_file(fd, start, stop - start)
        if self.chunked:
            rest.add([b"\r\n"])
        if self._offer(rest):
            self.rest = None
        return True

    def _offer(self, rest: Transfer) -> bool:
        """Stop holding: offer `rest` (answers held for this one included) to the socket now,
        without waiting; whether all of it left (the answers held then too: a rest kept from
        now on is this answer's own, with no mark to keep before)."""
        self.hold, self.tried = False, True
        if rest.send(self.sock):
            self._mark = None
            return True
        return False

    def close(self) -> Transfer | None:
        """End the response; what the client has not taken yet, on descriptors of its own (the
        app closes its files), for the worker's poller to send, or None."""
        self.send_headers()
        buffers = [] if self.held is None else [self.held]
        self.held = None
        if self.chunked:
            buffers.append(_LAST_CHUNK)
        if buffers:
            self._send(buffers, sum(map(len, buffers)))
        rest, self.rest = self.rest, None
        if not rest:
            return None
        if not self.tried:  # held so far: for the next answer, or all leave now
            if self.hold and not self.should_close():
                return rest
            if self._offer(rest):
                return None
        try:
            rest.own()
        except OSError:  # no descriptor to spare: this thread sends the rest after all
            try:
                rest.finish(self.sock, self.write_timeout)
            finally:
                rest.close()
            return None
        return rest

    def discard(self) -> None:
        """Forget what is left of a response whose request failed after all."""
        if self.rest is not None:
            if self._mark is None:
                self.rest.close()
            else:  # the answers held for this one stay
                self.rest.drop_since(self._mark)
            self.rest = None
