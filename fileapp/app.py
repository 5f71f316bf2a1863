"""The fileapp WSGI callable: routing, health, prepared responses, middleware fall-through
(entries are loaded from disk by fileapp.loader).

Per request on a cache hit: one dict lookup under a lock, then the prepared header list and
body bytes are handed to the server; conditional, Range and Accept-Encoding headers are only
looked at when the request carries them.
"""
from __future__ import annotations

import hmac
import logging
import os
import secrets
import time
from typing import Any, Callable, Iterable, Mapping, Pattern
from urllib.parse import quote, unquote_to_bytes

from .cache import DEFAULT_ETAG, DEFAULT_MAX_BYTES, DEFAULT_MAX_FILE_SIZE, DEFAULT_TTL, ResponseCache
from .compress import Compressor
from .files import Exhausted, Resolver, split_url_path, url_path_option
from .headers import HeaderRules, apply
from .handoff import (FILE_HEADER, MIN_SIZE, REQUEST_KEY, file_header, handed_off_head,
                      sendfile_header_for)
from .listing import Lister
from .loader import EntryLoader
from .representation import STREAM_BLOCK, Entry, FileStream, MultipartBody, Rep, StreamBody
from .semantics import (
    NOT_MODIFIED,
    byte_ranges,
    choose_encoding,
    evaluate_preconditions,
    if_range_allows,
)
from .site import ErrorPages, fallback_allowed, site_path, with_vary_accept

log = logging.getLogger("fileapp")

WSGIApp = Callable[[dict, Callable], Iterable[bytes]]

# Names carrying a content hash, e.g. app.3f2a9c1b.js or chunk-8d0e2f6a71.css: hex of 8+
# digits with at least one letter and one digit, so dates like report-20240101.pdf don't match.
DEFAULT_IMMUTABLE_PATTERN = r"[.-](?=[0-9a-f]*[a-f])(?=[0-9a-f]*[0-9])[0-9a-f]{8,64}\.[A-Za-z0-9]+$"

ALLOW = "GET, HEAD, OPTIONS"
_QUERY_SAFE = "!#$%&'()*+,-./:;=?@[]~_"


def _plain(status: str, text: str, extra: list[tuple[str, str]] | None = None):
    body = text.encode()
    headers = [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body)))]
    return status, headers + (extra or []), body


_NOT_FOUND = _plain("404 Not Found", "404 Not Found\n")
_NOT_ALLOWED = _plain("405 Method Not Allowed", "405 Method Not Allowed\n", [("Allow", ALLOW)])
_PRECONDITION = _plain("412 Precondition Failed", "412 Precondition Failed\n")
_BUSY = _plain("503 Service Unavailable", "503 file is changing, retry\n", [("Retry-After", "1")])
_EXHAUSTED = _plain("503 Service Unavailable", "503 out of file descriptors, retry\n",
                    [("Retry-After", "1"), ("Cache-Control", "no-store")])
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
        cache_ttl: float = DEFAULT_TTL,
        cache_max_bytes: int = DEFAULT_MAX_BYTES,
        cache_max_file_size: int = DEFAULT_MAX_FILE_SIZE,
        etag: str = DEFAULT_ETAG,
        max_age: int = 60,
        immutable_pattern: str | Pattern[str] | None = DEFAULT_IMMUTABLE_PATTERN,
        handoff_token: str | None = None,
        sendfile_header: str | None = None,
        sendfile_prefix: str | None = None,
        fallback: str | None = None,
        error_pages: Mapping[Any, str] | None = None,
        headers: Iterable[Mapping[str, Any]] | None = None,
        compress: bool = True,
    ) -> None:
        if not os.path.isdir(root):
            raise ValueError(f"root is not a directory: {root}")
        if prefix and (not prefix.startswith("/") or prefix.endswith("/")):
            raise ValueError("prefix must start with '/' and not end with '/' (e.g. '/static')")
        prefix = prefix and url_path_option(prefix, "prefix")
        health = None if health_path is None else url_path_option(health_path, "health_path")
        self.resolver = Resolver(root)
        self.root = self.resolver.root
        self.app = app
        self.prefix = prefix
        self.listing = listing
        self.health_path = health
        self.health = Health(self.resolver)
        self.cache = ResponseCache(cache_ttl, cache_max_bytes)
        # Up to the configured largest cached file, whatever the proxy takes from disk below.
        self.compressor = Compressor(self.cache, self.resolver, cache_max_file_size)
        if handoff_token or sendfile_header:
            # Bodies from MIN_SIZE up go out from the file itself: keep only their metadata, so
            # that each hand-off is checked against the disk (gows' proxy checks it again itself;
            # nginx and Apache do not, and would send a file replaced since under this head).
            cache_max_file_size = min(cache_max_file_size, MIN_SIZE - 1)
        self.header_rules = HeaderRules(headers)
        self.loader = EntryLoader(self.resolver, self.cache, index_names=tuple(index_names),
                                  max_file_size=cache_max_file_size, max_age=max_age,
                                  immutable_pattern=immutable_pattern, etag=etag,
                                  header_rules=self.header_rules, prefix=prefix,
                                  compressible=self.compressor.eligible if compress else None)
        self.lister = Lister(self.resolver)
        # The SPA fallback page as a PATH_INFO below the prefix (UTF-8 bytes as latin-1).
        self.fallback = None if fallback is None else (
            "/" + "/".join(site_path(fallback, "fallback"))).encode().decode("latin-1")
        self.error_pages = ErrorPages(error_pages, self.resolver, self.cache)
        self._exhausted_logged = -1.0
        # Requests carrying this secret in X-Gows-Handoff come from gows' proxy, which sends
        # file bodies itself (fileapp.handoff).
        self._handoff_token = handoff_token.encode() if handoff_token else None
        self._sendfile = sendfile_header_for(sendfile_header, self.root, sendfile_prefix)
        if fallback is not None and not os.path.isfile(os.path.join(self.root, fallback.lstrip("/"))):
            log.warning("the fallback %s is not a file under %s: unknown paths get 404 until it is",
                        fallback, self.root)
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
                return self.app(environ, start_response) if self.app else self._error(
                    start_response, _NOT_FOUND, environ)
        method = environ["REQUEST_METHOD"]
        if method != "GET" and method != "HEAD":
            if self.app is not None:
                return self.app(environ, start_response)
            if method == "OPTIONS":
                start_response("204 No Content", [("Allow", ALLOW)])
                return []
            return self._error(start_response, _NOT_ALLOWED, environ)
        try:
            return self._get(environ, start_response, path)
        except Exhausted as e:
            now = time.monotonic()
            if now - self._exhausted_logged >= 1.0:  # once a second, not once per request
                self._exhausted_logged = now
                log.warning("cannot open %s: %s (answering 503)", path, e)
            return self._error(start_response, _EXHAUSTED, environ)

    def _get(self, environ: dict, start_response: Callable, path: str) -> Iterable[bytes]:
        """GET or HEAD of `path` (below any prefix)."""
        entry = self.cache.get(path)
        if entry is None:
            entry = self.loader.load(path)
            if entry is None:
                return self._not_found(environ, start_response, path)
        if entry.redirect:
            return self._redirect(environ, start_response)
        rep = self._pick(entry, environ) if entry.codings else entry.identity
        if entry.compressible and "HTTP_ACCEPT_ENCODING" in environ and "HTTP_RANGE" not in environ:
            rep = self.compressor.pick(rep, environ["HTTP_ACCEPT_ENCODING"]) or rep
        if rep.body is None and ("HTTP_RANGE" in environ or rep.size < MIN_SIZE
                                  or not self._from_proxy(environ)):
            return self._serve_stream(environ, start_response, path, rep, entry)
        # (a whole body handed off: gows' proxy checks the file is still this one, no need to
        # reopen it here)
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
                return self._error(start_response, _PRECONDITION, environ)
        head = environ["REQUEST_METHOD"] == "HEAD"
        range_header = environ.get("HTTP_RANGE")
        if range_header is not None:
            if_range = environ.get("HTTP_IF_RANGE")
            if if_range is None or if_range_allows(if_range, rep.etag, rep.mtime):
                ranges = byte_ranges(range_header, rep.size)
                if ranges is not None:
                    return self._serve_ranges(start_response, rep, body, fd, ranges, head,
                                              environ)
        if not head and rep.size >= MIN_SIZE:
            handed_off = self._handed_off_head(environ, rep, rep.headers, 0, rep.size, whole=True)
            if handed_off is not None:
                return self._hand_off(start_response, "200 OK", handed_off, fd)
        start_response("200 OK", list(rep.headers))
        if head:
            if fd is not None:
                os.close(fd)
            return []
        if fd is None:
            return (body,)
        return self._file_body(environ, fd, 0, rep.size)

    def _handed_off_head(self, environ: dict, rep: Rep, headers: list[tuple[str, str]],
                         start: int, count: int, whole: bool = False) -> list[tuple[str, str]] | None:
        """The head handing this GET's body (`count` bytes of `rep` from `start`, at least
        MIN_SIZE) to the server in front, or None to send it here: gows' proxy when it asks
        with its secret, else nginx or Apache when configured and they may (SendfileHeader).
        A body compressed on the fly has no file (path None): it is always sent from here.
        `whole`: the 200 of the whole file, whose head for gows' proxy is made once per
        representation (its file, identity and headers do not change while it lives)."""
        if rep.path is None:
            return None
        if self._from_proxy(environ):
            if whole and rep.handed_off is not None:
                return list(rep.handed_off)  # (each answer its own list: the app's caller may change it)
            handed_off = handed_off_head(headers, (FILE_HEADER, file_header(
                rep.path, rep.dev, rep.ino, rep.size, rep.mtime_ns, start, count, rep.directory)))
            if whole:
                rep.handed_off = list(handed_off)
            return handed_off
        sendfile = self._sendfile
        if sendfile is None or count != rep.size or not sendfile.takes(environ, headers):
            return None
        return handed_off_head(headers, sendfile.header(rep.path))

    def _from_proxy(self, environ: dict) -> bool:
        """Whether the request comes from gows' proxy, which sends file bodies itself."""
        token = environ.get(REQUEST_KEY)
        return (token is not None and self._handoff_token is not None
                and hmac.compare_digest(token.encode("latin-1"), self._handoff_token))

    @staticmethod
    def _hand_off(start_response: Callable, status: str, head: list[tuple[str, str]],
                  fd: int | None) -> Iterable[bytes]:
        """Answer with `head` alone: the server in front sends the body it names."""
        if fd is not None:
            os.close(fd)
        start_response(status, head)
        return []

    def _serve_ranges(self, start_response: Callable, rep: Rep, body: bytes | None,
                      fd: int | None, ranges: tuple[tuple[int, int], ...], head: bool,
                      environ: dict) -> Iterable[bytes]:
        if not ranges:
            if fd is not None:
                os.close(fd)
            text = b"416 Range Not Satisfiable\n"
            # (this text is the content, not the representation: a sidecar's Content-Encoding
            # would have clients decode it as gzip or brotli, and fail)
            common = [h for h in rep.common if h[0] != "Content-Encoding"]
            start_response("416 Range Not Satisfiable", common + [
                ("Content-Range", f"bytes */{rep.size}"),
                ("Content-Type", "text/plain; charset=utf-8"),
                ("Content-Length", str(len(text))),
            ])
            return [] if head else [text]
        if len(ranges) == 1:
            start, stop = ranges[0]
            headers = rep.common + [
                ("Content-Type", rep.type),
                ("Content-Range", f"bytes {start}-{stop - 1}/{rep.size}"),
                ("Content-Length", str(stop - start)),
            ]
            if not head and stop - start >= MIN_SIZE:
                handed_off = self._handed_off_head(environ, rep, headers, start, stop - start)
                if handed_off is not None:
                    return self._hand_off(start_response, "206 Partial Content", handed_off, fd)
            start_response("206 Partial Content", headers)
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
        body = MultipartBody(fd, heads, ranges, tail)
        wrapper = environ.get("wsgi.file_wrapper")
        return body if wrapper is None else wrapper(body, STREAM_BLOCK)

    @staticmethod
    def _file_body(environ: dict, fd: int, start: int, stop: int) -> Iterable[bytes]:
        stream = FileStream(fd, start, stop)
        wrapper = environ.get("wsgi.file_wrapper")
        if wrapper is not None:
            return wrapper(stream, STREAM_BLOCK)
        return StreamBody(stream)

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
            entry = self.loader.load(path, recheck=False)
            if entry is None:
                return self._not_found(environ, start_response, path)
            if entry.redirect:
                return self._redirect(environ, start_response)
            rep = self._pick(entry, environ)
            if rep.body is not None:
                return self._serve(environ, start_response, rep, rep.body, None)
        return self._error(start_response, _BUSY, environ)

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
        """No file for `path`: the wrapped app, else a listing, the SPA fallback or a 404."""
        if self.app is not None:
            return self.app(environ, start_response)
        if self.listing and path.endswith("/"):
            listing = self._listing(environ, path)
            if listing is not None:
                return self._error(start_response, listing, environ)
        if (self.fallback is not None and path != self.fallback and path != self.health_path
                and fallback_allowed(environ, path, self.resolver)):
            # As nginx's `try_files $uri /index.html`: the fallback file's own answer (its
            # headers, validators, ranges), varying by Accept since only HTML requests get it.
            def vary_accept(status: str, headers: list, exc_info=None):
                return start_response(status, with_vary_accept(headers), exc_info)
            return self._get(environ, vary_accept, self.fallback)
        return self._error(start_response, _NOT_FOUND, environ)

    def _error(self, start_response: Callable, response, environ: dict) -> Iterable[bytes]:
        """Send `response`, a built-in answer, with the configured error page for its status."""
        if self.error_pages and response[0][0] in "45":
            response = self.error_pages.replace(response)
        return self._send(start_response, response, environ)

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
        raw = environ.get("RAW_URI")
        if raw and "%" in raw:
            # A slash sent as %2F is one in PATH_INFO, not in the URL the client resolves "./"
            # against: its last segment as sent ("docs%2Fapi"), not "api", names the directory.
            sent = unquote_to_bytes(raw.partition("?")[0].rsplit("/", 1)[-1])
            if sent and full.encode("latin-1").endswith(b"/" + sent):
                name = sent
        location = "./" + quote(name, safe="") + "/" if name else "/"
        query = environ.get("QUERY_STRING")
        if query:
            # Keep the client's encoding, but never let a raw control or 8-bit byte through.
            location += "?" + quote(query.encode("latin-1", "replace"), safe=_QUERY_SAFE)
        text = b"301 Moved Permanently\n"
        start_response("301 Moved Permanently", [
            ("Location", location), ("Content-Type", "text/plain; charset=utf-8"),
            ("Content-Length", str(len(text))),
        ])
        return [] if environ["REQUEST_METHOD"] == "HEAD" else [text]

    def _listing(self, environ: dict, path: str):
        """The listing of the directory at `path` with its headers rules; None if none."""
        parts = split_url_path(path)
        if parts is None:
            return None
        shown = (environ.get("SCRIPT_NAME", "") + self.prefix + path).encode("latin-1").decode(
            "utf-8", "replace")
        response = self.lister.render(environ, parts, shown)
        if response is None or response[0][0] != "2":
            return response
        status, headers, body = response
        return status, apply(headers, self.loader.extra_headers(path, parts)), body
