"""The client side of the front proxy: one asyncio Protocol per client connection, reading
requests (reader.py) and answering them in order: from the front cache, with a response of its
own, or through a Relay to a worker, with keep-alive and back-pressure.

A connection object and a request object (uvicorn's HttpToolsProtocol and RequestResponseCycle):
what lives as long as the connection is here, what lives as long as one request is in Request,
and a worker's answer in its Relay.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from httptools import HttpRequestParser

from .cache import Entry
from .counters import FILE_BODIES, FILE_REFUSED, HEALTH_CHECKS, REJECTED, TIMEOUTS, TRUNCATED
from .filebody import BodySender, FileSender, file_unchanged, open_file
from .http1 import BUSY, GET, HEAD, NO_STORE, error_response
from .reader import IDLE, MAX_PIPELINE, RequestReader
from .relay import JOIN_LIMIT, Relay
from .request import Request, now_ns
from .stats import SUM, SUM_WRAP

if TYPE_CHECKING:
    from .server import Proxy

log = logging.getLogger("gows.proxy")
PLAIN_SCHEME = b"http"


class ClientProtocol(RequestReader):
    """One client connection: read requests, queue them in order, answer each from the cache,
    with an error of the proxy's own, or through a Relay to a worker."""

    __slots__ = ("relay", "eof", "write_paused", "stall_since", "peer", "pumping", "idle_since", "sender",
                 "sending", "accepted", "full", "leaving")
    scheme = PLAIN_SCHEME  # as workers are told it (X-Forwarded-Proto)
    sender_class: type[BodySender] = FileSender  # what sends a file body (sendfile to the socket: not over TLS)

    def __init__(self, proxy: Proxy) -> None:
        super().__init__(proxy)
        self.relay: Relay | None = None  # the current request's way to a worker, when it has one
        self.eof = False
        self.write_paused = False
        self.stall_since = 0.0
        self.peer: bytes | None = None
        self.pumping = False  # _pump is running: what it calls must not start it again
        self.idle_since = 0.0  # when the connection last had no request in progress
        self.sender: BodySender | None = None  # sending a file body
        self.sending: tuple[Request, bool] | None = None  # its request, and whether to keep alive after
        self.full = False  # between the transport's pause_writing and resume_writing
        self.accepted = proxy.clock  # the TLS handshake, if any, counts against the head's deadline
        self.leaving = False  # handed over to another proxy (Listeners.hand_over): close after a response

    # -- asyncio.Protocol -----------------------------------------------------------------
    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        proxy = self.proxy
        if proxy.draining:
            self.closed = self.no_more = True
            proxy.counts[REJECTED] += 1
            transport.write(BUSY)
            transport.close()
            return
        proxy.conns.add(self)
        self.parser = HttpRequestParser(self)
        self.idle_since = proxy.clock
        self.deadline = self.accepted + proxy.config.header_timeout

    def eof_received(self) -> bool | None:
        self.eof = True
        self.no_more = True
        if self.current is None and not self.queue:
            return None  # nothing left to answer: close
        return True  # half-close: still write the queued responses, then close

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = self.no_more = True
        self._detach()
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
        self.write_paused = self.full = True
        self.stall_since = self.proxy.clock
        if self.sender is not None:
            self.sender.pause()
        relay = self.relay
        if relay is not None and relay.upstream is not None:
            relay.upstream.pause(relay)

    def resume_writing(self) -> None:
        self.full = False
        if self.sender is not None:  # the file body's stall clock runs on (send_file)
            self.sender.resume()
            return
        self.write_paused = False
        relay = self.relay
        if relay is not None and relay.upstream is not None:
            relay.upstream.resume(relay)
        elif self.current is None and self.queue and not self.pumping:
            self._pump()  # (answers held back while the client's buffer was full)

    # -- request queue ----------------------------------------------------------------------
    def _enqueue(self, req: Request) -> None:
        self.queue.append(req)
        if self.current is None and not self.pumping:
            self._pump()

    def _pump(self) -> None:
        """Serve the queued requests in order and parse held-back bytes as room frees up.

        A loop, never recursion: a front-cache hit is answered at once, and a thousand pipelined
        hits must not become a thousand nested calls.
        """
        self.pumping = True
        try:
            while not self.closed:
                if self.current is None and self.queue:
                    if self.full:
                        # The client is not taking what it was sent: answer nothing more (a
                        # pipelined front-cache hit would be buffered whole for it) until
                        # resume_writing; the queue fills and reading stops (MAX_PIPELINE).
                        return
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
            self.close()
            return
        if self.phase == IDLE:
            self.idle_since = self.proxy.clock
            self.deadline = self.idle_since + self.proxy.config.idle_timeout
        if self.read_paused and self.held is None and not self.no_more:
            self.read_paused = False
            self.transport.resume_reading()

    def _serve(self, req: Request) -> None:
        self.current = req
        if self.leaving and len(self.queue) == 1:  # (not with pipelined requests behind it)
            req.keep_alive = False  # its answer says Connection: close; the client comes back elsewhere
            self.no_more = True
        if req.error:
            self.respond_error(req, req.error)
            return
        proxy = self.proxy
        method = req.method
        if req.target == proxy.health_target and (method == GET or method == HEAD):
            self.respond_health(req)
            return
        cache = proxy.cache
        stale = None
        cacheable = False
        if cache is not None and (method == GET or method == HEAD) and not req.bypass:
            entry = cache.get(req.target, req.ae, proxy.clock)
            if entry is not None:
                if entry.servable(proxy.clock):
                    if self.answer_from(entry, req):
                        return
                    cache.invalidate(req.target)  # a stored file that changed: ask a worker
                # Older than the workers' own cache TTL: ask a worker whether it still holds (one
                # request does; others get the stored answer meanwhile).
                elif req.inm is None and req.ims is None and (entry.etag is not None or entry.last_modified is not None):
                    entry.revalidating = proxy.clock
                    stale = entry
            cacheable = method == GET
        relay = self.relay = Relay(self, req, proxy, cacheable, stale)
        relay.forward()

    # -- answers (the Client side of a Relay) -----------------------------------------------
    def answer_from(self, entry: Entry, req: Request) -> bool:
        """Answer `req` with a stored response (a 304 when its validators match); False (and
        nothing written) when it names a file that is no longer the one stored."""
        proxy = self.proxy
        age = int(proxy.clock - entry.born) + entry.initial_age
        if age != entry.age:
            entry.prepare(age)
        keep = req.keep_alive and not proxy.draining
        http10 = req.http10
        hsts = proxy.tls.hsts if self.scheme is not PLAIN_SCHEME else None  # (stored heads have none)
        not_modified = (req.inm is not None or req.ims is not None) and entry.not_modified(req.inm, req.ims)
        if (entry.file is not None and (not_modified or req.method == HEAD)
                and not file_unchanged(entry.file)):  # (a body sent is checked as it is opened)
            proxy.counts[FILE_REFUSED] += 1
            return False
        if not_modified:
            nm = (entry.nm_ka if http10 else entry.nm) if keep else entry.nm_close
            self.transport.write(nm if hsts is None else nm[:-2] + hsts + b"\r\n")
            proxy.status_counts[3] += 1
            req.status = 304
        else:
            head = (entry.head_ka if http10 else entry.head) if keep else entry.head_close
            if hsts is not None:
                head = head[:-2] + hsts + b"\r\n"
            if req.method == HEAD:
                self.transport.write(head)
            elif entry.file is not None:
                ref = entry.file
                fd = open_file(ref)
                if fd is None:
                    proxy.counts[FILE_REFUSED] += 1
                    return False
                proxy.status_counts[2] += 1
                req.status = 200
                req.length = ref.count
                self.send_file(head, fd, ref.offset, ref.count, req, keep)
                return True
            else:
                body = entry.body
                if keep and not http10 and entry.full is not None and head is entry.head:
                    self.transport.write(entry.full)  # the usual keep-alive hit, prepared whole
                elif len(body) <= JOIN_LIMIT:
                    self.transport.write(head + body)
                else:
                    self.transport.writelines((head, body))
                req.length = len(body)
            proxy.status_counts[2] += 1
            req.status = 200
        self.finish(req, keep)
        return True

    def send_file(self, head: bytes, fd: int, offset: int, count: int, req: Request, keep: bool) -> None:
        """Answer `req` with `head` and `count` bytes of the open file `fd` from `offset` as the
        body, then finish it (filebody.FileSender; `fd` is its to close)."""
        proxy = self.proxy
        proxy.counts[FILE_BODIES] += 1
        # While the body leaves, the stall clock tells whether the client still reads.
        self.write_paused = True
        self.stall_since = proxy.clock
        self.sending = (req, keep)
        self.sender = self.sender_class(proxy.loop, self.transport, fd, offset, count, self._file_sent,
                                 self._file_failed, self._file_progress)
        if self.full:  # (the transport's buffer is full already: wait for resume_writing)
            self.sender.pause()
        self.sender.start(head)

    def _file_progress(self) -> None:
        self.stall_since = self.proxy.clock

    def _file_sent(self) -> None:
        req, keep = self.sending
        self.sender = self.sending = None
        self.write_paused = False
        self.finish(req, keep)

    def _file_failed(self, reason: str, gone: bool) -> None:
        req, _ = self.sending
        self.sender = self.sending = None
        if gone:  # the client's doing: nothing for the operator to act on
            log.debug("client gone during the file body of %r: %s", req.target[:200], reason)
        else:
            log.warning("file body of %r cut short: %s", req.target[:200], reason)
            self.proxy.counts[TRUNCATED] += 1
        self.abort()

    def respond_error(self, req: Request, status: int, extra: bytes = b"") -> None:
        """Answer `req` with a response of the proxy's own (`extra`: header fields, each with its CRLF)."""
        proxy = self.proxy
        keep = req.keep_alive and not req.error and not proxy.draining
        data, req.length = error_response(status, proxy.date_line, keep, req.http10, req.method != HEAD, extra)
        req.status = status
        proxy.status_counts[status // 100] += 1
        if not self.closed:
            self.transport.write(data)
        self.finish(req, keep)

    def respond_health(self, req: Request) -> None:
        """Answer the master's health path for it: 200 while some worker is up and the master
        is not stopping (lame duck, then drain), 503 otherwise. An edge gows checking this node
        sees its readiness, not one worker's."""
        proxy = self.proxy
        proxy.counts[HEALTH_CHECKS] += 1
        healthy = proxy.serving and not proxy.draining and proxy.table.healthy
        self.respond_error(req, 200 if healthy else 503, NO_STORE)

    def finish(self, req: Request, keep: bool) -> None:
        """The response to the current request is written: serve the next one or close."""
        proxy = self.proxy
        timing = proxy.timing
        if timing is not None:  # RequestStats.counts, in line: this runs once per response
            ns = now_ns() - req.born
            timing[ns.bit_length()] += 1
            timing[SUM] = (timing[SUM] + ns) % SUM_WRAP  # (never past the slot's 64 bits)
        observe = proxy.observe
        if observe is not None:
            observe(self, req)
        if req.body_reserved:
            proxy.release_body(req)
        queue = self.queue
        if queue and queue[0] is req:
            queue.popleft()
        self.current = None
        self.relay = None
        if not keep or self.closed or proxy.draining:
            self.close()
        elif not self.pumping:  # (else the running loop goes on with the queue)
            self._pump()

    def remote(self) -> bytes:
        """The client's IP address, as X-Forwarded-For and the access log give it."""
        peer = self.peer
        if peer is None:
            name = self.transport.get_extra_info("peername")
            peer = self.peer = (name[0] if isinstance(name, tuple) else "unknown").encode()
        return peer

    def close(self) -> None:
        """Close once what was written has left."""
        if not self.closed:
            self.closed = self.no_more = True
            self._detach()
            if self.transport is not None:
                self.transport.close()

    def abort(self) -> None:
        """Drop the connection now, unsent bytes and all."""
        self.closed = self.no_more = True
        self._detach()
        if self.transport is not None:
            self.transport.abort()

    def _detach(self) -> None:
        sender = self.sender
        if sender is not None:
            self.sender = self.sending = None
            sender.cancel()
        relay = self.relay
        if relay is not None:
            self.relay = None
            relay.detach()

    # -- deadlines --------------------------------------------------------------------------
    def timeout(self, now: float) -> None:
        """Called by the proxy's sweep: enforce head, idle and send deadlines."""
        if self.closed:
            return
        req = self.current
        # Stalled: a response the client does not take, or answers held back for it (_pump).
        if (self.write_paused if req is not None else self.full and bool(self.queue)):
            if now - self.stall_since > self.proxy.config.response_timeout:
                self.abort()  # the client stopped reading; drop what it did not take
            return
        if req is not None:
            relay = self.relay
            if relay is None or (relay.upstream is None and not relay.started
                                 and now - relay.t0 > self.proxy.stuck_after):
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
                self.close()
        else:
            self.proxy.counts[TIMEOUTS] += 1
            self._reject(408)
