"""File bodies sent by the proxy itself, with sendfile: the bytes go from the page cache to the
client socket without passing through a worker or a Python buffer (fileapp.handoff tells how a
worker names the file).

The event loop's transport is bypassed for the body: once the transport has sent everything
written before (the head), sendfile writes straight to the socket, as much as it takes; when it
is full, a second descriptor of the socket (a dup: the loop refuses a writer on the transport's
own) is watched for room. Memory stays bounded whatever the file size or the client's speed:
the kernel's socket buffer holds what is in flight.
"""
from __future__ import annotations

import errno
import os
from typing import Any, Callable

from fileapp.handoff import FileRef, open_verified

# Bytes sent per turn of the event loop to one client, so that a fast reader of a big file
# cannot keep the others waiting.
TURN_BYTES = 4 * 2**20
# Socket errors that only mean the client went away.
CLIENT_GONE = frozenset({errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN})


def open_file(ref: FileRef) -> int | None:
    """open_verified, with EMFILE and the like (the proxy's own shortage) as a plain refusal: the
    worker then sends the bytes itself."""
    try:
        return open_verified(ref)
    except OSError:
        return None


class FileSender:
    """Sends `count` bytes of the open file `fd` from `offset` to a client's socket, then calls
    `done()`; calls `failed(reason, gone)` if the file shrank or the socket failed (`gone`: the
    client went away). Owns `fd`."""

    __slots__ = ("loop", "transport", "sock", "fd", "offset", "left", "done", "failed", "progress",
                 "watch")

    def __init__(self, loop: Any, transport: Any, fd: int, offset: int, count: int,
                 done: Callable[[], None], failed: Callable[[str, bool], None], progress: Callable[[], None]) -> None:
        self.loop = loop
        self.transport = transport
        self.sock = transport.get_extra_info("socket").fileno()
        self.fd = fd
        self.offset = offset
        self.left = count
        self.done = done
        self.failed = failed
        self.progress = progress  # called whenever bytes left: the client is still reading
        self.watch = -1  # the dup of the socket watched for room, while waiting for it

    def start(self) -> None:
        if self.transport.get_write_buffer_size() or not self._send():
            self._wait()

    def cancel(self) -> None:
        """Stop (the client went away or the connection is being closed): let go of everything."""
        self._unwatch()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def _wait(self) -> None:
        if self.watch < 0:
            self.watch = os.dup(self.sock)
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

    def _finish(self, failure: str | None, gone: bool) -> None:
        self.cancel()
        if failure is None:
            self.done()
        else:
            self.failed(failure, gone)
