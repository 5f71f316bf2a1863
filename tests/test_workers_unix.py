"""The proxies reach local workers over a Unix socket the master binds for each worker (health
checks stay on TCP): the master's private runtime directory, the worker serving the inherited
Unix socket, the proxy's pool connecting over it, and the socket outliving worker restarts."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from arbiter.config import ProxyConfig, configured, load_data
from arbiter.proxy.view import MirrorTable, rows
from arbiter.sockets import UNIX_PATH_MAX, RuntimeDir
from arbiter.state import WorkerState, WorkerTable
from arbiter.worker_command import WorkerOptions, worker_argv
from fileapp.__main__ import make_parser
from master_support import Master, serving
from proxy_harness import NO_CACHE, ProxyThread, raw
from support import free_port, pid_alive, python_env, stop_process, wait_until

REQUEST = b"GET /a.txt HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"


def _read_to_end(s: socket.socket) -> bytes:
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    return data


# -- the master's runtime directory (unit) --------------------------------------------------

@pytest.mark.unit
def test_runtime_dir_is_private_and_its_sockets_listen_and_are_removed(run, monkeypatch):
    tmp_path = run  # (short enough for a socket path: sun_path's 108 bytes)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    runtime = RuntimeDir.create()
    try:
        assert Path(runtime.path).parent == tmp_path
        assert stat.S_IMODE(os.stat(runtime.path).st_mode) == 0o700  # only our user may connect
        first, second = runtime.bind(9001), runtime.bind(9001)  # a retired slot's may still drain
        assert first.path != second.path
        for unix in (first, second):
            assert stat.S_ISSOCK(os.stat(unix.path).st_mode)
            assert unix.sock.family == socket.AF_UNIX
            assert unix.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
        with socket.socket(socket.AF_UNIX) as client:
            client.connect(first.path)  # queued in its backlog
        first.close()
        assert not os.path.exists(first.path) and os.path.exists(second.path)
    finally:
        runtime.remove()
    assert not os.path.exists(runtime.path)


@pytest.mark.unit
def test_a_new_runtime_dir_removes_those_of_masters_that_are_gone(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    gone = subprocess.Popen(["true"])
    gone.wait()  # a pid that no longer exists
    stale = tmp_path / f"gows-{gone.pid}-abc123"
    stale.mkdir(mode=0o700)
    (stale / "worker-9001-1.sock").touch()
    live = tmp_path / f"gows-{os.getppid()}-def456"  # a master still running (our parent stands in)
    live.mkdir(mode=0o700)
    other = tmp_path / "gows-notapid"
    other.mkdir()
    runtime = RuntimeDir.create()
    try:
        assert Path(runtime.path).name.startswith(f"gows-{os.getpid()}-")
        assert not stale.exists() and live.exists() and other.exists()
    finally:
        runtime.remove()


@pytest.mark.unit
def test_runtime_dir_falls_back_to_the_temp_dir_when_xdg_runtime_dir_is_unusable(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "missing"))
    runtime = RuntimeDir.create()
    try:
        assert os.path.isdir(runtime.path) and not runtime.path.startswith(str(tmp_path))
    finally:
        runtime.remove()


@pytest.mark.unit
def test_a_socket_path_too_long_for_sun_path_means_tcp_not_an_error(tmp_path):
    deep = tmp_path / ("d" * (UNIX_PATH_MAX - len(str(tmp_path))))
    deep.mkdir()
    assert RuntimeDir(str(deep)).bind(9001) is None
    assert list(deep.iterdir()) == []


@pytest.mark.unit
def test_the_worker_gets_its_unix_socket_on_the_command_line(tmp_path):
    (tmp_path / "www").mkdir()
    opts = WorkerOptions.from_config(load_data({"baseDirectory": "www", "workerCount": 1},
                                               tmp_path / "gows.conf.json"))
    args = make_parser().parse_args(worker_argv(opts, 5, "127.0.0.1", 9001, 6)[3:])
    assert (args.fd, args.unix_fd) == (5, 6)
    assert "--unix-fd" not in worker_argv(opts, 5, "127.0.0.1", 9001)


@pytest.mark.unit
def test_the_proxies_copy_of_the_table_carries_each_workers_unix_socket():
    table = WorkerTable()
    table.add(WorkerState("127.0.0.1", 9001, unix_path="/run/gows-x/worker-9001-1.sock"))
    table.add(WorkerState("10.0.0.2", 9001, local=False))
    mirror = MirrorTable(lambda w, error: None)
    mirror.apply(rows(table))
    assert mirror.get("127.0.0.1", 9001).unix_path == "/run/gows-x/worker-9001-1.sock"
    assert mirror.get("10.0.0.2", 9001).unix_path is None  # remote: TCP


# -- the proxy's pool over a Unix socket (unit: an in-process proxy) ----------------------------

class UnixUpstream:
    """A Unix-socket HTTP server thread answering every request with `body`, counting its peers'
    address families; with `patience`, it closes a connection no request arrives on within that
    many seconds (as gows' workers do after READ_TIMEOUT)."""

    def __init__(self, path: str, body: bytes, patience: float | None = None) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.bind(path)
        self.sock.listen(16)
        self.body = body
        self.patience = patience
        self.families: list[int] = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                self.families.append(conn.family)
                conn.settimeout(self.patience)
                head = b""
                try:
                    while b"\r\n\r\n" not in head and (chunk := conn.recv(4096)):
                        head += chunk
                except TimeoutError:
                    continue  # closed unanswered
                if head:
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
                                 % (len(self.body), self.body))

    def close(self) -> None:
        self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self.thread.join(5)


@pytest.mark.unit
def test_the_proxy_reaches_a_worker_with_a_unix_socket_over_it_not_over_tcp(tmp_path):
    upstream = UnixUpstream(str(tmp_path / "w.sock"), b"over unix")
    dead_port = free_port()  # nothing listens on the worker's TCP port
    try:
        with ProxyThread([dead_port], front_cache=NO_CACHE) as p:
            p.call(lambda: setattr(p.worker(dead_port), "unix_path", str(tmp_path / "w.sock")))
            for _ in range(3):
                response = raw(p.port, REQUEST)
                assert response.startswith(b"HTTP/1.1 200") and response.endswith(b"over unix")
            assert upstream.families == [socket.AF_UNIX] * 3
            assert p.worker(dead_port).up and not p.worker(dead_port).passive_failure_times
    finally:
        upstream.close()


@pytest.mark.unit
def test_a_full_unix_backlog_is_the_workers_failure_like_a_tcp_connect_timeout(tmp_path):
    path = str(tmp_path / "full.sock")
    with socket.socket(socket.AF_UNIX) as stuck:  # listens, never accepts
        stuck.bind(path)
        stuck.listen(0)
        fillers = []
        try:
            while True:  # a Unix connect fails with EAGAIN at once when the backlog is full
                filler = socket.socket(socket.AF_UNIX)
                filler.setblocking(False)
                fillers.append(filler)
                filler.connect(path)
        except BlockingIOError:
            pass
        try:
            port = free_port()
            with ProxyThread([port], front_cache=NO_CACHE) as p:
                p.call(lambda: setattr(p.worker(port), "unix_path", path))
                response = raw(p.port, REQUEST)
                assert response.startswith(b"HTTP/1.1 504"), response[:100]
                assert "backlog is full" in p.worker(port).last_error
                assert p.worker(port).passive_failure_times
        finally:
            for filler in fillers:
                filler.close()


# -- fileapp serving an inherited Unix socket (integration) ---------------------------------

@pytest.mark.integration
def test_fileapp_serves_its_inherited_unix_socket_and_hands_it_to_the_next_process(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"hello over unix\n")
    tcp = socket.create_server(("127.0.0.1", 0))
    unix = socket.socket(socket.AF_UNIX)
    unix.bind(str(tmp_path / "w.sock"))
    unix.listen(64)
    fds = [tcp.fileno(), unix.fileno()]
    argv = [sys.executable, "-m", "fileapp", "--root", str(tmp_path), "--fd", str(tcp.fileno()),
            "--unix-fd", str(unix.fileno())]

    def start() -> subprocess.Popen:
        return subprocess.Popen(argv, env=python_env(), pass_fds=fds, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)

    def ask() -> bytes:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(30)
            s.connect(str(tmp_path / "w.sock"))
            s.sendall(REQUEST)
            return _read_to_end(s)

    try:
        first = start()
        try:
            # Its REMOTE_ADDR is "" (a Unix peer has no address): served all the same.
            wait_until(lambda: ask().startswith(b"HTTP/1.1 200"), timeout=20, message="worker up")
            assert ask().endswith(b"\r\n\r\nhello over unix\n")
        finally:
            stop_process(first)
        assert first.returncode == 0
        with socket.socket(socket.AF_UNIX) as waiting:  # queued between two incarnations ...
            waiting.settimeout(30)
            waiting.connect(str(tmp_path / "w.sock"))
            waiting.sendall(REQUEST)
            second = start()  # ... and answered by the next one, on the same socket
            try:
                response = _read_to_end(waiting)
                assert response.startswith(b"HTTP/1.1 200") and response.endswith(b"hello over unix\n")
            finally:
                stop_process(second)
    finally:
        tcp.close()
        unix.close()


# -- through the master (integration) -----------------------------------------------------

def _socket_inodes(pid: int) -> set[int]:
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(int(link[8:-1]))
    return inodes


def _connected_unix_paths(pid: int) -> list[str]:
    """The bound paths of `pid`'s connected Unix sockets (an accepted one carries its listener's)."""
    mine = _socket_inodes(pid)
    found = []
    with open("/proc/net/unix") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            if len(fields) >= 8 and fields[5] == "03" and int(fields[6]) in mine:
                found.append(fields[7])
    return found


def _tcp_peers(pid: int) -> list[int]:
    """Remote ports of `pid`'s established TCP connections."""
    mine = _socket_inodes(pid)
    ports = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if fields[3] == "01" and int(fields[9]) in mine:
                    ports.append(int(fields[2].rsplit(":", 1)[1], 16))
    return ports


@pytest.fixture
def run():
    """A short $XDG_RUNTIME_DIR for a master: pytest's tmp_path can be too long for a socket
    path (sun_path's 108 bytes), and the master would then fall back to TCP."""
    path = Path(tempfile.mkdtemp(prefix="gows-test-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _master(tmp_path: Path, run: Path, workers: int, **extra) -> Master:
    site = tmp_path / "site"
    site.mkdir()
    (site / "a.txt").write_bytes(b"hello over unix\n")
    return serving(tmp_path, site, workers, env={"XDG_RUNTIME_DIR": str(run)}, frontCache={"enabled": False},
                   **extra)


def _sockets(run: Path) -> dict[int, Path]:
    """{worker port: its Unix socket} in the master's runtime directory under `run`."""
    (runtime,) = run.iterdir()
    return {int(p.name.split("-")[1]): p for p in runtime.iterdir()}


@pytest.mark.integration
def test_the_proxies_reach_local_workers_over_their_unix_sockets_and_exit_removes_them(tmp_path, run):
    m = _master(tmp_path, run, 2, proxy={"balance": "round-robin"})  # (both workers take requests)
    with m:
        (runtime,) = run.iterdir()
        assert stat.S_IMODE(runtime.stat().st_mode) == 0o700
        sockets = _sockets(run)
        assert sorted(sockets) == sorted(m.worker_ports)
        workers, proxies = m.workers(), m.proxies()
        done = threading.Event()

        def load() -> None:  # keep-alive clients, so that pooled upstream connections stay open
            clients = [socket.create_connection(("127.0.0.1", m.port), timeout=10) for _ in range(8)]
            try:
                while not done.is_set():
                    for c in clients:
                        c.sendall(b"GET /a.txt HTTP/1.1\r\nHost: t\r\n\r\n")
                    for c in clients:
                        data = b""
                        while not data.endswith(b"hello over unix\n"):
                            data += c.recv(65536)
                        assert data.startswith(b"HTTP/1.1 200")
            finally:
                for c in clients:
                    c.close()

        thread = threading.Thread(target=load, daemon=True)
        thread.start()
        try:
            for port, pid in workers.items():
                wait_until(lambda: str(sockets[port]) in _connected_unix_paths(pid), timeout=20,
                           message=f"a connection on worker {port}'s Unix socket")
            for pid in proxies.values():  # and none to a worker's TCP port
                assert not set(_tcp_peers(pid)) & set(m.worker_ports)
        finally:
            done.set()
            thread.join(20)
        m.signal(signal.SIGTTOU)  # a retired worker's socket goes with it
        m.wait_log("SIGTTOU: stopping worker")
        highest = max(m.worker_ports)
        wait_until(lambda: not sockets[highest].exists(), timeout=20, message="retired worker's socket removed")
        assert sockets[min(m.worker_ports)].exists()
        m.signal(signal.SIGTERM)
        assert m.proc.wait(30) == 0
    assert list(run.iterdir()) == []


@pytest.mark.integration
def test_a_restarted_worker_keeps_serving_the_same_unix_socket_and_its_queued_connections(tmp_path, run):
    m = _master(tmp_path, run, 1)
    with m:
        (port,) = m.worker_ports
        (path,) = _sockets(run).values()
        old = m.workers()[port]
        os.kill(old, signal.SIGSTOP)  # it accepts nothing more ...
        with socket.socket(socket.AF_UNIX) as waiting:
            waiting.settimeout(30)
            waiting.connect(str(path))  # ... so this waits in the socket's backlog
            waiting.sendall(REQUEST)
            os.kill(old, signal.SIGKILL)
            response = _read_to_end(waiting)  # answered by the next incarnation
        assert response.startswith(b"HTTP/1.1 200") and response.endswith(b"hello over unix\n")
        new = m.wait_workers([port])[port]
        assert new != old and not pid_alive(old)
        assert _sockets(run) == {port: path}
        wait_until(lambda: raw(m.port, REQUEST).endswith(b"hello over unix\n"), timeout=20,
                   message="served through the master by the new incarnation")


@pytest.mark.integration
def test_a_reloaded_worker_gets_a_socket_of_its_own_and_the_old_one_goes_with_the_old_process(tmp_path, run):
    """After a reload's handover no new connection can reach the old process: the proxies move
    to the new incarnation's own socket (on a shared one the old process, resumed before it
    handles SIGTERM, could still accept one and answer with the old settings)."""
    m = _master(tmp_path, run, 1)
    with m:
        (port,) = m.worker_ports
        (before,) = _sockets(run).values()
        old = m.workers()[port]
        new_site = tmp_path / "new"
        new_site.mkdir()
        (new_site / "a.txt").write_bytes(b"the new site\n")
        m.write_config(dict(m.config, baseDirectory=str(new_site)))
        m.signal(signal.SIGHUP)
        m.wait_log("reload done")
        assert raw(m.port, REQUEST).endswith(b"the new site\n")  # at once: never the old process
        wait_until(lambda: not pid_alive(old), timeout=20, message="the old process gone")
        wait_until(lambda: not before.exists(), timeout=10, message="its socket removed")
        (after,) = _sockets(run).values()
        assert after != before


@pytest.mark.unit
def test_a_connect_the_proxys_busy_loop_saw_late_is_not_charged_to_the_worker(tmp_path):
    """A proxy starved of CPU (100 workers on 2 cores) stalls past connectTimeout between
    starting a connect and reading its completion; uvloop runs the expired timer first. The
    connect succeeded: the request is answered and the worker is not blamed."""
    upstream = UnixUpstream(str(tmp_path / "w.sock"), b"late but fine")
    port = free_port()
    try:
        with ProxyThread([port], proxy=configured(ProxyConfig, connectTimeout=0.2), front_cache=NO_CACHE) as p:
            p.call(lambda: setattr(p.worker(port), "unix_path", str(tmp_path / "w.sock")))
            spawn = p.proxy.spawn

            def spawn_then_stall(coro):  # the loop is kept busy right after a connect begins
                spawn(coro)
                p.loop.call_soon(time.sleep, 0.5)

            p.proxy.spawn = spawn_then_stall
            response = raw(p.port, REQUEST)
            assert response.startswith(b"HTTP/1.1 200") and response.endswith(b"late but fine"), response[:100]
            worker = p.worker(port)
            assert worker.up and not worker.passive_failure_times, worker.last_error
    finally:
        upstream.close()


@pytest.mark.unit
def test_a_new_connection_the_proxy_left_unused_too_long_is_not_charged_to_the_worker(tmp_path, monkeypatch):
    """A proxy that lags (starved of CPU) between making a connection and sending on it can find
    it closed by the worker's read timeout: the wait was the proxy's, so the request is retried
    on a fresh connection and the worker is not blamed."""
    from arbiter.proxy.upstream import UpstreamConnection

    upstream = UnixUpstream(str(tmp_path / "w.sock"), b"second try", patience=0.2)
    made = UpstreamConnection.connection_made
    stalls = []

    def made_then_lag(self, transport):  # the first connection waits 1.5 s before it is used
        made(self, transport)
        if not stalls:
            stalls.append(self)
            time.sleep(1.5)

    monkeypatch.setattr(UpstreamConnection, "connection_made", made_then_lag)
    port = free_port()
    try:
        with ProxyThread([port], front_cache=NO_CACHE) as p:
            p.call(lambda: setattr(p.worker(port), "unix_path", str(tmp_path / "w.sock")))
            response = raw(p.port, REQUEST)
            assert stalls, "the lag was never injected"
            assert response.startswith(b"HTTP/1.1 200") and response.endswith(b"second try"), response[:100]
            worker = p.worker(port)
            assert worker.up and not worker.passive_failure_times, worker.last_error
    finally:
        upstream.close()
