"""One proxy process's place in the master (a slot): its counters, and the processes that serve
it in turn, spawned, watched and respawned as the workers' are (exec'd, back-off for crash
loops, boot timeout), with the control channel to the current one.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import os
import signal
import socket
import sys
import time
from typing import TYPE_CHECKING

from .backoff import Backoff
from .incarnation import Incarnation, describe_exit
from .proxy.control import Channel, Message
from .proxy.counters import HEALTH_CHECKS, REQUESTS, Counters
from .proxy.view import rows
from .signals import Stop

if TYPE_CHECKING:
    from .proxies import ProxyFleet

log = logging.getLogger("gows.proxies")
FAST_STOP_TIMEOUT = 5.0  # seconds a proxy told to quit at once gets before SIGKILL
# A proxy reports its load every second (process.LOAD_INTERVAL); one silent this long is hung (a
# blocked loop, SIGSTOP) and holds its clients for nothing: it is killed and replaced.
SILENCE_LIMIT = 10.0


@dataclasses.dataclass
class AccessLogState:
    """The access log as the proxies that write it report it (status and metrics read this)."""

    dropped: int = 0
    error: str = ""


class ProxySlot:
    """One proxy process's place: its counters, and the incarnations that serve it in turn."""

    def __init__(self, fleet: ProxyFleet, index: int) -> None:
        self.fleet = fleet
        self.index = index
        self.counters = Counters.shared(f"gows proxy {index}")
        self.current: Incarnation | None = None
        self.channel: Channel | None = None
        self.ready = False  # the current incarnation accepts clients
        self.restarts = 0
        self.backoff = Backoff()
        self.in_flight: dict[tuple[str, int], int] = {}  # per worker, as last reported
        self.access_log = AccessLogState()
        self.rate = 0.0  # requests per second, between the last two load reports
        self._rate_base = (time.monotonic(), 0)
        self._heard = 0.0  # when the current incarnation last sent a message
        self._health_checks = 0  # the health path answers counted at the last load report
        self._stop: Stop | None = None
        self._wake = asyncio.Event()
        self._acks: dict[int, asyncio.Future] = {}
        self.purged = 0  # the last front cache purge the current incarnation is known to have done
        self.task: asyncio.Task | None = None

    @property
    def pid(self) -> int | None:
        return self.current.pid if self.current is not None and self.current.alive else None

    def start(self) -> None:
        self.task = asyncio.ensure_future(self.run())

    def stop(self, graceful: bool) -> None:
        """End the slot: its proxy drains (TERM) or quits (QUIT); no respawn."""
        mode = Stop.GRACEFUL if graceful else Stop.NOW
        if self._stop is Stop.NOW:
            return
        self._stop = mode
        if self.current is not None:
            self.current.send(signal.SIGTERM if graceful else signal.SIGQUIT)
        self._wake.set()

    def send(self, message: Message) -> None:
        if self.channel is not None:
            self.channel.send(message)

    async def acknowledged(self, message: Message) -> None:
        """Send `message` (with a "seq") and wait for the proxy's ack (or its end)."""
        if self.channel is None or self.channel.closed:
            return
        future = asyncio.get_running_loop().create_future()
        self._acks[message["seq"]] = future
        self.send(message)
        try:
            await future
        finally:
            self._acks.pop(message["seq"], None)

    # -- the slot's loop -------------------------------------------------------------------
    async def run(self) -> None:
        try:
            while self._stop is None:
                options = self.fleet.config.restart_backoff
                delay = self.backoff.delay(options.initial, options.max)
                if delay > 0:
                    log.warning("proxy %d failed %d times in a row right after starting; restarting it in %.2fs",
                                self.index, self.backoff.failures, delay)
                    self._wake.clear()
                    try:
                        await asyncio.wait_for(self._wake.wait(), delay)
                    except asyncio.TimeoutError:
                        pass
                    if self._stop is not None:
                        break
                try:
                    inc = await self._spawn()
                except OSError as e:
                    self.backoff.failures += 1
                    log.error("proxy %d: cannot start: %s", self.index, e.strerror or e)
                    continue
                await self._watch(inc)
                if self._stop is not None:
                    break
                self._ended(inc)
        finally:
            if self.current is not None:
                await self._end(self.current)

    async def _spawn(self) -> Incarnation:
        fleet = self.fleet
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            argv = [sys.executable, "-m", "arbiter.proxy", "--index", str(self.index),
                    "--control-fd", str(theirs.fileno()),
                    "--counters-fd", str(self.counters.fd), "--parent-pid", str(os.getpid())]
            fds = [theirs.fileno(), self.counters.fd]
            for kind, sock in fleet.listeners.items():
                argv += [f"--{kind}-fd", str(sock.fileno())]
                fds.append(sock.fileno())
            inc = await Incarnation.spawn(argv, tuple(fds), fleet.sink.worker_stdout, batch=False, stdout=False)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        if inc.proc.stderr is not None:
            fleet.track(asyncio.ensure_future(fleet.sink.relay(inc.proc.stderr)))
        self.current = inc
        self.ready = False
        self.channel = await Channel.open(ours, self._on_message, self._wake.set)
        self.purged = fleet.purge_seq  # (it starts with nothing stored)
        self.send(fleet.settings())
        self.send({"op": "workers", "workers": rows(fleet.table)})
        log.info("started proxy %d (pid %d)", self.index, inc.pid)
        return inc

    async def _watch(self, inc: Incarnation) -> None:
        """Until the incarnation exits, misses its boot timeout, goes silent, or the slot stops."""
        boot_timeout = self.fleet.config.health_check.boot_timeout
        while self._stop is None and inc.alive:
            self._wake.clear()
            if not self.ready:
                timeout = inc.started + boot_timeout - time.monotonic()
                if timeout <= 0:
                    log.warning("proxy %d (pid %d) did not start accepting within %gs; killing it",
                                self.index, inc.pid, boot_timeout)
                    inc.send(signal.SIGKILL)
                    await inc.exited
                    return
            elif self.channel is not None and self.channel.closed:
                timeout = 1.0  # it broke the channel: it exits on its own, or is killed after a second
            else:
                timeout = self._heard + SILENCE_LIMIT - time.monotonic()
            waiter = asyncio.ensure_future(self._wake.wait())
            try:
                done, _ = await asyncio.wait({waiter, inc.exited}, timeout=max(timeout, 0),
                                             return_when=asyncio.FIRST_COMPLETED)
            finally:
                waiter.cancel()
            if done or not self.ready or not inc.alive:
                continue
            if self.channel is None or self.channel.closed:
                why = "closed its control channel"
            elif time.monotonic() - self._heard >= SILENCE_LIMIT:
                why = f"sent nothing for {SILENCE_LIMIT:g}s (hung)"
            else:
                continue  # it spoke meanwhile (messages do not wake this wait)
            log.error("proxy %d (pid %d) %s; killing it", self.index, inc.pid, why)
            inc.send(signal.SIGKILL)
            await inc.exited

    def _ended(self, inc: Incarnation) -> None:
        """The incarnation is gone (not stopped by us): count it, forget its gauges, respawn."""
        self._forget(inc)
        self.backoff.record(inc, self.fleet.config.restart_backoff.min_uptime)
        self.restarts += 1
        log.warning("proxy %d (pid %d) %s; starting another", self.index, inc.pid, describe_exit(inc.proc.returncode))

    def _forget(self, inc: Incarnation) -> None:
        self.current = None
        self.ready = False
        if self.channel is not None:
            self.channel.close()
            self.channel = None
        for future in self._acks.values():
            if not future.done():
                future.set_result(None)
        self.counters.zero_gauges()
        if self.in_flight:
            self.in_flight.clear()
            self.fleet.sum_in_flight()
        self.fleet.balance()

    async def _end(self, inc: Incarnation) -> None:
        """Stop the incarnation: it was sent TERM or QUIT by stop(); KILL if it outstays its time."""
        graceful = self._stop is Stop.GRACEFUL
        limit = math.ceil(self.fleet.config.graceful_timeout) + 1 if graceful else FAST_STOP_TIMEOUT
        inc.send(signal.SIGTERM if graceful else signal.SIGQUIT)
        try:
            await asyncio.wait_for(asyncio.shield(inc.exited), limit)
        except asyncio.TimeoutError:
            log.warning("proxy %d (pid %d) did not exit within %gs; killing it", self.index, inc.pid, limit)
            inc.send(signal.SIGKILL)
            await inc.exited
        self._forget(inc)
        log.info("proxy %d (pid %d) %s", self.index, inc.pid, describe_exit(inc.proc.returncode))

    def hurry(self) -> None:
        """A fast stop during a graceful one: the proxy stops waiting for in-flight requests."""
        self._stop = Stop.NOW
        if self.current is not None:
            self.current.send(signal.SIGQUIT)

    # -- messages from the proxy ---------------------------------------------------------------
    def _on_message(self, message: Message) -> None:
        self._heard = time.monotonic()
        op = message.get("op")
        if op == "ready":
            self.ready = True
            if self.current is not None:
                self.current.was_up = True
            self._rate_base = (time.monotonic(), self.counters.values[REQUESTS])
            self._wake.set()
            self.fleet.changed.set()
        elif op == "fail":
            self.fleet.passive_failure(message["host"], message["port"], message["pid"], message["error"])
        elif op == "outlier":
            self.fleet.outlier(message["host"], message["port"], message["pid"], message["error"])
        elif op == "load":
            self._load(message)
        elif op == "learned":
            self.fleet.pass_on(self, message)
        elif op == "ack":
            self.purged = max(self.purged, message["seq"])
            future = self._acks.get(message["seq"])
            if future is not None and not future.done():
                future.set_result(None)
        else:
            log.warning("proxy %d: unknown control message %r", self.index, op)

    def _load(self, message: Message) -> None:
        in_flight: dict[tuple[str, int], int] = {}
        for host, port, busy in message["workers"]:
            in_flight[(host, port)] = busy
        self.in_flight = in_flight
        self.fleet.sum_in_flight()
        self.fleet.balance()
        self.access_log = AccessLogState(**message["access_log"])
        checks = self.counters.values[HEALTH_CHECKS]
        if checks != self._health_checks:  # someone (an edge) checks this master: see Arbiter._lame_duck
            self._health_checks = checks
            self.fleet.health_asked_at = time.monotonic()
        now, requests = time.monotonic(), self.counters.values[REQUESTS]
        then, before = self._rate_base
        if now > then:
            self.rate = (requests - before) / (now - then)
        self._rate_base = (now, requests)
