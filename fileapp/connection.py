"""One client connection of gows' worker (fileapp.worker): its socket, its request reader,
the rest of a response its client has not taken yet, and when it times out."""
from __future__ import annotations

import socket
import struct

from . import gunicorn_compat as compat
from .http1 import RequestReader
from .transfer import Transfer


def timeval(seconds: float) -> bytes:
    """`seconds` as a struct timeval, for SO_RCVTIMEO and SO_SNDTIMEO."""
    return struct.pack("ll", int(seconds), int((seconds % 1) * 1e6))


class Connection:
    """One client connection of the serving threads."""

    __slots__ = ("sock", "client", "server", "reader", "timeout", "busy", "rest", "keep", "holding",
                 "hold_since")

    def __init__(self, sock: socket.socket, client, server, reader: RequestReader,
                 timeout: float) -> None:
        self.sock = sock
        self.client = client
        self.server = server
        self.reader = reader
        self.timeout = timeout  # monotonic time after which an idle connection is closed
        self.busy = False  # a thread is serving it (set and cleared under the worker's lock)
        self.rest: Transfer | None = None  # of the last response, not taken by the client yet
        self.keep = False  # whether the connection carries another request after the rest
        # `rest` holds answers not offered to the client yet, to leave with the next answer
        # (fileapp.response): only while a thread serves the connection's pipelined requests.
        self.holding = False
        self.hold_since = 0.0  # when the first of the answers held was ready

    def close(self) -> None:
        if self.rest is not None:
            self.rest.close()
            self.rest = None
        compat.close_socket(self.sock)
