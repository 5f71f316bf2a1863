"""gows' worker Response: gunicorn's header rules, also for header lists it has checked before
(start_response remembers what it made of a list, by content, so a file's head is checked and
formatted once per version)."""
from __future__ import annotations

import time
from email.utils import parsedate_to_datetime
from types import SimpleNamespace

import pytest

from fileapp import gunicorn_compat as compat
from fileapp import response as response_mod
from fileapp.response import Response
from fileapp.transfer import Transfer

pytestmark = pytest.mark.unit

HEADERS = [("Content-Type", "text/plain"), ("Content-Length", "5"), ("ETag", ' "v1" '),
           ("Connection", "keep-alive"), ("Keep-Alive", "timeout=5"), ("X-Extra", "a")]


def answer(sock, status: str, headers, body: bytes = b"hello", method: str = "GET") -> bytes:
    """The bytes a Response sends for one app answer (HTTP/1.1 keep-alive)."""
    resp = Response(SimpleNamespace(method=method, version=(1, 1), keep_alive=True), sock[0])
    resp.start_response(status, headers)
    resp.write(body)
    assert resp.close() is None
    return sock[1].recv(65536)


def head_lines(data: bytes) -> list[bytes]:
    head, _, _ = data.partition(b"\r\n\r\n")
    return [line for line in head.split(b"\r\n")[1:] if not line.startswith(b"Date: ")]


@pytest.mark.parametrize("again", ["same list", "equal list"])
def test_a_header_list_seen_before_gives_the_same_head(peers, again):
    first = answer(peers, "200 OK", HEADERS)
    second = answer(peers, "200 OK", HEADERS if again == "same list" else [tuple(h) for h in HEADERS])
    assert head_lines(first) == head_lines(second)
    lines = head_lines(second)
    # Hop-by-hop fields dropped (the worker sets Connection itself), values stripped.
    assert b"Keep-Alive: timeout=5" not in lines and b'ETag: "v1"' in lines
    assert lines.count(b"Connection: keep-alive") == 1 and b"X-Extra: a" in lines
    assert second.endswith(b"\r\n\r\nhello")


def test_content_length_bounds_the_body_for_a_remembered_list_too(peers):
    for _ in range(2):
        assert answer(peers, "200 OK", HEADERS, body=b"hello, and more").endswith(b"\r\n\r\nhello")


def test_a_bad_header_is_refused_every_time(peers):
    bad = [("Content-Type", "text/plain"), ("X-Bad", "a\r\nInjected: 1")]
    for _ in range(2):
        resp = Response(SimpleNamespace(method="GET", version=(1, 1), keep_alive=True), peers[0])
        with pytest.raises(compat.InvalidResponseHeader):
            resp.start_response("200 OK", bad)
    resp = Response(SimpleNamespace(method="GET", version=(1, 1), keep_alive=True), peers[0])
    with pytest.raises(ValueError):
        resp.start_response("2OO OK", HEADERS)


def test_no_content_length_on_204_though_the_list_was_remembered_with_one(peers):
    answer(peers, "200 OK", HEADERS)
    data = answer(peers, "204 No Content", HEADERS, body=b"")
    assert not any(line.lower().startswith(b"content-length") for line in head_lines(data))
    assert answer(peers, "200 OK", HEADERS).endswith(b"Content-Length: 5\r\nETag: \"v1\"\r\nX-Extra: a\r\n\r\nhello")


def test_headers_given_as_lists_are_checked_without_being_remembered(peers):
    data = answer(peers, "200 OK", [["Content-Type", "text/plain"], ["Content-Length", "5"]])
    assert b"Content-Type: text/plain" in head_lines(data) and data.endswith(b"hello")


def test_each_of_a_few_thousand_files_has_its_head_checked_once(peers, monkeypatch):
    """The heads of the 4096 files of `make bench`'s many-files load, served round and round."""
    monkeypatch.setattr(response_mod, "_prepared", {})
    monkeypatch.setattr(response_mod, "_heads", {})
    prepared = []
    prepare = response_mod._prepare
    monkeypatch.setattr(response_mod, "_prepare", lambda headers: prepared.append(1) or prepare(headers))
    lists = [[("Content-Length", "5"), ("ETag", f'"v{i}"')] for i in range(4096)]
    for _ in range(2):
        for headers in lists:
            assert answer(peers, "200 OK", headers).endswith(b"\r\n\r\nhello")
    assert len(prepared) == len(lists)


def test_the_memory_of_header_lists_is_bounded(peers):
    for i in range(response_mod._PREPARED_LIMIT + 10):
        resp = Response(SimpleNamespace(method="GET", version=(1, 1), keep_alive=True), peers[0])
        resp.start_response("200 OK", [("Content-Length", "0"), ("X-N", str(i))])
    assert len(response_mod._prepared) <= response_mod._PREPARED_LIMIT


def test_a_remembered_head_still_says_how_the_connection_goes_on_and_carries_the_date(peers):
    """A head is remembered but for its Date line, per status, header list and connection."""
    kept = answer(peers, "200 OK", HEADERS)
    resp = Response(SimpleNamespace(method="GET", version=(1, 1), keep_alive=False), peers[0])
    resp.start_response("200 OK", HEADERS)
    resp.write(b"hello")
    resp.close()
    closing = peers[1].recv(65536)
    assert b"Connection: keep-alive" in head_lines(kept) and b"Connection: close" in head_lines(closing)
    assert head_lines(closing)[2:] == head_lines(kept)[2:]  # after Server and Connection: the same
    assert closing.startswith(b"HTTP/1.1 200 OK\r\nServer: ") and closing.endswith(b"\r\n\r\nhello")
    date = closing.split(b"\r\nDate: ", 1)[1].split(b"\r\n", 1)[0].decode()
    assert abs(parsedate_to_datetime(date).timestamp() - time.time()) < 5
    status_line = answer(peers, "404 Not Found", HEADERS).split(b"\r\n", 1)[0]
    assert status_line == b"HTTP/1.1 404 Not Found"


def test_the_memory_of_heads_is_bounded(peers):
    for i in range(response_mod._PREPARED_LIMIT + 10):
        answer(peers, "200 OK", [("Content-Length", "5"), ("X-N", str(i))])
    assert len(response_mod._heads) <= response_mod._PREPARED_LIMIT


def test_a_response_given_up_after_the_answers_held_for_it_left_forgets_all_its_own_rest(peers):
    """The answers held for a response mark where its own parts begin in their Transfer; once
    they have all left, what the client has not taken is the response's own alone (a Transfer of
    its own), and giving the response up forgets all of it."""
    before = Transfer()
    before.add([b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nheld"])
    resp = Response(SimpleNamespace(method="GET", version=(1, 1), keep_alive=True), peers[0], before=before)
    resp.start_response("200 OK", [("Content-Type", "text/plain")])
    resp.write(b"first part")  # the held answer leaves with it: the socket has room
    assert resp.tried and resp.rest is None
    resp.write(b"x" * (8 << 20))  # more than the socket takes at once
    own = resp.rest
    assert own is not None and own is not before and own
    resp.discard()
    assert resp.rest is None and not own and own.held == 0
