"""The front cache: what it stores (only cacheable GET 200s), how it answers (hits, 304, HEAD,
per encoding class), when it lets go (max-age, byte bounds), and its off switch."""
from __future__ import annotations

import socket
import time
from urllib.parse import urlsplit

import pytest
import requests

from arbiter.config import FrontCacheConfig, configured
from arbiter.proxy.cache import Entry, FrontCache, encoding_class, freshness
from arbiter.proxy.reader import MAX_PIPELINE
from proxy_harness import NO_CACHE, ProxyThread, RawUpstream, Worker, parse_responses, raw
from support import wait_until

pytestmark = pytest.mark.unit

LM = b"Tue, 14 Nov 2023 22:13:20 GMT"


class Origin:
    """A scripted worker: `routes[path] = (status, [header lines], body)`; counts each request."""

    def __init__(self) -> None:
        self.routes: dict[str, tuple[int, list[bytes], bytes]] = {}
        self.hits: dict[str, int] = {}
        self.conditional: set[str] = set()  # paths answered 304 to If-None-Match: "v1"
        self.heads: list[bytes] = []
        self.upstream = RawUpstream(self._respond)
        self.port = self.upstream.port

    def _respond(self, head: bytes, body: bytes, conn) -> bool:
        target = head.split(b" ")[1].decode()
        path = urlsplit(target).path
        self.hits[path] = self.hits.get(path, 0) + 1
        self.heads.append(head)
        status, headers, payload = self.routes.get(path, (404, [], b"missing"))
        if path in self.conditional and b'\r\nif-none-match: "v1"' in head.lower():
            status, payload = 304, b""
        if callable(payload):
            payload = payload(head)
        lines = [b"HTTP/1.1 %d X" % status, *headers]
        if isinstance(payload, tuple):  # sent chunked
            lines.append(b"Transfer-Encoding: chunked")
            payload = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in payload) + b"0\r\n\r\n"
        elif status not in (204, 304):
            lines.append(b"Content-Length: %d" % len(payload))
        conn.sendall(b"\r\n".join(lines) + b"\r\n\r\n" + (payload if not head.startswith(b"HEAD") else b""))
        return True

    def route(self, path: str, body: bytes = b"x" * 1024, status: int = 200, cc: str | None = "max-age=60",
              extra: tuple[bytes, ...] = ()) -> None:
        headers = [b'ETag: "v1"', b"Last-Modified: " + LM, b"Content-Type: text/plain", *extra]
        if cc is not None:
            headers.append(b"Cache-Control: " + cc.encode())
        self.routes[path] = (status, headers, body)

    def stop(self) -> None:
        self.upstream.stop()


@pytest.fixture
def origin():
    o = Origin()
    yield o
    o.stop()


@pytest.fixture
def proxy(origin):
    # Revalidation (after cache.ttl) has its own tests below; here entries live their max-age.
    p = ProxyThread([origin.port], revalidate_after=3600)
    yield p
    p.stop()


def get(p, path, **headers):
    return requests.get(p.url + path, headers=headers)


# -- units ------------------------------------------------------------------------------
def test_encoding_class_normalises_order_and_weights():
    assert encoding_class(b"gzip, deflate, br") == encoding_class(b"br,gzip ,deflate")
    assert encoding_class(b"gzip, br;q=0") == encoding_class(b"gzip")
    assert encoding_class(b"gzip;q=0.5, br") != encoding_class(b"gzip, br;q=0.5")
    assert encoding_class(None) != encoding_class(b"identity") != encoding_class(b"gzip")
    # Identity weighs 1 unless named: here a worker prefers identity, there gzip.
    assert encoding_class(b"br, gzip;q=0.5") != encoding_class(b"br, gzip")
    assert encoding_class(b"gzip;q=0.5, identity") == encoding_class(b"gzip;q=0.5")
    # x-gzip is gzip to a worker (fileapp.semantics.choose_encoding): it gets gzip, which must
    # never be served to a client that only takes identity.
    assert encoding_class(b"x-gzip") == encoding_class(b"gzip") != encoding_class(b"identity")
    assert encoding_class(b"x-gzip;q=0.5, gzip;q=0") == encoding_class(b"identity")


def test_freshness_from_cache_control():
    assert freshness(b"public, max-age=60") == 60
    assert freshness(b"max-age=60, s-maxage=5") == 5
    for value in (None, b"no-store, max-age=60", b"private, max-age=60", b"no-cache", b"max-age=0",
                  b"max-age=abc", b"max-age=-1", b"public"):
        assert freshness(value) == 0, value


def test_entry_conditionals():
    e = Entry([(b"etag", b"ETag", b'"abc"'), (b"last-modified", b"Last-Modified", LM)], b"body", 60, 0.0)
    assert e.not_modified(b'"abc"', None)
    assert e.not_modified(b'"x", W/"abc"', None)  # weak comparison for GET/HEAD
    assert e.not_modified(b"*", None)
    assert not e.not_modified(b'"other"', LM)  # If-None-Match wins over If-Modified-Since
    assert e.not_modified(None, LM)
    assert e.not_modified(None, b"Wed, 15 Nov 2023 00:00:00 GMT")
    assert not e.not_modified(None, b"Mon, 13 Nov 2023 00:00:00 GMT")
    assert not e.not_modified(None, b"not a date")


def test_cache_bounds_bytes_and_object_size():
    cache = FrontCache(max_bytes=50_000, max_object_bytes=4_000)
    assert not cache.store(b"/big", None, False, [], b"b" * 4_001, 60)
    for i in range(100):
        cache.store(b"/%d" % i, None, False, [], b"s" * 1000, 60)
    assert 0 < len(cache) < 100 and cache.bytes <= 50_000
    assert cache.get(b"/99", None) is not None  # the most recent stay
    assert cache.get(b"/0", None) is None  # the least recently used went first


def test_cache_variants_by_encoding_only_when_the_worker_varies():
    cache = FrontCache(max_bytes=50_000, max_object_bytes=4_000)
    cache.store(b"/plain", b"gzip", False, [], b"p", 60)
    assert cache.get(b"/plain", b"br") is not None and cache.get(b"/plain", None) is not None
    cache.store(b"/v", b"gzip", True, [], b"g", 60)
    assert cache.get(b"/v", b"gzip").body == b"g"
    assert cache.get(b"/v", b"br") is None and cache.get(b"/v", None) is None
    cache.invalidate(b"/v")
    assert cache.get(b"/v", b"gzip") is None


# -- through the proxy --------------------------------------------------------------------
def test_hit_after_miss_never_reaches_the_worker(proxy, origin):
    origin.route("/a")
    first, second = get(proxy, "/a"), get(proxy, "/a")
    assert first.content == second.content == b"x" * 1024
    assert origin.hits["/a"] == 1
    assert second.headers["ETag"] == '"v1"' and second.headers["Content-Length"] == "1024"
    assert second.headers["Via"] == "1.1 gows"
    fc = proxy.stats()["front_cache"]
    assert (fc["hits"], fc["misses"], fc["entries"]) == (1, 1, 1) and fc["bytes"] >= 1024


def test_conditional_requests_answered_304_from_cache(proxy, origin):
    origin.route("/c")
    get(proxy, "/c")
    r = get(proxy, "/c", **{"If-None-Match": '"v1"'})
    assert r.status_code == 304 and r.content == b"" and r.headers["ETag"] == '"v1"'
    assert "Content-Length" not in r.headers or r.headers["Content-Length"] == "0"
    r = get(proxy, "/c", **{"If-Modified-Since": LM.decode()})
    assert r.status_code == 304
    r = get(proxy, "/c", **{"If-None-Match": '"v0"'})
    assert r.status_code == 200 and len(r.content) == 1024
    assert origin.hits["/c"] == 1


def test_head_answered_from_cache_without_body(proxy, origin):
    origin.route("/h")
    data = raw(proxy.port, b"HEAD /h HTTP/1.1\r\nHost: t\r\n\r\nGET /h HTTP/1.1\r\nHost: t\r\n\r\n"
                           b"HEAD /h HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
    head1, rest = data.split(b"\r\n\r\n", 1)
    assert b"HTTP/1.1 200" in head1 and b"Content-Length: 1024" in head1
    (s2, _, b2), = parse_responses(rest[: rest.index(b"HTTP/1.1 200", 1)])
    assert s2 == 200 and len(b2) == 1024
    head3 = rest[rest.index(b"HTTP/1.1 200", 1):]
    assert head3.endswith(b"\r\n\r\n") and b"Content-Length: 1024" in head3 and b"Connection: close" in head3
    assert origin.hits["/h"] == 2  # the first HEAD went through (and stored nothing), the GET filled
    assert proxy.stats()["front_cache"]["hits"] == 1


@pytest.mark.parametrize("status,cc,extra,req_headers", [
    (404, "max-age=60", (), {}),
    (500, "max-age=60", (), {}),
    (206, "max-age=60", (b"Content-Range: bytes 0-9/100",), {}),
    (200, "max-age=60", (b"Set-Cookie: s=1",), {}),
    (200, "max-age=60", (b"Vary: User-Agent",), {}),
    (200, "max-age=60", (b"Vary: *",), {}),
    (200, "no-store, max-age=60", (), {}),
    (200, "private, max-age=60", (), {}),
    (200, "no-cache", (), {}),
    (200, "max-age=0", (), {}),
    (200, None, (), {}),
    (200, "max-age=60", (b"Age: 60",), {}),
    (200, "max-age=60", (), {"Range": "bytes=0-9"}),
    (200, "max-age=60", (), {"Authorization": "Basic eDp5"}),
    (200, "max-age=60", (), {"Cookie": "s=1"}),
])
def test_never_cached(proxy, origin, status, cc, extra, req_headers):
    origin.route("/n", status=status, cc=cc, extra=extra)
    for _ in range(3):
        assert get(proxy, "/n", **req_headers).status_code == status
    assert origin.hits["/n"] == 3
    assert proxy.stats()["front_cache"]["entries"] == 0


def test_post_not_cached_and_invalidates(proxy, origin):
    origin.route("/p")
    get(proxy, "/p")
    requests.post(proxy.url + "/p", data=b"x")
    assert origin.hits["/p"] == 2
    get(proxy, "/p")
    assert origin.hits["/p"] == 3  # the POST dropped the cached GET


def test_max_age_expiry_and_age_header(proxy, origin):
    origin.route("/e", cc="max-age=2")
    get(proxy, "/e")
    time.sleep(1.3)
    r = get(proxy, "/e")
    assert origin.hits["/e"] == 1 and int(r.headers["Age"]) >= 1
    time.sleep(1.5)
    r = get(proxy, "/e")
    assert origin.hits["/e"] == 2 and "Age" not in r.headers


def test_upstream_age_shortens_freshness(proxy, origin):
    origin.route("/a2", cc="max-age=60", extra=(b"Age: 30",))
    get(proxy, "/a2")
    r = get(proxy, "/a2")
    assert origin.hits["/a2"] == 1 and r.headers["Age"] == "30"


def test_cache_keyed_on_negotiated_encoding_class(proxy, origin):
    origin.routes["/v"] = (200, [b"Cache-Control: max-age=60", b"Vary: Accept-Encoding"],
                           lambda head: b"gz" if b"gzip" in head else b"plain")
    assert get(proxy, "/v", **{"Accept-Encoding": "gzip, deflate"}).content == b"gz"
    assert get(proxy, "/v", **{"Accept-Encoding": "identity"}).content == b"plain"
    assert get(proxy, "/v", **{"Accept-Encoding": "deflate,gzip"}).content == b"gz"
    assert get(proxy, "/v", **{"Accept-Encoding": "identity"}).content == b"plain"
    assert origin.hits["/v"] == 2
    r = get(proxy, "/v", **{"Accept-Encoding": "gzip, deflate"})
    assert r.headers["Vary"] == "Accept-Encoding"  # kept, for caches further down


def test_object_larger_than_limit_passes_uncached(origin):
    p = ProxyThread([origin.port], front_cache=configured(FrontCacheConfig, maxObjectBytes=2000))
    with p:
        origin.route("/big", body=b"b" * 3000)
        origin.route("/small", body=b"s" * 1000)
        for _ in range(2):
            assert len(get(p, "/big").content) == 3000
            assert len(get(p, "/small").content) == 1000
        assert origin.hits == {"/big": 2, "/small": 1}


def test_bytes_bound_holds_through_the_proxy(origin):
    p = ProxyThread([origin.port], front_cache=configured(FrontCacheConfig, maxBytes=40_000))
    with p:
        for i in range(60):
            origin.route(f"/f{i}")
            get(p, f"/f{i}")
        fc = p.stats()["front_cache"]
        assert 0 < fc["entries"] < 60 and fc["bytes"] <= 40_000


def test_off_switch_and_reload(origin):
    p = ProxyThread([origin.port], front_cache=NO_CACHE)
    with p:
        origin.route("/o")
        for _ in range(3):
            get(p, "/o")
        assert origin.hits["/o"] == 3 and p.stats()["front_cache"]["enabled"] is False
        p.update(front_cache=configured(FrontCacheConfig))
        get(p, "/o")
        get(p, "/o")
        assert origin.hits["/o"] == 4
        p.update(front_cache=NO_CACHE)
        get(p, "/o")
        assert origin.hits["/o"] == 5


def test_cached_responses_honour_client_connection_handling(proxy, origin):
    origin.route("/k", body=b"k" * 10)
    get(proxy, "/k")
    data = raw(proxy.port, b"GET /k HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"
                           b"GET /k HTTP/1.0\r\nConnection: keep-alive\r\n\r\nGET /k HTTP/1.0\r\n\r\n")
    responses = parse_responses(data)
    assert [h.get("connection") for _, h, _ in responses] == ["keep-alive", "keep-alive", "close"]
    assert all(b == b"k" * 10 for _, _, b in responses)
    assert origin.hits["/k"] == 1


def test_chunked_cacheable_response_stored_with_content_length(proxy, origin):
    origin.routes["/ch"] = (200, [b"Cache-Control: max-age=60"], (b"abc", b"def", b"g"))
    r1 = get(proxy, "/ch")
    assert r1.content == b"abcdefg" and r1.headers["Transfer-Encoding"] == "chunked"
    r2 = get(proxy, "/ch")
    assert r2.content == b"abcdefg" and r2.headers["Content-Length"] == "7"
    assert "Transfer-Encoding" not in r2.headers and origin.hits["/ch"] == 1


@pytest.mark.integration  # starts a server process
def test_gunicorn_worker_files_cached_with_validators():
    w = Worker()
    p = ProxyThread([w])
    with w, p:
        a = requests.get(p.url + "/file/a")
        b = requests.get(p.url + "/file/a")
        assert a.headers["X-Count"] == b.headers["X-Count"] and a.content == b.content  # one worker visit
        c = requests.get(p.url + "/file/a", headers={"If-None-Match": a.headers["ETag"]})
        assert c.status_code == 304
        r = requests.get(p.url + "/file/a", headers={"Range": "bytes=0-3"})
        assert r.status_code == 206 and r.content == bytes(range(4))  # ranges go to the worker
        assert p.stats()["front_cache"]["hits"] == 2


# -- revalidation: an entry older than the workers' cache TTL is checked before it is served ------
@pytest.fixture
def revalidating(origin):
    p = ProxyThread([origin.port], revalidate_after=0.3)
    yield p
    p.stop()


def test_a_stale_entry_is_revalidated_and_served_while_the_worker_answers_304(revalidating, origin):
    origin.route("/r", cc="max-age=600")
    origin.conditional.add("/r")
    assert get(revalidating, "/r").content == b"x" * 1024
    get(revalidating, "/r")
    assert origin.hits["/r"] == 1
    time.sleep(0.7)  # older than the revalidation interval (and the proxy's 0.25 s clock)
    r = get(revalidating, "/r")
    assert (r.status_code, r.content, origin.hits["/r"]) == (200, b"x" * 1024, 2)
    assert b'\r\nIf-None-Match: "v1"' in origin.heads[-1]
    assert "Age" not in r.headers  # confirmed just now
    get(revalidating, "/r")
    assert origin.hits["/r"] == 2  # fresh again: a hit
    assert revalidating.stats()["front_cache"]["revalidated"] == 1


def test_a_client_revalidating_a_stale_entry_gets_304_from_it(revalidating, origin):
    origin.route("/r", cc="max-age=600")
    origin.conditional.add("/r")
    get(revalidating, "/r")
    time.sleep(0.7)
    r = get(revalidating, "/r", **{"If-None-Match": '"v1"'})
    assert r.status_code == 304 and origin.hits["/r"] == 2  # its own condition went to the worker


def test_a_stale_entry_the_worker_no_longer_has_is_dropped(revalidating, origin):
    origin.route("/g", cc="max-age=600")
    origin.conditional.add("/g")
    get(revalidating, "/g")
    origin.routes["/g"] = (404, [b"Cache-Control: max-age=600"], b"gone")
    origin.conditional.discard("/g")
    time.sleep(0.7)
    assert get(revalidating, "/g").status_code == 404
    assert get(revalidating, "/g").status_code == 404
    assert origin.hits["/g"] == 3 and revalidating.stats()["front_cache"]["entries"] == 0


def test_a_changed_entry_is_replaced_by_the_workers_new_answer(revalidating, origin):
    origin.route("/c", body=b"old", cc="max-age=600")
    get(revalidating, "/c")
    origin.route("/c", body=b"new!", cc="max-age=600")  # (not conditional: answers 200 with the new body)
    time.sleep(0.7)
    assert get(revalidating, "/c").content == b"new!"
    assert get(revalidating, "/c").content == b"new!" and origin.hits["/c"] == 2


def test_a_reload_purge_drops_entries_and_answers_on_their_way(origin):
    p = ProxyThread([origin.port])
    with p:
        origin.route("/p")
        get(p, "/p")
        p.call(p.proxy.purge_front_cache)
        assert p.stats()["front_cache"]["entries"] == 0
        get(p, "/p")
        assert origin.hits["/p"] == 2


def test_an_entry_weighs_its_body_once():
    cache = FrontCache(max_bytes=1 << 30, max_object_bytes=1 << 20)
    cache.store(b"/b", None, False, [(b"etag", b"ETag", b'"x"')], b"b" * 100_000, 60)
    entry = cache.get(b"/b", None)
    held = [getattr(entry, name) for name in Entry.__slots__ if isinstance(getattr(entry, name, None), bytes)]
    assert sum(len(b) for b in held) < 100_000 + 2_000  # no second copy in a prepared variant
    assert entry.size >= sum(len(b) for b in held)


@pytest.mark.parametrize("size", [16, 1024, 16384])
def test_the_budget_counts_what_entries_really_hold(size):
    import tracemalloc
    headers = [(b"etag", b"ETag", b'"18ed5ca4eefc7336-3"'), (b"cache-control", b"Cache-Control", b"public, max-age=60"),
               (b"last-modified", b"Last-Modified", LM), (b"content-type", b"Content-Type", b"text/plain; charset=utf-8"),
               (b"accept-ranges", b"Accept-Ranges", b"bytes"), (b"server", b"Server", b"gunicorn")]
    cache = FrontCache(max_bytes=1 << 30, max_object_bytes=1 << 20)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(2000):
            cache.store(b"/files/%d.txt" % i, None, False, headers, b"%d" % i + b"x" * size, 60)
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert held <= cache.bytes <= 1.5 * held, (held, cache.bytes)


def test_pipelined_hits_wait_for_a_client_that_reads_nothing(proxy, origin):
    """Hits are answered at once, but not into a client's full buffer: 2,000 pipelined GETs of
    a stored 16 KB answer from a client that reads nothing held 32 MB in the proxy (a copy each
    over HTTP/1.0 keep-alive or TLS). The queue fills instead, and reading stops."""
    origin.route("/p", body=b"p" * 16000)
    assert get(proxy, "/p").status_code == 200  # stored
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.sendall(b"GET /p HTTP/1.0\r\nConnection: keep-alive\r\n\r\n" * 2000)

        def waiting() -> list[tuple[int, int]]:  # (requests queued, bytes buffered) per client
            return proxy.call(lambda: [(len(c.queue), c.transport.get_write_buffer_size())
                                       for c in proxy.proxy.conns])
        [(_, buffered)] = wait_until(lambda: [w for w in waiting() if w[0] >= MAX_PIPELINE], timeout=10,
                                          message="the pipeline queue full behind a client that reads nothing")
        assert buffered < 1 << 20
        got, tail = 0, b""
        while got < 5:  # the answers held back follow once the client reads (at its tiny window's pace)
            chunk = s.recv(1 << 16)
            assert chunk, got
            got += (tail + chunk).count(b"HTTP/1.1 200 OK")
            tail = chunk[-14:]
