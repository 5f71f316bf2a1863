"""Loading: a URL path resolved on disk into a cache entry (the file, or a directory's index
file, or a redirect to the directory's URL with a slash), with its precompressed sidecars.

Files up to `max_file_size` are read into the entry, larger ones only described (streamed from
disk on each request); a file truncated while being read is read again.

ETags come from a file's mtime and size, or with `etag="content"` from a hash of its bytes
(equal on every host for equal bytes, whatever the mtimes): hashed once per file version
(device, inode, size, mtime), in blocks (a big file is never read whole into memory), and kept
in a bounded table of its own, so neither a request nor an entry's expiry hashes again.

An entry of files only described (streamed or handed off, so checked by identity whenever
sent) whose time in the cache is up is first checked cheaply, as nginx's open_file_cache does:
if the URL path still leads to the very same file (device, inode, size, mtime, by one stat that
follows the path as the kernel does) and its sidecars are as they were, the entry lives on;
only otherwise is the path resolved from scratch (every component opened beneath the root). A
sidecar the file had no name for is not looked for while the directory keeps the stamp it had
before the URL was resolved (no name added since): a stat of the directory instead of a failed
one per coding. A site of many big files then costs two stats per file and TTL, not a
resolution (4.8 µs in-process, against 8.4 with the failed stats). Entries holding bytes are
always read again: an in-place rewrite keeping size and mtime is seen.
"""
from __future__ import annotations

import os
import re
import stat
import threading
from hashlib import blake2b
from typing import Callable, Pattern

from cachetools import LRUCache

from .cache import ResponseCache
from .files import Opened, Resolver, split_url_path
from .handoff import DirectoryStamp, directory_stamp
from .headers import Headers, HeaderRules
from .representation import SIDECARS, Entry, Rep, content_type, read_exactly

IMMUTABLE_CACHE_CONTROL = "public, max-age=31536000, immutable"
DIGESTS = 16384  # file versions whose content ETag is kept (about 200 bytes each)
HASH_BLOCK = 1 << 20  # bytes of a big file hashed at a time


class EntryLoader:
    """Prepares (and caches) the entries of the files under a resolver's root."""

    def __init__(self, resolver: Resolver, cache: ResponseCache, *, index_names: tuple[str, ...],
                 max_file_size: int, max_age: int, immutable_pattern: str | Pattern[str] | None,
                 header_rules: HeaderRules | None = None, prefix: str = "",
                 compressible: Callable[[str, int], bool] | None = None, etag: str = "mtime") -> None:
        """`header_rules` match the URL path, that is `prefix` and the path `load` is given;
        `compressible(content_type, size)`: whether a file without sidecars is compressed on the
        fly (its identity then varies on Accept-Encoding too); None: never; `etag`: "mtime"
        (from mtime and size) or "content" (a hash of the bytes, once per file version)."""
        if etag not in ("mtime", "content"):
            raise ValueError(f'etag must be "mtime" or "content", got {etag!r}')
        self.resolver = resolver
        self.header_rules = header_rules or HeaderRules()
        self.url_prefix = prefix.encode("latin-1").decode("utf-8")  # (as header rules read it)
        self.compressible = compressible
        self.content_etags = etag == "content"
        self._digests: LRUCache = LRUCache(DIGESTS)  # (dev, ino, size, mtime_ns) -> tag
        self.hashed = 0  # files hashed for their ETag (once per version; tests count them)
        self.cache = cache
        self.index_names = index_names
        self.max_file_size = max_file_size
        self.cache_control = f"public, max-age={int(max_age)}"
        if isinstance(immutable_pattern, str):
            immutable_pattern = re.compile(immutable_pattern)
        self.immutable = immutable_pattern
        self._lock = threading.Lock()

    def load(self, path: str, recheck: bool = True) -> Entry | None:
        """Prepare (and cache) `path`'s entry: the one it had if its files are unchanged (unless
        `recheck` is False), else resolved on disk anew; None when nothing is to be served."""
        if recheck and self.cache.enabled and not path.endswith("/"):
            old = self.cache.stale(path)
            if old is not None and old.where is not None and self._unchanged(old):
                self.cache.refresh(path, old)
                return old
        parts = split_url_path(path)
        if parts is None:
            return None
        return self._resolve(path, parts)

    @staticmethod
    def _unchanged(entry: Entry) -> bool:
        """Whether the file the URL of `entry` maps to and its sidecars are still its own."""
        base = entry.where
        try:
            st = os.stat(base)
        except (OSError, ValueError):
            return False
        identity = entry.identity
        if not (stat.S_ISREG(st.st_mode) and identity.same_file(st)):
            return False
        if base.endswith((".br", ".gz")):
            return True
        # A directory with its stamp has gained no name: no sidecar to look for but its own.
        settled = entry.settled is not None and directory_stamp(os.path.dirname(base)) == entry.settled
        for coding, suffix in SIDECARS:
            rep = entry.encoded.get(coding)
            if rep is None and settled:
                continue
            try:
                side = os.stat(base + suffix)
            except OSError:
                side = None
            if rep is None:
                # (absent, or older than the file: never served)
                if side is not None and side.st_mtime_ns >= identity.mtime_ns:
                    return False
            elif side is None or not (stat.S_ISREG(side.st_mode) and rep.same_file(side)):
                return False
        return True

    def _resolve(self, path: str, parts: list[str]) -> Entry | None:
        # The directory whose names decide which file serves the URL, stamped before any is
        # looked at: a change from now on changes the stamp.
        holder = parts if path.endswith("/") else parts[:-1]
        directory = directory_stamp(self.resolver.path_of(holder))
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
                entry = self._load_file(parts + [index], self.extra_headers(path, parts), directory)
                if entry is not None:
                    self.cache.put(path, entry)
                    return entry
            return None
        if path.endswith("/"):
            os.close(opened.fd)
            return None
        entry = self._load_file(parts, self.extra_headers(path, parts), directory, opened)
        if entry is not None:
            self.cache.put(path, entry)
        return entry

    def extra_headers(self, path: str, parts: list[str]) -> Headers:
        """What the headers rules set for the URL path of `path` (a PATH_INFO below the prefix),
        whose segments split_url_path gave as `parts`.

        Matched against the path as it resolves, not as the request spells it: empty and "."
        segments reach the same file (split_url_path skips them), so "//admin/x.html" must get
        the headers of "/admin/x.html" (as nginx merges slashes and removes dot segments before
        matching a location); else a client could shed a page's CSP or X-Frame-Options."""
        if not self.header_rules:
            return ()
        canonical = "/" + "/".join(parts) + ("/" if parts and path.endswith("/") else "")
        return self.header_rules.for_path(self.url_prefix + canonical)

    def _load_file(self, parts: list[str], extra: Headers = (),
                   directory: DirectoryStamp | None = None, opened: Opened | None = None) -> Entry | None:
        """`directory`: the stamp of the directory holding the file, taken before anything was
        resolved (fileapp.handoff.FileRef); `opened`: the file, already opened by the caller
        (closed here), read unless it has sidecars: those are read first, then the file, so that a
        file and sidecars replaced in between show a sidecar older than its file (dropped)."""
        name = parts[-1]
        encoded_parts = {}
        if not name.endswith((".br", ".gz")):
            for coding, suffix in SIDECARS:
                encoded_parts[coding] = parts[:-1] + [name + suffix]
        ctype = content_type(name)
        cache_control = (IMMUTABLE_CACHE_CONTROL if self.immutable is not None
                         and self.immutable.search(name) else self.cache_control)
        sidecars = {}
        unserved = False  # a sidecar's name is there, but not one to serve
        for coding, sidecar in encoded_parts.items():
            # (most files have none: one lstat says so, where opening would walk the path)
            if not self.resolver.may_exist(sidecar):
                continue
            if opened is not None:  # a file with sidecars is read after them (see the docstring)
                os.close(opened.fd)
                opened = None
            rep = self._load_rep(sidecar, ctype, coding, cache_control, True, extra, directory)
            if rep is not None:
                sidecars[coding] = rep
            else:
                unserved = True
        identity = self._load_rep(parts, ctype, None, cache_control, bool(sidecars), extra, directory, opened)
        if identity is None:
            return None
        # A sidecar older than its original was not made from it: stale, never served.
        encoded = {c: r for c, r in sidecars.items() if r.mtime_ns >= identity.mtime_ns}
        unserved = unserved or len(encoded) < len(sidecars)
        described = identity.body is None and (not encoded or all(rep.body is None for rep in encoded.values()))
        return Entry(identity, encoded, compressible=not encoded and self._compressible(ctype, identity.size),
                     where=self.resolver.path_of(parts) if described else None,
                     settled=None if unserved else directory)

    def _compressible(self, ctype: str, size: int) -> bool:
        return self.compressible is not None and self.compressible(ctype, size)

    def _load_rep(self, parts: list[str], ctype: str, encoding: str | None,
                  cache_control: str, vary: bool, extra: Headers = (),
                  directory: DirectoryStamp | None = None, opened: Opened | None = None) -> Rep | None:
        """`opened`: `parts` already opened by the caller, for the first try (closed here)."""
        for _ in range(3):  # a file truncated while being read is read again
            if opened is None:
                opened = self.resolver.open(parts)
            if opened is None:
                return None
            try:
                if not stat.S_ISREG(opened.st.st_mode):
                    return None
                seen = directory if opened.direct else None
                if encoding is None and not vary:
                    vary = self._compressible(ctype, opened.st.st_size)
                if opened.st.st_size > self.max_file_size or not self.cache.enabled:
                    tag = self._content_tag(opened.fd, opened.st, None) if self.content_etags else None
                    return Rep(opened.path, opened.st, None, ctype, encoding, cache_control, vary, extra, tag=tag,
                               directory=seen)
                body = read_exactly(opened.fd, opened.st.st_size)
                if body is not None:
                    tag = self._content_tag(opened.fd, opened.st, body) if self.content_etags else None
                    return Rep(opened.path, opened.st, body, ctype, encoding, cache_control, vary, extra, tag=tag,
                               directory=seen)
            finally:
                os.close(opened.fd)
                opened = None
        return None

    def _content_tag(self, fd: int, st: os.stat_result, body: bytes | None) -> str | None:
        """The content ETag of the open file `fd` (`body`: its bytes, when already read); None
        (the mtime tag) when the file changed while it was hashed."""
        version = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        with self._lock:
            tag = self._digests.get(version)
        if tag is not None:
            return tag
        digest = blake2b(digest_size=16)
        if body is not None:
            digest.update(body)
        else:
            offset = 0
            while offset < st.st_size:
                block = os.pread(fd, min(HASH_BLOCK, st.st_size - offset), offset)
                if not block:
                    return None  # truncated meanwhile
                digest.update(block)
                offset += len(block)
            after = os.fstat(fd)
            if (after.st_size, after.st_mtime_ns) != (st.st_size, st.st_mtime_ns):
                return None
        tag = digest.hexdigest()
        with self._lock:
            self._digests[version] = tag
            self.hashed += 1
        return tag
