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
    "handle_error": ("req", "client", "addr", "exc"),
}
# Settings the standalone worker sets (fileapp.bootstrap.build_config) or reads.
SETTINGS = ("worker_class", "threads", "graceful_timeout", "keepalive", "loglevel", "errorlog",
            "accesslog", "proc_name", "timeout", "worker_connections", "sendfile", "pre_request",
            "post_request", "casefold_http_method")


def app(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "5")])
    return [b"hello"]


def new_worker(cfg=None) -> compat.ThreadWorker:
    cfg = cfg or compat.Config()
    return compat.ThreadWorker(0, os.getpid(), [], LoadedApp(app), 30, cfg, compat.Logger(cfg))


@pytest.fixture
def worker():
    w = new_worker()
    yield w
    w.tmp.close()


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
                                  "pid", "tmp", "method_queue", "nr", "max_requests"])
def test_thread_worker_has_the_attribute(worker, name):
    assert hasattr(worker, name)


def test_thread_worker_attributes_have_the_shapes_relied_on(worker):
    assert worker.alive is True and worker.sockets == []
    assert isinstance(worker.worker_connections, int) and worker.worker_connections > 0
    assert all(isinstance(sig, int) for sig in compat.ThreadWorker.SIGNALS)
    assert worker.nr == 0 and isinstance(worker.max_requests, int) and worker.max_requests > 0
    assert callable(worker.tmp.close)


def test_request_hooks_leave_out_gunicorns_defaults_only_while_they_would_do_nothing():
    def pre(worker, req):
        pass

    def post(worker, req, environ, resp):
        pass

    cfg = compat.Config()
    cfg.set("loglevel", "info")
    log = compat.Logger(cfg)
    assert compat.request_hooks(cfg, log) == (None, None)
    cfg.set("loglevel", "debug")  # the default pre_request logs each request at debug level
    log = compat.Logger(cfg)
    assert compat.request_hooks(cfg, log) == (cfg.pre_request, None)
    cfg.set("pre_request", pre)
    cfg.set("post_request", post)
    cfg.set("loglevel", "info")
    assert compat.request_hooks(cfg, compat.Logger(cfg)) == (pre, post)


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


# -- the header policy (fileapp.http1's Request is a HeaderPolicy) ----------------------------

def policy(peer=("127.0.0.1", 1), version=(1, 1)):
    request = compat.HeaderPolicy()
    request.cfg, request.peer_addr, request.scheme, request.version = (
        compat.Config(), peer, "http", version)
    return request


def apply(request, headers):
    """The headers kept, as _apply_header_policy leaves them (names upper case)."""
    state, seen = [False], set()
    trusted = request._peer_trusted_for_forwarded()
    kept = [request._apply_header_policy(name, value, state, seen, *trusted)
            for name, value in headers]
    return [header for header in kept if header is not None]


def test_apply_header_policy_has_the_parameters_relied_on():
    method = compat.HeaderPolicy._apply_header_policy
    assert tuple(inspect.signature(method).parameters)[1:7] == (
        "name", "value", "scheme_state", "seen", "secure_scheme_headers", "forwarder_headers")


def test_header_policy_keeps_plain_headers_and_drops_names_with_underscores():
    assert apply(policy(), [("HOST", "t"), ("X_SPOOF", "1"), ("ACCEPT", "*/*")]) == [
        ("HOST", "t"), ("ACCEPT", "*/*")]


def test_header_policy_refuses_a_repeated_singleton_field():
    with pytest.raises(compat.InvalidHeader):
        apply(policy(), [("HOST", "a"), ("HOST", "b")])


def test_header_policy_notes_expect_100_continue_on_http_1_1_only():
    request = policy()
    apply(request, [("EXPECT", "100-continue")])
    assert request._expected_100_continue is True
    old = policy(version=(1, 0))
    apply(old, [("EXPECT", "100-continue")])
    assert old._expected_100_continue is False


def test_header_policy_takes_the_scheme_from_a_trusted_peer_only():
    trusted = policy(("127.0.0.1", 1))
    apply(trusted, [("X-FORWARDED-PROTO", "https")])
    assert trusted.scheme == "https"
    untrusted = policy(("192.0.2.1", 1))
    apply(untrusted, [("X-FORWARDED-PROTO", "https")])
    assert untrusted.scheme == "http"


PLAIN_NAMES = ("ACCEPT", "USER-AGENT", "X-FORWARDED-FOR", "X-FORWARDED-HOST", "VIA", "COOKIE",
               "CONTENT-LENGTH", "TRANSFER-ENCODING", "RANGE", "IF-NONE-MATCH", "X-GOWS-HANDOFF")


@pytest.mark.parametrize("name", PLAIN_NAMES)
def test_the_policy_keeps_a_field_it_may_not_act_on_as_it_is_and_changes_nothing(name):
    """fileapp.http1 keeps such a field without calling the policy (a tenth of a worker's
    time per request): the policy must indeed only keep it, repeated or not."""
    assert not compat.policy_may_act(name)
    request = policy()
    state, seen = [False], set()
    before = dict(vars(request))
    kept = [request._apply_header_policy(name, value, state, seen, *request._peer_trusted_for_forwarded())
            for value in ("a", "b")]
    assert kept == [(name, "a"), (name, "b")]
    assert (state, seen, vars(request)) == ([False], set(), before)


@pytest.mark.parametrize("name", ["HOST", "CONTENT-TYPE", "EXPECT", "X_SPOOF", "SCRIPT_NAME"])
def test_the_fields_the_policy_acts_on_are_named(name):
    assert compat.policy_may_act(name)


def test_request_limits_and_their_defaults_are_numbers():
    cfg = compat.Config()
    assert (cfg.limit_request_line, cfg.limit_request_fields, cfg.limit_request_field_size) == (
        4094, 100, 8190)
    assert compat.MAX_REQUEST_LINE == 8190 and compat.MAX_HEADERS > 100
    assert compat.DEFAULT_MAX_HEADERFIELD_SIZE == 8190
    assert cfg.casefold_http_method in (True, False)


# -- handle_error: the answers to malformed requests ------------------------------------------

@pytest.mark.parametrize("error, status", [
    (compat.InvalidRequestLine("x"), b"400"),
    (compat.InvalidRequestMethod("x"), b"400"),
    (compat.InvalidHeader("x"), b"400"),
    (compat.LimitRequestLine(9000, 4094), b"414"),
    (compat.LimitRequestHeaders("limit request headers fields"), b"431"),
    (compat.ConfigurationProblem("x"), b"500"),
    (ValueError("an app's error"), b"500"),
])
def test_handle_error_answers_each_error_class_with_its_status(worker, peers, error, status):
    server, client = peers
    worker.handle_error(None, server, ("127.0.0.1", 1), error)
    assert received(client).startswith(b"HTTP/1.1 " + status + b" ")


# -- the response rules fileapp.response keeps ------------------------------------------------

def test_status_and_header_patterns_tell_good_from_bad():
    assert compat.STATUS_RE.fullmatch("200 OK") and not compat.STATUS_RE.fullmatch("200 OK\r\nX: 1")
    assert compat.TOKEN_RE.fullmatch("Content-Type") and not compat.TOKEN_RE.fullmatch("Bad Name")
    assert compat.HEADER_VALUE_RE.fullmatch("text/plain; charset=utf-8")
    assert not compat.HEADER_VALUE_RE.fullmatch("a\r\nSet-Cookie: x")


def test_hop_headers_server_and_date():
    assert {"connection", "transfer-encoding", "keep-alive", "upgrade", "server", "date"} <= compat.HOP_HEADERS
    assert isinstance(compat.SERVER, str) and compat.SERVER
    assert compat.http_date(0) == "Thu, 01 Jan 1970 00:00:00 GMT"


def test_base_environ_and_file_wrapper_have_the_shapes_relied_on():
    env = compat.base_environ(compat.Config())
    assert env["wsgi.version"] == (1, 0) and env["wsgi.file_wrapper"] is compat.FileWrapper
    assert {"wsgi.errors", "wsgi.multiprocess", "wsgi.run_once", "SERVER_SOFTWARE"} <= set(env)
    body = io.BytesIO(b"data")
    assert compat.FileWrapper(body, 8192).filelike is body


def test_response_header_errors_are_gunicorn_errors_answered_500(worker, peers):
    server, client = peers
    worker.handle_error(None, server, ("127.0.0.1", 1), compat.InvalidResponseHeaderName("'x y'"))
    assert received(client).startswith(b"HTTP/1.1 500 ")
    assert issubclass(compat.InvalidResponseHeader, Exception)


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
    assert log.access_log_enabled is True


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
