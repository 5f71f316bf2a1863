"""The client side of the front proxy: one asyncio Protocol per client connection, parsing
requests with httptools, enforcing limits, answering from the front cache or relaying a worker's
response, in order, with keep-alive and back-pressure; and `Proxy`, which owns them all."""
from __future__ import annotations

import asyncio
import heapq
import logging
import os
import re
import resource
import socket
import time
from collections import deque
from email.utils import formatdate
from http import HTTPStatus
from typing import Any, Callable

from httptools import HttpParserCallbackError, HttpParserError, HttpParserUpgrade, HttpRequestParser

from ..sockets import somaxconn
from ..state import WorkerState, WorkerTable
from .balancer import Balancer
from .cache import Entry, FrontCache, freshness
from .settings import ProxySettings
from .stats import SUM, RequestStats
from .upstream import UpstreamConnection, UpstreamError, UpstreamPool

log = logging.getLogger("gows.proxy")

GET, HEAD = b"GET", b"HEAD"
IDEMPOTENT = frozenset((b"GET", b"HEAD", b"OPTIONS"))
SAFE = IDEMPOTENT | {b"TRACE"}
CRLF = b"\r\n"
SEP = b": "
VIA_SELF = b"1.1 gows"
TICK = 0.25  # seconds between timeout sweeps; also the resolution of the coarse clock
MAX_PIPELINE = 16  # queued requests per connection before we stop reading from it
# Request heads are parsed this many bytes at a time, so the queue's length is checked between
# slices: one read of 256 KiB of tiny pipelined requests must not become thousands of queued ones.
PIPELINE_SLICE = 1024
# After its first headerTimeout seconds a request body must keep arriving at this many bytes per
# second on average: a deadline each byte pushed back would let a trickle hold memory for good.
MIN_BODY_RATE = 4096
# At the connection limit, up to this many of the longest-idle connections are closed (as nginx
# reuses connections) so that the clients waiting in the backlog get their turn; never one idle
# for less than SHED_AFTER seconds (a new connection whose request is on its way).
IDLE_SHED = 32
SHED_AFTER = 1.0
# Descriptors kept aside beyond two per client (its own and an upstream one): listeners, logs,
# health probes, pooled connections and the loop's own.
FD_RESERVE = 16
_JOIN_LIMIT = 16384  # a head and a body up to this size leave in one joined write, bigger as two
_now_ns = time.perf_counter_ns  # the clock of request latencies (Request.born)

# Request headers needing attention; everything else is forwarded unchanged.
_FWD, _HOST, _CONNECTION, _DROP, _CL, _TE, _XFF, _VIA, _AE, _INM, _IMS, _EXPECT, _BYPASS = range(13)
REQUEST_HEADERS = {
    b"host": _HOST, b"connection": _CONNECTION, b"content-length": _CL, b"transfer-encoding": _TE,
    b"x-forwarded-for": _XFF, b"via": _VIA, b"accept-encoding": _AE, b"if-none-match": _INM,
    b"if-modified-since": _IMS, b"expect": _EXPECT,
    # Hop-by-hop (RFC 9110 7.6.1, Go's ReverseProxy), and forwarding headers we set ourselves.
    b"keep-alive": _DROP, b"proxy-connection": _DROP, b"te": _DROP, b"trailer": _DROP, b"upgrade": _DROP,
    b"proxy-authorization": _DROP, b"proxy-authenticate": _DROP,
    b"x-forwarded-host": _DROP, b"x-forwarded-proto": _DROP,
    # Forwarded, but the answer is the worker's to give, not the front cache's.
    b"range": _BYPASS, b"if-range": _BYPASS, b"authorization": _BYPASS, b"if-match": _BYPASS,
    b"if-unmodified-since": _BYPASS, b"cookie": _BYPASS,
}
_R_FWD, _R_CL, _R_TE, _R_CONNECTION, _R_DROP, _R_VIA, _R_CC, _R_NOSTORE, _R_VARY, _R_AGE = range(10)
RESPONSE_HEADERS = {
    b"content-length": _R_CL, b"transfer-encoding": _R_TE, b"connection": _R_CONNECTION, b"via": _R_VIA,
    b"keep-alive": _R_DROP, b"proxy-connection": _R_DROP, b"te": _R_DROP, b"trailer": _R_DROP,
    b"upgrade": _R_DROP, b"proxy-authenticate": _R_DROP,
    b"cache-control": _R_CC, b"vary": _R_VARY, b"age": _R_AGE,
    b"set-cookie": _R_NOSTORE, b"content-range": _R_NOSTORE,
}

STATUS_LINES = {s.value: b"HTTP/1.1 %d %s\r\n" % (s.value, s.phrase.encode()) for s in HTTPStatus}


def status_line(code: int) -> bytes:
    line = STATUS_LINES.get(code)
    if line is None:
        line = STATUS_LINES[code] = b"HTTP/1.1 %d \r\n" % code
    return line


def _reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


# RFC 9110 7.2 and RFC 3986 3.2.2: a bracketed IP literal, or a reg-name or IPv4 address, then an
# optional port. Anything else (empty, spaces, slashes, two colons) is answered 400, as nginx does.
_VALID_HOST = re.compile(rb"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._~!$&'()*+,;=%-]+)(?::[0-9]*)?")
_VALID_HOSTS: set[bytes] = set()  # values seen valid (clients repeat theirs); bounded
_MEMO_LIMIT = 1024


def valid_host(value: bytes) -> bool:
    """Whether a Host header value is a well-formed authority (remembered in _VALID_HOSTS)."""
    if _VALID_HOST.fullmatch(value) is None:
        return False
    if len(_VALID_HOSTS) >= _MEMO_LIMIT:
        _VALID_HOSTS.clear()
    _VALID_HOSTS.add(value)
    return True


def authority(host: str, port: int) -> bytes:
    """host:port as a Host header value, with IPv6 addresses in brackets."""
    return (f"[{host}]:{port}" if ":" in host else f"{host}:{port}").encode()


# Written to a connection accepted while the proxy is shutting down.
BUSY = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\n"
        b"Content-Length: 29\r\nRetry-After: 1\r\nConnection: close\r\n\r\n"
        b"503 Service Unavailable: busy")
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
CONN_CLOSE = b"Connection: close\r\n"
CONN_KEEP = b"Connection: keep-alive\r\n"
TE_CHUNKED = b"Transfer-Encoding: chunked\r\n"
LAST_CHUNK = b"0\r\n\r\n"

# Parser phases of a client connection.
IDLE, IN_HEAD, IN_BODY = 0, 1, 2
# How a relayed response body is written to the client.
RAW, CHUNKED, NOBODY = 0, 1, 2


class _Reject(Exception):
    """Raised inside a parser callback to answer `status` and close the connection."""

    def __init__(self, status: int) -> None:
        self.status = status


class Request:
    """One client request, from its first byte until its response is complete."""

    __slots__ = ("method", "target", "http10", "keep_alive", "fwd", "hcount", "hsize", "host", "hosts",
                 "connection", "cl", "te", "xff", "via", "ae", "inm", "ims", "expect", "bypass", "body",
                 "body_size", "error", "payload", "worker", "tried", "tries", "fresh", "sent", "started", "t0",
                 "status", "cacheable", "cache_vary", "cache_parts", "cache_size", "cache_ttl", "cache_headers",
                 "cache_age", "born", "length", "body_reserved", "stale", "epoch")

    def __init__(self) -> None:
        self.method = GET
        self.target = b""
        self.http10 = False
        self.keep_alive = False
        self.fwd: list[bytes] = []
        self.hcount = 0
        self.hsize = 0
        self.host = self.connection = self.cl = self.te = self.xff = self.via = None
        self.ae = self.inm = self.ims = self.expect = None
        self.hosts = 0
        self.bypass = False
        self.body: Any = None
        self.body_size = 0
        self.error = 0
        self.payload: bytes | None = None
        self.worker: WorkerState | None = None
        self.tried: list[WorkerState] | None = None
        self.tries = 0
        self.fresh = False
        self.sent = False
        self.started = False
        self.t0 = 0.0
        self.status = 0
        self.cacheable = False
        self.cache_vary = False
        self.cache_parts: list[bytes] | None = None
        self.cache_size = 0
        self.cache_ttl = 0
        self.cache_headers: list[tuple[bytes, bytes]] | None = None
        self.cache_age = 0
        self.born = _now_ns()  # when its first byte was parsed: the latency metrics start here
        self.length: Any = None  # the response body's length (int or Content-Length bytes) for the access log
        self.body_reserved = 0  # bytes of the proxy's body budget this request holds
        self.stale: Entry | None = None  # the front-cache entry this request revalidates with the worker
        self.epoch = 0  # the front cache's epoch when the request was forwarded (a reload purges older ones)


class ClientProtocol(asyncio.Protocol):
    """One client connection: parse, queue in order, answer from the cache or relay a worker."""

    __slots__ = ("proxy", "transport", "parser", "req", "queue", "current", "phase", "deadline", "raw_head",
                 "closed", "no_more", "eof", "upstream", "pending_head", "out_mode", "close_after",
                 "write_paused", "read_paused", "stall_since", "peer", "held", "pumping", "body_since",
                 "idle_since")

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy
        self.transport: Any = None
        self.parser: HttpRequestParser | None = None
        self.req: Request | None = None
        self.queue: deque[Request] = deque()
        self.current: Request | None = None
        self.phase = IDLE
        self.deadline = 0.0
        self.raw_head = 0
        self.closed = False
        self.no_more = False  # stop reading requests (error, Connection: close, upgrade)
        self.eof = False
        self.upstream: UpstreamConnection | None = None
        self.pending_head: bytes | None = None
        self.out_mode = RAW
        self.close_after = False
        self.write_paused = False
        self.read_paused = False
        self.stall_since = 0.0
        self.peer: bytes | None = None
        self.held: Any = None  # bytes read but not parsed yet, while the queue is full
        self.pumping = False  # _pump is running: what it calls must not start it again
        self.body_since = 0.0  # when the current request's head was complete (its body deadline)
        self.idle_since = 0.0  # when the connection last had no request in progress

    # -- asyncio.Protocol -----------------------------------------------------------------
    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        proxy = self.proxy
        if proxy.draining:
            self.closed = self.no_more = True
            proxy.rejected += 1
            transport.write(BUSY)
            transport.close()
            return
        proxy.conns.add(self)
        self.parser = HttpRequestParser(self)
        self.idle_since = proxy.clock
        self.deadline = proxy.clock + proxy.header_timeout

    def eof_received(self) -> bool | None:
        self.eof = True
        self.no_more = True
        if self.current is None and not self.queue:
            return None  # nothing left to answer: close
        return True  # half-close: still write the queued responses, then close

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = self.no_more = True
        self._detach_upstream()
        # Break the cycle with the parser (whose callbacks are our methods) and let go of every
        # request body now, not whenever the cyclic GC runs.
        self.parser = None
        release = self.proxy.release_body
        for req in (self.req, self.current, *self.queue):
            if req is not None:
                release(req)
        self.req = self.current = self.held = None
        self.queue.clear()
        self.proxy.connection_gone(self)

    def pause_writing(self) -> None:
        # The client reads slower than the worker sends: stop reading the worker.
        self.write_paused = True
        self.stall_since = self.proxy.clock
        if self.upstream is not None:
            self.upstream.pause()

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.upstream is not None:
            self.upstream.resume()

    # -- parsing ----------------------------------------------------------------------------
    def data_received(self, data: Any) -> None:
        """Parse what the client sent: at once when it is small (one request, or a few), else
        through _feed, a slice at a time."""
        if self.no_more:
            return
        if self.held is not None:  # (reading was paused: at most what was already on its way)
            self.held = bytes(self.held) + data
            return
        if self.phase != IN_BODY:
            if len(data) > PIPELINE_SLICE:
                self._feed(memoryview(data))
                return
            self.raw_head += len(data)
        try:
            self.parser.feed_data(data)
        except HttpParserCallbackError as exc:
            cause = exc.__context__
            if isinstance(cause, _Reject):
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
                self._close()
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
        self.deadline = self.proxy.clock + self.proxy.header_timeout

    def on_url(self, url: bytes) -> None:
        req = self.req
        req.target = req.target + url if req.target else url
        if len(req.target) > self.proxy.max_request_line:
            raise _Reject(414)

    def on_header(self, name: bytes, value: bytes) -> None:
        req = self.req
        proxy = self.proxy
        req.hcount += 1
        req.hsize += len(name) + len(value) + 4
        if req.hcount > proxy.max_headers or req.hsize > proxy.max_header_bytes:
            raise _Reject(431)
        if self.phase == IN_BODY:
            # A trailer field (after the last chunk). Merged into the head it would smuggle
            # Range, Host or X-Forwarded-For past every check made on the head: dropped.
            return
        lname = name.lower()
        code = REQUEST_HEADERS.get(lname, _FWD)
        if code == _FWD:
            req.fwd += (name, SEP, value, CRLF)
        elif code == _AE:
            req.ae = value if req.ae is None else req.ae + b", " + value
            req.fwd += (name, SEP, value, CRLF)
        elif code == _HOST:
            if value not in _VALID_HOSTS and not valid_host(value):
                raise _Reject(400)
            req.host = value
            req.hosts += 1
            req.fwd += (name, SEP, value, CRLF)
        elif code == _CONNECTION:
            req.connection = value if req.connection is None else req.connection + b"," + value
        elif code == _CL:
            # Smuggling: one Content-Length, digits only (int() would take "+1", "1_0", " 1").
            if req.cl is not None or not value.isdigit() or len(value) > 18:
                raise _Reject(400)
            req.cl = value
        elif code == _TE:
            req.te = value if req.te is None else req.te + b"," + value
        elif code == _INM:
            req.inm = value
            req.fwd += (name, SEP, value, CRLF)
        elif code == _IMS:
            req.ims = value
            req.fwd += (name, SEP, value, CRLF)
        elif code == _BYPASS:
            req.bypass = True
            req.fwd += (name, SEP, value, CRLF)
        elif code == _XFF:
            req.xff = value if req.xff is None else req.xff + b", " + value
        elif code == _VIA:
            req.via = value if req.via is None else req.via + b", " + value
        elif code == _EXPECT:
            req.expect = value
        # _DROP: hop-by-hop or ours to set

    def on_headers_complete(self) -> None:
        req = self.req
        parser = self.parser
        proxy = self.proxy
        req.method = method = parser.get_method()
        req.http10 = http10 = parser.get_http_version() == "1.0"
        req.keep_alive = parser.should_keep_alive()
        if method == b"CONNECT":
            raise _Reject(405)
        if req.te is not None:
            codings = [t.strip().lower() for t in req.te.split(b",")]
            if req.cl is not None or http10 or codings[-1] != b"chunked":
                raise _Reject(400)
            if len(codings) > 1:
                raise _Reject(501)  # we only de-chunk; other transfer codings are not implemented
            req.body = []
        elif req.cl is not None:
            if int(req.cl) > proxy.max_body_bytes:
                raise _Reject(413)
            if req.cl != b"0":
                req.body = []
        if req.hosts > 1 or (req.hosts == 0 and not http10):
            raise _Reject(400)
        if req.body is not None:
            if parser.should_upgrade():
                # httptools stops at the head of an upgrade: the body would be read as the next
                # request. We tunnel nothing, so such a request is refused whole.
                raise _Reject(400)
            if not proxy.reserve_body(req, int(req.cl) if req.cl is not None else 0):
                raise _Reject(503)
        if req.connection is not None:
            self._drop_connection_named(req)
        if req.expect is not None:
            if req.expect.lower() != b"100-continue":
                raise _Reject(417)
            if req.body is not None and self.current is None and not self.queue and not self.closed:
                self.transport.write(CONTINUE)
        self.phase = IN_BODY
        self.raw_head = 0
        self.body_since = proxy.clock
        self.deadline = proxy.clock + proxy.header_timeout

    def on_body(self, body: bytes) -> None:
        req = self.req
        proxy = self.proxy
        size = req.body_size = req.body_size + len(body)
        if size > proxy.max_body_bytes:
            raise _Reject(413)
        if size > req.body_reserved and not proxy.reserve_body(req, size):  # chunked: as it comes
            raise _Reject(503)
        req.body.append(body)
        # Progress earns time only at MIN_BODY_RATE: a trickle cannot push the deadline back for good.
        self.deadline = self.body_since + proxy.header_timeout + size / MIN_BODY_RATE

    def on_message_complete(self) -> None:
        req = self.req
        self.req = None
        self.phase = IDLE
        if req is None or self.no_more:
            return
        if req.body is not None:
            req.body = b"".join(req.body)
        self.proxy.requests += 1
        if not req.keep_alive:
            self.no_more = True  # later pipelined requests are not answered
        self._enqueue(req)

    @staticmethod
    def _drop_connection_named(req: Request) -> None:
        # Never Host (nor the framing headers, which are not forwarded as given anyway): a
        # client naming them in Connection would otherwise make the proxy drop them.
        named = {t.strip().lower() for t in req.connection.split(b",")} - {b"close", b"keep-alive", b"host", b""}
        if not named:
            return
        fwd = req.fwd
        kept: list[bytes] = []
        for i in range(0, len(fwd), 4):
            if fwd[i].lower() not in named:
                kept += fwd[i:i + 4]
        req.fwd = kept
        if b"accept-encoding" in named:
            req.ae = None
        if b"if-none-match" in named:
            req.inm = None
        if b"if-modified-since" in named:
            req.ims = None

    # -- request queue ----------------------------------------------------------------------
    def _enqueue(self, req: Request) -> None:
        self.queue.append(req)
        if self.current is None and not self.pumping:
            self._pump()

    def _reject(self, status: int) -> None:
        """Answer a malformed or over-limit request (after those before it) and close."""
        req = self.req or Request()
        self.req = None
        req.error = status
        req.keep_alive = False
        self.no_more = True
        self.parser = None
        self.held = None
        self._pause_reading()
        self.proxy.rejected_requests += 1
        self._enqueue(req)

    def _pump(self) -> None:
        """Serve the queued requests in order and parse held-back bytes as room frees up.

        A loop, never recursion: a front-cache hit is answered at once, and a thousand pipelined
        hits must not become a thousand nested calls.
        """
        self.pumping = True
        try:
            while not self.closed:
                if self.current is None and self.queue:
                    self._serve(self.queue[0])
                elif self.held is not None and len(self.queue) < MAX_PIPELINE:
                    held, self.held = self.held, None
                    self._feed(memoryview(held))
                else:
                    break
        finally:
            self.pumping = False
        if self.closed or self.current is not None:
            return
        if self.eof:
            self._close()
            return
        if self.phase == IDLE:
            self.idle_since = self.proxy.clock
            self.deadline = self.idle_since + self.proxy.idle_timeout
        if self.read_paused and self.held is None and not self.no_more:
            self.read_paused = False
            self.transport.resume_reading()

    def _serve(self, req: Request) -> None:
        self.current = req
        if req.error:
            self._respond_error(req, req.error)
            return
        proxy = self.proxy
        method = req.method
        cache = proxy.cache
        if cache is not None and (method == GET or method == HEAD) and not req.bypass:
            entry = cache.get(req.target, req.ae, proxy.clock)
            if entry is not None:
                if entry.servable(proxy.clock):
                    self._answer_from(entry, req)
                    return
                # Older than the workers' own cache TTL: ask a worker whether it still holds (one
                # request does; others get the stored answer meanwhile).
                if req.inm is None and req.ims is None and (entry.etag is not None or entry.last_modified is not None):
                    entry.revalidating = proxy.clock
                    req.stale = entry
            req.cacheable = method == GET
            req.epoch = proxy.cache_epoch
        req.t0 = proxy.clock
        self._forward(req)

    def _answer_from(self, entry: Entry, req: Request) -> None:
        """Answer `req` with a stored response (a 304 when its validators match)."""
        proxy = self.proxy
        age = int(proxy.clock - entry.born) + entry.initial_age
        if age != entry.age:
            entry.prepare(age)
        keep = req.keep_alive and not proxy.draining
        http10 = req.http10
        if (req.inm is not None or req.ims is not None) and entry.not_modified(req.inm, req.ims):
            self.transport.write((entry.nm_ka if http10 else entry.nm) if keep else entry.nm_close)
            proxy.status_counts[3] += 1
            req.status = 304
        else:
            head = (entry.head_ka if http10 else entry.head) if keep else entry.head_close
            if req.method == HEAD:
                self.transport.write(head)
            else:
                body = entry.body
                if keep and not http10 and entry.full is not None:
                    self.transport.write(entry.full)  # the usual keep-alive hit, prepared whole
                elif len(body) <= _JOIN_LIMIT:
                    self.transport.write(head + body)
                else:
                    self.transport.writelines((head, body))
                req.length = len(body)
            proxy.status_counts[2] += 1
            req.status = 200
        self._finish(req, keep)

    def _finish(self, req: Request, keep: bool) -> None:
        """The response to the current request is written: serve the next one or close."""
        proxy = self.proxy
        timing = proxy.timing
        if timing is not None:  # RequestStats.add, in line: this runs once per response
            ns = _now_ns() - req.born
            timing[ns.bit_length()] += 1
            timing[SUM] += ns
        observe = proxy.observe
        if observe is not None:
            observe(self, req)
        if req.body_reserved:
            proxy.release_body(req)
        queue = self.queue
        if queue and queue[0] is req:
            queue.popleft()
        self.current = None
        if not keep or self.closed or proxy.draining:
            self._close()
        elif not self.pumping:  # (else the running loop goes on with the queue)
            self._pump()

    def _close(self) -> None:
        if not self.closed:
            self.closed = self.no_more = True
            self._detach_upstream()
            if self.transport is not None:
                self.transport.close()

    def abort(self) -> None:
        """Drop the connection now, unsent bytes and all."""
        self.closed = self.no_more = True
        self._detach_upstream()
        if self.transport is not None:
            self.transport.abort()

    def _detach_upstream(self) -> None:
        conn = self.upstream
        if conn is not None:
            self.upstream = None
            conn.detach()
        req = self.current
        if req is not None and req.worker is not None:
            req.worker.in_flight -= 1
            req.worker = None

    # -- forwarding -----------------------------------------------------------------------
    def _forward(self, req: Request, failed: UpstreamError | None = None) -> None:
        proxy = self.proxy
        worker = proxy.balancer.pick(req.target, req.tried)
        if worker is None:
            if failed is not None:  # no other worker left to retry on
                self._respond_error(req, failed.status)
            else:
                proxy.no_worker += 1
                self._respond_error(req, 503)
            return
        if failed is not None:
            proxy.retries_done += 1
        req.worker = worker
        worker.in_flight += 1
        worker.requests += 1
        if req.payload is None:
            req.payload = self._payload(req)
        fresh = req.fresh
        req.fresh = False
        proxy.pool.checkout(self, req, worker, fresh)

    def wants(self, req: Request, worker: WorkerState) -> bool:
        """Whether `req` is still waiting for a connection to `worker` (the client may have left)."""
        return self.current is req and req.worker is worker and not self.closed

    def start(self, conn: UpstreamConnection, req: Request) -> None:
        """Send `req` on `conn` (from the pool) and relay the answer."""
        self.upstream = conn
        req.sent = True
        if self.write_paused:
            conn.pause()
        conn.send(self, req.payload, req.body, req.method == HEAD)

    def _payload(self, req: Request) -> bytes:
        """The request head as the worker gets it: hop-by-hop headers gone, forwarding headers
        set (the body, if any, follows it as it is)."""
        if self.peer is None:
            peer = self.transport.get_extra_info("peername")
            self.peer = (peer[0] if isinstance(peer, tuple) else "unknown").encode()
        parts = [req.method, b" ", req.target, b" HTTP/1.1\r\n"]
        parts += req.fwd
        if req.host is None:  # HTTP/1.0 without Host; HTTP/1.1 requires one upstream
            sock = self.transport.get_extra_info("sockname")
            parts += (b"Host: ", authority(sock[0], sock[1]) if isinstance(sock, tuple) else b"localhost", CRLF)
        else:
            parts += (b"X-Forwarded-Host: ", req.host, CRLF)
        parts += (b"X-Forwarded-For: ", req.xff + b", " + self.peer if req.xff else self.peer, CRLF,
                  b"X-Forwarded-Proto: http\r\nVia: ", req.via + b", " + VIA_SELF if req.via else VIA_SELF, CRLF)
        stale = req.stale
        if stale is not None:  # revalidating a front-cache entry for the client's plain GET/HEAD
            parts += (b"If-None-Match: ", stale.etag, CRLF) if stale.etag is not None else \
                     (b"If-Modified-Since: ", stale.last_modified, CRLF)
        body = req.body
        if body is not None:
            parts.append(b"Content-Length: %d\r\n\r\n" % len(body))
        elif req.cl is not None or req.method in (b"POST", b"PUT", b"PATCH"):
            parts.append(b"Content-Length: 0\r\n\r\n")
        else:
            parts.append(CRLF)
        return b"".join(parts)

    # -- the worker's answer (called by UpstreamConnection) -------------------------------
    def upstream_head(self, conn: UpstreamConnection, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        req = self.current
        proxy = self.proxy
        stale = req.stale
        if stale is not None:
            stale.revalidating = 0.0
            if status == 304:  # still current: the stored response answers (see upstream_done)
                self.out_mode = NOBODY
                self.pending_head = None
                self.close_after = not req.keep_alive
                return
            req.stale = None
            if status != 200 and proxy.cache is not None:  # gone, forbidden, broken: not from us
                proxy.cache.invalidate(req.target)
        out = [status_line(status)]
        cl = te = connection = via = cc = vary = age = None
        nostore = False
        for name, value in headers:
            code = RESPONSE_HEADERS.get(name.lower(), _R_FWD)
            if code == _R_FWD:
                out += (name, SEP, value, CRLF)
            elif code == _R_CL:
                cl = value
            elif code == _R_TE:
                te = value
            elif code == _R_CONNECTION:
                connection = value if connection is None else connection + b"," + value
            elif code == _R_VIA:
                via = value if via is None else via + b", " + value
            elif code != _R_DROP:
                out += (name, SEP, value, CRLF)
                if code == _R_CC:
                    cc = value if cc is None else cc + b", " + value
                elif code == _R_NOSTORE:
                    nostore = True
                elif code == _R_VARY:
                    vary = value if vary is None else vary + b", " + value
                else:
                    age = value
        if connection is not None:
            out = self._drop_named_response(out, connection)
        keep = req.keep_alive and not proxy.draining
        if req.method == HEAD or status == 304 or status == 204:
            mode = NOBODY
            if cl is not None and status != 204:
                out += (b"Content-Length: ", cl, CRLF)
        elif cl is not None:
            mode = RAW
            out += (b"Content-Length: ", cl, CRLF)
        else:
            if te is None or not te.rstrip().lower().endswith(b"chunked"):
                conn.until_close = True  # delimited by the worker closing the connection
            if req.http10:
                mode = RAW
                keep = False  # no chunked coding for HTTP/1.0: the close delimits the body
            else:
                mode = CHUNKED
                out.append(TE_CHUNKED)
        if keep:
            if req.http10:
                out.append(CONN_KEEP)
        else:
            out.append(CONN_CLOSE)
        out += (b"Via: ", via + b", " + VIA_SELF if via else VIA_SELF, CRLF, CRLF)
        self.close_after = not keep
        self.out_mode = mode
        # Held back until the first body bytes (one write, and a worker dying before its body
        # starts can still be retried: nothing has reached the client).
        self.pending_head = b"".join(out)
        req.status = status
        req.length = cl if mode != NOBODY else None
        proxy.status_counts[status // 100 if status < 600 else 5] += 1
        if (req.cacheable and status == 200 and not nostore and mode != NOBODY and proxy.cache is not None
                and (vary is None or vary.strip().lower() == b"accept-encoding")
                and (cl is None or int(cl) <= proxy.cache.max_object_bytes)):
            ttl = freshness(cc)
            if ttl > 0:
                req.cache_vary = vary is not None
                req.cache_ttl = ttl
                req.cache_headers = headers
                req.cache_parts = []
                req.cache_size = 0
                req.cache_age = int(age) if age is not None and age.isdigit() else 0

    @staticmethod
    def _drop_named_response(out: list[bytes], connection: bytes) -> list[bytes]:
        named = {t.strip().lower() for t in connection.split(b",")} - {b"close", b"keep-alive", b""}
        if not named:
            return out
        kept = [out[0]]
        for i in range(1, len(out), 4):
            if out[i].lower() not in named:
                kept += out[i:i + 4]
        return kept

    def upstream_body(self, data: bytes) -> None:
        mode = self.out_mode
        if mode == NOBODY or self.closed:
            return
        req = self.current
        if req.cache_parts is not None:
            req.cache_size += len(data)
            cache = self.proxy.cache
            if cache is None or req.cache_size > cache.max_object_bytes:  # (or switched off by a reload)
                req.cache_parts = None
            else:
                req.cache_parts.append(data)
        transport = self.transport
        head = self.pending_head
        if mode == CHUNKED:
            frame = b"%x\r\n" % len(data)
            if head is not None:
                self.pending_head = None
                req.started = True
                frame = head + frame
            transport.writelines((frame, data, CRLF))
        elif head is not None:
            self.pending_head = None
            req.started = True
            if len(data) <= _JOIN_LIMIT:
                transport.write(head + data)
            else:
                transport.writelines((head, data))
        else:
            transport.write(data)

    def _release_worker(self) -> WorkerState | None:
        """The current request no longer holds its upstream connection; returns its worker."""
        self.upstream = None
        req = self.current
        worker = req.worker
        if worker is not None:
            worker.in_flight -= 1
            req.worker = None
        return worker

    def upstream_done(self, conn: UpstreamConnection) -> None:
        self._release_worker()
        req = self.current
        proxy = self.proxy
        if self.closed:
            return
        cache = proxy.cache
        stale = req.stale
        if stale is not None:  # the worker answered 304 to our revalidation
            req.stale = None
            if cache is not None and req.epoch == proxy.cache_epoch:
                cache.refresh(stale)
            self._answer_from(stale, req)
            return
        head = self.pending_head
        if self.out_mode == CHUNKED:
            self.pending_head = None
            self.transport.write(head + LAST_CHUNK if head is not None else LAST_CHUNK)
        elif head is not None:
            self.pending_head = None
            self.transport.write(head)
        req.started = True
        if req.cache_parts is not None:
            # Unless switched off meanwhile, or purged by a reload since the request left.
            if cache is not None and req.epoch == proxy.cache_epoch:
                cache.store(req.target, req.ae, req.cache_vary, [(n.lower(), n, v) for n, v in req.cache_headers],
                            b"".join(req.cache_parts), req.cache_ttl, req.cache_age)
            req.cache_parts = None
        elif req.method not in SAFE and cache is not None and req.status < 400:
            cache.invalidate(req.target)
        self._finish(req, not self.close_after)

    def upstream_failed(self, conn: UpstreamConnection | None, error: UpstreamError) -> None:
        worker = self._release_worker()
        req = self.current
        proxy = self.proxy
        proxy.upstream_errors += 1
        if error.passive and worker is not None:
            proxy.table.record_passive_failure(worker, error.reason)
        if self.closed:
            return
        if req.started:
            # Bytes of this response already reached the client: all we can do is end the
            # connection so the client sees the truncation (never bytes of another response).
            self.pending_head = None
            proxy.truncated += 1
            self._close()
            return
        self.pending_head = None
        req.cache_parts = None
        if req.status:
            # A head was parsed but nothing reached the client: forget its counting.
            proxy.status_counts[req.status // 100 if req.status < 600 else 5] -= 1
            req.status = 0
        if error.local:  # the master ran short itself: shed this request, blame no worker
            proxy.shortage()
            self._respond_error(req, 503)
            return
        may_resend = not req.sent or req.method in IDEMPOTENT
        if may_resend and proxy.clock - req.t0 < proxy.response_timeout:
            if error.stale and worker is not None:
                # A keep-alive connection the worker had closed: same worker, fresh connection.
                req.fresh = True
                req.sent = False
                proxy.stale_retries += 1
                self._forward_to(req, worker)
                return
            if req.tries < proxy.retries:
                req.tries += 1
                req.sent = False
                if worker is not None:
                    if req.tried is None:
                        req.tried = []
                    req.tried.append(worker)
                self._forward(req, error)
                return
        self._respond_error(req, error.status)

    def _forward_to(self, req: Request, worker: WorkerState) -> None:
        if not worker.up:
            self._forward(req)
            return
        req.worker = worker
        worker.in_flight += 1
        req.fresh = False
        self.proxy.pool.checkout(self, req, worker, fresh=True)

    # -- responses of our own -------------------------------------------------------------
    def _respond_error(self, req: Request, status: int) -> None:
        proxy = self.proxy
        keep = req.keep_alive and not req.error and not proxy.draining
        body = b"%d %s\n" % (status, _reason(status).encode())
        parts = [status_line(status), b"Content-Type: text/plain; charset=utf-8\r\n",
                 b"Content-Length: %d\r\n" % len(body), proxy.date_line]
        if status == 503:
            parts.append(b"Retry-After: 1\r\n")
        if keep:
            if req.http10:
                parts.append(CONN_KEEP)
        else:
            parts.append(CONN_CLOSE)
        parts.append(CRLF)
        if req.method != HEAD:
            parts.append(body)
            req.length = len(body)
        req.status = status
        proxy.status_counts[status // 100] += 1
        if not self.closed:
            self.transport.write(b"".join(parts))
        self._finish(req, keep)

    def timeout(self, now: float) -> None:
        """Called by the proxy's sweep: enforce head, idle and send deadlines."""
        if self.closed:
            return
        req = self.current
        if req is not None:
            if self.write_paused:
                if now - self.stall_since > self.proxy.response_timeout:
                    self.abort()  # the client stopped reading; drop what it did not take
            elif req.worker is None or (self.upstream is None and not req.started and now - req.t0 > self.proxy.stuck_after):
                # Neither being written nor waiting for a worker (whose every wait has its own
                # deadline): only a bug leaves a request so, and nothing else would free it.
                log.error("closing a connection whose request for %r was left unanswered", req.target[:200])
                self.abort()
            return
        if now <= self.deadline or self.queue:
            return
        if self.phase == IDLE:
            if self.transport.get_write_buffer_size():
                self.abort()
            else:
                self._close()
        else:
            self.proxy.timeouts += 1
            self._reject(408)


class Proxy:
    """The front proxy: serves a listening socket, forwarding to `table.healthy` workers."""

    def __init__(self, table: WorkerTable, settings: ProxySettings | None = None) -> None:
        self.table = table
        self.settings = settings = settings or ProxySettings()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.pool = UpstreamPool(self)
        self.conns: set[ClientProtocol] = set()
        self.cache: FrontCache | None = None
        self.balancer = Balancer(table, settings.balance, settings.worker_threads)
        self.clock = time.monotonic()
        self.date_line = b""
        self.draining = False
        self._listener: socket.socket | None = None  # the master's listening socket
        self._server: Any = None  # serving a duplicate of it; None while not accepting
        self._resuming = False
        self._pausing = False
        self._watching = False  # the listener is watched for newcomers while we are full
        self.fd_cap = 1 << 30  # client connections the open file limit can hold (set by start)
        self.body_bytes = 0  # request body bytes held for all connections (reserve_body)
        self.cache_epoch = 0  # bumped by purge_front_cache: responses asked for before are not stored
        self._ticker: asyncio.TimerHandle | None = None
        self._last_date = 0
        self._tasks: set[asyncio.Task] = set()
        self._update_date()
        # counters
        self.requests = 0
        self.status_counts = [0] * 6  # by status class: index 1..5
        self.retries_done = 0
        self.stale_retries = 0
        self.upstream_errors = 0
        self.no_worker = 0
        self.truncated = 0
        self.timeouts = 0
        self.rejected = 0  # connections refused while shutting down
        self.rejected_requests = 0  # malformed or over a limit
        self.shed_idle = 0  # idle keep-alive connections closed at the connection limit
        self.shortages = 0  # requests shed because the master ran out of descriptors or memory
        self._shortage_logged = 0.0
        self.latency = RequestStats()
        # The master sets these to None when nothing reads them: the latency histogram's counts
        # (read by the admin listener), and a hook called once per completed response (the
        # access log).
        self.timing: list[int] | None = self.latency.counts
        self.observe: Callable[[ClientProtocol, Request], None] | None = None
        self.update_settings(settings)

    def update_settings(self, settings: ProxySettings) -> None:
        """Apply new settings (config reload); open connections keep working."""
        old = self.settings
        self.settings = settings
        if (settings.balance, settings.worker_threads) != (self.balancer.policy, self.balancer.worker_threads):
            self.balancer = Balancer(self.table, settings.balance, settings.worker_threads)
        self.retries = settings.retries
        self.response_timeout = settings.response_timeout
        self.idle_timeout = settings.idle_timeout
        self.header_timeout = settings.header_timeout
        self.max_connections = min(settings.max_connections, self.fd_cap)
        self.body_budget = settings.body_buffer_bytes
        # Longer than any legitimate wait of a request for its worker: a retry started just
        # before the response timeout may queue for a connection for another one.
        self.stuck_after = 2 * settings.response_timeout + settings.connect_timeout + 1
        self.max_request_line = settings.max_request_line
        self.max_header_bytes = settings.max_header_bytes
        self.max_headers = settings.max_headers
        self.max_body_bytes = settings.max_body_bytes
        self.head_limit = settings.max_request_line + settings.max_header_bytes + 4096
        if not settings.front_cache_enabled or settings.front_cache_max_bytes <= 0:
            self.cache = None
        elif (self.cache is None or settings.front_cache_max_bytes != old.front_cache_max_bytes
              or settings.front_cache_max_object_bytes != old.front_cache_max_object_bytes):
            self.cache = FrontCache(settings.front_cache_max_bytes, settings.front_cache_max_object_bytes)
        if self.cache is not None:
            self.cache.revalidate_after = settings.front_cache_revalidate

    async def start(self, sock: socket.socket) -> None:
        """Serve the already bound and listening `sock` on the running loop."""
        self.loop = asyncio.get_running_loop()
        self._listener = sock
        self._fit_fd_limit()
        await self._listen()
        self._ticker = self.loop.call_later(TICK, self._tick)

    def _fit_fd_limit(self) -> None:
        """Raise the open file limit to hold max_connections clients, each with an upstream
        connection; where it cannot be, serve fewer clients at once rather than meet EMFILE."""
        wanted = 3 * self.settings.max_connections + FD_RESERVE
        soft = _raise_fd_limit(wanted)
        if soft >= wanted:
            return
        try:
            in_use = len(os.listdir("/proc/self/fd"))
        except OSError:
            in_use = 64
        # Each client may hold its own descriptor, one to a worker and one pooled for reuse.
        self.fd_cap = max(1, (soft - in_use - FD_RESERVE) // 3)
        self.max_connections = min(self.settings.max_connections, self.fd_cap)
        log.warning("the open file limit (%d) cannot hold proxy.maxConnections (%d; that needs about %d): "
                    "serving at most %d clients at once, the rest wait in the listen backlog; raise the limit "
                    "(ulimit -n, or LimitNOFILE= under systemd)", soft, self.settings.max_connections, wanted,
                    self.max_connections)

    async def _listen(self) -> None:
        """Accept clients again (at start, and once below the connection limit)."""
        try:
            # A duplicate, so closing our server never closes the socket the master owns (nor
            # drops the connections waiting in its backlog); create_server calls listen() again:
            # keep the kernel's full backlog, not asyncio's 100.
            server = await self.loop.create_server(self._accept, sock=self._listener.dup(), backlog=self._backlog())
        except OSError as exc:  # (out of descriptors for the duplicate: the next close retries)
            log.error("cannot accept connections: %s", exc)
            return
        finally:
            self._resuming = False
        self._server = server
        if self.draining:
            server.close()
            self._server = None
        elif len(self.conns) >= self.max_connections:
            self._at_limit()

    def _backlog(self) -> int:
        """The kernel's full backlog, or where descriptors are short about as many connections as
        we may serve: one pass of accepts takes the whole backlog, and past the open file limit
        the event loop would have to drop them (it closes what it cannot hold)."""
        return somaxconn() if self.fd_cap >= self.settings.max_connections else max(8, self.fd_cap)

    def _accept(self) -> ClientProtocol:
        """The protocol factory, called as each connection is accepted (its connection_made
        comes later, from the loop: only then does it count in `conns`)."""
        if len(self.conns) + 1 >= self.max_connections and self._server is not None and not self._pausing:
            # Not from in here: closing the server now would also close the connection being
            # accepted. What the same pass of accepts still brings in is served all the same.
            self._pausing = True
            self.loop.call_soon(self._at_limit)
        return ClientProtocol(self)

    def _at_limit(self) -> None:
        """At the connection limit: stop accepting; newcomers wait in the listen backlog."""
        self._pausing = False
        if self._server is None:
            return
        self._server.close()
        self._server = None
        self._watch_backlog()

    def _watch_backlog(self) -> None:
        if not self._watching:
            self._watching = True
            self.loop.add_reader(self._listener.fileno(), self._backlog_waiting)

    def _backlog_waiting(self) -> None:
        """Someone waits in the backlog while we are full: close the longest-idle keep-alive
        connections to make room (as nginx reuses connections). With none idle, the next tick
        looks again."""
        self.loop.remove_reader(self._listener.fileno())
        self._watching = False
        since = self.clock - SHED_AFTER
        idle = [c for c in self.conns if c.current is None and not c.queue and c.phase == IDLE
                and c.idle_since <= since and not c.closed]
        shed = max(1, min(IDLE_SHED, self.max_connections // 16))
        for conn in heapq.nsmallest(shed, idle, key=_idle_since):
            self.shed_idle += 1
            conn._close()

    def connection_gone(self, conn: ClientProtocol) -> None:
        """A client connection is closed: it no longer counts against the limit."""
        conns = self.conns
        conns.discard(conn)
        if self._server is None and len(conns) < self.max_connections:
            self._resume()

    def _resume(self) -> None:
        if self._resuming or self.draining or self.loop is None:
            return
        if self._watching:
            self.loop.remove_reader(self._listener.fileno())
            self._watching = False
        self._resuming = True
        self.spawn(self._listen())

    def reserve_body(self, req: Request, size: int) -> bool:
        """Count `req`'s body as `size` bytes against the budget shared by every connection."""
        extra = size - req.body_reserved
        if self.body_bytes + extra > self.body_budget:
            return False
        self.body_bytes += extra
        req.body_reserved = size
        return True

    def release_body(self, req: Request) -> None:
        self.body_bytes -= req.body_reserved
        req.body_reserved = 0

    def shortage(self) -> None:
        """The master ran out of descriptors (or buffers, or memory): shed what it holds idle."""
        self.shortages += 1
        self.pool.close_idle()
        if self.clock - self._shortage_logged >= 10:
            self._shortage_logged = self.clock
            log.warning("the master is short of file descriptors or memory: answering 503 and closing idle "
                        "connections (%d client connections now)", len(self.conns))

    def purge_front_cache(self) -> None:
        """Forget every stored response, and those on their way (a reload changed what is served);
        idle connections go too, lest one reach a worker process that is draining."""
        self.cache_epoch += 1
        if self.cache is not None:
            self.cache.clear()
        self.pool.close_idle()

    def spawn(self, coro: Any) -> None:
        """Run `coro` as a task, holding a reference until it is done; its failure is logged."""
        task = self.loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("proxy task failed", exc_info=task.exception())

    def _update_date(self) -> None:
        now = int(time.time())
        if now != self._last_date:
            self._last_date = now
            self.date_line = b"Date: " + formatdate(now, usegmt=True).encode() + CRLF

    def _tick(self) -> None:
        self.clock = now = time.monotonic()
        self._update_date()
        try:
            if self._server is None and not self._resuming and not self.draining and self._listener is not None:
                if len(self.conns) < self.max_connections:
                    self._resume()
                else:
                    self._watch_backlog()
            for conn in [c for c in self.conns if c.deadline < now or c.write_paused]:
                try:
                    conn.timeout(now)
                except Exception:
                    log.exception("proxy error while timing out a connection; closing it")
                    conn.abort()
            self.pool.expire_waiting(now)
            for up in self.pool.timed_out(now):
                self.timeouts += 1
                up._fail(UpstreamError("worker response timed out", 504, passive=True))
            self.pool.sweep(now)
        except Exception:  # a bug here must not stop every future timeout
            log.exception("proxy timeout sweep failed")
        self._ticker = self.loop.call_later(TICK, self._tick)

    async def shutdown(self, timeout: float) -> None:
        """Stop accepting, let in-flight requests finish (up to `timeout`), close the rest."""
        self.draining = True
        if self._server is not None:
            self._server.close()
            self._server = None
        if self._watching:
            self.loop.remove_reader(self._listener.fileno())
            self._watching = False
        for conn in list(self.conns):
            if conn.current is None and not conn.queue and conn.phase == IDLE:
                conn._close()
        self.pool.close_idle()
        deadline = time.monotonic() + timeout
        while self.conns and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for conn in list(self.conns):
            conn.abort()
        for up in list(self.pool.busy):
            up.close()
        self.pool.close_idle()
        if self._ticker is not None:
            self._ticker.cancel()
            self._ticker = None

    def stats(self) -> dict[str, Any]:
        """Counters for the admin page and metrics."""
        cache = self.cache
        return {
            "requests": self.requests,
            "responses": {f"{i}xx": self.status_counts[i] for i in range(1, 6)},
            "front_cache": {
                "enabled": cache is not None,
                "hits": cache.hits if cache else 0,
                "misses": cache.misses if cache else 0,
                "stores": cache.stores if cache else 0,
                "entries": len(cache) if cache else 0,
                "bytes": cache.bytes if cache else 0,
                "max_bytes": self.settings.front_cache_max_bytes,
                "revalidated": cache.revalidated if cache else 0,
            },
            "retries": self.retries_done,
            "stale_retries": self.stale_retries,
            "upstream_errors": self.upstream_errors,
            "no_healthy_worker": self.no_worker,
            "truncated_responses": self.truncated,
            "timeouts": self.timeouts,
            "rejected_connections": self.rejected,
            "rejected_requests": self.rejected_requests,
            "shed_idle_connections": self.shed_idle,
            "shortages": self.shortages,
            "body_buffer_bytes": self.body_bytes,
            "client_connections": len(self.conns),
            "upstream_connections": self.pool.counts(),
        }


def _raise_fd_limit(wanted: int) -> int:
    """Raise the soft open file limit towards `wanted` (up to the hard limit); the limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return wanted
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            return target
        except (ValueError, OSError):
            pass
    return soft


def _idle_since(conn: ClientProtocol) -> float:
    return conn.idle_since


__all__ = ["ClientProtocol", "Proxy", "Request"]
