"""One log line format for gows' master and its workers, as text or as JSON lines.

text: 2026-12-02 04:19:35,799 [4242] [INFO] gows.worker:9001: message
json: {"time": "2026-12-02T04:19:35.799+00:00", "pid": 4242, "level": "INFO",
       "logger": "gows.worker", "port": 9001, "message": "message"}   (one object per line)

A worker's lines carry its port (the master's, none): a worker is known by its port, which
stays while its pid changes with every restart. gunicorn's loggers show as gows.worker and
gows.worker.access. This module does not import gunicorn: the master configures its own
logging with `configure` too.
"""
from __future__ import annotations

import datetime
import json
import logging
import sys

FORMATS = ("text", "json")

# How a worker's lines name gunicorn's loggers; other loggers keep their own names.
_RENAMED = {"gunicorn.access": "gows.worker.access"}
_GUNICORN = "gunicorn"
_WORKER = "gows.worker"
_installed: logging.Handler | None = None  # by configure()


def logger_name(record: logging.LogRecord) -> str:
    """The name a line shows for the logger that made `record`."""
    name = record.name
    renamed = _RENAMED.get(name)
    if renamed is not None:
        return renamed
    if name == _GUNICORN or name.startswith(_GUNICORN + "."):
        return _WORKER
    return name


class _Formatter(logging.Formatter):
    """What both formats share: the worker's port (None in the master) and the traceback."""

    def __init__(self, port: int | None = None) -> None:
        super().__init__()
        self.port = port

    def details(self, record: logging.LogRecord) -> str:
        """The traceback and stack of `record`, as logging.Formatter appends them ("" for none)."""
        parts = []
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            parts.append(record.exc_text)
        if record.stack_info:
            parts.append(self.formatStack(record.stack_info))
        return "\n".join(parts)


class TextFormatter(_Formatter):
    """`time [pid] [LEVEL] logger[:port]: message`, then any traceback on the lines below."""

    def format(self, record: logging.LogRecord) -> str:
        name = logger_name(record)
        if self.port is not None:
            name = f"{name}:{self.port}"
        line = (f"{self.formatTime(record)} [{record.process}] [{record.levelname}] "
                f"{name}: {record.getMessage()}")
        details = self.details(record)
        return f"{line}\n{details}" if details else line


class JsonFormatter(_Formatter):
    """One JSON object per line: time (ISO 8601, milliseconds, local offset), pid, level,
    logger, port (a worker's), message, and exception (a traceback) when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.datetime.fromtimestamp(record.created).astimezone().isoformat(
                timespec="milliseconds"),
            "pid": record.process,
            "level": record.levelname,
            "logger": logger_name(record),
        }
        if self.port is not None:
            entry["port"] = self.port
        entry["message"] = record.getMessage()
        details = self.details(record)
        if details:
            entry["exception"] = details
        # ASCII escapes keep a line one line and any odd byte of a file name printable.
        return json.dumps(entry)


def formatter(kind: str = "text", port: int | None = None) -> logging.Formatter:
    """The formatter of `kind` ("text" or "json"); `port` is the worker's, None in the master."""
    if kind == "text":
        return TextFormatter(port)
    if kind == "json":
        return JsonFormatter(port)
    raise ValueError(f"log format must be one of {', '.join(FORMATS)}, got {kind!r}")


def configure(kind: str = "text", level: str | int = "info", *,
              handler: logging.Handler | None = None, port: int | None = None) -> logging.Handler:
    """Send every logger's records through `handler` (default: stderr) in the `kind` format, at
    `level` and above. The handler an earlier call installed is removed and closed, so calling
    this again (a reload) switches format, level or destination. Returns the handler."""
    global _installed
    if handler is None:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter(kind, port))
    root = logging.getLogger()
    if _installed is not None and _installed is not handler:
        root.removeHandler(_installed)
        _installed.close()
    _installed = handler
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)
    return handler
