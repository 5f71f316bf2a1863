"""Prepared representations: a file's (or precompressed sidecar's) validators and header
lists built once per cache entry, and the response bodies that stream from a descriptor."""
from __future__ import annotations

import mimetypes
import os
from functools import lru_cache
from typing import Iterator, NamedTuple

from werkzeug.http import http_date
from werkzeug.utils import get_content_type

from .handoff import DirectoryStamp
from .headers import NOT_MODIFIED_NAMES, Headers, apply

# Sidecar suffix per content coding, smallest first (the tie-break order of choose_encoding).
SIDECARS = (("br", ".br"), ("gzip", ".gz"))
# What an encoded representation's ETag ends in, sidecar or compressed on the fly alike.
ETAG_SUFFIX = {"br": "br", "gzip": "gz", "zstd": "zst"}
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


def _with_charset(mimetype: str) -> str:
    """`mimetype` as a Content-Type, with charset=utf-8 when it is text."""
    if mimetype in _TEXTUAL:
        return mimetype + "; charset=utf-8"
    return get_content_type(mimetype, "utf-8")


_PREPARED_TYPES = {ext: _with_charset(mimetype) for ext, mimetype in _TYPES.items()}


def content_type(name: str) -> str:
    """The Content-Type for a file name, with charset=utf-8 on text types."""
    ext = os.path.splitext(name)[1].lower()
    prepared = _PREPARED_TYPES.get(ext)
    if prepared is not None:
        return prepared
    guessed, encoding = mimetypes.guess_type(name, strict=False)
    return _with_charset(guessed if guessed and not encoding else "application/octet-stream")


# Files published together share their modification second: each formats it once (the
# formatting is a fifth of building a representation).
_last_modified = lru_cache(maxsize=1024)(http_date)


class FileVersion(NamedTuple):
    """The stat fields a representation is built from (an os.stat_result has them too)."""

    st_dev: int
    st_ino: int
    st_size: int
    st_mtime_ns: int


class Rep:
    """One representation (identity, a precompressed sidecar, or compressed on the fly) with
    its prepared headers. `path` is None for one that exists only in memory (`coded`)."""

    __slots__ = (
        "path", "dev", "ino", "size", "mtime_ns", "mtime", "etag", "body", "type",
        "headers", "not_modified", "common", "cache_control", "extra", "digest", "directory",
        "handed_off",
    )

    def __init__(self, path: str | None, st: os.stat_result | FileVersion, body: bytes | None,
                 ctype: str, encoding: str | None, cache_control: str, vary: bool, extra: Headers = (),
                 tag: str | None = None, etag: str | None = None,
                 directory: DirectoryStamp | None = None) -> None:
        """`extra`: the headers rules set for this URL path (fileapp.headers); they replace
        fileapp's own of the same names (Content-Type included). `tag`: the entity tag before
        its coding suffix (None: from mtime and size); `etag`: the whole tag (a body coded on
        the fly: its identity's with the coding's suffix); `directory`: the stamp of the file's
        directory from before the URL was resolved to it, if no symlink led there
        (fileapp.handoff.FileRef)."""
        self.path = path
        self.directory = directory
        self.dev, self.ino = st.st_dev, st.st_ino
        self.size, self.mtime_ns = st.st_size, st.st_mtime_ns
        self.mtime = st.st_mtime_ns // 1_000_000_000
        if etag is None:
            etag = tag if tag is not None else f"{self.mtime_ns:x}-{self.size:x}"
            if encoding:
                etag += "-" + ETAG_SUFFIX[encoding]
        self.etag = etag
        self.body = body
        self.type = next((v for k, v in extra if k.lower() == "content-type"), ctype) if extra else ctype
        self.cache_control = cache_control
        self.extra = extra
        self.digest: int | None = None  # CRC-32 of body, computed when first needed
        # The head of a 200 whose whole body gows' proxy sends (fileapp.handoff), made when first needed.
        self.handed_off: list[tuple[str, str]] | None = None
        # Headers every response about this representation carries (200, 206, 304, 416).
        self.not_modified = [("ETag", f'"{self.etag}"'), ("Cache-Control", cache_control)]
        if vary:
            self.not_modified.append(("Vary", "Accept-Encoding"))
        if extra:
            self.not_modified = apply(self.not_modified,
                                      tuple(h for h in extra if h[0].lower() in NOT_MODIFIED_NAMES))
        self.common = self.not_modified + [
            ("Last-Modified", _last_modified(self.mtime)), ("Accept-Ranges", "bytes"),
        ]
        if encoding:
            self.common.append(("Content-Encoding", encoding))
        if extra:
            self.common += [h for h in extra
                            if h[0].lower() not in NOT_MODIFIED_NAMES and h[0].lower() != "content-type"]
        self.headers = self.common + [
            ("Content-Type", self.type), ("Content-Length", str(self.size)),
        ]

    @classmethod
    def coded(cls, identity: Rep, body: bytes, coding: str) -> Rep:
        """`identity`'s bytes compressed on the fly into `body`: same validators' source and
        Last-Modified, its ETag with the coding's suffix; no file (never handed off)."""
        version = FileVersion(identity.dev, identity.ino, len(body), identity.mtime_ns)
        return cls(None, version, body, identity.type, coding, identity.cache_control, True,
                   identity.extra, etag=f"{identity.etag}-{ETAG_SUFFIX[coding]}")

    def same_file(self, st: os.stat_result) -> bool:
        """True when `st` describes the file this representation was built from."""
        return (st.st_ino, st.st_dev, st.st_size, st.st_mtime_ns) == (
            self.ino, self.dev, self.size, self.mtime_ns)


class Entry:
    """What a request path maps to: a file (its representations) or a directory redirect.

    `compressible`: a file without sidecars that fileapp.compress may compress on the fly;
    `where`: the path the URL maps to under the root, for an entry of files only described
    (their bytes not held), which fileapp.loader checks cheaply when its time is up;
    `settled`: the stamp its directory had before the URL was resolved, when no sidecar of the
    file existed but those in `encoded`: while the directory keeps it, none has appeared."""

    __slots__ = ("identity", "encoded", "codings", "redirect", "nbytes", "compressible", "where", "settled")

    def __init__(self, identity: Rep | None = None, encoded: dict[str, Rep] | None = None,
                 redirect: bool = False, compressible: bool = False, where: str | None = None,
                 settled: DirectoryStamp | None = None) -> None:
        self.identity = identity
        self.encoded = encoded or {}
        self.codings = tuple(c for c, _ in SIDECARS if c in encoded) if encoded else ()
        self.redirect = redirect
        self.compressible = compressible and not self.codings
        self.where = where
        self.settled = settled
        nbytes = 512
        if identity is not None:
            for rep in (identity, *self.encoded.values()):
                nbytes += 512 + (len(rep.body) if rep.body is not None else 0)
        self.nbytes = nbytes


SHRANK = "file shrank while being sent"


class FileStream:
    """A file-like view of [start, stop) of an open descriptor, for wsgi.file_wrapper.

    Servers that sendfile (gunicorn) use fileno(), the current offset and Content-Length; the
    others call read(), which never goes past `stop`. A file that shrank below `stop` raises
    (in read(), or in close() for a server that sent it itself and took a short count for the
    end, as gunicorn's does): the server then ends the connection rather than keep it alive
    with less body than its Content-Length, the rest taken from the next answer.
    """

    def __init__(self, fd: int, start: int, stop: int) -> None:
        self._fd = fd
        self._left = stop - start
        self._stop = stop
        os.lseek(fd, start, os.SEEK_SET)

    def fileno(self) -> int:
        return self._fd

    def read(self, size: int = STREAM_BLOCK) -> bytes:
        if self._left <= 0:
            return b""
        data = os.read(self._fd, min(size if size > 0 else STREAM_BLOCK, self._left))
        if not data:
            raise OSError(SHRANK)
        self._left -= len(data)
        return data

    def close(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            try:
                shrank = self._left > 0 and os.fstat(fd).st_size < self._stop
            finally:
                os.close(fd)
            if shrank:
                raise OSError(SHRANK)


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
                    raise OSError(SHRANK)
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

