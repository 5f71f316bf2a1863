"""Large bodies stream through the proxy with back-pressure: a slow client pauses the worker's
connection, and the proxy's memory stays bounded however large the download."""
from __future__ import annotations

import socket
import subprocess
import time

import pytest
import requests

from arbiter.config import ProxyConfig, configured
from master_support import rss_kib
from proxy_harness import NO_CACHE, ProxyThread, TESTS, Worker
from support import PYTHON, free_port, python_env, running, wait_for_port, wait_until

pytestmark = pytest.mark.integration

BLOCK = bytes(range(256)) * 1025  # covers any recv size up to 256 KiB at any offset


def test_large_download_to_slow_reader_keeps_proxy_memory_bounded():
    size = 1 << 30
    worker = Worker()
    port = free_port()
    proc = subprocess.Popen([PYTHON, str(TESTS / "proxy_harness.py"), str(port), str(worker.port)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=python_env())
    with worker, running(proc):
        assert proc.stdout.readline().strip() == b"ready"
        wait_for_port(port)
        baseline = rss_kib(proc.pid)
        peak = baseline
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
            s.sendall(b"GET /stream?size=%d&chunk=262144 HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n" % size)
            # Not reading at all for a while: the worker could send everything meanwhile.
            for _ in range(20):
                time.sleep(0.1)
                peak = max(peak, rss_kib(proc.pid))
            head = b""
            while b"\r\n\r\n" not in head:
                head += s.recv(4096)
            head, _, body = head.partition(b"\r\n\r\n")
            assert b"Content-Length: %d" % size in head
            received = len(body)
            assert body == BLOCK[:received]
            reads = 0
            while True:
                data = s.recv(262144)
                if not data:
                    break
                off = received % 256
                assert data == BLOCK[off:off + len(data)]
                received += len(data)
                reads += 1
                if reads % 64 == 0:
                    peak = max(peak, rss_kib(proc.pid))
                    if received < size // 8:
                        time.sleep(0.05)  # a slow start, then as fast as the machine allows
        assert received == size
        growth_mib = (peak - baseline) / 1024
        print(f"RSS growth {growth_mib:.1f} MiB")
        assert growth_mib < 32, f"proxy RSS grew by {growth_mib:.1f} MiB streaming {size >> 20} MiB"


def test_slow_client_pauses_the_worker_connection_and_resumes():
    worker = Worker()
    p = ProxyThread([worker], front_cache=NO_CACHE)
    with worker, p:
        with socket.create_connection(("127.0.0.1", p.port)) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32768)
            s.sendall(b"GET /stream?size=%d&chunk=65536 HTTP/1.1\r\nHost: t\r\n\r\n" % (64 << 20))
            wait_until(lambda: p.call(lambda: any(c.paused for c in p.proxy.pool.busy)),
                       message="worker connection paused")
            received = 0
            data = b""
            while b"\r\n\r\n" not in data:
                data += s.recv(65536)
            received = len(data.partition(b"\r\n\r\n")[2])
            while received < 64 << 20:
                received += len(s.recv(1 << 20))
            assert received == 64 << 20
        # The connection was resumed and went back to the pool in a reusable state.
        assert requests.get(p.url + "/echo").status_code == 200


def test_large_upload_is_forwarded_whole():
    worker = Worker()
    p = ProxyThread([worker], proxy=configured(ProxyConfig, maxBodyBytes=4 << 20), front_cache=NO_CACHE)
    with worker, p:
        body = BLOCK * 3
        r = requests.post(p.url + "/echo", data=body)
        assert r.status_code == 200 and len(r.json()["body"]) == len(body)


def test_client_that_stops_reading_is_cut_off_and_frees_the_worker():
    worker = Worker()
    p = ProxyThread([worker], proxy=configured(ProxyConfig, responseTimeout=1.0), front_cache=NO_CACHE)
    with worker, p:
        with socket.create_connection(("127.0.0.1", p.port)) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
            s.sendall(b"GET /stream?size=%d&chunk=65536 HTTP/1.1\r\nHost: t\r\n\r\n" % (256 << 20))
            wait_until(lambda: p.call(lambda: any(c.paused for c in p.proxy.pool.busy)),
                       message="worker connection paused")
            # Never reading: after the send timeout the proxy drops the client and the worker.
            wait_until(lambda: p.stats()["client_connections"] == 0, timeout=15, message="client dropped")
            wait_until(lambda: p.call(lambda: not p.proxy.pool.busy), message="worker connection closed")
        assert p.worker(worker.port).in_flight == 0
        assert requests.get(p.url + "/echo").status_code == 200


def test_worker_stalling_mid_body_is_cut_off_after_the_response_timeout():
    worker = Worker()
    p = ProxyThread([worker], proxy=configured(ProxyConfig, responseTimeout=1.0), front_cache=NO_CACHE)
    with worker, p:
        started = time.monotonic()
        with socket.create_connection(("127.0.0.1", p.port)) as s:
            s.sendall(b"GET /stream?size=%d&chunk=65536&delay=60 HTTP/1.1\r\nHost: t\r\n\r\n" % (1 << 20))
            data = b""
            s.settimeout(15)
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200") and 0 < len(body) < 1 << 20
        cut = time.monotonic() - started
        assert cut < 30, f"cut off after {cut:.1f}s"  # well before the worker's next chunk at 60 s
        assert p.stats()["truncated_responses"] == 1
