"""File bodies handed off by the workers and sent by the proxies (issue 12), end to end through a
real master: a 1 GiB download byte-exact (whole, by Range and If-Range), descriptors back to
their baseline after 10,000 downloads, and slow downloaders that neither hold worker threads
nor get workers replaced."""
from __future__ import annotations

import hashlib
import os
import socket
import time
from pathlib import Path

import pytest

from fileapp.handoff import directory_stamp
from e2e_support import bundled_site, digest_to_end, fetch, read_head, request
from master_support import Admin, Hammer, serving
from support import together, wait_until

pytestmark = pytest.mark.integration

GIGABYTE = 1 << 30
MARK_EVERY = 64 << 20  # a distinct block every 64 MiB: a sparse file whose every region is checkable


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    root = bundled_site(tmp_path_factory.mktemp("site"))
    with open(root / "giga.bin", "wb") as f:
        f.truncate(GIGABYTE)
        for i, offset in enumerate(range(0, GIGABYTE, MARK_EVERY)):
            f.seek(offset + 12345)
            f.write(hashlib.sha256(b"%d" % i).digest() * 128)
        f.seek(GIGABYTE - 7)
        f.write(b"THE END")
    (root / "medium.bin").write_bytes(os.urandom(200_000))
    return root


@pytest.fixture(scope="module")
def admin(tmp_path_factory, site):
    masters = []
    a = Admin(masters, tmp_path_factory.mktemp("master"), site, frontCache={"enabled": False})
    try:
        a.ready()
        yield a
    finally:
        for m in masters:
            m.stop()


def _sha256_of(path: Path, start: int = 0, stop: int | None = None) -> str:
    h = hashlib.sha256()
    stop = path.stat().st_size if stop is None else stop
    with open(path, "rb") as f:
        f.seek(start)
        left = stop - start
        while left:
            block = f.read(min(left, 8 << 20))
            h.update(block)
            left -= len(block)
    return h.hexdigest()


def _download(port: int, headers: dict[str, str]) -> tuple[bytes, int, str]:
    """GET /giga.bin: (head, body length, body sha256), the body read to the connection's end."""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
        s.sendall(request("GET", "/giga.bin", headers, close=True))
        head, body = read_head(s)
        return (head, *digest_to_end(s, body))


def test_a_gigabyte_is_sent_byte_exact_whole_and_by_range(admin, site):
    path = site / "giga.bin"
    before = admin.json()["proxy"]["file_bodies"]
    head, n, digest = _download(admin.port, {})
    assert head.startswith(b"HTTP/1.1 200 ") and b"Content-Length: %d" % GIGABYTE in head
    assert (n, digest) == (GIGABYTE, _sha256_of(path))
    etag = next(line.split(b": ", 1)[1] for line in head.split(b"\r\n") if line.lower().startswith(b"etag:"))

    start = GIGABYTE - 300_000_123
    head, n, digest = _download(admin.port, {"Range": f"bytes={start}-"})
    assert head.startswith(b"HTTP/1.1 206 ") and b"Content-Range: bytes %d-%d/%d" % (
        start, GIGABYTE - 1, GIGABYTE) in head
    assert (n, digest) == (GIGABYTE - start, _sha256_of(path, start))

    # If-Range with the current validator: the range; with another one: the whole file.
    head, n, digest = _download(admin.port, {"Range": "bytes=100-200099", "If-Range": etag.decode()})
    assert head.startswith(b"HTTP/1.1 206 ") and (n, digest) == (200_000, _sha256_of(path, 100, 200_100))
    head, n, digest = _download(admin.port, {"Range": "bytes=100-200099", "If-Range": '"other"'})
    assert head.startswith(b"HTTP/1.1 200 ") and n == GIGABYTE
    assert admin.json()["proxy"]["file_bodies"] - before == 4  # every one sent by a proxy


def test_a_client_cannot_ask_for_a_hand_off_itself(admin, site):
    status, headers, body = fetch(admin.port, "GET", "/medium.bin", {"X-Gows-Handoff": "guess"})
    assert status == 200 and body == (site / "medium.bin").read_bytes()
    assert "x-gows-file" not in headers


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_descriptors_return_to_their_baseline_after_ten_thousand_downloads(admin, site):
    expected = {"/medium.bin": (site / "medium.bin").read_bytes()}
    processes = {**admin.master.proxies(), **{-p: pid for p, pid in admin.master.workers().items()}}
    for _ in range(20):
        fetch(admin.port, "GET", "/medium.bin")
    baseline = {pid: _fds(pid) for pid in processes.values()}
    before = admin.json()["proxy"]["file_bodies"]
    clients = [Hammer(admin.port, paths=("/medium.bin",), keep_alive=k, expect=expected, pause=0)
               for k in (True, False, True, False)]
    with together(clients):
        wait_until(lambda: admin.json()["proxy"]["file_bodies"] - before >= 10_000, timeout=240, interval=0.5,
                   message="10,000 downloads")
    assert [o for c in clients for o in c.failed()] == []
    assert {**admin.master.proxies(), **{-p: pid for p, pid in admin.master.workers().items()}} == processes
    wait_until(lambda: all(_fds(pid) <= baseline[pid] for pid in processes.values()), timeout=10,
               message=f"descriptors back to {baseline}")


def test_slow_downloaders_hold_no_worker_thread(admin, site):
    """Three times more downloaders than the workers have threads, none of them reading: other
    clients are served meanwhile and no worker is marked down or replaced."""
    threads = admin.master.config.get("threads", 4) * len(admin.worker_ports)
    workers = admin.master.workers()
    small = {"/a.txt": b"alpha\n"}
    stalled = []
    try:
        for _ in range(3 * threads):
            s = socket.create_connection(("127.0.0.1", admin.port), timeout=10)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.sendall(request("GET", "/giga.bin"))
            stalled.append(s)
        wait_until(lambda: admin.json()["proxy"]["client_connections"] >= len(stalled), timeout=10)
        clients = [Hammer(admin.port, paths=tuple(small), keep_alive=k, expect=small, pause=0) for k in (True, False)]
        with together(clients):
            wait_until(lambda: sum(len(c.results) for c in clients) >= 400, timeout=60,
                       message="400 other requests answered beside the stalled downloads")
        assert [o for c in clients for o in c.failed()] == []
        assert all(w["up"] for w in admin.json()["workers"]) and admin.master.workers() == workers
        assert "is down" not in admin.master.log()
        # No worker holds the stalled downloads (the proxies report in-flight counts each second).
        wait_until(lambda: all(w["in_flight"] == 0 for w in admin.json()["workers"]), timeout=10,
                   message="no request in flight at a worker while the downloads stall")
    finally:
        for s in stalled:
            s.close()


def test_a_release_switched_by_symlink_is_served_within_the_cache_ttl(tmp_path):
    """Deploys that repoint a symlink (current -> releases/2) change the directory holding the
    link, not the one holding the file: a file the front cache named through the old link is
    served from the new release once the caches' ttl is up, however often it was asked for."""
    root = tmp_path / "site"
    for release in (b"1", b"2"):
        (root / "releases" / release.decode()).mkdir(parents=True)
        (root / "releases" / release.decode() / "app.js").write_bytes(release * 100_000)
    (root / "current").symlink_to("releases/1")
    # Settled directories (fileapp.handoff.STAMP_SETTLE): a fresh one would be asked for anyway.
    wait_until(lambda: directory_stamp(root / "releases" / "1"), timeout=10, message="the release settled")
    master = serving(tmp_path, root, 1, cache={"ttl": 0.3})
    try:
        def body() -> bytes:
            status, _, data = fetch(master.port, "GET", "/current/app.js")
            assert status == 200
            return data

        deadline = time.monotonic() + 3  # several ttls: every proxy has stored and renewed it
        while time.monotonic() < deadline:
            assert body() == b"1" * 100_000
        (root / "next").symlink_to("releases/2")
        os.replace(root / "next", root / "current")
        switched = time.monotonic()
        # Each proxy serves its entry until it is stale (ttl, on a clock of quarter seconds),
        # then asks a worker, whose own entry lives a ttl too; beyond that, slack for a busy
        # machine. Which proxy answers is the kernel's choice, so every answer is checked.
        bound = switched + 0.3 + 0.25 + 0.3 + 2.0
        answers = []
        while time.monotonic() < bound + 1.0:
            data = body()
            answers.append((time.monotonic() - switched, data == b"2" * 100_000))
        late_old = [round(t, 2) for t, new in answers if not new and t > bound - switched]
        assert not late_old, f"the old release served {late_old} s after the switch"
        assert answers[-1][1] and sum(new for _, new in answers) > len(answers) // 2
    finally:
        master.stop()
