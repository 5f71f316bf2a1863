"""gows' worker class reading requests with httptools (fileapp.http1) and answering with its own
Response (fileapp.response), under gunicorn's arbiter with any WSGI app: a complete PEP 3333
environ, request bodies (Content-Length, chunked, 100-continue, left unread), pipelining, and
gunicorn's answers to malformed or oversize requests."""
from __future__ import annotations

import json
import select
import socket
import subprocess
import sys
import time

import pytest

from e2e_support import Responses, read_head
from support import free_port, python_env, stop_process, wait_for_port, wait_until

pytestmark = pytest.mark.integration

ECHO_APP = '''
import json
import os
import time

KEYS = ("REQUEST_METHOD", "SCRIPT_NAME", "PATH_INFO", "QUERY_STRING", "RAW_URI", "SERVER_PROTOCOL",
        "SERVER_NAME", "SERVER_PORT", "REMOTE_ADDR", "CONTENT_TYPE", "CONTENT_LENGTH",
        "wsgi.url_scheme", "wsgi.version", "wsgi.multithread", "wsgi.run_once",
        "wsgi.input_terminated")

def app(environ, start_response):
    path = environ["PATH_INFO"]
    if path == "/ignore-body":
        body = b"ignored"
    elif path == "/hold":  # holds its thread until the test creates ./release (20 s at most)
        open("holding", "w").close()
        deadline = time.monotonic() + 20
        while not os.path.exists("release") and time.monotonic() < deadline:
            time.sleep(0.01)
        body = b"held"
    elif path == "/echo":
        body = environ["wsgi.input"].read()
    elif path == "/lines":
        body = b"|".join(environ["wsgi.input"])
    elif path == "/stream":  # no Content-Length: chunked on HTTP/1.1, to the close on 1.0
        start_response("200 OK", [("Content-Type", "text/plain")])
        return iter([b"one,", b"", b"two"])
    else:
        env = {k: environ[k] for k in KEYS if k in environ}
        env.update({k: v for k, v in environ.items() if k.startswith("HTTP_")})
        env["has"] = sorted(k for k in ("wsgi.input", "wsgi.errors", "wsgi.file_wrapper",
                                        "REMOTE_PORT") if k in environ)
        body = json.dumps(env).encode()
    start_response("200 OK", [("Content-Type", "application/json"),
                              ("Content-Length", str(len(body)))])
    return [body]
'''


@pytest.fixture
def echo(tmp_path):
    yield from _echo(tmp_path)


def _echo(tmp_path, *options: str):
    """The port of gunicorn running ECHO_APP under GowsThreadWorker on 127.0.0.1."""
    (tmp_path / "echo.py").write_text(ECHO_APP)
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "-k", "fileapp.worker.GowsThreadWorker", "--threads", "2",
         "-b", f"127.0.0.1:{port}", "--log-level", "warning", "--limit-request-fields", "20",
         *options, "echo:app"],
        env=python_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path)
    try:
        wait_for_port(port, timeout=30)
        yield port
    finally:
        stop_process(proc)
    assert proc.returncode == 0


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=10)


def answer(port: int, data: bytes, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    with connect(port) as s:
        s.sendall(data)
        return Responses(s).next(method)


def test_the_environ_is_complete_and_as_gunicorn_builds_it(echo):
    status, headers, body = answer(echo, (
        b"GET /a%20b/c%2Fd?x=1&y=%20 HTTP/1.1\r\nHost: example.test:8080\r\n"
        b"X-Multi: a\r\nX-Multi: b\r\nX_Spoofed: 1\r\nContent-Type: text/plain\r\n\r\n"))
    env = json.loads(body)
    assert status == 200 and headers["connection"] == "keep-alive"
    assert env.pop("REMOTE_ADDR") == "127.0.0.1"
    assert env == {
        "REQUEST_METHOD": "GET", "SCRIPT_NAME": "", "PATH_INFO": "/a b/c/d",
        "QUERY_STRING": "x=1&y=%20", "RAW_URI": "/a%20b/c%2Fd?x=1&y=%20",
        "SERVER_PROTOCOL": "HTTP/1.1", "SERVER_NAME": "127.0.0.1", "SERVER_PORT": str(echo),
        "CONTENT_TYPE": "text/plain", "wsgi.url_scheme": "http", "wsgi.version": [1, 0],
        "wsgi.multithread": True, "wsgi.run_once": False, "wsgi.input_terminated": True,
        "HTTP_HOST": "example.test:8080", "HTTP_X_MULTI": "a,b",  # X_Spoofed dropped
        "has": ["REMOTE_PORT", "wsgi.errors", "wsgi.file_wrapper", "wsgi.input"],
    }


def test_forwarded_proto_from_a_trusted_peer_sets_the_scheme(echo):
    _, _, body = answer(echo, b"GET / HTTP/1.1\r\nHost: t\r\nX-Forwarded-Proto: https\r\n\r\n")
    assert json.loads(body)["wsgi.url_scheme"] == "https"  # 127.0.0.1 is in forwarded_allow_ips


@pytest.mark.parametrize("data", [
    b"GET / HTTP/1.1\r\nHost: t\r\nBad Header Line\r\n\r\n",
    b"\x00\x01\x02 / HTTP/1.1\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",  # a repeated singleton field
    b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nx",
    b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\nZZ\r\nxx\r\n0\r\n\r\n",
])
def test_malformed_requests_get_400_and_the_connection_is_closed(echo, data):
    with connect(echo) as s:
        s.sendall(data)
        status, headers, _ = Responses(s).next()
        assert status == 400 and headers["connection"] == "close"
        assert s.recv(1) == b""


def test_a_request_line_over_the_limit_gets_414(echo):
    status, _, _ = answer(echo, b"GET /" + b"a" * 5000 + b" HTTP/1.1\r\nHost: t\r\n\r\n")
    assert status == 414


def test_more_header_fields_than_the_limit_get_431(echo):
    fields = b"".join(b"X-F%d: 1\r\n" % i for i in range(25))
    status, _, _ = answer(echo, b"GET / HTTP/1.1\r\nHost: t\r\n" + fields + b"\r\n")
    assert status == 431


def test_a_header_field_over_the_size_limit_gets_431(echo):
    status, _, _ = answer(echo, b"GET / HTTP/1.1\r\nHost: t\r\nX-Big: " + b"v" * 9000 + b"\r\n\r\n")
    assert status == 431


def test_a_head_that_never_ends_is_refused_not_buffered(echo):
    """Headers under each limit but a head past limit_request_fields x field size: refused."""
    with connect(echo) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n")
        line = b"X-F: " + b"v" * 8000 + b"\r\n"
        try:
            for _ in range(40):
                s.sendall(line)
        except (BrokenPipeError, ConnectionResetError):
            pass
        head, _ = read_head(s)
        assert head.split(b" ")[1] == b"431"


def test_a_request_sent_in_time_is_answered_though_every_thread_was_busy_past_the_keepalive(tmp_path):
    """A client that sent its next request within the keep-alive time is not the one at fault
    when no thread reads it before the idle sweep (a worker behind its queue): the connection
    is answered, not closed as idle (the proxy would charge the worker with a failure)."""
    server = _echo(tmp_path, "--threads", "1", "--keep-alive", "1")
    port = next(server)
    try:
        with connect(port) as kept, connect(port) as holder:
            kept.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
            assert Responses(kept).next()[0] == 200  # now idle, for at most the 1 s keep-alive
            holder.sendall(b"GET /hold HTTP/1.1\r\nHost: t\r\n\r\n")
            wait_until(lambda: (tmp_path / "holding").exists(), timeout=10)  # the only thread is held
            kept.sendall(b"GET /again HTTP/1.1\r\nHost: t\r\n\r\n")  # in time
            # Past the keep-alive and the next sweep (every second) the request is still unread.
            readable, _, _ = select.select([kept], [], [], 3.0)
            assert not readable, "the connection was closed with a request waiting in it"
            (tmp_path / "release").touch()
            assert Responses(holder).next()[2] == b"held"
            assert Responses(kept).next()[0] == 200
    finally:
        server.close()  # stops the worker


def test_a_head_trickled_while_every_thread_is_busy_still_gets_its_read_timeout(tmp_path):
    """Bytes of a begun head that no thread has read yet do not push its deadline back (5 s
    from its first bytes): a slowloris on a busy worker is closed all the same."""
    server = _echo(tmp_path, "--threads", "1", "--keep-alive", "30")
    port = next(server)
    try:
        with connect(port) as slow, connect(port) as holder:
            slow.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n")  # read by the one thread: a head begun
            started = time.monotonic()
            assert answer(port, b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")[0] == 200
            holder.sendall(b"GET /hold HTTP/1.1\r\nHost: t\r\n\r\n")
            wait_until(lambda: (tmp_path / "holding").exists(), timeout=10)  # the only thread is held
            closed = False
            while not closed and time.monotonic() - started < 12:
                try:
                    slow.sendall(b"X")  # one more byte every 0.2 s, left unread
                    readable, _, _ = select.select([slow], [], [], 0.2)
                    closed = bool(readable) and slow.recv(1, socket.MSG_PEEK) == b""
                except OSError:  # reset: closed with our bytes unread
                    closed = True
            elapsed = time.monotonic() - started
            (tmp_path / "release").touch()
            assert closed and elapsed < 12, f"still open after {elapsed:.1f}s of a trickled head"
    finally:
        server.close()  # stops the worker


def test_pipelined_requests_with_bodies_are_answered_in_order(echo):
    with connect(echo) as s:
        s.sendall(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\nhello"
                  b"GET /?second HTTP/1.1\r\nHost: t\r\n\r\n"
                  b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
                  b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
                  b"GET /?fourth HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        responses = Responses(s)
        got = [responses.next() for _ in range(4)]
        assert responses.at_eof()
    assert got[0][2] == b"hello" and got[2][2] == b"abcde"
    assert json.loads(got[1][2])["QUERY_STRING"] == "second"
    assert json.loads(got[3][2])["QUERY_STRING"] == "fourth"
    assert got[3][1]["connection"] == "close"


def test_a_chunked_upload_in_pieces_reaches_the_app_dechunked(echo):
    with connect(echo) as s:
        s.sendall(b"POST /lines HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
                  b"6\r\nline1\n\r\n")
        # The app is reading wsgi.input and waits for the rest, which comes in other packets.
        s.sendall(b"3\r\nlin\r\n")
        s.sendall(b"5\r\ne2\nxx\r\n0\r\n\r\n")
        status, _, body = Responses(s).next()
    assert status == 200 and body == b"line1\n|line2\n|xx"


def test_expect_100_continue_is_answered_before_the_body_is_sent(echo):
    with connect(echo) as s:
        s.sendall(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\n"
                  b"Expect: 100-continue\r\n\r\n")
        head, rest = read_head(s)
        assert head == b"HTTP/1.1 100 Continue" and rest == b""
        s.sendall(b"body")
        status, _, body = Responses(s).next()
    assert (status, body) == (200, b"body")


def test_a_body_the_app_does_not_read_is_skipped_for_the_next_request(echo):
    with connect(echo) as s:
        s.sendall(b"POST /ignore-body HTTP/1.1\r\nHost: t\r\nContent-Length: 10\r\n\r\n0123456789"
                  b"GET /?next HTTP/1.1\r\nHost: t\r\n\r\n")
        responses = Responses(s)
        assert responses.next()[2] == b"ignored"
        assert json.loads(responses.next()[2])["QUERY_STRING"] == "next"


def test_a_body_still_coming_that_the_app_does_not_read_closes_the_connection(echo):
    with connect(echo) as s:
        s.sendall(b"POST /ignore-body HTTP/1.1\r\nHost: t\r\nContent-Length: 100000\r\n\r\nabc")
        status, headers, body = Responses(s).next()
        assert (status, body) == (200, b"ignored")
        assert s.recv(1) == b""  # closed, never waiting for the rest of the body


def test_a_request_head_sent_a_byte_at_a_time_is_answered(echo):
    data = b"GET /?slow HTTP/1.1\r\nHost: t\r\n\r\n"
    with connect(echo) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for i in range(len(data)):
            s.send(data[i:i + 1])
        status, _, body = Responses(s).next()
    assert status == 200 and json.loads(body)["QUERY_STRING"] == "slow"


def test_a_body_of_unknown_length_is_chunked_on_http_1_1_and_closed_on_http_1_0(echo):
    with connect(echo) as s:
        s.sendall(b"GET /stream HTTP/1.1\r\nHost: t\r\n\r\nHEAD /stream HTTP/1.1\r\nHost: t\r\n\r\n")
        responses = Responses(s)
        status, headers, body = responses.next()
        assert (headers["transfer-encoding"], headers["connection"], body) == (
            "chunked", "keep-alive", b"one,two")
        status, headers, body = responses.next("HEAD")
        assert status == 200 and body == b"" and "transfer-encoding" not in headers
    with connect(echo) as s:
        s.sendall(b"GET /stream HTTP/1.0\r\n\r\n")
        head, rest = read_head(s)
        while chunk := s.recv(4096):
            rest += chunk
    assert b"Connection: close" in head and b"Transfer-Encoding" not in head and rest == b"one,two"


HOOKS = """
def pre_request(worker, req):
    with open("hooks.log", "a") as log:
        log.write("pre %s %s\\n" % (req.method, req.path))

def post_request(worker, req, environ, resp):
    with open("hooks.log", "a") as log:
        log.write("post %s %s\\n" % (environ["PATH_INFO"], resp.status))
"""


def test_a_configs_pre_and_post_request_hooks_run_around_every_request(tmp_path):
    """The worker skips gunicorn's default hooks (they do nothing below debug level), never a
    config's own."""
    (tmp_path / "hooks.py").write_text(HOOKS)
    for port in _echo(tmp_path, "-c", "hooks.py"):
        with connect(port) as s:
            s.sendall(b"GET /one HTTP/1.1\r\nHost: t\r\n\r\nHEAD /two HTTP/1.1\r\nHost: t\r\n\r\n")
            responses = Responses(s)
            assert responses.next()[0] == 200 and responses.next("HEAD")[0] == 200
        wait_until(lambda: (tmp_path / "hooks.log").read_text().count("\n") == 4, timeout=10,
                   message="the hooks' four lines")
    assert (tmp_path / "hooks.log").read_text().splitlines() == [
        "pre GET /one", "post /one 200 OK", "pre HEAD /two", "post /two 200 OK"]


def test_a_unix_socket_listener_is_served_with_a_local_remote_addr(tmp_path):
    (tmp_path / "echo.py").write_text(ECHO_APP)
    path = tmp_path / "w.sock"
    proc = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "-k", "fileapp.worker.GowsThreadWorker",
         "-b", f"unix:{path}", "--log-level", "warning", "echo:app"],
        env=python_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path)
    try:
        wait_until(path.exists, timeout=30, message="the unix socket")
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(10)
            wait_until(lambda: s.connect_ex(str(path)) == 0, timeout=30, message="a connection")
            s.sendall(b"GET /x HTTP/1.1\r\nHost: node.test:81\r\n\r\n" * 2)
            responses = Responses(s)
            envs = [json.loads(responses.next()[2]) for _ in range(2)]
    finally:
        stop_process(proc)
    assert envs[0] == envs[1]
    assert (envs[0]["REMOTE_ADDR"], envs[0]["SERVER_NAME"], envs[0]["SERVER_PORT"]) == (
        "127.0.0.1", "node.test", "81")


def test_the_proxy_protocol_is_honoured_by_gthreads_own_loop(tmp_path):
    # (gows' request path does not read PROXY lines: with --proxy-protocol the worker runs gthread's)
    for port in _echo(tmp_path, "--proxy-protocol", "--proxy-allow-from", "127.0.0.1"):
        status, _, body = answer(port, b"PROXY TCP4 198.18.0.7 198.18.0.1 4711 80\r\n"
                                       b"GET /env HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        assert status == 200 and json.loads(body)["REMOTE_ADDR"] == "198.18.0.7"
