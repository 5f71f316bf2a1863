"""Start gows' standalone worker in this process: the gunicorn config, logger and application
that gunicorn's arbiter would otherwise provide, built from `python -m fileapp`'s options."""
from __future__ import annotations

import math
import os
import socket

from . import logs
from .app import FileApp
from .gunicorn_compat import Config, Logger
from .response import WRITE_TIMEOUT
from .standalone import FileAppWorker


class LoadedApp:
    """The minimal stand-in for a gunicorn Application: it only hands out the WSGI callable."""

    def __init__(self, wsgi: FileApp) -> None:
        self._wsgi = wsgi

    def wsgi(self) -> FileApp:
        return self._wsgi


class WorkerLogger(Logger):
    """gunicorn's logger (error lines to stderr, access lines to stdout when enabled), writing
    in the format of fileapp.logs with the worker's port on every line."""

    def __init__(self, cfg: Config, log_format: str = "text", port: int | None = None) -> None:
        self.log_format, self.port = log_format, port  # read by setup(), which __init__ runs
        super().__init__(cfg)

    def setup(self, cfg: Config) -> None:
        super().setup(cfg)
        for handler in (*self.error_log.handlers, *self.access_log.handlers):
            handler.setFormatter(logs.formatter(self.log_format, self.port))


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


def serve(listeners: list[socket.socket], app: FileApp, options: dict) -> int:
    """Serve `app` on `listeners` until stopped (the first, a TCP one, names the worker; any
    other is an extra way in, such as the Unix socket gows' proxies use); returns the process
    exit status."""
    cfg = build_config(options)
    listener = listeners[0]
    host, port = listener.getsockname()[:2]
    log = WorkerLogger(cfg, options.get("log_format", "text"), port)
    FileAppWorker.check_config(cfg, log)
    parent_pid = options.get("parent_pid")
    worker = FileAppWorker(
        0, parent_pid if parent_pid is not None else os.getppid(), listeners, LoadedApp(app),
        cfg.timeout, cfg, log, parent_pid=parent_pid,
        write_timeout=options.get("write_timeout", WRITE_TIMEOUT),
    )
    log.info("fileapp worker %s serving %s at http://%s:%s (fd %s)", os.getpid(), app.root,
             f"[{host}]" if ":" in host else host, port, listener.fileno())
    for extra in listeners[1:]:
        log.info("fileapp worker %s also serving at %s (fd %s)", os.getpid(), extra.getsockname(),
                 extra.fileno())
    worker.pid = os.getpid()
    try:
        worker.init_process()
    finally:
        worker.tmp.close()
    log.info("Worker exiting (pid: %s)", os.getpid())
    return 0
