"""Connections to workers, pooled: at most `pool_size` in use per worker (more requests wait
for one, as behind HAProxy's maxconn, instead of piling connections onto the worker) and at
most `pool_size` idle ones kept, newest reused first. A GET to a local worker goes first behind
the requests in flight on its newest connection, up to upstream.PIPELINE_DEPTH."""
from __future__ import annotations

import asyncio
import errno
from collections import deque
from typing import TYPE_CHECKING, Awaitable, TypeVar

from ..sockets import local_shortage
from ..state import WorkerState
from .sink import ResponseSink, UpstreamError
from .upstream import UpstreamConnection

if TYPE_CHECKING:
    from .server import Proxy

T = TypeVar("T")

# A pooled connection idle longer than this is closed rather than reused: reusing one that is
# about to meet the worker's own keep-alive timeout races with the worker closing it. gows'
# workers keep idle connections 5 s (fileapp's --keepalive); a remote gunicorn's default is 2 s.
REUSE_WITHIN = 1.0
# Turns of the loop a connect past its deadline gets to show it completed: a proxy starved of
# CPU (workers outnumbering the cores) can stall past connectTimeout between a connect's start
# and reading its completion, and uvloop runs the expired timer before that I/O.
LATE_TURNS = 2


async def _connected(connecting: Awaitable[T], timeout: float) -> T:
    """`connecting`'s result within `timeout`, or TimeoutError; a connect this loop was too busy
    to see complete in time is not a timeout (LATE_TURNS), nor charged to the worker as one."""
    task = asyncio.ensure_future(connecting)
    try:
        return await asyncio.wait_for(asyncio.shield(task), timeout)
    except asyncio.TimeoutError:
        turns = LATE_TURNS
        while not task.done() and turns:
            await asyncio.sleep(0)
            turns -= 1
        if task.done():
            return task.result()
        task.cancel()
        raise
    except asyncio.CancelledError:
        task.cancel()
        raise


def _chosen(worker: WorkerState) -> bool:
    """Whether the balancer may choose `worker` (up and not ejected)."""
    return worker.up and worker.ejected_until is None


def _out(worker: WorkerState) -> UpstreamError:
    """Why a request leaves a worker marked down or ejected: not the worker's failure to count."""
    return UpstreamError(f"worker {worker.address} is {'down' if not worker.up else 'ejected'}", 502)


class UpstreamPool:
    """Connections per worker: at most `pool_size` in use at once (more requests wait here for
    one, as behind HAProxy's maxconn, instead of piling connections onto the worker) and at
    most `pool_size` idle ones kept, newest reused first."""

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy
        self.idle: dict[WorkerState, list[UpstreamConnection]] = {}
        self.busy: set[UpstreamConnection] = set()
        self.waiting: dict[WorkerState, deque[tuple[ResponseSink, float]]] = {}
        # The connection to each local worker whose requests GETs are pipelined behind: the
        # one started last.
        self.pipes: dict[WorkerState, UpstreamConnection] = {}
        self.connecting = 0
        self.opened = 0  # connections ever made: against requests, how well the pool reuses

    def checkout(self, sink: ResponseSink, worker: WorkerState, fresh: bool = False) -> None:
        """Get `sink` a connection to `worker`: an idle one, a new one, or a place in the queue.

        It hears back through `sink.start(conn)` (or `start_behind`) or `sink.upstream_failed`.
        """
        if not fresh:
            pipe = self.pipes.get(worker)
            if pipe is not None and pipe.takes_more() and pipe.incarnation == worker.pid and sink.pipelinable():
                sink.start_behind(pipe)
                return
            conn = self._idle(worker)
            if conn is not None:
                conn.active = True
                worker.connections += 1
                self._start(sink, conn)
                return
        if worker.connections < self.proxy.config.pool_size:
            self._open(sink, worker)
        else:
            queue = self.waiting.get(worker)
            if queue is None:
                queue = self.waiting[worker] = deque()
            queue.append((sink, self.proxy.clock))

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

    def _open(self, sink: ResponseSink, worker: WorkerState) -> None:
        worker.connections += 1
        self.proxy.spawn(self._connect(sink, worker))

    async def _connect(self, sink: ResponseSink, worker: WorkerState) -> None:
        loop = asyncio.get_running_loop()
        conn = UpstreamConnection(self, worker)
        conn.active = True
        self.connecting += 1
        # A local worker's Unix socket when it has one: no TCP stack, port or TIME_WAIT.
        unix_path = worker.unix_path
        connecting = (loop.create_unix_connection(lambda: conn, unix_path) if unix_path is not None
                      else loop.create_connection(lambda: conn, worker.host, worker.port))
        try:
            await _connected(connecting, self.proxy.config.connect_timeout)
        except (asyncio.TimeoutError, OSError) as exc:
            conn.closed = True
            self._inactive(conn)
            if unix_path is not None and worker.unix_path != unix_path:
                # The socket of a process replaced meanwhile (a reload), retired with it: not
                # the fault of the worker now serving, and worth a fresh connection to it.
                error = UpstreamError(f"connect failed: {getattr(exc, 'strerror', None) or exc}", 502, stale=True)
            elif isinstance(exc, asyncio.TimeoutError):
                error = UpstreamError("connect timed out", 504, passive=True)
            elif local_shortage(exc):  # the proxy's own trouble, never the worker's
                error = UpstreamError(f"cannot connect: {local_shortage(exc)}", 503, local=True)
            elif exc.errno == errno.ECONNREFUSED:
                error = UpstreamError("connection refused", 502, passive=True)
            elif exc.errno == errno.EAGAIN and unix_path is not None:
                # A Unix socket's connect fails at once when the worker's backlog is full, where
                # TCP's would wait and time out: the same failure, the worker's.
                error = UpstreamError("the worker's backlog is full", 504, passive=True)
            else:
                error = UpstreamError(f"connect failed: {exc.strerror or exc}", 502, passive=True)
            if sink.wants(worker):
                sink.upstream_failed(None, error)
            return
        finally:
            self.connecting -= 1
        self.opened += 1
        # A new connection this proxy took longer than REUSE_WITHIN to use (its loop lagged)
        # meets the worker's read timeout as an idle pooled one meets its keep-alive: a close
        # is then stale, retried on a fresh connection, not the worker's failure.
        late = self.proxy.clock - conn.idle_since > REUSE_WITHIN
        if conn.closed:  # the worker closed it (or died) before we could send on it
            if sink.wants(worker):
                sink.upstream_failed(None, UpstreamError("stale connection", stale=True) if late
                                     else UpstreamError("worker closed the connection", passive=True))
        elif not _chosen(worker) and sink.wants(worker):  # marked down or ejected while we connected
            self.release(conn)
            sink.upstream_failed(None, _out(worker))
        elif sink.wants(worker):
            conn.reused = late
            self._start(sink, conn)
        else:  # the client left meanwhile; the connection serves someone else
            self.release(conn)

    def _start(self, sink: ResponseSink, conn: UpstreamConnection) -> None:
        """`sink`'s request goes out on `conn`, which then takes GETs behind it if its worker is
        local (a gows worker over its Unix socket: it answers pipelined requests in order) and
        the request may have company (upstream.UpstreamConnection.alone)."""
        sink.start(conn)
        if conn.worker.unix_path is not None and not conn.alone:
            self.pipes[conn.worker] = conn

    def forget_pipe(self, conn: UpstreamConnection) -> None:
        """No more GETs go behind `conn`'s requests."""
        if self.pipes.get(conn.worker) is conn:
            del self.pipes[conn.worker]

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
            sink, _ = queue.popleft()
            if sink.wants(worker):
                conn.reused = True
                self._start(sink, conn)
                return
        self._inactive(conn)
        idle = self.idle.get(worker)
        if idle is None:
            idle = self.idle[worker] = []
        if len(idle) >= proxy.config.pool_size:
            conn.close()
            return
        conn.idle_since = proxy.clock
        idle.append(conn)

    def _inactive(self, conn: UpstreamConnection) -> None:
        if conn.active:
            conn.active = False
            worker = conn.worker
            worker.connections -= 1
            queue = self.waiting.get(worker)
            if queue:
                # A slot opened: the next live waiter gets a new connection.
                while queue:
                    sink, _ = queue.popleft()
                    if sink.wants(worker):
                        self._open(sink, worker)
                        break

    def abandon(self, worker: WorkerState) -> None:
        """`worker` was marked down or ejected: requests waiting for a connection to it, and
        idempotent ones it has not begun to answer, go elsewhere now (relay.py retries them)
        rather than at the response timeout. A worker that left the table drains instead."""
        if _chosen(worker) or self.proxy.table.get(worker.host, worker.port) is not worker:
            return
        queue = self.waiting.pop(worker, None)
        while queue:
            sink, _ = queue.popleft()
            if sink.wants(worker):
                sink.upstream_failed(None, _out(worker))
        for conn in [c for c in self.busy if c.worker is worker and not c.head_done]:
            if conn.sink is not None and conn.sink.may_resend():
                conn.abandon(_out(worker))

    def forget(self, conn: UpstreamConnection) -> None:
        self.forget_pipe(conn)
        self.busy.discard(conn)
        self._inactive(conn)
        idle = self.idle.get(conn.worker)
        if idle and conn in idle:
            idle.remove(conn)

    def expire_waiting(self, now: float) -> None:
        """Requests that waited longer than the response timeout for a connection get 503."""
        limit = now - self.proxy.config.response_timeout
        for worker, queue in list(self.waiting.items()):
            while queue and (queue[0][1] < limit or not queue[0][0].wants(worker)):
                sink, since = queue.popleft()
                if sink.wants(worker):
                    sink.upstream_failed(None, UpstreamError("no free connection to the worker", 503, False))
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

    def unpipe_stalled(self, now: float) -> None:
        """Requests pipelined behind an answer that takes long go to other connections."""
        for conn in [c for c in self.busy if c.stalled(now)]:
            conn.unpipe()

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
