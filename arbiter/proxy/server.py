"""The client side of the front proxy: one asyncio Protocol per client connection, parsing
requests with httptools, enforcing limits, answering from the front cache or relaying a worker's
response, in order, with keep-alive and back-pressure; and `Proxy`, which owns them all."""
from __future__ import annotations

import asyncio
import logging
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
from .cache import FrontCache, freshness
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


# Written before any request is read when the proxy is at max_connections.
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
                 "cache_age", "born", "length")

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


class ClientProtocol(asyncio.Protocol):
    """One client connection: parse, queue in order, answer from the cache or relay a worker."""

    __slots__ = ("proxy", "transport", "parser", "req", "queue", "current", "phase", "deadline", "raw_head",
                 "closed", "no_more", "eof", "upstream", "pending_head", "out_mode", "close_after",
                 "write_paused", "read_paused", "stall_since", "peer")

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

    # -- asyncio.Protocol -----------------------------------------------------------------
    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        proxy = self.proxy
        if len(proxy.conns) >= proxy.max_connections or proxy.draining:
            proxy.rejected += 1
            self.closed = True
            transport.write(BUSY)
            transport.close()
            return
        proxy.conns.add(self)
        self.parser = HttpRequestParser(self)
        self.deadline = proxy.clock + proxy.header_timeout

    def data_received(self, data: bytes) -> None:
        parser = self.parser
        if parser is None or self.no_more:
            return
        if self.phase != IN_BODY:
            self.raw_head += len(data)
        try:
            parser.feed_data(data)
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

    def eof_received(self) -> bool | None:
        self.eof = True
        self.no_more = True
        if self.current is None and not self.queue:
            return None  # nothing left to answer: close
        return True  # half-close: still write the queued responses, then close

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.proxy.conns.discard(self)
        self._detach_upstream()

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
        lname = name.lower()
        code = REQUEST_HEADERS.get(lname, _FWD)
        if code == _FWD:
            req.fwd += (name, SEP, value, CRLF)
        elif code == _AE:
            req.ae = value if req.ae is None else req.ae + b", " + value
            req.fwd += (name, SEP, value, CRLF)
        elif code == _HOST:
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
        if req.connection is not None:
            self._drop_connection_named(req)
        if req.expect is not None:
            if req.expect.lower() != b"100-continue":
                raise _Reject(417)
            if req.body is not None and self.current is None and not self.queue and not self.closed:
                self.transport.write(CONTINUE)
        self.phase = IN_BODY
        self.raw_head = 0
        self.deadline = proxy.clock + proxy.header_timeout

    def on_body(self, body: bytes) -> None:
        req = self.req
        req.body_size += len(body)
        if req.body_size > self.proxy.max_body_bytes:
            raise _Reject(413)
        req.body.append(body)
        self.deadline = self.proxy.clock + self.proxy.header_timeout

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
        named = {t.strip().lower() for t in req.connection.split(b",")} - {b"close", b"keep-alive", b""}
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
        queue = self.queue
        queue.append(req)
        if len(queue) == 1 and self.current is None:
            self._serve(req)
        elif len(queue) >= MAX_PIPELINE and not self.read_paused and not self.closed:
            self.read_paused = True
            self.transport.pause_reading()

    def _reject(self, status: int) -> None:
        """Answer a malformed or over-limit request (after those before it) and close."""
        req = self.req or Request()
        self.req = None
        req.error = status
        req.keep_alive = False
        self.no_more = True
        self.parser = None
        if not self.closed and not self.read_paused:
            self.read_paused = True
            self.transport.pause_reading()
        self.proxy.rejected_requests += 1
        self._enqueue(req)

    def _serve(self, req: Request) -> None:
        self.current = req
        if self.closed:
            return
        if req.error:
            self._respond_error(req, req.error)
            return
        proxy = self.proxy
        method = req.method
        cache = proxy.cache
        if cache is not None and (method == GET or method == HEAD) and not req.bypass:
            entry = cache.get(req.target, req.ae)
            if entry is not None:
                age = int(proxy.clock - entry.born) + entry.initial_age
                if age != entry.age:
                    entry.prepare(age)
                keep = req.keep_alive and not proxy.draining
                if (req.inm is not None or req.ims is not None) and entry.not_modified(req.inm, req.ims):
                    data = (entry.nm_ka if req.http10 else entry.nm) if keep else entry.nm_close
                    proxy.status_counts[3] += 1
                    req.status = 304
                elif method == HEAD:
                    data = (entry.head_ka if req.http10 else entry.head) if keep else entry.head_close
                    proxy.status_counts[2] += 1
                    req.status = 200
                else:
                    data = (entry.full_ka if req.http10 else entry.full) if keep else entry.full_close
                    if data is None:
                        self.transport.write((entry.head_ka if req.http10 else entry.head) if keep else entry.head_close)
                        data = entry.body
                    proxy.status_counts[2] += 1
                    req.status = 200
                    req.length = len(entry.body)
                self.transport.write(data)
                self._finish(req, keep)
                return
            req.cacheable = method == GET
        req.t0 = proxy.clock
        self._forward(req)

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
        queue = self.queue
        if queue and queue[0] is req:
            queue.popleft()
        self.current = None
        if not keep or self.closed or proxy.draining:
            self._close()
            return
        if queue:
            self._serve(queue[0])
            return
        if self.eof:
            self._close()
            return
        if self.phase == IDLE:
            self.deadline = proxy.clock + proxy.idle_timeout
        if self.read_paused and not self.no_more:
            self.read_paused = False
            self.transport.resume_reading()

    def _close(self) -> None:
        if not self.closed:
            self.closed = True
            self._detach_upstream()
            self.transport.close()

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
        conn.send(self, req.payload, req.method == HEAD)

    def _payload(self, req: Request) -> bytes:
        """The request as the worker gets it: hop-by-hop headers gone, forwarding headers set."""
        if self.peer is None:
            peer = self.transport.get_extra_info("peername")
            self.peer = (peer[0] if isinstance(peer, tuple) else "unknown").encode()
        parts = [req.method, b" ", req.target, b" HTTP/1.1\r\n"]
        parts += req.fwd
        if req.host is None:  # HTTP/1.0 without Host; HTTP/1.1 requires one upstream
            sock = self.transport.get_extra_info("sockname")
            host = (f"{sock[0]}:{sock[1]}" if isinstance(sock, tuple) else "localhost").encode()
            parts += (b"Host: ", host, CRLF)
        else:
            parts += (b"X-Forwarded-Host: ", req.host, CRLF)
        parts += (b"X-Forwarded-For: ", req.xff + b", " + self.peer if req.xff else self.peer, CRLF,
                  b"X-Forwarded-Proto: http\r\nVia: ", req.via + b", " + VIA_SELF if req.via else VIA_SELF, CRLF)
        body = req.body
        if body is not None:
            parts += (b"Content-Length: %d\r\n\r\n" % len(body), body)
        elif req.cl is not None or req.method in (b"POST", b"PUT", b"PATCH"):
            parts.append(b"Content-Length: 0\r\n\r\n")
        else:
            parts.append(CRLF)
        return b"".join(parts)

    # -- the worker's answer (called by UpstreamConnection) -------------------------------
    def upstream_head(self, conn: UpstreamConnection, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        req = self.current
        proxy = self.proxy
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
            if req.cache_size > self.proxy.cache.max_object_bytes:
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
            if len(data) <= 16384:
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
        head = self.pending_head
        if self.out_mode == CHUNKED:
            self.pending_head = None
            self.transport.write(head + LAST_CHUNK if head is not None else LAST_CHUNK)
        elif head is not None:
            self.pending_head = None
            self.transport.write(head)
        req.started = True
        if req.cache_parts is not None:
            if proxy.cache is not None:  # (unless switched off meanwhile)
                proxy.cache.store(req.target, req.ae, req.cache_vary,
                                  [(n.lower(), n, v) for n, v in req.cache_headers],
                                  b"".join(req.cache_parts), req.cache_ttl, req.cache_age)
            req.cache_parts = None
        elif req.method not in SAFE and proxy.cache is not None and req.status < 400:
            proxy.cache.invalidate(req.target)
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
        if self.current is not None:
            if self.write_paused and now - self.stall_since > self.proxy.response_timeout:
                self.closed = True  # the client stopped reading; drop what it did not take
                self._detach_upstream()
                self.transport.abort()
            return
        if now <= self.deadline or self.queue:
            return
        if self.phase == IDLE:
            self.closed = True
            self._detach_upstream()
            if self.transport.get_write_buffer_size():
                self.transport.abort()
            else:
                self.transport.close()
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
        self._server: Any = None
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
        self.rejected = 0  # connections refused at max_connections
        self.rejected_requests = 0  # malformed or over a limit
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
        self.max_connections = settings.max_connections
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

    async def start(self, sock: socket.socket) -> None:
        """Serve the already bound and listening `sock` on the running loop."""
        self.loop = loop = asyncio.get_running_loop()
        _raise_fd_limit(2 * self.settings.max_connections + 256)
        # create_server calls listen() again: keep the kernel's full backlog, not asyncio's 100.
        # A duplicate, so closing our server never closes the socket the master owns.
        self._server = await loop.create_server(lambda: ClientProtocol(self), sock=sock.dup(),
                                                backlog=somaxconn())
        self._ticker = loop.call_later(TICK, self._tick)

    def spawn(self, coro: Any) -> None:
        """Run a connect attempt as a task, holding a reference until it is done."""
        task = self.loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _update_date(self) -> None:
        now = int(time.time())
        if now != self._last_date:
            self._last_date = now
            self.date_line = b"Date: " + formatdate(now, usegmt=True).encode() + CRLF

    def _tick(self) -> None:
        self.clock = now = time.monotonic()
        self._update_date()
        try:
            for conn in [c for c in self.conns if c.deadline < now or c.write_paused]:
                conn.timeout(now)
            self.pool.expire_waiting(now)
            for up in self.pool.timed_out(now):
                self.timeouts += 1
                up._fail(UpstreamError("worker response timed out", 504))
            self.pool.sweep(now)
        except Exception:  # a bug here must not stop every future timeout
            log.exception("proxy timeout sweep failed")
        self._ticker = self.loop.call_later(TICK, self._tick)

    async def shutdown(self, timeout: float) -> None:
        """Stop accepting, let in-flight requests finish (up to `timeout`), close the rest."""
        self.draining = True
        if self._server is not None:
            self._server.close()
        for conn in list(self.conns):
            if conn.current is None and not conn.queue and conn.phase == IDLE:
                conn._close()
        self.pool.close_idle()
        deadline = time.monotonic() + timeout
        while self.conns and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for conn in list(self.conns):
            conn.closed = True
            conn._detach_upstream()
            conn.transport.abort()
        for up in list(self.pool.busy):
            up.close()
        self.pool.close_idle()
        if self._ticker is not None:
            self._ticker.cancel()
            self._ticker = None
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

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
            },
            "retries": self.retries_done,
            "stale_retries": self.stale_retries,
            "upstream_errors": self.upstream_errors,
            "no_healthy_worker": self.no_worker,
            "truncated_responses": self.truncated,
            "timeouts": self.timeouts,
            "rejected_connections": self.rejected,
            "rejected_requests": self.rejected_requests,
            "client_connections": len(self.conns),
            "upstream_connections": self.pool.counts(),
        }


def _raise_fd_limit(wanted: int) -> None:
    """Each client connection may hold an upstream one: make room for max_connections of both."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            log.warning("could not raise the open file limit to %d (now %d)", target, soft)


__all__ = ["ClientProtocol", "Proxy", "Request"]
