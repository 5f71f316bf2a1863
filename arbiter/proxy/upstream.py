"""Connections to workers: a bounded pool of keep-alive connections per worker, each parsing
responses with httptools and relaying them to the client connection that sent the request."""
from __future__ import annotations

import asyncio
import errno
import logging
from collections import deque
from typing import TYPE_CHECKING, Any

from httptools import HttpParserCallbackError, HttpParserError, HttpResponseParser

from ..sockets import local_shortage
from ..state import WorkerState

if TYPE_CHECKING:
    from .server import ClientProtocol, Proxy, Request

# A pooled connection idle longer than this is closed rather than reused: it is about to meet
# the worker's own keep-alive timeout (gunicorn's default is 2 s), and reusing it then races
# with the worker closing it.
REUSE_WITHIN = 1.0

log = logging.getLogger("gows.proxy")


class UpstreamError(Exception):
    """Why a request to a worker failed; `status` is what the client gets if no retry helps.

    Only what the worker did (refused, reset, timed out, sent malformed bytes) is `passive`, a
    failure counted against it; the proxy's own troubles are not the worker's.
    """

    def __init__(self, reason: str, status: int = 502, passive: bool = False, stale: bool = False,
                 local: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status
        self.passive = passive  # counts as a passive failure of the worker (max_fails)
        self.stale = stale  # a reused keep-alive connection the worker had closed
        self.local = local  # the master ran short of descriptors or memory


class MalformedResponse(Exception):
    """Raised in a parser callback: the worker's response breaks HTTP in a way httptools allows."""


class UpstreamConnection(asyncio.Protocol):
    """One keep-alive connection to a worker, carrying one request at a time."""

    __slots__ = ("pool", "worker", "transport", "parser", "client", "headers", "head_done", "head_only",
                 "interim", "until_close", "keep", "reused", "idle_since", "deadline", "paused", "closed", "active",
                 "incarnation")

    def __init__(self, pool: UpstreamPool, worker: WorkerState) -> None:
        self.pool = pool
        self.worker = worker
        self.transport: Any = None
        self.parser = HttpResponseParser(self)
        self.client: ClientProtocol | None = None
        self.headers: list[tuple[bytes, bytes]] = []
        self.head_done = False
        self.head_only = False
        self.interim = False
        self.until_close = False
        self.keep = False
        self.reused = False
        self.idle_since = 0.0
        self.deadline = 0.0
        self.paused = False
        self.closed = False
        self.active = False  # counted in the pool's per-worker limit (busy or connecting)
        # The worker's process when this connection was made: a reload's new process shares the
        # port, and a connection to the old one (about to drain, serving the old settings) is
        # never reused.
        self.incarnation = worker.pid

    # -- driving a request ----------------------------------------------------------------
    def send(self, client: ClientProtocol, head: bytes, body: bytes | None, head_only: bool) -> None:
        """Write one prepared request (its head, then its body as received) and relay its
        response to `client`."""
        self.client = client
        self.headers = []
        self.head_done = False
        self.head_only = head_only
        self.until_close = False
        pool = self.pool
        self.deadline = pool.proxy.clock + pool.proxy.response_timeout
        pool.busy.add(self)
        if body:
            self.transport.writelines((head, body))
        else:
            self.transport.write(head)

    def detach(self) -> None:
        """The client went away mid-response: this connection's stream is unusable."""
        self.client = None
        self.close()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.pool.forget(self)
            if self.transport is not None:
                self.transport.abort()

    def pause(self) -> None:
        if not self.paused and not self.closed:
            self.paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self.paused:
            self.paused = False
            # The response timeout counts the worker's silence, not the client's.
            self.deadline = self.pool.proxy.clock + self.pool.proxy.response_timeout
            if not self.closed:
                self.transport.resume_reading()

    # -- asyncio.Protocol -----------------------------------------------------------------
    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        client = self.client
        if client is None:  # nothing asked: a stray or late response, never relay it
            self.close()
            return
        try:
            self.parser.feed_data(data)
        except HttpParserCallbackError as exc:
            cause = exc.__context__
            if isinstance(cause, MalformedResponse):
                self._fail(UpstreamError(f"malformed response from worker: {cause}", passive=True))
            else:  # a bug of the proxy's, in relaying: visible, and no failure of the worker
                log.error("proxy error while relaying a response", exc_info=cause or exc)
                self._proxy_error()
            return
        except HttpParserError:
            self._fail(UpstreamError("malformed response from worker", passive=True))
            return
        self.deadline = self.pool.proxy.clock + self.pool.proxy.response_timeout

    def eof_received(self) -> bool | None:
        return None  # close our side too; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        already = self.closed
        self.closed = True
        self.parser = None  # its callbacks are our methods: a cycle no longer needed
        self.pool.forget(self)
        client = self.client
        if client is None or already:
            return
        if self.head_done and self.until_close:  # the body was delimited by the close
            self._complete()
            return
        if self.head_done:
            self._fail(UpstreamError("worker closed the connection mid-response", passive=True))
        elif self.reused:
            # A pooled connection the worker had closed: not the worker's fault.
            self._fail(UpstreamError("stale keep-alive connection", stale=True))
        else:
            reason = "connection reset by worker" if exc is not None else "worker closed the connection"
            self._fail(UpstreamError(reason, passive=True))

    def pause_writing(self) -> None:  # request bodies are bounded and written at once
        pass

    def resume_writing(self) -> None:
        pass

    # -- httptools callbacks --------------------------------------------------------------
    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        parser = self.parser
        status = parser.get_status_code()
        if status < 200:
            # 100 Continue / 103 Early Hints: the request body was sent whole, so skip them.
            if status == 101:
                raise MalformedResponse("unexpected protocol switch")
            self.interim = True
            self.headers = []
            return
        self.head_done = True
        client = self.client
        if client is None:
            return
        self.keep = parser.should_keep_alive()
        client.upstream_head(self, status, self.headers)
        if self.head_only and self.client is not None:
            # httptools cannot be told a response answers HEAD, so it would wait for a body
            # that never comes; a fresh parser serves the next request on this connection.
            self.parser = HttpResponseParser(self)
            self._complete()

    def on_body(self, body: bytes) -> None:
        client = self.client
        if client is not None:
            client.upstream_body(body)

    def on_message_complete(self) -> None:
        if self.interim:
            self.interim = False
            return
        if self.client is not None:
            self._complete()

    # -- outcomes -------------------------------------------------------------------------
    def _complete(self) -> None:
        client = self.client
        self.client = None
        pool = self.pool
        pool.busy.discard(self)
        # Back in the pool first, so the client's next request can reuse this very connection.
        if self.keep and not self.closed and not self.until_close:
            pool.release(self)
        else:
            self.close()
        if client is not None:
            client.upstream_done(self)

    def _fail(self, error: UpstreamError) -> None:
        client = self.client
        self.client = None
        self.close()
        if client is not None:
            client.upstream_failed(self, error)

    def _proxy_error(self) -> None:
        """The proxy itself failed mid-relay: end both connections, charge no one else."""
        client = self.client
        self.client = None
        self.close()
        if client is not None:
            client.abort()


class UpstreamPool:
    """Connections per worker: at most `pool_size` in use at once (more requests wait here for
    one, as behind HAProxy's maxconn, instead of piling connections onto the worker) and at
    most `pool_size` idle ones kept, newest reused first."""

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy
        self.idle: dict[WorkerState, list[UpstreamConnection]] = {}
        self.busy: set[UpstreamConnection] = set()
        self.active: dict[WorkerState, int] = {}
        self.waiting: dict[WorkerState, deque[tuple[ClientProtocol, Request, float]]] = {}
        self.connecting = 0
        self.opened = 0  # connections ever made: against requests, how well the pool reuses

    def checkout(self, client: ClientProtocol, req: Request, worker: WorkerState, fresh: bool = False) -> None:
        """Get `req` a connection to `worker`: an idle one, a new one, or a place in the queue.

        The client hears back through `client.start(conn, req)` or `client.upstream_failed`.
        """
        if not fresh:
            conn = self._idle(worker)
            if conn is not None:
                conn.active = True
                self.active[worker] = self.active.get(worker, 0) + 1
                client.start(conn, req)
                return
        if self.active.get(worker, 0) < self.proxy.settings.pool_size:
            self._open(client, req, worker)
        else:
            queue = self.waiting.get(worker)
            if queue is None:
                queue = self.waiting[worker] = deque()
            queue.append((client, req, self.proxy.clock))

    def _idle(self, worker: WorkerState) -> UpstreamConnection | None:
        idle = self.idle.get(worker)
        if not idle:
            return None
        horizon = self.proxy.clock - REUSE_WITHIN
        while idle:
            conn = idle.pop()
            if conn.closed or conn.transport.is_closing():
                continue
            if conn.incarnation != worker.pid:
                conn.close()
                continue
            if conn.idle_since < horizon:
                # Older ones below it are older still.
                for old in idle:
                    old.close()
                conn.close()
                idle.clear()
                return None
            conn.reused = True
            return conn
        return None

    def _open(self, client: ClientProtocol, req: Request, worker: WorkerState) -> None:
        self.active[worker] = self.active.get(worker, 0) + 1
        self.proxy.spawn(self._connect(client, req, worker))

    async def _connect(self, client: ClientProtocol, req: Request, worker: WorkerState) -> None:
        loop = asyncio.get_running_loop()
        conn = UpstreamConnection(self, worker)
        conn.active = True
        self.connecting += 1
        try:
            await asyncio.wait_for(loop.create_connection(lambda: conn, worker.host, worker.port),
                                   self.proxy.settings.connect_timeout)
        except (asyncio.TimeoutError, OSError) as exc:
            conn.closed = True
            self._inactive(conn)
            if isinstance(exc, asyncio.TimeoutError):
                error = UpstreamError("connect timed out", 504, passive=True)
            elif local_shortage(exc):  # the master's own trouble, never the worker's
                error = UpstreamError(f"cannot connect: {local_shortage(exc)}", 503, local=True)
            elif exc.errno == errno.ECONNREFUSED:
                error = UpstreamError("connection refused", 502, passive=True)
            else:
                error = UpstreamError(f"connect failed: {exc.strerror or exc}", 502, passive=True)
            if client.wants(req, worker):
                client.upstream_failed(None, error)
            return
        finally:
            self.connecting -= 1
        self.opened += 1
        if conn.closed:  # the worker closed it (or died) before we could send on it
            if client.wants(req, worker):
                client.upstream_failed(None, UpstreamError("worker closed the connection", passive=True))
        elif client.wants(req, worker):
            client.start(conn, req)
        else:  # the client left meanwhile; the connection serves someone else
            self.release(conn)

    def release(self, conn: UpstreamConnection) -> None:
        """A connection finished its response: hand it to a waiting request, keep it, or close it."""
        worker = conn.worker
        proxy = self.proxy
        if (proxy.draining or not worker.up or proxy.table.get(worker.host, worker.port) is not worker
                or conn.incarnation != worker.pid):
            conn.close()
            return
        conn.resume()
        queue = self.waiting.get(worker)
        while queue:
            client, req, _ = queue.popleft()
            if client.wants(req, worker):
                conn.reused = True
                client.start(conn, req)
                return
        self._inactive(conn)
        idle = self.idle.get(worker)
        if idle is None:
            idle = self.idle[worker] = []
        if len(idle) >= proxy.settings.pool_size:
            conn.close()
            return
        conn.idle_since = proxy.clock
        idle.append(conn)

    def _inactive(self, conn: UpstreamConnection) -> None:
        if conn.active:
            conn.active = False
            worker = conn.worker
            self.active[worker] -= 1
            queue = self.waiting.get(worker)
            if queue:
                # A slot opened: the next live waiter gets a new connection.
                while queue:
                    client, req, _ = queue.popleft()
                    if client.wants(req, worker):
                        self._open(client, req, worker)
                        break

    def forget(self, conn: UpstreamConnection) -> None:
        self.busy.discard(conn)
        self._inactive(conn)
        idle = self.idle.get(conn.worker)
        if idle and conn in idle:
            idle.remove(conn)

    def expire_waiting(self, now: float) -> None:
        """Requests that waited longer than the response timeout for a connection get 503."""
        limit = now - self.proxy.response_timeout
        for worker, queue in list(self.waiting.items()):
            while queue and (queue[0][2] < limit or not queue[0][0].wants(queue[0][1], worker)):
                client, req, since = queue.popleft()
                if client.wants(req, worker):
                    client.upstream_failed(None, UpstreamError("no free connection to the worker", 503, False))
            if not queue:
                del self.waiting[worker]

    def sweep(self, now: float) -> None:
        """Close idle connections that are too old to reuse or whose worker left or went down."""
        table = self.proxy.table
        horizon = now - REUSE_WITHIN
        for worker, idle in list(self.idle.items()):
            gone = not worker.up or table.get(worker.host, worker.port) is not worker
            if gone or any(c.idle_since < horizon for c in idle):
                keep = [] if gone else [c for c in idle if c.idle_since >= horizon and not c.closed]
                for conn in idle:
                    if conn not in keep:
                        conn.closed = True
                        if conn.transport is not None:
                            conn.transport.close()
                idle[:] = keep
            if not idle:
                del self.idle[worker]

    def timed_out(self, now: float) -> list[UpstreamConnection]:
        """Busy connections whose worker has not answered (or sent more) within the response timeout."""
        return [c for c in self.busy if c.deadline < now and not c.paused]

    def close_idle(self) -> None:
        for idle in self.idle.values():
            for conn in idle:
                conn.closed = True
                if conn.transport is not None:
                    conn.transport.close()
        self.idle.clear()

    def counts(self) -> dict[str, int]:
        return {"idle": sum(len(v) for v in self.idle.values()), "busy": len(self.busy),
                "connecting": self.connecting, "opened": self.opened,
                "waiting": sum(len(q) for q in self.waiting.values())}
