"""How a proxy takes new clients from the listening sockets the master shares with every proxy:
servers on duplicates of each (one while newcomers come one at a time, ACCEPTORS while they
queue), closed at the connection limit (newcomers wait in the kernel's backlog) and made again
once there is room; idle connections shed when the backlog waits and no other proxy takes it; a
pause while clients are handed over to the other proxies."""
from __future__ import annotations

import heapq
import logging
import select
import socket
from functools import partial
from itertools import islice
from typing import TYPE_CHECKING, Any

from ..sockets import somaxconn
from .client import IDLE, ClientProtocol
from .counters import SHED_IDLE
from .fdlimit import ACCEPTORS
from .filebody import bound_unsent
from .https import PROTOCOLS, TLS

if TYPE_CHECKING:
    from .server import Proxy

log = logging.getLogger("gows.proxy")

# At the connection limit, up to this many of the longest-idle connections are closed (as nginx
# reuses connections) so that the clients waiting in the backlog get their turn; never one idle
# for less than SHED_AFTER seconds (a new connection whose request is on its way).
IDLE_SHED = 32
SHED_AFTER = 1.0
# Full, a proxy closes idle connections for a newcomer only if no other proxy sharing the
# listening socket took it within this many seconds: the backlog must be found waiting at each
# of SHED_LOOKS looks, SHED_LOOK_GAP seconds apart, from then on. (One look could meet a newcomer
# that has just arrived while another proxy takes them all promptly.)
SHED_CHECK = 0.5
SHED_LOOKS = 4
SHED_LOOK_GAP = 0.05
# Seconds a proxy handing clients over to the others (hand_over) accepts nothing, so that the
# clients it lets go reconnect through another proxy; only connections open for HAND_OVER_AGE
# seconds are let go (those of clients that keep them: a client making one request per
# connection spreads by itself, and pausing for it would only slow the proxy down).
HAND_OVER_PAUSE = 0.5
HAND_OVER_AGE = 1.0
# Ticks in a row in which no turn of the loop took more than one newcomer before the acceptors
# made for a queue go back to one a listener. Each newcomer wakes every acceptor and
# all but one find nothing: with 16 on each of 2 proxies, a connection cost 31 accept() calls
# that failed, a third of the CPU of a 1 KiB request from a client connecting for each (ab -c1).
CALM_TICKS = 4


class Listeners:
    """The accepting side of `proxy`: its listening sockets, each with the kind of connection it
    takes (PLAIN, TLS, REDIRECT: https.py), and the servers accepting on them."""

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy
        self.sockets: list[tuple[socket.socket, str]] = []
        # Every listener, polled to see whether a newcomer waits in a backlog (poll: descriptors
        # past 1024 too); made once, as a newcomer may be looked for at each accept.
        self._backlogs = select.poll()
        self.servers: list[Any] | None = None  # None while not accepting
        self._resuming = False
        self._stale = False  # the servers being made use a TLS context replaced since
        self._pausing = False
        self._accepted_now = 0  # connections accepted in this turn of the loop (_accept)
        self._acceptors = 0  # acceptors per listener the room allowed at the last _listen
        self._wanted = 1  # acceptors per listener: ACCEPTORS while newcomers queue, else 1
        self._busiest = 0  # the most newcomers a turn of the loop took since the last tick
        self._calm = 0  # ticks in a row in which no turn took more than one newcomer
        self._watching = False  # the listener is watched for newcomers while we are full
        self.shed_pending = False  # _shed_idle is due
        self._yield_until = 0.0  # no accepting before the proxy's clock reads this (hand_over)
        # TLS connections accepted whose handshake has not finished (their connection_made,
        # which puts them in proxy.conns, comes after it), by when they were accepted: they hold
        # a descriptor each and count against the connection limit as nginx counts them. The
        # loop ends a handshake at headerTimeout without telling the protocol: tick forgets those.
        self._handshaking: dict[Any, float] = {}

    def held(self) -> int:
        """Client connections counted against the limit: served, and in their TLS handshake."""
        return len(self.proxy.conns) + len(self._handshaking)

    def shaken(self, protocol: Any) -> None:
        """`protocol`'s TLS handshake is done: it counts among proxy.conns from now on."""
        self._handshaking.pop(protocol, None)

    async def start(self, sockets: list[tuple[socket.socket, str]]) -> None:
        """Accept on `sockets`, already bound and listening."""
        self.sockets = sockets
        for listener, _ in sockets:
            self._backlogs.register(listener.fileno(), select.POLLIN)
            bound_unsent(listener)
            # socket.dup() gives the duplicate the original's timeout, and a blocking one would
            # clear O_NONBLOCK on the socket every proxy shares: a proxy that lost a newcomer
            # to another would then block in accept() until the next one came (found hung and
            # killed by the master after 10 s).
            listener.setblocking(False)
        await self._listen()

    async def _listen(self) -> None:
        """Accept clients again (at start, and once below the connection limit)."""
        proxy = self.proxy
        servers: list[Any] = []
        # Resuming at the limit for a slot or two, that many acceptors: each costs a dup(), a
        # listen() and a uvloop server (16 of them about 300 us to make and close again); the
        # tick makes those wanted once there is room (tick).
        self._acceptors = max(1, min(self._wanted, proxy.max_connections - self.held()))
        try:
            await self._make(servers, self._acceptors)
        except OSError as exc:  # (out of descriptors for the duplicate: the next close retries)
            log.error("cannot accept connections: %s", exc)
            for started in servers:
                started.close()
            return
        finally:
            self._resuming = False
        self.servers = servers
        if proxy.draining:
            self.close()
        elif self.held() >= proxy.max_connections:
            self._at_limit()
        elif self._stale:  # a new TLS context came while these servers were being made
            self.relisten()

    async def _grow(self, more: int) -> None:
        """Newcomers queue: add `more` acceptors on each listener beside those accepting now
        (made for nothing if those are closed meanwhile: at the limit, handing over, stopping)."""
        servers, made = self.servers, []
        try:
            await self._make(made, more)
        except OSError:
            pass  # (out of descriptors: accept through the acceptors there are)
        if servers is not None and servers is self.servers:
            servers.extend(made)
        else:
            for server in made:
                server.close()

    async def _make(self, servers: list[Any], count: int) -> None:
        """Add `count` acceptors on each listening socket to `servers` (OSError: not even one)."""
        backlog = self._backlog()  # (once: it reads /proc/sys/net/core/somaxconn)
        for sock, kind in self.sockets:
            # Duplicates, so closing our servers never closes the socket the master owns (nor
            # drops the connections waiting in its backlog), and ACCEPTORS of them while
            # newcomers queue (_queueing): each accepts one connection per turn of the loop
            # (libuv since 1.45, libuv#3696), and a proxy busy with thousands of clients turns
            # its loop a few dozen times a second (one server: a burst of newcomers drained at
            # about 45 a second, strace showing one accept4 per epoll_pwait of 1,024 events, and
            # reconnecting clients timed out in the backlog). create_server calls listen()
            # again: keep the kernel's full backlog, not asyncio's 100. The handshake counts
            # against the head's deadline (ClientProtocol.accepted); the loop's timer ends a
            # handshake that never finishes.
            tls = self.proxy.tls.context if kind == TLS else None
            if kind == TLS and tls is None:
                continue  # (no certificate could be loaded: the backlog waits for one)
            await self._add_acceptors(servers, sock, kind, tls, backlog, count)

    async def _add_acceptors(self, servers: list[Any], sock: socket.socket, kind: str, tls: Any,
                             backlog: int, count: int) -> None:
        """Add `count` servers on duplicates of `sock` to `servers`; short of descriptors after
        the first, as many as could be made (OSError: not even one)."""
        factory = partial(self._accept, kind)
        handshake_timeout = self.proxy.config.header_timeout if tls is not None else None
        loop = self.proxy.loop
        for made in range(count):
            try:
                dup = sock.dup()
            except OSError:
                if not made:
                    raise
                return  # (accept through the acceptors there are)
            servers.append(await loop.create_server(factory, sock=dup, backlog=backlog, ssl=tls,
                                                    ssl_handshake_timeout=handshake_timeout))

    def _backlog(self) -> int:
        """The kernel's full backlog, or where descriptors are short about as many connections as
        we may serve: the acceptors take what waits, ACCEPTORS a turn, and past the open file limit
        the event loop would have to drop them (it closes what it cannot hold)."""
        proxy = self.proxy
        return somaxconn() if proxy.fd_cap >= proxy.config.max_connections else max(8, proxy.fd_cap)

    def _accept(self, kind: str) -> ClientProtocol:
        """The protocol factory, called as each connection is accepted (its connection_made
        comes later, from the loop, after the TLS handshake: only then does it count in `conns`;
        until then, those accepted in this turn of the loop count in `_accepted_now`)."""
        proxy = self.proxy
        if not self._accepted_now:
            proxy.loop.call_soon(self._turn_over)  # (before their connection_made, after this turn's accepts)
        self._accepted_now += 1
        if self._wanted == 1 and self._someone_waiting():
            self._queueing()  # (another newcomer waits behind this one)
        if (self.held() + self._accepted_now >= proxy.max_connections and self.servers is not None
                and not self._pausing):
            # Not from in here: closing the server now would also close the connection being
            # accepted. What the other acceptors take in the same turn is served all the same.
            self._pausing = True
            proxy.loop.call_soon(self._at_limit)
        protocol = PROTOCOLS[kind](proxy)
        if kind == TLS:
            self._handshaking[protocol] = proxy.clock
        return protocol

    def _turn_over(self) -> None:
        self._busiest = max(self._busiest, self._accepted_now)
        self._accepted_now = 0

    def _queueing(self) -> None:
        """Newcomers queue behind one acceptor a listener: ACCEPTORS of them, until CALM_TICKS
        ticks in a row have taken no more than one a turn (tick)."""
        proxy = self.proxy
        self._wanted = ACCEPTORS
        self._calm = 0
        more = min(ACCEPTORS, proxy.max_connections - self.held()) - self._acceptors
        if more > 0 and self.servers is not None and not self._pausing:
            self._acceptors += more
            proxy.spawn(self._grow(more))

    def _at_limit(self) -> None:
        """At the connection limit: stop accepting; newcomers wait in the listen backlog."""
        self._pausing = False
        if self.servers is None:
            return
        self._close_servers()
        self._watch_backlog()

    def _close_servers(self) -> None:
        for server in self.servers or ():
            server.close()
        self.servers = None

    def close(self) -> None:
        """Accept nothing more (the proxy is stopping)."""
        self._close_servers()
        self._unwatch_backlog()
        self._backlogs = select.poll()  # (the listeners close next: their numbers may be reused)

    def relisten(self) -> None:
        """Accept anew (a new TLS context for new connections, or the acceptors wanted now):
        open connections go on; those arriving meanwhile wait in the kernel's backlog."""
        self._stale = self._resuming
        if self.servers is not None and not self.proxy.draining:
            self._close_servers()
            self._resume()

    def room(self) -> None:
        """A client connection closed: accept again if that made room."""
        if self.servers is None and self.held() < self.proxy.max_connections:
            self._resume()

    def tick(self) -> None:
        """Every tick: accept again if there is room (or watch the backlog while there is none),
        with the acceptors wanted once there is room for them, and one a listener again once
        newcomers have stopped queueing."""
        proxy = self.proxy
        busiest, self._busiest = self._busiest, 0
        if self._handshaking:  # (ended by the loop at headerTimeout, failed, or given up)
            expired = proxy.clock - proxy.config.header_timeout - 1.0
            for protocol in [p for p, since in self._handshaking.items() if since < expired]:
                del self._handshaking[protocol]
        if self.servers is None:
            if not self._resuming and not proxy.draining and self.sockets:
                if self.held() < proxy.max_connections:
                    self._resume()
                else:
                    self._watch_backlog()
            return
        if self._wanted > 1:
            self._calm = 0 if busiest > 1 else self._calm + 1
            if self._calm >= CALM_TICKS:
                self._wanted = 1
                self.relisten()
                return
        if self._acceptors < self._wanted and proxy.max_connections - self.held() >= self._wanted:
            self.relisten()  # (made with fewer acceptors at the limit: all of them now)

    def _watch_backlog(self) -> None:
        if not self._watching:
            self._watching = True
            for sock, _ in self.sockets:
                self.proxy.loop.add_reader(sock.fileno(), self._backlog_waiting)

    def _unwatch_backlog(self) -> None:
        if self._watching:
            self._watching = False
            for sock, _ in self.sockets:
                self.proxy.loop.remove_reader(sock.fileno())

    def _backlog_waiting(self) -> None:
        """Someone waits in the backlog while we are full: unless another proxy sharing the
        socket takes them, make room (_shed_idle)."""
        self._unwatch_backlog()
        if not self.shed_pending:
            self.shed_pending = True
            self.proxy.loop.call_later(SHED_CHECK, self._shed_idle, SHED_LOOKS)

    def _shed_idle(self, looks: int = 1) -> None:
        """Still someone in the backlog (at each of `looks` looks): close the longest-idle
        keep-alive connections to make room (as nginx reuses connections). With none idle, the
        next tick looks again."""
        proxy = self.proxy
        if self.servers is not None or proxy.draining or not self._someone_waiting():
            self.shed_pending = False
            return
        if looks > 1:
            proxy.loop.call_later(SHED_LOOK_GAP, self._shed_idle, looks - 1)
            return
        self.shed_pending = False
        since = proxy.clock - SHED_AFTER
        idle = [c for c in proxy.conns if c.current is None and not c.queue and c.phase == IDLE
                and c.idle_since <= since and not c.closed]
        shed = max(1, min(IDLE_SHED, proxy.max_connections // 16))
        for conn in heapq.nsmallest(shed, idle, key=_idle_since):
            proxy.counts[SHED_IDLE] += 1
            conn.close()

    def hand_over(self, count: int) -> None:
        """Let `count` clients go to the other proxies (the master asks: proxies.BALANCE_INTERVAL):
        their connections (open HAND_OVER_AGE at least) close after their next response, which
        says so (a keep-alive client then reconnects), and for HAND_OVER_PAUSE nothing is
        accepted here, so that they come back through another proxy."""
        proxy = self.proxy
        if proxy.draining or self.servers is None or count <= 0:
            return
        old = proxy.clock - HAND_OVER_AGE
        chosen = list(islice((conn for conn in proxy.conns
                              if not conn.closed and not conn.leaving and conn.accepted <= old), count))
        if not chosen:
            return
        for conn in chosen:
            conn.leaving = True
        log.debug("handing %d client connections over to the other proxies", len(chosen))
        self._yield_until = proxy.clock + HAND_OVER_PAUSE
        self._close_servers()

    def _someone_waiting(self) -> bool:
        """Whether a connection waits in the backlog of one of our listeners now."""
        return bool(self._backlogs.poll(0))

    def _resume(self) -> None:
        proxy = self.proxy
        if self._resuming or proxy.draining or proxy.loop is None or proxy.clock < self._yield_until:
            return  # (handing clients over: the tick resumes once HAND_OVER_PAUSE is over)
        self._unwatch_backlog()
        self._resuming = True
        proxy.spawn(self._listen())


def _idle_since(conn: ClientProtocol) -> float:
    return conn.idle_since
