"""A proxy process (`python -m arbiter.proxy`): one of the `proxy.processes` that serve clients.

The master execs it (never forks it from its running loop) with the shared listening socket, its
end of the control channel (control.py) and its slot's counters (counters.py) as inherited
descriptors. Settings and the worker table arrive over the channel; the proxy answers "ready"
once it accepts. It never outlives the master: PR_SET_PDEATHSIG kills it when the master dies,
even of SIGKILL, and end of file on the channel makes it leave too.

Signals as a worker's: TERM stops accepting and lets in-flight requests finish (up to the
graceful timeout), INT/QUIT stop at once. HUP and USR1 are the master's: it reloads and then
tells every proxy what changed.
"""
from __future__ import annotations

import argparse
import asyncio
import ctypes
import gc
import logging
import os
import signal
import socket
import sys
from typing import Any

from fileapp import logs as worker_logs
from fileapp.handoff import TOKEN_ENV

from ..config import FrontCacheConfig, ProxyConfig
from ..ops.accesslog import AccessLog
from ..state import WorkerState
from .control import Channel, Message
from .counters import Counters
from .server import Proxy
from .sharing import Outbox, adopt
from .view import MirrorTable

log = logging.getLogger("gows.proxy")
PR_SET_PDEATHSIG = 1
SETTINGS_TIMEOUT = 30.0  # seconds to wait for the master's first settings before giving up
LOAD_INTERVAL = 1.0  # seconds between two load reports to the master
# Python collects its youngest generation every 700 net container allocations by default. With
# the few dozen a connection makes (transport, protocol, parser, relay, sender), that is a
# collection every few connections, each walking every young object still live: 5000 makes
# them seven times rarer, each still a fraction of a millisecond (ab -c500 150 KB: 3 µs, 5%,
# less proxy CPU per request; 20000 and 100000 saved no more). It holds no memory longer: the
# proxy leaves no cyclic garbage (none under 26 s of mixed load, by gc.DEBUG_SAVEALL).
GC_YOUNG_THRESHOLD = 5000


class ProxyProcess:
    """The proxy process's life: settings in, serve, report, stop."""

    def __init__(self, index: int, listener: socket.socket | None, control: socket.socket, counters: Counters,
                 tls: socket.socket | None = None, redirect: socket.socket | None = None) -> None:
        self.index = index
        self.listener = listener
        self.tls_listener = tls
        self.redirect_listener = redirect
        self.control = control
        self.counters = counters
        self.channel: Channel | None = None
        self.proxy: Proxy | None = None
        self.outbox: Outbox | None = None  # file entries learned here, on their way to the others
        self.table = MirrorTable(self._report_failure, self._report_outlier)
        self.access_log: AccessLog | None = None
        self.access_target: Any = None
        self.graceful_timeout = 30.0
        self._settings: asyncio.Future[Message] | None = None
        self._stop: asyncio.Future[float] | None = None  # the drain time the stop allows
        self._reporter: asyncio.TimerHandle | None = None

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        self._settings = loop.create_future()
        self._stop = loop.create_future()
        self.channel = await Channel.open(self.control, self._on_message, self._on_master_gone)
        try:
            first = await asyncio.wait_for(asyncio.shield(self._settings), SETTINGS_TIMEOUT)
        except asyncio.CancelledError:  # the master went away before sending them
            return 0
        except asyncio.TimeoutError:
            log.error("proxy %d: no settings from the master within %gs; exiting", self.index, SETTINGS_TIMEOUT)
            return 1
        if self._stop.done():
            return 0
        proxy = self.proxy = Proxy(self.table, ProxyConfig(**first["proxy"]), FrontCacheConfig(**first["front_cache"]),
                                   first["threads"], first["ttl"], self.counters, os.environ.get(TOKEN_ENV),
                                   self._lane(first))
        self.outbox = Outbox(loop, self.channel)
        self._apply(first)
        for sig, now in ((signal.SIGTERM, False), (signal.SIGINT, True), (signal.SIGQUIT, True)):
            loop.add_signal_handler(sig, self._stop_signal, now)
        for sig in (signal.SIGHUP, signal.SIGUSR1, signal.SIGTTIN, signal.SIGTTOU):
            loop.add_signal_handler(sig, lambda: None)  # the master's signals: it tells us what to do
        await proxy.start(self.listener, self.tls_listener, self.redirect_listener)
        self.channel.send({"op": "ready"})
        self._reporter = loop.call_later(LOAD_INTERVAL, self._report_load)
        drain = await self._stop
        self._reporter.cancel()
        shutdown = asyncio.ensure_future(proxy.shutdown(drain))
        await asyncio.sleep(0)  # its first step stops accepting: then our copy of the socket goes too
        for sock in (self.listener, self.tls_listener, self.redirect_listener):
            if sock is not None:
                sock.close()
        await shutdown
        self._report_load(again=False)
        if self.access_log is not None:
            self.access_log.close()
        self.channel.close()
        return 0

    # -- from the master ---------------------------------------------------------------------
    def _on_message(self, message: Message) -> None:
        op = message.get("op")
        if op == "settings":
            if not self._settings.done():
                self._settings.set_result(message)
            else:
                self._apply(message)
        elif op == "workers":
            self.table.apply(tuple(row) for row in message["workers"])
            if self.proxy is not None and self.proxy.held:  # (the first worker may be up: no tick's wait)
                self.proxy.release_held(self.proxy.clock)
        elif op == "purge":
            if self.proxy is not None:
                self.proxy.purge_front_cache()
            if self.outbox is not None:
                self.outbox.drop()  # (learned before the purge: the master must not pass it on)
            self.channel.send({"op": "ack", "seq": message["seq"]})
        elif op == "learned":  # what the other proxies learned (sharing.py)
            if self.proxy is not None and self.proxy.cache is not None:
                adopt(self.proxy.cache, message["entries"])
        elif op == "serving":
            if self.proxy is not None:
                self.proxy.serving = message["serving"]
        elif op == "hand_over":  # (ProxyFleet.balance)
            if self.proxy is not None:
                self.proxy.listeners.hand_over(message["clients"])
        elif op == "reopen":
            if self.access_log is not None:
                self.access_log.reopen()
        else:
            log.warning("proxy %d: unknown control message %r", self.index, op)

    def _lane(self, settings: Message) -> tuple[int, int]:
        """(this proxy's place, how many proxies): proxy 1 of 2 is (0, 2)."""
        lanes = max(1, settings["proxies"])
        return (self.index - 1) % lanes, lanes

    def _apply(self, settings: Message) -> None:
        """Take (new) settings: the proxy's, the logs', the access log's."""
        proxy = self.proxy
        worker_logs.configure(settings["log_format"], settings["log_level"])
        proxy.configure(ProxyConfig(**settings["proxy"]), FrontCacheConfig(**settings["front_cache"]),
                        settings["threads"], settings["ttl"], self._lane(settings))
        proxy.timing = proxy.latency.counts if settings["timing"] else None
        if proxy.tls.configure(settings.get("tls")):
            proxy.listeners.relisten()  # new handshakes get the new certificate; open connections go on
        proxy.health_target = settings["health_path"].encode()
        proxy.serving = settings["serving"]
        proxy.outliers.threshold = settings["outlier_failures"]
        proxy.share = self.outbox.add if settings["share_learned"] and self.outbox is not None else None
        self.graceful_timeout = settings["graceful_timeout"]
        target = settings["access_log"]
        if target != self.access_target or self.access_log is None and target is not None:
            old = self.access_log
            try:
                self.access_log = AccessLog.open(target)
            except Exception as e:  # the master opened it a moment ago; a race with the disk
                log.error("proxy %d: %s", self.index, e)
                self.access_log = None
            self.access_target = target
            if old is not None:
                old.close(wait=False)
            proxy.observe = self.access_log.observe if self.access_log is not None else None

    def _on_master_gone(self) -> None:
        """End of file on the channel: the master is gone (or broke it); leave at once."""
        if not self._stop.done():
            log.warning("proxy %d: the master is gone; exiting", self.index)
            self._stop.set_result(0.0)
        if self._settings is not None and not self._settings.done():
            self._settings.cancel()

    def _stop_signal(self, now: bool) -> None:
        if not self._stop.done():
            self._stop.set_result(0.0 if now else self.graceful_timeout)
        elif now and self.proxy is not None:
            self.proxy.hurry()  # a fast stop during a graceful one

    # -- to the master ------------------------------------------------------------------------
    def _report_failure(self, worker: WorkerState, error: str) -> None:
        self.channel.send({"op": "fail", "host": worker.host, "port": worker.port, "pid": worker.pid,
                           "error": error})

    def _report_outlier(self, worker: WorkerState, error: str) -> None:
        self.channel.send({"op": "outlier", "host": worker.host, "port": worker.port, "pid": worker.pid,
                           "error": error})

    def _report_load(self, again: bool = True) -> None:
        """Each worker's requests in flight here; the access log's losses."""
        rows = [(w.host, w.port, w.in_flight) for w in self.table]
        access = self.access_log
        self.channel.send({"op": "load", "workers": rows,
                           "access_log": {"dropped": access.dropped if access else 0,
                                          "error": access.error if access else ""}})
        if again:
            self._reporter = asyncio.get_running_loop().call_later(LOAD_INTERVAL, self._report_load)


def _die_with_parent(parent: int) -> None:
    """SIGKILL when the master dies (it must never be left serving alone)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    except (OSError, AttributeError):
        pass  # the control channel's end of file still tells
    if os.getppid() != parent:  # it died before the watch was armed
        os._exit(1)


def tune_gc() -> None:
    """Collect the youngest generation every GC_YOUNG_THRESHOLD allocations; the older ones as
    Python does."""
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m arbiter.proxy", description="A gows proxy process (started by the master).")
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--listen-fd", type=int, help="the plain HTTP listener (none: HTTPS only)")
    parser.add_argument("--tls-fd", type=int, help="the HTTPS listener")
    parser.add_argument("--redirect-fd", type=int, help="the listener redirecting to HTTPS")
    parser.add_argument("--control-fd", type=int, required=True)
    parser.add_argument("--counters-fd", type=int, required=True)
    parser.add_argument("--parent-pid", type=int, required=True)
    args = parser.parse_args(argv)
    _die_with_parent(args.parent_pid)
    tune_gc()
    import setproctitle
    import uvloop

    setproctitle.setproctitle(f"gows: proxy {args.index}")
    worker_logs.configure("text", "info")
    listener, tls, redirect = (socket.socket(fileno=fd) if fd is not None else None
                               for fd in (args.listen_fd, args.tls_fd, args.redirect_fd))
    control = socket.socket(fileno=args.control_fd)
    process = ProxyProcess(args.index, listener, control, Counters.attach(args.counters_fd), tls, redirect)
    try:
        return uvloop.run(process.run())
    except KeyboardInterrupt:
        return 0
    finally:
        sys.stderr.flush()
