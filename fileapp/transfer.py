"""What a slow client has not taken yet of a response: byte strings and file ranges, in order.

A serving thread sends what the socket takes at once (fileapp.response); the rest is kept here,
with the connection, and sent by whichever thread finds the socket writable next, so no thread
ever waits for a client. Files are kept open on a dup of their descriptor (`own`), since
gunicorn closes the response's file when the request ends.
"""
from __future__ import annotations

import errno
import os
import select
import socket
from collections import deque
from typing import Sequence

_IOV_MAX = 64  # byte strings per sendmsg


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
    """What the client has not taken yet of one response (or of pipelined answers held to leave
    together, fileapp.response): byte strings and file ranges, in order."""

    __slots__ = ("_parts", "held", "sent", "_added")

    def __init__(self) -> None:
        self._parts: deque[memoryview | FileRange] = deque()
        self.held = 0  # bytes of byte strings kept (a file range stays on disk)
        self.sent = 0  # bytes sent so far: what tells progress
        self._added = 0  # parts ever added (see mark)

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
            self._added += 1
            self.held += size - skip
            skip = 0

    def add_file(self, fd: int, offset: int, count: int) -> None:
        if count > 0:
            self._parts.append(FileRange(fd, offset, count))
            self._added += 1

    def mark(self) -> int:
        """Where what is added from now on begins, for drop_since."""
        return self._added

    def drop_since(self, mark: int) -> None:
        """Forget what was added since `mark` (a response given up), keeping what was before."""
        parts = self._parts
        for _ in range(min(len(parts), self._added - mark)):
            part = parts.pop()
            if type(part) is FileRange:
                part.close()
            else:
                self.held -= len(part)
        self._added = mark

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
