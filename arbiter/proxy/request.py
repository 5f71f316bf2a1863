"""A client request as the proxy parsed it: what the connection reads, what a relay forwards,
and what the access log and the latency metrics record once it is answered."""
from __future__ import annotations

import time
from typing import Any

from .http1 import GET

now_ns = time.perf_counter_ns  # the clock of request latencies (Request.born)


class Reject(Exception):
    """Raised inside a parser callback to answer `status` and close the connection."""

    def __init__(self, status: int) -> None:
        self.status = status


class Request:
    """One client request, from its first byte until its response is complete (the fields a
    worker's answer needs live in its Relay, made only for requests that go to a worker)."""

    __slots__ = ("method", "target", "http10", "keep_alive", "fwd", "hcount", "hsize", "host", "hosts",
                 "connection", "cl", "te", "xff", "via", "ae", "inm", "ims", "expect", "bypass", "body",
                 "body_size", "body_reserved", "error", "status", "length", "born")

    def __init__(self) -> None:
        self.method = GET
        self.target = b""
        self.http10 = False
        self.keep_alive = False
        self.fwd: list[bytes] = []  # forwarded header fields, flat: name, ": ", value, CRLF
        self.hcount = 0
        self.hsize = 0
        self.host = self.connection = self.cl = self.te = self.xff = self.via = None
        self.ae = self.inm = self.ims = self.expect = None
        self.hosts = 0
        self.bypass = False  # a field that makes the answer the worker's to give, not the front cache's
        self.body: Any = None  # a list of chunks while it arrives, then bytes
        self.body_size = 0
        self.body_reserved = 0  # bytes of the proxy's body budget this request holds
        self.error = 0  # a status to answer instead of forwarding (malformed, over a limit)
        self.status = 0
        self.length: Any = None  # the response body's length (int or Content-Length bytes) for the access log
        self.born = now_ns()  # when its first byte was parsed: the latency metrics start here
