"""What static-site hosts add to serving files: the single-page-app fallback (`fallback`) and
custom error pages (`error_pages`), both naming files under the root that are resolved with
the same safe resolver as every request (fileapp.files), so neither can reach outside it.
"""
from __future__ import annotations

import logging
import os
import stat
from typing import Any, Mapping, NamedTuple

from werkzeug.http import parse_accept_header

from .cache import ResponseCache
from .files import Exhausted, Resolver, split_url_path
from .representation import content_type, read_exactly

log = logging.getLogger("fileapp")

MAX_ERROR_PAGE = 1 << 20  # bytes; a bigger error page is not sent (the built-in one is)
Response = tuple[str, list[tuple[str, str]], bytes]


def site_path(value: Any, where: str) -> list[str]:
    """The segments of a file named relative to the root ("index.html", "errors/404.html"; a
    leading "/" is allowed), refused (ValueError naming `where`) when no request could reach it:
    empty, "..", hidden names, backslashes."""
    if not isinstance(value, str) or not value.strip("/"):
        raise ValueError(f"{where}: must be a file path under the root such as \"index.html\", "
                         f"got {value!r}")
    parts = split_url_path(value.encode("utf-8", "surrogatepass").decode("latin-1"))
    if not parts or ".." in parts or value.endswith("/"):
        raise ValueError(f"{where}: {value!r} is not a file fileapp would serve (no '..', no "
                         "hidden names, no trailing '/')")
    return parts


def accepts_html(environ: dict) -> bool:
    """Whether the request names text/html in Accept (with q > 0). A wildcard does not count:
    browsers navigating name text/html, while fetch(), scripts and curl send */*, and a missing
    script or API path must stay a 404 rather than get the app's page."""
    accept = environ.get("HTTP_ACCEPT")
    if not accept or "html" not in accept:
        return False
    return any(value.lower() == "text/html" and q > 0 for value, q in parse_accept_header(accept))


def fallback_allowed(environ: dict, path: str, resolver: Resolver) -> bool:
    """Whether an unknown `path` (below any prefix) may get the SPA fallback page: a client
    asking for HTML, a last segment without a file extension (a missing /app.js stays a 404),
    and a path the security rules accept (no dotfiles, no escape through a symlink)."""
    if "." in path.rsplit("/", 1)[-1] or not accepts_html(environ):
        return False
    parts = split_url_path(path)
    return parts is not None and resolver.real_parts(parts) is not None


def with_vary_accept(headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """`headers` of a response chosen by Accept: Vary names it (so no cache, gows' front cache
    included, gives it to a request with another Accept)."""
    for i, (name, value) in enumerate(headers):
        if name.lower() == "vary":
            return headers[:i] + [(name, value + ", Accept")] + headers[i + 1:]
    return headers + [("Vary", "Accept")]


def check_error_pages(pages: Mapping[Any, Any] | None) -> dict[int, list[str]]:
    """{status: segments} from {"404": "404.html", ...} (ValueError when a key is not a 4xx or
    5xx status or a path is not one fileapp would serve)."""
    if pages is None:
        return {}
    if not isinstance(pages, Mapping):
        raise ValueError(f'errorPages: must be an object like {{"404": "404.html"}}, got {pages!r}')
    out = {}
    for key, value in pages.items():
        code = str(key)
        if not (len(code) == 3 and code.isdigit() and code[0] in "45"):
            raise ValueError(f"errorPages.{key}: keys must be 4xx or 5xx status codes")
        out[int(code)] = site_path(value, f"errorPages.{key}")
    return out


class _Page(NamedTuple):
    """A loaded error page, cached with the files (its size counts against the budget)."""

    ctype: str
    body: bytes

    @property
    def nbytes(self) -> int:
        return 512 + len(self.body)


class ErrorPages:
    """The configured error pages, read through the resolver and cached like files; a missing,
    unreadable or oversized page leaves the built-in answer (logged once until it works)."""

    def __init__(self, pages: Mapping[Any, Any] | None, resolver: Resolver,
                 cache: ResponseCache) -> None:
        self.pages = check_error_pages(pages)
        self._resolver = resolver
        self._cache = cache
        self._warned: set[int] = set()

    def __bool__(self) -> bool:
        return bool(self.pages)

    def replace(self, response: Response) -> Response:
        """`response` (a built-in error answer) with the configured page's body, if any."""
        status, headers, _ = response
        code = int(status[:3])
        parts = self.pages.get(code)
        if parts is None:
            return response
        key = ("error-page", code)  # (never a request path: those are str)
        page = self._cache.get(key)
        if page is None:
            page = self._load(code, parts)
            if page is None:
                return response
            self._cache.put(key, page)
        kept = [(k, v) for k, v in headers if k not in ("Content-Type", "Content-Length")]
        return status, [("Content-Type", page.ctype), ("Content-Length", str(len(page.body)))] + kept, page.body

    def _load(self, code: int, parts: list[str]) -> _Page | None:
        try:
            opened = self._resolver.open(parts)
        except Exhausted:  # out of descriptors: this once, the built-in page
            return None
        body = None
        if opened is not None:
            try:
                if stat.S_ISREG(opened.st.st_mode) and opened.st.st_size <= MAX_ERROR_PAGE:
                    body = read_exactly(opened.fd, opened.st.st_size)
            except OSError:
                body = None
            finally:
                os.close(opened.fd)
        if body is None:
            if code not in self._warned:
                self._warned.add(code)
                log.warning("error page for %s (%s) is missing, unreadable or over %d bytes: "
                            "sending the built-in one", code, "/".join(parts), MAX_ERROR_PAGE)
            return None
        self._warned.discard(code)
        return _Page(content_type(parts[-1]), body)
