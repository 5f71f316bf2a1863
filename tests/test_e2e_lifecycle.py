"""The master's life cycle seen from a client of the public port: a graceful TERM refuses new
clients, finishes an in-flight download, then the master exits 0 leaving no process; a HUP
that changes the worker count under load fails no request."""
from __future__ import annotations

import signal
import socket
import time
from pathlib import Path

import pytest
import requests

from e2e_support import bundled_site, patterned, read_head
from master_support import Hammer, Master, base_config, children, serving, wait_gone
from support import free_port, free_ports, pid_alive, refused, together, wait_until

pytestmark = pytest.mark.integration

DOWNLOAD = 24 * 1024 * 1024


@pytest.fixture
def site(tmp_path: Path) -> Path:
    root = bundled_site(tmp_path / "site")
    (root / "download.bin").write_bytes(patterned(DOWNLOAD))
    return root


def test_term_lets_a_slow_download_finish_then_exits_0_leaving_no_process(tmp_path, site):
    m = serving(tmp_path, site, 2, gracefulTimeout=30, frontCache={"enabled": False})
    with m:
        workers = m.workers()
        expected = (site / "download.bin").read_bytes()
        with socket.create_connection(("127.0.0.1", m.port), timeout=30) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
            s.sendall(b"GET /download.bin HTTP/1.1\r\nHost: t\r\n\r\n")
            head, body = read_head(s)
            assert b"Content-Length: %d" % DOWNLOAD in head
            body = bytearray(body)
            m.signal(signal.SIGTERM)
            m.wait_log("stopping gracefully")
            # No new client is taken on: refused at once, not left waiting in the backlog.
            wait_until(lambda: refused(m.port), timeout=10, message="public port refusing")
            # Most of the file is still at the worker: the proxy must keep relaying it. (The
            # master may exit before we read the last bytes: they are in the kernel's buffers.)
            while True:  # slowly: about 1 MiB per 0.05 s at most
                chunk = s.recv(65536)
                if not chunk:
                    break
                body += chunk
                if len(body) % (1 << 20) < len(chunk):
                    time.sleep(0.05)
        assert len(body) == DOWNLOAD and body == expected
        assert m.proc.wait(60) == 0
        assert not any(pid_alive(p) for p in workers.values()) and children(m.pid) == []
        assert "master exiting" in m.log()


def test_hup_changing_the_worker_count_under_load_fails_no_request(tmp_path, site):
    small = {p: (site / p[1:]).read_bytes() for p in ("/index.html", "/style.css", "/logo.png", "/a.txt")}
    m = serving(tmp_path, site, 2, frontCache={"enabled": False})
    with m:
        first = m.workers()
        clients = [Hammer(m.port, paths=tuple(small), keep_alive=k, expect=small, pause=0.002)
                   for k in (True, False, True, False)]
        with together(clients):
            time.sleep(0.3)
            grown = m.config["workers"] + [{"host": "127.0.0.1", "port": free_port()}]
            m.write_config({**m.config, "workers": grown, "threads": 2})
            m.signal(signal.SIGHUP)
            m.wait_log(r"reload done: 3 local workers \(1 added, 2 replaced, 0 failed to reload, 0 stopped\)",
                       timeout=60)
            time.sleep(0.3)
            m.write_config({**m.config, "workers": grown[1:]})
            m.signal(signal.SIGHUP)
            m.wait_log(r"reload done: 2 local workers \(0 added, 2 replaced, 0 failed to reload, 1 stopped\)",
                       timeout=60)
            time.sleep(0.3)
        wait_gone(first.values())
        assert sorted(m.wait_workers(m.worker_ports)) == sorted(w["port"] for w in grown[1:])
        results = [r for c in clients for r in c.results]
        failed = [o for c in clients for o in c.failed()]
        print(f"{len(results)} requests during two reloads, {len(failed)} failed")
        assert failed == [], failed[:10]
        assert all(c.results for c in clients)


def test_a_hup_while_the_workers_still_boot_ends_with_workers_that_serve(tmp_path, site):
    """A HUP the moment the master is ready, before any worker passed its checks: the booting
    workers are replaced at once, and "reload done" waits for their successors to be up (it
    used to be logged while none was, and the next request got 503)."""
    listen, *ports = free_ports(3)
    with Master(tmp_path, base_config(site, listen, ports)) as m:
        m.wait_log(r"gows master on ")
        m.signal(signal.SIGHUP)
        m.wait_log(r"reload done: 2 local workers \(0 added, 2 replaced", timeout=60)
        assert requests.get(f"http://127.0.0.1:{listen}/a.txt", timeout=10).status_code == 200
