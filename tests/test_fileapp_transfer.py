"""The rest of a response kept for a slow client (fileapp.transfer.Transfer): sent in order as
the client takes it, never waiting, its files on descriptors of its own."""
from __future__ import annotations

import os
import socket

import pytest

from fileapp.transfer import Transfer

pytestmark = pytest.mark.unit


@pytest.fixture
def pair():
    server, client = socket.socketpair()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
    yield server, client
    server.close()
    client.close()


def test_bytes_and_file_ranges_go_out_in_order_as_the_client_takes_them(pair, tmp_path):
    server, client = pair
    content = os.urandom(500_000)
    (tmp_path / "f").write_bytes(content)
    fd = os.open(tmp_path / "f", os.O_RDONLY)
    body = os.urandom(300_000)
    rest = Transfer()
    rest.add([b"head", body], skip=2)  # its first two bytes went out already
    rest.add_file(fd, 1000, 400_000)
    rest.add([b"tail"])
    rest.own()
    os.close(fd)  # as gunicorn closes the app's file when the request ends
    expected = b"ad" + body + content[1000:401_000] + b"tail"
    received = bytearray()
    rounds = 0
    while not rest.send(server):  # returns at once with the socket full: never waits
        assert server.gettimeout() is None  # and leaves the socket blocking, as it found it
        received += client.recv(1 << 20)
        rounds += 1
    client.settimeout(5)
    while len(received) < len(expected):
        received += client.recv(1 << 20)
    assert rounds > 10 and bytes(received) == expected
    assert rest.sent == len(expected) and rest.held == 0 and not rest


def test_close_releases_the_descriptors_it_owns(pair, tmp_path):
    (tmp_path / "f").write_bytes(b"x" * 1_000_000)
    fd = os.open(tmp_path / "f", os.O_RDONLY)
    rest = Transfer()
    rest.add_file(fd, 0, 1_000_000)
    rest.own()
    os.close(fd)
    assert not rest.send(pair[0])
    owned = [name for name in os.listdir("/proc/self/fd")
             if os.path.realpath(f"/proc/self/fd/{name}") == str(tmp_path / "f")]
    assert len(owned) == 1
    rest.close()
    assert not rest
    with pytest.raises(OSError):
        os.fstat(int(owned[0]))


def test_a_file_that_shrank_cuts_the_response_short(pair, tmp_path):
    (tmp_path / "f").write_bytes(b"x" * 100)
    fd = os.open(tmp_path / "f", os.O_RDONLY)
    try:
        rest = Transfer()
        rest.add_file(fd, 0, 200)  # the Content-Length promised more than is left
        with pytest.raises(OSError, match="shrank"):
            for _ in range(3):  # what there is, then the end of the file
                rest.send(pair[0])
    finally:
        os.close(fd)


def test_what_was_added_since_a_mark_can_be_dropped_keeping_what_came_before(pair, tmp_path):
    (tmp_path / "f").write_bytes(b"x" * 1000)
    rest = Transfer()
    rest.add([b"first ", b"answer "])
    mark = rest.mark()
    rest.add([b"second"])
    fd = os.open(tmp_path / "f", os.O_RDONLY)
    rest.add_file(fd, 0, 1000)
    rest.own()
    os.close(fd)
    owned = [name for name in os.listdir("/proc/self/fd")
             if os.path.realpath(f"/proc/self/fd/{name}") == str(tmp_path / "f")]
    rest.drop_since(mark)
    assert rest.held == len(b"first answer ")
    with pytest.raises(OSError):  # the dropped range's descriptor is closed
        os.fstat(int(owned[0]))
    assert rest.send(pair[0]) and pair[1].recv(100) == b"first answer "
