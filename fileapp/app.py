"""The fileapp WSGI callable: routing, health, prepared responses, middleware fall-through.

Per request on a cache hit: one dict lookup under a lock, then the prepared header list and
body bytes are handed to the server; conditional, Range and Accept-Encoding headers are only
looked at when the request carries them.
"""
from __future__ import annotations

import html
import logging
import mimetypes
import os
import re
import secrets
import stat
from typing import Callable, Iterable, Iterator, Pattern
from urllib.parse import quote

from werkzeug.http import http_date
from werkzeug.utils import get_content_type

from .cache import ResponseCache
from .files import Resolver, split_url_path
from .semantics import (
    NOT_MODIFIED,
    byte_ranges,
    choose_encoding,
    evaluate_preconditions,
    if_range_allows,
)

log = logging.getLogger("fileapp")

WSGIApp = Callable[[dict, Callable], Iterable[bytes]]

# Names carrying a content hash, e.g. app.3f2a9c1b.js or chunk-8d0e2f6a71.css: hex of 8+
# digits with at least one letter and one digit, so dates like report-20240101.pdf don't match.
DEFAULT_IMMUTABLE_PATTERN = r"[.-](?=[0-9a-f]*[a-f])(?=[0-9a-f]*[0-9])[0-9a-f]{8,64}\.[A-Za-z0-9]+$"
IMMUTABLE_CACHE_CONTROL = "public, max-age=31536000, immutable"

# Sidecar suffix per content coding, smallest first (the tie-break order of choose_encoding).
SIDECARS = (("br", ".br"), ("gzip", ".gz"))
STREAM_BLOCK = 64 * 1024
ALLOW = "GET, HEAD, OPTIONS"

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


def _plain(status: str, text: str, extra: list[tuple[str, str]] | None = None):
    body = text.encode()
    headers = [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body)))]
    return status, headers + (extra or []), body


_NOT_FOUND = _plain("404 Not Found", "404 Not Found\n")
_NOT_ALLOWED = _plain("405 Method Not Allowed", "405 Method Not Allowed\n", [("Allow", ALLOW)])
_PRECONDITION = _plain("412 Precondition Failed", "412 Precondition Failed\n")
_BUSY = _plain("503 Service Unavailable", "503 file is changing, retry\n", [("Retry-After", "1")])
_HEALTH_OK = _plain("200 OK", "ok", [("Cache-Control", "no-store")])
_HEALTH_DRAINING = _plain("503 Service Unavailable", "draining", [("Cache-Control", "no-store")])
_HEALTH_BAD = _plain(
    "503 Service Unavailable", "root directory unreadable", [("Cache-Control", "no-store")]
)


class Health:
    """The worker's health flag: healthy unless draining or the root directory is unreadable.

    Plain attribute assignment is atomic in CPython, so any thread (or a signal handler) may
    flip `draining`; the root check is a stat and an access() per health request.
    """

    def __init__(self, resolver: Resolver) -> None:
        self._resolver = resolver
        self.draining = False

    def status(self) -> tuple[str, list[tuple[str, str]], bytes]:
        if self.draining:
            return _HEALTH_DRAINING
        if not self._resolver.readable():
            return _HEALTH_BAD
        return _HEALTH_OK


class Rep:
    """One representation (identity or a precompressed sidecar) with its prepared headers."""

    __slots__ = (
        "path", "dev", "ino", "size", "mtime_ns", "mtime", "etag", "body", "type",
        "headers", "not_modified", "common",
    )

    def __init__(self, path: str, st: os.stat_result, body: bytes | None, ctype: str,
                 encoding: str | None, cache_control: str, vary: bool) -> None:
        self.path = path
        self.dev, self.ino = st.st_dev, st.st_ino
        self.size, self.mtime_ns = st.st_size, st.st_mtime_ns
        self.mtime = st.st_mtime_ns // 1_000_000_000
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


class _FileStream:
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


def _iter_stream(stream: _FileStream) -> Iterator[bytes]:
    try:
        while True:
            block = stream.read(STREAM_BLOCK)
            if not block:
                return
            yield block
    finally:
        stream.close()


class FileApp:
    """Serves the files under `root` over GET/HEAD; see `fileapp.create_app` for the options."""

    def __init__(
        self,
        root: str,
        *,
        app: WSGIApp | None = None,
        prefix: str = "",
        index_names: Iterable[str] = ("index.html",),
        listing: bool = False,
        health_path: str | None = "/healthcheck",
        cache_ttl: float = 1.0,
        cache_max_bytes: int = 64 * 1024 * 1024,
        cache_max_file_size: int = 256 * 1024,
        max_age: int = 60,
        immutable_pattern: str | Pattern[str] | None = DEFAULT_IMMUTABLE_PATTERN,
    ) -> None:
        if not os.path.isdir(root):
            raise ValueError(f"root is not a directory: {root}")
        if prefix and (not prefix.startswith("/") or prefix.endswith("/")):
            raise ValueError("prefix must start with '/' and not end with '/' (e.g. '/static')")
        if health_path is not None and not health_path.startswith("/"):
            raise ValueError("health_path must start with '/'")
        self.resolver = Resolver(root)
        self.root = self.resolver.root
        self.app = app
        self.prefix = prefix
        self.index_names = tuple(index_names)
        self.listing = listing
        self.health_path = health_path
        self.health = Health(self.resolver)
        self.cache = ResponseCache(cache_ttl, cache_max_bytes)
        self.cache_max_file_size = cache_max_file_size
        self.cache_control = f"public, max-age={int(max_age)}"
        if isinstance(immutable_pattern, str):
            immutable_pattern = re.compile(immutable_pattern)
        self.immutable = immutable_pattern
        if health_path and os.path.lexists(os.path.join(self.root, health_path.lstrip("/"))):
            log.warning("the health path %s shadows a file of that name under %s",
                        health_path, self.root)

    # -- WSGI entry point -------------------------------------------------------------------

    def __call__(self, environ: dict, start_response: Callable) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == self.health_path:
            return self._health(environ, start_response)
        if self.prefix:
            if path == self.prefix or path.startswith(self.prefix + "/"):
                path = path[len(self.prefix):]
            else:
                return self.app(environ, start_response) if self.app else self._send(
                    start_response, _NOT_FOUND, environ)
        method = environ["REQUEST_METHOD"]
        if method != "GET" and method != "HEAD":
            if self.app is not None:
                return self.app(environ, start_response)
            if method == "OPTIONS":
                start_response("204 No Content", [("Allow", ALLOW)])
                return []
            return self._send(start_response, _NOT_ALLOWED, environ)
        entry = self.cache.get(path)
        if entry is None:
            entry = self._load(path)
            if entry is None:
                return self._not_found(environ, start_response, path)
        if entry.redirect:
            return self._redirect(environ, start_response)
        rep = entry.identity
        if entry.codings:
            accept = environ.get("HTTP_ACCEPT_ENCODING")
            if accept:
                coding = choose_encoding(accept, entry.codings)
                if coding is not None:
                    rep = entry.encoded[coding]
        if rep.body is None:
            return self._serve_stream(environ, start_response, path, rep, entry)
        return self._serve(environ, start_response, rep, rep.body, None)

    # -- responses --------------------------------------------------------------------------

    def _serve(self, environ: dict, start_response: Callable, rep: Rep, body: bytes | None,
               fd: int | None) -> Iterable[bytes]:
        """Answer for one representation from its bytes (`body`) or an open descriptor (`fd`)."""
        if ("HTTP_IF_NONE_MATCH" in environ or "HTTP_IF_MODIFIED_SINCE" in environ
                or "HTTP_IF_MATCH" in environ or "HTTP_IF_UNMODIFIED_SINCE" in environ):
            outcome = evaluate_preconditions(environ, rep.etag, rep.mtime)
            if outcome is not None:
                if fd is not None:
                    os.close(fd)
                if outcome == NOT_MODIFIED:
                    start_response("304 Not Modified", list(rep.not_modified))
                    return []
                return self._send(start_response, _PRECONDITION, environ)
        head = environ["REQUEST_METHOD"] == "HEAD"
        range_header = environ.get("HTTP_RANGE")
        if range_header is not None:
            if_range = environ.get("HTTP_IF_RANGE")
            if if_range is None or if_range_allows(if_range, rep.etag, rep.mtime):
                ranges = byte_ranges(range_header, rep.size)
                if ranges is not None:
                    return self._serve_ranges(start_response, rep, body, fd, ranges, head,
                                              environ)
        start_response("200 OK", list(rep.headers))
        if head:
            if fd is not None:
                os.close(fd)
            return []
        if fd is None:
            return (body,)
        return self._file_body(environ, fd, 0, rep.size)

    def _serve_ranges(self, start_response: Callable, rep: Rep, body: bytes | None,
                      fd: int | None, ranges: tuple[tuple[int, int], ...], head: bool,
                      environ: dict) -> Iterable[bytes]:
        if not ranges:
            if fd is not None:
                os.close(fd)
            text = b"416 Range Not Satisfiable\n"
            start_response("416 Range Not Satisfiable", rep.common + [
                ("Content-Range", f"bytes */{rep.size}"),
                ("Content-Type", "text/plain; charset=utf-8"),
                ("Content-Length", str(len(text))),
            ])
            return [] if head else [text]
        if len(ranges) == 1:
            start, stop = ranges[0]
            start_response("206 Partial Content", rep.common + [
                ("Content-Type", rep.type),
                ("Content-Range", f"bytes {start}-{stop - 1}/{rep.size}"),
                ("Content-Length", str(stop - start)),
            ])
            if head:
                if fd is not None:
                    os.close(fd)
                return []
            if fd is None:
                return (body[start:stop],)
            return self._file_body(environ, fd, start, stop)
        boundary = secrets.token_hex(16)
        heads = [
            (f"\r\n--{boundary}\r\nContent-Type: {rep.type}\r\n"
             f"Content-Range: bytes {start}-{stop - 1}/{rep.size}\r\n\r\n").encode()
            for start, stop in ranges
        ]
        tail = f"\r\n--{boundary}--\r\n".encode()
        length = sum(len(h) for h in heads) + sum(b - a for a, b in ranges) + len(tail)
        start_response("206 Partial Content", rep.common + [
            ("Content-Type", f"multipart/byteranges; boundary={boundary}"),
            ("Content-Length", str(length)),
        ])
        if head:
            if fd is not None:
                os.close(fd)
            return []
        if fd is None:
            parts = []
            for part_head, (start, stop) in zip(heads, ranges):
                parts += (part_head, body[start:stop])
            parts.append(tail)
            return [b"".join(parts)]
        return self._multipart_stream(fd, heads, ranges, tail)

    @staticmethod
    def _multipart_stream(fd: int, heads: list[bytes], ranges: tuple[tuple[int, int], ...],
                          tail: bytes) -> Iterator[bytes]:
        try:
            for part_head, (start, stop) in zip(heads, ranges):
                yield part_head
                while start < stop:
                    block = os.pread(fd, min(STREAM_BLOCK, stop - start), start)
                    if not block:  # truncated under us: Content-Length can no longer hold
                        raise OSError("file shrank while being sent")
                    start += len(block)
                    yield block
            yield tail
        finally:
            os.close(fd)

    @staticmethod
    def _file_body(environ: dict, fd: int, start: int, stop: int) -> Iterable[bytes]:
        stream = _FileStream(fd, start, stop)
        wrapper = environ.get("wsgi.file_wrapper")
        if wrapper is not None:
            return wrapper(stream, STREAM_BLOCK)
        return _iter_stream(stream)

    def _serve_stream(self, environ: dict, start_response: Callable, path: str, rep: Rep,
                      entry: Entry) -> Iterable[bytes]:
        """Serve a file too large for the cache: reopen it and check it is still the same file."""
        for _ in range(3):
            opened = self.resolver.reopen(rep.path, rep.dev, rep.ino)
            if opened is not None:
                fd, st = opened
                if rep.same_file(st):
                    return self._serve(environ, start_response, rep, None, fd)
                os.close(fd)
            # Changed, replaced or gone: resolve the path from scratch.
            self.cache.discard(path)
            entry = self._load(path)
            if entry is None:
                return self._not_found(environ, start_response, path)
            if entry.redirect:
                return self._redirect(environ, start_response)
            rep = self._pick(entry, environ)
            if rep.body is not None:
                return self._serve(environ, start_response, rep, rep.body, None)
        return self._send(start_response, _BUSY, environ)

    @staticmethod
    def _pick(entry: Entry, environ: dict) -> Rep:
        accept = environ.get("HTTP_ACCEPT_ENCODING")
        if entry.codings and accept:
            coding = choose_encoding(accept, entry.codings)
            if coding is not None:
                return entry.encoded[coding]
        return entry.identity

    def _health(self, environ: dict, start_response: Callable) -> Iterable[bytes]:
        method = environ["REQUEST_METHOD"]
        if method != "GET" and method != "HEAD":
            return self._send(start_response, _NOT_ALLOWED, environ)
        return self._send(start_response, self.health.status(), environ)

    def _not_found(self, environ: dict, start_response: Callable, path: str) -> Iterable[bytes]:
        if self.app is not None:
            return self.app(environ, start_response)
        if self.listing and path.endswith("/"):
            listing = self._listing(environ, path)
            if listing is not None:
                return self._send(start_response, listing, environ)
        return self._send(start_response, _NOT_FOUND, environ)

    @staticmethod
    def _send(start_response: Callable, response, environ: dict) -> Iterable[bytes]:
        status, headers, body = response
        start_response(status, list(headers))
        return [] if environ["REQUEST_METHOD"] == "HEAD" else [body]

    @staticmethod
    def _redirect(environ: dict, start_response: Callable) -> Iterable[bytes]:
        # Relative "./name/" keeps the redirect on the same origin behind any proxy or prefix,
        # and can never be read as a scheme ("http:") or a network path ("//host").
        full = environ.get("SCRIPT_NAME", "") + environ.get("PATH_INFO", "")
        name = full.rsplit("/", 1)[-1].encode("latin-1")
        location = "./" + quote(name, safe="") + "/"
        query = environ.get("QUERY_STRING")
        if query:
            location += "?" + query
        text = b"301 Moved Permanently\n"
        start_response("301 Moved Permanently", [
            ("Location", location), ("Content-Type", "text/plain; charset=utf-8"),
            ("Content-Length", str(len(text))),
        ])
        return [] if environ["REQUEST_METHOD"] == "HEAD" else [text]

    # -- loading entries --------------------------------------------------------------------

    def _load(self, path: str) -> Entry | None:
        """Resolve `path` on disk and prepare (and cache) its entry; None when nothing to serve."""
        parts = split_url_path(path)
        if parts is None:
            return None
        opened = self.resolver.open(parts)
        if opened is None:
            return None
        if opened.is_dir:
            os.close(opened.fd)
            if not path.endswith("/"):
                entry = Entry(redirect=True)
                self.cache.put(path, entry)
                return entry
            for index in self.index_names:
                entry = self._load_file(parts + [index])
                if entry is not None:
                    self.cache.put(path, entry)
                    return entry
            return None
        try:
            if path.endswith("/"):
                return None
        finally:
            os.close(opened.fd)
        entry = self._load_file(parts)
        if entry is not None:
            self.cache.put(path, entry)
        return entry

    def _load_file(self, parts: list[str]) -> Entry | None:
        name = parts[-1]
        encoded_parts = {}
        if not name.endswith((".br", ".gz")):
            for coding, suffix in SIDECARS:
                encoded_parts[coding] = parts[:-1] + [name + suffix]
        ctype = content_type(name)
        cache_control = (IMMUTABLE_CACHE_CONTROL if self.immutable is not None
                         and self.immutable.search(name) else self.cache_control)
        encoded = {}
        for coding, sidecar in encoded_parts.items():
            rep = self._load_rep(sidecar, ctype, coding, cache_control, True)
            if rep is not None:
                encoded[coding] = rep
        identity = self._load_rep(parts, ctype, None, cache_control, bool(encoded))
        if identity is None:
            return None
        return Entry(identity, encoded)

    def _load_rep(self, parts: list[str], ctype: str, encoding: str | None,
                  cache_control: str, vary: bool) -> Rep | None:
        opened = self.resolver.open(parts)
        if opened is None:
            return None
        try:
            if not stat.S_ISREG(opened.st.st_mode):
                return None
            body = None
            if opened.st.st_size <= self.cache_max_file_size and self.cache.enabled:
                body = _read_exactly(opened.fd, opened.st.st_size)
                if body is None:
                    return None
            return Rep(opened.path, opened.st, body, ctype, encoding, cache_control, vary)
        finally:
            os.close(opened.fd)

    def _listing(self, environ: dict, path: str):
        parts = split_url_path(path)
        opened = self.resolver.open(parts) if parts is not None else None
        if opened is None:
            return None
        try:
            if not opened.is_dir:
                return None
            rows = []
            with os.scandir(opened.fd) as it:
                for item in it:
                    if item.name.startswith("."):
                        continue
                    suffix = "/" if item.is_dir(follow_symlinks=False) else ""
                    raw = os.fsencode(item.name)
                    rows.append((raw.decode("utf-8", "replace") + suffix,
                                 quote(raw, safe="") + suffix))
        except OSError:
            return None
        finally:
            os.close(opened.fd)
        title = html.escape("/" + "/".join(parts) + ("/" if parts else ""))
        lines = [f'<li><a href="./{html.escape(href)}">{html.escape(text)}</a></li>'
                 for text, href in sorted(rows)]
        page = (f"<!doctype html>\n<meta charset=\"utf-8\">\n<title>Index of {title}</title>\n"
                f"<h1>Index of {title}</h1>\n<ul>\n" + "\n".join(lines) + "\n</ul>\n").encode()
        return ("200 OK", [("Content-Type", "text/html; charset=utf-8"),
                           ("Content-Length", str(len(page))), ("Cache-Control", "no-cache")],
                page)


def _read_exactly(fd: int, size: int) -> bytes | None:
    """Read `size` bytes from an open file, or None when it changed size meanwhile."""
    chunks, left = [], size
    while left > 0:
        block = os.read(fd, left)
        if not block:
            return None
        chunks.append(block)
        left -= len(block)
    if os.read(fd, 1):
        return None
    return b"".join(chunks)
