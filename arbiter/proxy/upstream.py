"""Connections to workers: a bounded pool of keep-alive connections per worker, each parsing
responses with httptools and relaying them to the client connection that sent the request."""
from __future__ import annotations

import asyncio
import errno
from typing import TYPE_CHECKING, Any

from httptools import HttpParserError, HttpResponseParser

from ..state import WorkerState

if TYPE_CHECKING:
    from .server import ClientProtocol, Proxy

# A pooled connection idle longer than this is closed rather than reused: it is about to meet
# the worker's own keep-alive timeout (gunicorn's default is 2 s), and reusing it then races
# with the worker closing it.
REUSE_WITHIN = 1.0


class UpstreamError(Exception):
    """Why a request to a worker failed; `status` is what the client gets if no retry helps."""

    def __init__(self, reason: str, status: int = 502, passive: bool = True) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status
        self.passive = passive  # counts as a passive failure of the worker (max_fails)


class UpstreamConnection(asyncio.Protocol):
    """One keep-alive connection to a worker, carrying one request at a time."""

    __slots__ = ("pool", "worker", "transport", "parser", "client", "headers", "head_done", "head_only",
                 "interim", "until_close", "keep", "reused", "idle_since", "deadline", "paused", "closed")

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

    # -- driving a request ----------------------------------------------------------------
    def send(self, client: ClientProtocol, payload: bytes, head_only: bool) -> None:
        """Write one prepared request and relay its response to `client`."""
        self.client = client
        self.headers = []
        self.head_done = False
        self.head_only = head_only
        self.until_close = False
        pool = self.pool
        self.deadline = pool.proxy.clock + pool.proxy.response_timeout
        pool.busy.add(self)
        self.transport.write(payload)

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
        except HttpParserError:
            self._fail(UpstreamError("malformed response from worker"))
            return
        self.deadline = self.pool.proxy.clock + self.pool.proxy.response_timeout

    def eof_received(self) -> bool | None:
        return None  # close our side too; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        already = self.closed
        self.closed = True
        self.pool.forget(self)
        client = self.client
        if client is None or already:
            return
        if self.head_done and self.until_close:  # the body was delimited by the close
            self._complete()
            return
        if self.head_done:
            self._fail(UpstreamError("worker closed the connection mid-response"))
        elif self.reused:
            # A pooled connection the worker had closed: not the worker's fault.
            self._fail(UpstreamError("stale keep-alive connection", passive=False))
        else:
            reason = "connection reset by worker" if exc is not None else "worker closed the connection"
            self._fail(UpstreamError(reason))

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
                raise HttpParserError("unexpected protocol switch")
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


class UpstreamPool:
    """Idle keep-alive connections per worker (at most `pool_size` each, newest reused first)."""

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy
        self.idle: dict[WorkerState, list[UpstreamConnection]] = {}
        self.busy: set[UpstreamConnection] = set()
        self.connecting = 0

    def acquire(self, worker: WorkerState) -> UpstreamConnection | None:
        """A live idle connection to `worker`, or None when a new one is needed."""
        idle = self.idle.get(worker)
        if not idle:
            return None
        horizon = self.proxy.clock - REUSE_WITHIN
        while idle:
            conn = idle.pop()
            if conn.closed or conn.transport.is_closing():
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

    def release(self, conn: UpstreamConnection) -> None:
        """Keep a connection whose response is complete, if there is room and the worker stays."""
        worker = conn.worker
        proxy = self.proxy
        if (proxy.draining or not worker.up or proxy.table.get(worker.host, worker.port) is not worker):
            conn.close()
            return
        idle = self.idle.get(worker)
        if idle is None:
            idle = self.idle[worker] = []
        if len(idle) >= proxy.settings.pool_size:
            conn.close()
            return
        conn.resume()
        conn.idle_since = proxy.clock
        idle.append(conn)

    def forget(self, conn: UpstreamConnection) -> None:
        self.busy.discard(conn)
        idle = self.idle.get(conn.worker)
        if idle and conn in idle:
            idle.remove(conn)

    async def connect(self, worker: WorkerState) -> UpstreamConnection:
        """A new connection to `worker`, or UpstreamError (refused: 502, timed out: 504)."""
        loop = asyncio.get_running_loop()
        conn = UpstreamConnection(self, worker)
        self.connecting += 1
        try:
            await asyncio.wait_for(loop.create_connection(lambda: conn, worker.host, worker.port),
                                   self.proxy.settings.connect_timeout)
        except asyncio.TimeoutError:
            raise UpstreamError("connect timed out", 504) from None
        except OSError as exc:
            reason = "connection refused" if exc.errno == errno.ECONNREFUSED else f"connect failed: {exc.strerror or exc}"
            raise UpstreamError(reason, 502) from None
        finally:
            self.connecting -= 1
        return conn

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
                "connecting": self.connecting}
