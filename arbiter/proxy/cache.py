"""Front cache: small GET responses the workers marked cacheable, served by the proxy itself,
and for bigger files which file and which head a URL maps to (as nginx's open_file_cache):
the proxy sends such a file itself, if it still is the very file the worker named.

Bounded in bytes and per object (cachetools' TLRUCache: least recently used, each entry
expiring at its own max-age); an entry weighs what it really holds (one copy of the body, its
prepared heads and its bookkeeping), so the budget bounds the proxy's memory. Each entry keeps
its heads prepared as bytes, so a hit is one dict lookup and one write.

The workers check the disk every `cache.ttl` seconds; an entry older than that is revalidated
with a worker (a conditional request, answered 304 while the file is unchanged) before it is
served again, whatever max-age the clients are told. A file entry is checked on every hit (the
proxy opens the file and compares it with what the worker saw); what a worker would decide anew
is which file the URL maps to (a sidecar added, an index removed), and when no symlink leads
there, that depends on the names in the file's directory alone. So a worker names such a file
with its directory's stamp from before its decision (fileapp.handoff.FileRef), and the entry is
kept fresh without a worker, within its max-age, for as long as the directory keeps it
(`confirm`, one stat; its Age counts on from the worker's answer): a URL of a file that does not
change needs a worker once per max-age. A file reached through a symlink is
revalidated with a worker like any entry: repointing the link (a release switched by moving
`current`) changes another directory.
"""
from __future__ import annotations

import os
import time
from typing import MutableSequence, Sequence

from cachetools import TLRUCache
from werkzeug.http import parse_accept_header, parse_date

from fileapp.handoff import FileRef, directory_stamp

from .counters import CACHE_HITS, CACHE_MISSES, CACHE_REVALIDATED, CACHE_SHARED, CACHE_STORES, SIZE

VIA = b"Via: 1.1 gows\r\n"
_CODINGS = ("br", "zstd", "gzip", "deflate", "identity")
_MEMO_LIMIT = 1024
_VARYING_LIMIT = 100_000
JOIN_LIMIT = 16384  # bodies up to this size also leave joined to their head in one write
# While one request revalidates a stale entry with a worker, other requests are answered from
# the entry for at most this many seconds.
REVALIDATE_GRACE = 1.0
# What an entry costs beyond its bytes: the Entry object, its head and 304 variants' objects and
# TLRUCache's links, timer heap item and dict slots (measured with tracemalloc, rounded up).
ENTRY_OVERHEAD = 1280

# Headers a 304 carries over from the 200 it stands for (RFC 9110 15.4.5), lower-cased.
_NOT_MODIFIED_HEADERS = frozenset((b"cache-control", b"content-location", b"date", b"etag", b"expires", b"vary"))
# Never stored: framing and hop-by-hop (recomputed or per connection), and Age (we add our own).
_DROP = frozenset((b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"te", b"trailer",
                   b"upgrade", b"proxy-authenticate", b"content-length", b"age",
                   b"x-gows-file"))  # (a worker's hand-off: never repeated to a client)


def encoding_class(accept_encoding: bytes | None, _memo: dict = {}) -> bytes:
    """Normalise Accept-Encoding to the preference order of the codings a worker could pick.

    Two requests in the same class get the same representation from a worker, so the class
    (not the raw header, which varies by browser) is part of the cache key.
    """
    try:
        return _memo[accept_encoding]
    except KeyError:
        pass
    if accept_encoding is None:
        cls = b"-"
    else:
        accept = parse_accept_header(accept_encoding.decode("latin-1"))
        named = {value.lower() for value, _ in accept}
        # Identity is acceptable unless excluded (RFC 9110 12.5.3), and a worker weighs it so:
        # "br, gzip;q=0.5" (identity wins) and "br, gzip" (gzip wins) are different classes.
        implicit = "identity" not in named and "*" not in named
        # x-gzip stands for gzip when gzip is not named (RFC 9110 8.4.1.3), as a worker reads it
        # (fileapp.semantics.choose_encoding): else "x-gzip" and "identity" would share a class.
        alias = {"gzip": "x-gzip"} if "gzip" not in named and "x-gzip" in named else {}
        weights = [(1.0 if implicit and c == "identity" else accept.quality(alias.get(c, c)), i, c)
                   for i, c in enumerate(_CODINGS)]
        ranked = sorted((-q, i, c) for q, i, c in weights if q > 0)
        cls = ",".join(c for _, _, c in ranked).encode()
    if len(_memo) >= _MEMO_LIMIT:
        _memo.clear()
    _memo[accept_encoding] = cls
    return cls


def freshness(cache_control: bytes | None, _memo: dict = {}) -> int:
    """Seconds a shared cache may keep a response under its Cache-Control (0: do not store)."""
    try:
        return _memo[cache_control]
    except KeyError:
        pass
    max_age = s_maxage = None
    forbidden = cache_control is None
    for part in (cache_control or b"").lower().split(b","):
        name, _, value = part.strip().partition(b"=")
        value = value.strip().strip(b'"')
        if name in (b"no-store", b"no-cache", b"private"):
            forbidden = True
        elif name in (b"max-age", b"s-maxage"):
            if not value.isdigit():
                forbidden = True
            elif name == b"max-age":
                max_age = int(value)
            else:
                s_maxage = int(value)
    seconds = s_maxage if s_maxage is not None else max_age
    result = 0 if forbidden or not seconds else seconds
    if len(_memo) >= _MEMO_LIMIT:
        _memo.clear()
    _memo[cache_control] = result
    return result


class Entry:
    """One cached 200 response, its heads prepared for keep-alive, HTTP/1.0 keep-alive and
    closing clients (the body is held once and written after the head)."""

    __slots__ = ("body", "block", "nm_block", "etag", "last_modified", "modified_at", "born", "expires", "size",
                 "age", "initial_age", "head", "head_ka", "head_close", "nm", "nm_ka", "nm_close", "full",
                 "key", "ttl", "fresh_until", "revalidating", "file", "directory", "directory_confirmed")

    def __init__(self, headers: Sequence[tuple[bytes, bytes, bytes]], body: bytes, ttl: float, now: float,
                 initial_age: int = 0, revalidate_after: float = float("inf"), file: FileRef | None = None) -> None:
        """`file`: the body is that file's range, sent from disk (and `body` is empty)."""
        block, nm_block = [], []
        self.etag = self.last_modified = None
        for lname, name, value in headers:
            if lname in _DROP:
                continue
            line = b"%s: %s\r\n" % (name, value)
            block.append(line)
            if lname in _NOT_MODIFIED_HEADERS:
                nm_block.append(line)
            if lname == b"etag":
                self.etag = value
            elif lname == b"last-modified":
                self.last_modified = value
        self.file = file
        # The file's directory as the worker saw it before deciding, and whether the URL maps to
        # the file as long as the directory stays so (FrontCache.confirm): not through a symlink.
        self.directory = file.directory if file is not None else None
        self.directory_confirmed = self.directory is not None
        self.block = b"".join(block) + b"Content-Length: %d\r\n" % (file.count if file else len(body)) + VIA
        self.nm_block = b"".join(nm_block) + VIA
        self.modified_at = None
        self.body = body
        self.key: object = None
        self.ttl = ttl
        self.revalidating = 0.0  # when a request went to revalidate it (0: none is on its way)
        self.renew(now, initial_age, revalidate_after)
        # The body (twice when small: alone and joined to the keep-alive head), six prepared
        # heads, and what an entry costs besides (see ENTRY_OVERHEAD).
        joined = len(self.full) if self.full is not None else 0
        self.size = len(body) + joined + 3 * len(self.block) + 3 * len(self.nm_block) + 300 + ENTRY_OVERHEAD

    def renew(self, now: float, initial_age: int, revalidate_after: float) -> None:
        """Start (again) the entry's life: stored, or confirmed unchanged by a worker at `now`."""
        self.born = now
        self.expires = now + self.ttl
        self.fresh_until = now + min(self.ttl, revalidate_after)
        self.initial_age = initial_age
        self.age = -1
        self.prepare(initial_age)

    def prepare(self, age: int) -> None:
        """(Re)build the prepared bytes for a whole number of seconds spent in the cache."""
        self.age = age
        age_line = b"Age: %d\r\n" % age if age else b""
        base = b"HTTP/1.1 200 OK\r\n" + self.block + age_line
        self.head = base + b"\r\n"
        # The usual hit (HTTP/1.1 keep-alive) leaves in one write of one prepared object.
        self.full = self.head + self.body if len(self.body) <= JOIN_LIMIT and self.file is None else None
        self.head_ka = base + b"Connection: keep-alive\r\n\r\n"
        self.head_close = base + b"Connection: close\r\n\r\n"
        nm = b"HTTP/1.1 304 Not Modified\r\n" + self.nm_block + age_line
        self.nm = nm + b"\r\n"
        self.nm_ka = nm + b"Connection: keep-alive\r\n\r\n"
        self.nm_close = nm + b"Connection: close\r\n\r\n"

    def servable(self, now: float) -> bool:
        """Fresh, or stale while another request is revalidating it (briefly)."""
        return now < self.fresh_until or (self.revalidating and now - self.revalidating < REVALIDATE_GRACE)

    def not_modified(self, if_none_match: bytes | None, if_modified_since: bytes | None) -> bool:
        """Whether a conditional GET/HEAD is answered with 304 (RFC 9110 13.2.2 order)."""
        if if_none_match is not None:
            etag = self.etag
            if etag is None:
                return False
            if if_none_match.strip() == b"*":
                return True
            weak = etag[2:] if etag.startswith(b"W/") else etag
            for candidate in if_none_match.split(b","):
                candidate = candidate.strip()
                if candidate.startswith(b"W/"):
                    candidate = candidate[2:]
                if candidate == weak:
                    return True
            return False
        if if_modified_since is not None and self.last_modified is not None:
            if if_modified_since == self.last_modified:
                return True
            if self.modified_at is None:
                self.modified_at = parse_date(self.last_modified.decode("latin-1")) or False
            since = parse_date(if_modified_since.decode("latin-1"))
            return bool(self.modified_at and since and since >= self.modified_at)
        return False


def _ttu(key, entry: Entry, now: float) -> float:
    return entry.expires


class FrontCache:
    """The bounded response store with its hit/miss counters.

    A response without Vary is stored under its request target alone; one with
    `Vary: Accept-Encoding` under the target and the request's encoding class, and the target
    is remembered as varying so later lookups add the class.
    """

    def __init__(self, max_bytes: int, max_object_bytes: int, revalidate_after: float = float("inf"),
                 counts: MutableSequence[int] | None = None) -> None:
        """`counts`: the proxy's counters (counters.py) that lookups and stores are counted in."""
        self.max_object_bytes = max_object_bytes
        self.revalidate_after = revalidate_after  # seconds before an entry is checked with a worker
        self.entries: TLRUCache = TLRUCache(max(max_bytes, 1), _ttu, timer=time.monotonic,
                                            getsizeof=lambda e: e.size)
        self.varying: set[bytes] = set()
        self.classes: set[bytes] = set()  # encoding classes in use, to find a target's variants
        self.counts = counts if counts is not None else [0] * SIZE

    def get(self, target: bytes, accept_encoding: bytes | None, now: float = 0.0) -> Entry | None:
        """The stored response for a request; a hit when it is servable at `now` (renewed by
        `confirm` if need be), otherwise a miss (the caller revalidates a stale entry it gets)."""
        key = (target, encoding_class(accept_encoding)) if target in self.varying else target
        try:
            entry = self.entries[key]
        except KeyError:
            self.counts[CACHE_MISSES] += 1
            return None
        # (The first test in line: a hit's path.)
        if now < entry.fresh_until or entry.servable(now) or (entry.file is not None and self.confirm(entry)):
            self.counts[CACHE_HITS] += 1
        else:
            self.counts[CACHE_MISSES] += 1
        return entry

    def store(self, target: bytes, accept_encoding: bytes | None, vary: bool,
              headers: Sequence[tuple[bytes, bytes, bytes]], body: bytes, ttl: float, upstream_age: int = 0,
              file: FileRef | None = None, born: float | None = None) -> Entry | None:
        """Keep a complete 200 response for `ttl` seconds (minus the Age it already had); with
        `file`, its body is that file's range (fileapp.handoff), whatever its size. `born`: what
        another proxy learned at that moment (sharing.py), kept only where nothing is stored yet.
        The entry stored, or None."""
        ttl -= upstream_age
        if ttl <= 0 or len(body) > self.max_object_bytes:
            return None
        key: object = (target, encoding_class(accept_encoding)) if vary else target
        now = time.monotonic()
        if born is not None and (born + ttl <= now or key in self.entries):
            return None  # (expired on its way; or this proxy learned it itself, or was told first)
        entry = Entry(headers, body, ttl, now if born is None else min(born, now), upstream_age,
                      self.revalidate_after, file)
        if entry.size > self.entries.maxsize:
            return None
        if vary:
            if target not in self.varying:
                if len(self.varying) >= _VARYING_LIMIT:
                    self.varying.clear()
                self.varying.add(target)
                self.entries.pop(target, None)
            self.classes.add(key[1])  # type: ignore[index]
        elif target in self.varying:
            self.invalidate(target)
        entry.key = key
        self.entries[key] = entry
        self.counts[CACHE_STORES if born is None else CACHE_SHARED] += 1
        return entry

    def refresh(self, entry: Entry) -> None:
        """A worker confirmed a stale entry unchanged: fresh again, for its whole max-age.

        A file entry named with its directory's stamp whose directory has changed since is
        confirmed for the directory as it is now only at the next such answer: this worker may
        have decided before the change (its own cache entries live `revalidate_after` seconds),
        the next one decided after this moment (this entry is fresh for as long)."""
        if entry.file is not None and entry.file.directory is not None:
            stamp = directory_stamp(os.path.dirname(entry.file.path))
            entry.directory_confirmed = stamp is not None and stamp == entry.directory
            entry.directory = stamp
        self.counts[CACHE_REVALIDATED] += 1
        entry.renew(time.monotonic(), 0, self.revalidate_after)
        if self.entries.get(entry.key) in (entry, None):  # (not replaced meanwhile)
            self.entries[entry.key] = entry  # re-inserted: TLRUCache takes its new expiry

    def confirm(self, entry: Entry) -> bool:
        """Keep a stale file entry fresh for another `revalidate_after` seconds (within its
        max-age: then a worker is asked) without a worker while its directory keeps the stamp a
        worker decided with (so the URL still maps to that file); the file itself is checked
        when it is sent. False: ask a worker (always for a file reached through a symlink)."""
        if not entry.directory_confirmed or directory_stamp(os.path.dirname(entry.file.path)) != entry.directory:
            return False
        self.counts[CACHE_REVALIDATED] += 1
        entry.fresh_until = min(time.monotonic() + self.revalidate_after, entry.expires)
        return True

    def invalidate(self, target: bytes) -> None:
        """Drop every variant of a target (after an unsafe method succeeded on it)."""
        self.entries.pop(target, None)
        if target in self.varying:
            self.varying.discard(target)
            for cls in list(self.classes):
                self.entries.pop((target, cls), None)

    def clear(self) -> None:
        self.entries.clear()
        self.varying.clear()
        self.classes.clear()

    @property
    def bytes(self) -> int:
        return self.entries.currsize

    def __len__(self) -> int:
        return len(self.entries)
