"""Attacks that once broke the front proxy (issue 9), each replayed through a real master:
pipelined cache hits, aborted and trickled uploads, trailers, the master's own descriptor
exhaustion, reloads and changed files behind the front cache, the connection limit, pipelining
memory and hostile Host/Connection/Upgrade headers."""
from __future__ import annotations

import os
import re
import socket
import threading
import time
from pathlib import Path

import pytest

from e2e_support import Responses, bundled_site, exchange, fetch, request
from master_support import Admin, Master, proxies_rss_kib
from support import closing_all, wait_until

pytestmark = pytest.mark.integration

MiB = 1 << 20


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    return bundled_site(tmp_path_factory.mktemp("site"))


def served(masters: list, directory: Path, root: Path, **extra) -> Admin:
    """A master with an admin listener, every worker up (stopped by the `masters` fixture)."""
    a = Admin(masters, directory, root, **extra)
    a.ready()
    return a


def connect(a: Admin, timeout: float = 10.0) -> socket.socket:
    return socket.create_connection(("127.0.0.1", a.port), timeout=timeout)


def get(a: Admin, path: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    return fetch(a.port, "GET", path, headers)


# -- 1. pipelined front-cache hits ----------------------------------------------------------------
def test_a_thousand_pipelined_cache_hits_behind_a_miss_are_all_answered(masters, tmp_path, site):
    m = served(masters, tmp_path, site, proxy={"maxConnections": 20})
    expected = (site / "a.txt").read_bytes()
    assert get(m, "/a.txt")[2] == expected  # now in the front cache
    burst = request("GET", "/index.html?uncached") + request("GET", "/a.txt") * 999 + request("GET", "/a.txt", close=True)
    for _ in range(3):
        with connect(m) as s:
            s.sendall(burst)
            responses = Responses(s)
            got = [responses.next() for _ in range(1001)]
            assert responses.at_eof()
        assert [status for status, _, _ in got] == [200] * 1001
        assert all(body == expected for _, _, body in got[1:])
    wait_until(lambda: m.json()["proxy"]["client_connections"] == 0, message="no client connection left")
    assert get(m, "/a.txt")[0] == 200


def test_a_client_that_leaves_while_its_pipeline_is_paused_frees_its_connection(masters, tmp_path, site):
    m = served(masters, tmp_path, site, proxy={"maxConnections": 20}, frontCache={"enabled": False})
    for _ in range(10):
        with connect(m) as s:  # far more requests than the proxy queues; never read, then leave
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.sendall(request("GET", "/big.bin") * 64)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # RST
    wait_until(lambda: m.json()["proxy"]["client_connections"] == 0, timeout=30,
               message="every abandoned connection closed")
    assert get(m, "/a.txt")[0] == 200


# -- 2. request bodies ----------------------------------------------------------------------------
def _abort_uploads(m: Admin, count: int, size: int) -> None:
    """`count` clients at once each send a head announcing `size` body bytes and most of the body,
    wait while the master serves other requests (so their objects age), then all leave."""
    head = request("POST", "/upload", {"Content-Length": str(size)})
    chunk = b"x" * (size - 1024)
    sent = threading.Barrier(count + 1)
    leave = threading.Event()

    def one() -> None:
        try:
            with socket.create_connection(("127.0.0.1", m.port), timeout=30) as s:
                try:
                    s.sendall(head + chunk)
                finally:
                    sent.wait(60)
                leave.wait(60)
        except (OSError, threading.BrokenBarrierError):
            pass  # refused or reset once the proxy's body budget is spent: what we want

    threads = [threading.Thread(target=one) for _ in range(count)]
    for t in threads:
        t.start()
    sent.wait(60)
    for _ in range(200):  # many allocations in the master meanwhile: the uploads' objects grow old
        get(m, "/a.txt?aging")
    leave.set()
    for t in threads:
        t.join(60)


def test_aborted_uploads_do_not_pin_the_masters_memory(masters, tmp_path, site):
    m = served(masters, tmp_path, site)
    rss = []
    for _ in range(3):
        _abort_uploads(m, 300, MiB)
        wait_until(lambda: m.json()["proxy"]["client_connections"] == 0, timeout=30,
                   message="every aborted upload's connection gone")
        rss.append(proxies_rss_kib(m.master.pid))
    # 300 MiB of bodies per round: before the fix each round pinned them until a full GC.
    assert rss[2] - rss[0] < 64 * 1024, f"master RSS after each round: {rss} KiB"
    assert get(m, "/a.txt")[0] == 200


def test_request_bodies_in_flight_share_one_memory_budget(masters, tmp_path, site):
    # One proxy process: the budget is the whole server's, split between the proxies.
    m = served(masters, tmp_path, site, proxy={"maxBodyBytes": MiB, "bodyBufferBytes": 4 * MiB, "processes": 1})
    held = []
    with closing_all(held):
        for _ in range(4):  # 4 x 1 MiB - 1 KiB held: the budget is nearly spent
            s = connect(m)
            held.append(s)
            s.sendall(request("POST", "/upload", {"Content-Length": str(MiB)}) + b"x" * (MiB - 1024))
        wait_until(lambda: m.json()["proxy"]["client_connections"] == 4)
        data, _ = exchange(m.port, request("POST", "/upload", {"Content-Length": str(MiB)}) + b"x" * MiB)
        assert data.startswith(b"HTTP/1.1 503 "), data[:200]
        assert b"Retry-After: 1\r\n" in data
    # Once those bodies are gone their share of the budget is back.
    wait_until(lambda: m.json()["proxy"]["client_connections"] == 0)
    data, _ = exchange(m.port, request("POST", "/upload", {"Content-Length": str(MiB)}, close=True) + b"x" * MiB)
    assert data.startswith(b"HTTP/1.1 405 "), data[:200]


def test_a_body_that_trickles_in_is_cut_off_by_its_minimum_rate(masters, tmp_path, site):
    m = served(masters, tmp_path, site, proxy={"headerTimeout": 1})
    with connect(m, timeout=30) as s:
        s.sendall(request("POST", "/upload", {"Content-Length": "100000"}))
        started = time.monotonic()
        answer = b""
        try:
            while not answer and time.monotonic() - started < 20:  # a byte every 0.1 s pushed it back for good
                s.sendall(b"x")
                s.settimeout(0.1)
                try:
                    answer = s.recv(4096)
                except socket.timeout:
                    pass
        except (BrokenPipeError, ConnectionResetError):
            pass
    assert answer.startswith(b"HTTP/1.1 408 "), f"after {time.monotonic() - started:.1f}s: {answer[:200]!r}"


# -- 4. trailers ----------------------------------------------------------------------------------
def test_trailer_fields_never_become_request_headers(masters, tmp_path, site):
    m = served(masters, tmp_path, site, frontCache={"enabled": False})
    expected = (site / "a.txt").read_bytes()
    trailers = [b"Range: bytes=0-1", b"X-Forwarded-For: 6.6.6.6", b"Host: evil"]
    for trailer in trailers:
        body = b"0\r\n" + trailer + b"\r\n\r\n"
        with connect(m) as s:
            s.sendall(request("GET", "/a.txt", {"Transfer-Encoding": "chunked"}, close=True) + body)
            status, headers, got = Responses(s).next()
        assert (status, got) == (200, expected), trailer


# -- concerns: Host and Upgrade (Connection naming Host: tests/test_proxy_http.py) ------------------------------------------------------------
@pytest.mark.parametrize("host", [b"a b", b"", b"a\tb", b"[::1", b"a/b", b"a:b:c"])
def test_an_invalid_host_is_answered_400(masters_module, host):
    data, closed = exchange(masters_module.port, b"GET /a.txt HTTP/1.1\r\nHost: " + host + b"\r\n\r\n")
    assert data.startswith(b"HTTP/1.1 400 "), data[:200]
    assert closed


@pytest.mark.parametrize("host", [b"example.com", b"example.com:8080", b"[::1]:8080", b"127.0.0.1", b"xn--bcher-kva.example"])
def test_valid_hosts_are_served(masters_module, host):
    data, _ = exchange(masters_module.port, b"GET /a.txt HTTP/1.1\r\nHost: " + host + b"\r\nConnection: close\r\n\r\n")
    assert data.startswith(b"HTTP/1.1 200 "), data[:200]


def test_a_request_with_a_body_that_asks_for_an_upgrade_is_refused_not_cut(masters_module):
    body = b"hello"
    data, closed = exchange(masters_module.port, request("POST", "/a.txt", {
        "Upgrade": "websocket", "Connection": "upgrade", "Content-Length": str(len(body))}) + body)
    assert data.startswith(b"HTTP/1.1 400 "), data[:200]
    assert data.count(b"HTTP/1.1 ") == 1 and closed  # the body was never read as the next request
    # Without a body the request is served (its Upgrade ignored), then the connection closes.
    data, closed = exchange(masters_module.port, request("GET", "/a.txt", {"Upgrade": "websocket", "Connection": "upgrade"}))
    assert data.startswith(b"HTTP/1.1 200 ") and closed


@pytest.fixture(scope="module")
def masters_module(tmp_path_factory, site):
    """One master for the tests that only send it requests."""
    started: list[Master] = []
    m = served(started, tmp_path_factory.mktemp("master"), site, frontCache={"enabled": False})
    yield m
    for master in started:
        master.stop()


# -- 5. the master's own descriptor exhaustion ----------------------------------------------------------
def test_the_masters_descriptor_shortage_sheds_load_and_keeps_the_workers(masters, tmp_path, site):
    m = served(masters, tmp_path, site, nofile=64, frontCache={"enabled": False})
    assert "open file limit" in m.master.log()  # warned at start: 64 cannot hold maxConnections
    outcomes: list[object] = []
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            try:
                with socket.create_connection(("127.0.0.1", m.port), timeout=20) as s:
                    s.sendall(request("GET", "/a.txt", close=True))
                    outcomes.append(Responses(s).next()[0])
            except (OSError, ValueError) as e:
                outcomes.append(type(e).__name__)

    threads = [threading.Thread(target=client) for _ in range(100)]
    for t in threads:
        t.start()
    wait_until(lambda: len(outcomes) >= 2000, timeout=60, message="2000 requests under the load")
    stop.set()
    for t in threads:
        t.join(30)
    status = m.json()
    assert all(w["up"] and w["restarts"] == 0 for w in status["workers"]), status["workers"]
    assert "is down" not in m.master.log()
    # Past what the descriptors hold clients wait (or get 503): never a 502/504 blamed on a worker.
    assert 502 not in outcomes and 504 not in outcomes
    assert outcomes.count(200) >= 0.95 * len(outcomes), {o: outcomes.count(o) for o in set(outcomes)}
    assert get(m, "/a.txt")[0] == 200  # at once: nothing to recover from


def test_short_of_descriptors_every_download_a_proxy_admits_is_served(masters, tmp_path):
    """A proxy admits as many clients as its open files hold, counting what a file body takes
    beside the client's socket (the file and a watch on the socket): that many slow downloads at
    once all get their 200, none a 503 or a cut for want of a descriptor."""
    root = tmp_path / "root"
    root.mkdir()
    (root / "a.txt").write_text("a\n")
    with open(root / "huge.bin", "wb") as f:
        f.truncate(256 * MiB)  # more than the sockets' buffers hold: every sender waits for room
    m = served(masters, tmp_path, root, nofile=600, proxy={"processes": 1}, frontCache={"enabled": False})
    admitted = int(re.search(r"serving at most (\d+) clients at once", m.master.wait_log("serving at most")).group(1))
    held: list[socket.socket] = []
    with closing_all(held):
        for _ in range(admitted):
            s = socket.socket()
            held.append(s)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # (before connecting: a small window)
            s.settimeout(20)
            s.connect(("127.0.0.1", m.port))
            s.sendall(request("GET", "/huge.bin"))
        heads = [s.recv(64).split(b"\r\n", 1)[0] for s in held]
        assert heads == [b"HTTP/1.1 200 OK"] * admitted, {h: heads.count(h) for h in set(heads)}
        wait_until(lambda: m.json()["proxy"]["client_connections"] == admitted, timeout=20,
                   message="every download under way at once")
    log = m.master.log()
    assert "proxy error" not in log and "short of file descriptors" not in log, log[-3000:]
    assert m.json()["proxy"]["truncated_responses"] == 0
    wait_until(lambda: m.json()["proxy"]["client_connections"] == 0, timeout=30, message="all gone")
    assert get(m, "/a.txt")[0] == 200


# -- 6. reloads and the front cache -------------------------------------------------------------------
def test_a_reload_that_changes_the_root_serves_the_new_site_at_once(masters, tmp_path):
    old, new = tmp_path / "old", tmp_path / "new"
    old.mkdir()
    new.mkdir()
    (old / "a.txt").write_text("old site\n")
    (old / "only-old.txt").write_text("gone after the reload\n")
    (new / "a.txt").write_text("new site\n")
    m = served(masters, tmp_path, old, proxy={"processes": 1})  # (one front cache to count hits in)
    for path in ("/a.txt", "/only-old.txt"):
        assert get(m, path)[0] == 200
        assert get(m, path)[0] == 200
    assert m.json()["front_cache"]["hits"] >= 2
    m.master.write_config(dict(m.master.config, baseDirectory=str(new)))
    m.master.signal(1)  # SIGHUP
    m.master.wait_log("reload done")
    assert get(m, "/a.txt")[2] == b"new site\n"
    assert get(m, "/only-old.txt")[0] == 404


def test_a_changed_or_deleted_file_leaves_the_front_cache_within_the_cache_ttl(masters, tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    (root / "a.txt").write_text("version 1\n")
    (root / "b.txt").write_text("short-lived\n")
    m = served(masters, tmp_path, root, cache={"ttl": 0.5}, proxy={"processes": 1})
    for path in ("/a.txt", "/b.txt"):
        get(m, path)
        assert get(m, path)[0] == 200
    hits = m.json()["front_cache"]["hits"]
    assert hits >= 2
    (root / "a.txt").write_text("version 2, longer\n")
    (root / "b.txt").unlink()
    # The workers send max-age=60; the front cache must not hold on to either for that long.
    wait_until(lambda: get(m, "/a.txt")[2] == b"version 2, longer\n", timeout=10, message="the new a.txt")
    wait_until(lambda: get(m, "/b.txt")[0] == 404, timeout=10, message="b.txt gone")
    # An unchanged file is revalidated, not fetched again.
    def revalidated() -> int:
        assert get(m, "/a.txt")[2] == b"version 2, longer\n"
        return m.json()["front_cache"].get("revalidated", 0)
    wait_until(revalidated, timeout=10, message="a revalidation answered 304 by a worker")


def test_filling_the_front_cache_grows_the_master_by_at_most_its_budget_and_a_quarter(masters, tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    budget = 16 * MiB
    sizes = [512, 4096, 20000, 100_000]  # small ones weigh their bookkeeping, big ones their bytes
    files = []
    for i in range(6000):
        size = sizes[i % len(sizes)]
        (root / f"f{i}.bin").write_bytes(os.urandom(size))
        files.append(f"/f{i}.bin")
    # One proxy process: a single connection fills one proxy's cache, and the whole budget is its.
    m = served(masters, tmp_path, root, frontCache={"maxBytes": budget}, proxy={"processes": 1})
    with connect(m) as s:  # warm up the proxy's own allocations before measuring
        for path in files[:50]:
            s.sendall(request("GET", path + "?warmup"))
            Responses(s).next()
    before = proxies_rss_kib(m.master.pid)
    with connect(m) as s:
        responses = Responses(s)
        for i in range(0, len(files), 50):
            s.sendall(b"".join(request("GET", path) for path in files[i:i + 50]))
            for _ in files[i:i + 50]:
                assert responses.next()[0] == 200
    cache = m.json()["front_cache"]
    assert cache["bytes"] > budget * 0.9, cache
    grown = proxies_rss_kib(m.master.pid) - before
    assert grown * 1024 <= 1.25 * budget, f"RSS grew {grown} KiB for a {budget // 1024} KiB front cache"


# -- concerns: the connection limit and pipelining memory ---------------------------------------------
def test_at_the_connection_limit_the_oldest_idle_connections_make_room(masters, tmp_path, site):
    m = served(masters, tmp_path, site, proxy={"maxConnections": 50, "processes": 1})  # (one proxy's limit)
    idle = []
    with closing_all(idle):
        for _ in range(50):
            s = connect(m)
            s.sendall(request("GET", "/a.txt"))
            Responses(s).next()
            idle.append(s)
        for _ in range(20):  # each newcomer is served, none is turned away
            assert get(m, "/a.txt")[0] == 200
        assert m.json()["proxy"]["rejected_connections"] == 0
        closed = [s for s in idle if Responses(s).at_eof()]
        assert len(closed) >= 20  # idle ones went to make room


def test_at_the_connection_limit_newcomers_wait_in_the_backlog(masters, tmp_path, site):
    m = served(masters, tmp_path, site, proxy={"maxConnections": 20, "headerTimeout": 30, "processes": 1})
    busy = []
    with closing_all(busy):
        for _ in range(20):  # every connection in the middle of a request head: none can be closed
            s = connect(m)
            s.sendall(b"GET /a.txt HTTP/1.1\r\nHost: x\r\n")
            busy.append(s)
        wait_until(lambda: m.json()["proxy"]["client_connections"] == 20)
        waiting = connect(m, timeout=20)
        waiting.sendall(request("GET", "/a.txt", close=True))
        waiting.settimeout(0.5)
        with pytest.raises(socket.timeout):
            waiting.recv(1)  # neither served nor refused while the proxy is full
        busy.pop().sendall(b"\r\n")  # one request completes and its connection leaves
        waiting.settimeout(20)
        assert Responses(waiting).next()[0] == 200
        waiting.close()
        assert m.json()["proxy"]["rejected_connections"] == 0


def test_memory_for_requests_pipelined_but_never_read_is_bounded(masters, tmp_path, site):
    m = served(masters, tmp_path, site, frontCache={"enabled": False})
    burst = request("GET", "/a.txt?x") * 12_000  # 265 KB of requests
    for _ in range(20):  # warm up
        get(m, "/a.txt?x")
    before = proxies_rss_kib(m.master.pid)
    held = []
    with closing_all(held):
        for _ in range(50):
            s = connect(m)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.setblocking(False)
            try:
                s.send(burst)
            except BlockingIOError:
                pass
            held.append(s)
        wait_until(lambda: m.json()["proxy"]["client_connections"] == 50)
        samples = [proxies_rss_kib(m.master.pid)]

        def settled() -> bool:  # the proxy has read what it will
            samples.append(proxies_rss_kib(m.master.pid))
            return abs(samples[-1] - samples[-2]) < 256
        wait_until(settled, timeout=20, interval=0.3, message="the master's memory settled")
        grown = samples[-1] - before
        assert grown < 50 * 400, f"{grown / 50:.0f} KiB per connection"  # was 2 MB each
