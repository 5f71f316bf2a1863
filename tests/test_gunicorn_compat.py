"""Every gunicorn internal gows' worker relies on (fileapp.gunicorn_compat), each named with the
shape relied on: a gunicorn upgrade that moves or reshapes one fails here first, by name."""
from __future__ import annotations

import ast
import inspect
import io
import logging
import os
import select
import socket
from pathlib import Path
from types import SimpleNamespace

import pytest

from fileapp import gunicorn_compat as compat
from fileapp.bootstrap import LoadedApp, build_config

pytestmark = pytest.mark.unit

FILEAPP = Path(__file__).resolve().parent.parent / "fileapp"

# ThreadWorker members GowsThreadWorker overrides or calls: name -> parameters after self.
THREAD_WORKER_METHODS = {
    "init_process": (),
    "init_signals": (),
    "run": (),
    "notify": (),
    "is_parent_alive": (),
    "handle_exit": ("sig", "frame"),
    "handle_quit": ("sig", "frame"),
    "wait_for_and_dispatch_events": ("timeout",),
    "handle_request": ("req", "conn"),
    "_keepalive_after": ("conn", "keepalive"),
    "handle_error": ("req", "client", "addr", "exc"),
}
# Response members CoalescingResponse overrides or calls: name -> parameters after self.
RESPONSE_METHODS = {
    "send_headers": (),
    "default_headers": (),
    "_emit_body": ("data",),
    "can_sendfile": (),
    "sendfile": ("respiter",),
    "write_file": ("respiter",),
    "close": (),
}
RESPONSE_ATTRIBUTES = ("sock", "headers", "headers_sent", "chunked", "response_length", "_omits_body")
# Settings the standalone worker sets (fileapp.bootstrap.build_config) or reads.
SETTINGS = ("worker_class", "threads", "graceful_timeout", "keepalive", "loglevel", "errorlog",
            "accesslog", "proc_name", "timeout", "worker_connections", "sendfile")


def app(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "5")])
    return [b"hello"]


def file_app(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "4")])
    return environ["wsgi.file_wrapper"](io.BytesIO(b"data"))


def new_worker(cfg=None) -> compat.ThreadWorker:
    cfg = cfg or compat.Config()
    return compat.ThreadWorker(0, os.getpid(), [], LoadedApp(app), 30, cfg, compat.Logger(cfg))


@pytest.fixture
def worker():
    w = new_worker()
    yield w
    w.tmp.close()


@pytest.fixture
def peers():
    """A connected pair: the server's side, then the client's."""
    server, client = socket.socketpair()
    yield server, client
    server.close()
    client.close()


def parser_for(peers, data: bytes, end: bool = True):
    server, client = peers
    client.sendall(data)
    if end:
        client.shutdown(socket.SHUT_WR)
    return compat.get_parser(compat.Config(), server, ("127.0.0.1", 1))


def received(sock: socket.socket) -> bytes:
    sock.settimeout(10)
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    return data


# -- ThreadWorker ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", THREAD_WORKER_METHODS)
def test_thread_worker_method_has_the_parameters_relied_on(name):
    method = getattr(compat.ThreadWorker, name)
    assert tuple(inspect.signature(method).parameters)[1:] == THREAD_WORKER_METHODS[name]


def test_thread_worker_check_config_is_a_classmethod_of_cfg_and_log():
    assert tuple(inspect.signature(compat.ThreadWorker.check_config).parameters) == ("cfg", "log")
    cfg = compat.Config()
    compat.ThreadWorker.check_config(cfg, compat.Logger(cfg))


@pytest.mark.parametrize("name", ["SIGNALS", "alive", "cfg", "log", "sockets", "worker_connections",
                                  "pid", "tmp", "method_queue", "keepalived_conns"])
def test_thread_worker_has_the_attribute(worker, name):
    assert hasattr(worker, name)


def test_thread_worker_attributes_have_the_shapes_relied_on(worker):
    assert worker.alive is True and worker.sockets == []
    assert isinstance(worker.worker_connections, int) and worker.worker_connections > 0
    assert all(isinstance(sig, int) for sig in compat.ThreadWorker.SIGNALS)
    # handle_request closes a connection when keepalived_conns is full: gows leaves it empty.
    assert len(worker.keepalived_conns) == 0
    assert callable(worker.tmp.close)


def test_stop_keepalive_linger_is_a_positive_number_of_seconds():
    assert isinstance(compat.STOP_KEEPALIVE_LINGER, (int, float)) and compat.STOP_KEEPALIVE_LINGER > 0


def test_init_process_loads_the_app_and_readies_the_main_loop_before_run():
    """init_process creates the poller and method queue and loads the WSGI callable before run();
    watch_readable, watch_method_queue and wake_main_loop work through them."""
    seen = {}

    class Probe(compat.ThreadWorker):
        def init_signals(self) -> None:  # the test process keeps its own signal handlers
            pass

        def run(self) -> None:
            seen["wsgi"] = self.wsgi
            r, w = os.pipe()
            try:
                compat.watch_readable(self, r, lambda fd: seen.setdefault("readable", os.read(fd, 1)))
                compat.watch_method_queue(self)
                os.write(w, b"x")
                compat.wake_main_loop(self)
                queue_fd = self.method_queue.fileno()
                assert select.select([queue_fd], [], [], 10)[0] == [queue_fd]
                self.wait_for_and_dispatch_events(timeout=10)
                seen["queue drained"] = select.select([queue_fd], [], [], 0)[0] == []
            finally:
                self.poller.close()
                self.method_queue.close()
                for fd in (r, w, *self.PIPE):
                    os.close(fd)

    cfg = compat.Config()
    probe = Probe(0, os.getpid(), [], LoadedApp(app), 30, cfg, compat.Logger(cfg))
    try:
        probe.init_process()
    finally:
        probe.tmp.close()
    assert seen == {"wsgi": app, "readable": b"x", "queue drained": True}


# -- the parser --------------------------------------------------------------------------------

def test_parser_keeps_a_pipelined_request_in_its_read_ahead_buffer(peers):
    parser = parser_for(peers, b"GET /a HTTP/1.1\r\nHost: t\r\n\r\nGET /b HTTP/1.1\r\nHost: t\r\n\r\n")
    assert next(parser).path == "/a"
    assert compat.has_buffered_request(parser)
    assert compat.body_read_to_end(parser)  # no body: a LengthReader of 0 bytes
    compat.forget_request(parser)
    assert parser.mesg is None
    assert next(parser).path == "/b"
    assert not compat.has_buffered_request(parser)


def test_a_request_body_is_not_read_to_its_end_before_the_app_reads_it(peers):
    parser = parser_for(peers, b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\nhello")
    next(parser)
    assert isinstance(parser.mesg.body.reader, compat.LengthReader)
    assert parser.mesg.body.reader.length == 5
    assert not compat.body_read_to_end(parser)


def test_a_request_cut_short_raises_no_more_data(peers):
    parser = parser_for(peers, b"GET / HTTP/1.1\r\nHost:")
    with pytest.raises(compat.NoMoreData):
        next(parser)


def test_a_connection_closed_before_a_request_stops_the_parser(peers):
    parser = parser_for(peers, b"")
    with pytest.raises(StopIteration):
        next(parser)


# -- handle_request and the Response it builds ------------------------------------------------

@pytest.mark.parametrize("name", RESPONSE_METHODS)
def test_response_method_has_the_parameters_relied_on(name):
    method = getattr(compat.Response, name)
    assert tuple(inspect.signature(method).parameters)[1:] == RESPONSE_METHODS[name]


@pytest.fixture
def recording_response():
    """The calls a Response subclass, installed for the test's requests, sees."""
    calls = []

    class Recording(compat.Response):
        def _emit_body(self, data):
            calls.append(("_emit_body", data))
            super()._emit_body(data)

        def sendfile(self, respiter):
            calls.append(("sendfile", respiter.filelike.read()))
            respiter.filelike.seek(0)
            return False  # then write_file writes it

    original = compat.Response
    compat.install_response(Recording)
    try:
        yield calls
    finally:
        compat.install_response(original)


def serve_one(worker, peers, wsgi):
    """handle_request on a connection shaped like gows' _Conn; (keep-alive, the response head)."""
    server, client = peers
    parser = parser_for(peers, b"GET / HTTP/1.1\r\nHost: t\r\n\r\n", end=False)
    conn = SimpleNamespace(sock=server, client=("127.0.0.1", 1), server=("127.0.0.1", 80), parser=parser)
    worker.wsgi = wsgi
    keep = worker.handle_request(next(parser), conn)
    return keep and worker._keepalive_after(conn, keep), received(client)


def test_handle_request_answers_through_the_installed_response_class(worker, peers, recording_response):
    calls = recording_response
    keep, head = serve_one(worker, peers, app)
    assert calls == [("_emit_body", b"hello")]
    assert keep is True and head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"Connection: keep-alive\r\n" in head  # the empty keepalived_conns closes nothing


def test_write_file_offers_a_file_body_to_sendfile_first(worker, peers, recording_response):
    calls = recording_response
    keep, head = serve_one(worker, peers, file_app)
    assert calls == [("sendfile", b"data"), ("_emit_body", b"data")]
    assert keep is True and head.startswith(b"HTTP/1.1 200 OK\r\n")


def test_response_has_the_attributes_relied_on(peers):
    resp = compat.Response(SimpleNamespace(), peers[0], compat.Config())
    for name in RESPONSE_ATTRIBUTES:
        assert hasattr(resp, name), name
    assert (resp.headers_sent, resp.chunked, resp.response_length, resp._omits_body) == (
        False, False, None, False)


# -- config, logger, util ----------------------------------------------------------------------

@pytest.mark.parametrize("name", SETTINGS)
def test_config_has_the_setting(name):
    assert name in compat.Config().settings


def test_config_reads_back_what_the_standalone_worker_sets():
    cfg = build_config({"threads": 3, "graceful_timeout": 1.5, "keepalive": 7, "log_level": "debug",
                        "access_log": True, "title": "gows: worker :1"})
    assert (cfg.threads, cfg.graceful_timeout, cfg.keepalive, cfg.loglevel, cfg.errorlog, cfg.accesslog,
            cfg.proc_name) == (3, 2, 7, "debug", "-", "-", "gows: worker :1")
    assert not cfg.is_ssl and cfg.http2_cleartext == "off"  # what gows' own loop serves


def test_logger_sets_itself_up_from_its_constructor_with_error_and_access_loggers():
    set_up = []

    class Recording(compat.Logger):
        def setup(self, cfg):
            set_up.append(cfg)
            super().setup(cfg)

    cfg = build_config({"threads": 1, "graceful_timeout": 1, "keepalive": 1, "log_level": "info",
                        "access_log": True, "title": "t"})
    log = Recording(cfg)
    assert set_up == [cfg]
    assert isinstance(log.error_log, logging.Logger) and isinstance(log.access_log, logging.Logger)
    assert log.error_log.handlers and log.access_log.handlers
    for name in ("debug", "info", "warning", "exception", "access"):  # what the worker calls
        assert callable(getattr(log, name)), name


def test_close_socket_closes_and_tolerates_a_closed_socket():
    sock = socket.socket()
    compat.close_socket(sock)
    assert sock.fileno() == -1
    compat.close_socket(sock)


def test_has_fileno_tells_files_from_in_memory_bodies(tmp_path):
    with open(tmp_path / "f", "wb") as f:
        assert compat.has_fileno(f)
    assert not compat.has_fileno(io.BytesIO(b"x"))


def test_only_the_compat_module_imports_gunicorn():
    importers = []
    for path in sorted(FILEAPP.glob("*.py")):
        if path.name == "gunicorn_compat.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            if any(n == "gunicorn" or n.startswith("gunicorn.") for n in names):
                importers.append(path.name)
    assert importers == []
