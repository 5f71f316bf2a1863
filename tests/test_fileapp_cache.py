"""The response cache: hits do no filesystem work, TTL-bounded staleness, invalidation of changed
and deleted files, the byte bound and its counters, and consistency under concurrent threads."""
from __future__ import annotations

import gzip
import os
import random
import threading
import time

import pytest
from werkzeug.test import Client
from werkzeug.wsgi import FileWrapper

from fileapp import create_app, handoff, loader
from fileapp.cache import ResponseCache
from fileapp.handoff import directory_stamp
from support import wait_until

pytestmark = pytest.mark.unit


class Sized:
    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes


def test_response_cache_counts_hits_misses_evictions_and_expirations():
    now = [100.0]
    cache = ResponseCache(ttl=10, max_bytes=1000, timer=lambda: now[0])
    assert cache.get("a") is None
    cache.put("a", Sized(400))
    cache.put("b", Sized(400))
    assert cache.get("a").nbytes == 400  # "a" is now the most recently used
    cache.put("c", Sized(400))  # over 1000 bytes: evicts the least recently used, "b"
    assert cache.get("b") is None
    assert cache.get("c") is not None
    stats = cache.stats()
    assert (stats["hits"], stats["misses"], stats["evictions"]) == (2, 2, 1)
    assert stats["entries"] == 2 and stats["bytes"] == 800
    now[0] += 10.5
    assert cache.get("a") is None
    stats = cache.stats()
    assert stats["expirations"] == 2 and stats["entries"] == 0 and stats["bytes"] == 0


def test_response_cache_refuses_oversized_and_disabled():
    cache = ResponseCache(ttl=10, max_bytes=100)
    cache.put("big", Sized(101))
    assert cache.get("big") is None
    off = ResponseCache(ttl=0, max_bytes=100)
    off.put("x", Sized(1))
    assert off.get("x") is None
    cache.put("x", Sized(10))
    cache.clear()
    assert cache.stats()["evictions"] == 0 and cache.stats()["entries"] == 0


@pytest.fixture
def root(tmp_path):
    r = tmp_path / "root"
    r.mkdir()
    (r / "a.txt").write_bytes(b"version one\n")
    (r / "big.bin").write_bytes(os.urandom(300_000))
    (r / "style.css").write_bytes(b"x" * 500)
    (r / "style.css.gz").write_bytes(b"gz" * 100)
    (r / "sub").mkdir()
    (r / "sub" / "index.html").write_bytes(b"index")
    return r


def test_hit_and_miss_counters(root):
    app = create_app(str(root))
    c = Client(app)
    assert c.get("/a.txt").data == b"version one\n"
    assert app.cache.stats()["misses"] == 1 and app.cache.stats()["hits"] == 0
    for _ in range(5):
        assert c.get("/a.txt").status_code == 200
    stats = app.cache.stats()
    assert stats["hits"] == 5 and stats["misses"] == 1 and stats["entries"] == 1


def test_a_hit_does_no_filesystem_work(root, monkeypatch):
    app = create_app(str(root))
    c = Client(app)
    paths = ["/a.txt", "/style.css", "/sub/", "/sub"]
    for path in paths:
        c.get(path, headers={"Accept-Encoding": "gzip"})
    calls = []
    for name in ("open", "stat", "lstat", "fstat", "read", "pread", "scandir", "access"):
        real = getattr(os, name)

        def spy(*args, _name=name, _real=real, **kwargs):
            calls.append(_name)
            return _real(*args, **kwargs)
        monkeypatch.setattr(os, name, spy)
    responses = [c.get(p, headers={"Accept-Encoding": "gzip", "Range": "bytes=0-3"})
                 for p in paths]
    monkeypatch.undo()
    assert [r.status_code for r in responses] == [206, 206, 206, 301]
    assert calls == []


def test_changed_file_is_served_fresh_once_the_ttl_allows(root):
    app = create_app(str(root), cache_ttl=0.3)
    c = Client(app)
    assert c.get("/a.txt").data == b"version one\n"
    tag = c.get("/a.txt").headers["ETag"]
    (root / "a.txt").write_bytes(b"version two, longer\n")
    # Within the TTL the prepared response stands (the documented staleness bound) ...
    assert c.get("/a.txt").data == b"version one\n"
    # ... and once it has passed, the new bytes and a new ETag are served.
    fresh = wait_until(lambda: (r := c.get("/a.txt")).data == b"version two, longer\n" and r,
                       timeout=5, message="fresh content")
    assert fresh.headers["ETag"] != tag
    assert fresh.headers["Content-Length"] == str(len(b"version two, longer\n"))


def test_same_size_same_mtime_rewrite_is_still_picked_up(root):
    app = create_app(str(root), cache_ttl=0.2)
    c = Client(app)
    st = os.stat(root / "a.txt")
    assert c.get("/a.txt").data == b"version one\n"
    (root / "a.txt").write_bytes(b"version 1!!\n")
    os.utime(root / "a.txt", ns=(st.st_atime_ns, st.st_mtime_ns))
    wait_until(lambda: c.get("/a.txt").data == b"version 1!!\n", timeout=5,
               message="rewritten content")


def test_deleted_file_is_404_once_the_ttl_allows(root):
    app = create_app(str(root), cache_ttl=0.3)
    c = Client(app)
    assert c.get("/a.txt").status_code == 200
    (root / "a.txt").unlink()
    wait_until(lambda: c.get("/a.txt").status_code == 404, timeout=5, message="404 after delete")


@pytest.mark.parametrize("wrapper", [None, FileWrapper])
def test_streamed_file_is_validated_on_every_request(root, wrapper):
    app = create_app(str(root), cache_ttl=3600, cache_max_file_size=100_000)
    c = Client(app)
    env = {"wsgi.file_wrapper": wrapper} if wrapper else {}
    first = c.get("/big.bin", environ_overrides=env)
    assert first.data == (root / "big.bin").read_bytes()
    new = os.urandom(260_000)
    (root / "big.bin").write_bytes(new)  # same inode, new size: caught by the fstat check
    r = c.get("/big.bin", environ_overrides=env)
    assert r.data == new and r.headers["Content-Length"] == "260000"
    assert r.headers["ETag"] != first.headers["ETag"]
    replacement = root / "big.tmp"
    replacement.write_bytes(b"r" * 270_000)
    os.replace(replacement, root / "big.bin")  # new inode
    r = c.get("/big.bin", environ_overrides=env)
    assert r.data == b"r" * 270_000
    (root / "big.bin").unlink()
    assert c.get("/big.bin", environ_overrides=env).status_code == 404


def test_large_files_are_not_held_in_memory(root):
    app = create_app(str(root), cache_max_file_size=1000)
    c = Client(app)
    assert len(c.get("/big.bin").data) == 300_000
    assert app.cache.stats()["bytes"] < 10_000


def test_byte_bound_evicts_least_recently_used(tmp_path):
    root = tmp_path / "many"
    root.mkdir()
    for i in range(10):
        (root / f"f{i}.bin").write_bytes(bytes([i]) * 4096)
    app = create_app(str(root), cache_max_bytes=20_000)
    c = Client(app)
    for i in range(10):
        assert c.get(f"/f{i}.bin").data == bytes([i]) * 4096
    stats = app.cache.stats()
    assert stats["bytes"] <= 20_000
    assert stats["evictions"] >= 5
    assert 0 < stats["entries"] < 10
    # The most recent file is still a hit; the first one was evicted and is a miss again.
    misses = stats["misses"]
    assert c.get("/f9.bin").status_code == 200
    assert app.cache.stats()["misses"] == misses
    assert c.get("/f0.bin").data == bytes([0]) * 4096
    assert app.cache.stats()["misses"] == misses + 1


def test_concurrent_requests_stay_consistent_while_files_change(tmp_path):
    """16 threads on a small cache (constant eviction) while a writer replaces files."""
    root = tmp_path / "busy"
    root.mkdir()
    versions: dict[str, dict[bytes, str]] = {}

    def publish(name: str, version: int) -> None:
        body = f"{name} version {version} ".encode() * (50 + version % 7)
        mtime_ns = 1_600_000_000_000_000_000 + version * 1_000_000_000
        tmp = root / f".{name}.tmp"
        tmp.write_bytes(body)
        os.utime(tmp, ns=(mtime_ns, mtime_ns))
        versions.setdefault(name, {})[body] = f'"{mtime_ns:x}-{len(body):x}"'
        os.replace(tmp, root / name)

    names = [f"file{i}.txt" for i in range(30)]
    for name in names:
        publish(name, 0)
    app = create_app(str(root), cache_ttl=0.05, cache_max_bytes=30_000,
                     cache_max_file_size=2_000)
    stop = threading.Event()
    errors: list[str] = []
    requests_done = [0]
    lock = threading.Lock()

    def writer() -> None:
        rng = random.Random(1)
        version = 1
        while not stop.is_set():
            publish(rng.choice(names), version)
            version += 1
            time.sleep(0.002)

    def reader(seed: int) -> None:
        rng = random.Random(seed)
        client = Client(app)
        for _ in range(150):
            name = rng.choice(names)
            r = client.get("/" + name)
            body = r.data
            with lock:
                requests_done[0] += 1
            if r.status_code != 200:
                errors.append(f"{name}: {r.status_code}")
            elif int(r.headers["Content-Length"]) != len(body):
                errors.append(f"{name}: length mismatch")
            elif body not in versions[name]:
                errors.append(f"{name}: unknown body")
            elif versions[name][body] != r.headers["ETag"]:
                errors.append(f"{name}: ETag does not describe the body")

    threads = [threading.Thread(target=reader, args=(i,)) for i in range(16)]
    w = threading.Thread(target=writer)
    w.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    stop.set()
    w.join(10)
    assert errors == []
    stats = app.cache.stats()
    assert requests_done[0] == 16 * 150
    assert stats["hits"] + stats["misses"] == 16 * 150
    assert stats["hits"] > 0 and stats["evictions"] > 0
    assert stats["bytes"] <= 30_000


def test_every_expired_entry_the_cache_holds_gets_the_cheap_check(tmp_path):
    """Entries whose time is up stay in the cache (within its byte bound) until checked: a
    site of many big files is rechecked with stats, not resolved anew, however many there are
    (a side table of expired entries held a quarter of the bound: the rest were resolved)."""
    root = tmp_path / "site"
    root.mkdir()
    names = [f"f{i:02d}.bin" for i in range(40)]
    for name in names:
        (root / name).write_bytes(name.encode() * 500)
    now = [0.0]
    app = create_app(str(root), cache_ttl=1, cache_max_bytes=64 * 1024, cache_max_file_size=1000)
    app.cache = app.loader.cache = ResponseCache(1, 64 * 1024, timer=lambda: now[0])
    opened = []
    real_open = app.resolver.open
    app.resolver.open = lambda parts: opened.append(parts) or real_open(parts)
    c = Client(app)
    for name in names:
        assert c.get("/" + name).data == name.encode() * 500
    assert app.cache.stats()["entries"] == 40 and app.cache.stats()["bytes"] <= 64 * 1024
    resolved = len(opened)
    for _ in range(3):
        now[0] += 2  # past the TTL
        for name in names:
            assert c.get("/" + name).data == name.encode() * 500
    assert len(opened) == resolved
    stats = app.cache.stats()
    assert stats["expirations"] == 3 * 40 and stats["entries"] == 40


def test_the_cheap_check_in_a_settled_directory_looks_for_no_missing_sidecar(tmp_path, monkeypatch):
    """Past its TTL, a file with no sidecars in a directory that kept its stamp is checked with
    two stats (the file, the directory) instead of one more per sidecar it might have gained
    (each a failed stat); a sidecar that appears changes the directory and is seen, and so is
    one that was there too old to serve and is rewritten in place (no change to the directory)."""
    monkeypatch.setattr(handoff, "STAMP_SETTLE", 0.05)
    root = tmp_path / "site"
    root.mkdir()
    big, old = b"b" * 5000, b"o" * 5000
    (root / "big.txt").write_bytes(big)
    (root / "old.txt").write_bytes(old)
    (root / "old.txt.gz").write_bytes(gzip.compress(b"stale"))
    made = os.stat(root / "old.txt").st_mtime_ns
    os.utime(root / "old.txt.gz", ns=(made, made - 10**9))  # older than its file: never served
    wait_until(lambda: directory_stamp(str(root)), timeout=5, message="the directory settled")
    now = [0.0]
    app = create_app(str(root), cache_ttl=1, cache_max_file_size=1000)
    app.cache = app.loader.cache = ResponseCache(1, 1 << 20, timer=lambda: now[0])  # a clock moved by hand
    looked_at: list[str] = []

    class CountingOs:
        def __getattr__(self, name):
            return getattr(os, name)

        def stat(self, path, *args, **kwargs):
            looked_at.append(os.fsdecode(path))
            return os.stat(path, *args, **kwargs)

    monkeypatch.setattr(loader, "os", CountingOs())
    monkeypatch.setattr(handoff, "os", CountingOs())  # (the directory's stamp is taken there)
    c = Client(app)

    def get(name: str, coding: str | None = None):
        now[0] += 2  # past the TTL every time
        r = c.get("/" + name, headers={"Accept-Encoding": coding} if coding else {})
        return r.status_code, r.headers.get("Content-Encoding"), r.data

    assert get("big.txt") == (200, None, big)
    assert get("old.txt", "gzip") == (200, None, old)
    looked_at.clear()
    for _ in range(3):
        assert get("big.txt", "gzip") == (200, None, big)
    assert looked_at == [str(root / "big.txt"), str(root)] * 3
    stamp = directory_stamp(str(root))
    with open(root / "old.txt.gz", "r+b") as f:  # rewritten in place, made from its file now
        f.write(gzip.compress(old))
        f.truncate()
    os.utime(root / "old.txt.gz", ns=(made, made + 1))
    assert directory_stamp(str(root)) == stamp
    assert get("old.txt", "gzip")[:2] == (200, "gzip")
    (root / "big.txt.gz").write_bytes(gzip.compress(big))  # a sidecar appears
    os.utime(root / "big.txt.gz", ns=(time.time_ns(), os.stat(root / "big.txt").st_mtime_ns + 1))
    assert get("big.txt", "gzip")[:2] == (200, "gzip")


def test_an_expired_streamed_entry_is_kept_after_one_cheap_check(tmp_path):
    """Past its TTL an entry of a file served from disk is checked with stats, not resolved
    anew, while the file and its sidecars are unchanged; any change is seen."""
    root = tmp_path / "site"
    root.mkdir()
    big = b"b" * 5000
    (root / "big.txt").write_bytes(big)
    now = [0.0]
    app = create_app(str(root), cache_ttl=1, cache_max_file_size=1000)
    app.cache = app.loader.cache = ResponseCache(1, 1 << 20, timer=lambda: now[0])  # a clock moved by hand
    opened = []
    real_open = app.resolver.open
    app.resolver.open = lambda parts: opened.append(parts) or real_open(parts)
    c = Client(app)

    def get(headers=None):
        now[0] += 2  # past the TTL every time
        r = c.get("/big.txt", headers=headers or {})
        return r.status_code, r.headers.get("Content-Encoding"), r.data

    assert get() == (200, None, big)
    resolutions = len(opened)
    assert resolutions >= 1
    for _ in range(3):
        assert get() == (200, None, big)
    assert len(opened) == resolutions  # checked, not resolved again
    (root / "big.txt.gz").write_bytes(gzip.compress(big))  # a sidecar appears
    os.utime(root / "big.txt.gz", ns=(time.time_ns(), os.stat(root / "big.txt").st_mtime_ns + 1))
    assert get({"Accept-Encoding": "gzip"})[:2] == (200, "gzip")
    (root / "big.txt.gz").unlink()  # and goes
    assert get({"Accept-Encoding": "gzip"}) == (200, None, big)
    replaced = root / "new.tmp"
    replaced.write_bytes(b"n" * 5000)
    os.replace(replaced, root / "big.txt")  # same size, a new inode
    assert get() == (200, None, b"n" * 5000)
    os.unlink(root / "big.txt")
    os.symlink(tmp_path / "elsewhere.txt", root / "big.txt")  # to outside the root
    (tmp_path / "elsewhere.txt").write_bytes(big)
    assert get()[0] == 404
