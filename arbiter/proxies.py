"""The proxy processes, seen from the master: the fleet of their slots (proxy_slot.py), with the
settings and the worker table pushed to every proxy, their counters summed for the admin page
and metrics, and their number matched to the config at a reload.

Every proxy accepts on the one listening socket the master bound and hands down: the kernel
queues a connection until some proxy takes it, so a proxy's restart (or retirement) never
refuses a client. (One SO_REUSEPORT socket per proxy spreads connections by hash instead;
measured no better here, and a closed reuseport socket's queue is lost: see the README.)
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import resource
import socket
import time
from typing import Any

from .addresses import host_port
from .config import Config, FrontCacheConfig, ProxyConfig
from .ops.logs import LogSink
from .proxy.control import Message, encode
from .proxy.counters import LATENCY, REQUESTS, WORKERS, Counters, report, total
from .proxy.sharing import SHARE_BACKLOG
from .proxy.fdlimit import FDS_PER_CLIENT, fd_need
from .proxy.process import LOAD_INTERVAL
from .proxy.stats import SLOTS, RequestStats
from .proxy.view import rows
from .proxy_slot import AccessLogState, ProxySlot
from .signals import Stop
from .state import WorkerState, WorkerTable
from .tls import CertificateInfo, host_names

log = logging.getLogger("gows.proxies")
ACK_TIMEOUT = 5.0  # seconds to wait for every proxy to confirm a purge
# Proxies accept from one shared socket, and the first to wake takes every connection waiting:
# a burst of keep-alive clients (wrk -c8, a load balancer's pool) can end up all on one proxy,
# which then serves them on one core while the others idle. Every BALANCE_INTERVAL at most, a
# proxy holding BALANCE_SLACK of all client connections more than the least busy one (and at
# least BALANCE_MIN more) is told to hand half the difference over (Listeners.hand_over in
# proxy/listening.py), but never more than BALANCE_STEP_SHARE of all clients at a time
# (BALANCE_STEP at least): the clients handed over reconnect all at once and go to whichever
# proxy takes them first, which can swing the imbalance back (wrk -c5000 on 2 proxies: steps of
# 476-1295 clients, back and forth every second, and hundreds of requests over wrk's 2 s timeout
# while they waited to be accepted).
BALANCE_INTERVAL = 1.0
BALANCE_SLACK = 0.1
BALANCE_MIN = 2
BALANCE_STEP = 64
BALANCE_STEP_SHARE = 1 / 64


def process_count(config: Config) -> int:
    """proxy.processes, or (null) one per CPU this process may run on."""
    if config.proxy.processes is not None:
        return config.proxy.processes
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


class FleetLatency(RequestStats):
    """The latency histogram of all proxies together (RequestStats' read side)."""

    __slots__ = ("fleet",)

    def __init__(self, fleet: ProxyFleet) -> None:
        self.fleet = fleet

    @property
    def counts(self) -> list[int]:  # type: ignore[override]
        sums = self.fleet.totals()
        return sums[LATENCY:LATENCY + SLOTS + 1]


def tls_settings(config: Config, certificate: CertificateInfo | None) -> Message | None:
    """What a proxy needs to serve HTTPS: the files to load, the HSTS header, and where a
    redirect may send a client (the certificate's names); None without TLS."""
    tls = config.tls
    if not tls.enabled or certificate is None:
        return None
    names = host_names(certificate)
    default = next((n for n in names if not n.startswith("*")), None)
    if default is None:  # (a certificate naming only wildcards: the address itself)
        default = host_port(tls.listen.host, tls.listen.port).rsplit(":", 1)[0]
    hsts = None
    if tls.hsts.max_age:
        hsts = f"Strict-Transport-Security: max-age={tls.hsts.max_age}"
        if tls.hsts.include_sub_domains:
            hsts += "; includeSubDomains"
    return {"certificate": str(tls.certificate), "key": str(tls.key), "names": list(names), "default_host": default,
            "port": tls.listen.port, "hsts": hsts}


def share(config: Config, n: int) -> tuple[ProxyConfig, FrontCacheConfig]:
    """The proxy and front cache sections one of `n` proxies is told: the whole server's budgets
    split between them. Each may take 10% over its even share of the connections: proxies
    accepting on one socket never split them exactly, and a client must not wait while another
    proxy has room."""
    connections = config.proxy.max_connections if n == 1 else -(-config.proxy.max_connections * 11 // (10 * n))
    return (dataclasses.replace(config.proxy, max_connections=connections,
                                body_buffer_bytes=config.proxy.body_buffer_bytes // n),
            dataclasses.replace(config.front_cache, max_bytes=config.front_cache.max_bytes // n))


class ProxyFleet:
    """All proxy processes of the master (status, metrics and the arbiter use this)."""

    def __init__(self, config: Config, table: WorkerTable, listener: socket.socket | None, sink: LogSink,
                 timing: bool, tls: dict[str, socket.socket] | None = None,
                 certificate: CertificateInfo | None = None) -> None:
        """`listener`: the plain HTTP listener (None: HTTPS only); `tls`: the "tls" and
        "redirect" listeners there are; `certificate`: what the configured one says."""
        self.config = config
        self.table = table
        # Every listening socket a proxy serves, by the name of its proxy argument (--listen-fd).
        self.listeners = {"listen": listener} if listener is not None else {}
        self.listeners.update(tls or {})
        self.certificate = certificate
        self.sink = sink
        self.timing = timing  # latencies are measured (the admin listener reads them)
        self.slots: list[ProxySlot] = []
        self.retired: list[Counters] = []  # counters of slots retired at a reload: still counted
        self.latency = FleetLatency(self)
        self.changed = asyncio.Event()  # some slot became ready
        self._background: set[asyncio.Future] = set()
        self.purge_seq = 0  # the last front cache purge sent
        self._balanced_at = 0.0  # when a proxy was last told to hand clients over
        self._push_pending = False
        self.serving = True  # False while the master is a lame duck (its health path answers 503)
        self.health_asked_at: float | None = None  # monotonic time a proxy last saw its health path asked
        # Each worker with what its counter held when it joined (a counter slot may be reused).
        self._counted: dict[tuple[str, int], tuple[WorkerState, int]] = {}
        table.watch(self._table_changed)

    # -- what the proxies are told -----------------------------------------------------------
    def settings(self) -> Message:
        """The settings message: the config's sections, with the whole server's budgets split
        between the proxies (connections, request bodies, front cache)."""
        config = self.config
        proxy, front = share(config, max(1, len(self.slots)))
        access = config.logging.access_log
        return {"op": "settings", "proxy": dataclasses.asdict(proxy), "front_cache": dataclasses.asdict(front),
                "threads": config.threads, "ttl": config.cache.ttl, "timing": self.timing,
                "graceful_timeout": config.graceful_timeout,
                "health_path": config.health_check.path, "serving": self.serving,
                "access_log": str(access) if access is not None else None,
                "log_format": config.logging.format, "log_level": config.logging.level,
                "tls": tls_settings(config, self.certificate),
                "outlier_failures": config.outlier_detection.consecutive_failures,
                "share_learned": len(self.slots) > 1,  # (proxy/sharing.py: only with another proxy)
                "proxies": len(self.slots)}  # (the balancer's lanes: each proxy starts first at its own)

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

    def outlier(self, host: str, port: int, pid: int | None, reason: str) -> None:
        """A proxy saw a worker fail consecutiveFailures times in a row; not held against a later incarnation."""
        worker = self.table.get(host, port)
        if worker is not None and worker.pid == pid:
            self.table.record_outlier(worker, reason)

    def pass_on(self, sender: ProxySlot, message: Message) -> None:
        """Pass the file entries a proxy learned (proxy/sharing.py) to the others, unless they
        may be older than the last purge: the proxy had not confirmed that purge when it sent
        them (a proxy drops what it has not sent yet when it purges, then confirms)."""
        if sender.purged != self.purge_seq:
            return
        line = encode(message)
        for slot in self.slots:
            channel = slot.channel
            # (only a help: a proxy not keeping up with its channel is spared it)
            if slot is not sender and channel is not None and channel.backlog < SHARE_BACKLOG:
                channel.write(line)

    def balance(self) -> None:
        """Tell the proxy holding the most client connections to hand some over, when the
        proxies' shares are uneven (see BALANCE_INTERVAL)."""
        now = time.monotonic()
        if now - self._balanced_at < BALANCE_INTERVAL:
            return
        held = [(slot.counters.get("client_connections"), slot) for slot in self.slots if slot.ready]
        if len(held) < 2:
            return
        most, busiest = max(held, key=lambda pair: pair[0])
        least = min(count for count, _ in held)
        total = sum(count for count, _ in held)
        if most - least < max(BALANCE_MIN, BALANCE_SLACK * total):
            return
        self._balanced_at = now
        step = max(BALANCE_STEP, int(total * BALANCE_STEP_SHARE))
        busiest.send({"op": "hand_over", "clients": min((most - least) // 2, step)})

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
            # Still summed, from now on and for good: counters never go back, also while it drains.
            self.retired.append(slot.counters)
            slot.stop(graceful=True)
            self.track(asyncio.ensure_future(self._retire(slot)))
        return added

    async def _retire(self, slot: ProxySlot) -> None:
        await slot.task
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
        self.purge_seq += 1
        message = {"op": "purge", "seq": self.purge_seq}
        waits = [slot.acknowledged(message) for slot in self.slots]
        try:
            await asyncio.wait_for(asyncio.gather(*waits), ACK_TIMEOUT)
        except asyncio.TimeoutError:
            log.warning("not every proxy confirmed the front cache purge within %gs", ACK_TIMEOUT)

    def fail_health(self) -> None:
        """Every proxy (and any started from now on) answers the health path 503, still serving
        (the master is stopping: a lame duck, then the drain)."""
        self.serving = False
        for slot in self.slots:
            slot.send({"op": "serving", "serving": False})

    def health_asked_within(self, seconds: float) -> bool:
        """Whether a proxy answered the health path in the last `seconds` (an edge checks us).
        The proxies report their counts every LOAD_INTERVAL: one may be that late."""
        asked = self.health_asked_at
        return asked is not None and time.monotonic() - asked <= seconds + LOAD_INTERVAL

    def reopen_logs(self) -> None:
        for slot in self.slots:
            slot.send({"op": "reopen"})

    def stop(self, stop: Stop) -> None:
        """Every proxy stops accepting and drains (TERM) or quits (QUIT); none is started again."""
        for slot in self.slots:
            slot.stop(graceful=stop is Stop.GRACEFUL)

    async def stopped(self) -> None:
        """Return once every proxy process stop() ended has exited."""
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

    def sent(self, worker: WorkerState) -> int:
        """How many requests the proxies have sent `worker` (a count that only grows while it
        is in the table: what its counter slot held before it joined is included)."""
        return self._total(WORKERS + worker.slot)

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
