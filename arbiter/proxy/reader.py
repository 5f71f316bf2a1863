"""Reading requests off a client connection: httptools parsing, the limits and the rules a
request head must meet (smuggling, Host, trailers, bodies and their budget), and how much a
connection may read ahead of the requests being answered.

RequestReader is the reading half of the client connection; ClientProtocol (client.py) adds the
answering half. A parsed request goes to `_enqueue`; one that breaks a rule to `_reject`.
"""
from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import TYPE_CHECKING, Any, Callable

from httptools import HttpParserCallbackError, HttpParserError, HttpParserUpgrade, HttpRequestParser

from .counters import REJECTED_REQUESTS, REQUESTS
from .http1 import (CONTINUE, CRLF, H_AE, H_BYPASS, H_CL, H_CONNECTION, H_EXPECT, H_FWD, H_HOST, H_IMS, H_INM,
                    H_TE, H_VIA, H_XFF, REQUEST_HEADERS, SEP, VALID_HOSTS, VIA_HOPS_LIMIT, VIA_SELF, connection_named,
                    drop_named, valid_host)
from .request import Reject, Request

if TYPE_CHECKING:
    from .server import Proxy

log = logging.getLogger("gows.proxy")

MAX_PIPELINE = 16  # queued requests per connection before we stop reading from it
# Request heads are parsed this many bytes at a time, so the queue's length is checked between
# slices: one read of 256 KiB of tiny pipelined requests must not become thousands of queued ones.
PIPELINE_SLICE = 1024
# After its first headerTimeout seconds a request body must keep arriving at this many bytes per
# second on average: a deadline each byte pushed back would let a trickle hold memory for good.
MIN_BODY_RATE = 4096
# Parser phases of a client connection.
IDLE, IN_HEAD, IN_BODY = 0, 1, 2


class RequestReader(asyncio.Protocol):
    """The reading half of a client connection (see the module docstring)."""

    __slots__ = ("proxy", "transport", "parser", "req", "queue", "current", "phase", "deadline", "raw_head",
                 "closed", "no_more", "read_paused", "held", "body_since")

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy
        self.transport: Any = None
        self.parser: HttpRequestParser | None = None
        self.req: Request | None = None  # the request being parsed
        self.queue: deque[Request] = deque()  # parsed and waiting, the one being answered first
        self.current: Request | None = None  # the one being answered
        self.phase = IDLE
        self.deadline = 0.0
        self.raw_head = 0
        self.closed = False
        self.no_more = False  # stop reading requests (error, Connection: close, upgrade)
        self.read_paused = False
        self.held: Any = None  # bytes read but not parsed yet, while the queue is full
        self.body_since = 0.0  # when the current request's head was complete (its body deadline)

    # The answering half (ClientProtocol) provides these:
    _enqueue: Callable[[Request], None]  # a complete request, answered after those before it
    close: Callable[[], None]  # close once what was written has left

    # -- parsing -----------------------------------------------------------------------------
    def data_received(self, data: Any) -> None:
        """Parse what the client sent: at once when it is small (one request, or a few), else
        through _feed, a slice at a time."""
        if self.no_more:
            return
        if self.held is not None:  # (reading was paused: at most what was already on its way)
            self.held = bytes(self.held) + data
            return
        if self.phase != IN_BODY:
            if len(data) > PIPELINE_SLICE or len(self.queue) >= MAX_PIPELINE:
                self._feed(memoryview(data))
                return
            self.raw_head += len(data)
        try:
            self.parser.feed_data(data)
        except HttpParserCallbackError as exc:
            cause = exc.__context__
            if isinstance(cause, Reject):
                self._reject(cause.status)
            else:
                log.error("proxy error while handling a request", exc_info=cause or exc)
                self._reject(500)
            return
        except HttpParserUpgrade:
            # The request before the upgrade (its Upgrade header is dropped) is answered normally,
            # then the connection closes: we do not tunnel other protocols.
            self.no_more = True
            if self.req is not None:
                req = self.req
                self.req = None
                req.keep_alive = False
                self._enqueue(req)
            elif self.queue:
                self.queue[-1].keep_alive = False
            elif self.current is None:
                self.close()
            return
        except HttpParserError:
            self._reject(400)
            return
        if self.phase == IN_HEAD and self.raw_head > self.proxy.head_limit:
            self._reject(431 if self.req is not None and self.req.hcount else 414)

    def _feed(self, view: memoryview) -> None:
        """Parse request heads a slice at a time, keeping the rest (and reading no more) once
        MAX_PIPELINE requests wait."""
        while view and not self.no_more:
            if len(self.queue) >= MAX_PIPELINE:
                self.held = view
                self._pause_reading()
                return
            if self.phase != IN_BODY and len(view) > PIPELINE_SLICE:
                chunk, view = view[:PIPELINE_SLICE], view[PIPELINE_SLICE:]
            else:
                chunk, view = view, view[:0]
            self.data_received(chunk)

    def _pause_reading(self) -> None:
        if not self.read_paused and not self.closed:
            self.read_paused = True
            self.transport.pause_reading()

    # -- httptools callbacks --------------------------------------------------------------
    def on_message_begin(self) -> None:
        self.req = Request()
        self.phase = IN_HEAD
        self.deadline = self.proxy.clock + self.proxy.config.header_timeout

    def on_url(self, url: bytes) -> None:
        req = self.req
        req.target = req.target + url if req.target else url
        if len(req.target) > self.proxy.config.max_request_line:
            raise Reject(414)

    def on_header(self, name: bytes, value: bytes) -> None:
        req = self.req
        config = self.proxy.config
        req.hcount += 1
        req.hsize += len(name) + len(value) + 4
        if req.hcount > config.max_headers or req.hsize > config.max_header_bytes:
            raise Reject(431)
        if self.phase == IN_BODY:
            # A trailer field (after the last chunk). Merged into the head it would smuggle
            # Range, Host or X-Forwarded-For past every check made on the head: dropped.
            return
        code = REQUEST_HEADERS.get(name.lower(), H_FWD)
        if code == H_FWD:
            req.fwd += (name, SEP, value, CRLF)
        elif code == H_AE:
            req.ae = value if req.ae is None else req.ae + b", " + value
            req.fwd += (name, SEP, value, CRLF)
        elif code == H_HOST:
            if value not in VALID_HOSTS and not valid_host(value):
                raise Reject(400)
            req.host = value
            req.hosts += 1
            req.fwd += (name, SEP, value, CRLF)
        elif code == H_CONNECTION:
            req.connection = value if req.connection is None else req.connection + b"," + value
        elif code == H_CL:
            # Smuggling: one Content-Length, digits only (int() would take "+1", "1_0", " 1").
            if req.cl is not None or not value.isdigit() or len(value) > 18:
                raise Reject(400)
            req.cl = value
        elif code == H_TE:
            req.te = value if req.te is None else req.te + b"," + value
        elif code == H_INM:
            req.inm = value
            req.fwd += (name, SEP, value, CRLF)
        elif code == H_IMS:
            req.ims = value
            req.fwd += (name, SEP, value, CRLF)
        elif code == H_BYPASS:
            req.bypass = True
            req.fwd += (name, SEP, value, CRLF)
        elif code == H_XFF:
            req.xff = value if req.xff is None else req.xff + b", " + value
        elif code == H_VIA:
            req.via = value if req.via is None else req.via + b", " + value
        elif code == H_EXPECT:
            req.expect = value
        # H_DROP: hop-by-hop or ours to set

    def on_headers_complete(self) -> None:
        req = self.req
        parser = self.parser
        proxy = self.proxy
        req.method = method = parser.get_method()
        version = parser.get_http_version()
        if version != "1.1" and version != "1.0":  # (llhttp takes "2.0": it is no HTTP/1 request)
            raise Reject(505)
        req.http10 = http10 = version == "1.0"
        req.keep_alive = parser.should_keep_alive()
        if method == b"CONNECT":
            raise Reject(405)
        if req.te is not None:
            codings = [t.strip().lower() for t in req.te.split(b",")]
            if req.cl is not None or http10 or codings[-1] != b"chunked":
                raise Reject(400)
            if len(codings) > 1:
                raise Reject(501)  # we only de-chunk; other transfer codings are not implemented
            req.body = []
        elif req.cl is not None:
            if int(req.cl) > proxy.config.max_body_bytes:
                raise Reject(413)
            if req.cl != b"0":
                req.body = []
        if req.hosts > 1 or (req.hosts == 0 and not http10):
            raise Reject(400)
        if req.via is not None and req.via.count(VIA_SELF) >= VIA_HOPS_LIMIT:
            raise Reject(508)
        if req.body is not None:
            if parser.should_upgrade():
                # httptools stops at the head of an upgrade: the body would be read as the next
                # request. We tunnel nothing, so such a request is refused whole.
                raise Reject(400)
            if not proxy.reserve_body(req, int(req.cl) if req.cl is not None else 0):
                raise Reject(503)
        if req.connection is not None:
            self._drop_connection_named(req)
        if req.expect is not None and not http10:  # (an HTTP/1.0 request's is ignored: RFC 9110 10.1.1)
            if req.expect.lower() != b"100-continue":
                raise Reject(417)
            if req.body is not None and self.current is None and not self.queue and not self.closed:
                self.transport.write(CONTINUE)
        self.phase = IN_BODY
        self.raw_head = 0
        self.body_since = proxy.clock
        self.deadline = proxy.clock + proxy.config.header_timeout

    def on_body(self, body: bytes) -> None:
        req = self.req
        proxy = self.proxy
        size = req.body_size = req.body_size + len(body)
        if size > proxy.config.max_body_bytes:
            raise Reject(413)
        if size > req.body_reserved and not proxy.reserve_body(req, size):  # chunked: as it comes
            raise Reject(503)
        req.body.append(body)
        # Progress earns time only at MIN_BODY_RATE: a trickle cannot push the deadline back for good.
        self.deadline = self.body_since + proxy.config.header_timeout + size / MIN_BODY_RATE

    def on_message_complete(self) -> None:
        req = self.req
        self.req = None
        self.phase = IDLE
        if req is None or self.no_more:
            return
        if req.body is not None:
            req.body = b"".join(req.body)
        self.proxy.counts[REQUESTS] += 1
        if not req.keep_alive:
            self.no_more = True  # later pipelined requests are not answered
        self._enqueue(req)

    @staticmethod
    def _drop_connection_named(req: Request) -> None:
        named = connection_named(req.connection)
        if not named:
            return
        req.fwd = drop_named(req.fwd, named)
        # The fields the front cache reads go with them (the worker will not see them either).
        if b"accept-encoding" in named:
            req.ae = None
        if b"if-none-match" in named:
            req.inm = None
        if b"if-modified-since" in named:
            req.ims = None

    def _reject(self, status: int) -> None:
        """Answer a malformed or over-limit request (after those before it) and close."""
        req = self.req or Request()
        req.error, req.keep_alive = status, False
        self.req = self.parser = self.held = None  # nothing more is read from this connection
        self.no_more = True
        self._pause_reading()
        self.proxy.counts[REJECTED_REQUESTS] += 1
        self._enqueue(req)
