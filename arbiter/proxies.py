"""The proxy processes, seen from the master: one slot per process, spawned, watched and
respawned as the workers are (exec'd, back-off for crash loops, boot timeout, gone with the
master), and the fleet that holds them: settings and the worker table pushed to every proxy,
their counters summed for the admin page and metrics, resized at a reload.

Every proxy accepts on the one listening socket the master bound and hands down: the kernel
queues a connection until some proxy takes it, so a proxy's restart (or retirement) never
refuses a client. (One SO_REUSEPORT socket per proxy spreads connections by hash instead;
measured no better here, and a closed reuseport socket's queue is lost: see the README.)
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import os
import resource
import signal
import socket
import sys
import time
from typing import Any

from .backoff import Backoff
from .config import Config, ProxyConfig
from .incarnation import Incarnation, describe_exit
from .ops.logs import LogSink
from .proxy.control import Channel, Message
from .proxy.counters import LATENCY, REQUESTS, WORKERS, Counters, report, total
from .proxy.server import FDS_PER_CLIENT, fd_need
from .proxy.stats import SLOTS, RequestStats
from .proxy.view import rows
from .signals import Stop
from .state import WorkerState, WorkerTable

log = logging.getLogger("gows.proxies")
FAST_STOP_TIMEOUT = 5.0  # seconds a proxy told to quit at once gets before SIGKILL
ACK_TIMEOUT = 5.0  # seconds to wait for every proxy to confirm a purge


def process_count(config: Config) -> int:
    """proxy.processes, or (null) one per CPU this process may run on."""
    if config.proxy.processes is not None:
        return config.proxy.processes
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


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
        self._stop: Stop | None = None
        self._wake = asyncio.Event()
        self._acks: dict[int, asyncio.Future] = {}
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
                    "--listen-fd", str(fleet.listener.fileno()), "--control-fd", str(theirs.fileno()),
                    "--counters-fd", str(self.counters.fd), "--parent-pid", str(os.getpid())]
            inc = await Incarnation.spawn(argv, (fleet.listener.fileno(), theirs.fileno(), self.counters.fd),
                                          fleet.sink.worker_stdout, batch=False, stdout=False)
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
        self.send(fleet.settings())
        self.send({"op": "workers", "workers": rows(fleet.table)})
        log.info("started proxy %d (pid %d)", self.index, inc.pid)
        return inc

    async def _watch(self, inc: Incarnation) -> None:
        """Until the incarnation exits, misses its boot timeout, or the slot stops."""
        boot_timeout = self.fleet.config.health_check.boot_timeout
        while self._stop is None and inc.alive:
            self._wake.clear()
            timeout = None
            if not self.ready:
                timeout = inc.started + boot_timeout - time.monotonic()
                if timeout <= 0:
                    log.warning("proxy %d (pid %d) did not start accepting within %gs; killing it",
                                self.index, inc.pid, boot_timeout)
                    inc.send(signal.SIGKILL)
                    await inc.exited
                    return
            if self.channel is not None and self.channel.closed and self.ready:
                timeout = 1.0  # it broke the channel: it exits on its own, or is killed after a second
            waiter = asyncio.ensure_future(self._wake.wait())
            try:
                done, _ = await asyncio.wait({waiter, inc.exited}, timeout=timeout,
                                             return_when=asyncio.FIRST_COMPLETED)
            finally:
                waiter.cancel()
            if not done and self.ready and inc.alive:
                log.error("proxy %d (pid %d) closed its control channel; killing it", self.index, inc.pid)
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
        elif op == "load":
            self._load(message)
        elif op == "ack":
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
        self.access_log = AccessLogState(**message["access_log"])
        now, requests = time.monotonic(), self.counters.values[REQUESTS]
        then, before = self._rate_base
        if now > then:
            self.rate = (requests - before) / (now - then)
        self._rate_base = (now, requests)


class FleetLatency(RequestStats):
    """The latency histogram of all proxies together (RequestStats' read side)."""

    __slots__ = ("fleet",)

    def __init__(self, fleet: ProxyFleet) -> None:
        self.fleet = fleet

    @property
    def counts(self) -> list[int]:  # type: ignore[override]
        sums = self.fleet.totals()
        return sums[LATENCY:LATENCY + SLOTS + 1]


class ProxyFleet:
    """All proxy processes of the master (status, metrics and the arbiter use this)."""

    def __init__(self, config: Config, table: WorkerTable, listener: socket.socket, sink: LogSink,
                 timing: bool) -> None:
        self.config = config
        self.table = table
        self.listener = listener
        self.sink = sink
        self.timing = timing  # latencies are measured (the admin listener reads them)
        self.slots: list[ProxySlot] = []
        self.retired: list[Counters] = []  # counters of slots retired at a reload: still counted
        self.latency = FleetLatency(self)
        self.changed = asyncio.Event()  # some slot became ready
        self._background: set[asyncio.Future] = set()
        self._seq = 0
        self._push_pending = False
        # Each worker with what its counter held when it joined (a counter slot may be reused).
        self._counted: dict[tuple[str, int], tuple[WorkerState, int]] = {}
        table.watch(self._table_changed)

    # -- what the proxies are told -----------------------------------------------------------
    def settings(self) -> Message:
        """The settings message: the config's sections, with the whole server's budgets split
        between the proxies (connections, request bodies, front cache)."""
        config, n = self.config, max(1, len(self.slots))
        proxy = dataclasses.replace(config.proxy, max_connections=max(1, -(-config.proxy.max_connections // n)),
                                    body_buffer_bytes=config.proxy.body_buffer_bytes // n)
        front = dataclasses.replace(config.front_cache, max_bytes=config.front_cache.max_bytes // n)
        access = config.logging.access_log
        return {"op": "settings", "proxy": dataclasses.asdict(proxy), "front_cache": dataclasses.asdict(front),
                "threads": config.threads, "ttl": config.cache.ttl, "timing": self.timing,
                "graceful_timeout": config.graceful_timeout,
                "access_log": str(access) if access is not None else None,
                "log_format": config.logging.format, "log_level": config.logging.level}

    def _table_changed(self) -> None:
        """The worker table changed: push it to every proxy, once per pass of the loop."""
        for worker in self.table:
            if worker.key not in self._counted:  # new here: its requests count from now
                self._counted[worker.key] = (worker, self._total(WORKERS + worker.slot))
        for key in [k for k, (w, _) in self._counted.items() if self.table.get(*k) is not w]:
            del self._counted[key]
        if not self._push_pending:
            self._push_pending = True
            asyncio.get_running_loop().call_soon(self._push_workers)

    def _push_workers(self) -> None:
        self._push_pending = False
        message = {"op": "workers", "workers": rows(self.table)}
        for slot in self.slots:
            slot.send(message)

    def passive_failure(self, host: str, port: int, pid: int | None, error: str) -> None:
        """A proxy saw a connection to a worker fail; not held against a later incarnation."""
        worker = self.table.get(host, port)
        if worker is not None and worker.pid == pid:
            self.table.record_passive_failure(worker, error)

    def sum_in_flight(self) -> None:
        for worker in self.table:
            worker.in_flight = sum(slot.in_flight.get(worker.key, 0) for slot in self.slots)

    # -- life ----------------------------------------------------------------------------------
    async def start(self) -> None:
        """Start the proxies; return once all accept, or after the boot timeout."""
        self._resize(process_count(self.config))
        self._check_fd_limit()
        await self._wait_ready(self.slots)

    def _check_fd_limit(self) -> None:
        """Say at start, in the master's log, when the open file limit cannot hold the configured
        connections (each proxy raises its own soft limit up to the hard one it inherits)."""
        share = ProxyConfig(**self.settings()["proxy"])
        need = fd_need(share)
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard != resource.RLIM_INFINITY and hard < need:
            fit = max(1, (hard - need + share.max_connections * FDS_PER_CLIENT) // FDS_PER_CLIENT)
            log.warning("the open file limit (hard: %d) cannot hold proxy.maxConnections (%d over %d proxies: "
                        "each needs %d open files): at most about %d clients will be served at once; raise "
                        "it (ulimit -Hn, or LimitNOFILE= under systemd)", hard, self.config.proxy.max_connections,
                        len(self.slots), need, fit * len(self.slots))

    async def _wait_ready(self, slots: list[ProxySlot]) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.health_check.boot_timeout
        while not all(s.ready for s in slots) and loop.time() < deadline:
            self.changed.clear()
            try:
                await asyncio.wait_for(self.changed.wait(), deadline - loop.time())
            except asyncio.TimeoutError:
                break
        waiting = [s.index for s in slots if not s.ready]
        if waiting:
            log.warning("proxies %s are not accepting yet; their slots keep trying", waiting)

    def _resize(self, count: int) -> list[ProxySlot]:
        """Start or retire proxies until `count` run; the started ones."""
        added = []
        while len(self.slots) < count:
            slot = ProxySlot(self, len(self.slots) + 1)
            self.slots.append(slot)
            slot.start()
            added.append(slot)
        while len(self.slots) > count:
            slot = self.slots.pop()
            slot.stop(graceful=True)
            self.track(asyncio.ensure_future(self._retire(slot)))
        return added

    async def _retire(self, slot: ProxySlot) -> None:
        await slot.task
        self.retired.append(slot.counters)
        log.info("proxy %d retired", slot.index)

    async def configure(self, config: Config) -> None:
        """A reload: new settings to every proxy; proxies added or retired to match."""
        self.config = config
        added = self._resize(process_count(config))
        message = self.settings()
        for slot in self.slots:
            if slot not in added:
                slot.send(message)
        await self._wait_ready(added)

    async def purge(self) -> None:
        """Every proxy forgets its front cache; return once all confirmed (or ACK_TIMEOUT)."""
        self._seq += 1
        message = {"op": "purge", "seq": self._seq}
        waits = [slot.acknowledged(message) for slot in self.slots]
        try:
            await asyncio.wait_for(asyncio.gather(*waits), ACK_TIMEOUT)
        except asyncio.TimeoutError:
            log.warning("not every proxy confirmed the front cache purge within %gs", ACK_TIMEOUT)

    def reopen_logs(self) -> None:
        for slot in self.slots:
            slot.send({"op": "reopen"})

    async def shutdown(self, stop: Stop) -> None:
        """Every proxy stops accepting and drains (TERM) or quits (QUIT); return once all exited."""
        for slot in self.slots:
            slot.stop(graceful=stop is Stop.GRACEFUL)
        await asyncio.gather(*(s.task for s in self.slots if s.task is not None), *self._background,
                             return_exceptions=True)

    def hurry(self) -> None:
        for slot in self.slots:
            slot.hurry()

    def track(self, task: asyncio.Future) -> None:
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def close(self) -> None:
        """Release the shared memory (after the proxies are gone)."""
        for slot in self.slots:
            slot.counters.close()
        for counters in self.retired:
            counters.close()
        self.slots.clear()
        self.retired.clear()

    # -- what the admin listener reads -----------------------------------------------------------
    def totals(self) -> list[int]:
        return total([*(s.counters for s in self.slots), *self.retired])

    def _total(self, index: int) -> int:
        return sum(c.values[index] for c in (*(s.counters for s in self.slots), *self.retired))

    def stats(self) -> dict[str, Any]:
        """The whole server's proxy counters (Proxy.stats' shape); each worker's `requests`
        in the table is brought up to date too."""
        front = self.config.front_cache
        totals = self.totals()
        for worker, base in self._counted.values():
            worker.requests = totals[WORKERS + worker.slot] - base
        return report(totals, front.enabled and front.max_bytes > 0, front.max_bytes)

    def rows(self) -> list[dict[str, Any]]:
        """One row per proxy process."""
        return [{"index": s.index, "pid": s.pid, "ready": s.ready, "restarts": s.restarts,
                 "requests": s.counters.values[REQUESTS],
                 "client_connections": s.counters.get("client_connections"), "rate": round(s.rate, 3)}
                for s in self.slots]

    @property
    def access_log(self) -> AccessLogState | None:
        """The access log's losses over all proxies; None when it is off."""
        if self.config.logging.access_log is None:
            return None
        states = [s.access_log for s in self.slots]
        return AccessLogState(sum(s.dropped for s in states), next((s.error for s in states if s.error), ""))
