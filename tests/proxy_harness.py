"""Test harness for the front proxy: real gunicorn workers on ephemeral ports, and the Proxy
running on its own uvloop (in a thread of the test process, or as a separate process when a
test measures the proxy's memory)."""
from __future__ import annotations

import asyncio
import concurrent.futures
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS.parent))

import uvloop  # noqa: E402

from arbiter.config import FrontCacheConfig, ProxyConfig, WorkerCacheConfig, configured  # noqa: E402
from arbiter.proxy import Proxy  # noqa: E402
from arbiter.state import WorkerState, WorkerTable  # noqa: E402
from support import PYTHON, StoppedOnExit, children, free_port, python_env, stop_process, wait_for_port  # noqa: E402

NO_CACHE = configured(FrontCacheConfig, enabled=False)  # the front cache off: every request reaches a worker


class Worker(StoppedOnExit):
    """A gunicorn gthread worker serving tests/proxy_upstream_app.py on its own port."""

    def __init__(self, threads: int = 8, keepalive: int = 2) -> None:
        self.port = free_port()
        self.threads = threads
        self.keepalive = keepalive
        self.proc: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        env = python_env()
        env["WORKER_PORT"] = str(self.port)
        self.proc = subprocess.Popen(
            [PYTHON, "-m", "gunicorn", "-k", "gthread", "--threads", str(self.threads), "-w", "1",
             "--keep-alive", str(self.keepalive), "-b", f"127.0.0.1:{self.port}", "--chdir", str(TESTS),
             "--graceful-timeout", "1", "--log-level", "warning", "proxy_upstream_app:app"],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_for_port(self.port, timeout=30)
        except TimeoutError:
            self.stop()
            raise

    def kill(self) -> None:
        """SIGKILL the gunicorn arbiter and its worker process (both started by this test)."""
        if self.proc and self.proc.poll() is None:
            kids = children(self.proc.pid)
            self.proc.kill()
            self.proc.wait(10)
            for pid in kids:
                try:
                    os.kill(pid, 9)
                except ProcessLookupError:
                    pass
            _wait_port_closed(self.port)

    def stop(self) -> None:
        if self.proc:
            stop_process(self.proc)


def _wait_port_closed(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        except OSError:
            return
        time.sleep(0.05)


def bind_listener(port: int = 0, host: str = "127.0.0.1") -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(socket.SOMAXCONN)
    return sock


class RawUpstream(StoppedOnExit):
    """A scripted worker on a raw socket, for answers gunicorn would never send.

    `respond(head, body, conn)` writes whatever the test needs to `conn` and returns whether
    to keep the connection for the next request.
    """

    def __init__(self, respond: Callable[[bytes, bytes, socket.socket], bool]) -> None:
        self.respond = respond
        self.listener = bind_listener()
        self.port = self.listener.getsockname()[1]
        self.heads: list[bytes] = []
        self.connections = 0
        self.open: list[socket.socket] = []
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closed:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            self.open.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        buf = b""
        try:
            while True:
                while b"\r\n\r\n" not in buf:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buf += data
                head, _, buf = buf.partition(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                while len(buf) < length:
                    buf += conn.recv(65536)
                body, buf = buf[:length], buf[length:]
                self.heads.append(head)
                if not self.respond(head, body, conn):
                    return
        except OSError:
            return
        finally:
            conn.close()

    def stop(self) -> None:
        self.closed = True
        self.listener.close()
        for conn in self.open:
            try:
                conn.close()
            except OSError:
                pass


ROUND_ROBIN = configured(ProxyConfig, balance="round-robin")


class ProxyThread(StoppedOnExit):
    """A Proxy on a uvloop in a background thread; `call` runs code on that loop."""

    def __init__(self, workers: list[Worker] | list[int], proxy: ProxyConfig = ROUND_ROBIN,
                 front_cache: FrontCacheConfig = configured(FrontCacheConfig), worker_threads: int = 4,
                 revalidate_after: float = configured(WorkerCacheConfig).ttl, up: bool = True,
                 listen_host: str = "127.0.0.1", handoff_token: str | None = None,
                 tls: dict[str, Any] | None = None, **table_args: Any) -> None:
        """`proxy`, `front_cache`: the config's sections (defaults unless given, but round robin:
        the tests count on workers taking turns; the default policy is tests/test_proxy_balancer.py's
        to test); `worker_threads`
        and `revalidate_after` as the master passes them from `threads` and `cache.ttl`;
        `handoff_token` as a proxy process gets it (fileapp.handoff); `tls`: the settings
        message's tls part (proxies.tls_settings), to serve HTTPS on `tls_port` too."""
        self.config, self.front_cache = proxy, front_cache
        self.worker_threads, self.revalidate_after = worker_threads, revalidate_after
        self.sock = bind_listener(host=listen_host)
        self.port = self.sock.getsockname()[1]
        self.loop = uvloop.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.table = WorkerTable(**table_args)
        self.proxy = Proxy(self.table, proxy, front_cache, worker_threads, revalidate_after,
                           handoff_token=handoff_token)
        ports = [w.port if isinstance(w, Worker) else w for w in workers]
        self.call(lambda: [self._add(p, up) for p in ports])
        self.tls_sock = bind_listener(host=listen_host) if tls is not None else None
        self.tls_port = self.tls_sock.getsockname()[1] if self.tls_sock is not None else None
        if tls is not None:
            self.proxy.tls.configure(tls)
        self.run(self.proxy.start(self.sock, self.tls_sock))

    # -- running code on the proxy's loop ------------------------------------------------
    def call(self, fn: Callable[[], Any], timeout: float = 30) -> Any:
        fut: concurrent.futures.Future = concurrent.futures.Future()

        def run() -> None:
            try:
                fut.set_result(fn())
            except BaseException as exc:  # handed to the calling thread
                fut.set_exception(exc)

        self.loop.call_soon_threadsafe(run)
        return fut.result(timeout)

    def run(self, coro: Any, timeout: float = 60) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    # -- the worker table -----------------------------------------------------------------
    def _add(self, port: int, up: bool) -> WorkerState:
        worker = self.table.add(WorkerState("127.0.0.1", port))
        if up:
            self._mark(worker, True)
        return worker

    def _mark(self, worker: WorkerState, up: bool) -> None:
        for _ in range(max(self.table.rise, self.table.fall)):
            self.table.record_check(worker, up, 0.001, "" if up else "marked down by test")

    def worker(self, port: int) -> WorkerState:
        return self.table.get("127.0.0.1", port)

    def add(self, port: int, up: bool = True) -> WorkerState:
        return self.call(lambda: self._add(port, up))

    def set_up(self, port: int, up: bool) -> None:
        self.call(lambda: self._mark(self.worker(port), up))

    def remove(self, port: int) -> None:
        self.call(lambda: self.table.remove(self.worker(port)))

    def stats(self) -> dict:
        return self.call(self.proxy.stats)

    def update(self, proxy: ProxyConfig | None = None, front_cache: FrontCacheConfig | None = None) -> None:
        """Reconfigure the running proxy, as a reload does."""
        self.config = proxy or self.config
        self.front_cache = front_cache or self.front_cache
        self.call(lambda: self.proxy.configure(self.config, self.front_cache, self.worker_threads,
                                               self.revalidate_after))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self, timeout: float = 5.0) -> None:
        if self.loop.is_running():
            try:
                self.run(self.proxy.shutdown(timeout), timeout + 30)
            finally:
                self.loop.call_soon_threadsafe(self.loop.stop)
                self.thread.join(10)
        self.sock.close()
        if self.tls_sock is not None:
            self.tls_sock.close()


def asked_twice(answer: bytes, path: str) -> tuple[list[Any], int]:
    """GET `path` twice through a proxy, front cache on, whose one worker sends `answer` to
    every request: both responses (requests'), and how many of the requests reached the worker."""
    import requests

    upstream = RawUpstream(lambda head, body, conn: conn.sendall(answer) is None)
    p = ProxyThread([upstream.port])
    with upstream, p:
        return [requests.get(p.url + path, timeout=10) for _ in range(2)], len(upstream.heads)


# -- raw HTTP over sockets, for what clients libraries refuse to send --------------------
def raw(port: int, data: bytes, timeout: float = 5.0, shutdown: bool = False) -> bytes:
    """Send bytes, return everything received until the server closes (or `timeout`)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        if shutdown:
            s.shutdown(socket.SHUT_WR)
        return read_all(s, timeout)


def read_all(s: socket.socket, timeout: float = 5.0) -> bytes:
    out = bytearray()
    deadline = time.monotonic() + timeout
    s.settimeout(timeout)
    while time.monotonic() < deadline:
        try:
            data = s.recv(65536)
        except (socket.timeout, ConnectionResetError):
            break
        if not data:
            break
        out += data
    return bytes(out)


def parse_responses(data: bytes, head_only: bool = False) -> list[tuple[int, dict[str, str], bytes]]:
    """Split a byte stream into (status, headers, body) responses; Content-Length or chunked."""
    responses = []
    while data:
        head, sep, rest = data.partition(b"\r\n\r\n")
        if not sep:
            raise ValueError(f"incomplete head: {data[:200]!r}")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers: dict[str, str] = {}
        for line in lines[1:]:
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
        if head_only or status in (204, 304) or 100 <= status < 200:
            body, data = b"", rest
        elif "content-length" in headers:
            n = int(headers["content-length"])
            if len(rest) < n:
                raise ValueError("truncated body")
            body, data = rest[:n], rest[n:]
        elif headers.get("transfer-encoding") == "chunked":
            body = b""
            while True:
                size_line, _, rest = rest.partition(b"\r\n")
                size = int(size_line, 16)
                if size == 0:
                    rest = rest[2:]
                    break
                body += rest[:size]
                rest = rest[size + 2:]
            data = rest
        else:
            body, data = rest, b""
        responses.append((status, headers, body))
    return responses


def serve_main() -> None:
    """`python tests/proxy_harness.py PORT WORKER_PORT...`: a proxy process for memory tests."""
    port, *workers = (int(a) for a in sys.argv[1:])

    async def main() -> None:
        table = WorkerTable()
        for p in workers:
            w = table.add(WorkerState("127.0.0.1", p))
            for _ in range(table.rise):
                table.record_check(w, True, 0.001)
        proxy = Proxy(table, configured(ProxyConfig), configured(FrontCacheConfig), 4, configured(WorkerCacheConfig).ttl)
        await proxy.start(bind_listener(port))
        print("ready", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
        await proxy.shutdown(1)

    uvloop.run(main())


if __name__ == "__main__":
    serve_main()
