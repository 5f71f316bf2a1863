"""`python -m fileapp` as a process: argument errors, serving, SIGTERM draining, fast quit,
inherited listening sockets (--fd) and parent watching (--parent-pid)."""
from __future__ import annotations

import datetime
import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request

import pytest

from e2e_support import Responses, digest_to_end
from support import (
    free_port, pid_alive, python_env, stop_process, wait_for_port, wait_until,
)

pytestmark = pytest.mark.integration

BIG_SIZE = 48 * 1024 * 1024


@pytest.fixture
def root(tmp_path):
    r = tmp_path / "site"
    r.mkdir()
    (r / "index.html").write_bytes(b"<p>hi</p>")
    (r / "hello.txt").write_bytes(b"hello\n")
    return r


@pytest.fixture
def big_root(root):
    block = hashlib.sha256(b"gows").digest() * 2048  # 64 KiB
    with open(root / "big.bin", "wb") as f:
        for _ in range(BIG_SIZE // len(block)):
            f.write(block)
    return root


def fileapp_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "fileapp", *args]


def start(root, *args: str, port: int | None = None, pass_fds=(),
          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) -> tuple[subprocess.Popen, int]:
    port = port or free_port()
    proc = subprocess.Popen(
        fileapp_cmd("--root", str(root), "--port", str(port), *args), env=python_env(),
        stdout=stdout, stderr=stderr, pass_fds=pass_fds)
    return proc, port


def get(port: int, path: str, timeout: float = 10) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def run_briefly(args: list[str], pass_fds=()) -> subprocess.CompletedProcess:
    return subprocess.run(fileapp_cmd(*args), env=python_env(), capture_output=True, text=True,
                          timeout=60, pass_fds=pass_fds)


def assert_usage_error(result: subprocess.CompletedProcess, needle: str) -> None:
    assert result.returncode == 2, result.stderr
    err = result.stderr.strip()
    assert "Traceback" not in err
    assert "\n" not in err, err  # exactly one line
    assert err.startswith("fileapp: error:")
    assert needle in err, err


@pytest.mark.parametrize("args, needle", [
    ([], "--root"),
    (["--root", "{missing}"], "does not exist"),
    (["--root", "{file}"], "not a directory"),
    (["--root", "{root}", "--port", "abc"], "--port"),
    (["--root", "{root}", "--port", "70000"], "--port"),
    (["--root", "{root}", "--port", "-1"], "--port"),
    (["--root", "{root}", "--threads", "0"], "--threads"),
    (["--root", "{root}", "--threads", "many"], "--threads"),
    (["--root", "{root}", "--cache-ttl", "-1"], "--cache-ttl"),
    (["--root", "{root}", "--cache-ttl", "nan"], "--cache-ttl"),
    (["--root", "{root}", "--graceful-timeout", "inf"], "--graceful-timeout"),
    (["--root", "{root}", "--cache-max-bytes", "1.5"], "--cache-max-bytes"),
    (["--root", "{root}", "--cache-max-file-size", "-5"], "--cache-max-file-size"),
    (["--root", "{root}", "--graceful-timeout", "soon"], "--graceful-timeout"),
    (["--root", "{root}", "--keepalive", "-3"], "--keepalive"),
    (["--root", "{root}", "--fd", "987"], "--fd 987"),
    (["--root", "{root}", "--fd", "x"], "--fd"),
    (["--root", "{root}", "--fd", "2147483648"], "--fd"),  # past a C int: no descriptor is
    (["--root", "{root}", "--unix-fd", "4294967296"], "--unix-fd"),
    (["--root", "{root}", "--write-timeout", "1e19"], "--write-timeout"),  # past a timeval
    (["--root", "{root}", "--parent-pid", "0"], "--parent-pid"),
    (["--root", "{root}", "--parent-pid", "{dead_pid}"], "no such process"),
    (["--root", "{root}", "--health-path", "health"], "--health-path"),
    (["--root", "{root}", "--health-path", "/health?full=1"], "--health-path"),  # never a path read
    (["--root", "{root}", "--log-level", "loud"], "--log-level"),
    (["--root", "{root}", "--log-format", "xml"], "--log-format"),
    (["--root", "{root}", "--compress", "maybe"], "--compress"),
    (["--root", "{root}", "--bogus"], "--bogus"),
    (["--root", "{root}", "--host", "203.0.113.7"], "cannot listen"),
    (["--root", "{root}", "--fallback", ".env"], "fallback: '.env' is not a file fileapp would serve"),
    (["--root", "{root}", "--error-pages", '{{"200": "ok.html"}}'], "errorPages.200: keys must be 4xx or 5xx"),
    (["--root", "{root}", "--error-pages", "{{"], "--error-pages"),
    (["--root", "{root}", "--headers", '[{{"match": "/*", "set": {{"Connection": "close"}}}}]'],
     "headers[0].set.Connection: hop-by-hop, framing and computed headers cannot be set"),
])
def test_bad_arguments_exit_2_with_one_line(root, tmp_path, args, needle):
    (tmp_path / "file.txt").write_text("x")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    values = {"root": str(root), "missing": str(tmp_path / "nope"),
              "file": str(tmp_path / "file.txt"), "dead_pid": str(dead.pid)}
    assert_usage_error(run_briefly([a.format(**values) for a in args]), needle)


def test_fd_that_is_not_a_listening_tcp_socket(root, tmp_path):
    with open(tmp_path / "plain", "w") as f:
        assert_usage_error(run_briefly(["--root", str(root), "--fd", str(f.fileno())],
                                       pass_fds=[f.fileno()]), "not a socket")
    with socket.socket() as s:  # a TCP socket, but not listening
        assert_usage_error(run_briefly(["--root", str(root), "--fd", str(s.fileno())],
                                       pass_fds=[s.fileno()]), "not a listening TCP socket")
    a, b = socket.socketpair()
    with a, b:
        assert_usage_error(run_briefly(["--root", str(root), "--fd", str(a.fileno())],
                                       pass_fds=[a.fileno()]), "not a listening TCP socket")


def test_port_in_use_exits_2(root):
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        assert_usage_error(run_briefly(["--root", str(root), "--port", str(port)]), "in use")


def test_serves_files_health_and_sets_process_title(root):
    proc, port = start(root, "--threads", "2", "--access-log", stdout=subprocess.PIPE)
    try:
        wait_for_port(port, timeout=20)
        assert get(port, "/hello.txt") == (200, b"hello\n")
        assert get(port, "/") == (200, b"<p>hi</p>")
        assert get(port, "/healthcheck") == (200, b"ok")
        assert get(port, "/nope")[0] == 404
        with open(f"/proc/{proc.pid}/cmdline", "rb") as f:
            assert f.read().startswith(f"gows: worker :{port}".encode())
    finally:
        stop_process(proc)
    assert proc.returncode == 0
    log = proc.stdout.read().decode()
    assert '"GET /hello.txt HTTP/1.1" 200' in log  # --access-log


def serve_briefly(root, *args: str) -> tuple[subprocess.Popen, int, list[str], list[str]]:
    """Start a worker with the access log on, GET /hello.txt, stop it; (process, port, stderr
    lines, stdout lines)."""
    proc, port = start(root, "--access-log", *args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_for_port(port, timeout=20)
        assert get(port, "/hello.txt") == (200, b"hello\n")
    finally:
        stop_process(proc)
    return proc, port, proc.stderr.read().decode().splitlines(), proc.stdout.read().decode().splitlines()


def test_logs_every_line_in_the_masters_format_with_the_workers_port(root):
    (root / "healthcheck").write_text("shadowed")  # the app's own warning at start
    proc, port, errors, access = serve_briefly(root)
    shape = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} \[(\d+)\] \[[A-Z]+\] ([\w.]+):(\d+): .*"
    for line in errors + access:
        match = re.fullmatch(shape, line)
        assert match and (int(match[1]), int(match[3])) == (proc.pid, port), line
    assert any(f"[WARNING] fileapp:{port}: the health path /healthcheck shadows" in line for line in errors), errors
    assert any(f"[INFO] gows.worker:{port}: fileapp worker {proc.pid} serving" in line for line in errors), errors
    assert any(f"[INFO] gows.worker.access:{port}: " in line and '"GET /hello.txt HTTP/1.1" 200' in line
               for line in access), access


def test_log_format_json_writes_one_object_per_line(root):
    (root / "healthcheck").write_text("shadowed")
    proc, port, errors, access = serve_briefly(root, "--log-format", "json")
    entries = [json.loads(line) for line in errors + access]
    for entry in entries:
        assert list(entry) == ["time", "pid", "level", "logger", "port", "message"], entry
        assert (entry["pid"], entry["port"]) == (proc.pid, port)
        assert datetime.datetime.fromisoformat(entry["time"]).tzinfo is not None
    seen = {(e["level"], e["logger"], e["message"].split(" ")[0]) for e in entries}
    assert {("WARNING", "fileapp", "the"), ("INFO", "gows.worker", "fileapp")} <= seen, seen
    assert any(e["logger"] == "gows.worker.access" and '"GET /hello.txt HTTP/1.1" 200' in e["message"]
               for e in entries), entries


def test_health_is_503_when_the_root_disappears(root, tmp_path):
    proc, port = start(root)
    try:
        wait_for_port(port, timeout=20)
        assert get(port, "/healthcheck")[0] == 200
        root.rename(tmp_path / "gone")
        assert get(port, "/healthcheck")[0] == 503
        (tmp_path / "gone").rename(root)
        assert get(port, "/healthcheck")[0] == 200
    finally:
        stop_process(proc)


def test_standalone_worker_survives_its_launcher(root):
    """Without --parent-pid the worker outlives the shell (or script) that started it."""
    port = free_port()
    launcher = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(f"""
            import subprocess, sys
            p = subprocess.Popen({fileapp_cmd('--root', str(root), '--port', str(port))!r},
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            print(p.pid)
        """)], env=python_env(), capture_output=True, text=True, timeout=30)
    worker = int(launcher.stdout)
    try:
        wait_for_port(port, timeout=20)
        time.sleep(1.5)  # more than one parent-check tick of the run loop
        assert pid_alive(worker)
        assert get(port, "/hello.txt") == (200, b"hello\n")
    finally:
        if pid_alive(worker):
            os.kill(worker, signal.SIGTERM)
            wait_until(lambda: not pid_alive(worker), timeout=20, message="worker exit")


def _start_download(port: int, path: str) -> socket.socket:
    """A client that asks for a large file and then reads nothing for now."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.settimeout(30)
    s.connect(("127.0.0.1", port))
    s.sendall(f"GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        head += s.recv(1)
    assert head.startswith(b"HTTP/1.1 200")
    return s


def _keepalive_request(responses: Responses, path: str) -> tuple[int, dict[str, str], bytes]:
    responses.sock.sendall(f"GET {path} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
    return responses.next()


def test_sigterm_drains_in_flight_download_and_exits_0(big_root):
    proc, port = start(big_root, "--graceful-timeout", "60", "--keepalive", "30")
    try:
        wait_for_port(port, timeout=20)
        idle = socket.create_connection(("127.0.0.1", port), timeout=30)
        on_idle = Responses(idle)
        assert _keepalive_request(on_idle, "/healthcheck")[0] == 200
        download = _start_download(port, "/big.bin")
        time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        # Draining: the health check on the kept-alive connection now fails. A serving thread
        # may answer one request that raced the signal before the main thread has run its
        # handler: that one is still a healthy 200 that keeps the connection.
        status, headers, body = _keepalive_request(on_idle, "/healthcheck")
        if status == 200:
            assert headers["connection"] == "keep-alive"
            time.sleep(0.2)
            status, headers, body = _keepalive_request(on_idle, "/healthcheck")
        assert status == 503, (status, headers)
        assert body.endswith(b"draining")
        idle.close()
        # ... while the stalled download still holds the worker open ...
        time.sleep(1.0)
        assert proc.poll() is None
        # ... and completes in full.
        total, digest = digest_to_end(download)
        download.close()
        expected = hashlib.sha256((big_root / "big.bin").read_bytes()).hexdigest()
        assert (total, digest) == (BIG_SIZE, expected)
        assert proc.wait(30) == 0
    finally:
        stop_process(proc)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGQUIT])
def test_sigint_and_sigquit_exit_fast_despite_in_flight_requests(big_root, sig):
    proc, port = start(big_root, "--graceful-timeout", "60")
    try:
        wait_for_port(port, timeout=20)
        download = _start_download(port, "/big.bin")
        time.sleep(0.3)
        proc.send_signal(sig)
        assert proc.wait(10) == 0  # far less than the 60 s a drain would be allowed
        total, _ = digest_to_end(download)
        assert total < BIG_SIZE
        download.close()
    finally:
        stop_process(proc)


def test_fd_mode_serves_on_the_inherited_socket_and_hands_it_over(root):
    listener = socket.create_server(("127.0.0.1", 0), backlog=64)
    port = listener.getsockname()[1]
    fd = str(listener.fileno())
    try:
        # The port is already bound (by us): a worker that tried to bind it would exit 2.
        first, _ = start(root, "--fd", fd, port=port, pass_fds=[listener.fileno()])
        try:
            wait_until(lambda: get(port, "/healthcheck", timeout=2)[0] == 200, timeout=20,
                       message="first worker up")
            assert get(port, "/hello.txt") == (200, b"hello\n")
        finally:
            stop_process(first)
        assert first.returncode == 0
        # Between incarnations the kernel queues connections on the socket we still hold ...
        waiting = socket.create_connection(("127.0.0.1", port), timeout=30)
        waiting.sendall(b"GET /hello.txt HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        # ... and the next worker on the same fd answers them.
        second, _ = start(root, "--fd", fd, port=port, pass_fds=[listener.fileno()])
        try:
            response = b""
            while chunk := waiting.recv(4096):
                response += chunk
            assert response.startswith(b"HTTP/1.1 200") and response.endswith(b"hello\n")
        finally:
            waiting.close()
            stop_process(second)
        assert second.returncode == 0
    finally:
        listener.close()


def test_fd_mode_names_the_inherited_sockets_port_not_the_default(root):
    listener = socket.create_server(("127.0.0.1", 0), backlog=64)
    port = listener.getsockname()[1]
    proc = subprocess.Popen(fileapp_cmd("--root", str(root), "--fd", str(listener.fileno())),
                            env=python_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            pass_fds=[listener.fileno()])
    try:
        wait_until(lambda: get(port, "/healthcheck", timeout=2)[0] == 200, timeout=20,
                   message="worker up")
        with open(f"/proc/{proc.pid}/cmdline", "rb") as f:
            assert f.read().split(b"\0")[0] == f"gows: worker :{port}".encode()
    finally:
        stop_process(proc)
        listener.close()
    log = proc.stderr.read().decode()
    assert f"at http://127.0.0.1:{port} " in log, log
    assert ":8000" not in log, log


def test_parent_pid_worker_exits_when_its_parent_is_killed(root):
    port = free_port()
    parent = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import os, subprocess, sys, time
            cmd = {fileapp_cmd('--root', str(root), '--port', str(port))!r}
            p = subprocess.Popen(cmd + ["--parent-pid", str(os.getpid())],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            print(p.pid, flush=True)
            time.sleep(120)
        """)], env=python_env(), stdout=subprocess.PIPE, text=True)
    worker = int(parent.stdout.readline())
    try:
        wait_for_port(port, timeout=20)
        assert get(port, "/hello.txt") == (200, b"hello\n")
        parent.kill()
        parent.wait(10)
        killed_at = time.monotonic()
        wait_until(lambda: not pid_alive(worker), timeout=30, interval=0.02,
                   message="worker gone after its parent was killed")
        print(f"worker gone {time.monotonic() - killed_at:.2f}s after its parent")
    finally:
        stop_process(parent)
        if pid_alive(worker):
            os.kill(worker, signal.SIGKILL)


def test_parent_pid_that_is_not_the_direct_parent(root):
    """--parent-pid names a process other than our parent: watched by pidfd / periodic check."""
    watched = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    proc, port = start(root, "--parent-pid", str(watched.pid))
    try:
        wait_for_port(port, timeout=20)
        time.sleep(1.2)
        assert proc.poll() is None  # alive while the watched process is
        watched.kill()
        watched.wait(10)
        assert proc.wait(30) == 0
    finally:
        stop_process(watched)
        stop_process(proc)


def test_an_idle_worker_sleeps_long_only_while_something_else_watches_for_it():
    """With no connection, the main thread sleeps up to IDLE_SWEEP_INTERVAL: a pidfd reports the
    parent's death; without one (an old kernel) it looks in /proc every second still; under
    gunicorn's arbiter it touches its heartbeat within the time it was given (0: none)."""
    from fileapp.standalone import PARENT_CHECK_INTERVAL, FileAppWorker
    from fileapp.worker import IDLE_SWEEP_INTERVAL, GowsThreadWorker

    standalone = FileAppWorker.__new__(FileAppWorker)
    standalone.parent_pid, standalone._pidfd = os.getpid(), None
    assert standalone.idle_wake_interval() == PARENT_CHECK_INTERVAL
    standalone._pidfd = 3
    assert standalone.idle_wake_interval() == IDLE_SWEEP_INTERVAL
    standalone.parent_pid, standalone._pidfd = None, None  # nothing to watch
    assert standalone.idle_wake_interval() == IDLE_SWEEP_INTERVAL
    under_gunicorn = GowsThreadWorker.__new__(GowsThreadWorker)
    under_gunicorn.timeout = 15.0  # (gunicorn passes half its timeout)
    assert under_gunicorn.idle_wake_interval() == 15.0
    under_gunicorn.timeout = 0  # no heartbeat watched
    assert under_gunicorn.idle_wake_interval() == IDLE_SWEEP_INTERVAL


def test_sigterm_right_after_start_still_exits_0(root):
    """However early the stop request lands (before or after the worker is up), exit is clean."""
    for delay in (0.0, 0.2):
        proc, port = start(root)
        try:
            wait_for_port(port, timeout=20)
            time.sleep(delay)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(20) == 0
        finally:
            stop_process(proc)
