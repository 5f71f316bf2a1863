"""HTTP semantics of a static representation: conditionals, ranges and content-coding choice.

Parsing is Werkzeug's (werkzeug.http); this module applies RFC 9110's evaluation order and
policy. Parsed values of headers that repeat across requests are memoised (lru_cache), so a
proxy revalidating the same ETag does not pay the parse on every request.
"""
from __future__ import annotations

from functools import lru_cache

from werkzeug.http import parse_accept_header, parse_date, parse_etags, parse_range_header

# More ranges than this in one request are treated as abuse and the Range header is ignored.
MAX_RANGES = 16

NOT_MODIFIED = 304
PRECONDITION_FAILED = 412


@lru_cache(maxsize=512)
def _http_seconds(value: str) -> int | None:
    """An HTTP date as integer Unix seconds, None when it does not parse."""
    parsed = parse_date(value)
    return None if parsed is None else int(parsed.timestamp())


@lru_cache(maxsize=512)
def _etags(value: str):
    return parse_etags(value)


def evaluate_preconditions(environ: dict, etag: str, mtime: int) -> int | None:
    """304 or 412 when the request's preconditions say so, else None (RFC 9110 §13.2.2).

    `etag` is the unquoted strong entity tag of the selected representation and `mtime` its
    Last-Modified time in whole seconds. Only called for GET and HEAD.
    """
    if_match = environ.get("HTTP_IF_MATCH")
    if if_match is not None:
        if not _etags(if_match).contains(etag):
            return PRECONDITION_FAILED
    else:
        ius = environ.get("HTTP_IF_UNMODIFIED_SINCE")
        if ius is not None:
            since = _http_seconds(ius)
            if since is not None and mtime > since:
                return PRECONDITION_FAILED
    if_none_match = environ.get("HTTP_IF_NONE_MATCH")
    if if_none_match is not None:
        if _etags(if_none_match).contains_weak(etag):
            return NOT_MODIFIED
        return None
    ims = environ.get("HTTP_IF_MODIFIED_SINCE")
    if ims is not None:
        since = _http_seconds(ims)
        if since is not None and mtime <= since:
            return NOT_MODIFIED
    return None


def if_range_allows(value: str, etag: str, mtime: int) -> bool:
    """True when an If-Range value still matches the representation (strong comparison)."""
    value = value.strip()
    if value.startswith(('"', "W/")):
        return _etags(value).is_strong(etag)
    return _http_seconds(value) == mtime


@lru_cache(maxsize=512)
def byte_ranges(value: str, length: int) -> tuple[tuple[int, int], ...] | None:
    """Satisfiable (start, stop) byte ranges of a Range header for a body of `length` bytes.

    None means "ignore the header and send 200": malformed, not `bytes`, overlapping or out of
    order (refused by Werkzeug's parser), more than MAX_RANGES, or asking for more bytes than the
    whole body. An empty tuple means nothing is satisfiable: answer 416.
    """
    parsed = parse_range_header(value)
    if parsed is None or parsed.units != "bytes" or len(parsed.ranges) > MAX_RANGES:
        return None
    ranges = []
    for start, stop in parsed.ranges:
        if stop is None:
            if start < 0:  # suffix range: the last -start bytes
                start = max(length + start, 0)
            stop = length
        else:
            stop = min(stop, length)
        if start < length and start < stop:
            ranges.append((start, stop))
    if sum(stop - start for start, stop in ranges) > length:
        return None
    return tuple(ranges)


@lru_cache(maxsize=512)
def choose_encoding(accept_encoding: str, available: tuple[str, ...]) -> str | None:
    """The best of `available` codings ("br", "gzip") for an Accept-Encoding value, or None.

    An explicit entry wins over `*`; q=0 refuses. A coding is chosen only if identity is not
    strictly preferred; ties between codings go to the first in `available` (smallest first).
    """
    explicit: dict[str, float] = {}
    star = None
    for item, quality in parse_accept_header(accept_encoding):
        name = item.lower()
        if name == "*":
            star = quality
        elif name not in explicit:
            explicit[name] = quality
    # Legacy alias: x-gzip means gzip (RFC 9110 §8.4.1.3).
    if "gzip" not in explicit and "x-gzip" in explicit:
        explicit["gzip"] = explicit["x-gzip"]
    identity = explicit.get("identity", 1.0 if star is None else max(star, 1e-3))
    best, best_q = None, 0.0
    for coding in available:
        q = explicit.get(coding, star if star is not None else 0.0)
        if q > best_q:
            best, best_q = coding, q
    if best is not None and best_q >= identity:
        return best
    return None
