"""gows' epoll thread worker: gunicorn's threaded worker, with the threads polling for themselves.

Usable on its own under gunicorn's arbiter (`gunicorn -k fileapp.worker.GowsThreadWorker`);
`python -m fileapp` runs it as gows' standalone worker (fileapp.standalone, fileapp.bootstrap).
"""
from __future__ import annotations

import errno
import os
import select
import signal
import socket
import threading
import time
from collections import deque

from . import gunicorn_compat as compat
from .gunicorn_compat import STOP_KEEPALIVE_LINGER, ThreadWorker
from .connection import Connection, timeval
from .http1 import RequestReader, base_environ
from .response import WRITE_TIMEOUT
from .serving import NEXT_REQUEST, READ_TIMEOUT, ROOM_TO_SEND, ConnectionServing
from .standby import STANDBY, Standby

# A serving thread takes up to BATCH ready connections from the poller at once and serves them
# in turn: each thread that sleeps and wakes, and each that contends for the GIL, costs more CPU
# than the request (threads=4, wrk -c100: about 2 context switches a request with one at a time).
# What it has not served after BATCH_TIME seconds, or before it waits for a client (a request
# body), it hands back to the poller for the other threads.
BATCH = 8
BATCH_TIME = 0.002
# How often the main thread closes connections that have been idle too long.
SWEEP_INTERVAL = 1.0
# With no connection to sweep, the main thread sleeps up to this long (less when a heartbeat is
# due, `idle_wake_interval`), and the thread that accepts the next connection wakes it: a hundred
# idle workers woken every second cost about 2% of a core.
IDLE_SWEEP_INTERVAL = 30.0
# After running out of file descriptors, a worker holds this many fewer connections than it had
# (per thread), so that the requests it accepts can still open their files; and it tries for
# more connections again after FD_RETRY seconds.
FD_RESERVE = 2
FD_RETRY = 30.0

_READ_TIMEVAL = timeval(READ_TIMEOUT)
# A connection the thread that accepted it serves itself: registered, not armed (not even for
# EPOLLHUP) until that thread re-arms it.
_TAKEN = select.EPOLLONESHOT


def _has_bytes(sock: socket.socket) -> bool:
    """Whether `sock`'s client has sent bytes that nobody has read yet (peeked, left queued)."""
    try:
        return bool(sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
    except OSError:  # nothing waiting (EAGAIN), or the connection is broken
        return False


def _unread_request(conn: Connection) -> bool:
    """Whether `conn`'s client sent the start of its next request in time and no thread has read
    it yet: the worker is behind (every thread busy), and closing it would fail a request the
    client did nothing wrong with. (A response still waiting for its reader is no excuse, nor
    a head begun earlier: its deadline, from its first bytes, is never pushed back.)"""
    return conn.rest is None and not conn.reader.in_head and _has_bytes(conn.sock)


class GowsThreadWorker(ConnectionServing, ThreadWorker):
    """gunicorn's threaded worker, with the threads polling for themselves.

    gthread hands every request across threads twice: the main thread polls, a pool thread
    serves, then passes the connection back through a pipe to be polled again; about a dozen
    syscalls and two thread switches per keep-alive request. Here one serving thread polls one
    epoll; each connection is registered once, EPOLLONESHOT, so one thread gets its next
    request, parses it with httptools (fileapp.http1), answers it (fileapp.response) and re-arms
    it (fileapp.serving): epoll_wait, recv, sendmsg, epoll_ctl per request, or per batch of
    pipelined requests, whose answers leave together (fileapp.response). A new connection
    wakes it too (the listeners are edge-triggered), and it serves the request that came with
    it. The other `threads` stand by, and serve beside it while it is stuck on one connection
    (fileapp.standby).
    A thread never waits for a slow reader: what the client has not taken of a response stays
    with the connection, re-armed for EPOLLOUT, and any thread sends more when there is room
    (fileapp.response, fileapp.transfer), so health checks always find a thread.

    Also: bodies written in one piece leave in one write with their headers, and fileapp's
    health turns 503 on SIGTERM. TLS, HTTP/2 or PROXY-protocol configs run plain gthread.
    Usable under gunicorn's own arbiter too: `gunicorn -k fileapp.worker.GowsThreadWorker`.
    """

    write_timeout = WRITE_TIMEOUT  # seconds a client may take nothing of a response
    # Signals whose handlers run in the main thread: the serving threads block them.
    main_thread_signals: frozenset[int] = frozenset(ThreadWorker.SIGNALS)

    def init_process(self) -> None:
        self._base_environ = base_environ(self.cfg)
        self._pre_request, self._post_request = compat.request_hooks(self.cfg, self.log)
        self._keepalive = self.cfg.keepalive  # (a Config attribute is a lookup through its settings)
        self._write_timeval = timeval(self.write_timeout)
        # Accepted sockets inherit TCP_NODELAY: without it gunicorn's separate header and body
        # writes (streamed bodies) meet Nagle and delayed ACKs, 40 ms per response.
        for listener in self.sockets:
            if listener.family in (socket.AF_INET, socket.AF_INET6):
                listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._ep = select.epoll()
        self._lock = threading.Lock()  # guards _conns, each Connection.busy and _accepting
        self._conns: dict[int, Connection] = {}
        self._accepting = False
        # The main thread sleeps past SWEEP_INTERVAL: wake it when a connection stays open (one
        # served and closed at once, a health check's, needs no sweep). (Not "the first
        # connection": a worker taking one at a time would wake it twice for each.)
        self._sweep_idle = False
        self._room = self.worker_connections  # lowered after the process ran out of file descriptors
        self._room_lowered = 0.0
        self._wake_r, self._wake_w = os.pipe()  # written once, at the very end: wakes them all
        self._pending = threading.local()  # .batch: what a thread took from the poller, not served yet
        self._standby = Standby()  # which thread serves; stopped after the drain: they all return
        super().init_process()

    def set_draining(self) -> None:
        """Make the app's health endpoint answer 503 (if the app has one)."""
        health = getattr(getattr(self, "wsgi", None), "health", None)
        if health is not None:
            health.draining = True

    def handle_exit(self, sig, frame) -> None:
        """SIGTERM: fail health checks, stop accepting, let in-flight requests finish."""
        self.set_draining()
        super().handle_exit(sig, frame)

    # -- the main thread: heartbeat, parent watch, idle timeouts, drain ----------------------

    def run(self) -> None:
        # TLS, HTTP/2 and PROXY-protocol lines are gthread's to read: its own loop serves them.
        if self.cfg.is_ssl or self.cfg.http2_cleartext != "off" or self.cfg.proxy_protocol != "off":
            return super().run()
        compat.watch_method_queue(self)
        for listener in self.sockets:
            listener.setblocking(False)
        self._ep.register(self._wake_r, select.EPOLLIN)
        with self._lock:
            self._accept_while_room()
        threads = [threading.Thread(target=self._serve_forever, name=f"gows serve {i}", daemon=True)
                   for i in range(self.cfg.threads)]
        for started, thread in enumerate(threads):
            try:
                thread.start()
            except RuntimeError as e:  # (pthread_create failed: out of pids, ulimit -u or memory)
                self.log.error("Could not start serving thread %d of %d (%s): the system allows no more "
                               "threads (kernel.pid_max, ulimit -u or memory); lower threads or the number "
                               "of workers", started + 1, len(threads), e)
                raise SystemExit(1) from None
        while self.alive:
            self.notify()
            self.wait_for_and_dispatch_events(timeout=self._next_sweep())
            if not self.is_parent_alive():
                break
            self._close_idle()
        self.alive = False
        # Drain: no new connections; kept-alive ones may send one more request (answered with
        # Connection: close) for STOP_KEEPALIVE_LINGER; in-flight ones (a response still being
        # sent too) get the graceful timeout.
        now = time.monotonic()
        with self._lock:
            self._accept_while_room()
            for conn in self._conns.values():
                if conn.rest is None:
                    conn.timeout = min(conn.timeout, now + STOP_KEEPALIVE_LINGER)
        deadline = now + self.cfg.graceful_timeout
        while self._conns and time.monotonic() < deadline:
            self.notify()
            self.wait_for_and_dispatch_events(timeout=0.1)
            self._close_idle()
        self._standby.stop()
        os.write(self._wake_w, b"x")
        for thread in threads:
            thread.join(0.5)
        for listener in self.sockets:
            listener.close()

    def _accept_while_room(self, rearm: bool = False) -> None:
        """Poll the listeners while the worker is alive and below its connection limit:
        worker_connections, or fewer after running out of file descriptors (under the lock).
        `rearm`: register them afresh, so that connections already waiting are reported again."""
        wanted = self.alive and len(self._conns) < self._room
        if wanted == self._accepting and not (rearm and wanted):
            return
        for listener in self.sockets:
            if self._accepting:
                self._ep.unregister(listener.fileno())
            if wanted:
                # EPOLLEXCLUSIVE: when worker processes share a listener, one of them wakes.
                # EPOLLET: and one serving thread of this one. Level-triggered, the listener
                # stays ready until accepted from, and each thread waiting on the poller wakes
                # in turn for the same connection: all but one to find nothing, then to queue
                # for the GIL (4 threads: 3 wasted wake-ups and 3 failed accepts a connection).
                self._ep.register(listener.fileno(),
                                  select.EPOLLIN | select.EPOLLEXCLUSIVE | select.EPOLLET)
        self._accepting = wanted

    def idle_wake_interval(self) -> float:
        """The longest the main thread sleeps with no connection to sweep: under gunicorn's
        arbiter, until its heartbeat is due (the arbiter gives it half its timeout; 0: none),
        which is also how often gunicorn's sync worker looks whether its parent is gone."""
        return min(IDLE_SWEEP_INTERVAL, self.timeout or IDLE_SWEEP_INTERVAL)

    def _next_sweep(self) -> float:
        """Seconds until the main thread's next sweep: SWEEP_INTERVAL while the worker holds a
        connection or is short of descriptors; otherwise `idle_wake_interval`, and `_accept`
        wakes it for the next connection."""
        with self._lock:
            idle = self._sweep_idle = not self._conns and self._room >= self.worker_connections
        return self.idle_wake_interval() if idle else SWEEP_INTERVAL

    def _needs_sweep(self) -> None:
        """A connection stays open, and its deadline needs the sweep: wake the main thread if it
        sleeps past SWEEP_INTERVAL (under the lock)."""
        if self._sweep_idle:
            self._sweep_idle = False
            compat.wake_main_loop(self)

    def _close_idle(self) -> None:
        """Close the connections that have waited past their timeout for a request or for their
        client to take more of a response (and, a while after running out of file descriptors,
        try for more connections again)."""
        now = time.monotonic()
        with self._lock:
            idle = [fd for fd, conn in self._conns.items()
                    if not conn.busy and conn.timeout <= now and not _unread_request(conn)]
            for fd in idle:
                self._drop(fd)
            lowered = self._room < self.worker_connections
            if lowered and now - self._room_lowered >= FD_RETRY:
                self._room = self.worker_connections
            # Out of descriptors, a connection the worker could not accept is left waiting, and
            # an edge-triggered listener reports it no more: looked at again every sweep.
            self._accept_while_room(rearm=lowered)

    def _drop(self, fd: int) -> None:
        """Forget and close one connection (under the lock)."""
        conn = self._conns.pop(fd)
        try:
            self._ep.unregister(fd)
        except OSError:
            pass
        conn.close()

    # -- the serving threads ---------------------------------------------------------------

    def _serve_forever(self) -> None:
        """Take ready connections one at a time, serve them and re-arm them, until stopped."""
        try:
            self._serve_ready()
        except BaseException:
            # A lost thread would quietly shrink the worker: exit, and let the master restart it.
            self.log.exception("Serving thread failed; the worker exits")
            self.alive = False
            compat.wake_main_loop(self)

    def _serve_ready(self) -> None:
        # The kernel gives a process signal to any thread that does not block it, and Python
        # runs handlers only in the main thread: sent here, SIGTERM would wait for the main
        # thread's next wake-up (up to a second) while this thread kept answering "healthy".
        signal.pthread_sigmask(signal.SIG_BLOCK, self.main_thread_signals)
        ep, lock, conns = self._ep, self._lock, self._conns
        # fd -> (listener, its address): getsockname once, not once per accepted connection
        listeners = {listener.fileno(): (listener, listener.getsockname()) for listener in self.sockets}
        pending = self._pending.batch = deque()
        standby = self._standby
        mine = standby.claim()  # the first thread serves
        while not standby.stopped:
            if not mine and not standby.stuck() and not standby.wait_turn():
                return  # stopped
            try:  # (beside a stuck serving thread: until it is back, STANDBY at most a round)
                if mine:
                    events = ep.poll(0, BATCH)
                    if not events:
                        # Out of work: let a runnable peer (a proxy about to write the next
                        # request) go first, then block. Blocking at once, a 100-worker gows fell
                        # into sleeping and waking per request (ab 150 KB: 15.5k -> 17.1k req/s).
                        os.sched_yield()
                        events = ep.poll(-1, BATCH)
                else:
                    events = ep.poll(STANDBY, BATCH)
            except OSError:  # closed at exit
                return
            ready = []
            with lock:
                for fd, _ in events:
                    conn = conns.get(fd)
                    if conn is not None:
                        pending.append((fd, conn))
                    elif fd in listeners:
                        ready.append(listeners[fd])
            for listener in ready:
                self._accept(*listener)
            started = time.monotonic()
            if mine:
                standby.took_batch(started)
            while pending:
                fd, conn = pending.popleft()
                with lock:
                    if conns.get(fd) is not conn or conn.busy:  # closed meanwhile, or stale
                        continue
                    conn.busy = True
                wanted = self._serve(conn) if conn.rest is None else self._send_rest(conn)
                with lock:
                    conn.busy = False
                    if wanted is not None:
                        ep.modify(fd, wanted)
                        self._needs_sweep()
                    else:
                        self._drop(fd)
                        self._accept_while_room()
                if pending and time.monotonic() - started > BATCH_TIME:
                    self._hand_back()
            if mine:
                standby.batch_done()

    def _hand_back(self) -> None:
        """Re-arm the connections this thread took from the poller but has not served yet, so
        that another thread serves them (before this one waits for a client, or when it has
        spent BATCH_TIME on its batch)."""
        pending = getattr(self._pending, "batch", None)
        if not pending:
            return
        with self._lock:
            while pending:
                fd, conn = pending.popleft()
                if self._conns.get(fd) is conn and not conn.busy:
                    self._ep.modify(fd, NEXT_REQUEST if conn.rest is None else ROOM_TO_SEND)

    def _accept(self, listener: socket.socket, server) -> None:
        """Accept up to BATCH connections waiting on `listener`, while there is room. It is
        edge-triggered: it reports the ones left only when another arrives, so with BATCH
        accepted it is armed afresh (not accepting them all at once: their requests come first,
        and short of descriptors they are the ones to get the files)."""
        for _ in range(BATCH):
            if not self._accepting:
                return
            try:
                sock, addr = listener.accept()
            except OSError as e:
                if e.errno == errno.ECONNABORTED:
                    continue  # (the client left before it was accepted: the next one)
                if e.errno in (errno.EMFILE, errno.ENFILE):
                    # Out of file descriptors: leave new connections in the backlog until there is room.
                    with self._lock:
                        self._room = max(1, len(self._conns) - FD_RESERVE * self.cfg.threads)
                        self._room_lowered = time.monotonic()
                        self._accept_while_room()
                    self.log.warning("Out of file descriptors at %d connections (%s): holding at most %d",
                                     len(self._conns), e, self._room)
                elif e.errno not in (errno.EAGAIN, errno.EWOULDBLOCK):
                    raise  # (EAGAIN: none left, or another worker or thread took it)
                return
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _READ_TIMEVAL)
            # (Responses never block; gunicorn's own few writes, such as 100 Continue, could.)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, self._write_timeval)
            # Until its first request arrives the connection gets READ_TIMEOUT, then the keep-alive time.
            conn = Connection(sock, addr, server, RequestReader(self.cfg, sock, addr, self._hand_back),
                              time.monotonic() + READ_TIMEOUT)
            # A request that came with its connection is served by this thread: another one
            # woken for it would cost a wake-up and a hand-over of the GIL.
            fd, sent = sock.fileno(), _has_bytes(sock)
            with self._lock:
                self._conns[fd] = conn
                self._ep.register(fd, _TAKEN if sent else NEXT_REQUEST)
                self._accept_while_room()
                if not sent:  # (a request that came with it: this thread looks after serving it)
                    self._needs_sweep()
            if sent:
                self._pending.batch.append((fd, conn))
        with self._lock:
            self._accept_while_room(rearm=True)
