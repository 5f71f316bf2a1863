"""Compression on the fly: a compressible file without a precompressed sidecar is compressed
once per file version and coding, and the result kept in the worker's ResponseCache.

Never per request: the compressed body is kept (counted in the cache's byte budget, never
expired by age) under the file's real path, the coding and the head of the URL it answers (an
alias or a directory's index may have other headers than the file's own), with the version it
was made from (device, inode, size, mtime, and the CRC-32 of the bytes when the cache holds
them, so an in-place rewrite keeping size and mtime is seen as the loader sees it). A body that
cannot be kept (caching off, or larger than the whole budget) is never compressed: identity is
served. A request for a body another thread is compressing waits for it rather than compressing
again.

Bounded work: only files from MIN_SIZE to `max_size` bytes (the cache's largest cached file,
256 KiB by default) are compressed, at levels that take a few tens of milliseconds for the
largest on this machine (measured: zstd 9 and brotli 5 give the same size, 26% of a 256 KiB
Python source, gzip 6 28%; brotli 11 would take a second).
"""
from __future__ import annotations

import gzip
import os
import zlib
from functools import lru_cache
from threading import Event, Lock
from typing import Callable

import brotli

from .cache import ResponseCache
from .files import Resolver
from .representation import Rep, read_exactly
from .semantics import choose_encoding

try:  # Python 3.14's standard library
    from compression import zstd as _zstd

    def _zstd_compress(data: bytes) -> bytes:
        return _zstd.compress(data, level=ZSTD_LEVEL)
except ImportError:
    import zstandard

    def _zstd_compress(data: bytes) -> bytes:
        return zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(data)

# Smaller files are sent as they are: below about a kilobyte a response fits one TCP segment
# either way (nginx's gzip_min_length is 20 bytes, Caddy's encode minimum_length 512).
MIN_SIZE = 1024
ZSTD_LEVEL, BROTLI_QUALITY, GZIP_LEVEL = 9, 5, 6

# Codings in the order ties between equal q-values are broken: zstd first where the client
# offers it (as small as brotli 5 here, and quicker to decode), then brotli, then gzip.
CODINGS = ("zstd", "br", "gzip")

ENCODERS: dict[str, Callable[[bytes], bytes]] = {
    "zstd": _zstd_compress,
    "br": lambda data: brotli.compress(data, quality=BROTLI_QUALITY),
    # mtime=0: every worker makes the same bytes for the same file, as a strong ETag promises.
    "gzip": lambda data: gzip.compress(data, GZIP_LEVEL, mtime=0),
}

# Types worth compressing; everything else (images but SVG, audio, video, archives, woff/woff2
# fonts, PDFs) is compressed already or binary.
COMPRESSIBLE_TYPES = frozenset({
    "application/javascript", "application/json", "application/manifest+json",
    "application/wasm", "application/xml", "application/x-javascript", "image/svg+xml",
    "image/x-icon", "image/vnd.microsoft.icon", "font/ttf", "font/otf",
})


@lru_cache(maxsize=256)  # (a site has a few types, each asked for twice per file loaded)
def compressible_type(content_type: str) -> bool:
    """Whether a Content-Type (parameters allowed) is worth compressing: text/*, a type of
    COMPRESSIBLE_TYPES, or one with a +json or +xml suffix."""
    mimetype = content_type.partition(";")[0].strip().lower()
    return (mimetype.startswith("text/") or mimetype in COMPRESSIBLE_TYPES
            or mimetype.endswith(("+json", "+xml")))


class Compressed:
    """A kept compression result: the version it was made from and the coded representation
    (None when compressing did not make the body smaller: identity is served)."""

    __slots__ = ("version", "rep", "nbytes")
    OVERHEAD = 512  # bytes counted for its headers and bookkeeping, as for a cache entry

    def __init__(self, version: tuple, rep: Rep | None) -> None:
        self.version = version
        self.rep = rep
        self.nbytes = self.OVERHEAD + (len(rep.body) if rep is not None else 0)


class Compressor:
    """Picks and makes the coded representation of a compressible file for a request."""

    def __init__(self, cache: ResponseCache, resolver: Resolver, max_size: int) -> None:
        self.cache = cache
        self.resolver = resolver
        self.max_size = max_size
        self.compressions = 0  # bodies compressed, for tests and stats
        self._lock = Lock()
        self._making: dict[tuple, Event] = {}

    def eligible(self, content_type: str, size: int) -> bool:
        """Whether a file of this type and size is compressed on the fly (when it has no
        precompressed sidecar): its compressed body could be kept within the cache's budget."""
        room = self.cache.max_bytes - Compressed.OVERHEAD  # a body smaller than the file fits
        return (self.cache.enabled and MIN_SIZE <= size <= min(self.max_size, room)
                and compressible_type(content_type))

    def pick(self, identity: Rep, accept_encoding: str) -> Rep | None:
        """The coded representation of `identity` the client prefers, or None for identity."""
        coding = choose_encoding(accept_encoding, CODINGS)
        if coding is None:
            return None
        if identity.body is not None and identity.digest is None:
            identity.digest = zlib.crc32(identity.body)  # once per cache entry
        version = (identity.dev, identity.ino, identity.size, identity.mtime_ns, identity.digest)
        # The coded Rep carries its URL's head: one file under two URLs (an alias, a directory's
        # index) may have two, each kept with its own body.
        key = (identity.path, coding, identity.type, identity.cache_control, identity.extra)
        while True:
            found = self.cache.kept(key)
            if found is not None and found.version == version:
                return found.rep
            with self._lock:
                making = self._making.get(key)
                if making is None:
                    self._making[key] = Event()
                    break
            # Another thread is compressing it: a wait of one compression, then look again.
            if not making.wait(5.0):
                return None
        try:
            return self._make(key, version, identity, coding)
        finally:
            with self._lock:
                self._making.pop(key).set()

    def _make(self, key: tuple, version: tuple, identity: Rep, coding: str) -> Rep | None:
        """Compress `identity`'s bytes with `coding` and keep the result."""
        body = identity.body if identity.body is not None else self._read(identity)
        if body is None:
            return None  # changed on disk: identity is served, and reloaded as today
        coded = ENCODERS[coding](body)
        with self._lock:
            self.compressions += 1
        rep = Rep.coded(identity, coded, coding) if len(coded) < len(body) else None
        self.cache.keep(key, Compressed(version, rep))
        return rep

    def _read(self, identity: Rep) -> bytes | None:
        """The bytes of a file the cache only describes, if it is still that very file."""
        opened = self.resolver.reopen(identity.path, identity.dev, identity.ino)
        if opened is None:
            return None
        fd, st = opened
        try:
            return read_exactly(fd, identity.size) if identity.same_file(st) else None
        finally:
            os.close(fd)
