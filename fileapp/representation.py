"""Prepared representations: a file's (or precompressed sidecar's) validators and header
lists built once per cache entry, and the response bodies that stream from a descriptor."""
from __future__ import annotations

import mimetypes
import os
from typing import Iterator

from werkzeug.http import http_date
from werkzeug.utils import get_content_type

# Sidecar suffix per content coding, smallest first (the tie-break order of choose_encoding).
SIDECARS = (("br", ".br"), ("gzip", ".gz"))
STREAM_BLOCK = 64 * 1024

# Stable, modern types whatever /etc/mime.types says; everything else comes from mimetypes.
_TYPES = {
    ".html": "text/html", ".htm": "text/html", ".css": "text/css", ".js": "text/javascript",
    ".mjs": "text/javascript", ".json": "application/json", ".txt": "text/plain",
    ".svg": "image/svg+xml", ".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg",
    ".gif": "image/gif", ".webp": "image/webp", ".avif": "image/avif", ".ico": "image/x-icon",
    ".wasm": "application/wasm", ".woff": "font/woff", ".woff2": "font/woff2",
    ".xml": "application/xml", ".pdf": "application/pdf", ".md": "text/markdown",
    ".gz": "application/gzip", ".br": "application/x-brotli", ".bin": "application/octet-stream",
}
_TEXTUAL = frozenset({"application/json", "text/javascript", "image/svg+xml"})


def content_type(name: str) -> str:
    """The Content-Type for a file name, with charset=utf-8 on text types."""
    ext = os.path.splitext(name)[1].lower()
    mimetype = _TYPES.get(ext)
    if mimetype is None:
        guessed, encoding = mimetypes.guess_type(name, strict=False)
        mimetype = guessed if guessed and not encoding else "application/octet-stream"
    if mimetype in _TEXTUAL:
        return mimetype + "; charset=utf-8"
    return get_content_type(mimetype, "utf-8")



class Rep:
    """One representation (identity or a precompressed sidecar) with its prepared headers."""

    __slots__ = (
        "path", "dev", "ino", "size", "mtime_ns", "mtime", "etag", "body", "type",
        "headers", "not_modified", "common",
    )

    def __init__(self, path: str, st: os.stat_result, body: bytes | None, ctype: str,
                 encoding: str | None, cache_control: str, vary: bool, tag: str | None = None) -> None:
        """`tag`: the entity tag before its coding suffix; None: from mtime and size."""
        self.path = path
        self.dev, self.ino = st.st_dev, st.st_ino
        self.size, self.mtime_ns = st.st_size, st.st_mtime_ns
        self.mtime = st.st_mtime_ns // 1_000_000_000
        if tag is None:
            tag = f"{self.mtime_ns:x}-{self.size:x}"
        self.etag = f"{tag}-{'br' if encoding == 'br' else 'gz'}" if encoding else tag
        self.body = body
        self.type = ctype
        # Headers every response about this representation carries (200, 206, 304, 416).
        self.not_modified = [("ETag", f'"{self.etag}"'), ("Cache-Control", cache_control)]
        if vary:
            self.not_modified.append(("Vary", "Accept-Encoding"))
        self.common = self.not_modified + [
            ("Last-Modified", http_date(self.mtime)), ("Accept-Ranges", "bytes"),
        ]
        if encoding:
            self.common.append(("Content-Encoding", encoding))
        self.headers = self.common + [
            ("Content-Type", ctype), ("Content-Length", str(self.size)),
        ]

    def same_file(self, st: os.stat_result) -> bool:
        """True when `st` describes the file this representation was built from."""
        return (st.st_ino, st.st_dev, st.st_size, st.st_mtime_ns) == (
            self.ino, self.dev, self.size, self.mtime_ns)


class Entry:
    """What a request path maps to: a file (its representations) or a directory redirect."""

    __slots__ = ("identity", "encoded", "codings", "redirect", "nbytes")

    def __init__(self, identity: Rep | None = None, encoded: dict[str, Rep] | None = None,
                 redirect: bool = False) -> None:
        self.identity = identity
        self.encoded = encoded or {}
        self.codings = tuple(c for c, _ in SIDECARS if c in self.encoded)
        self.redirect = redirect
        reps = [identity, *self.encoded.values()] if identity else []
        self.nbytes = 512 + sum(512 + len(r.body or b"") for r in reps)


class FileStream:
    """A file-like view of [start, stop) of an open descriptor, for wsgi.file_wrapper.

    Servers that sendfile (gunicorn) use fileno(), the current offset and Content-Length; the
    others call read(), which never goes past `stop`.
    """

    def __init__(self, fd: int, start: int, stop: int) -> None:
        self._fd = fd
        self._left = stop - start
        os.lseek(fd, start, os.SEEK_SET)

    def fileno(self) -> int:
        return self._fd

    def read(self, size: int = STREAM_BLOCK) -> bytes:
        if self._left <= 0:
            return b""
        data = os.read(self._fd, min(size if size > 0 else STREAM_BLOCK, self._left))
        self._left -= len(data)
        return data

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class StreamBody:
    """Iterates a FileStream in blocks; close() frees the descriptor even if never iterated."""

    def __init__(self, stream: FileStream) -> None:
        self._stream = stream

    def __iter__(self) -> Iterator[bytes]:
        while True:
            block = self._stream.read(STREAM_BLOCK)
            if not block:
                return
            yield block

    def close(self) -> None:
        self._stream.close()


class MultipartBody:
    """multipart/byteranges parts read with pread from an open descriptor; close() frees it.

    As a wsgi.file_wrapper's file it reads block by block; a server that sends files itself
    (gows' worker) takes `segments()` instead and sends the ranges with sendfile.
    """

    def __init__(self, fd: int, heads: list[bytes], ranges: tuple[tuple[int, int], ...],
                 tail: bytes) -> None:
        self._fd, self._heads, self._ranges, self._tail = fd, heads, ranges, tail
        self._blocks: Iterator[bytes] | None = None

    def segments(self) -> list[bytes | tuple[int, int, int]]:
        """The body as byte strings and (fd, start, stop) ranges of the open file, in order."""
        out: list[bytes | tuple[int, int, int]] = []
        for part_head, (start, stop) in zip(self._heads, self._ranges):
            out += (part_head, (self._fd, start, stop))
        out.append(self._tail)
        return out

    def read(self, size: int = STREAM_BLOCK) -> bytes:
        """The next block of the body (b"" at its end), for wsgi.file_wrapper."""
        if self._blocks is None:
            self._blocks = iter(self)
        return next(self._blocks, b"")

    def __iter__(self) -> Iterator[bytes]:
        for part_head, (start, stop) in zip(self._heads, self._ranges):
            yield part_head
            while start < stop:
                block = os.pread(self._fd, min(STREAM_BLOCK, stop - start), start)
                if not block:  # truncated under us: Content-Length can no longer hold
                    raise OSError("file shrank while being sent")
                start += len(block)
                yield block
        yield self._tail

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def read_exactly(fd: int, size: int) -> bytes | None:
    """The first `size` bytes of an open file (its fstat size), or None if it is now shorter.

    Bytes appended meanwhile are left out, so the body always matches the fstat-derived
    Content-Length and ETag, as sendfile with that count would.
    """
    chunks, left = [], size
    while left > 0:
        block = os.read(fd, left)
        if not block:
            return None
        chunks.append(block)
        left -= len(block)
    return b"".join(chunks)

