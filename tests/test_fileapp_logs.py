"""fileapp.logs: one line format for the master and its workers, as text or JSON lines."""
from __future__ import annotations

import datetime
import io
import json
import logging
import re

import pytest

from fileapp import logs
from fileapp.bootstrap import WorkerLogger, build_config

pytestmark = pytest.mark.unit

# The master's line format (arbiter/ops/logs.py) that the text format keeps.
MASTER_FORMAT = "%(asctime)s [%(process)d] [%(levelname)s] %(name)s: %(message)s"


def record(name: str = "gows.arbiter", message: str = "hello %s", args=("world",),
           level: int = logging.INFO, exc_info=None) -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, message, args, exc_info)


def failure():
    try:
        raise ValueError("boom")
    except ValueError as e:
        return (type(e), e, e.__traceback__)


@pytest.fixture
def root_logger(monkeypatch):
    """The root logger, its handlers, level and fileapp.logs' own handler restored after the test."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    monkeypatch.setattr(logs, "_installed", None)
    yield root
    root.handlers[:] = handlers
    root.setLevel(level)


def test_text_without_a_port_is_the_masters_format():
    r = record()
    assert logs.formatter("text").format(r) == logging.Formatter(MASTER_FORMAT).format(r)


def test_text_names_the_workers_port_after_its_logger():
    line = logs.formatter("text", port=9001).format(record("gunicorn.error"))
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} \[\d+\] \[INFO\] gows.worker:9001: hello world",
                        line), line


@pytest.mark.parametrize("name, shown", [
    ("gunicorn.error", "gows.worker"), ("gunicorn.access", "gows.worker.access"),
    ("gunicorn.http.wsgi", "gows.worker"), ("fileapp", "fileapp"), ("gows.arbiter", "gows.arbiter"),
    ("gunicornish", "gunicornish"),
])
def test_gunicorns_loggers_show_as_the_gows_worker(name, shown):
    assert logs.logger_name(record(name)) == shown


def test_text_puts_a_traceback_on_the_lines_below():
    lines = logs.formatter("text", 9001).format(record(exc_info=failure())).splitlines()
    assert lines[0].endswith("gows.arbiter:9001: hello world")
    assert lines[1] == "Traceback (most recent call last):" and lines[-1] == "ValueError: boom"


def test_json_is_one_object_on_one_line_with_the_fields_a_shipper_needs():
    r = record("gunicorn.error", "served %s\nand more", ("/x",), logging.WARNING)
    line = logs.formatter("json", port=9001).format(r)
    assert "\n" not in line
    entry = json.loads(line)
    assert list(entry) == ["time", "pid", "level", "logger", "port", "message"]
    assert entry["pid"] == r.process and entry["level"] == "WARNING" and entry["logger"] == "gows.worker"
    assert entry["port"] == 9001 and entry["message"] == "served /x\nand more"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d", entry["time"]), entry["time"]
    when = datetime.datetime.fromisoformat(entry["time"])
    assert abs(when.timestamp() - r.created) < 0.001


def test_json_of_the_master_has_no_port_and_a_traceback_as_a_field():
    entry = json.loads(logs.formatter("json").format(record(exc_info=failure())))
    assert "port" not in entry and entry["logger"] == "gows.arbiter"
    assert entry["exception"].startswith("Traceback") and entry["exception"].endswith("ValueError: boom")


def test_json_keeps_odd_bytes_of_file_names_printable():
    name = b"caf\xe9.txt".decode("utf-8", "surrogateescape")
    line = logs.formatter("json").format(record(message="cannot open %s", args=(name,)))
    assert line.isascii() and json.loads(line)["message"] == f"cannot open {name}"


def test_an_unknown_format_is_refused():
    with pytest.raises(ValueError, match="text, json"):
        logs.formatter("xml")


def test_configure_sends_every_logger_through_one_handler_and_replaces_its_own(root_logger):
    first, second = io.StringIO(), io.StringIO()
    installed = logs.configure("text", "warning", handler=logging.StreamHandler(first), port=7)
    logging.getLogger("fileapp").warning("one")
    logging.getLogger("fileapp").info("not at warning level")
    assert first.getvalue().endswith("[WARNING] fileapp:7: one\n") and "not at" not in first.getvalue()
    logs.configure("json", "debug", handler=logging.StreamHandler(second))
    logging.getLogger("gows.arbiter").debug("two")
    assert installed not in root_logger.handlers and root_logger.level == logging.DEBUG
    assert json.loads(second.getvalue())["message"] == "two" and "two" not in first.getvalue()


def test_the_workers_gunicorn_logger_writes_through_the_chosen_format():
    cfg = build_config({"threads": 1, "graceful_timeout": 1, "keepalive": 1, "log_level": "info",
                        "access_log": True, "title": "t"})
    log = WorkerLogger(cfg, "json", 9001)
    handlers = [*log.error_log.handlers, *log.access_log.handlers]
    assert len(handlers) == 2
    assert all(isinstance(h.formatter, logs.JsonFormatter) and h.formatter.port == 9001 for h in handlers)
