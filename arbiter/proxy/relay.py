"""A request on its way to a worker and back: choosing the worker, retrying another when one
fails before any byte reached the client, rewriting the request and the response at the proxy's
border, and keeping the answer for the front cache (Go's ReverseProxy: Rewrite, ModifyResponse,
ErrorHandler, around the pool's Transport).

One Relay per request that a worker answers; front-cache hits never make one. The upstream
connection talks to it as a `ResponseSink`, and it talks to its client connection through the
`Client` protocol below: neither side reaches into the other.
"""
from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any, Protocol

from fileapp.handoff import FileRef

from ..state import WorkerState
from .cache import Entry, freshness
from .counters import FILE_REFUSED, NO_WORKER, PIPELINED, RETRIES, STALE_RETRIES, TRUNCATED, UPSTREAM_ERRORS, WORKERS
from .filebody import file_ref, open_file
from .http1 import (CONN_CLOSE, CONN_KEEP, CRLF, GET, HEAD, IDEMPOTENT, LAST_CHUNK, R_AGE, R_CC, R_CL,
                    R_CONNECTION, R_DROP, R_FILE, R_FWD, R_NOSTORE, R_TE, R_VARY, R_VIA, RESPONSE_HEADERS,
                    SAFE, SEP, TE_CHUNKED, VIA_SELF, connection_named, drop_named, status_line)
from .request import Request
from .rewrite import worker_request_head
from .sharing import learned
from .sink import UpstreamError
from .upstream import UpstreamConnection

log = logging.getLogger("gows.proxy")

if TYPE_CHECKING:
    from .server import Proxy

# How a relayed response body is written to the client.
RAW, CHUNKED, NOBODY = 0, 1, 2
JOIN_LIMIT = 16384  # a head and a body chunk up to this size leave in one joined write, bigger as two


class Client(Protocol):
    """What a relay needs of the client connection it answers."""

    transport: Any
    closed: bool
    write_paused: bool
    scheme: bytes  # b"http" or b"https": the client's, as the worker is told it

    def remote(self) -> bytes: ...
    def finish(self, req: Request, keep: bool) -> None: ...
    def send_file(self, head: bytes, fd: int, offset: int, count: int, req: Request, keep: bool) -> None: ...
    def respond_error(self, req: Request, status: int) -> None: ...
    def answer_from(self, entry: Entry, req: Request) -> bool: ...
    def close(self) -> None: ...
    def abort(self) -> None: ...


class Relay:
    """One request forwarded to a worker, until its response is relayed or has failed."""

    __slots__ = ("client", "req", "proxy", "transport", "worker", "tried", "tries", "fresh", "sent", "started",
                 "t0", "upstream", "payload", "pending_head", "out_mode", "close_after", "cacheable", "cache_vary",
                 "cache_parts", "cache_size", "cache_ttl", "cache_headers", "cache_age", "stale", "epoch", "live",
                 "handoff", "no_handoff", "refetch", "file")

    def __init__(self, client: Client, req: Request, proxy: Proxy, cacheable: bool, stale: Entry | None) -> None:
        self.client = client
        self.req = req
        self.proxy = proxy
        self.transport = client.transport
        self.worker: WorkerState | None = None  # holding a place in its in_flight count
        self.tried: list[WorkerState] | None = None
        self.tries = 0
        self.fresh = False  # the next attempt needs a new connection (a pooled one went stale)
        self.sent = False  # the request went out on the current attempt
        self.started = False  # bytes of the response reached the client: no retry possible
        self.t0 = proxy.clock
        self.upstream: UpstreamConnection | None = None
        self.payload = b""  # the request head as workers get it
        self.pending_head: bytes | None = None  # held until the first body bytes
        self.out_mode = RAW
        self.close_after = False
        self.cacheable = cacheable  # a GET the front cache could keep the answer to
        self.cache_vary = False
        self.cache_parts: list[bytes] | None = None  # the body so far, while it may be stored
        self.cache_size = 0
        self.cache_ttl = 0
        self.cache_headers: list[tuple[bytes, bytes]] | None = None
        self.cache_age = 0
        self.stale = stale  # the front-cache entry this request revalidates with the worker
        self.epoch = proxy.cache_epoch  # a reload purges the front cache: older answers are not stored
        self.live = True  # its client still waits for it
        self.handoff = False  # the payload asks the worker to name the file rather than send it
        self.no_handoff = False  # the named file failed the check: the worker sends the bytes
        self.refetch = False  # ask again without a hand-off once the worker's empty answer ends
        self.file: tuple[int, FileRef] | None = None  # a file body the proxy sends: (open fd, what)

    # -- choosing a worker -----------------------------------------------------------------
    def forward(self, failed: UpstreamError | None = None) -> None:
        """Send the request to the balancer's pick (another one than those `tried`)."""
        proxy = self.proxy
        worker = proxy.balancer.pick(self.req.target, self.tried)
        if worker is None:
            if failed is not None:  # no other worker left to retry on
                self._error(failed.status)
            elif not proxy.hold(self):  # (held while gows starts: forwarded once a worker is up)
                self.no_worker()
            return
        if failed is not None:
            proxy.counts[RETRIES] += 1
        self.worker = worker
        worker.in_flight += 1
        proxy.counts[WORKERS + worker.slot] += 1
        # A local worker names a file body rather than send it (fileapp.handoff).
        handoff = (worker.local and proxy.handoff_line is not None and self.req.method == GET
                   and not self.no_handoff)
        if not self.payload or handoff != self.handoff:
            self.handoff = handoff
            self.payload = self._rewrite()
        fresh = self.fresh
        self.fresh = False
        proxy.pool.checkout(self, worker, fresh)

    def no_worker(self) -> None:
        """No worker to send this request to: 503, with Retry-After."""
        self.proxy.counts[NO_WORKER] += 1
        self._error(503)

    def _forward_to(self, worker: WorkerState) -> None:
        """Again to the same worker, on a fresh connection."""
        if not worker.up:
            self.forward()
            return
        self.worker = worker
        worker.in_flight += 1
        self.fresh = False
        self.proxy.pool.checkout(self, worker, fresh=True)

    def wants(self, worker: WorkerState) -> bool:
        """Whether this still waits for a connection to `worker` (its client may have left)."""
        return self.live and self.worker is worker and not self.client.closed

    def may_resend(self) -> bool:
        """Whether this may go to another worker even once sent: idempotent, nothing relayed yet."""
        return not self.started and self.req.method in IDEMPOTENT

    def pipelinable(self) -> bool:
        """Whether this may go behind other requests on a connection: a GET without a body, to a
        client that takes what it is sent (it would stall those behind it otherwise)."""
        req = self.req
        return req.method == GET and req.body is None and not self.client.write_paused

    def start_behind(self, conn: UpstreamConnection) -> None:
        """Send the request on `conn` behind those in flight there, and relay the answer in turn."""
        self.upstream = conn
        self.sent = True
        self.proxy.counts[PIPELINED] += 1
        conn.send_behind(self, self.payload)

    def requeue(self) -> None:
        """Pipelined behind a request whose connection ended or stalled before this one's answer
        began: sent again on a connection of its own, charged to no one."""
        worker = self._release_worker()
        if not self.live:
            return
        self.sent = False
        if worker is not None and worker.up and worker.ejected_until is None:
            self._forward_to(worker)
        else:
            self.forward()

    def start(self, conn: UpstreamConnection) -> None:
        """Send the request on `conn` (from the pool) and relay the answer."""
        self.upstream = conn
        self.sent = True
        if self.client.write_paused:
            conn.pause()
        req = self.req
        conn.send(self, self.payload, req.body, req.method == HEAD)

    def detach(self) -> None:
        """The client went away: let go of the worker and the connection (its stream is unusable)."""
        self.live = False
        self._drop_file()
        conn = self.upstream
        if conn is not None:
            self.upstream = None
            conn.detach(self)
        self._release_worker()

    def _release_worker(self) -> WorkerState | None:
        self.upstream = None
        worker = self.worker
        if worker is not None:
            worker.in_flight -= 1
            self.worker = None
        return worker

    def _rewrite(self) -> bytes:
        """The request head as the worker gets it (rewrite.worker_request_head)."""
        handoff_line = self.proxy.handoff_line if self.handoff else None
        return worker_request_head(self.req, self.client.remote(), self.transport, handoff_line, self.stale,
                                   self.client.scheme)

    # -- the worker's answer (a ResponseSink, called by UpstreamConnection) ---------------------
    def upstream_head(self, conn: UpstreamConnection, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        req = self.req
        proxy = self.proxy
        if self.client.write_paused:  # (sent behind others, before its client filled up)
            conn.pause(self)
        if status >= 500 or conn.worker.failure_streak:
            shedding = status == 503 and any(name.lower() == b"retry-after" for name, _ in headers)
            proxy.outliers.answered(conn.worker, status, shedding)
        stale = self.stale
        if stale is not None:
            stale.revalidating = 0.0
            if status == 304:  # still current: the stored response answers (see upstream_done)
                self.out_mode = NOBODY
                self.pending_head = None
                self.close_after = not req.keep_alive
                return
            self.stale = None
            if proxy.cache is not None:  # changed (stored anew below if it may be), gone, broken
                proxy.cache.invalidate(req.target)
        out = [status_line(status)]
        cl = te = connection = via = cc = vary = age = named = None
        nostore = False
        for name, value in headers:
            code = RESPONSE_HEADERS.get(name.lower(), R_FWD)
            if code == R_FWD:
                out += (name, SEP, value, CRLF)
            elif code == R_CL:
                cl = value
            elif code == R_TE:
                te = value
            elif code == R_CONNECTION:
                connection = value if connection is None else connection + b"," + value
            elif code == R_VIA:
                via = value if via is None else via + b", " + value
            elif code == R_FILE:
                named = value  # never forwarded; honoured only as asked for, below
            elif code != R_DROP:
                out += (name, SEP, value, CRLF)
                if code == R_CC:
                    cc = value if cc is None else cc + b", " + value
                elif code == R_NOSTORE:
                    nostore = True
                elif code == R_VARY:
                    vary = value if vary is None else vary + b", " + value
                elif code == R_AGE:
                    age = value
        # (what Connection names is this hop's alone: dropped, and never repeated from the cache)
        named_away = connection_named(connection) if connection is not None else None
        if named_away:
            out = drop_named(out, named_away, start=1)
        if named is not None and self.handoff and (status == 200 or status == 206) and self.file is None:
            if not self._take_file(named, cl):
                return
            cl = b"%d" % self.file[1].count
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
        if not keep:
            out.append(CONN_CLOSE)
        elif req.http10:
            out.append(CONN_KEEP)
        hsts = proxy.tls.hsts
        if hsts is not None and self.client.scheme == b"https":
            out.append(hsts)
        out += (b"Via: ", via + b", " + VIA_SELF if via else VIA_SELF, CRLF, CRLF)
        self.close_after = not keep
        self.out_mode = mode
        # Held back until the first body bytes (one write, and a worker dying before its body
        # starts can still be retried: nothing has reached the client).
        self.pending_head = b"".join(out)
        req.status = status
        req.length = cl if mode != NOBODY else None
        proxy.status_counts[status // 100 if status < 600 else 5] += 1
        cache = proxy.cache
        if (self.cacheable and status == 200 and not nostore and mode != NOBODY and cache is not None
                and (vary is None or vary.strip().lower() == b"accept-encoding")
                # (a file body is stored as the file's name: it weighs nothing)
                and (cl is None or self.file is not None or int(cl) <= cache.max_object_bytes)):
            ttl = freshness(cc)
            if ttl > 0:
                self.cache_vary = vary is not None
                self.cache_ttl = ttl
                self.cache_headers = headers if not named_away else \
                    [(n, v) for n, v in headers if n.lower() not in named_away]
                self.cache_parts = [] if self.file is None else None
                self.cache_size = 0
                self.cache_age = int(age) if age is not None and age.isdigit() else 0

    def upstream_body(self, data: bytes) -> None:
        mode = self.out_mode
        if mode == NOBODY or not self.live:
            return
        if self.cache_parts is not None:
            self.cache_size += len(data)
            cache = self.proxy.cache
            if cache is None or self.cache_size > cache.max_object_bytes:  # (or switched off by a reload)
                self.cache_parts = None
            else:
                self.cache_parts.append(data)
        transport = self.transport
        head = self.pending_head
        if mode == CHUNKED:
            frame = b"%x\r\n" % len(data)
            if head is not None:
                self.pending_head = None
                self.started = True
                frame = head + frame
            transport.writelines((frame, data, CRLF))
        elif head is not None:
            self.pending_head = None
            self.started = True
            if len(data) <= JOIN_LIMIT:
                transport.write(head + data)
            else:
                transport.writelines((head, data))
        else:
            transport.write(data)

    def _take_file(self, named: bytes, cl: bytes | None) -> bool:
        """Open the file a worker named for the body and check it is the one the worker saw;
        False (and ask again, for the bytes) when it is not (fileapp.handoff)."""
        ref = file_ref(named)
        fd = open_file(ref) if ref is not None and cl == b"0" else None
        if fd is None:
            self.proxy.counts[FILE_REFUSED] += 1
            self.refetch = True
            self.out_mode = NOBODY
            return False
        self.file = (fd, ref)
        return True

    def _drop_file(self) -> None:
        if self.file is not None:
            os.close(self.file[0])
            self.file = None

    def upstream_done(self, conn: UpstreamConnection) -> None:
        self._release_worker()
        if not self.live:
            return
        req = self.req
        proxy = self.proxy
        if self.refetch:  # the named file failed its check: ask for the bytes instead
            self.refetch = False
            self.no_handoff = True
            self.sent = False
            self.forward()
            return
        cache = proxy.cache
        stale = self.stale
        if stale is not None:  # the worker answered 304 to our revalidation
            self.stale = None
            if cache is not None and self.epoch == proxy.cache_epoch:
                cache.refresh(stale)
            if not self.client.answer_from(stale, req):  # a stored file that changed meanwhile
                if cache is not None:
                    cache.invalidate(req.target)
                self.payload = b""
                self.forward()
            return
        head = self.pending_head
        self.pending_head = None
        self.started = True
        if self.file is not None:
            fd, ref = self.file
            self.file = None
            if self.cache_headers is not None and cache is not None and self.epoch == proxy.cache_epoch:
                entry = cache.store(req.target, req.ae, self.cache_vary,
                                    [(n.lower(), n, v) for n, v in self.cache_headers], b"", self.cache_ttl,
                                    self.cache_age, ref)
                if entry is not None and proxy.share is not None:
                    proxy.share(learned(req.target, req.ae, self.cache_vary, self.cache_headers, self.cache_ttl,
                                        self.cache_age, entry.born, ref))
            self.client.send_file(head or b"", fd, ref.offset, ref.count, req, not self.close_after)
            return
        if self.out_mode == CHUNKED:
            self.transport.write(head + LAST_CHUNK if head is not None else LAST_CHUNK)
        elif head is not None:
            self.transport.write(head)
        if self.cache_parts is not None:
            # Unless switched off meanwhile, or purged by a reload since the request left.
            if cache is not None and self.epoch == proxy.cache_epoch:
                cache.store(req.target, req.ae, self.cache_vary, [(n.lower(), n, v) for n, v in self.cache_headers],
                            b"".join(self.cache_parts), self.cache_ttl, self.cache_age)
            self.cache_parts = None
        elif req.method not in SAFE and cache is not None and req.status < 400:
            cache.invalidate(req.target)
        self.client.finish(req, not self.close_after)

    def upstream_failed(self, conn: UpstreamConnection | None, error: UpstreamError) -> None:
        worker = self._release_worker()
        self.refetch = False
        self._drop_file()
        req = self.req
        proxy = self.proxy
        proxy.counts[UPSTREAM_ERRORS] += 1
        if error.passive and worker is not None:
            proxy.table.record_passive_failure(worker, error.reason)
            proxy.outliers.failed(worker, error.reason)
        if not self.live:
            return
        self.pending_head = None
        if self.started:
            # Bytes of this response already reached the client: all we can do is end the
            # connection so the client sees the truncation (never bytes of another response).
            proxy.counts[TRUNCATED] += 1
            self.client.close()
            return
        self.cache_parts = None
        if req.status:
            # A head was parsed but nothing reached the client: forget its counting.
            proxy.status_counts[req.status // 100 if req.status < 600 else 5] -= 1
            req.status = 0
        if error.local:  # the proxy ran short itself: shed this request, blame no worker
            proxy.shortage()
            self._error(503)
            return
        may_resend = not self.sent or req.method in IDEMPOTENT
        if may_resend and proxy.clock - self.t0 < proxy.config.response_timeout:
            if error.stale and worker is not None:
                # A keep-alive connection the worker had closed: same worker, fresh connection.
                self.fresh = True
                self.sent = False
                proxy.counts[STALE_RETRIES] += 1
                self._forward_to(worker)
                return
            if self.tries < proxy.config.retries:
                self.tries += 1
                self.sent = False
                if worker is not None:
                    if self.tried is None:
                        self.tried = []
                    self.tried.append(worker)
                self.forward(error)
                return
        self._error(error.status)

    def abort(self) -> None:
        """The proxy itself failed while relaying: the client connection ends."""
        self.client.abort()

    def _error(self, status: int) -> None:
        self.live = False
        self.client.respond_error(self.req, status)
