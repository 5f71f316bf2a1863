"""Failures between the proxy and its workers: retries of idempotent requests, never resending a
POST, stale pooled connections, passive failure detection, 502/504, workers killed mid-stream
or under load, the worker set changing under load, graceful shutdown."""
from __future__ import annotations

import socket
import struct
import threading
import time

import pytest
import requests

from arbiter.config import ProxyConfig, configured
from master_support import Hammer
from proxy_harness import NO_CACHE, ProxyThread, RawUpstream, Worker, asked_twice, parse_responses, raw, read_all
from proxy_upstream_app import pattern
from support import free_port, free_ports, together, wait_until

pytestmark = pytest.mark.integration


def ok_upstream(tag: bytes = b"ok") -> RawUpstream:
    def respond(head, body, conn):
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(tag), tag))
        return True
    return RawUpstream(respond)


def dropping_upstream() -> RawUpstream:
    """Reads each request, then closes without a byte of response."""
    return RawUpstream(lambda head, body, conn: False)


def test_refused_worker_is_retried_elsewhere_and_marked_down():
    good = ok_upstream()
    dead = free_port()  # nothing listens there
    p = ProxyThread([dead, good.port], front_cache=NO_CACHE, max_fails=3, fail_timeout=30)
    with good, p:
        for _ in range(12):
            r = requests.get(p.url + "/x")
            assert r.status_code == 200 and r.text == "ok"
        assert not p.worker(dead).up  # three passive failures: down, until active checks pass
        stats = p.stats()
        assert stats["retries"] == 3 and stats["upstream_errors"] == 3
        assert "refused" in p.worker(dead).last_error


def test_all_workers_refusing_gives_502_not_a_hang():
    p = ProxyThread(free_ports(2), front_cache=NO_CACHE)
    with p:
        r = requests.get(p.url + "/x", timeout=10)
        assert r.status_code == 502
        assert p.stats()["retries"] == 1  # the second worker was tried too


def test_get_retried_when_worker_drops_the_connection_before_answering():
    bad, good = dropping_upstream(), ok_upstream(b"good")
    p = ProxyThread([bad.port, good.port], front_cache=NO_CACHE)
    with good, bad, p:
        for _ in range(6):
            assert requests.get(p.url + "/x").text == "good"
        assert len(bad.heads) >= 1 and p.stats()["retries"] >= 1


def test_post_is_never_resent_after_it_was_sent():
    bad, good = dropping_upstream(), ok_upstream(b"good")
    p = ProxyThread([bad.port, good.port], front_cache=NO_CACHE, max_fails=1000)
    with good, bad, p:
        statuses = [requests.post(p.url + "/x", data=b"id=%d" % i).status_code for i in range(8)]
        assert statuses.count(502) == 4 and statuses.count(200) == 4  # round robin: half hit `bad`
        assert len(bad.heads) == 4 and len(good.heads) == 4  # the failed ones were not resent


def test_post_is_retried_when_it_was_never_sent():
    good = ok_upstream(b"good")
    p = ProxyThread([free_port(), good.port], front_cache=NO_CACHE)
    with good, p:
        for i in range(4):
            assert requests.post(p.url + "/x", data=b"id=%d" % i).text == "good"
        assert len(good.heads) == 4


def stale_upstream() -> RawUpstream:
    """Answers the first request on a connection, then drops the connection on the second one:
    what a worker closing an idle keep-alive connection looks like when we reuse it."""
    served: dict[int, int] = {}

    def respond(head, body, conn):
        n = served.get(id(conn), 0)
        served[id(conn)] = n + 1
        if n == 0:
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            return True
        return False
    return RawUpstream(respond)


def test_stale_pooled_connection_retried_on_a_fresh_one():
    up = stale_upstream()
    p = ProxyThread([up.port], front_cache=NO_CACHE)
    with up, p:
        for _ in range(5):
            assert requests.get(p.url + "/x").text == "ok"
        stats = p.stats()
        assert stats["stale_retries"] == 4 and stats["retries"] == 0
        assert p.worker(up.port).up and not p.worker(up.port).passive_failure_times


def test_stale_pooled_connection_not_resent_for_post():
    up = stale_upstream()
    p = ProxyThread([up.port], front_cache=NO_CACHE)
    with up, p:
        assert requests.post(p.url + "/x", data=b"1").status_code == 200
        assert requests.post(p.url + "/x", data=b"2").status_code == 502
        assert len(up.heads) == 2


def test_malformed_worker_response_is_502():
    def respond(head, body, conn):
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nabc")
        return False
    up = RawUpstream(respond)
    p = ProxyThread([up.port], front_cache=NO_CACHE, max_fails=1000)
    with up, p:
        r = requests.get(p.url + "/x")
        assert r.status_code == 502 and "abc" not in r.text


@pytest.mark.parametrize("first, extra", [
    # A HEAD answered with a body, in the same write as its head.
    (b"HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\nX-Evil: 1\r\n\r\nPOISONED"),
    # A body longer than its Content-Length, what follows it shaped as another answer.
    (b"GET", b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\nX-Evil: 1\r\n\r\nPOISONED"),
])
def test_bytes_after_an_answer_never_answer_the_next_request(first, extra):
    """What a worker sends after an answer, before any request asked for more, is never taken
    for the answer to the next request sent on that connection (a response desync: another
    client's): the connection is closed instead of reused (as Go's Transport does with an
    unsolicited response, and nginx with more data than Content-Length)."""
    def respond(head, body, conn):
        if head.startswith(b"GET /next "):
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nreal")
        else:
            declared = len(extra) if first == b"HEAD" else 5
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % declared
                         + (b"" if first == b"HEAD" else b"first") + extra)
        return True
    up = RawUpstream(respond)
    p = ProxyThread([up.port], front_cache=NO_CACHE, max_fails=1000)
    with up, p:
        out = raw(p.port, first + b" /first HTTP/1.1\r\nHost: x\r\n\r\n"
                  b"GET /next HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", timeout=5)
        responses = parse_responses(out, head_only=False) if first == b"GET" else None
        if first == b"HEAD":
            head, sep, rest = out.partition(b"\r\n\r\n")
            assert sep and head.startswith(b"HTTP/1.1 200")
            responses = parse_responses(rest)
            assert len(responses) == 1, out
            assert responses[0][2] == b"real" and "x-evil" not in responses[0][1]
        else:
            assert [body for _, _, body in responses] == [b"first", b"real"], out
            assert all("x-evil" not in headers for _, headers, _ in responses)
        assert b"POISONED" not in out
        assert up.connections == 2  # the connection the stray bytes came on was not reused


FLOOD_BYTES = 16 << 20  # what a flooding worker sends at most, unless cut off before


def flooding(start: bytes, chunk: bytes, end: bytes = b"") -> tuple[RawUpstream, list[int]]:
    """A worker answering `start`, then `chunk` again and again up to FLOOD_BYTES, then `end`;
    and the list it adds how many of those bytes it could send to once it is done."""
    sent: list[int] = []

    def respond(head, body, conn):
        conn.sendall(start)
        total = 0
        try:
            while total < FLOOD_BYTES:
                conn.sendall(chunk)
                total += len(chunk)
            conn.sendall(end)
        except OSError:
            pass
        sent.append(total)
        return False
    return RawUpstream(respond), sent


@pytest.mark.parametrize("flood", [
    b"X-Filler: " + b"a" * 1000 + b"\r\n",  # an endless head
    b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n",  # endless interim answers
])
def test_a_worker_sending_an_endless_head_gets_502_and_is_charged(flood):
    """The head of an answer, interim (1xx) heads included, is bounded (upstream.MAX_RESPONSE_HEAD):
    a worker sending more is cut off with 502 and charged a failure, instead of the proxy holding
    and relaying whatever it sends (16 MiB here)."""
    field = flood.startswith(b"X-")
    up, sent = flooding(b"HTTP/1.1 200 OK\r\n" if field else flood, flood * 64,
                        b"Content-Length: 2\r\n\r\nok" if field else b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    p = ProxyThread([up.port], front_cache=NO_CACHE, max_fails=1000)
    with up, p:
        r = requests.get(p.url + "/x", timeout=30)
        assert r.status_code == 502 and len(r.content) < 100
        wait_until(lambda: sent)
        assert sent[0] < 16 << 20  # cut off
        assert "head" in p.worker(up.port).last_error


def test_trailer_fields_of_an_answer_are_dropped_never_kept_as_head_fields_by_the_front_cache():
    """Trailer fields after a chunked body are not merged into the head (RFC 9110 6.5.1): the
    front cache keeps the head alone, so a trailer's Set-Cookie never reaches other clients."""
    answers, reached = asked_twice(b"HTTP/1.1 200 OK\r\nCache-Control: max-age=60\r\nTransfer-Encoding: chunked\r\n"
                                   b"\r\n2\r\nok\r\n0\r\nX-Trailer: evil\r\nSet-Cookie: session=attacker\r\n\r\n", "/t")
    for r in answers:
        assert r.text == "ok"
        assert "X-Trailer" not in r.headers and "Set-Cookie" not in r.headers
    assert reached == 1  # the second was answered from the front cache


def test_a_worker_sending_endless_trailer_fields_is_cut_off_and_charged():
    """After the body, trailer fields are bounded as a head is (upstream.MAX_RESPONSE_HEAD): an
    endless trailer section is a failure of the worker, and the client sees the body truncated
    (no last chunk) rather than the proxy holding what comes."""
    up, sent = flooding(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\nX-T: ",
                        b"a" * 65536)  # one field that never ends
    p = ProxyThread([up.port], front_cache=NO_CACHE, max_fails=1000)
    with up, p:
        head, body = read_response(p.port, b"GET /t HTTP/1.1\r\nHost: x\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200") and body == b"2\r\nok\r\n"
        wait_until(lambda: sent)
        assert sent[0] < 16 << 20  # cut off
        assert "trailer" in p.worker(up.port).last_error


def test_connect_timeout_is_504():
    # A listener whose accept queue is full: the kernel leaves our SYN unanswered.
    blackhole = socket.socket()
    blackhole.bind(("127.0.0.1", 0))
    blackhole.listen(0)
    filler = socket.create_connection(blackhole.getsockname())
    p = ProxyThread([blackhole.getsockname()[1]], proxy=configured(ProxyConfig, connectTimeout=0.5), front_cache=NO_CACHE)
    with blackhole, filler, p:
        started = time.monotonic()
        r = requests.get(p.url + "/x", timeout=20)
        assert r.status_code == 504
        assert time.monotonic() - started < 10, f"504 after {time.monotonic() - started:.1f}s"
        assert "timed out" in p.worker(blackhole.getsockname()[1]).last_error


def test_response_timeout_is_504_and_not_retried():
    w = Worker()
    p = ProxyThread([w], proxy=configured(ProxyConfig, responseTimeout=1.0), front_cache=NO_CACHE)
    with w, p:
        started = time.monotonic()
        r = requests.get(p.url + "/sleep?s=30", timeout=20)
        assert r.status_code == 504
        assert time.monotonic() - started < 15, f"504 only after {time.monotonic() - started:.1f}s"
        assert p.stats()["retries"] == 0
        assert requests.get(p.url + "/sleep?s=0.1").status_code == 200  # the worker is fine


@pytest.mark.parametrize("drip", [
    b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n",  # interim answers, one by one
    b"X-A: b\r\n",  # a head, a field at a time
])
def test_a_worker_dripping_its_head_cannot_push_the_response_timeout_back(drip):
    """responseTimeout is the time a worker has to start its answer: neither 1xx answers nor a
    head trickled in pieces (each read well within the timeout) extend it."""
    done = threading.Event()

    def respond(head, body, conn):
        if drip.startswith(b"X-"):
            conn.sendall(b"HTTP/1.1 200 OK\r\n")
        try:
            while not done.wait(0.1):  # (pacing the drip, ten times a second, until the test ends)
                conn.sendall(drip)
        except OSError:
            pass
        return False
    up = RawUpstream(respond)
    p = ProxyThread([up.port], proxy=configured(ProxyConfig, responseTimeout=1.0), front_cache=NO_CACHE,
                    max_fails=1000)
    with up, p:
        try:
            started = time.monotonic()
            r = requests.get(p.url + "/x", timeout=20)
            assert r.status_code == 504
            assert time.monotonic() - started < 10, f"504 only after {time.monotonic() - started:.1f}s"
        finally:
            done.set()


def read_response(port: int, request: bytes, timeout: float = 30) -> tuple[bytes, bytes]:
    """(head, body) of one request on a fresh connection, read until the proxy closes it."""
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(request)
        data = read_all(s, timeout)
    head, _, body = data.partition(b"\r\n\r\n")
    return head, body


def test_worker_killed_mid_stream_truncates_cleanly():
    w = Worker()
    p = ProxyThread([w], front_cache=NO_CACHE)
    with w, p:
        size = 8 << 20
        head, body = read_response(
            p.port, b"GET /stream?size=%d&chunk=65536&die_after=1048576 HTTP/1.1\r\nHost: t\r\n\r\n" % size)
        assert head.startswith(b"HTTP/1.1 200") and b"Content-Length: %d" % size in head
        assert 1 << 20 <= len(body) < size  # truncated, and the connection was closed
        assert body == pattern(len(body))  # every byte is this response's own
        assert p.stats()["truncated_responses"] == 1


def test_worker_killed_mid_chunked_stream_never_sends_the_last_chunk():
    w = Worker()
    p = ProxyThread([w], front_cache=NO_CACHE)
    with w, p:
        head, body = read_response(
            p.port, b"GET /stream?size=%d&chunk=65536&die_after=524288&nolength=1 HTTP/1.1\r\nHost: t\r\n\r\n"
            % (8 << 20))
        assert b"Transfer-Encoding: chunked" in head
        assert not body.endswith(b"0\r\n\r\n")
        assert len(body) > 524288


def hammers(p: ProxyThread, count: int, paths: tuple[str, ...]) -> list[Hammer]:
    """`count` clients GETting `paths` in turn, each on its own keep-alive connection, no pause."""
    return [Hammer(p.port, paths=paths, keep_alive=True, pause=0) for _ in range(count)]


def answered(clients: list[Hammer]) -> int:
    return sum(len(c.results) for c in clients)


def test_a_body_delimited_by_the_close_that_ends_in_a_reset_is_truncated_not_completed():
    """A body without Content-Length or chunked coding ends when the worker closes the connection;
    a reset instead of that close is a body cut short: the client sees the truncation (no last
    chunk) and the front cache keeps nothing, as from a body a worker stops sending midway."""
    def respond(head, body, conn):
        conn.sendall(b"HTTP/1.1 200 OK\r\nCache-Control: max-age=60\r\n\r\npartial")
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        return False  # closed with SO_LINGER 0: a reset
    up = RawUpstream(respond)
    p = ProxyThread([up.port], max_fails=1000)
    with up, p:
        for attempt in (1, 2):
            head, body = read_response(p.port, b"GET /cut HTTP/1.1\r\nHost: x\r\n\r\n")
            assert b"Transfer-Encoding: chunked" in head and not body.endswith(b"0\r\n\r\n"), body
            assert len(up.heads) == attempt  # never answered from the front cache
        assert p.stats()["truncated_responses"] == 2
        assert "reset" in p.worker(up.port).last_error


def test_worker_killed_under_load_loses_no_get():
    a, b = Worker(), Worker()
    p = ProxyThread([a, b], front_cache=NO_CACHE, max_fails=2)
    clients = hammers(p, 8, ("/echo", "/sleep?s=0.05"))
    with a, b, p:
        with together(clients):
            wait_until(lambda: answered(clients) > 200, timeout=30, message="load running")
            a.kill()
            done = answered(clients)
            wait_until(lambda: answered(clients) > done + 300, timeout=30, message="load continuing")
        assert [o for c in clients for o in c.failed()] == []
        assert not p.worker(a.port).up


def test_worker_set_swapped_under_load_loses_no_request():
    """What a reload does: new workers join healthy, then old ones leave (and drain)."""
    old, new = [Worker(), Worker()], [Worker(), Worker()]
    p = ProxyThread(old, front_cache=NO_CACHE)
    clients = hammers(p, 6, ("/echo", "/sleep?s=0.2"))
    with together(old + new), p:
        with together(clients):
            wait_until(lambda: answered(clients) > 100, timeout=30, message="load running")
            for w in new:
                p.add(w.port)
            for w in old:
                p.remove(w.port)
            done = answered(clients)
            wait_until(lambda: answered(clients) > done + 200, timeout=30, message="load continuing")
        assert [o for c in clients for o in c.failed()] == []
        workers = {requests.get(p.url + "/echo").json()["worker"] for _ in range(6)}
        assert workers == {str(w.port) for w in new}


def test_leaving_worker_finishes_in_flight_and_its_idle_connections_close():
    w = Worker()
    other = ok_upstream(b"other")
    p = ProxyThread([w], front_cache=NO_CACHE)
    with other, w, p:
        for _ in range(3):
            requests.get(p.url + "/echo")
        assert p.stats()["upstream_connections"]["idle"] >= 1
        result = {}
        t = threading.Thread(target=lambda: result.update(r=requests.get(p.url + "/sleep?s=1")))
        t.start()
        wait_until(lambda: p.worker(w.port).in_flight == 1, message="request in flight")
        p.add(other.port)
        p.remove(w.port)
        t.join(10)
        assert result["r"].status_code == 200 and "slept" in result["r"].text
        wait_until(lambda: p.stats()["upstream_connections"]["idle"] == 0, message="idle connections closed")
        assert requests.get(p.url + "/x").text == "other"


def test_graceful_shutdown_finishes_in_flight_and_closes_idle():
    w = Worker()
    p = ProxyThread([w], front_cache=NO_CACHE)
    with w, p:
        idle = socket.create_connection(("127.0.0.1", p.port))
        idle.sendall(b"GET /file/x?size=10 HTTP/1.1\r\nHost: t\r\n\r\n")
        idle.settimeout(10)
        first = b""
        while not first.endswith(pattern(10)):
            first += idle.recv(65536)
        assert first.startswith(b"HTTP/1.1 200")
        result = {}
        t = threading.Thread(target=lambda: result.update(
            data=raw(p.port, b"GET /sleep?s=1.5 HTTP/1.1\r\nHost: t\r\n\r\n", timeout=15)))
        t.start()
        wait_until(lambda: p.worker(w.port).in_flight == 1, message="request in flight")
        started = time.monotonic()
        p.run(p.proxy.shutdown(60), 90)
        assert time.monotonic() - started < 30, f"shutdown took {time.monotonic() - started:.1f}s of its 60 s"
        t.join(10)
        (status, headers, body), = parse_responses(result["data"])
        assert status == 200 and b"slept" in body and headers["connection"] == "close"
        assert idle.recv(65536) == b""  # the idle keep-alive connection was closed
        idle.close()
        # The master still owns the listening socket, so the kernel queues new connections,
        # but the proxy no longer accepts them.
        assert raw(p.port, b"GET /echo HTTP/1.1\r\nHost: t\r\n\r\n", timeout=1) == b""


@pytest.mark.parametrize("stop", ["timeout", "hurried"])
def test_a_slow_request_is_cut_off_by_the_shutdown_timeout_or_a_hurry_before_it(stop):
    """The shutdown's timeout bounds a slow request, and so does a fast stop that came before the
    graceful shutdown began (SIGINT 2 ms after SIGTERM: the hurry it asked for was overwritten
    when the shutdown began, and the stop waited the whole gracefulTimeout)."""
    w = Worker()
    p = ProxyThread([w], front_cache=NO_CACHE)
    with w, p:
        result = {}
        t = threading.Thread(target=lambda: result.update(
            data=raw(p.port, b"GET /sleep?s=60 HTTP/1.1\r\nHost: t\r\n\r\n", timeout=15)))
        t.start()
        wait_until(lambda: p.worker(w.port).in_flight == 1, message="request in flight")

        async def stopping() -> None:
            if stop == "hurried":
                p.proxy.hurry()
            await p.proxy.shutdown(0.5 if stop == "timeout" else 60)

        started = time.monotonic()
        p.run(stopping(), 90)
        assert time.monotonic() - started < 15, f"shutdown took {time.monotonic() - started:.1f}s"
        t.join(15)
        assert result["data"] == b""  # cut off, without a partial response


def test_connections_per_worker_capped_excess_requests_wait_for_one():
    w = Worker(threads=8)
    p = ProxyThread([w], proxy=configured(ProxyConfig, poolSize=3), front_cache=NO_CACHE)
    results: list[int] = []
    lock = threading.Lock()

    def client():
        r = requests.get(p.url + "/sleep?s=0.3", timeout=30)
        with lock:
            results.append(r.status_code)

    with w, p:
        threads = [threading.Thread(target=client) for _ in range(12)]
        for t in threads:
            t.start()
        wait_until(lambda: p.stats()["upstream_connections"]["waiting"] > 0, message="requests queued")
        conns = p.stats()["upstream_connections"]
        assert conns["busy"] + conns["connecting"] <= 3
        for t in threads:
            t.join(30)
        assert results == [200] * 12
        stats = p.stats()["upstream_connections"]
        assert stats["opened"] <= 3 + 1 and stats["waiting"] == 0  # handed over, not reopened


def test_request_waiting_too_long_for_a_connection_gets_503():
    w = Worker(threads=2)
    p = ProxyThread([w], proxy=configured(ProxyConfig, poolSize=1, responseTimeout=1.0), front_cache=NO_CACHE)
    with w, p:
        blocker = threading.Thread(target=lambda: requests.get(p.url + "/sleep?s=3", timeout=30))
        blocker.start()
        wait_until(lambda: p.stats()["upstream_connections"]["busy"] == 1, message="blocking request sent")
        started = time.monotonic()
        r = requests.get(p.url + "/echo", timeout=30)
        assert r.status_code == 503 and r.headers["Retry-After"] == "1"
        waited = time.monotonic() - started
        assert waited < 10, f"503 after {waited:.1f}s"  # the queue wait is bounded by the response timeout
        blocker.join(10)


def test_a_proxy_error_while_relaying_is_logged_closes_the_client_and_spares_the_worker(caplog, monkeypatch):
    from arbiter.proxy.relay import Relay
    relay = Relay.upstream_head

    def failing(self, conn, status, headers):
        if self.req.target == b"/boom":
            raise KeyError("a bug of the proxy's")
        relay(self, conn, status, headers)

    monkeypatch.setattr(Relay, "upstream_head", failing)
    up = ok_upstream()
    p = ProxyThread([up.port], front_cache=NO_CACHE, max_fails=1)
    with up, p:
        data = raw(p.port, b"GET /boom HTTP/1.1\r\nHost: t\r\n\r\n")
        assert data == b""  # closed: there is nothing right to answer mid-relay
        assert "proxy error while relaying a response" in caplog.text and "KeyError" in caplog.text
        worker = p.worker(up.port)
        assert worker.up and not worker.passive_failure_times  # max_fails=1: one charge would have downed it
        assert requests.get(p.url + "/fine").status_code == 200
        wait_until(lambda: p.stats()["client_connections"] == 0, message="both connections gone")


def test_switching_the_front_cache_off_mid_response_relays_the_rest():
    def respond(head, body, conn):
        conn.sendall(b"HTTP/1.1 200 OK\r\nCache-Control: max-age=60\r\nContent-Length: 20000\r\n\r\n" + b"a" * 10000)
        released.wait(10)
        conn.sendall(b"b" * 10000)
        return True
    released = threading.Event()
    up = RawUpstream(respond)
    p = ProxyThread([up.port])
    with up, p:
        with socket.create_connection(("127.0.0.1", p.port), timeout=10) as s:
            s.sendall(b"GET /c HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
            wait_until(lambda: p.stats()["upstream_connections"]["busy"] == 1)
            p.update(front_cache=NO_CACHE)  # a reload switched it off
            released.set()
            (status, _, body), = parse_responses(read_all(s))
        assert (status, body) == (200, b"a" * 10000 + b"b" * 10000)
        assert p.worker(up.port).up and not p.worker(up.port).passive_failure_times


def test_a_pooled_connection_to_a_replaced_worker_process_is_never_reused():
    up = ok_upstream()
    p = ProxyThread([up.port], front_cache=NO_CACHE)
    with up, p:
        assert requests.get(p.url + "/one").status_code == 200
        assert p.stats()["upstream_connections"]["idle"] == 1 and up.connections == 1
        worker = p.worker(up.port)
        p.call(lambda: p.table.handover(worker, 4242))  # a reload's new process took over the port
        assert requests.get(p.url + "/two").status_code == 200
        assert up.connections == 2  # the old process' connection was closed, not asked again


def test_a_connection_the_worker_closes_as_it_is_made_is_a_failed_attempt_not_a_crash(caplog, monkeypatch):
    from arbiter.proxy.upstream import UpstreamConnection
    made = UpstreamConnection.connection_made
    closed_once = []

    def made_then_lost(self, transport):  # as when the worker is SIGKILLed right at the connect
        made(self, transport)
        if not closed_once:
            closed_once.append(self)
            transport.abort()
            self.connection_lost(ConnectionResetError())

    monkeypatch.setattr(UpstreamConnection, "connection_made", made_then_lost)
    ups = [ok_upstream(), ok_upstream()]
    p = ProxyThread([u.port for u in ups], front_cache=NO_CACHE)
    with together(ups), p:
        r = requests.get(p.url + "/x", timeout=10)
        assert r.status_code == 200  # retried on the other worker
        assert "proxy task failed" not in caplog.text


def test_a_connection_that_reached_a_replaced_process_is_no_failure_of_its_successor():
    """At a reload the master replaces a worker's process: a connection the old one drops
    without an answer is retried on a fresh one, and the worker now serving is not charged."""
    proxy: ProxyThread | None = None
    answered = []

    def respond(head: bytes, body: bytes, conn: socket.socket) -> bool:
        if not answered:  # the first: the old process, handed over meanwhile, drops it
            answered.append(False)
            proxy.call(lambda: setattr(proxy.worker(upstream.port), "pid", 2))
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")  # a reset
            return False
        answered.append(True)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        return True

    upstream = RawUpstream(respond)
    proxy = ProxyThread([upstream.port], front_cache=NO_CACHE, max_fails=1)
    try:
        proxy.call(lambda: setattr(proxy.worker(upstream.port), "pid", 1))
        [(status, _, body)] = parse_responses(raw(proxy.port, b"GET /x HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"))
        assert (status, body) == (200, b"ok") and answered == [False, True]
        worker = proxy.worker(upstream.port)
        assert worker.up and worker.passive_failure_times == []
    finally:
        proxy.stop()
        upstream.stop()
