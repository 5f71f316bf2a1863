"""Slow readers through a real master: clients that take a big download very slowly hold no
worker thread (the workers hand the file to the proxies), so health checks keep passing, no worker is replaced, and other requests
(front-cached or not) are answered meanwhile."""
from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest
import requests

from e2e_support import read_head
from master_support import Master, base_config
from support import closing_all, free_ports, wait_until

pytestmark = pytest.mark.integration

HUGE = 200 * 1024 * 1024
READERS = 16
# Long enough for a worker whose threads were all stuck to fail its checks several times over
# (fall 3 x interval 0.2 s, each check timing out after 0.5 s).
HOLD = 3.0


@pytest.fixture
def site(tmp_path) -> Path:
    root = tmp_path / "site"
    root.mkdir()
    (root / "a.txt").write_bytes(b"alpha\n")  # front-cached
    (root / "mid.bin").write_bytes(b"m" * 100_000)  # above the front cache's object limit below
    with open(root / "huge.bin", "wb") as f:
        f.truncate(HUGE)  # reads as zeros, takes no disk
    return root


def slow_reader(port: int) -> socket.socket:
    """A client that asks for the huge file and then reads nothing (a small receive buffer, so
    back-pressure reaches the worker at once)."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.settimeout(10)
    s.connect(("127.0.0.1", port))
    s.sendall(b"GET /huge.bin HTTP/1.1\r\nHost: t\r\n\r\n")
    return s


def test_slow_readers_get_no_healthy_worker_replaced(masters, tmp_path, site):
    port, admin_port, *worker_ports = free_ports(4)
    config = base_config(site, port, worker_ports, threads=4, admin=f"127.0.0.1:{admin_port}",
                         frontCache={"maxObjectBytes": 65536})
    config["healthCheck"].update(interval=0.2, timeout=0.5, fall=3)
    master = Master(tmp_path, config)
    masters.append(master)
    master.wait_workers(worker_ports)

    def status() -> dict:
        return requests.get(f"http://127.0.0.1:{admin_port}/status.json", timeout=5).json()

    def workers() -> dict:
        """What must not change: each worker's pid, up state, since and restarts."""
        return {w["port"]: (w["pid"], w["up"], w["since"], w["restarts"]) for w in status()["workers"]}

    before = wait_until(lambda: (lambda w: w if all(up for _, up, _, _ in w.values()) else None)(workers()),
                        timeout=30, message="every worker up in status.json")
    readers = [slow_reader(port) for _ in range(READERS)]
    with closing_all(readers):
        for s in readers:
            head, _ = read_head(s)
            assert head.startswith(b"HTTP/1.1 200") and b"Content-Length: %d" % HUGE in head
        # All of them sent by the proxies, which the workers handed the file: none is held by a
        # worker (the proxies report their in-flight counts every second).
        wait_until(lambda: status()["proxy"]["file_bodies"] >= READERS, timeout=10,
                   message="every download sent by a proxy")
        assert sum(w["in_flight"] for w in status()["workers"]) == 0
        with requests.Session() as session:
            held_until = time.monotonic() + HOLD
            while time.monotonic() < held_until:
                for path, body in (("/a.txt", b"alpha\n"), ("/mid.bin", b"m" * 100_000)):
                    r = session.get(f"http://127.0.0.1:{port}{path}", timeout=10)
                    assert (r.status_code, r.content) == (200, body), path
                assert workers() == before
                time.sleep(0.05)
    wait_until(lambda: sum(w["in_flight"] for w in status()["workers"]) == 0, timeout=30,
               message="the closed downloads ended")
    assert workers() == before
    assert "no healthy worker" not in master.log()
