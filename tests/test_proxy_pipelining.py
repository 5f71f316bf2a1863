"""GETs to a local worker pipelined behind the requests in flight on one connection (upstream.py):
each answer reaches its own client, a connection that ends or stalls sends those behind it out
again charged to no one, and no client's slowness holds another's answer. An in-process proxy
and a scripted worker on a Unix socket that answers in order, as gows' workers do."""
from __future__ import annotations

import re
import socket
import struct
import threading
from typing import Callable

import pytest

from arbiter.proxy.counters import PIPELINED, STALE_RETRIES
from arbiter.proxy import upstream
from arbiter.proxy.sink import DISCARD
from arbiter.proxy.upstream import PIPELINE_DEPTH, UpstreamConnection
from proxy_harness import NO_CACHE, ProxyThread, read_all
from support import free_port, wait_until

pytestmark = pytest.mark.unit

BIG = 32 * 2**20  # an answer no client socket takes whole


class PipelinedWorker:
    """A worker on a Unix socket answering the GETs of each connection in order, as they come.

    `answer(path)` gives the bytes to write for `path` and whether to keep the connection; a
    path starting with /hold waits until `release` is set. `reads` records, per connection,
    how many requests each recv brought."""

    def __init__(self, path: str, answer: Callable[[str], tuple[bytes, bool]] | None = None) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.bind(path)
        self.sock.listen(64)
        self.answer = answer or ok
        self.release = threading.Event()
        self.held = threading.Event()  # a /hold request is being held
        self.reads: list[list[int]] = []
        self.served: list[str] = []
        self.port = 0  # the worker's TCP port in the proxy's table
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        reads: list[int] = []
        self.reads.append(reads)
        buf = b""
        with conn:
            try:
                while data := conn.recv(65536):
                    buf += data
                    heads = buf.split(b"\r\n\r\n")
                    buf = heads.pop()
                    reads.append(len(heads))
                    for head in heads:
                        path = head.split(b" ")[1].decode()
                        if path.startswith("/hold"):
                            self.held.set()
                            self.release.wait(20)
                        self.served.append(path)
                        out, keep = self.answer(path)
                        conn.sendall(out)
                        if not keep:
                            return
            except OSError:
                return

    def close(self) -> None:
        self.release.set()
        self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


def ok(path: str) -> tuple[bytes, bool]:
    body = path.encode()
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body), True


@pytest.fixture
def local(tmp_path, monkeypatch):
    """A proxy (front cache off) whose one worker is reached over the returned worker's socket;
    the requests a test holds behind an answer stay there however long it takes."""
    monkeypatch.setattr(upstream, "PIPELINE_PATIENCE", 3600.0)
    made: list[tuple[ProxyThread, PipelinedWorker]] = []

    def make(answer: Callable[[str], tuple[bytes, bool]] | None = None) -> tuple[ProxyThread, PipelinedWorker]:
        path = str(tmp_path / f"w{len(made)}.sock")
        worker = PipelinedWorker(path, answer)
        port = free_port()  # (nothing on TCP: the proxy reaches it over the socket)
        proxy = ProxyThread([port], front_cache=NO_CACHE)
        proxy.call(lambda: setattr(proxy.worker(port), "unix_path", path))
        worker.port = port
        made.append((proxy, worker))
        return proxy, worker

    yield make
    for proxy, worker in made:
        proxy.stop()
        worker.close()


def send(proxy: ProxyThread, path: str) -> socket.socket:
    client = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
    client.sendall(b"GET %s HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n" % path.encode())
    return client


def body_of(client: socket.socket) -> bytes:
    with client:
        response = read_all(client, 10)
    assert response.startswith(b"HTTP/1.1 200"), response[:200]
    return response.partition(b"\r\n\r\n")[2]


def reset(client: socket.socket) -> None:
    """Leave with a reset: the proxy sees the client gone at once."""
    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.close()


def count(proxy: ProxyThread, slot: int) -> int:
    return proxy.call(lambda: proxy.proxy.counts[slot])


def held_with_others_behind(proxy: ProxyThread, worker: PipelinedWorker, paths: list[str]
                            ) -> tuple[socket.socket, list[socket.socket]]:
    """A /hold GET being answered, and a GET for each of `paths` sent behind it."""
    first = send(proxy, "/hold")
    assert worker.held.wait(10)
    others = [send(proxy, path) for path in paths]
    wait_until(lambda: count(proxy, PIPELINED) == len(paths), timeout=10)
    return first, others


def test_gets_go_behind_the_one_in_flight_and_each_client_gets_its_own_answer(local):
    proxy, worker = local()
    paths = [f"/f{i}" for i in range(PIPELINE_DEPTH - 1)]
    first, others = held_with_others_behind(proxy, worker, paths)
    worker.release.set()
    assert body_of(first) == b"/hold"
    assert [body_of(client) for client in others] == [path.encode() for path in paths]
    assert len(worker.reads) == 1  # one connection carried them all
    assert sum(worker.reads[0]) == PIPELINE_DEPTH and max(worker.reads[0]) > 1


def test_past_the_depth_a_get_takes_a_connection_of_its_own(local):
    proxy, worker = local()
    first, others = held_with_others_behind(proxy, worker, [f"/f{i}" for i in range(PIPELINE_DEPTH - 1)])
    extra = send(proxy, "/extra")
    assert body_of(extra) == b"/extra"  # answered on a second connection while the first waits
    assert len(worker.reads) == 2 and count(proxy, PIPELINED) == PIPELINE_DEPTH - 1
    worker.release.set()
    assert [body_of(client) for client in [first, *others]]


def test_a_connection_counts_once_however_many_gets_ride_on_it(local):
    """The worker's count of this proxy's connections (what the balancer weighs against its
    threads) counts each connection in use once, pipelined or not, and none once all are answered."""
    proxy, worker = local()
    first, others = held_with_others_behind(proxy, worker, [f"/f{i}" for i in range(PIPELINE_DEPTH - 1)])
    state = proxy.worker(worker.port)
    assert proxy.call(lambda: (state.in_flight, state.connections)) == (PIPELINE_DEPTH, 1)
    extra = send(proxy, "/extra")
    assert body_of(extra) == b"/extra"
    worker.release.set()
    assert [body_of(client) for client in [first, *others]]
    wait_until(lambda: proxy.call(lambda: (state.in_flight, state.connections)) == (0, 0), timeout=10,
               message="nothing in flight, no connection in use")
    assert len(worker.reads) == 2  # (the second connection, now idle, is kept for reuse)


def test_a_worker_closing_after_an_answer_sends_those_behind_again_charged_to_no_one(local):
    def close_after_hold(path: str) -> tuple[bytes, bool]:
        out, _ = ok(path)
        return (out.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n", 1), False) if path == "/hold" \
            else (out, True)

    proxy, worker = local(close_after_hold)
    first, others = held_with_others_behind(proxy, worker, ["/a", "/b", "/c"])
    worker.release.set()
    assert body_of(first) == b"/hold"
    assert [body_of(client) for client in others] == [b"/a", b"/b", b"/c"]
    assert not proxy.worker(worker.port).passive_failure_times and count(proxy, STALE_RETRIES) == 0


def test_a_worker_resetting_the_connection_sends_those_behind_again(local):
    def reset_on_hold(path: str) -> tuple[bytes, bool]:
        if path == "/hold":
            raise OSError("reset")  # (the worker thread closes the connection unanswered)
        return ok(path)

    proxy, worker = local(reset_on_hold)
    first, others = held_with_others_behind(proxy, worker, ["/a", "/b"])
    worker.release.set()
    assert [body_of(client) for client in others] == [b"/a", b"/b"]
    first.close()


def test_a_slow_reader_in_front_never_holds_the_answers_behind_it(local):
    def big_for_hold(path: str) -> tuple[bytes, bool]:
        if path == "/hold":
            return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % BIG + b"x" * BIG, True
        return ok(path)

    proxy, worker = local(big_for_hold)
    slow, others = held_with_others_behind(proxy, worker, ["/a", "/b", "/c"])
    worker.release.set()  # the big answer starts; its client reads nothing
    assert [body_of(client) for client in others] == [b"/a", b"/b", b"/c"]
    assert len(worker.reads) >= 2  # they went out again on another connection
    received = read_all(slow, 20)  # the slow client still gets every byte of its own
    assert len(received.partition(b"\r\n\r\n")[2]) == BIG


def test_an_answer_that_takes_long_holds_no_request_behind_it(local, monkeypatch):
    proxy, worker = local()
    first, others = held_with_others_behind(proxy, worker, ["/a", "/b"])
    monkeypatch.setattr(upstream, "PIPELINE_PATIENCE", 0.2)  # (a slow disk, a long body)
    assert [body_of(client) for client in others] == [b"/a", b"/b"]  # the first still held
    assert len(worker.reads) >= 2 and not worker.release.is_set()
    worker.release.set()
    assert body_of(first) == b"/hold"
    assert not proxy.worker(worker.port).passive_failure_times


def test_a_client_leaving_while_its_get_waits_behind_leaves_the_others_answered(local):
    proxy, worker = local()
    first, (a, gone, c) = held_with_others_behind(proxy, worker, ["/a", "/gone", "/c"])
    reset(gone)
    wait_until(lambda: proxy.call(lambda: len(proxy.proxy.conns)) == 3, timeout=10)
    worker.release.set()
    assert [body_of(client) for client in (first, a, c)] == [b"/hold", b"/a", b"/c"]
    assert len(worker.reads) == 1 and worker.served == ["/hold", "/a", "/gone", "/c"]
    again = send(proxy, "/again")  # the connection still serves, in step
    assert body_of(again) == b"/again"


def test_the_client_in_front_leaving_sends_those_behind_it_again(local):
    proxy, worker = local()
    first, others = held_with_others_behind(proxy, worker, ["/a", "/b"])
    reset(first)  # the stream of its connection is unusable now: those behind go out again
    assert [body_of(client) for client in others] == [b"/a", b"/b"]
    assert not proxy.worker(worker.port).passive_failure_times


@pytest.mark.parametrize("method", [b"HEAD", b"POST"])
def test_nothing_goes_behind_a_head_or_a_request_with_a_body(local, method):
    proxy, worker = local()
    first = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
    body = b"" if method == b"HEAD" else b"data"
    first.sendall(b"%s /hold HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
                  % (method, len(body), body))
    assert worker.held.wait(10)
    after = send(proxy, "/after")
    assert body_of(after) == b"/after"  # on a connection of its own, while the first is held
    assert count(proxy, PIPELINED) == 0 and len(worker.reads) == 2
    worker.release.set()
    with first:
        assert re.match(rb"HTTP/1.1 200", read_all(first, 10))


class Writes:
    """A transport that records what is written to it."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def pause_reading(self) -> None:
        pass

    def abort(self) -> None:
        pass


def test_gets_sent_behind_in_one_turn_of_the_loop_leave_in_one_write(local):
    """One write (one wake-up of the worker) for the requests that went behind in the same turn;
    none for those moved elsewhere before the turn ended."""
    proxy, worker = local()
    sinks = [DISCARD] * 3

    def behind(pause: bool) -> tuple[UpstreamConnection, Writes]:
        conn = UpstreamConnection(proxy.proxy.pool, proxy.worker(worker.port))
        conn.connection_made(transport := Writes())
        conn.sink = sinks[0]
        for sink, head in zip(sinks, (b"GET /a ", b"GET /b ", b"GET /c ")):
            conn.send_behind(sink, head)
        if pause:
            conn.pause(sinks[0])
        return conn, transport

    for pause, written in ((False, [b"GET /a GET /b GET /c "]), (True, [])):
        conn, transport = proxy.call(lambda: behind(pause))
        proxy.call(lambda: None)  # (a later turn of the loop)
        assert transport.writes == written
