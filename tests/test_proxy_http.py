"""The front proxy speaks correct HTTP/1.1 and 1.0 in front of real workers: keep-alive,
pipelining, HEAD/204/304, chunked bodies both ways, header hygiene, 503 when no worker is up any more (and a wait for the first one while gows starts)."""
from __future__ import annotations

import concurrent.futures
import json
import socket
import struct
import time

import pytest
import requests

from arbiter.config import ProxyConfig, configured
from proxy_harness import NO_CACHE, ProxyThread, RawUpstream, asked_twice, parse_responses, raw, read_all
from support import wait_until

pytestmark = pytest.mark.integration


@pytest.fixture
def proxy(workers):
    p = ProxyThread(workers, front_cache=NO_CACHE)
    yield p
    p.stop()


def echo(resp) -> dict:
    data = resp.json() if hasattr(resp, "json") else json.loads(resp)
    data["h"] = {k.lower(): v for k, v in data["headers"]}
    return data


def test_get_passes_through_with_body_and_worker_headers(proxy):
    r = requests.get(proxy.url + "/file/a?size=5000&max_age=0")
    assert r.status_code == 200
    assert len(r.content) == 5000 and r.content[:3] == bytes([0, 1, 2])
    assert r.headers["Via"] == "1.1 gows"
    assert r.headers["Server"] == "gunicorn"  # the worker's own headers pass through
    assert r.headers["ETag"] == '"e5000-/file/a"'


def test_round_robin_spreads_requests(proxy, workers):
    seen = [requests.get(proxy.url + "/echo").json()["worker"] for _ in range(10)]
    assert sorted(set(seen)) == sorted(str(w.port) for w in workers)
    assert seen.count(seen[0]) == 5


def test_forwarding_headers_and_hop_by_hop_removal(proxy):
    r = requests.get(proxy.url + "/echo", headers={
        "X-Forwarded-For": "10.1.2.3", "X-Forwarded-Host": "evil", "X-Forwarded-Proto": "https",
        "X-Forwarded-Ssl": "on", "X-Forwarded-Protocol": "ssl",
        "Connection": "keep-alive, X-Private", "X-Private": "secret", "Keep-Alive": "timeout=5",
        "Proxy-Authorization": "Basic eA==", "TE": "trailers", "Upgrade": "h2c", "Via": "1.0 client-proxy",
        "Host": "example.test:8080", "X-Custom": "kept",
    })
    h = echo(r)["h"]
    assert h["x-forwarded-for"] == "10.1.2.3, 127.0.0.1"  # appended, as Go's ReverseProxy does
    assert h["x-forwarded-host"] == "example.test:8080"
    assert h["x-forwarded-proto"] == "http"
    assert h["host"] == "example.test:8080"  # the client's Host is passed
    assert h["via"] == "1.0 client-proxy, 1.1 gows"
    assert h["x-custom"] == "kept"
    # (gunicorn takes these for https from a trusted proxy: the scheme is the proxy's to tell)
    for gone in ("x-private", "keep-alive", "proxy-authorization", "te", "upgrade", "connection",
                 "x-forwarded-ssl", "x-forwarded-protocol"):
        assert gone not in h, gone


def test_response_hop_by_hop_headers_removed():
    def respond(head, body, conn):
        conn.sendall(b"HTTP/1.1 200 OK\r\nConnection: X-Secret\r\nX-Secret: leak\r\nKeep-Alive: timeout=5\r\n"
                     b"Proxy-Authenticate: Basic\r\nTrailer: X-T\r\nUpgrade: h2c\r\nX-Kept: yes\r\n"
                     b"Content-Length: 3\r\n\r\nhop")
        return True
    upstream = RawUpstream(respond)
    p = ProxyThread([upstream.port], front_cache=NO_CACHE)
    with upstream, p:
        r = requests.get(p.url + "/hop")
        assert r.text == "hop" and r.headers["X-Kept"] == "yes"
        for gone in ("X-Secret", "Keep-Alive", "Proxy-Authenticate", "Trailer", "Upgrade", "Connection"):
            assert gone not in r.headers, gone


def test_fields_a_response_names_in_connection_are_not_repeated_from_the_front_cache():
    """What a worker's Connection names is for its hop alone (RFC 9110 7.6.1): dropped from the
    answer relayed, and from the copy the front cache keeps and answers later requests with."""
    answers, reached = asked_twice(b"HTTP/1.1 200 OK\r\nConnection: X-Secret, keep-alive\r\nX-Secret: leak\r\n"
                                   b"Cache-Control: max-age=60\r\nX-Kept: yes\r\nContent-Length: 3\r\n\r\nhop", "/hop")
    for r in answers:
        assert r.text == "hop" and r.headers["X-Kept"] == "yes"
        assert "X-Secret" not in r.headers
    assert reached == 1  # the second was answered from the front cache


def test_a_worker_that_leads_back_to_the_proxy_itself_gets_508_not_a_pool_of_waiting_loops():
    """A worker address that is this very proxy (a DNS name yielding its own address): a request
    goes round VIA_HOPS_LIMIT times and is answered 508 Loop Detected, rather than going round
    until every connection to that worker is taken and all of them time out (504 after
    responseTimeout, everything else sent to that worker waiting meanwhile)."""
    p = ProxyThread([], proxy=configured(ProxyConfig, balance="round-robin", responseTimeout=20.0),
                    front_cache=NO_CACHE, max_fails=1000)
    with p:
        p.add(p.port)
        started = time.monotonic()
        r = requests.get(p.url + "/loop", timeout=30)
        assert r.status_code == 508
        assert time.monotonic() - started < 10
        assert p.stats()["upstream_connections"]["opened"] == 8
        assert p.worker(p.port).up and not p.worker(p.port).passive_failure_times


def test_keep_alive_http11_reuses_one_connection(proxy):
    with socket.create_connection(("127.0.0.1", proxy.port)) as s:
        for i in range(5):
            s.sendall(b"GET /echo?n=%d HTTP/1.1\r\nHost: t\r\n\r\n" % i)
            data = b""
            while True:
                data += s.recv(65536)
                try:
                    (status, headers, body), = parse_responses(data)
                    break
                except ValueError:
                    continue
            assert status == 200 and json.loads(body)["path"] == f"/echo?n={i}"
            assert "connection" not in headers  # persistent by default in 1.1


def test_keep_alive_http10_like_ab_k(proxy):
    with socket.create_connection(("127.0.0.1", proxy.port)) as s:
        s.settimeout(5)
        for _ in range(3):
            s.sendall(b"GET /file/x?max_age=0 HTTP/1.0\r\nHost: t\r\nConnection: Keep-Alive\r\n\r\n")
            data = b""
            while len(data) < 1024 or b"\r\n\r\n" not in data:
                data += s.recv(65536)
            head, _, body = data.partition(b"\r\n\r\n")
            while len(body) < 1024:
                body += s.recv(65536)
            assert b"Connection: keep-alive" in head and len(body) == 1024


def test_http10_without_keep_alive_is_closed(proxy):
    data = raw(proxy.port, b"GET /echo HTTP/1.0\r\n\r\n")
    (status, headers, body), = parse_responses(data)
    assert status == 200 and headers["connection"] == "close"
    assert echo(body.decode())["h"]["host"] == f"127.0.0.1:{proxy.port}"  # 1.1 upstream needs a Host


def test_http10_client_gets_unchunked_body_closed_by_eof(proxy):
    data = raw(proxy.port, b"GET /chunked?parts=4 HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    head, _, body = data.partition(b"\r\n\r\n")
    assert b"Transfer-Encoding" not in head and b"Connection: close" in head
    assert body == b"part0;part1;part2;part3;"


def test_chunked_response_rechunked_for_http11(proxy):
    r = requests.get(proxy.url + "/chunked?parts=50")
    assert r.headers["Transfer-Encoding"] == "chunked"
    assert r.text == "".join(f"part{i};" for i in range(50))


def test_chunked_request_body_is_forwarded_with_length(proxy):
    def gen():
        yield b"hello "
        yield b"chunked "
        yield b"world"
    r = requests.post(proxy.url + "/echo", data=gen())
    data = echo(r)
    assert data["body"] == "hello chunked world"
    assert data["h"]["content-length"] == "19" and "transfer-encoding" not in data["h"]


def test_content_length_request_body(proxy):
    r = requests.put(proxy.url + "/echo", data=b"x" * 100_000)
    data = echo(r)
    assert data["method"] == "PUT" and len(data["body"]) == 100_000


def test_pipelined_requests_answered_in_order(proxy):
    reqs = b"".join(b"GET /sleep?s=%s&i=%d HTTP/1.1\r\nHost: t\r\n\r\n" % (d, i)
                    for i, d in enumerate([b"0.3", b"0", b"0.1", b"0"]))
    reqs += b"HEAD /file/h?max_age=0 HTTP/1.1\r\nHost: t\r\n\r\n"
    reqs += b"GET /echo?last HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
    with socket.create_connection(("127.0.0.1", proxy.port)) as s:
        s.sendall(reqs)
        data = read_all(s, 10)
    # Split by status line: a HEAD answer carries Content-Length but no body.
    parts = data.split(b"HTTP/1.1 ")[1:]
    assert len(parts) == 6
    assert all(p.startswith(b"200") for p in parts)
    for i in range(4):
        assert b"slept" in parts[i]
    assert b"Content-Length: 1024" in parts[4] and parts[4].endswith(b"\r\n\r\n")  # HEAD: no body
    assert b'"path": "/echo?last"' in parts[5]


def test_head_has_no_body_and_keeps_connection(proxy):
    with socket.create_connection(("127.0.0.1", proxy.port)) as s:
        s.sendall(b"HEAD /file/h?size=777&max_age=0 HTTP/1.1\r\nHost: t\r\n\r\n"
                  b"GET /echo HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        data = read_all(s)
    head, _, rest = data.partition(b"\r\n\r\n")
    assert b"Content-Length: 777" in head
    assert rest.startswith(b"HTTP/1.1 200 OK")  # the next response follows immediately


def test_204_and_304_have_no_body(proxy):
    data = raw(proxy.port, b"GET /status?code=204 HTTP/1.1\r\nHost: t\r\n\r\n"
                           b"GET /file/c?max_age=0 HTTP/1.1\r\nHost: t\r\nIf-None-Match: \"e1024-/file/c\"\r\n\r\n"
                           b"GET /echo HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
    (s1, h1, b1), (s2, h2, b2), (s3, _, b3) = parse_responses(data)
    assert (s1, b1) == (204, b"") and "content-length" not in h1 and "transfer-encoding" not in h1
    assert (s2, b2) == (304, b"") and h2["etag"] == '"e1024-/file/c"'
    assert s3 == 200 and json.loads(b3)["path"] == "/echo"


def test_range_and_conditional_requests_pass_through_unchanged(proxy):
    r = requests.get(proxy.url + "/file/r?size=1000&max_age=0", headers={"Range": "bytes=10-19"})
    assert r.status_code == 206 and r.content == bytes(range(10, 20))
    assert r.headers["Content-Range"] == "bytes 10-19/1000"
    r = requests.get(proxy.url + "/file/r?size=1000&max_age=0",
                     headers={"If-Modified-Since": "Tue, 14 Nov 2023 22:13:20 GMT"})
    assert r.status_code == 304


def test_503_with_retry_after_when_no_worker_is_healthy_any_more(workers):
    p = ProxyThread(workers)
    with p:
        assert requests.get(p.url + "/echo").status_code == 200
        for worker in workers:
            p.set_up(worker.port, False)
        r = requests.get(p.url + "/echo", timeout=10)  # at once, not after the response timeout
        assert r.status_code == 503 and r.headers["Retry-After"].isdigit()
        assert p.stats()["no_healthy_worker"] == 1
        p.set_up(workers[0].port, True)
        assert requests.get(p.url + "/echo").json()["worker"] == str(workers[0].port)


def test_requests_that_come_before_any_worker_is_up_wait_for_the_first_one(workers):
    """gows starting: its workers still boot while the proxies already accept. Their first
    clients are served once a worker is up, not answered 503."""
    p = ProxyThread(workers, up=False)
    with p, concurrent.futures.ThreadPoolExecutor(4) as pool:
        answers = [pool.submit(requests.get, p.url + f"/echo?{i}", timeout=30) for i in range(4)]
        wait_until(lambda: p.call(lambda: len(p.proxy.held)) == 4, message="four requests held")
        assert not any(a.done() for a in answers)
        p.set_up(workers[1].port, True)
        assert [a.result(30).json()["worker"] for a in answers] == [str(workers[1].port)] * 4
        assert p.stats()["no_healthy_worker"] == 0


def test_requests_held_for_a_first_worker_are_forgotten_when_their_clients_leave(workers):
    """Clients that send a request and reset their connection while no worker comes up leave
    nothing behind for the response timeout (30 s), though their connections no longer count
    against the connection limit: their held requests are dropped at the next sweep. (A client
    that only half-closes still gets its answer, and holds its connection meanwhile.)"""
    p = ProxyThread(workers, up=False)
    with p:
        clients = [socket.create_connection(("127.0.0.1", p.port), timeout=10) for _ in range(5)]
        for c in clients:
            c.sendall(b"GET /echo HTTP/1.1\r\nHost: t\r\n\r\n")
        wait_until(lambda: p.call(lambda: len(p.proxy.held)) == 5, message="five requests held")
        for c in clients:
            c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            c.close()  # (a reset)
        wait_until(lambda: p.call(lambda: len(p.proxy.held)) == 0, timeout=5, message="none held")
        assert p.stats()["no_healthy_worker"] == 0


def test_a_request_held_for_a_first_worker_gets_503_at_the_response_timeout(workers):
    p = ProxyThread(workers, proxy=configured(ProxyConfig, responseTimeout=1.0), up=False)
    with p:
        started = time.monotonic()
        r = requests.get(p.url + "/echo", timeout=30)
        assert r.status_code == 503 and r.headers["Retry-After"].isdigit()
        assert time.monotonic() - started >= 1.0
        assert p.stats()["no_healthy_worker"] == 1 and p.call(lambda: len(p.proxy.held)) == 0


def test_a_stopping_proxy_answers_the_requests_it_holds_with_503(workers):
    p = ProxyThread(workers, up=False)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        try:
            answer = pool.submit(requests.get, p.url + "/echo", timeout=30)
            wait_until(lambda: p.call(lambda: len(p.proxy.held)) == 1, message="the request held")
        finally:
            p.stop()
        assert answer.result(30).status_code == 503


def test_expect_100_continue(proxy):
    data = raw(proxy.port, b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\nExpect: 100-continue\r\n"
                           b"Connection: close\r\n\r\nabc")
    interim, final = parse_responses(data)
    assert interim[0] == 100
    assert final[0] == 200 and json.loads(final[2])["body"] == "abc"
    assert "expect" not in {k.lower() for k, _ in json.loads(final[2])["headers"]}


def test_an_http10_expectation_is_ignored(proxy):
    """RFC 9110 10.1.1: an HTTP/1.0 request's Expect is ignored (a 1.0 client knows no 100
    Continue and no 417), as nginx does."""
    for expect in (b"100-continue", b"foo"):
        data = raw(proxy.port, b"POST /echo HTTP/1.0\r\nContent-Length: 3\r\nExpect: " + expect + b"\r\n\r\nabc")
        [(status, _, body)] = parse_responses(data)
        assert status == 200 and json.loads(body)["body"] == "abc", expect


def test_a_major_version_other_than_1_is_505(proxy):
    """RFC 9110 15.6.6, as nginx answers: an HTTP/2.0 head over this connection is not taken for
    an HTTP/1.1 request (and never forwarded as one)."""
    [(status, _, _)] = parse_responses(raw(proxy.port, b"GET /echo HTTP/2.0\r\nHost: t\r\n\r\n"))
    assert status == 505


def test_upgrade_is_not_tunnelled(proxy):
    data = raw(proxy.port, b"GET /echo HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
                           b"GET /echo?second HTTP/1.1\r\nHost: t\r\n\r\n")
    responses = parse_responses(data)
    assert len(responses) == 1 and responses[0][0] == 200  # answered as plain HTTP, then closed
    assert "upgrade" not in echo(responses[0][2].decode())["h"]


def test_stats_count_requests_and_status_classes(proxy):
    before = proxy.stats()
    requests.get(proxy.url + "/echo")
    requests.get(proxy.url + "/nope")
    after = proxy.stats()
    assert after["requests"] - before["requests"] == 2
    assert after["responses"]["2xx"] - before["responses"]["2xx"] == 1
    assert after["responses"]["4xx"] - before["responses"]["4xx"] == 1


# -- header hygiene a client cannot turn against the proxy ------------------------------------------
@pytest.mark.parametrize("named", ["host", "Host, Content-Length", "transfer-encoding, host"])
def test_a_connection_header_naming_host_keeps_host(proxy, named):
    data = raw(proxy.port, b"GET /echo HTTP/1.1\r\nHost: named.test\r\nConnection: " + named.encode() +
               b"\r\nConnection: close\r\n\r\n")
    (status, _, body), = parse_responses(data)
    assert status == 200 and echo(body)["h"]["host"] == "named.test"


def test_a_named_content_length_still_frames_the_body(proxy):
    data = raw(proxy.port, b"POST /echo HTTP/1.1\r\nHost: t\r\nConnection: content-length\r\nContent-Length: 3\r\n\r\nabc"
                           b"GET /echo HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
    (s1, _, b1), (s2, _, _) = parse_responses(data)
    assert (s1, echo(b1)["body"], s2) == (200, "abc", 200)


def test_an_http10_request_without_host_gets_a_bracketed_ipv6_host(workers):
    p = ProxyThread(workers, front_cache=NO_CACHE, listen_host="::1")
    with p:
        with socket.create_connection(("::1", p.port), timeout=10) as s:
            s.sendall(b"GET /echo HTTP/1.0\r\n\r\n")
            (status, _, body), = parse_responses(read_all(s))
        assert status == 200 and echo(body)["h"]["host"] == f"[::1]:{p.port}"


def test_the_proxy_answers_the_masters_health_path_with_its_readiness():
    """A node's health path is the master's readiness, answered by its proxies (an edge gows
    checks it): 200 while some worker is up, 503 with none or while the master is a lame duck;
    never stored, never forwarded (no worker listens on these ports)."""
    p = ProxyThread([1, 2], up=False)
    try:
        p.call(lambda: setattr(p.proxy, "health_target", b"/healthcheck"))
        assert requests.get(p.url + "/healthcheck", timeout=5).status_code == 503
        p.set_up(2, True)
        r = requests.get(p.url + "/healthcheck", timeout=5)
        assert (r.status_code, r.headers["Cache-Control"]) == (200, "no-store")
        assert requests.head(p.url + "/healthcheck", timeout=5).status_code == 200
        p.call(lambda: setattr(p.proxy, "serving", False))  # lame duck: still serving, failing checks
        assert requests.get(p.url + "/healthcheck", timeout=5).status_code == 503
        assert p.stats()["health_checks"] == 4
    finally:
        p.stop()
