"""The proxy's side of file hand-offs (fileapp.handoff): who is asked, what is honoured, and every
race between a worker naming a file and the proxy sending it, played by a scripted worker."""
from __future__ import annotations

import asyncio
import fcntl
import os
import socket
import struct
import time
from contextlib import contextmanager
from types import SimpleNamespace
from typing import Iterator

import pytest

from arbiter.config import FrontCacheConfig, configured
from arbiter.proxy.request import Request
from arbiter.proxy.rewrite import worker_request_head
from arbiter.state import WorkerState
from fileapp import handoff
from fileapp.handoff import directory_stamp, file_header
from proxy_harness import NO_CACHE, ProxyThread, RawUpstream, parse_responses, raw
from support import wait_until

pytestmark = pytest.mark.integration

TOKEN = "t0ken"
BODY = bytes(range(256)) * 1024  # 256 KiB, every offset recognisable
WORKER_BYTES = b"bytes the worker sent itself"


class Namer:
    """A scripted local worker that names `path`'s file, as seen now (`see()`), for each request
    carrying the proxy's secret, and sends WORKER_BYTES to those without it."""

    def __init__(self, path, cache_control: bytes = b"no-cache", status: int = 200) -> None:
        self.path = path
        self.cache_control = cache_control
        self.status = status
        self.range = (0, None)
        self.seen: os.stat_result | None = None
        self.before_answer = lambda: None  # what happens between the decision and the proxy's open
        self.content_length = b"0"
        self.conditional = False  # whether If-None-Match: "e1" gets 304
        self.direct = False  # whether the file is named with its directory's stamp (no symlink on the way)
        self.upstream = RawUpstream(self._respond)
        self.port = self.upstream.port

    def see(self) -> None:
        self.seen = os.stat(self.path)

    @property
    def heads(self) -> list[bytes]:
        return self.upstream.heads

    def _respond(self, head: bytes, body: bytes, conn: socket.socket) -> bool:
        common = b'HTTP/1.1 %d X\r\nETag: "e1"\r\nCache-Control: %s\r\nContent-Type: application/octet-stream\r\n' % (
            self.status, self.cache_control)
        if self.conditional and b'\r\nIf-None-Match: "e1"' in head:
            conn.sendall(b'HTTP/1.1 304 Not Modified\r\nETag: "e1"\r\nCache-Control: %s\r\n\r\n' % self.cache_control)
        elif b"\r\nX-Gows-Handoff: " + TOKEN.encode() + b"\r\n" in head:
            directory = directory_stamp(os.path.dirname(self.path)) if self.direct else None
            st = self.seen or os.stat(self.path)
            start, count = self.range
            count = st.st_size - start if count is None else count
            named = file_header(str(self.path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, start, count,
                                directory)
            self.before_answer()
            conn.sendall(common + b"Content-Length: %s\r\nX-Gows-File: %s\r\n\r\n" % (
                self.content_length, named.encode()))
        else:
            conn.sendall(common + b"Content-Length: %d\r\n\r\n%s" % (len(WORKER_BYTES), WORKER_BYTES))
        return True

    def stop(self) -> None:
        self.upstream.stop()


@pytest.fixture
def big(tmp_path):
    path = tmp_path / "big.bin"
    path.write_bytes(BODY)
    return path


@pytest.fixture
def namer(big):
    n = Namer(big)
    yield n
    n.stop()


@pytest.fixture
def proxy(namer):
    p = ProxyThread([namer.port], front_cache=NO_CACHE, handoff_token=TOKEN)
    yield p
    p.stop()


def get(port: int, path: str = "/big.bin", extra: bytes = b"", method: bytes = b"GET") -> tuple[int, dict, bytes]:
    data = raw(port, method + b" " + path.encode() + b" HTTP/1.1\r\nHost: t\r\n" + extra + b"Connection: close\r\n\r\n",
               timeout=10)
    [(status, headers, body)] = parse_responses(data, head_only=method == b"HEAD")
    return status, headers, body


def test_a_named_file_is_sent_by_the_proxy_with_the_workers_head(proxy, namer):
    status, headers, body = get(proxy.port)
    assert status == 200 and body == BODY
    assert headers["content-length"] == str(len(BODY)) and headers["etag"] == '"e1"'
    assert "x-gows-file" not in headers
    assert proxy.stats()["file_bodies"] == 1


def test_a_file_named_again_the_same_way_is_not_parsed_again(proxy, namer, monkeypatch):
    from arbiter.proxy import filebody, relay
    parsed = []

    def counting(value):
        parsed.append(value)
        return handoff.parse_file_header(value)
    for module in (relay, filebody):
        monkeypatch.setattr(module, "parse_file_header", counting, raising=False)
    for _ in range(5):
        status, _, body = get(proxy.port)
        assert status == 200 and body == BODY
    assert len(parsed) == 1  # (a tenth of the proxy's time per body on a site of many files)
    namer.range = (1000, 70000)  # another value: parsed, and its range sent
    namer.status = 206
    assert get(proxy.port)[2] == BODY[1000:71000] and len(parsed) == 2


def test_a_named_range_is_sent_from_its_offset(proxy, namer):
    namer.status = 206
    namer.range = (1000, 70000)
    status, headers, body = get(proxy.port)
    assert status == 206 and body == BODY[1000:71000]
    assert headers["content-length"] == "70000"


def test_only_local_workers_get_the_secret_and_only_on_get(proxy, namer):
    get(proxy.port, method=b"HEAD")
    get(proxy.port, extra=b"X-Gows-Handoff: guessed\r\n")
    heads = namer.heads
    assert b"X-Gows-Handoff" not in heads[0]  # HEAD: nothing to hand off
    assert heads[1].count(b"X-Gows-Handoff") == 1 and b"guessed" not in heads[1]  # the client's is dropped


def test_a_local_worker_asked_for_a_file_gets_only_the_forwarding_fields_it_reads(proxy, namer):
    """fileapp reads the client's Host itself, and its scheme is http unless it is told https:
    X-Forwarded-Host and X-Forwarded-Proto: http would only cost its parser (2 us of 28 a request)."""
    get(proxy.port, method=b"HEAD")  # (not asked for a file: the full set)
    get(proxy.port)
    full, local = namer.heads
    assert b"\r\nX-Forwarded-Host: t\r\n" in full and b"\r\nX-Forwarded-Proto: http\r\n" in full
    assert b"\r\nHost: t\r\n" in local and b"\r\nX-Forwarded-For: 127.0.0.1\r\n" in local
    assert local.endswith(b"\r\nVia: 1.1 gows")
    assert b"X-Forwarded-Host" not in local and b"X-Forwarded-Proto" not in local


@pytest.mark.parametrize("handoff_line", [None, b"X-Gows-Handoff: t\r\n"])
def test_every_worker_is_told_of_https(handoff_line):
    req = Request()
    req.target, req.host = b"/a", b"example.test"
    head = worker_request_head(req, b"10.0.0.1", None, handoff_line, None, scheme=b"https")
    assert head.count(b"\r\nX-Forwarded-Proto: https\r\n") == 1


def test_a_remote_workers_file_header_is_neither_honoured_nor_forwarded(big):
    namer = Namer(big)
    # A remote worker that names a file anyway (it cannot know the secret: it is never sent one).
    namer.upstream.respond = lambda head, body, conn: conn.sendall(
        b"HTTP/1.1 200 X\r\nContent-Length: 5\r\nX-Gows-File: %s\r\n\r\nhello" % file_header(
            str(big), *(lambda st: (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns))(os.stat(big)), 0,
            len(BODY)).encode()) or True
    proxy = ProxyThread([], front_cache=NO_CACHE, handoff_token=TOKEN)
    try:
        def add_remote():
            worker = proxy.table.add(WorkerState("127.0.0.1", namer.port, local=False))
            proxy._mark(worker, True)
        proxy.call(add_remote)
        status, headers, body = get(proxy.port)
        assert (status, body) == (200, b"hello") and "x-gows-file" not in headers
        assert b"X-Gows-Handoff" not in namer.heads[0]
        assert proxy.stats()["file_bodies"] == 0
    finally:
        proxy.stop()
        namer.stop()


def _replace(path, data: bytes) -> None:
    new = path.with_name("new.tmp")
    new.write_bytes(data)
    os.replace(new, path)


@pytest.mark.parametrize("change", ["replaced", "rewritten", "truncated", "deleted", "symlink", "dir-symlink"])
def test_a_file_changed_after_the_decision_is_asked_for_again_as_bytes(tmp_path, change):
    sub = tmp_path / "root" / "sub"
    sub.mkdir(parents=True)
    path = sub / "big.bin"
    path.write_bytes(BODY)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "big.bin").write_bytes(b"S" * len(BODY))  # what must never be served

    def swap() -> None:
        if change == "replaced":
            _replace(path, b"R" * len(BODY))
        elif change == "rewritten":  # same inode, new contents and mtime
            with open(path, "r+b") as f:
                f.write(b"W" * 10)
            os.utime(path, ns=(time.time_ns(), namer.seen.st_mtime_ns + 1))
        elif change == "truncated":
            os.truncate(path, 100)
        elif change == "deleted":
            os.unlink(path)
        elif change == "symlink":
            os.unlink(path)
            os.symlink(outside / "big.bin", path)
        else:
            os.rename(sub, tmp_path / "root" / "old")
            os.symlink(outside, sub)

    namer = Namer(path)
    namer.see()  # the worker decides on the file as it is now...
    namer.before_answer = swap  # ...and it changes before the proxy opens it
    proxy = ProxyThread([namer.port], front_cache=NO_CACHE, handoff_token=TOKEN)
    try:
        status, headers, body = get(proxy.port)
        assert (status, body) == (200, WORKER_BYTES)  # what the worker sends when asked without the secret
        assert [b"X-Gows-Handoff" in h for h in namer.heads] == [True, False]
        stats = proxy.stats()
        assert (stats["file_refused"], stats["file_bodies"]) == (1, 0)
    finally:
        proxy.stop()
        namer.stop()


def test_a_file_named_with_a_body_length_breaks_the_contract_and_is_refused(proxy, namer):
    namer.content_length = b"0\r\nX-Extra: 1"  # (still framed as empty)
    assert get(proxy.port)[2] == BODY  # a well-formed hand-off
    namer.content_length = b"3\r\nX-Pad: 1"
    namer.upstream.respond = _with_body(namer.upstream.respond)
    status, _, body = get(proxy.port)
    assert (status, body) == (200, WORKER_BYTES)
    assert proxy.stats()["file_refused"] == 1


def _with_body(respond):
    def wrapped(head, body, conn):
        class Appending:
            def sendall(self, data):
                conn.sendall(data + (b"abc" if b"X-Gows-File" in data else b""))
        return respond(head, body, Appending())
    return wrapped


def test_a_file_truncated_while_being_sent_ends_the_connection_short(tmp_path):
    path = tmp_path / "huge.bin"
    size = 256 << 20
    with open(path, "wb") as f:
        f.write(BODY)
        f.truncate(size)
    namer = Namer(path)
    proxy = ProxyThread([namer.port], front_cache=NO_CACHE, handoff_token=TOKEN)
    try:
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
            s.sendall(b"GET /huge.bin HTTP/1.1\r\nHost: t\r\n\r\n")
            received = b""
            while len(received) < len(BODY) + 1024:
                received += s.recv(65536)
            os.truncate(path, len(BODY) + (4 << 20))  # shorter than the Content-Length sent
            while True:
                data = s.recv(1 << 20)
                if not data:
                    break
                received += data
        head, _, body = received.partition(b"\r\n\r\n")
        assert b"Content-Length: %d" % size in head
        assert len(BODY) < len(body) <= len(BODY) + (4 << 20)  # short, and closed
        assert body[:len(BODY)] == BODY and not body[len(BODY):].strip(b"\0")
        wait_until(lambda: proxy.stats()["truncated_responses"] == 1, timeout=5)
    finally:
        proxy.stop()
        namer.stop()


def naming_a_huge_file(tmp_path, namer: Namer, response_timeout: float) -> ProxyThread:
    """A proxy (front cache off) in front of `namer`, which names a sparse 64 MiB file."""
    from arbiter.config import ProxyConfig
    path = tmp_path / "huge.bin"
    with open(path, "wb") as f:
        f.truncate(64 << 20)
    namer.path = path
    return ProxyThread([namer.port], proxy=configured(ProxyConfig, responseTimeout=response_timeout),
                       front_cache=NO_CACHE, handoff_token=TOKEN)


def test_no_descriptor_to_watch_a_full_socket_ends_the_download_at_once(tmp_path, namer, monkeypatch):
    """A body that must wait for room watches a duplicate of the client's socket: with none to
    spare (EMFILE), the connection ends there, not after the response timeout with the file and
    the client held."""
    from arbiter.proxy import filebody

    def no_descriptor(fd):
        raise OSError(24, "Too many open files")

    proxy = naming_a_huge_file(tmp_path, namer, response_timeout=60)
    try:
        monkeypatch.setattr(filebody, "os", SimpleNamespace(**{**vars(os), "dup": no_descriptor}))
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
            s.sendall(b"GET /huge.bin HTTP/1.1\r\nHost: t\r\n\r\n")
            received = s.recv(65536)
            while data := s.recv(1 << 20):  # (a timeout here: the client was left waiting)
                received += data
        assert b"Content-Length: %d" % (64 << 20) in received and len(received) < 64 << 20
        wait_until(lambda: proxy.stats()["truncated_responses"] == 1, timeout=5)
    finally:
        proxy.stop()


def test_a_slow_reader_of_a_named_file_is_dropped_after_the_response_timeout(tmp_path, namer):
    proxy = naming_a_huge_file(tmp_path, namer, response_timeout=1)
    try:
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.sendall(b"GET /huge.bin HTTP/1.1\r\nHost: t\r\n\r\n")
            wait_until(lambda: proxy.stats()["file_bodies"] == 1, timeout=5)
            # Not reading at all: the proxy gives up on it, and holds no buffer meanwhile.
            wait_until(lambda: proxy.stats()["client_connections"] == 0, timeout=10,
                       message="the stalled client dropped")
    finally:
        proxy.stop()


def _send_queue(local_port: int, remote_port: int) -> int | None:
    """Bytes queued in the kernel (unsent or unacknowledged) on the established loopback TCP
    socket local_port -> remote_port, from /proc/net/tcp (None: no such socket)."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if (fields[3] == "01" and int(fields[1].rsplit(":", 1)[1], 16) == local_port
                        and int(fields[2].rsplit(":", 1)[1], 16) == remote_port):
                    return int(fields[4].split(":")[0], 16)
    return None


SIOCOUTQNSD = 0x894B  # Linux: the bytes a TCP socket holds not yet sent


def test_a_head_with_no_body_bytes_after_it_is_not_held_back(tmp_path):
    """The file sender holds a small body's head for the body (MSG_MORE): with no body bytes
    to follow, the kernel would keep the head back for its cork timeout (200 ms on Linux)."""
    from arbiter.proxy.filebody import FileSender
    path = tmp_path / "a.bin"
    path.write_bytes(b"x" * 100)

    async def unsent_after_start() -> int:
        loop = asyncio.get_running_loop()
        with socket.create_server(("127.0.0.1", 0)) as server, \
                socket.create_connection(server.getsockname()) as client:
            accepted, _ = server.accept()
            transport, _ = await loop.connect_accepted_socket(asyncio.Protocol, accepted)
            ended: list[object] = []
            sender = FileSender(loop, transport, os.open(path, os.O_RDONLY), 0, 0, lambda: ended.append("done"),
                                lambda reason, gone: ended.append(reason), lambda: None)
            sender.start(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
            fd = transport.get_extra_info("socket").fileno()
            unsent = struct.unpack("i", fcntl.ioctl(fd, SIOCOUTQNSD, b"\0" * 4))[0]
            assert ended == ["done"]
            transport.close()
            client.settimeout(5)
            assert client.recv(100).startswith(b"HTTP/1.1 200 OK")
            return unsent

    assert asyncio.run(unsent_after_start()) == 0


def test_a_carrier_sends_on_the_socket_its_number_names_now_and_never_closes_it():
    """The head's MSG_MORE send goes through one socket object per descriptor number, made once
    (filebody.carrier): collected or not, it must never close a descriptor the loop owns, and a
    number reused by another connection must carry that connection's bytes."""
    import gc
    from arbiter.proxy import filebody
    first, first_peer = socket.socketpair()
    number = first.fileno()
    assert filebody.carrier(number).send(b"one", socket.MSG_MORE) == 3
    assert first_peer.recv(3) == b"one"
    first.close()  # the loop closes a connection: its number is free for the next one
    second, second_peer = socket.socketpair()
    if second.fileno() != number:  # (take the freed number for it, as the next accept would)
        os.dup2(second.fileno(), number)
        second.close()
        second = socket.socket(fileno=number)
    try:
        assert filebody.carrier(number).send(b"two", socket.MSG_MORE) == 3
        assert second_peer.recv(3) == b"two"
        filebody._carriers.pop(number)
        gc.collect()
        second.send(b"open")  # not closed by the carrier's end
        assert second_peer.recv(4) == b"open"
    finally:
        for sock in (second, first_peer, second_peer):
            sock.close()


def test_a_stalled_reader_of_a_named_file_leaves_little_unsent_in_the_kernel(tmp_path, namer):
    """The kernel holds about filebody.UNSENT_BYTES for a client that stops reading, not the
    4 MiB a send buffer may grow to (tcp_wmem): 10,000 stalled downloads would pin 40 GiB."""
    from arbiter.proxy.filebody import UNSENT_BYTES
    path = tmp_path / "huge.bin"
    with open(path, "wb") as f:
        f.truncate(64 << 20)
    namer.path = path
    proxy = ProxyThread([namer.port], front_cache=NO_CACHE, handoff_token=TOKEN)
    try:
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)  # a window that fills soon
            s.settimeout(10)
            s.connect(("127.0.0.1", proxy.port))
            s.sendall(b"GET /huge.bin HTTP/1.1\r\nHost: t\r\n\r\n")
            wait_until(lambda: proxy.stats()["file_bodies"] == 1, timeout=5)
            seen: list[int | None] = []

            def stopped_sending() -> bool:  # the same (nonzero) queue three looks in a row
                seen.append(_send_queue(proxy.port, s.getsockname()[1]))
                return len(seen) >= 3 and seen[-1] is not None and seen[-1] > 0 and seen[-3] == seen[-2] == seen[-1]

            wait_until(stopped_sending, timeout=10, interval=0.1, message="the proxy's socket full")
            assert seen[-1] <= 2 * UNSENT_BYTES, f"{seen[-1]} bytes queued for a client that reads nothing"
    finally:
        proxy.stop()


def test_the_front_cache_remembers_a_named_file_and_rechecks_it(big):
    namer = Namer(big, cache_control=b"max-age=60")
    proxy = ProxyThread([namer.port], front_cache=configured(FrontCacheConfig), revalidate_after=60,
                        handoff_token=TOKEN)
    try:
        for _ in range(3):
            status, headers, body = get(proxy.port)
            assert (status, body) == (200, BODY) and headers["content-length"] == str(len(BODY))
            assert "x-gows-file" not in headers and headers["etag"] == '"e1"'
        assert len(namer.heads) == 1  # the next two needed no worker
        assert get(proxy.port, method=b"HEAD")[1]["content-length"] == str(len(BODY))
        assert get(proxy.port, extra=b'If-None-Match: "e1"\r\n')[0] == 304
        stats = proxy.stats()
        assert stats["file_bodies"] == 3 and stats["front_cache"]["bytes"] < 8192
        # Rewritten in place (its directory unchanged): a head or a 304 alone, which open no
        # file, check it too, and leave the answer to a worker.
        for size, request in ((len(BODY) + 1, {"method": b"HEAD"}), (len(BODY) + 2, {"extra": b'If-None-Match: "e1"\r\n'})):
            asked = len(namer.heads)
            big.write_bytes(b"R" * size)
            get(proxy.port, **request)
            assert len(namer.heads) == asked + 1, request
        asked = len(namer.heads)
        _replace(big, b"N" * len(BODY))  # changed on disk: the stored name no longer holds
        status, _, body = get(proxy.port)
        assert (status, body) == (200, b"N" * len(BODY))  # named again by the worker, sent by us
        assert len(namer.heads) == asked + 1
    finally:
        proxy.stop()
        namer.stop()


@pytest.fixture
def settled(big, monkeypatch):
    """Directories stamped once unchanged for 50 ms (many clock ticks) rather than seconds."""
    monkeypatch.setattr(handoff, "STAMP_SETTLE", 0.05)
    wait_until(lambda: directory_stamp(big.parent), timeout=5, message="the directory settled")


@contextmanager
def caching(namer: Namer) -> Iterator[ProxyThread]:
    """A proxy with the default front cache in front of `namer`, whose entries are stale after
    0.3 s (the workers' cache TTL); it and `namer` are stopped afterwards."""
    proxy = ProxyThread([namer.port], front_cache=configured(FrontCacheConfig), revalidate_after=0.3,
                        handoff_token=TOKEN)
    try:
        yield proxy
    finally:
        proxy.stop()
        namer.stop()


def test_a_stale_named_file_whose_directory_is_unchanged_needs_no_worker(big, settled):
    namer = Namer(big, cache_control=b"max-age=600")
    namer.conditional = namer.direct = True
    stale = 0.7  # older than the revalidation interval (and the proxy's 0.25 s clock)
    with caching(namer) as proxy:
        assert get(proxy.port)[2] == BODY and len(namer.heads) == 1
        for _ in range(2):
            time.sleep(stale)
            assert get(proxy.port)[2] == BODY
        assert len(namer.heads) == 1  # the directory as the worker saw it is enough
        assert proxy.stats()["front_cache"]["revalidated"] == 2
        (big.parent / "big.bin.br").write_bytes(b"a sidecar: a worker might now choose it")
        time.sleep(stale)
        assert get(proxy.port)[2] == BODY and len(namer.heads) == 2  # a new name: a worker decides
        assert b'If-None-Match: "e1"' in namer.heads[-1]
        # That worker may have decided before the change (its own cache): once more, then none.
        for heads in (3, 3):
            time.sleep(stale)
            assert get(proxy.port)[2] == BODY and len(namer.heads) == heads
        _replace(big, b"N" * len(BODY))  # the file itself is checked on every hit
        assert get(proxy.port)[2] == b"N" * len(BODY) and len(namer.heads) == 4


def test_a_named_file_its_directory_keeps_fresh_goes_to_a_worker_once_per_max_age(big, settled):
    """The directory's stamp keeps an entry fresh without a worker, within its max-age: its Age
    keeps counting from the worker's answer, and once the max-age is over a worker is asked."""
    namer = Namer(big, cache_control=b"max-age=3")
    namer.direct = True
    with caching(namer) as proxy:
        assert get(proxy.port)[2] == BODY and len(namer.heads) == 1
        ages = []
        within = time.monotonic() + 2.4
        while time.monotonic() < within:
            time.sleep(0.4)  # (stale each time: older than revalidate_after)
            _, headers, body = get(proxy.port)
            assert body == BODY
            ages.append(int(headers.get("age", "0")))
        assert len(namer.heads) == 1 and proxy.stats()["front_cache"]["revalidated"] >= 2
        assert ages == sorted(ages) and ages[-1] >= 2, ages
        wait_until(lambda: get(proxy.port)[2] == BODY and len(namer.heads) == 2, timeout=5,
                   message="a worker asked once the max-age is over")


def test_a_stale_file_named_through_a_symlink_is_asked_for_each_time(big, settled):
    """Named without its directory's stamp (a symlink on the way, which may be repointed), a
    stale entry goes to a worker every time, as any other entry does."""
    namer = Namer(big, cache_control=b"max-age=600")
    namer.conditional = True
    with caching(namer) as proxy:
        assert get(proxy.port)[2] == BODY and len(namer.heads) == 1
        for heads in (2, 3, 4):
            time.sleep(0.7)
            assert get(proxy.port)[2] == BODY and len(namer.heads) == heads
            assert b'If-None-Match: "e1"' in namer.heads[-1]


def test_no_descriptor_is_left_behind(proxy, namer):
    def fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    get(proxy.port)
    before = fds()
    for _ in range(300):
        assert get(proxy.port)[2] == BODY
    namer.see()
    namer.before_answer = lambda: os.utime(namer.path)  # every one refused from now on
    for _ in range(100):
        assert get(proxy.port)[2] == WORKER_BYTES
    wait_until(lambda: fds() <= before, timeout=5, message=f"descriptors back to {before}")


def test_a_client_leaving_mid_file_is_no_truncation(tmp_path, caplog):
    path = tmp_path / "huge.bin"
    with open(path, "wb") as f:
        f.truncate(256 << 20)
    namer = Namer(path)
    proxy = ProxyThread([namer.port], front_cache=NO_CACHE, handoff_token=TOKEN)
    try:
        with caplog.at_level("DEBUG", logger="gows.proxy"):
            for _ in range(3):
                s = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                s.sendall(b"GET /huge.bin HTTP/1.1\r\nHost: t\r\n\r\n")
                s.recv(4096)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")  # reset on close
                s.close()
            wait_until(lambda: proxy.stats()["client_connections"] == 0, timeout=10)
        stats = proxy.stats()
        assert (stats["file_bodies"], stats["truncated_responses"]) == (3, 0)
        assert not [r for r in caplog.records if r.levelname == "WARNING" and "file body" in r.getMessage()]
    finally:
        proxy.stop()
        namer.stop()
