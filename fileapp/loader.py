"""Loading: a URL path resolved on disk into a cache entry (the file, or a directory's index
file, or a redirect to the directory's URL with a slash), with its precompressed sidecars.

Files up to `max_file_size` are read into the entry, larger ones only described (streamed from
disk on each request); a file truncated while being read is read again.
"""
from __future__ import annotations

import os
import re
import stat
from typing import Pattern

from .cache import ResponseCache
from .files import Resolver, split_url_path
from .representation import SIDECARS, Entry, Rep, content_type, read_exactly

IMMUTABLE_CACHE_CONTROL = "public, max-age=31536000, immutable"


class EntryLoader:
    """Prepares (and caches) the entries of the files under a resolver's root."""

    def __init__(self, resolver: Resolver, cache: ResponseCache, *, index_names: tuple[str, ...],
                 max_file_size: int, max_age: int, immutable_pattern: str | Pattern[str] | None
                 ) -> None:
        self.resolver = resolver
        self.cache = cache
        self.index_names = index_names
        self.max_file_size = max_file_size
        self.cache_control = f"public, max-age={int(max_age)}"
        if isinstance(immutable_pattern, str):
            immutable_pattern = re.compile(immutable_pattern)
        self.immutable = immutable_pattern

    def load(self, path: str) -> Entry | None:
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
        sidecars = {}
        for coding, sidecar in encoded_parts.items():
            rep = self._load_rep(sidecar, ctype, coding, cache_control, True)
            if rep is not None:
                sidecars[coding] = rep
        identity = self._load_rep(parts, ctype, None, cache_control, bool(sidecars))
        if identity is None:
            return None
        # A sidecar older than its original was not made from it: stale, never served.
        encoded = {c: r for c, r in sidecars.items() if r.mtime_ns >= identity.mtime_ns}
        return Entry(identity, encoded)

    def _load_rep(self, parts: list[str], ctype: str, encoding: str | None,
                  cache_control: str, vary: bool) -> Rep | None:
        for _ in range(3):  # a file truncated while being read is read again
            opened = self.resolver.open(parts)
            if opened is None:
                return None
            try:
                if not stat.S_ISREG(opened.st.st_mode):
                    return None
                if opened.st.st_size > self.max_file_size or not self.cache.enabled:
                    return Rep(opened.path, opened.st, None, ctype, encoding, cache_control, vary)
                body = read_exactly(opened.fd, opened.st.st_size)
                if body is not None:
                    return Rep(opened.path, opened.st, body, ctype, encoding, cache_control, vary)
            finally:
                os.close(opened.fd)
        return None
