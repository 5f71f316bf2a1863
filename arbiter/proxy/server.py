"""The front proxy: it serves client connections up to its limits (listening.py accepts them),
runs the one sweep that enforces every deadline, holds the shared budgets (connections,
descriptors, request bodies) and the front cache, and counts what happened for the admin page
and metrics."""
from __future__ import annotations

import asyncio
import logging
import math
import os
import socket
import time
from collections import deque
from email.utils import formatdate
from typing import TYPE_CHECKING, Any, Callable

from .view import WorkerView
from .balancer import Balancer
from .outliers import Outliers
from .cache import FrontCache
from .client import IDLE, ClientProtocol
from .listening import Listeners
from .https import PLAIN, REDIRECT, TLS, TlsState
from .fdlimit import FD_RESERVE, FDS_PER_CLIENT, fd_need, raise_fd_limit
from .counters import SHORTAGES, TIMEOUTS, Counters, report
from .http1 import CRLF
from .request import Request
from .sharing import Learned
from .stats import RequestStats
from .pool import UpstreamPool
from .sink import UpstreamError

if TYPE_CHECKING:  # (the proxy never loads the config layer: the master hands it the sections)
    from ..config import FrontCacheConfig, ProxyConfig
    from .relay import Relay

log = logging.getLogger("gows.proxy")

TICK = 0.25  # seconds between timeout sweeps; also the resolution of the coarse clock
# Seconds a stopping proxy keeps idle keep-alive connections open, for their clients' next request.
IDLE_GRACE = 1.0


class Proxy:
    """The front proxy: serves a listening socket, forwarding to `table.healthy` workers."""

    def __init__(self, table: WorkerView, config: ProxyConfig, front_cache: FrontCacheConfig,
                 worker_threads: int, revalidate_after: float, counters: Counters | None = None,
                 handoff_token: str | None = None, lane: tuple[int, int] = (0, 1)) -> None:
        """`config` and `front_cache`: the config's sections; `worker_threads`: each worker's
        (the balancer's idea of a busy worker); `revalidate_after`: the workers' cache TTL (a
        stored response is checked with a worker once older); `counters`: where to count (a
        proxy process: memory the master reads), private memory by default; `handoff_token`:
        the secret with which local workers are asked to name file bodies rather than send
        them (fileapp.handoff), None to relay every body; `lane`: (this proxy's place, how many
        proxies), where the balancer's first starts in the table."""
        self.table = table
        self.handoff_line = b"X-Gows-Handoff: %s\r\n" % handoff_token.encode() if handoff_token else None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.pool = UpstreamPool(self)
        self.conns: set[ClientProtocol] = set()
        self.cache: FrontCache | None = None
        self.front_cache = front_cache
        self.balancer = Balancer(table, config.balance, worker_threads, load_factor=config.hash_balance_factor,
                                 lane=lane)
        self.outliers = Outliers(table)  # its threshold: outlierDetection.consecutiveFailures (0: off)
        self.clock = time.monotonic()
        self.date_line = b""
        self.draining = False
        # Requests that came before any worker was up (gows starting: its workers still boot):
        # each waits for the first one, up to the response timeout, rather than being answered
        # 503, as the listen backlog holds them before gunicorn's workers are up. (Once some
        # worker has been up, table.ever_healthy, none up means 503 at once.)
        self.held: deque[tuple[Relay, float]] = deque()
        self.listeners = Listeners(self)  # the accepting side: the master's listening sockets
        self.tls = TlsState()  # the HTTPS listener's context, reloaded with the settings
        # The master's health path (bytes), answered here with the master's readiness
        # (ClientProtocol.respond_health); None: forwarded like any path. `serving` is False
        # while the master is a lame duck: it still serves, but fails its health checks.
        self.health_target: bytes | None = None
        self.serving = True
        self.fd_cap = 1 << 30  # client connections the open file limit can hold (set by start)
        self.body_bytes = 0  # request body bytes held for all connections (reserve_body)
        self.cache_epoch = 0  # bumped by purge_front_cache: responses asked for before are not stored
        self._ticker: asyncio.TimerHandle | None = None
        # While shutting down: when in-flight requests stop being waited for (inf until then; a
        # hurry() before the shutdown begins, SIGINT just after SIGTERM, brings it to 0 all the same).
        self._drain_until = math.inf
        self._last_date = 0
        self._tasks: set[asyncio.Task] = set()
        self._update_date()
        # Counted in line as `counts[NAME] += 1` (counters.py names the slots).
        self.counters = counters if counters is not None else Counters.private()
        self.counts = self.counters.values
        self.status_counts = self.counters.status  # by status class: index 1..5
        self.latency = RequestStats(self.counters.latency)
        self._shortage_logged = 0.0
        # Set to None when nothing reads them: the latency histogram's counts
        # (read by the admin listener), and a hook called once per completed response (the
        # access log).
        self.timing: list[int] | None = self.latency.counts
        self.observe: Callable[[ClientProtocol, Request], None] | None = None
        # Called with each file entry stored from a worker's answer (sharing.py): the proxy
        # process sends them to the other proxies; None: kept to this proxy.
        self.share: Callable[[Learned], None] | None = None
        self.configure(config, front_cache, worker_threads, revalidate_after, lane)

    def configure(self, config: ProxyConfig, front_cache: FrontCacheConfig, worker_threads: int,
                  revalidate_after: float, lane: tuple[int, int] = (0, 1)) -> None:
        """Take (new) settings, as at a reload: open connections keep working."""
        self.config = config
        # A worker's threads past poolSize never serve this proxy: it opens no more connections.
        threads = min(worker_threads, config.pool_size)
        if ((config.balance, threads, config.hash_balance_factor, lane)
                != (self.balancer.policy, self.balancer.worker_threads, self.balancer.load_factor,
                    self.balancer.lane)):
            self.balancer = Balancer(self.table, config.balance, threads,
                                     load_factor=config.hash_balance_factor, lane=lane)
        # What the settings imply, worked out once here rather than per request:
        self.max_connections = min(config.max_connections, self.fd_cap)
        self.head_limit = config.max_request_line + config.max_header_bytes + 4096  # raw head bytes read
        # Longer than any legitimate wait of a request for its worker: a retry started just
        # before the response timeout may queue for a connection for another one.
        self.stuck_after = 2 * config.response_timeout + config.connect_timeout + 1
        old, self.front_cache = self.front_cache, front_cache
        if not front_cache.enabled or front_cache.max_bytes <= 0:
            self.cache = None
        elif (self.cache is None or front_cache.max_bytes != old.max_bytes
              or front_cache.max_object_bytes != old.max_object_bytes):
            self.cache = FrontCache(front_cache.max_bytes, front_cache.max_object_bytes, counts=self.counts)
        if self.cache is not None:
            self.cache.revalidate_after = revalidate_after

    async def start(self, sock: socket.socket | None, tls: socket.socket | None = None,
                    redirect: socket.socket | None = None) -> None:
        """Serve the already bound and listening sockets on the running loop: `sock` plain HTTP,
        `tls` HTTPS (once `self.tls` has a context), `redirect` redirects to HTTPS."""
        self.loop = asyncio.get_running_loop()
        self._fit_fd_limit()
        await self.listeners.start([(s, kind) for s, kind in ((sock, PLAIN), (tls, TLS), (redirect, REDIRECT))
                                    if s is not None])
        self._ticker = self.loop.call_later(TICK, self._tick)
        loop = self.loop
        # A worker marked down or ejected: the requests waiting on it go elsewhere at once.
        self.table.on_leave(lambda worker: loop.call_soon_threadsafe(self.pool.abandon, worker))

    def _fit_fd_limit(self) -> None:
        """Raise the open file limit to hold max_connections clients, each with a connection to
        a worker; where it cannot be, serve fewer clients at once rather than meet EMFILE."""
        wanted = fd_need(self.config)
        soft = raise_fd_limit(wanted)
        if soft >= wanted:
            log.info("open file limit %d: room for proxy.maxConnections (%d clients here)", soft,
                     self.config.max_connections)
            return
        try:
            in_use = len(os.listdir("/proc/self/fd"))
        except OSError:
            in_use = 64
        self.fd_cap = max(1, (soft - in_use - FD_RESERVE - self.config.pool_size) // FDS_PER_CLIENT)
        self.max_connections = min(self.config.max_connections, self.fd_cap)
        log.warning("the open file limit (%d) cannot hold proxy.maxConnections (%d here; that needs about %d): "
                    "serving at most %d clients at once, the rest wait in the listen backlog; raise the limit "
                    "(ulimit -n, or LimitNOFILE= under systemd)", soft, self.config.max_connections, wanted,
                    self.max_connections)

    def connection_gone(self, conn: ClientProtocol) -> None:
        """A client connection is closed: it no longer counts against the limit."""
        self.conns.discard(conn)
        self.listeners.room()

    def hold(self, relay: Relay) -> bool:
        """Keep `relay` until a worker is up, if none has been yet (see `held`); whether it is kept."""
        if self.table.ever_healthy or self.draining:
            return False
        self.held.append((relay, self.clock + self.config.response_timeout))
        return True

    def release_held(self, now: float) -> None:
        """Forward the held requests once a worker has been up (called as the master's table
        arrives, and at every tick); answer 503 to those held too long (all of them when
        stopping); forget those whose client left, so that clients coming and going while no
        worker comes up cannot pile requests up here."""
        ready = self.table.ever_healthy
        held, self.held = self.held, deque()
        for relay, deadline in held:
            if not relay.live or relay.client.closed:
                continue
            if ready:
                relay.forward()
            elif self.draining or deadline < now:
                relay.no_worker()
            else:
                self.held.append((relay, deadline))

    def reserve_body(self, req: Request, size: int) -> bool:
        """Count `req`'s body as `size` bytes against the budget shared by every connection."""
        extra = size - req.body_reserved
        if self.body_bytes + extra > self.config.body_buffer_bytes:
            return False
        self.body_bytes += extra
        req.body_reserved = size
        return True

    def release_body(self, req: Request) -> None:
        self.body_bytes -= req.body_reserved
        req.body_reserved = 0

    def shortage(self) -> None:
        """This process ran out of descriptors (or buffers, or memory): shed what it holds idle."""
        self.counts[SHORTAGES] += 1
        self.pool.close_idle()
        if self.clock - self._shortage_logged >= 10:
            self._shortage_logged = self.clock
            log.warning("this proxy is short of file descriptors or memory: answering 503 and closing idle "
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
            self.listeners.tick()
            for conn in [c for c in self.conns if c.deadline < now or c.write_paused]:
                try:
                    conn.timeout(now)
                except Exception:
                    log.exception("proxy error while timing out a connection; closing it")
                    conn.abort()
            if self.held:
                self.release_held(now)
            self.pool.expire_waiting(now)
            self.pool.unpipe_stalled(now)
            for up in self.pool.timed_out(now):
                self.counts[TIMEOUTS] += 1
                up._fail(UpstreamError("worker response timed out", 504, passive=True))
            self.pool.sweep(now)
            self._count_gauges()
        except Exception:  # a bug here must not stop every future timeout
            log.exception("proxy timeout sweep failed")
        self._ticker = self.loop.call_later(TICK, self._tick)

    async def shutdown(self, timeout: float) -> None:
        """Stop accepting, let in-flight requests finish (up to `timeout`), close the rest."""
        self.draining = True
        self.release_held(self.clock)  # (no worker came up for them: 503 now)
        self.listeners.close()
        self.pool.close_idle()
        start = time.monotonic()
        self._drain_until = min(self._drain_until, start + timeout)
        idle_closed = False
        while self.conns and time.monotonic() < self._drain_until:
            if not idle_closed and time.monotonic() - start >= min(IDLE_GRACE, timeout):
                # Closing an idle keep-alive connection races with the client's next request on
                # it; a client that is using it sends one within the grace and gets its answer
                # with "Connection: close". The rest were not using it.
                idle_closed = True
                for conn in list(self.conns):
                    if conn.current is None and not conn.queue and conn.phase == IDLE:
                        conn.close()
            await asyncio.sleep(0.05)
        for conn in list(self.conns):
            conn.abort()
        for up in list(self.pool.busy):
            up.close()
        self.pool.close_idle()
        if self._ticker is not None:
            self._ticker.cancel()
            self._ticker = None

    def hurry(self) -> None:
        """End a shutdown's wait for in-flight requests now (a fast stop during a graceful one)."""
        self._drain_until = 0.0

    def _count_gauges(self) -> None:
        """Refresh the gauges in `counts` (every tick: the master reads them from there)."""
        pool = self.pool.counts()
        cache = self.cache
        self.counters.set_gauges(client_connections=len(self.conns), body_buffer_bytes=self.body_bytes,
                                 cache_entries=len(cache) if cache else 0, cache_bytes=cache.bytes if cache else 0,
                                 upstream_busy=pool["busy"], upstream_idle=pool["idle"],
                                 upstream_waiting=pool["waiting"])

    def stats(self) -> dict[str, Any]:
        """Counters for the admin page and metrics."""
        self._count_gauges()
        stats = report(self.counts, self.cache is not None, self.front_cache.max_bytes)
        stats["upstream_connections"] = self.pool.counts()
        return stats


__all__ = ["ClientProtocol", "Proxy", "Request"]
