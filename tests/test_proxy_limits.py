"""Hostile and oversized input: request smuggling is refused with 400 and a close, limits answer
with their own status (408/413/414/431), timeouts and the connection cap hold, nothing crashes."""
from __future__ import annotations

import errno
import os
import select
import socket
import threading
import time

import pytest
import requests

from arbiter.config import ProxyConfig, configured
from arbiter.proxy import listening
from arbiter.proxy.fdlimit import ACCEPTORS
from proxy_harness import NO_CACHE, ProxyThread, RawUpstream, parse_responses, raw, read_all
from support import closing_all, wait_until

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def upstream():
    """Counts what reaches the worker: a smuggled request must never arrive there."""
    def respond(head, body, conn):
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        return True
    u = RawUpstream(respond)
    yield u
    u.stop()


@pytest.fixture(scope="module")
def proxy(upstream):
    p = ProxyThread([upstream.port], proxy=configured(ProxyConfig, maxRequestLine=1024, maxHeaderBytes=4096, maxHeaders=20, maxBodyBytes=10_000, headerTimeout=1.0, idleTimeout=1.0), front_cache=NO_CACHE)
    yield p
    p.stop()


SMUGGLING = {
    "CL and TE": b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "TE and CL": b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n",
    "duplicate CL": b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nx",
    "conflicting CL": b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nxx",
    "CL list": b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 1, 1\r\n\r\nx",
    "CL plus sign": b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: +1\r\n\r\nx",
    "CL underscore": b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 1_0\r\n\r\nxxxxxxxxxx",
    "CL inner space": b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 1 0\r\n\r\nxxxxxxxxxx",
    "CL hex": b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 0x1\r\n\r\nx",
    "CL negative": b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: -1\r\n\r\nx",
    "CL empty": b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length:\r\n\r\n",
    "CL unicode digit": "POST / HTTP/1.1\r\nHost: t\r\nContent-Length: \u0661\r\n\r\nx".encode(),
    "TE not chunked": b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: gzip\r\n\r\nxxxx",
    "TE chunked not last": b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked, gzip\r\n\r\n0\r\n\r\n",
    "TE lookalike": b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n",
    "TE in HTTP/1.0": b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "TE space before colon": b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding : chunked\r\n\r\n0\r\n\r\n",
    "bad chunk size": b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n",
    "bare CR in header": b"GET / HTTP/1.1\r\nHost: t\r\nX-A: b\rc\r\n\r\n",
    "bare CR line end": b"GET / HTTP/1.1\rHost: t\r\n\r\n",
    "NUL in header": b"GET / HTTP/1.1\r\nHost: t\r\nX-A: b\x00c\r\n\r\n",
    "NUL in target": b"GET /\x00 HTTP/1.1\r\nHost: t\r\n\r\n",
    "obs-fold": b"GET / HTTP/1.1\r\nHost: t\r\nX-A: b\r\n c\r\n\r\n",
    "LF-only lines": b"GET / HTTP/1.1\nHost: t\n\n",
    "missing Host in 1.1": b"GET / HTTP/1.1\r\n\r\n",
    "two Hosts": b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    "garbage": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
    "HTTP/2 preface": b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
}


@pytest.mark.parametrize("name", sorted(SMUGGLING))
def test_smuggling_rejected_with_400_and_close(proxy, upstream, name):
    before = len(upstream.heads)
    # A second request rides behind: it must not be answered (the connection is closed).
    data = raw(proxy.port, SMUGGLING[name] + b"GET /second HTTP/1.1\r\nHost: t\r\n\r\n")
    responses = parse_responses(data)
    assert len(responses) == 1, responses
    status, headers, _ = responses[0]
    assert status == 400 if name != "TE chunked not last" else status in (400, 501)
    assert headers["connection"] == "close"
    assert len(upstream.heads) == before  # nothing reached the worker


def test_leading_whitespace_of_content_length_is_field_syntax(proxy, upstream):
    # RFC 9112 field values lose surrounding whitespace: "Content-Length:   3" is a valid 3.
    data = raw(proxy.port, b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length:    3\r\nConnection: close\r\n\r\nabc")
    (status, _, body), = parse_responses(data)
    assert status == 200 and body == b"abc"


def test_transfer_coding_before_chunked_is_not_implemented(proxy):
    data = raw(proxy.port, b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n")
    (status, headers, _), = parse_responses(data)
    assert status == 501 and headers["connection"] == "close"


def test_connect_method_refused(proxy):
    (status, _, _), = parse_responses(raw(proxy.port, b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n"))
    assert status == 405


def test_request_line_too_long_414(proxy):
    data = raw(proxy.port, b"GET /" + b"a" * 2000 + b" HTTP/1.1\r\nHost: t\r\n\r\n")
    (status, headers, _), = parse_responses(data)
    assert status == 414 and headers["connection"] == "close"


def test_request_line_without_end_414(proxy):
    # Never finishing the target must not buffer without bound either.
    with socket.create_connection(("127.0.0.1", proxy.port)) as s:
        s.sendall(b"GET /")
        try:
            for _ in range(20):
                s.sendall(b"a" * 1000)
        except OSError:
            pass
        (status, _, _), = parse_responses(read_all(s))
    assert status == 414


def test_headers_too_large_431(proxy):
    data = raw(proxy.port, b"GET / HTTP/1.1\r\nHost: t\r\nX-Big: " + b"b" * 5000 + b"\r\n\r\n")
    (status, headers, _), = parse_responses(data)
    assert status == 431 and headers["connection"] == "close"


def test_too_many_headers_431(proxy):
    many = b"".join(b"X-H%d: v\r\n" % i for i in range(30))
    (status, _, _), = parse_responses(raw(proxy.port, b"GET / HTTP/1.1\r\nHost: t\r\n" + many + b"\r\n"))
    assert status == 431


def test_endless_header_431(proxy):
    with socket.create_connection(("127.0.0.1", proxy.port)) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: t\r\nX-Endless: ")
        try:
            for _ in range(20):
                s.sendall(b"v" * 1000)
        except OSError:
            pass
        (status, _, _), = parse_responses(read_all(s))
    assert status == 431


def test_body_too_large_413_by_content_length(proxy, upstream):
    before = len(upstream.heads)
    data = raw(proxy.port, b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 10001\r\n\r\n")
    (status, headers, _), = parse_responses(data)
    assert status == 413 and headers["connection"] == "close"
    assert len(upstream.heads) == before


def test_body_too_large_413_chunked(proxy):
    chunk = b"%x\r\n%s\r\n" % (4000, b"c" * 4000)
    data = raw(proxy.port, b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n" + chunk * 3)
    (status, _, _), = parse_responses(data)
    assert status == 413


def test_body_at_the_limit_is_forwarded(proxy):
    r = requests.post(proxy.url + "/", data=b"z" * 10_000)
    assert r.status_code == 200 and r.content == b"z" * 10_000


def test_slowloris_gets_408(proxy):
    with socket.create_connection(("127.0.0.1", proxy.port)) as s:
        started = time.monotonic()
        s.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n")
        answered = select.poll()  # (not select.select: this process may hold descriptors past 1024)
        answered.register(s, select.POLLIN)
        drips = 0
        try:  # a header line every 0.3 s never completes within 1 s: the 408 comes while they go on
            while drips < 100 and not answered.poll(300):
                s.sendall(b"X-Drip: 1\r\n")
                drips += 1
        except OSError:
            pass
        (status, headers, _), = parse_responses(read_all(s))
        assert status == 408 and headers["connection"] == "close"
        assert drips < 100, f"answered only once the drips stopped, {time.monotonic() - started:.1f}s in"


def test_slow_body_gets_408(proxy):
    with socket.create_connection(("127.0.0.1", proxy.port)) as s:
        s.sendall(b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\nabc")
        (status, _, _), = parse_responses(read_all(s, 8))
    assert status == 408


def test_idle_keep_alive_connection_closed_silently(proxy):
    with socket.create_connection(("127.0.0.1", proxy.port)) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\n\r\n")
        s.settimeout(30)
        first = s.recv(65536)
        assert first.startswith(b"HTTP/1.1 200")
        started = time.monotonic()
        assert s.recv(65536) == b""  # closed by the proxy, without a response
        idle = time.monotonic() - started
        assert 0.5 < idle < 20, f"closed after {idle:.1f}s of a 1 s idle timeout"


def test_connection_that_sends_nothing_is_closed(proxy):
    with socket.create_connection(("127.0.0.1", proxy.port)) as s:
        s.settimeout(8)
        assert s.recv(65536) == b""


def _fill(p: ProxyThread, held: list[socket.socket], count: int) -> None:
    """Open `count` more idle connections to `p`, each counted by the proxy before the next."""
    for _ in range(count):
        held.append(socket.create_connection(("127.0.0.1", p.port)))
        wait_until(lambda: p.stats()["client_connections"] == len(held), message="connection counted")


def _hold_busy(p: ProxyThread, held: list[socket.socket], count: int) -> None:
    """Open `count` connections to `p`, each in the middle of a request head (none is idle, so
    none may be shed), and wait until the proxy holds them all."""
    for _ in range(count):
        s = socket.create_connection(("127.0.0.1", p.port))
        s.sendall(b"GET / HTTP/1.1\r\n")
        held.append(s)
    wait_until(lambda: p.stats()["client_connections"] == count, message=f"{count} connections held")


def _queue(p: ProxyThread, held: list[socket.socket], count: int) -> None:
    """Open `count` connections to `p` while its loop is held up: they wait in the backlog
    together, as a burst of newcomers does behind a busy loop."""
    holding, release = threading.Event(), threading.Event()

    def hold_up() -> None:
        holding.set()
        release.wait(10)

    p.loop.call_soon_threadsafe(hold_up)
    assert holding.wait(10)
    try:
        held += [socket.create_connection(("127.0.0.1", p.port)) for _ in range(count)]  # (the kernel completes them)
    finally:
        release.set()


def _acceptors(p: ProxyThread) -> int:
    return p.call(lambda: len(p.proxy.listeners.servers or ()))


def test_at_max_connections_the_longest_idle_connection_makes_room(upstream):
    p = ProxyThread([upstream.port], proxy=configured(ProxyConfig, maxConnections=5), front_cache=NO_CACHE)
    held = []
    with p, closing_all(held):
        _fill(p, held, 1)
        # The proxy's clock is coarse (a tick): let the first be the longest idle.
        opened = p.call(lambda: p.proxy.clock)
        wait_until(lambda: p.call(lambda: p.proxy.clock) > opened, message="a tick of the proxy's clock")
        _fill(p, held, 4)
        (status, _, _), = parse_responses(raw(p.port, b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"))
        assert status == 200
        held[0].settimeout(5)  # well inside the 10 s header timeout, which would close it too
        assert held[0].recv(1) == b""  # the oldest, still waiting for its first request, was closed
        stats = p.stats()
        assert stats["rejected_connections"] == 0 and stats["shed_idle_connections"] >= 1


@pytest.mark.parametrize("looks, shed", [((True, True, False), False), ((True,) * 8, True)])
def test_a_full_proxy_sheds_only_for_a_newcomer_that_keeps_waiting(upstream, monkeypatch, looks, shed):
    """Another proxy sharing the socket may take each newcomer promptly: a look that meets a
    connection just arrived in the backlog must not close anyone's idle connection; finding
    the backlog waiting at every look does."""
    taken: list[bool] = []
    p = ProxyThread([upstream.port], proxy=configured(ProxyConfig, maxConnections=2), front_cache=NO_CACHE)
    held = []
    with p, closing_all(held):
        _fill(p, held, 2)
        # (from here on, while full: the looks of the shedding alone, not those of accepting)
        monkeypatch.setattr(listening.Listeners, "_someone_waiting",
                            lambda self: taken.append(looks[len(taken)]) or taken[-1])
        opened = p.call(lambda: p.proxy.clock)
        wait_until(lambda: p.call(lambda: p.proxy.clock) > opened + listening.SHED_AFTER, message="idle long enough")
        held.append(socket.create_connection(("127.0.0.1", p.port)))  # waits in the backlog
        if shed:
            wait_until(lambda: p.stats()["shed_idle_connections"] >= 1, message="an idle connection shed")
            assert len(taken) >= listening.SHED_LOOKS and all(taken)
        else:
            wait_until(lambda: len(taken) == 3 and not p.call(lambda: p.proxy.listeners.shed_pending),
                       message="three looks, the last finding no one waiting")
            assert p.stats()["shed_idle_connections"] == 0


def test_at_max_connections_busy_ones_keep_newcomers_in_the_backlog(upstream):
    p = ProxyThread([upstream.port], proxy=configured(ProxyConfig, maxConnections=5), front_cache=NO_CACHE)
    held = []
    with p, closing_all(held):
        _hold_busy(p, held, 5)
        with socket.create_connection(("127.0.0.1", p.port), timeout=10) as waiting:
            waiting.sendall(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
            waiting.settimeout(0.5)
            with pytest.raises(socket.timeout):
                waiting.recv(1)  # neither answered nor refused: it waits in the backlog
            held.pop().close()
            waiting.settimeout(10)
            (status, _, _), = parse_responses(read_all(waiting))
            assert status == 200
        assert p.stats()["rejected_connections"] == 0


def test_a_burst_of_newcomers_is_accepted_in_a_few_turns_of_a_busy_loop(upstream):
    """A proxy busy with its clients turns its loop a few dozen times a second, and one uvloop
    server takes one newcomer a turn: 100 would wait 100 turns, seconds under load (reconnecting
    clients timed out in the backlog). The proxy reads each listener through ACCEPTORS of them."""
    p = ProxyThread([upstream.port], front_cache=NO_CACHE)
    turns, served_at = [0], []

    def a_busy_turn() -> None:  # every turn of the loop serves other clients too
        turns[0] += 1
        if len(p.proxy.conns) == 100:
            served_at.append(turns[0])
            return
        time.sleep(0.002)
        p.loop.call_soon(a_busy_turn)

    held = []
    with p, closing_all(held):
        p.call(a_busy_turn)
        held += [socket.create_connection(("127.0.0.1", p.port)) for _ in range(100)]  # (the kernel completes them)
        connected_at = turns[0]
        wait_until(lambda: served_at, message="all 100 served")
        assert served_at[0] - connected_at <= -(-100 // ACCEPTORS) + 4  # (and their connection_made a turn later)


def test_newcomers_one_at_a_time_take_one_acceptor_and_a_queue_of_them_all_until_it_calms(upstream):
    """Each newcomer wakes every acceptor and all but one find nothing: 16 on each of 2 proxies
    cost a connection 31 failed accept() calls, a third of a small request's CPU when clients
    come one at a time. So one acceptor a listener, and ACCEPTORS only while newcomers queue
    behind it, until CALM_TICKS ticks have taken them one a turn."""
    p = ProxyThread([upstream.port], front_cache=NO_CACHE)
    held = []
    with p, closing_all(held):
        for _ in range(5):
            (status, _, _), = parse_responses(raw(p.port, b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"))
            assert status == 200
        assert _acceptors(p) == 1
        _queue(p, held, 40)
        wait_until(lambda: p.stats()["client_connections"] == 40, message="the 40 queued accepted")
        assert _acceptors(p) == ACCEPTORS
        while held:
            held.pop().close()
        wait_until(lambda: _acceptors(p) == 1, timeout=10, message="one acceptor again once calm")


def test_resuming_at_the_limit_makes_one_acceptor_and_the_tick_all_of_them_once_there_is_room(upstream):
    """At the limit, each connection that leaves lets the proxy accept again for one slot: making
    (and closing again) 16 acceptors for it would cost 16 times the work of one."""
    p = ProxyThread([upstream.port], proxy=configured(ProxyConfig, maxConnections=20), front_cache=NO_CACHE)
    held = []
    with p, closing_all(held):
        _queue(p, held, 20)  # (queueing: every acceptor wanted)
        wait_until(lambda: p.stats()["client_connections"] == 20, message="20 connections held")
        held.pop().close()  # one slot free again
        wait_until(lambda: p.call(lambda: p.proxy.listeners.servers is not None), message="accepting again")
        assert _acceptors(p) == 1
        while held:
            held.pop().close()
        wait_until(lambda: _acceptors(p) == ACCEPTORS, message="every acceptor once there is room")


def test_short_of_descriptors_a_proxy_accepts_through_the_acceptors_it_could_make(upstream, monkeypatch):
    """Each acceptor holds a duplicate of the listener: where the open file limit runs out after
    a few, the proxy serves through those rather than through none."""
    real_dup, made = socket.socket.dup, []

    def dup(sock: socket.socket) -> socket.socket:
        if len(made) == 3:
            raise OSError(errno.EMFILE, "Too many open files")
        made.append(sock)
        return real_dup(sock)

    monkeypatch.setattr(socket.socket, "dup", dup)
    p = ProxyThread([upstream.port], front_cache=NO_CACHE)
    held = []
    with p, closing_all(held):
        _queue(p, held, 20)  # (queueing: every acceptor wanted)
        wait_until(lambda: p.stats()["client_connections"] == 20, message="the 20 queued accepted")
        assert _acceptors(p) == 3
        (status, _, _), = parse_responses(raw(p.port, b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"))
        assert status == 200


def test_the_acceptors_duplicates_never_make_the_shared_listener_blocking(upstream):
    """socket.dup() sets the duplicate's timeout to the original's: from a blocking listener
    object it clears O_NONBLOCK on the socket all proxies share, and another proxy that loses
    a newcomer blocks in accept() (a proxy was found hung, sent nothing for 10 s, and killed)."""
    p = ProxyThread([upstream.port], front_cache=NO_CACHE)
    with p:
        listener = p.call(lambda: p.proxy.listeners.sockets[0][0])
        assert listener.gettimeout() == 0.0
        listener.dup().close()
        assert not os.get_blocking(p.sock.fileno())


def test_connection_flood_never_crashes(upstream):
    p = ProxyThread([upstream.port], proxy=configured(ProxyConfig, maxConnections=50), front_cache=NO_CACHE)
    statuses: list[int] = []
    lock = threading.Lock()

    def client():
        try:
            data = raw(p.port, b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n", timeout=10)
            (status, _, _), = parse_responses(data)
        except (OSError, ValueError):
            status = 0
        with lock:
            statuses.append(status)

    with p:
        threads = [threading.Thread(target=client) for _ in range(200)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert len(statuses) == 200
        assert statuses == [200] * 200  # past the limit clients wait their turn, none is turned away
        (status, _, _), = parse_responses(raw(p.port, b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"))
        assert status == 200


def test_bad_requests_do_not_affect_pipelined_good_ones_before_them(proxy):
    data = raw(proxy.port, b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n\r\nok"
                           b"GET / HTTP/1.1\r\nHost: t\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n")
    (s1, _, b1), (s2, h2, _) = parse_responses(data)
    assert (s1, b1) == (200, b"ok") and s2 == 400 and h2["connection"] == "close"
