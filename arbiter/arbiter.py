"""The master's main loop (gunicorn's Arbiter on asyncio/uvloop): signals, worker slots, reload.

Signals are registered with loop.add_signal_handler: the real handler only writes to the loop's
wakeup fd, and the signal is queued and handled here, in the loop, where logging is safe. One
wait for the master's whole life hands each to the method named after it (signals.py).
SIGCHLD is the loop's own: uvloop reaps its child processes on it and completes each worker's
wait() at once, so an exit is seen immediately, not at the next health round.
"""
from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
import time
from typing import Any

from fileapp.handoff import TOKEN_ENV

from . import config as config_mod
from .config import Config, ConfigError, bind_configured
from .config.reloading import as_reloaded
from .config.source import ConfigSource
from .health import HealthChecker
from .ops.accesslog import AccessLog
from .ops.admin import AdminServer
from .ops.logs import LogSink
from .ops.notify import Notifier
from .proxies import ProxyFleet
from .proxy_slot import AccessLogState
from .resolve import NamedUpstreams
from .signals import ANSWERED_DURING_STOP, SignalQueue, Stop
from .slots import LocalSlots
from .state import WorkerState, WorkerTable
from .tls import expiry_warning, iso_date
from .worker_command import WorkerOptions
from .workers import LocalWorker

log = logging.getLogger("gows.arbiter")


class Arbiter:
    """Owns the sockets, the worker table, the health checker and the local worker slots."""

    def __init__(self, config: Config, public: socket.socket | None,
                 worker_sockets: dict[tuple[str, int], socket.socket], sink: LogSink,
                 admin: socket.socket | None = None, tls: dict[str, socket.socket] | None = None,
                 source: ConfigSource | None = None) -> None:
        """`public`: the plain HTTP listener (None: HTTPS only); `tls`: the HTTPS listener
        ("tls") and the redirecting one ("redirect"), as configured; `source`: where HUP reads the
        config again (default: config.source, the file it came from). ConfigError when the access
        log cannot be opened or the certificate does not serve."""
        self.config = config
        self.source = source if source is not None else ConfigSource(config.source)
        self.public = public
        self.sink = sink
        self.started = time.time()
        self._stop: Stop | None = None  # set once the master is stopping
        self.notifier = Notifier()
        self.table = WorkerTable(**_table_rules(config))
        self.checker = HealthChecker(self.table, config.health_check, on_result=self._on_check)
        self.table.subscribe(self._on_transition)
        self.slots = LocalSlots(self.table, self.checker, sink)
        self._worker_sockets = worker_sockets
        _check_access_log(config)
        # The secret with which proxies ask this master's own workers to name file bodies
        # rather than send them (fileapp.handoff): every process it starts inherits it.
        os.environ.setdefault(TOKEN_ENV, secrets.token_hex(16))
        # Latencies are measured only while the admin listener is there to read them.
        self.tls_sockets = tls or {}
        self.certificate = config_mod.tls_certificate(config)  # what it says: admin page, metrics
        if self.certificate is not None and (soon := expiry_warning(self.certificate)):
            log.warning("%s", soon)
        self.proxy = ProxyFleet(config, self.table, public, sink, timing=admin is not None, tls=self.tls_sockets,
                                certificate=self.certificate)
        self.checker.sent = self.proxy.sent  # (idle workers are checked less often)
        self._signals = SignalQueue()
        self._admin_sock = admin
        self.admin = AdminServer(self) if admin is not None else None
        self._ready_task: asyncio.Task | None = None
        self._lame_wait: asyncio.Future | None = None  # the lame-duck period under way (a fast stop ends it)
        self.names = NamedUpstreams(self.table, self.checker)

    # -- what the admin listener reads ------------------------------------------------------
    @property
    def config_path(self) -> str:
        return self.source.describe()

    @property
    def stopping(self) -> bool:
        """The master is stopping (/readyz answers 503)."""
        return self._stop is not None

    @property
    def tls_listen(self) -> str | None:
        """The HTTPS address (admin page); None without HTTPS."""
        return str(self.config.tls.listen) if "tls" in self.tls_sockets else None

    @property
    def serving(self) -> str:
        """The public addresses, as logs and systemd's status give them."""
        parts = [] if self.config.listen is None else [f"http://{self.config.listen}"]
        if "tls" in self.tls_sockets:
            parts.append(f"https://{self.config.tls.listen}")
        return " and ".join(parts)

    @property
    def access_log(self) -> AccessLogState | None:
        """What the proxies, which write the access log, report of it; None while it is off."""
        return self.proxy.access_log

    # -- entry point ---------------------------------------------------------------------
    async def run(self) -> int:
        """Start everything, then handle signals until a stop signal; returns the exit status."""
        loop = asyncio.get_running_loop()
        self._signals.install(loop)
        try:
            self.slots.open()
            options = WorkerOptions.from_config(self.config)
            for w in self.config.workers:
                if w.local:
                    self._add_slot(w.host, w.port, self._worker_sockets.pop((w.host, w.port)), options)
                elif not w.named:
                    self.table.add(WorkerState(w.host, w.port, local=False, weight=w.weight, slow_start=w.slow_start))
            await self.names.configure(self.config)
            self.checker.sync()
            # The proxies may take up to the boot timeout to accept: a stop signal meanwhile is
            # answered now, as gunicorn's arbiter does, not once they are all up.
            stop = await self._signals.answer_while(self, self.proxy.start())
            if stop is None:
                if self.admin is not None:
                    await self.admin.start(self._admin_sock)
                local = len(self.slots.serving)
                log.info("gows master on %s: %d local and %d remote workers, serving %s", self.serving,
                         local, len(self.table) - local, self.config.base_directory)
                self._ready_task = asyncio.ensure_future(self._announce_ready())
                stop = await self._signals.answer(self)
            assert stop is not None  # with nothing busy, only a stop signal ends the wait
            await self._shutdown(stop)
            return 0
        finally:
            self._signals.remove(loop)
            self.slots.stop(graceful=False)  # only after an unexpected error: workers quit now
            self.proxy.stop(Stop.NOW)
            self.slots.remove()

    async def _announce_ready(self) -> None:
        """Tell systemd READY=1 once every worker is healthy (or, after the boot timeout, once at
        least one is: the rest keep being restarted, and /readyz tells the same)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.health_check.boot_timeout
        while True:
            total = len(self.table)
            up = len(self.table.healthy)
            if up == total or (up and loop.time() >= deadline):
                break
            await asyncio.sleep(0.05)
        if up < total:
            log.warning("ready with %d of %d workers up", up, total)
        else:
            log.info("ready: all %d workers up", total)
        self.notifier.ready(f"serving {self.serving} with {up} of {total} workers up")

    # -- signals (signals.py hands each to the method named after it) -------------------------
    async def handle_term(self) -> Stop | None:
        """TERM: stop gracefully (see _shutdown)."""
        return self._stop_requested(Stop.GRACEFUL)

    async def handle_int(self) -> Stop | None:
        """INT (and QUIT): stop at once, also when a graceful stop is under way."""
        return self._stop_requested(Stop.NOW)

    handle_quit = handle_int

    def _stop_requested(self, stop: Stop) -> Stop | None:
        """A stop signal ends the wait (and a reload under way); during a graceful stop, a fast
        one makes the draining workers quit at once instead."""
        if self._stop is None:
            return stop
        if stop is Stop.NOW and self._stop is Stop.GRACEFUL:
            self._stop = Stop.NOW
            log.info("stopping now")
            if self._lame_wait is not None:
                self._lame_wait.cancel()
            self.proxy.hurry()
            self.slots.stop(graceful=False)
        return None

    async def handle_hup(self) -> Stop | None:
        """HUP: reload (see _reload), still answering stop signals and USR1 meanwhile."""
        self.notifier.reloading()
        stop = await self._signals.answer_while(self, self._reload())
        if stop is not None:
            log.warning("reload abandoned: stopping")
            return stop
        up, total = len(self.table.healthy), len(self.table)
        self.notifier.ready(f"reloaded; serving {self.serving} with {up} of {total} workers up")
        return None

    async def handle_usr1(self) -> None:
        """USR1: reopen the error log and the access log (after logrotate moved them)."""
        self.sink.reopen()
        self.proxy.reopen_logs()

    async def handle_usr2(self) -> None:
        """USR2: gunicorn's re-exec for a binary upgrade, which gows does not do: logged, ignored."""
        log.warning("SIGUSR2 ignored: gows does not re-exec itself (gunicorn's USR2 upgrade); HUP "
                    "reloads the config and starts every worker and proxy from the code on disk")

    # -- health events ---------------------------------------------------------------------
    def _on_transition(self, worker: WorkerState, up: bool) -> None:
        slot = self.slots.serving.get(worker.key)
        if slot is not None and slot.state is worker:
            slot.notify()
        elif not worker.local and not up:
            log.error("remote worker %s is down (%s); it is not restarted from here, only checked",
                      worker.address, worker.last_error or "unknown")

    def _on_check(self, worker: WorkerState) -> None:
        slot = self.slots.serving.get(worker.key)
        if slot is not None and slot.state is worker:
            slot.notify()

    # -- slots -------------------------------------------------------------------------------
    def _add_slot(self, host: str, port: int, sock: socket.socket, options: WorkerOptions) -> LocalWorker:
        """Start the local worker on host:port, as the config lists it (TTIN's: as the default)."""
        w = next((w for w in self.config.workers if (w.host, w.port) == (host, port)), None)
        if w is None:
            return self.slots.add(host, port, sock, options)
        return self.slots.add(host, port, sock, options, w.weight, w.slow_start)

    async def handle_ttin(self) -> None:
        """TTIN: one more local worker, on the next free port after the highest local one."""
        if not self.slots.serving:
            log.warning("SIGTTIN ignored: there is no local worker to add one next to")
            return
        taken = {w.port for w in self.table} | {sock.getsockname()[1] for sock in self.proxy.listeners.values()}
        if self.config.admin is not None:
            taken.add(self.config.admin.port)
        bound = self.slots.bind_next(taken)
        if bound is None:
            return
        slot = self._add_slot(*bound, WorkerOptions.from_config(self.config))
        self.checker.sync()
        log.info("SIGTTIN: added worker %s; %d local workers", slot.state.address, len(self.slots.serving))

    async def handle_ttou(self) -> None:
        """TTOU: one local worker fewer (the highest port), never below one."""
        if len(self.slots.serving) <= 1:
            log.warning("SIGTTOU ignored: keeping the last local worker")
            return
        slot = max(self.slots.serving.values(), key=lambda s: s.state.port)
        self.slots.retire(slot)
        log.info("SIGTTOU: stopping worker %s; %d local workers", slot.state.address, len(self.slots.serving))

    # -- reload (HUP) --------------------------------------------------------------------
    async def _reload(self) -> None:
        """Re-read the config and converge: new workers started and healthy, kept ones replaced
        one at a time (new healthy before old drains), dropped ones drained. A bad config (or a
        port that cannot be bound) changes nothing."""
        path = self.source.describe()
        try:
            new = self.source.load()
        except ConfigError as e:
            log.error("reload failed, keeping the running configuration: %s: %s", path, e)
            return
        except Exception as e:  # a bug in the loader must not take the running master down with it
            log.exception("reload failed, keeping the running configuration: %s: %s: %s", path,
                          type(e).__name__, e)
            return
        new, warnings = as_reloaded(self.config, new)
        for warning in warnings:
            log.warning("%s", warning)
        wanted = {(w.host, w.port): w for w in new.workers}
        # A port the new config lists may still be held by this master: its slot retired (TTOU, an
        # earlier reload) and draining. Binding it now would fail with "address already in use"
        # and refuse the whole reload; its drain ends within the graceful timeout (then KILL).
        draining = self.slots.draining({key for key, w in wanted.items() if w.local})
        if draining:
            log.info("reload: waiting for %d retired worker(s) on ports the config lists to finish draining",
                     len(draining))
            await asyncio.wait(draining)
        fresh: dict[tuple[str, int], socket.socket] = {}
        try:
            for key, w in wanted.items():
                if w.local and key not in self.slots.serving:
                    fresh[key] = bind_configured(w.host, w.port, w.label)
            if new.logging.access_log != self.config.logging.access_log:
                _check_access_log(new)
            if new.logging != self.config.logging:
                self.sink.apply(new.logging)
        except (ConfigError, OSError) as e:
            for sock in fresh.values():
                sock.close()
            reason = str(e) if isinstance(e, ConfigError) else f"logging.file: {e.strerror or e}"
            log.error("reload failed, keeping the running configuration: %s: %s", path, reason)
            return
        try:
            certificate = config_mod.tls_certificate(new)  # (the files may have changed since load)
        except ConfigError as e:
            log.error("reload failed, keeping the running configuration and certificate: %s: %s", path, e)
            return
        if certificate is not None and certificate != self.certificate:
            log.info("reload: TLS certificate %s (serial %x, expires %s) for new handshakes", certificate.subject,
                     certificate.serial, iso_date(certificate.not_after))
            if soon := expiry_warning(certificate):
                log.warning("%s", soon)
        self.certificate = self.proxy.certificate = certificate
        self.config = new
        await self.proxy.configure(new)
        self.table.set_rules(**_table_rules(new))
        self.checker.settings = new.health_check
        options = WorkerOptions.from_config(new)

        for worker in self.table:
            if not worker.local and not worker.name and worker.key not in wanted:
                self.table.remove(worker)
        for key, w in wanted.items():
            if not w.local and not w.named and self.table.get(*key) is None:
                self.table.add(WorkerState(w.host, w.port, local=False, weight=w.weight, slow_start=w.slow_start))
            elif not w.named and (kept := self.table.get(*key)) is not None:
                self.table.tune(kept, w.weight, w.slow_start)
        await self.names.configure(new)
        added = [self._add_slot(host, port, sock, options) for (host, port), sock in fresh.items()]
        self.checker.sync()
        kept = [s for k, s in self.slots.serving.items() if k in wanted and s not in added]
        removed = [s for k, s in self.slots.serving.items() if k not in wanted]

        failed = 0
        for slot in kept:  # one at a time, so the others keep serving meanwhile
            if not await slot.reload(options):
                failed += 1
        # A kept slot that was still booting at the HUP was replaced outright: it is waited for
        # like an added one, so "reload done" always means workers that serve.
        await self.slots.wait_up(added + kept, options.boot_timeout)
        for slot in removed:
            self.slots.retire(slot)
        # What the workers serve may have changed (root, cache, headers): nothing stored before
        # the new workers took over is served after.
        await self.proxy.purge()
        log.info("reload done: %d local workers (%d added, %d replaced, %d failed to reload, %d stopped)",
                 len(self.slots.serving), len(added), len(kept) - failed, failed, len(removed))

    # -- stopping ------------------------------------------------------------------------
    async def _lame_duck(self) -> None:
        """Before a graceful stop of a node that an edge checks: answer the health path 503 for
        lameDuck seconds while still serving everything, so that the edge marks this node down
        and sends it nothing more before its proxies stop accepting. Nobody asked the health
        path within that time (no edge checks it): nobody to tell, no wait."""
        period = self.config.lame_duck
        self.proxy.fail_health()
        if period <= 0 or not self.proxy.health_asked_within(period):
            return
        log.info("lame duck for %gs: the health path answers 503, requests are still served", period)
        self._lame_wait = asyncio.ensure_future(asyncio.sleep(period))
        try:
            await self._signals.answer(self, self._lame_wait, ANSWERED_DURING_STOP)  # INT/QUIT end it
        finally:
            self._lame_wait.cancel()
            self._lame_wait = None

    async def _shutdown(self, stop: Stop) -> None:
        """TERM: stop the front, drain every worker (KILL after the graceful timeout).
        INT/QUIT, or one of them during a graceful stop: workers quit at once."""
        log.info("stopping %s", stop.value)
        self._stop = stop  # /readyz answers 503 from now on
        self.notifier.stopping()
        if self._ready_task is not None:
            self._ready_task.cancel()
        await self.names.close()
        if stop is Stop.GRACEFUL:
            await self._lame_duck()
        # The front stops first: no new requests, in-flight ones finish while workers still run.
        # Our handle on the public socket goes too (each proxy closes its own): new clients are
        # refused at once instead of waiting in the backlog for a master that is leaving. (The
        # proxies are told first: a proxy that exits now is not started again on a closed socket.)
        self.proxy.stop(stop)
        for sock in self.proxy.listeners.values():
            sock.close()
        drain = asyncio.ensure_future(self.proxy.stopped())
        await self._signals.answer(self, drain, ANSWERED_DURING_STOP)  # INT/QUIT cut it short
        await drain
        self.slots.stop(graceful=self._stop is Stop.GRACEFUL)
        await self._signals.answer(self, self.slots.ended(), ANSWERED_DURING_STOP)
        await self.checker.close()
        self.slots.close()
        if self.admin is not None:
            await self.admin.close()
            self._admin_sock.close()
        self.proxy.close()
        log.info("master exiting")


def _check_access_log(config: Config) -> None:
    """ConfigError naming logging.accessLog when the proxies will not be able to open it."""
    access_log = AccessLog.open(config.logging.access_log)
    if access_log is not None:
        access_log.close()


def _table_rules(config: Config) -> dict[str, Any]:
    """The worker table's rules as `config` sets them (WorkerTable.set_rules' arguments)."""
    outliers = config.outlier_detection
    return {"rise": config.health_check.rise, "fall": config.health_check.fall, "max_fails": config.max_fails,
            "fail_timeout": config.fail_timeout, "ejection_base": outliers.base_ejection_time,
            "ejection_max": outliers.max_ejection_time, "ejection_percent": outliers.max_ejection_percent}
