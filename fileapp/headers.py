"""Headers by path: `[{"match": "/assets/*", "set": {"Cache-Control": "..."}}]`, checked once
and applied when a response is prepared (so cached entries, hand-off heads and the proxy's
front cache all carry them; nothing is matched per request on a cache hit).

Matching is fnmatch's, case-sensitive, on the request's URL path (percent-decoded, with any
prefix, and without the empty and "." segments the file's resolution skips: "//a/./b" is
"/a/b"): `*` matches any run of characters *including* `/` (so "/assets/*" covers the whole
tree below /assets/), `?` one character, `[...]` a set. Every matching rule applies in order; a
later rule's value for a header replaces an earlier one's, and replaces fileapp's own (e.g.
Cache-Control or Content-Type).

Headers that describe the connection or the framing, or that fileapp computes from the file
(validators, ranges, coding, hand-off), are refused: a rule could only make them lie.
"""
from __future__ import annotations

import fnmatch
import re
from typing import Any, Iterable

# Hop-by-hop and framing (RFC 9110 7.6.1, 6.4), then what fileapp derives from the file and the
# request (a wrong ETag or Vary poisons caches) and the hand-off headers (X-Accel-Redirect or
# X-Sendfile from a rule would let nginx or Apache send any file, bypassing fileapp's checks).
REFUSED = frozenset((
    "connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer",
    "upgrade", "content-length", "content-range", "content-encoding", "etag", "last-modified",
    "accept-ranges", "vary", "location", "age", "date", "server", "allow", "retry-after",
    "x-accel-redirect", "x-sendfile",
))
REFUSED_PREFIXES = ("proxy-", "x-gows-")  # (Proxy-Authorization, ...; gows' own hand-off headers)
# Headers a 304 repeats from its 200 (RFC 9110 15.4.5); the others go on 200/206/416 only.
NOT_MODIFIED_NAMES = frozenset(("cache-control", "expires", "content-location"))
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_VALUE = re.compile(r"[\x21-\x7e]([\x20-\x7e]*[\x21-\x7e])?")

Headers = tuple[tuple[str, str], ...]


def check_header(name: Any, value: Any, where: str) -> tuple[str, str]:
    """One `set` entry checked (ValueError naming `where` and the header otherwise)."""
    if not isinstance(name, str) or not _TOKEN.fullmatch(name):
        raise ValueError(f"{where}: {name!r} is not a header name")
    lower = name.lower()
    if lower in REFUSED or lower.startswith(REFUSED_PREFIXES):
        raise ValueError(f"{where}.{name}: hop-by-hop, framing and computed headers cannot be set")
    # Visible ASCII only: no CR/LF (header injection), no control bytes, no edge whitespace.
    if not isinstance(value, str) or not _VALUE.fullmatch(value):
        raise ValueError(f"{where}.{name}: the value must be non-empty visible ASCII, got {value!r}")
    return name, value


class HeaderRules:
    """The checked rules; `for_path(url_path)` is what a response for that path gets."""

    def __init__(self, rules: Iterable[Any] | None = None) -> None:
        """`rules`: a list of {"match": glob, "set": {name: value}} (ValueError when bad)."""
        self.rules: list[tuple[str, re.Pattern[str], Headers]] = []
        if rules is None:
            return
        if not isinstance(rules, (list, tuple)):
            raise ValueError(f"headers: must be a list of {{match, set}} objects, got {rules!r}")
        for i, rule in enumerate(rules):
            where = f"headers[{i}]"
            if not isinstance(rule, dict) or set(rule) != {"match", "set"}:
                raise ValueError(f'{where}: must be an object with "match" and "set" exactly')
            match, values = rule["match"], rule["set"]
            if not isinstance(match, str) or not match.startswith(("/", "*")):
                raise ValueError(f"{where}.match: must be a URL path glob starting with '/' or "
                                 f"'*', got {match!r}")
            if not isinstance(values, dict) or not values:
                raise ValueError(f"{where}.set: must be a non-empty object of headers")
            checked = tuple(check_header(k, v, f"{where}.set") for k, v in values.items())
            self.rules.append((match, re.compile(fnmatch.translate(match)), checked))

    def __bool__(self) -> bool:
        return bool(self.rules)

    def as_json(self) -> list[dict]:
        """The rules as given (for a worker's command line)."""
        return [{"match": match, "set": dict(values)} for match, _, values in self.rules]

    def for_path(self, url_path: str) -> Headers:
        """The headers set for `url_path`, merged in rule order (later rules win per name)."""
        merged: dict[str, tuple[str, str]] = {}
        for _, pattern, values in self.rules:
            if pattern.match(url_path):
                for name, value in values:
                    merged[name.lower()] = (name, value)
        return tuple(merged.values())


def apply(headers: list[tuple[str, str]], extra: Headers) -> list[tuple[str, str]]:
    """`headers` with `extra` replacing the fields of the same names, or appended."""
    if not extra:
        return headers
    names = {name.lower() for name, _ in extra}
    return [(k, v) for k, v in headers if k.lower() not in names] + list(extra)
