"""Helpers of the end-to-end tests (client -> `python -m arbiter` -> fileapp workers): a copy of
the bundled site with extra files, patterned file contents, and raw HTTP exchanges that keep
every byte the server sent, so tests see framing, order and connection closes as they are."""
from __future__ import annotations

import gzip
import hashlib
import http.client
import random
import shutil
import socket
import time
from pathlib import Path

from support import REPO

BLOCK = 64 * 1024
_NOISE = random.Random(2018).randbytes(BLOCK - 8)


def patterned(size: int) -> bytes:
    """`size` bytes in which every 64 KiB block differs (its index, then fixed noise), so a
    misplaced, repeated or shifted block is never mistaken for the right one."""
    blocks = (i.to_bytes(8, "big") + _NOISE for i in range(-(-size // BLOCK)))
    return b"".join(blocks)[:size]


def bundled_site(directory: Path) -> Path:
    """A copy of the bundled www/ site plus what the tests need: a precompressed sidecar, a file
    too big for the workers' caches (served with sendfile) and a dotfile."""
    root = directory / "www"
    shutil.copytree(REPO / "www", root)
    css = (root / "style.css").read_bytes()
    (root / "style.css.gz").write_bytes(gzip.compress(css, mtime=0))
    (root / "big.bin").write_bytes(patterned(1536 * 1024))
    (root / "a.txt").write_bytes(b"alpha\n")
    (root / ".secret").write_bytes(b"hidden\n")
    return root


class Responses:
    """Reads consecutive responses off one connection with http.client's parser, through one
    shared buffer (http.client would give each response its own and lose pipelined bytes)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._file = sock.makefile("rb")

    def makefile(self, mode: str, *args) -> "Responses":
        return self

    def __getattr__(self, name: str):
        return getattr(self._file, name)

    def close(self) -> None:  # http.client closes its file after each response; we go on
        pass

    def next(self, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
        """The next response: (status, lower-cased headers, body)."""
        r = http.client.HTTPResponse(self, method=method)  # type: ignore[arg-type]
        r.begin()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()

    def at_eof(self) -> bool:
        """True when the server closed the connection after what was read (no more bytes)."""
        try:
            return self._file.read(1) == b""
        except (ConnectionResetError, socket.timeout):
            return False


def request(method: str, path: str, headers: dict[str, str] | None = None, *, host: str = "gows.test",
            version: str = "1.1", close: bool = False, body: bytes = b"") -> bytes:
    """The bytes of one request, exactly as given (no header is added but Host and, with
    `close`, Connection: close)."""
    lines = [f"{method} {path} HTTP/{version}"]
    if host:
        lines.append(f"Host: {host}")
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def fetch(port: int, method: str, path: str, headers: dict[str, str] | None = None,
          timeout: float = 20.0) -> tuple[int, dict[str, str], bytes]:
    """One request on a fresh connection: (status, lower-cased headers, body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(request(method, path, headers, close=True))
        return Responses(s).next(method)


def read_head(s: socket.socket) -> tuple[bytes, bytes]:
    """Receive a response head: (the head without its blank line, body bytes read past it)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed before the end of the head: {data[:300]!r}")
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    return head, rest


def exchange(port: int, data: bytes, timeout: float = 10.0) -> tuple[bytes, bool]:
    """Send `data`, read until the server closes or `timeout`: (bytes received, closed by the
    server with a clean end of stream)."""
    out = bytearray()
    deadline = time.monotonic() + timeout
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return bytes(out), False
            s.settimeout(left)
            try:
                chunk = s.recv(65536)
            except socket.timeout:
                return bytes(out), False
            except ConnectionResetError:
                return bytes(out), False
            if not chunk:
                return bytes(out), True
            out += chunk


def digest_to_end(s: socket.socket, start: bytes = b"") -> tuple[int, str]:
    """Read `s` until the peer closes: (bytes, sha256 hex digest) of `start` and all read."""
    h = hashlib.sha256(start)
    total = len(start)
    while True:
        data = s.recv(1 << 20)
        if not data:
            return total, h.hexdigest()
        h.update(data)
        total += len(data)
