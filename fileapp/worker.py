"""Run fileapp under gunicorn's threaded worker (gthread) in this process, without an Arbiter.

The worker serves on listening sockets it is given, drains on SIGTERM (health turns 503, no
new connections, in-flight requests finish within the graceful timeout), exits at once on
SIGINT/SIGQUIT, and, when told its parent's pid, exits within a second of that parent dying
(PR_SET_PDEATHSIG, a pidfd in the worker's poller, and gunicorn's periodic parent check).
"""
from __future__ import annotations

import ctypes
import logging
import math
import os
import selectors
import signal
import socket
import sys
import time

from gunicorn.config import Config
from gunicorn.glogging import Logger
from gunicorn.http import wsgi as gunicorn_wsgi
from gunicorn.workers.gthread import ThreadWorker

from .app import FileApp
from .processes import pid_alive

PR_SET_PDEATHSIG = 1
# The kernel sends this when the parent (thread) that forked us dies; the handler then checks
# the parent really is gone, since the signal also fires when only the forking thread exits.
PDEATH_SIGNAL = signal.SIGUSR2
# Bodies up to this size are copied behind the header block and sent with it.
COALESCE_LIMIT = 64 * 1024
# gthread asks after every poll whether the parent lives; /proc is read at most this often
# (the pidfd and PR_SET_PDEATHSIG report a death at once anyway).
PARENT_CHECK_INTERVAL = 1.0


class CoalescingResponse(gunicorn_wsgi.Response):
    """gunicorn's Response, except that a body written in one piece leaves with its headers.

    One sendall instead of two for every cached response: one syscall and usually one TCP
    segment instead of two. Anything else (chunked, streamed, sendfile, no body) is unchanged.
    """

    def write(self, arg):
        if (self.headers_sent or self.chunked or self._omits_body or type(arg) is not bytes
                or self.response_length != len(arg) or len(arg) > COALESCE_LIMIT):
            return super().write(arg)
        lines = self.default_headers()
        lines.extend(["%s: %s\r\n" % (k, v) for k, v in self.headers])
        head = ("%s\r\n" % "".join(lines)).encode("latin-1")
        self.headers_sent = True
        self.sent = len(arg)
        self.sock.sendall(head + arg)


class _Loaded:
    """The minimal stand-in for a gunicorn Application: it only hands out the WSGI callable."""

    def __init__(self, wsgi: FileApp) -> None:
        self._wsgi = wsgi

    def wsgi(self) -> FileApp:
        return self._wsgi


class GowsThreadWorker(ThreadWorker):
    """gthread with coalesced small responses and fileapp's health turning 503 on SIGTERM.

    Usable under gunicorn's own arbiter too: `gunicorn -k fileapp.worker.GowsThreadWorker`.
    """

    def init_process(self) -> None:
        # gunicorn.http.wsgi.create() builds its module-level Response: in this process,
        # which only ever runs this worker, that is the coalescing one.
        gunicorn_wsgi.Response = CoalescingResponse
        # Accepted sockets inherit TCP_NODELAY: without it gunicorn's separate header and body
        # writes (bodies too big to coalesce) meet Nagle and delayed ACKs, 40 ms per response.
        for listener in self.sockets:
            if listener.family in (socket.AF_INET, socket.AF_INET6):
                listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
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


class FileAppWorker(GowsThreadWorker):
    """The standalone worker: also fast quit on SIGINT/SIGQUIT and parent watching."""

    def __init__(self, *args, parent_pid: int | None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.parent_pid = parent_pid
        self._pidfd: int | None = None
        self._parent_checked = 0.0

    def notify(self) -> None:
        """No heartbeat file: nothing watches it here; the master checks health over HTTP."""

    # -- signals ----------------------------------------------------------------------------

    def init_signals(self) -> None:
        super().init_signals()
        # A closing terminal must not stop a standalone worker; there is no config to reload.
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        if self.parent_pid is None:
            return
        signal.signal(PDEATH_SIGNAL, self._on_pdeath_signal)
        signal.siginterrupt(PDEATH_SIGNAL, False)
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, int(PDEATH_SIGNAL), 0, 0, 0)
        except (OSError, AttributeError):
            self.log.debug("prctl(PR_SET_PDEATHSIG) unavailable; relying on the parent check")
        if not self._parent_alive():  # died before the watch was armed
            self.fast_exit("parent process %s is gone" % self.parent_pid)

    def handle_quit(self, sig, frame) -> None:
        """SIGINT/SIGQUIT: leave now, without waiting for requests or threads."""
        self.fast_exit("received %s" % signal.Signals(sig).name)

    def _on_pdeath_signal(self, sig, frame) -> None:
        if not self._parent_alive():
            self.fast_exit("parent process %s died" % self.parent_pid)

    def fast_exit(self, reason: str, code: int = 0) -> None:
        """Exit the process immediately (no graceful drain), after flushing the logs."""
        self.alive = False
        self.set_draining()
        try:
            self.log.info("Worker exiting (pid: %s): %s", os.getpid(), reason)
            for handler in logging.getLogger("gunicorn.error").handlers:
                handler.flush()
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)

    # -- parent watch -----------------------------------------------------------------------

    def _parent_alive(self) -> bool:
        if self.parent_pid is None:
            return True
        return pid_alive(self.parent_pid)

    def is_parent_alive(self) -> bool:
        """Called by the run loop after every poll; standalone workers have no parent to watch.

        Without --parent-pid the worker must survive its launching shell, so this is always
        True; with it, a dead parent means exit at once (the master owns our clients anyway).
        """
        now = time.monotonic()
        if now - self._parent_checked < PARENT_CHECK_INTERVAL:
            return True
        self._parent_checked = now
        if not self._parent_alive():
            self.fast_exit("parent process %s died" % self.parent_pid)
        return True

    def run(self) -> None:
        if self.parent_pid is not None and hasattr(os, "pidfd_open"):
            try:
                self._pidfd = os.pidfd_open(self.parent_pid)
            except ProcessLookupError:
                self.fast_exit("parent process %s is gone" % self.parent_pid)
            except OSError:
                self._pidfd = None  # old kernel: the periodic check still covers it
            if self._pidfd is not None:
                # Readable as soon as the parent exits: no need to wait for the 1 s loop tick.
                self.poller.register(self._pidfd, selectors.EVENT_READ, self._on_parent_exit)
        super().run()

    def _on_parent_exit(self, _fileobj) -> None:
        self.fast_exit("parent process %s exited" % self.parent_pid)


def build_config(options: dict) -> Config:
    """A gunicorn Config for one gthread worker from the CLI's options."""
    cfg = Config(prog="fileapp")
    cfg.set("worker_class", "gthread")
    cfg.set("threads", options["threads"])
    # gunicorn takes whole seconds; round up so a drain is never cut shorter than asked.
    cfg.set("graceful_timeout", math.ceil(options["graceful_timeout"]))
    cfg.set("keepalive", options["keepalive"])
    cfg.set("loglevel", options["log_level"])
    cfg.set("errorlog", "-")
    if options["access_log"]:
        cfg.set("accesslog", "-")
    cfg.set("proc_name", options["title"])
    return cfg


def serve(listener: socket.socket, app: FileApp, options: dict) -> int:
    """Serve `app` on `listener` until stopped; returns the process exit status."""
    cfg = build_config(options)
    log = Logger(cfg)
    FileAppWorker.check_config(cfg, log)
    parent_pid = options.get("parent_pid")
    worker = FileAppWorker(
        0, parent_pid if parent_pid is not None else os.getppid(), [listener], _Loaded(app),
        cfg.timeout, cfg, log, parent_pid=parent_pid,
    )
    host, port = listener.getsockname()[:2]
    log.info("fileapp worker %s serving %s at http://%s:%s (fd %s)", os.getpid(), app.root,
             f"[{host}]" if ":" in host else host, port, listener.fileno())
    worker.pid = os.getpid()
    try:
        worker.init_process()
    finally:
        worker.tmp.close()
    log.info("Worker exiting (pid: %s)", os.getpid())
    return 0
