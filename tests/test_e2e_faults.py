"""Faults end to end, through the public port of a real master with the front cache off (so
every request reaches a worker): workers SIGKILLed under load and mid-stream, a 1 GB download
to a slow reader, and every worker down at once."""
from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path

import pytest

from e2e_support import bundled_site, fetch, patterned, read_head
from master_support import Hammer, Master, proxies_rss_kib, serving, wait_gone
from support import pid_alive, together, wait_until

pytestmark = pytest.mark.integration

STREAMED = 50 * 1024 * 1024
GIGABYTE = 1 << 30


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    root = bundled_site(tmp_path_factory.mktemp("site"))
    (root / "stream.bin").write_bytes(patterned(STREAMED))
    with open(root / "sparse.bin", "wb") as f:
        f.truncate(GIGABYTE)  # reads as zeros, takes no disk
    return root


@pytest.fixture(scope="module")
def master(tmp_path_factory, site):
    m = serving(tmp_path_factory.mktemp("master"), site, 2, frontCache={"enabled": False})
    yield m
    m.stop()


def _kill_and_wait_back(m: Master, port: int) -> None:
    """SIGKILL the worker on `port` and wait until its replacement is up in the master's table."""
    before = m.count(rf"worker 127\.0\.0\.1:{port} is up")
    pid = m.workers()[port]
    os.kill(pid, signal.SIGKILL)
    m.wait_log(rf"worker 127\.0\.0\.1:{port} \(pid {pid}\) was killed by SIGKILL")
    m.wait_log(rf"worker 127\.0\.0\.1:{port} is up", count=before + 1, timeout=30)


def test_workers_sigkilled_under_load_fail_no_get(master, site):
    small = {p: (site / p[1:]).read_bytes() for p in ("/index.html", "/style.css", "/logo.png", "/a.txt")}
    paths = tuple(small)
    clients = [Hammer(master.port, paths=paths, keep_alive=k, expect=small, pause=0) for k in (True, False) * 3]
    with together(clients):
        time.sleep(0.5)
        for port in master.worker_ports:  # each worker in turn, while the other serves
            _kill_and_wait_back(master, port)
            time.sleep(0.3)
    results = [r for c in clients for r in c.results]
    failed = [o for c in clients for o in c.failed()]
    print(f"{len(results)} GETs, {len(failed)} failed")
    assert failed == [], failed[:10]
    assert len(results) >= 100 and all(c.results for c in clients)


def _start_slowly(s: socket.socket, request: bytes) -> tuple[bytes, bytearray]:
    """Send `request`, read its head and the first 2 MiB of the body slowly."""
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    s.sendall(request)
    head, body = read_head(s)
    received = bytearray(body)
    while len(received) < 2 * 1024 * 1024:
        received += s.recv(65536)
        time.sleep(0.002)
    return head, received


def _kill_workers(master: Master) -> dict[int, int]:
    workers = master.workers()
    for pid in workers.values():  # whichever one serves this download
        os.kill(pid, signal.SIGKILL)
    return workers


def _read_to_end(s: socket.socket, received: bytearray) -> None:
    s.settimeout(30)
    while True:
        chunk = s.recv(1 << 20)  # a clean end of stream; a reset or a hang would raise
        if not chunk:
            return
        received += chunk


def _served_again(master: Master, workers: dict[int, int]) -> None:
    wait_until(lambda: not any(pid_alive(p) for p in workers.values()), timeout=10)
    for port in master.worker_ports:
        master.wait_log(rf"worker 127\.0\.0\.1:{port} \(pid {workers[port]}\) was killed by SIGKILL")
    wait_until(lambda: fetch(master.port, "GET", "/a.txt")[2] == b"alpha\n", timeout=30,
               message="served again")


def test_worker_killed_mid_relayed_stream_truncates_the_response_cleanly(master, site):
    # A multipart range response is sent by the worker itself, through the proxy.
    expected = (site / "stream.bin").read_bytes()
    with socket.create_connection(("127.0.0.1", master.port), timeout=30) as s:
        head, received = _start_slowly(s, b"GET /stream.bin HTTP/1.1\r\nHost: t\r\nConnection: close\r\n"
                                          b"Range: bytes=0-0,1-%d\r\n\r\n" % (STREAMED - 1))
        assert head.startswith(b"HTTP/1.1 206 ") and b"multipart/byteranges" in head
        workers = _kill_workers(master)
        _read_to_end(s, received)
    print(f"received {len(received)} bytes of a multipart body of over {STREAMED}")
    assert len(received) < STREAMED
    start = received.index(b"\r\n\r\n", received.index(b"bytes 1-")) + 4
    assert received[start:] == expected[1:1 + len(received) - start]  # a prefix: never foreign bytes
    _served_again(master, workers)


def test_worker_killed_after_handing_off_a_download_does_not_truncate_it(master, site):
    expected = (site / "stream.bin").read_bytes()
    with socket.create_connection(("127.0.0.1", master.port), timeout=30) as s:
        head, received = _start_slowly(s, b"GET /stream.bin HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 ") and b"Content-Length: %d" % STREAMED in head
        workers = _kill_workers(master)
        _read_to_end(s, received)
    assert len(received) == STREAMED and received == expected
    _served_again(master, workers)


def test_gigabyte_to_a_slow_reader_keeps_master_memory_bounded(master):
    for _ in range(20):  # warm up the proxy's pools and buffers first
        assert fetch(master.port, "GET", "/downloads/sample-150k.bin")[0] == 200
    baseline = peak = proxies_rss_kib(master.pid)
    zeros = bytes(1 << 20)
    with socket.create_connection(("127.0.0.1", master.port), timeout=60) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        s.sendall(b"GET /sparse.bin HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        for _ in range(10):  # not reading at all for a while: the worker could send it all
            time.sleep(0.1)
            peak = max(peak, proxies_rss_kib(master.pid))
        head, body = read_head(s)
        assert b"Content-Length: %d" % GIGABYTE in head
        received = len(body)
        assert body == zeros[:received]
        reads = 0
        while True:
            data = s.recv(1 << 20)
            if not data:
                break
            assert data == zeros[:len(data)]
            received += len(data)
            reads += 1
            if reads % 32 == 0:
                peak = max(peak, proxies_rss_kib(master.pid))
                if received < 64 << 20:
                    time.sleep(0.05)  # slowly at first, then as fast as the machine allows
    assert received == GIGABYTE
    growth_mib = (peak - baseline) / 1024
    print(f"master RSS {baseline >> 10} MiB, grew by {growth_mib:.1f} MiB streaming 1 GiB")
    assert growth_mib < 64, f"master RSS grew by {growth_mib:.1f} MiB while streaming 1 GiB"


def test_all_workers_down_gives_503_with_retry_after_then_recovers(tmp_path, site):
    # rise 8: a replacement takes a while to count as up, which leaves time to see the 503s.
    m = serving(tmp_path, site, 2, frontCache={"enabled": False},
                healthCheck={"interval": 0.2, "timeout": 0.5, "rise": 8, "fall": 2, "bootTimeout": 30})
    stopped: list[int] = []
    try:
        for port, pid in m.workers().items():
            os.kill(pid, signal.SIGSTOP)
            stopped.append(pid)
        for port in m.worker_ports:
            m.wait_log(rf"worker 127\.0\.0\.1:{port} is down")
        status, headers, body = fetch(m.port, "GET", "/index.html")
        assert (status, headers.get("retry-after"), body) == (503, "1", b"503 Service Unavailable\n")
        status, headers, body = fetch(m.port, "HEAD", "/index.html")
        assert (status, headers.get("retry-after"), body) == (503, "1", b"")
        # The master continues the stopped workers, drains them and starts new ones: served again.
        wait_until(lambda: fetch(m.port, "GET", "/a.txt")[:3:2] == (200, b"alpha\n"), timeout=30,
                   message="served again")
        wait_gone(stopped)
    finally:
        for pid in stopped:
            if pid_alive(pid):
                os.kill(pid, signal.SIGCONT)
        m.stop()
