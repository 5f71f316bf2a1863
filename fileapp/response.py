"""How a response leaves gows' worker without a serving thread ever waiting for its client.

A thread sends what the socket takes at once (a head and its body in one gathering sendmsg,
files with sendfile). What a slow client has not taken yet is left with the connection as a
Transfer (fileapp.transfer), and the worker's poller finishes it whenever the socket turns
writable: so a few slow readers cannot take every thread and starve health checks and other
clients. The request is over for gunicorn (access log, keep-alive) when handle_request returns;
sending the rest is the worker's business.
"""
from __future__ import annotations

import io
import os
import socket
import threading

from .gunicorn_compat import Response, has_fileno, install_response
from .transfer import Transfer

# Seconds a client may take nothing at all of a response before the worker gives up on it.
WRITE_TIMEOUT = 30.0
# Bytes of a many-part streamed body kept for a slow client: the app would fill memory if every
# part were kept, so past this the thread waits for the client after all. fileapp's own bodies
# (one byte string, files, multipart ranges as file ranges) never get there.
HELD_LIMIT = 1 << 20
_LAST_CHUNK = b"0\r\n\r\n"


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


class CoalescingResponse(Response):
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


def use_coalescing_response(write_timeout: float) -> None:
    """Make every response of this process a CoalescingResponse, whose rests only gows' worker
    loop sends; a thread that must wait for a client after all waits `write_timeout` at most."""
    CoalescingResponse.write_timeout = write_timeout
    install_response(CoalescingResponse)
