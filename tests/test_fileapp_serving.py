"""How a serving thread of gows' worker answers one connection's pipelined requests
(fileapp.serving): the answers the app gave whole leave together in one sendmsg, in order,
before any error page and before the worker waits on the client; a body still being made
leaves part by part; what is held is bounded; a client that takes nothing never holds the
thread."""
from __future__ import annotations

import logging
import select
import socket
import threading
import time

import pytest
from gunicorn.config import Config

import fileapp.serving
from e2e_support import Responses
from fileapp import create_app
from fileapp.connection import Connection
from fileapp.http1 import RequestReader, base_environ
from fileapp.response import HOLD_LIMIT
from fileapp.serving import NEXT_REQUEST, ROOM_TO_SEND, ConnectionServing

pytestmark = pytest.mark.unit

ERROR_PAGE = b"HTTP/1.1 500 Internal Server Error\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"


class Recorder:
    """The worker's side of a socket pair, noting the bytes of each send."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.sends: list[bytes] = []

    def sendmsg(self, buffers, *args) -> int:
        sent = self.sock.sendmsg(buffers, *args)
        self.sends.append(b"".join(bytes(b) for b in buffers)[:sent])
        return sent

    def sendall(self, data: bytes) -> None:
        self.sock.sendall(data)
        self.sends.append(bytes(data))

    def __getattr__(self, name: str):
        return getattr(self.sock, name)


class Serving(ConnectionServing):
    """The serving part of GowsThreadWorker, without its threads and poller."""

    def __init__(self, app) -> None:
        self.cfg = Config()
        self.log = logging.getLogger("test.serving")
        self.log.access_log_enabled = False  # type: ignore[attr-defined]
        self.wsgi = app
        self.alive = True
        self.nr = 0
        self.max_requests = 1 << 30
        self.write_timeout = 5.0
        self._keepalive = 5.0
        self._base_environ = base_environ(self.cfg)
        self._pre_request = self._post_request = None

    def handle_error(self, req, sock, client, exc) -> None:  # as gunicorn's: a page, sent at once
        sock.sendall(ERROR_PAGE)


@pytest.fixture(autouse=True)
def long_hold(monkeypatch) -> None:
    """A hold no batch here outlasts on a loaded machine (the worker's 2 ms did, in CI); the
    answers of a batch still leave as soon as no request is ready behind them."""
    monkeypatch.setattr(fileapp.serving, "HOLD_TIME", 1.0)


@pytest.fixture
def site(tmp_path):
    (tmp_path / "small.txt").write_bytes(b"small body\n")
    (tmp_path / "page.bin").write_bytes(b"p" * 2048)
    (tmp_path / "large.bin").write_bytes(b"L" * 60_000)  # cached: answered with its bytes
    return tmp_path


@pytest.fixture
def pair():
    server, client = socket.socketpair()
    client.settimeout(10)
    yield Recorder(server), client
    server.close()
    client.close()


def connection(sock: Recorder) -> Connection:
    return Connection(sock, "", "", RequestReader(Config(), sock, ""), 0.0)  # type: ignore[arg-type]


def gets(*paths: str, method: str = "GET") -> bytes:
    return b"".join(f"{method} {path} HTTP/1.1\r\nHost: t\r\n\r\n".encode() for path in paths)


def read_all(client: socket.socket, count: int, method: str = "GET") -> list[tuple[int, bytes]]:
    responses = Responses(client)
    return [(status, body) for status, _, body in (responses.next(method) for _ in range(count))]


def sent_when_taken(serving: Serving, conn: Connection, wanted: int | None) -> int | None:
    """While `wanted` is room to send: send the rest of `conn`'s answers as the worker's poller
    does, whenever its socket has room again, and serve what follows; what to wait for next."""
    while wanted == ROOM_TO_SEND:
        select.select([], [conn.sock.sock], [], 10)
        wanted = serving._send_rest(conn)
    return wanted


def reading(client: socket.socket, count: int) -> tuple[threading.Thread, list[tuple[int, bytes]]]:
    """A thread reading `count` responses off `client` as they come, and what it read."""
    got: list[tuple[int, bytes]] = []
    reader = threading.Thread(target=lambda: got.extend(read_all(client, count)))
    reader.start()
    return reader, got


def test_the_answers_to_pipelined_gets_leave_together_in_order(site, pair):
    sock, client = pair
    client.sendall(gets("/small.txt", "/missing", "/page.bin", "/small.txt", "/page.bin",
                        "/small.txt", "/small.txt", "/page.bin"))
    assert Serving(create_app(str(site)))._serve(connection(sock)) == NEXT_REQUEST
    assert len(sock.sends) == 1
    got = read_all(client, 8)
    assert [status for status, _ in got] == [200, 404, 200, 200, 200, 200, 200, 200]
    assert got[0][1] == got[3][1] == b"small body\n" and got[7][1] == b"p" * 2048
    assert sock.sends[0].startswith(b"HTTP/1.1 200 OK\r\n")


def test_heads_too_leave_together(site, pair):
    sock, client = pair
    client.sendall(gets("/small.txt", "/page.bin", "/small.txt", method="HEAD"))
    Serving(create_app(str(site)))._serve(connection(sock))
    assert len(sock.sends) == 1
    assert [status for status, _ in read_all(client, 3, "HEAD")] == [200, 200, 200]


def test_an_answer_is_held_no_longer_than_the_hold_time(site, pair, monkeypatch):
    """Slow answers behind (a cold disk; here 404s that take their time) do not keep the ones
    before them waiting."""
    sock, client = pair
    monkeypatch.setattr(fileapp.serving, "HOLD_TIME", 0.25)
    files = create_app(str(site))

    def app(environ, start_response):
        if environ["PATH_INFO"] == "/slow":
            time.sleep(0.4)
        return files(environ, start_response)

    client.sendall(gets("/small.txt", "/slow", "/slow", "/small.txt"))
    assert Serving(app)._serve(connection(sock)) == NEXT_REQUEST
    assert [data.count(b"HTTP/1.1 ") for data in sock.sends] == [2, 2]  # (each /slow ends a hold)
    assert [status for status, _ in read_all(client, 4)] == [200, 404, 404, 200]


def test_answers_held_leave_before_an_error_page_and_the_connection_ends(site, pair):
    sock, client = pair
    files = create_app(str(site))

    def app(environ, start_response):
        if environ["PATH_INFO"] == "/boom":
            raise RuntimeError("boom")
        return files(environ, start_response)

    client.sendall(gets("/small.txt", "/page.bin", "/boom", "/small.txt"))
    assert Serving(app)._serve(connection(sock)) is None  # closed after the error page
    assert sock.sends[-1] == ERROR_PAGE and len(sock.sends) == 2
    assert [status for status, _ in read_all(client, 3)] == [200, 200, 500]


def test_a_client_taking_nothing_before_an_error_page_never_holds_the_thread(site, pair):
    """The answers held do not fit in the socket when the app fails: they leave when the
    client takes them, and the connection ends without the page."""
    sock, client = pair
    sock.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
    files = create_app(str(site))

    def app(environ, start_response):
        if environ["PATH_INFO"] == "/boom":
            raise RuntimeError("boom")
        return files(environ, start_response)

    client.sendall(gets("/large.bin", "/boom"))
    serving, conn = Serving(app), connection(sock)
    wanted = serving._serve(conn)
    assert wanted == ROOM_TO_SEND  # at once
    reader, got = reading(client, 1)
    wanted = sent_when_taken(serving, conn, wanted)
    reader.join(10)
    assert wanted is None and got == [(200, b"L" * 60_000)]
    assert ERROR_PAGE not in sock.sends


def test_an_answer_that_fails_halfway_is_dropped_and_those_held_before_it_still_leave(site, pair):
    sock, client = pair
    files = create_app(str(site))

    def app(environ, start_response):
        if environ["PATH_INFO"] == "/bad":
            start_response("200 OK", [("Content-Length", "4")])
            return [b"good", "not bytes"]  # the worker refuses the second part: too late for a 500
        return files(environ, start_response)

    client.sendall(gets("/page.bin", "/small.txt", "/bad", "/small.txt"))
    assert Serving(app)._serve(connection(sock)) is None
    sock.sock.shutdown(socket.SHUT_WR)
    received = b"".join(iter(lambda: client.recv(65536), b""))
    assert received == b"".join(sock.sends) and received.count(b"HTTP/1.1 ") == 2
    assert received.endswith(b"\r\n\r\nsmall body\n")


def test_a_body_still_being_made_leaves_part_by_part(site, pair):
    """PEP 3333: each part of a streamed body is sent before the next is asked for, and the
    answers held for it go first."""
    sock, client = pair
    files = create_app(str(site))
    seen_by_client = []

    def stream():
        yield b"first part "
        seen_by_client.append(select.select([client], [], [], 0)[0] != [])
        yield b"second part"

    def app(environ, start_response):
        if environ["PATH_INFO"] == "/stream":
            start_response("200 OK", [("Content-Length", "22")])
            return stream()
        return files(environ, start_response)

    client.sendall(gets("/small.txt", "/stream", "/small.txt"))
    assert Serving(app)._serve(connection(sock)) == NEXT_REQUEST
    assert seen_by_client == [True]
    assert b"\r\n\r\nsmall body\nHTTP/1.1 200 OK\r\n" in sock.sends[0]  # the answer held for it, first
    assert sock.sends[0].endswith(b"\r\n\r\nfirst part ")
    got = read_all(client, 3)
    assert [body for _, body in got] == [b"small body\n", b"first part second part", b"small body\n"]


def test_what_is_held_for_later_answers_is_bounded(site, pair):
    sock, client = pair
    client.sendall(gets(*["/page.bin"] * 100))
    reader, got = reading(client, 100)
    serving, conn = Serving(create_app(str(site))), connection(sock)
    assert sent_when_taken(serving, conn, serving._serve(conn)) == NEXT_REQUEST
    reader.join(10)
    assert got == [(200, b"p" * 2048)] * 100
    answer = sum(map(len, sock.sends)) // 100
    assert max(map(len, sock.sends)) <= HOLD_LIMIT + answer  # (220 KB in all)


def test_a_request_with_a_body_behind_does_not_hold_the_answer_before_it(site, pair):
    """The worker waits for a request body (here after a 100 Continue): what it answered
    before must have left, in order."""
    sock, client = pair
    files = create_app(str(site))

    def app(environ, start_response):
        if environ["REQUEST_METHOD"] == "POST":
            body = environ["wsgi.input"].read()
            start_response("200 OK", [("Content-Length", str(len(body)))])
            return [body]
        return files(environ, start_response)

    client.sendall(gets("/small.txt") + b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n"
                   b"Expect: 100-continue\r\n\r\n")
    received = bytearray()

    def client_side():  # the body only once the GET's answer and the 100 Continue are in
        while b"100 Continue\r\n\r\n" not in received:
            received.extend(client.recv(65536))
        client.sendall(b"hello")

    sender = threading.Thread(target=client_side)
    sender.start()
    assert Serving(app)._serve(connection(sock)) == NEXT_REQUEST
    sender.join(10)
    assert sock.sends[0].endswith(b"small body\n") and sock.sends[1] == b"HTTP/1.1 100 Continue\r\n\r\n"
    assert received.index(b"small body\n") < received.index(b"100 Continue")


def test_a_client_taking_nothing_leaves_the_thread_free_and_gets_every_answer_later(site, pair):
    sock, client = pair
    sock.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
    client.sendall(gets(*["/large.bin"] * 6, "/small.txt"))
    serving, conn = Serving(create_app(str(site))), connection(sock)
    wanted = serving._serve(conn)
    assert wanted == ROOM_TO_SEND and conn.rest  # at once, the socket full
    reader, got = reading(client, 7)
    wanted = sent_when_taken(serving, conn, wanted)
    reader.join(10)
    assert wanted == NEXT_REQUEST
    assert [body for _, body in got] == [b"L" * 60_000] * 6 + [b"small body\n"]
