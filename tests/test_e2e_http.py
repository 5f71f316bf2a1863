"""End to end through the public port of a real `python -m arbiter` and its fileapp workers:
the bundled site answers exactly as a worker does (with the front cache on and off), the front
cache serves hits and 304s itself, HTTP/1.0 keep-alive and pipelining, smuggling and limits."""
from __future__ import annotations

import json
import re
import socket
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from e2e_support import Responses, bundled_site, exchange, fetch, request
from master_support import Master, serving
from proxy_harness import parse_responses
from support import free_port, wait_until

pytestmark = pytest.mark.integration

WORKER_TTL = 0.3  # the workers' cache TTL in these masters (cache.ttl)


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    return bundled_site(tmp_path_factory.mktemp("site"))


@pytest.fixture(scope="module")
def cached(tmp_path_factory, site):
    """Front cache on (the default); a short head deadline for the slowloris case; the master's
    access log and admin counters tell what it answered itself and what it sent to a worker."""
    m = serving(tmp_path_factory.mktemp("cached"), site, 2, cache={"ttl": WORKER_TTL},
                proxy={"headerTimeout": 1}, logging={"accessLog": True},
                admin=f"127.0.0.1:{free_port()}")
    yield m
    m.stop()


@pytest.fixture(scope="module")
def uncached(tmp_path_factory, site):
    m = serving(tmp_path_factory.mktemp("uncached"), site, 2, cache={"ttl": WORKER_TTL},
                frontCache={"enabled": False})
    yield m
    m.stop()


@pytest.fixture(scope="module", params=["front-cache", "no-front-cache"])
def master(request) -> Master:
    return request.getfixturevalue("cached" if request.param == "front-cache" else "uncached")


# -- the bundled site, through the master and straight from a worker -----------------------------
# Headers that describe the representation: a proxy must pass every one of them unchanged.
COMPARED = ("etag", "content-range", "content-type", "content-length", "content-encoding", "location",
            "last-modified", "cache-control", "vary", "accept-ranges", "allow", "retry-after")

CASES = {
    "root": ("GET", "/", {}),
    "index": ("GET", "/index.html", {}),
    "head": ("HEAD", "/index.html", {}),
    "image": ("GET", "/logo.png", {}),
    "150k": ("GET", "/downloads/sample-150k.bin", {}),
    "streamed": ("GET", "/big.bin", {}),
    "head streamed": ("HEAD", "/big.bin", {}),
    "404": ("GET", "/missing.txt", {}),
    "head 404": ("HEAD", "/missing.txt", {}),
    "dotfile": ("GET", "/.secret", {}),
    "escape": ("GET", "/../../etc/passwd", {}),
    "encoded escape": ("GET", "/%2e%2e/%2e%2e/etc/passwd", {}),
    "directory redirect": ("GET", "/downloads", {}),
    "redirect with query": ("GET", "/downloads?a=1&b=%20", {}),
    "directory without index": ("GET", "/downloads/", {}),
    "304 etag": ("GET", "/index.html", {"If-None-Match": "{etag}"}),
    "304 etag list": ("GET", "/index.html", {"If-None-Match": '"x", {etag}'}),
    "304 date": ("GET", "/index.html", {"If-Modified-Since": "{last_modified}"}),
    "304 head": ("HEAD", "/logo.png", {"If-None-Match": "{etag}"}),
    "etag mismatch": ("GET", "/index.html", {"If-None-Match": '"other"'}),
    "412": ("GET", "/index.html", {"If-Match": '"other"'}),
    "range": ("GET", "/downloads/sample-150k.bin", {"Range": "bytes=100-199"}),
    "range streamed": ("GET", "/big.bin", {"Range": "bytes=1000000-1065535"}),
    "suffix range": ("GET", "/big.bin", {"Range": "bytes=-500"}),
    "open range": ("GET", "/style.css", {"Range": "bytes=400-"}),
    "multipart": ("GET", "/downloads/sample-150k.bin", {"Range": "bytes=0-9,100-109,-5"}),
    "multipart streamed": ("GET", "/big.bin", {"Range": "bytes=0-99,1500000-1500099"}),
    "if-range etag": ("GET", "/big.bin", {"Range": "bytes=10-19", "If-Range": "{etag}"}),
    "if-range date": ("GET", "/style.css", {"Range": "bytes=10-19", "If-Range": "{last_modified}"}),
    "if-range stale": ("GET", "/style.css", {"Range": "bytes=10-19", "If-Range": '"stale"'}),
    "416": ("GET", "/style.css", {"Range": "bytes=99999-"}),
    "gzip sidecar": ("GET", "/style.css", {"Accept-Encoding": "gzip, deflate"}),
    "br and gzip, only gzip there": ("GET", "/style.css", {"Accept-Encoding": "br, gzip"}),
    "identity preferred": ("GET", "/style.css", {"Accept-Encoding": "br, gzip;q=0.5"}),
    "gzip refused": ("GET", "/style.css", {"Accept-Encoding": "gzip;q=0, identity"}),
    "no accept-encoding": ("GET", "/style.css", {}),
    "head sidecar": ("HEAD", "/style.css", {"Accept-Encoding": "gzip"}),
    "304 sidecar": ("GET", "/style.css", {"Accept-Encoding": "gzip", "If-None-Match": "{etag}"}),
    "range of sidecar": ("GET", "/style.css", {"Accept-Encoding": "gzip", "Range": "bytes=0-9"}),
    "options": ("OPTIONS", "/index.html", {}),
    "post": ("POST", "/index.html", {"Content-Length": "0"}),
}


def _comparable(response: tuple[int, dict[str, str], bytes]) -> tuple:
    status, headers, body = response
    picked = {k: headers.get(k) for k in COMPARED}
    boundary = re.search(r"boundary=(\w+)", headers.get("content-type", ""))
    if boundary:  # a fresh random boundary per response: compare the parts, not the separator
        body = body.replace(boundary.group(1).encode(), b"BOUNDARY")
        picked["content-type"] = picked["content-type"].replace(boundary.group(1), "BOUNDARY")
    return status, picked, body


@pytest.mark.parametrize("case", list(CASES))
def test_public_port_answers_exactly_as_a_worker(master, case):
    method, path, headers = CASES[case]
    worker = master.worker_ports[0]
    if any("{" in v for v in headers.values()):
        # Validators of the representation these request headers select, from the worker.
        plain = {k: v for k, v in headers.items() if "{" not in v and k != "Range"}
        _, rep, _ = fetch(worker, "GET", path, plain)
        headers = {k: v.replace("{etag}", rep["etag"]).replace("{last_modified}", rep["last-modified"])
                   for k, v in headers.items()}
    direct = _comparable(fetch(worker, method, path, headers))
    # Twice: the second may be the front cache's answer, which must not differ either.
    for _ in range(2):
        assert _comparable(fetch(master.port, method, path, headers)) == direct
    status = direct[0]
    expected = {"root": 200, "head": 200, "404": 404, "dotfile": 404, "directory redirect": 301,
                "304 etag": 304, "304 date": 304, "304 head": 304, "range": 206, "multipart": 206,
                "if-range etag": 206, "if-range stale": 200, "416": 416, "gzip sidecar": 200,
                "412": 412, "post": 405}
    assert status == expected.get(case, status)
    assert status in (400, 404) if "escape" in case else status != 400
    if case in ("gzip sidecar", "br and gzip, only gzip there", "head sidecar"):
        assert direct[1]["content-encoding"] == "gzip"
    if case in ("gzip refused", "no accept-encoding", "identity preferred"):
        assert direct[1]["content-encoding"] is None and direct[1]["vary"] == "Accept-Encoding"


def test_bodies_are_the_files(master, site):
    for path in ("/index.html", "/logo.png", "/downloads/sample-150k.bin", "/big.bin"):
        status, headers, body = fetch(master.port, "GET", path)
        assert status == 200 and body == (site / path[1:]).read_bytes()
    status, headers, body = fetch(master.port, "GET", "/big.bin", {"Range": "bytes=1000000-1065535"})
    assert status == 206 and body == (site / "big.bin").read_bytes()[1000000:1065536]


# -- the front cache, observed by behaviour ------------------------------------------------------
def _workers_see(master: Master, path: str, body: bytes) -> bool:
    return all(fetch(p, "GET", path)[2] == body for p in master.worker_ports)


def test_front_cache_answers_hits_and_its_own_304_then_sees_a_change_after_the_cache_ttl(cached, site):
    old, new = b"version one\n", b"the second version\n"
    (site / "fc.txt").write_bytes(old)
    status, first, body = fetch(cached.port, "GET", "/fc.txt")
    assert (status, body) == (200, old) and "max-age=60" in first["cache-control"]
    sent = worker_requests(cached)
    started = time.monotonic()
    for _ in range(4):  # the master's stored copy, whichever worker is next in turn
        status, headers, body = fetch(cached.port, "GET", "/fc.txt")
        assert (status, body, headers["etag"]) == (200, old, first["etag"])
    status, headers, body = fetch(cached.port, "HEAD", "/fc.txt")
    assert (status, headers["content-length"], body) == (200, str(len(old)), b"")
    status, headers, body = fetch(cached.port, "GET", "/fc.txt", {"If-None-Match": first["etag"]})
    assert (status, headers["etag"], body) == (304, first["etag"], b"")
    # The proxies answered these 6 from their stored copies: each proxy (its own front cache)
    # may miss once and revalidate once per cache.ttl that went by on a slow machine.
    rounds = 1 + int((time.monotonic() - started) / WORKER_TTL)
    assert worker_requests(cached) - sent <= len(cached.proxies()) * (1 + rounds) - 1
    (site / "fc.txt").write_bytes(new)
    # The clients are told max-age=60, but the master checks with a worker after cache.ttl.
    wait_until(lambda: fetch(cached.port, "GET", "/fc.txt")[2] == new, timeout=10, message="the change served")
    # Requests the cache must not answer go to a worker: a range, and a different validator.
    # (With several proxies, another worker may still hold the old bytes for up to its own
    # cache.ttl: the range is answered by whichever worker a proxy picks.)
    wait_until(lambda: fetch(cached.port, "GET", "/fc.txt", {"Range": "bytes=0-2"})[::2] == (206, new[:3]),
               timeout=10, message="the range of the new version")


def test_front_cache_never_keeps_an_error(cached, site):
    assert fetch(cached.port, "GET", "/later.txt")[0] == 404
    assert fetch(cached.port, "GET", "/later.txt")[0] == 404
    (site / "later.txt").write_bytes(b"here now\n")
    time.sleep(WORKER_TTL)
    wait_until(lambda: _workers_see(cached, "/later.txt", b"here now\n"), timeout=10, message="workers see it")
    assert fetch(cached.port, "GET", "/later.txt")[:3:2] == (200, b"here now\n")


def test_without_front_cache_a_change_is_visible_after_the_worker_ttl(uncached, site):
    old, new = b"version one\n", b"the second version\n"
    (site / "nc.txt").write_bytes(old)
    for _ in range(4):  # both workers (round robin) now hold it in their caches
        assert fetch(uncached.port, "GET", "/nc.txt")[2] == old
    (site / "nc.txt").write_bytes(new)
    time.sleep(WORKER_TTL + 0.2)
    for _ in range(4):
        status, headers, body = fetch(uncached.port, "GET", "/nc.txt")
        assert (status, body) == (200, new)


# -- HTTP/1.0 keep-alive (ab -k) and pipelining --------------------------------------------------
AB_HEADERS = {"Connection": "Keep-Alive", "User-Agent": "ApacheBench/2.3", "Accept": "*/*"}


def test_http10_keep_alive_as_ab_k_sends_it(master, site):
    """4 connections x 25 requests, each connection kept open by `Connection: Keep-Alive`."""
    index = (site / "index.html").read_bytes()
    failures: list[str] = []

    def client() -> None:
        try:
            with socket.create_connection(("127.0.0.1", master.port), timeout=20) as s:
                responses = Responses(s)
                for i in range(25):
                    path = "/missing" if i == 7 else "/index.html"
                    s.sendall(request("GET", path, AB_HEADERS, version="1.0", host="127.0.0.1"))
                    status, headers, body = responses.next()
                    if (status, body) != ((404, b"404 Not Found\n") if i == 7 else (200, index)):
                        failures.append(f"{path}: {status}, {len(body)} bytes")
                    if headers.get("connection", "").lower() != "keep-alive" or "content-length" not in headers:
                        failures.append(f"not kept alive: {headers}")
                s.sendall(request("HEAD", "/index.html", AB_HEADERS, version="1.0", host="127.0.0.1"))
                status, headers, body = responses.next("HEAD")
                if (status, body, headers.get("content-length")) != (200, b"", str(len(index))):
                    failures.append(f"HEAD: {status} {headers}")
                # Without Keep-Alive an HTTP/1.0 request ends the connection.
                s.sendall(request("GET", "/index.html", version="1.0", host=""))
                status, headers, body = responses.next()
                if (status, body) != (200, index) or not responses.at_eof():
                    failures.append("HTTP/1.0 without keep-alive did not close after its response")
        except Exception as e:  # reported below, with the others
            failures.append(repr(e))

    threads = [threading.Thread(target=client) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert failures == []


def test_pipelined_requests_are_answered_in_order(master, site):
    files = {p: (site / p[1:]).read_bytes() for p in ("/index.html", "/style.css", "/logo.png", "/big.bin")}
    sequence = [("GET", "/index.html", {}), ("GET", "/big.bin", {}), ("HEAD", "/logo.png", {}),
                ("GET", "/missing", {}), ("GET", "/downloads", {}), ("GET", "/style.css", {"Range": "bytes=0-4"}),
                ("GET", "/logo.png", {}), ("GET", "/style.css", {"Connection": "close"})]
    with socket.create_connection(("127.0.0.1", master.port), timeout=20) as s:
        s.sendall(b"".join(request(m, p, h) for m, p, h in sequence))
        responses = Responses(s)
        got = [responses.next(m) for m, _, _ in sequence]
        assert responses.at_eof()
    assert [g[0] for g in got] == [200, 200, 200, 404, 301, 206, 200, 200]
    assert got[0][2] == files["/index.html"] and got[1][2] == files["/big.bin"]
    assert got[2][2] == b"" and got[2][1]["content-length"] == str(len(files["/logo.png"]))
    assert got[4][1]["location"] == "./downloads/"
    assert got[5][2] == files["/style.css"][:5]
    assert got[6][2] == files["/logo.png"] and got[7][2] == files["/style.css"]


def worker_requests(m) -> int:
    """Requests the master has sent to its workers, from the admin listener's /status.json."""
    admin_port = int(m.config["admin"].rsplit(":", 1)[1])
    status = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/status.json", timeout=10).read())
    return sum(w["requests"] for w in status["workers"])


# -- hostile input and limits, through the real master -------------------------------------------
SMUGGLING = {
    "CL and TE": b"POST /smuggled HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "duplicate CL": b"POST /smuggled HTTP/1.1\r\nHost: t\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nx",
    "plus CL": b"POST /smuggled HTTP/1.1\r\nHost: t\r\nContent-Length: +1\r\n\r\nx",
    "bad TE": b"POST /smuggled HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: gzip\r\n\r\nxxxx",
    "TE not last chunked": b"POST /smuggled HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n",
    "bare CR": b"GET /smuggled HTTP/1.1\r\nHost: t\r\nX-A: b\rc\r\n\r\n",
    "NUL": b"GET /smuggled HTTP/1.1\r\nHost: t\r\nX-A: b\x00c\r\n\r\n",
}
FOLLOWER = b"GET /smuggled-follower HTTP/1.1\r\nHost: t\r\n\r\n"


@pytest.mark.parametrize("name", list(SMUGGLING))
def test_smuggling_is_refused_with_400_and_a_close(cached, name):
    sent_to_workers = worker_requests(cached)
    data, closed = exchange(cached.port, SMUGGLING[name] + FOLLOWER)
    responses = parse_responses(data)
    assert closed and len(responses) == 1, data[:300]  # the request riding behind is never answered
    status, headers, _ = responses[0]
    assert status == 400 and headers["connection"] == "close"
    # Nothing reached a worker: requests sent after it (one per worker) are the only ones the
    # workers got, and the access log shows the master answering it and never the follower.
    marker = f"/after-smuggling-{name.replace(' ', '-')}"
    for _ in cached.worker_ports:
        assert fetch(cached.port, "GET", marker)[0] == 404
    cached.wait_log(f'"GET {marker} HTTP/1.1" 404', count=len(cached.worker_ports))
    assert worker_requests(cached) == sent_to_workers + len(cached.worker_ports)
    assert "smuggled-follower" not in cached.log()
    assert not re.search(r'/smuggled HTTP/1.1" (?!400 )', cached.log())


@pytest.mark.parametrize("name, data, status", [
    ("long request line", request("GET", "/" + "a" * 9000), 414),
    ("huge header", request("GET", "/index.html", {"X-Big": "b" * 40000}), 431),
    ("too many headers", request("GET", "/index.html", {f"X-{i}": "v" for i in range(150)}), 431),
    ("body too large", request("POST", "/upload", {"Content-Length": str(2 << 20)}), 413),
])
def test_limits_answer_with_their_status_and_close(cached, name, data, status):
    # The 413 comes from the head alone: the client never has to send the announced body.
    received, closed = exchange(cached.port, data)
    responses = parse_responses(received)
    assert closed and [r[0] for r in responses] == [status]
    assert responses[0][1]["connection"] == "close"


def test_slowloris_gets_408_and_is_closed(cached):
    with socket.create_connection(("127.0.0.1", cached.port), timeout=10) as s:
        s.sendall(b"GET /index.html HTTP/1.1\r\nHost: t\r\n")
        s.settimeout(0.3)
        received, answered_while_dripping = b"", False
        for i in range(30):  # a header line every 0.3 s, for 9 s; the head deadline is 1 s
            try:
                s.sendall(b"X-Drip-%d: x\r\n" % i)
                received = s.recv(4096)
            except socket.timeout:
                continue
            except (BrokenPipeError, ConnectionResetError):
                break
            answered_while_dripping = True
            break
        s.settimeout(5)
        try:
            while chunk := s.recv(4096):
                received += chunk
        except ConnectionResetError:
            pass
    assert answered_while_dripping  # cut by the deadline, not by the client finishing its head
    assert received.startswith(b"HTTP/1.1 408 "), received[:200]
    assert b"Connection: close" in received


def test_master_still_serves_after_the_abuse(cached, site):
    assert fetch(cached.port, "GET", "/index.html")[2] == (site / "index.html").read_bytes()
