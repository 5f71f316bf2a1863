"""Local workers: one slot per worker port, owning the port's listening sockets (TCP, and the
Unix socket the proxies use) for the slot's whole life and the processes ("incarnations",
incarnation.py) that serve them: spawn, watch, replace, back off (backoff.py), stop.
"""
from __future__ import annotations

import asyncio
import enum
import logging
import math
import signal
import socket
import time
from typing import Callable

from .backoff import Backoff, Pool
from .health import HealthChecker, ProbeSkipped, probe
from .incarnation import Incarnation, describe_exit, killed_from_outside
from .ops.logs import LogSink
from .signals import Stop
from .sockets import UnixListener
from .state import WorkerState, WorkerTable
from .worker_command import WorkerOptions, worker_argv

log = logging.getLogger("gows.workers")
FAST_STOP_TIMEOUT = 5.0  # seconds a worker told to quit at once gets before SIGKILL
RELOAD_PROBE_SPACING = 0.1  # seconds between the probes that prove a reloaded worker healthy


def _settle(future: asyncio.Future, value: object) -> None:
    if not future.done():  # the waiter may have been cancelled (a stop during a reload)
        future.set_result(value)


class Outcome(enum.Enum):
    """Why a slot stops watching its current incarnation (LocalWorker._watch)."""

    STOP = "stop"  # the slot is ending
    EXITED = "exited"  # the process is gone
    RELOAD = "reload"  # new options are waiting
    UNHEALTHY = "unhealthy"  # it was up, then failed `fall` checks in a row
    BOOT = "boot"  # it did not become healthy within the boot timeout


class LocalWorker:
    """The supervisor of one local worker port (see the module docstring).

    Only `run()` starts and ends incarnations; other code asks it through stop()/reload() and the
    health callbacks, so the slot's decisions are made in one place, one at a time.
    """

    def __init__(self, state: WorkerState, sock: socket.socket, table: WorkerTable,
                 checker: HealthChecker, options: WorkerOptions, sink: LogSink, pool: Pool,
                 unix: UnixListener | None = None,
                 bind_unix: Callable[[], UnixListener | None] | None = None) -> None:
        """`unix`: the Unix socket the proxies reach the worker on; `bind_unix` makes another
        (each reloaded incarnation gets its own, see _swap)."""
        self.state, self.sock, self.table, self.checker = state, sock, table, checker
        self.unix = unix  # state.unix_path names it
        self._bind_unix = bind_unix
        self.options = options
        self.sink = sink
        self.pool = pool
        self.backoff = Backoff()
        self.current: Incarnation | None = None
        self._starting = False  # between deciding to start an incarnation and having it
        self._start_failed = False  # the last start raised OSError: the master's own trouble
        self._rescued = False  # the current incarnation was started as the pool's rescue (backoff.Pool)
        self._live: set[Incarnation] = set()
        self._background: set[asyncio.Task] = set()
        self._wake = asyncio.Event()
        self._stop_mode: Stop | None = None  # set once the slot is to end
        self._pending: tuple[WorkerOptions, asyncio.Future[bool]] | None = None
        self._spawned_once = False
        self.task: asyncio.Task | None = None

    # -- requests from the arbiter ---------------------------------------------------------
    def start(self) -> None:
        """Join the pool and run the slot's loop as a task on the current loop."""
        self.pool.join(self)
        self.task = asyncio.get_running_loop().create_task(self.run(), name=f"worker {self.state.address}")

    @property
    def on_its_way(self) -> bool:
        """The slot has a worker up or on its way up (see Pool)."""
        return self._starting or self.current is not None

    def notify(self) -> None:
        """Something about this worker's health, or the pool's, changed: re-evaluate."""
        current = self.current
        if current is not None and self.state.up and self.state.pid == current.pid:
            self._mark_up(current)
        self._wake.set()

    def stop(self, graceful: bool = True) -> None:
        """End the slot: drain (TERM, KILL after the graceful timeout) or quit at once (QUIT)."""
        if graceful:
            self._stop_mode = self._stop_mode or Stop.GRACEFUL
        elif self._stop_mode is not Stop.NOW:
            self._stop_mode = Stop.NOW
            for inc in list(self._live):
                inc.send(signal.SIGQUIT)
                inc.send(signal.SIGCONT)
        self._wake.set()

    async def reload(self, options: WorkerOptions) -> bool:
        """Serve with new options: a new incarnation proves healthy before the old one drains.

        Returns False when the new incarnation failed and the old one keeps serving.
        """
        if self._stop_mode is not None:
            return False
        future = asyncio.get_running_loop().create_future()
        self._pending = (options, future)
        self._wake.set()
        return await future

    def close(self) -> None:
        """Close the port's listening sockets (and remove the Unix socket's file), once the
        slot's processes are gone."""
        self.sock.close()
        if self.unix is not None:
            self.unix.close()

    # -- the slot's loop -------------------------------------------------------------------
    async def run(self) -> None:
        try:
            while self._stop_mode is None:
                if self.current is None:
                    await self._start_next()
                    continue
                outcome = await self._watch(self.current)
                if outcome is Outcome.STOP:
                    break
                if outcome is Outcome.RELOAD:
                    await self._reload(self.current)
                elif outcome is Outcome.EXITED:
                    inc = self._drop_current()
                    self._live.discard(inc)
                    self.backoff.record(inc, self.options.min_uptime)
                    reason = describe_exit(inc.proc.returncode)
                    log.warning("worker %s (pid %d) %s", self.state.address, inc.pid, reason)
                    if self._rescued and not inc.was_up and not killed_from_outside(inc.proc.returncode):
                        self._rescue_failed()
                    self.table.exited(self.state, reason)
                else:
                    inc = self._drop_current()
                    self.backoff.record(inc, self.options.min_uptime)
                    reason = (f"did not become healthy within {self.options.boot_timeout:g}s"
                              if outcome is Outcome.BOOT else f"failed {self.state.consecutive_failures} health checks")
                    log.warning("worker %s (pid %d) %s (%s); replacing it", self.state.address, inc.pid,
                                reason, self.state.last_error or "no answer")
                    self.table.exited(self.state, reason)
                    self._end_in_background(inc, graceful=True)
        finally:
            await self._shutdown()

    def _mark_up(self, inc: Incarnation) -> None:
        inc.was_up = True
        self.pool.worker_up()

    def _rescue_failed(self) -> None:
        o = self.options
        delay = self.pool.rescue_failed(o.backoff_initial, o.backoff_max)
        log.warning("worker %s was started because no local worker was up or starting, and it exited "
                    "before it was up (%d such in a row): the next such start waits %.2fs",
                    self.state.address, self.pool.rescues_failed, delay)

    def _drop_current(self) -> Incarnation:
        """The current incarnation is over (or being replaced): the slot has nothing on its way."""
        inc, self.current = self.current, None
        self.pool.changed()
        return inc

    async def _start_next(self) -> None:
        """Start the next incarnation, after the back-off delay when the worker keeps failing."""
        o = self.options
        delay = self.backoff.delay(o.backoff_initial, o.backoff_max)
        self._rescued = False
        if delay > 0 and self._pending is None:
            await self._back_off(delay)
            if self._stop_mode is not None:
                return
        if self._pending is not None:  # a reload while nothing runs: start with its options now
            self.options, future = self._pending
            self._pending = None
            self.backoff.failures = 0
            _settle(future, True)
        self._starting = True  # claimed in the same loop step as the decision (see Pool)
        try:
            inc = await self._spawn(self.options)
        except OSError as e:
            self._starting = False
            self._start_failed = True
            self.backoff.failures += 1
            self.state.last_error = f"cannot start: {e.strerror or e}"
            log.error("worker %s: cannot start: %s", self.state.address, e.strerror or e)
            self.pool.changed()
            return
        self._starting = False
        self._start_failed = False
        if self._spawned_once:
            self.state.restarts += 1
        self._spawned_once = True
        self.current = inc
        self.table.spawned(self.state, inc.pid)
        self.checker.kick(self.state)

    async def _back_off(self, delay: float) -> None:
        """Wait `delay` seconds, or less: until a stop or a reload, or until no local worker is up
        or starting (then this slot starts now, so that the pool has a worker on its way; after
        such rescues that exited by themselves, once the pool's own back-off allows: see Pool).

        A slot takes that rescue only once its earlier incarnations are gone, so a worker killed
        for its boot timeout is not replaced faster than it exits; and not when its last start
        failed with OSError (the master's own shortage, such as EMFILE): that would only fail
        again, in a loop.
        """
        address, failures, last = self.state.address, self.backoff.failures, self.state.last_error or "unknown"
        if self._rescue_in() == 0:
            log.warning("worker %s failed %d times in a row right after starting (last: %s); restarting "
                        "it now instead of in %.2fs: no local worker is up or starting", address, failures,
                        last, delay)
            self._rescued = True
            return
        log.warning("worker %s failed %d times in a row right after starting (last: %s); "
                    "restarting it in %.2fs", address, failures, last, delay)
        deadline = time.monotonic() + delay
        while self._stop_mode is None and self._pending is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            rescue = self._rescue_in()
            if rescue == 0:
                log.warning("worker %s: restarting it now instead of in %.2fs: no local worker is up or "
                            "starting any more", address, remaining)
                self._rescued = True
                return
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), remaining if rescue is None else min(remaining, rescue))
            except asyncio.TimeoutError:
                pass

    async def _spawn(self, options: WorkerOptions, unix: UnixListener | None = None) -> Incarnation:
        fd = self.sock.fileno()
        unix = unix or self.unix
        unix_fd = unix.sock.fileno() if unix is not None else None
        argv = worker_argv(options, fd, self.state.host, self.state.port, unix_fd)
        fds = (fd,) if unix_fd is None else (fd, unix_fd)
        inc = await Incarnation.spawn(argv, fds, self.sink.worker_stdout)
        self._live.add(inc)
        if inc.proc.stdout is not None:
            self._track(asyncio.ensure_future(self.sink.relay(inc.proc.stdout)))
        log.info("started worker %s (pid %d)", self.state.address, inc.pid)
        return inc

    async def _watch(self, inc: Incarnation) -> Outcome:
        """Wait until the incarnation must end or be replaced; say why."""
        while True:
            self._wake.clear()
            if self._stop_mode is not None:
                return Outcome.STOP
            if not inc.alive:
                return Outcome.EXITED
            if self._pending is not None:
                return Outcome.RELOAD
            state = self.state
            if state.up and state.pid == inc.pid:
                self._mark_up(inc)
            if inc.was_up:
                if not state.up and state.consecutive_failures >= self.table.fall:
                    return Outcome.UNHEALTHY
                timeout = None
            else:
                timeout = inc.started + self.options.boot_timeout - time.monotonic()
                if timeout <= 0:
                    return Outcome.BOOT
            waiter = asyncio.ensure_future(self._wake.wait())
            try:
                await asyncio.wait({waiter, inc.exited}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            finally:
                waiter.cancel()

    def _rescue_in(self) -> float | None:
        """Seconds before this slot may cut its back-off short, the pool having nothing on its way
        (0: now; see _back_off); None while it may not."""
        if self._start_failed or self._live or self.pool.has_worker_on_its_way():
            return None
        return self.pool.rescue_in()

    # -- reload --------------------------------------------------------------------------
    async def _reload(self, old: Incarnation) -> None:
        options, future = self._pending
        self._pending = None
        if not (old.was_up and self.state.up):
            # Nothing healthy to keep serving: replace it straight away with the new options.
            self.options = options
            self.backoff.failures = 0
            self._drop_current()
            self.table.exited(self.state, "reloaded", deliberate=True)
            self._end_in_background(old, graceful=True)
            _settle(future, True)
            return
        _settle(future, await self._swap(old, options))

    async def _swap(self, old: Incarnation, options: WorkerOptions) -> bool:
        """Start a new incarnation on the shared socket and prove it healthy, then drain the old.

        Both incarnations accept on the same socket, so a probe could be answered by either: the
        old one is paused (SIGSTOP) while the new one is probed, which makes every answer the new
        one's. Clients are delayed, never refused: the kernel queues their connections, and the
        old one's in-flight requests resume on SIGCONT. If the new one fails, the old one resumes
        and keeps serving with the previous settings.

        The new incarnation gets a Unix socket of its own, which the proxies switch to at the
        handover: a connection they make afterwards can only reach the new process, never the
        old one between its SIGCONT and its SIGTERM (on the shared TCP port it could). The old
        socket goes with the old process.
        """
        address = self.state.address
        self.checker.hold(self.state)
        new: Incarnation | None = None
        fresh = self._bind_unix() if self.unix is not None and self._bind_unix is not None else None
        try:
            try:
                new = await self._spawn(options, fresh)
            except OSError as e:
                error = f"cannot start: {e.strerror or e}"
            else:
                old.send(signal.SIGSTOP)
                try:
                    error = await self._prove(new, options)
                finally:
                    old.send(signal.SIGCONT)
        finally:
            self.checker.release(self.state)
        if error is None:
            self.options = options
            self.current = new
            self._mark_up(new)
            self.backoff.failures = 0
            retired = None
            if fresh is not None:
                retired, self.unix = self.unix, fresh
                self.state.unix_path = fresh.path
            self.table.handover(self.state, new.pid)
            log.info("reloaded worker %s: pid %d took over from pid %d", address, new.pid, old.pid)
            self._end_in_background(old, graceful=True, then_close=retired)
            return True
        log.error("reload of worker %s failed: the new process %s; pid %d keeps serving with the "
                  "previous settings", address, error, old.pid)
        if new is not None:
            self._end_in_background(new, graceful=False, then_close=fresh)
        elif fresh is not None:
            fresh.close()
        return False

    async def _prove(self, new: Incarnation, options: WorkerOptions) -> str | None:
        """None once `rise` consecutive probes passed (all answered by `new`), else why not.

        A probe the master could not make (its own shortage of descriptors or memory) neither
        passes nor fails: it is tried again, until the boot timeout.
        """
        deadline = new.started + options.boot_timeout
        passes, error = 0, "did not answer"
        while passes < self.table.rise:
            if self._stop_mode is not None:
                return "was abandoned: the master is stopping"
            if not new.alive:
                return describe_exit(new.proc.returncode)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return f"did not become healthy within {options.boot_timeout:g}s ({error})"
            try:
                result = await probe(self.state.host, self.state.port, options.health_path,
                                     min(options.check_timeout, remaining))
            except ProbeSkipped as why:
                self.checker.skipped(self.state, why)
                error = f"not probed: {why}"
            else:
                if result is None:
                    passes += 1
                else:
                    passes, error = 0, result
            if passes < self.table.rise:
                await asyncio.sleep(min(options.check_interval, RELOAD_PROBE_SPACING))
        return None

    # -- ending incarnations -------------------------------------------------------------
    def _track(self, task: asyncio.Future) -> None:
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _end_in_background(self, inc: Incarnation, graceful: bool, then_close: UnixListener | None = None) -> None:
        """End `inc` without waiting for it; then close `then_close`, the socket only it served."""
        task = asyncio.ensure_future(self._end(inc, graceful))
        if then_close is not None:
            task.add_done_callback(lambda _: then_close.close())
        self._track(task)

    async def _end(self, inc: Incarnation, graceful: bool) -> None:
        """Stop one incarnation: TERM (drain) or QUIT (at once); KILL if it outstays its time."""
        graceful = graceful and self._stop_mode is not Stop.NOW
        limit = math.ceil(self.options.graceful_timeout) + 1 if graceful else FAST_STOP_TIMEOUT
        inc.send(signal.SIGTERM if graceful else signal.SIGQUIT)
        inc.send(signal.SIGCONT)  # a stopped process cannot act on either signal
        try:
            await asyncio.wait_for(asyncio.shield(inc.exited), limit)
        except asyncio.TimeoutError:
            log.warning("worker %s (pid %d) did not exit within %gs; killing it", self.state.address, inc.pid, limit)
            inc.send(signal.SIGKILL)
            await inc.exited
        self._live.discard(inc)
        self._wake.set()  # a back-off may have waited for this process to go (see _back_off)
        log.info("worker %s (pid %d) %s", self.state.address, inc.pid, describe_exit(inc.proc.returncode))

    async def _shutdown(self) -> None:
        self.pool.leave(self)  # a stopping slot is nobody's worker on its way
        if self._pending is not None:
            _settle(self._pending[1], False)
            self._pending = None
        if self.current is not None:
            self._end_in_background(self.current, graceful=self._stop_mode is not Stop.NOW)
            self.current = None
            self.table.exited(self.state, "stopped", deliberate=True)
        while self._background:
            await asyncio.gather(*list(self._background), return_exceptions=True)
