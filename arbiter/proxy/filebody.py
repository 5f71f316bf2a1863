"""File bodies sent by the proxy itself, with sendfile: the bytes go from the page cache to the
client socket without passing through a worker or a Python buffer (fileapp.handoff tells how a
worker names the file).

The event loop's transport is bypassed for the body: once the transport has sent everything
written before (the head), sendfile writes straight to the socket, as much as it takes; when it
is full, a second descriptor of the socket (a dup: the loop refuses a writer on the transport's
own) is watched for room. Memory stays bounded whatever the file size or the client's speed:
the kernel holds what is in flight and at most about UNSENT_BYTES more (bound_unsent).

Over TLS the transport must encrypt every byte, so sendfile to the socket underneath would send
the file in clear text into the middle of a TLS stream: StreamSender reads the file a chunk at a
time into the transport instead, and stops while the transport asks it to (pause_writing), so
memory stays bounded there too (a chunk plus the transport's high-water mark).
"""
from __future__ import annotations

import errno
import functools
import os
import socket
from typing import Any, Callable

from fileapp.handoff import FileRef, open_verified, parse_file_header, same_file

# Bytes sent per turn of the event loop to one client, so that a fast reader of a big file
# cannot keep the others waiting.
TURN_BYTES = 4 * 2**20
CHUNK = 64 * 1024  # bytes read from the file per write into a TLS transport
# Bytes a client socket may hold not yet sent (TCP_NOTSENT_LOWAT). Without a bound the kernel
# lets a send buffer grow to tcp_wmem's maximum (4 MiB by default) for every slow reader, and
# on loopback the receiver's ACKs end up sending that backlog on the receiver's CPU; with it a
# sender tops its socket up as it drains (10 MiB downloads on loopback: about twice as fast at
# 16 to 128 KiB, less at 256 KiB, no faster from 1 MiB). 64 KiB still lets one client take
# about 500 Mbit/s when the loop answers a wakeup 1 ms late.
UNSENT_BYTES = 64 * 1024
# Socket errors that only mean the client went away.
CLIENT_GONE = frozenset({errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN})
# X-Gows-File values parsed lately: a worker names a file the same way until it changes, and
# parsing took a tenth of the proxy's time per body on a site of a few thousand files.
REFS_LIMIT = 8192


@functools.lru_cache(maxsize=REFS_LIMIT)
def file_ref(named: bytes) -> FileRef | None:
    """parse_file_header(named), remembered (the REFS_LIMIT values named last)."""
    return parse_file_header(named)


class _Carrier(socket.socket):
    """A socket object over a descriptor number whose sockets the event loop owns: it sends on
    whichever socket has the number at the time, and never closes it (not even when collected)."""

    __slots__ = ()

    def __del__(self) -> None:
        self.detach()


# One carrier per descriptor number, made once (at most the proxy's descriptor limit of them,
# about 100 bytes each): making a socket object per send took a getsockname and about 1.3 µs,
# 3.4% of a proxy's samples on a site of 64 KiB files.
_carriers: dict[int, _Carrier] = {}


def carrier(fd: int) -> _Carrier:
    """The carrier of descriptor number `fd` (its family only names it: send() is the same for
    IPv4, IPv6 and Unix clients)."""
    sock = _carriers.get(fd)
    if sock is None:
        sock = _carriers[fd] = _Carrier(socket.AF_INET, socket.SOCK_STREAM, 0, fd)
    return sock


def bound_unsent(sock: socket.socket) -> None:
    """Bound the unsent bytes of every connection `sock` (a listening TCP socket) accepts from now
    on: accepted sockets inherit the option."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT, UNSENT_BYTES)
    except OSError:  # a kernel without it (before 3.12): nothing changes
        pass


def open_file(ref: FileRef) -> int | None:
    """open_verified, with EMFILE and the like (the proxy's own shortage) as a plain refusal: the
    worker then sends the bytes itself."""
    try:
        return open_verified(ref)
    except OSError:
        return None


def file_unchanged(ref: FileRef) -> bool:
    """Whether the path `ref` names is still its file (a stat that follows no symlink in the
    last component, as open_verified opens): for an answer that opens no file (a head, a 304)."""
    try:
        return same_file(os.stat(ref.path, follow_symlinks=False), ref)
    except (OSError, ValueError):
        return False


class BodySender:
    """Sends a response head, then `count` bytes of the open file `fd` from `offset` as its body,
    to a client, then calls `done()`; calls `failed(reason, gone)` if the file shrank or the
    sending failed (`gone`: the client went away). Owns `fd`. Subclasses say how the bytes
    travel (start, pause, resume, cancel)."""

    __slots__ = ("loop", "transport", "fd", "offset", "left", "done", "failed", "progress")

    def __init__(self, loop: Any, transport: Any, fd: int, offset: int, count: int,
                 done: Callable[[], None], failed: Callable[[str, bool], None], progress: Callable[[], None]) -> None:
        self.loop = loop
        self.transport = transport
        self.fd = fd
        self.offset = offset
        self.left = count
        self.done = done
        self.failed = failed
        self.progress = progress  # called whenever bytes left: the client is still reading

    def cancel(self) -> None:
        """Stop (the client went away or the connection is being closed): let go of everything."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def _finish(self, failure: str | None, gone: bool) -> None:
        self.cancel()
        if failure is None:
            self.done()
        else:
            self.failed(failure, gone)


class FileSender(BodySender):
    """A BodySender that sendfiles to the client's socket underneath the transport."""

    __slots__ = ("sock", "watch")

    def __init__(self, loop: Any, transport: Any, fd: int, offset: int, count: int,
                 done: Callable[[], None], failed: Callable[[str, bool], None], progress: Callable[[], None]) -> None:
        super().__init__(loop, transport, fd, offset, count, done, failed, progress)
        self.sock = transport.get_extra_info("socket").fileno()
        self.watch = -1  # the dup of the socket watched for room, while waiting for it

    def start(self, head: bytes) -> None:
        transport = self.transport
        if 0 < self.left <= UNSENT_BYTES and head and not transport.get_write_buffer_size():
            head = self._send_more(head)
        if head:
            transport.write(head)
        if transport.get_write_buffer_size() or not self._send():
            self._wait()

    def _send_more(self, head: bytes) -> bytes:
        """Write `head` to the socket with MSG_MORE, so that the kernel holds it for the body: a
        body that fits in the socket at once then leaves with it, in one segment that wakes the
        client once (keep-alive 64 KiB files: 3% more req/s). A bigger body's head goes ahead
        alone, so that the client reads it while the rest is sent (ab 150 KB: 2% slower with
        MSG_MORE). Only with body bytes to follow: else the kernel keeps the head back for its
        cork timeout. Returns what the socket did not take (an error is the transport's to meet)."""
        try:
            sent = carrier(self.sock).send(head, socket.MSG_MORE)
        except OSError:
            sent = 0
        return head[sent:]

    def pause(self) -> None:
        """(The transport's buffer is full: only the head, which this sender waits for anyway.)"""

    def resume(self) -> None:
        pass

    def cancel(self) -> None:
        self._unwatch()
        super().cancel()

    def _wait(self) -> None:
        if self.watch < 0:
            try:
                self.watch = os.dup(self.sock)
            except OSError as exc:  # (EMFILE) no way to learn of room: the body cannot go on
                self._finish(f"no descriptor to wait for the client with: {exc.strerror}", False)
                return
            self.loop.add_writer(self.watch, self._writable)

    def _unwatch(self) -> None:
        if self.watch >= 0:
            self.loop.remove_writer(self.watch)
            os.close(self.watch)
            self.watch = -1

    def _writable(self) -> None:
        if self.fd < 0:
            return
        if self.transport.is_closing():
            self.cancel()
            return
        if self.transport.get_write_buffer_size():
            return  # the head is still on its way: the transport sends it first
        if self._send():
            self._unwatch()

    def _send(self) -> bool:
        """Send what the socket takes now (up to TURN_BYTES); True when the sender is finished
        (all sent, or failed), False when it must wait for room."""
        budget = TURN_BYTES
        sent_any = False
        try:
            while self.left and budget > 0:
                try:
                    sent = os.sendfile(self.sock, self.fd, self.offset, min(self.left, budget))
                except BlockingIOError:
                    return False
                if not sent:
                    self._finish(f"the file shrank: {self.left} bytes could not be sent", False)
                    return True
                sent_any = True
                self.offset += sent
                self.left -= sent
                budget -= sent
        except OSError as exc:
            self._finish(exc.strerror or errno.errorcode.get(exc.errno, str(exc)), exc.errno in CLIENT_GONE)
            return True
        finally:
            if sent_any:
                self.progress()
        if self.left:
            return False  # this turn's share is sent: wait for the next (the socket had room)
        self._finish(None, False)
        return True

class StreamSender(BodySender):
    """FileSender's counterpart for a transport that must see every byte (TLS): reads `count`
    bytes of `fd` from `offset` a CHUNK at a time and writes them to the transport, as long as
    the transport does not ask to pause (the client protocol forwards pause/resume)."""

    __slots__ = ("paused", "handle")

    def __init__(self, loop: Any, transport: Any, fd: int, offset: int, count: int,
                 done: Callable[[], None], failed: Callable[[str, bool], None], progress: Callable[[], None]) -> None:
        super().__init__(loop, transport, fd, offset, count, done, failed, progress)
        self.paused = False
        self.handle: Any = None  # the next turn, when this one used its share

    def start(self, head: bytes) -> None:
        self.transport.write(head)  # (may call pause(), through the client's pause_writing)
        self._pump()

    def pause(self) -> None:
        self.paused = True

    def resume(self) -> None:
        self.paused = False
        if self.handle is None and self.fd >= 0:
            self._pump()

    def cancel(self) -> None:
        if self.handle is not None:
            self.handle.cancel()
            self.handle = None
        super().cancel()

    def _pump(self) -> None:
        """Write chunks until the transport pauses us, this turn's share is sent, or the end."""
        self.handle = None
        budget = TURN_BYTES
        transport = self.transport
        while self.left and not self.paused and self.fd >= 0:
            if transport.is_closing():
                self._finish("the connection closed", True)
                return
            if budget <= 0:
                self.handle = self.loop.call_soon(self._pump)
                return
            try:
                data = os.pread(self.fd, min(CHUNK, self.left), self.offset)
            except OSError as exc:
                self._finish(exc.strerror or str(exc), False)
                return
            if not data:
                self._finish(f"the file shrank: {self.left} bytes could not be sent", False)
                return
            self.offset += len(data)
            self.left -= len(data)
            budget -= len(data)
            transport.write(data)  # (may call pause(), through the client's pause_writing)
            self.progress()
        if not self.left and self.fd >= 0:
            self._finish(None, False)
