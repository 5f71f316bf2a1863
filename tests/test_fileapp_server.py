"""fileapp under its real gthread worker: keep-alive framing across mixed responses, and
correct bodies under concurrent clients while files change."""
from __future__ import annotations

import gzip
import hashlib
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import requests

from tests.support import free_port, python_env, stop_process, wait_for_port


@pytest.fixture
def server(tmp_path):
    root = tmp_path / "site"
    root.mkdir()
    (root / "small.txt").write_bytes(b"small body\n")
    (root / "mid.bin").write_bytes(os.urandom(100_000))  # cached, above the coalescing limit
    (root / "big.bin").write_bytes(os.urandom(600_000))  # streamed with sendfile
    (root / "app.css").write_bytes(b"a{}" * 300)
    (root / "app.css.gz").write_bytes(gzip.compress(b"a{}" * 300))
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "fileapp", "--root", str(root), "--port", str(port),
         "--threads", "4", "--cache-ttl", "0.2", "--log-level", "warning"],
        env=python_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port, timeout=20)
        yield root, f"http://127.0.0.1:{port}", proc
    finally:
        stop_process(proc)


def test_keepalive_connection_survives_every_kind_of_response(server):
    root, base, _ = server
    s = requests.Session()
    small = s.get(base + "/small.txt", timeout=10)
    etag = small.headers["ETag"]
    for _ in range(3):
        assert s.get(base + "/small.txt", timeout=10).content == b"small body\n"
        assert s.head(base + "/small.txt", timeout=10).content == b""
        r = s.get(base + "/small.txt", headers={"If-None-Match": etag}, timeout=10)
        assert r.status_code == 304 and r.content == b""
        r = s.get(base + "/small.txt", headers={"Range": "bytes=0-4"}, timeout=10)
        assert r.status_code == 206 and r.content == b"small"
        r = s.get(base + "/small.txt", headers={"Range": "bytes=0-1,3-4"}, timeout=10)
        assert r.status_code == 206 and b"Content-Range: bytes 3-4/11" in r.content
        assert s.get(base + "/mid.bin", timeout=10).content == (root / "mid.bin").read_bytes()
        assert s.get(base + "/big.bin", timeout=10).content == (root / "big.bin").read_bytes()
        r = s.get(base + "/big.bin", headers={"Range": "bytes=500000-"}, timeout=10)
        assert r.content == (root / "big.bin").read_bytes()[500000:]
        r = s.get(base + "/app.css", headers={"Accept-Encoding": "gzip"}, timeout=10)
        assert r.headers["Content-Encoding"] == "gzip" and r.content == b"a{}" * 300
        assert s.get(base + "/missing", timeout=10).status_code == 404
        assert s.post(base + "/small.txt", data=b"x" * 5000, timeout=10).status_code == 405
        assert s.options(base + "/small.txt", timeout=10).status_code == 204
        assert s.get(base + "/healthcheck", timeout=10).content == b"ok"
    s.close()


def test_concurrent_clients_get_consistent_bodies_while_files_change(server):
    root, base, proc = server
    names = [f"f{i}.txt" for i in range(12)]
    known: dict[str, set[str]] = {n: set() for n in names}
    lock = threading.Lock()

    def publish(name: str, version: int) -> None:
        body = (f"{name}:{version}:" * (20 + version % 9)).encode()
        with lock:
            known[name].add(hashlib.sha256(body).hexdigest())
        tmp = root / f".{name}.{version}"
        tmp.write_bytes(body)
        os.replace(tmp, root / name)

    for n in names:
        publish(n, 0)
    stop = threading.Event()
    errors: list[str] = []

    def writer() -> None:
        v = 1
        while not stop.is_set():
            publish(names[v % len(names)], v)
            v += 1
            time.sleep(0.005)

    def client(seed: int) -> None:
        s = requests.Session()
        for i in range(60):
            name = names[(seed * 7 + i) % len(names)]
            r = s.get(f"{base}/{name}", timeout=20)
            digest = hashlib.sha256(r.content).hexdigest()
            with lock:
                ok = digest in known[name]
            if r.status_code != 200 or not ok or int(r.headers["Content-Length"]) != len(r.content):
                errors.append(f"{name}: {r.status_code} {len(r.content)}")
        s.close()

    w = threading.Thread(target=writer)
    clients = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    w.start()
    for t in clients:
        t.start()
    for t in clients:
        t.join(120)
    stop.set()
    w.join(10)
    assert errors == []
    assert proc.poll() is None


def test_sighup_does_not_stop_the_worker(server):
    _, base, proc = server
    proc.send_signal(signal.SIGHUP)
    time.sleep(0.5)
    assert proc.poll() is None
    assert requests.get(base + "/small.txt", timeout=10).content == b"small body\n"


def test_worker_class_runs_under_gunicorns_own_arbiter(tmp_path):
    """`gunicorn -k fileapp.worker.GowsThreadWorker 'fileapp:create_app(...)'` serves too."""
    root = tmp_path / "site"
    root.mkdir()
    (root / "a.txt").write_bytes(b"under gunicorn\n")
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "-k", "fileapp.worker.GowsThreadWorker", "-w", "2",
         "-b", f"127.0.0.1:{port}", "--log-level", "warning",
         f"fileapp:create_app({str(root)!r})"],
        env=python_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path)
    try:
        wait_for_port(port, timeout=30)
        s = requests.Session()
        for _ in range(10):
            r = s.get(f"http://127.0.0.1:{port}/a.txt", timeout=10)
            assert r.status_code == 200 and r.content == b"under gunicorn\n"
            assert r.headers["Content-Length"] == "15"
        assert s.get(f"http://127.0.0.1:{port}/healthcheck", timeout=10).content == b"ok"
        s.close()
    finally:
        stop_process(proc)
    assert proc.returncode == 0
