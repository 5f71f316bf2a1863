"""How a response leaves gows' worker without a serving thread ever waiting for its client.

A thread sends what the socket takes at once (a head and its body in one gathering sendmsg,
files with sendfile). What a slow client has not taken yet is left with the connection as a
Transfer, and the worker's poller finishes it whenever the socket turns writable: so a few slow
readers cannot take every thread and starve health checks and other clients. Files in a
transfer are kept open on a dup of their descriptor, since gunicorn closes the response's file
when the request ends. The request is over for gunicorn (access log, keep-alive) when
handle_request returns; sending the rest is the worker's business.
"""
from __future__ import annotations

import errno
import io
import os
import select
import socket
import threading
from collections import deque
from typing import Sequence

from gunicorn.http import wsgi as gunicorn_wsgi
from gunicorn.util import has_fileno

# Seconds a client may take nothing at all of a response before the worker gives up on it.
WRITE_TIMEOUT = 30.0
# Bytes of a many-part streamed body kept for a slow client: the app would fill memory if every
# part were kept, so past this the thread waits for the client after all. fileapp's own bodies
# (one byte string, files, multipart ranges as file ranges) never get there.
HELD_LIMIT = 1 << 20
_IOV_MAX = 64  # byte strings per sendmsg
_LAST_CHUNK = b"0\r\n\r\n"


class FileRange:
    """`left` bytes of an open file from `offset`, sent with sendfile."""

    __slots__ = ("fd", "offset", "left", "owned")

    def __init__(self, fd: int, offset: int, count: int) -> None:
        self.fd, self.offset, self.left = fd, offset, count
        self.owned = False  # fd is our own dup, closed with this range

    def send(self, sock: socket.socket) -> int:
        """Send what the socket takes now; the number of bytes sent."""
        sock.setblocking(False)  # sendfile has no MSG_DONTWAIT
        try:
            sent = os.sendfile(sock.fileno(), self.fd, self.offset, self.left)
        except BlockingIOError:
            return 0
        finally:
            sock.setblocking(True)
        if not sent:  # the Content-Length sent can no longer be kept
            raise OSError(errno.ENODATA, "file shrank while being sent")
        self.offset += sent
        self.left -= sent
        return sent

    def own(self) -> None:
        if not self.owned:
            self.fd = os.dup(self.fd)
            self.owned = True

    def close(self) -> None:
        if self.owned:
            self.owned = False
            os.close(self.fd)


class Transfer:
    """What the client has not taken yet of one response: byte strings and file ranges, in order."""

    __slots__ = ("_parts", "held", "sent")

    def __init__(self) -> None:
        self._parts: deque[memoryview | FileRange] = deque()
        self.held = 0  # bytes of byte strings kept (a file range stays on disk)
        self.sent = 0  # bytes sent so far: what tells progress

    def __bool__(self) -> bool:
        """Whether anything is left to send."""
        return bool(self._parts)

    def add(self, buffers: Sequence[bytes], skip: int = 0) -> None:
        """Append `buffers` but their first `skip` bytes (sent already); no copy is made."""
        for data in buffers:
            size = len(data)
            if skip >= size:
                skip -= size
                continue
            self._parts.append(memoryview(data)[skip:])
            self.held += size - skip
            skip = 0

    def add_file(self, fd: int, offset: int, count: int) -> None:
        if count > 0:
            self._parts.append(FileRange(fd, offset, count))

    def send(self, sock: socket.socket) -> bool:
        """Send what the socket takes without waiting; True once nothing is left."""
        parts = self._parts
        while parts:
            first = parts[0]
            if type(first) is FileRange:
                self.sent += first.send(sock)
                if first.left:
                    return False
                parts.popleft()
                first.close()
                continue
            views = []
            for part in parts:
                if type(part) is FileRange or len(views) == _IOV_MAX:
                    break
                views.append(part)
            try:
                sent = sock.sendmsg(views, (), socket.MSG_DONTWAIT)
            except BlockingIOError:
                return False
            self.sent += sent
            self.held -= sent
            for view in views:
                if sent < len(view):
                    parts[0] = view[sent:]
                    return False
                sent -= len(view)
                parts.popleft()
        return True

    def finish(self, sock: socket.socket, timeout: float) -> None:
        """Send everything from this thread, waiting at most `timeout` seconds at a time for the
        client to take more (for when the rest cannot be left with the connection)."""
        poller = select.poll()
        poller.register(sock, select.POLLOUT)
        while not self.send(sock):
            if not poller.poll(timeout * 1000):
                raise TimeoutError(f"the client took nothing for {timeout:g} s")

    def own(self) -> None:
        """Keep the files open on descriptors of our own (the app closes its own ones)."""
        for part in self._parts:
            if type(part) is FileRange:
                part.own()

    def close(self) -> None:
        """Forget what is left, closing our descriptors."""
        while self._parts:
            part = self._parts.pop()
            if type(part) is FileRange:
                part.close()
        self.held = 0


class _Parked(threading.local):
    transfer: Transfer | None = None


# gunicorn's handle_request keeps its Response to itself: the rest a response leaves is handed
# to the serving thread here.
_parked = _Parked()


def take_parked() -> Transfer | None:
    """The rest of the response this thread has just served, if the client has not taken it all."""
    transfer = _parked.transfer
    if transfer is not None:
        _parked.transfer = None
    return transfer


def drop_parked() -> None:
    """Forget the rest of a response whose request failed after all."""
    transfer = take_parked()
    if transfer is not None:
        transfer.close()


class CoalescingResponse(gunicorn_wsgi.Response):
    """gunicorn's Response, writing without waiting for the client.

    The head is held back until the first body bytes, so both leave in one gathering sendmsg:
    one syscall, no copy, and no small header segment on its own (a response without body bytes
    sends its head when it closes). Whatever the socket does not take at once is kept as a
    Transfer (the body's own bytes, not a copy) and handed to the worker when the response
    closes. Files go with sendfile; a body object with `segments()` (fileapp's multipart
    ranges) goes as its byte strings and file ranges.
    """

    write_timeout = WRITE_TIMEOUT  # the worker's, for when a thread must wait after all
    held: bytes | None = None  # the head, built but not sent yet
    rest: Transfer | None = None  # what the client has not taken yet

    def send_headers(self):
        if self.headers_sent:
            return
        lines = self.default_headers()  # then as gunicorn's own send_headers
        lines.extend(["%s: %s\r\n" % (k, v) for k, v in self.headers])
        self.held = ("%s\r\n" % "".join(lines)).encode("latin-1")
        self.headers_sent = True

    def _emit_body(self, data):
        head = self.held
        if self.chunked:
            buffers = [b"%X\r\n" % len(data), data, b"\r\n"]
            size = len(data) + len(buffers[0]) + 2
        else:
            buffers, size = [data], len(data)
        if head is not None:
            self.held = None
            buffers.insert(0, head)
            size += len(head)
        self._send(buffers, size)

    def _send(self, buffers: list[bytes], size: int) -> None:
        """Send `buffers` (`size` bytes in all) after anything still waiting, as far as the
        socket takes them now; keep the rest."""
        rest = self.rest
        if rest is None:
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

    def sendfile(self, respiter):
        if not self.can_sendfile():  # (sendfile switched off in gunicorn's config)
            return False
        filelike = respiter.filelike
        segments = getattr(filelike, "segments", None)
        if segments is not None and not self.chunked:
            parts = segments()
        elif has_fileno(filelike):
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
        if self._omits_body:  # HEAD: the head alone, sent on close
            return True
        rest = self.rest = self.rest or Transfer()
        if self.held is not None:
            rest.add([self.held])
            self.held = None
        if self.chunked:
            rest.add([b"%X\r\n" % sum(stop - start for _, start, stop in parts)])
        for part in parts:
            if isinstance(part, bytes):
                rest.add([part])
            else:
                fd, start, stop = part
                rest.add_file(fd, start, stop - start)
        if self.chunked:
            rest.add([b"\r\n"])
        if rest.send(self.sock):
            self.rest = None
        return True

    def close(self):
        self.send_headers()
        buffers = [] if self.held is None else [self.held]
        self.held = None
        if self.chunked:
            buffers.append(_LAST_CHUNK)
        if buffers:
            self._send(buffers, sum(map(len, buffers)))
        rest, self.rest = self.rest, None
        if not rest:
            return
        try:
            rest.own()
        except OSError:  # no descriptor to spare: this thread sends the rest after all
            try:
                rest.finish(self.sock, self.write_timeout)
            finally:
                rest.close()
            return
        _parked.transfer = rest
