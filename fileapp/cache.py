"""A thread-safe TTL cache of prepared responses, bounded in bytes, with hit/miss/evict counters.

Entries live `ttl` seconds (cachetools.TLRUCache); while one lives, serving it touches no file.
Kept items (`keep`: bodies compressed on the fly, fileapp.compress) share the same byte budget
but never expire by age: they carry the file version they were made from and are replaced when
it changes (a deleted file's stay until evicted for room). The byte bound counts each item's
body bytes plus a fixed overhead for its headers; the least recently used items are evicted
first when it is exceeded.
"""
from __future__ import annotations

import math
import threading
import time
from typing import Any, Callable, Hashable

from cachetools import TLRUCache

# The worker cache's defaults, declared here once: fileapp's CLI and FileApp use them, and so
# does the master's config (its `cache` section), which passes them on to the workers.
DEFAULT_TTL = 1.0  # seconds an entry is served before the file is looked at again
DEFAULT_MAX_BYTES = 64 * 2**20  # byte budget of the whole cache
DEFAULT_MAX_FILE_SIZE = 256 * 2**10  # largest file whose bytes are cached; bigger ones are streamed
# How ETags are made: from the modification time and size, or from a hash of the bytes.
ETAG_KINDS = ("mtime", "content")
DEFAULT_ETAG = "mtime"


class _CountingCache(TLRUCache):
    """TLRUCache that counts what it drops: evictions (size pressure) and expirations (age)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.evictions = 0
        self.expirations = 0

    def popitem(self) -> tuple[Hashable, Any]:
        item = super().popitem()
        self.evictions += 1
        return item

    def expire(self, time: float | None = None) -> list[tuple[Hashable, Any]]:
        expired = super().expire(time)
        self.expirations += len(expired)
        return expired


class ResponseCache:
    """Maps a request path to a prepared entry, and a tuple key to a kept item (`keep`); both
    report their size via `nbytes`."""

    def __init__(self, ttl: float, max_bytes: int, timer: Callable[[], float] = time.monotonic):
        self.ttl = ttl
        self.max_bytes = max_bytes
        self.enabled = ttl > 0 and max_bytes > 0
        self._lock = threading.Lock()
        lifetime = max(ttl, 1e-9)
        self._data = _CountingCache(
            maxsize=max(max_bytes, 1), timer=timer, getsizeof=lambda entry: entry.nbytes,
            # Path keys are str; kept items' keys are tuples (see `keep`).
            ttu=lambda key, _, now: now + lifetime if key.__class__ is str else math.inf,
        )
        self.hits = 0
        self.misses = 0

    def get(self, key: str) -> Any:
        """The live entry for `key`, or None (counted as a miss)."""
        with self._lock:
            try:  # (the cache's own get looks the key up twice, reading the clock each time)
                entry = self._data[key]
            except KeyError:  # absent or expired
                self.misses += 1
                return None
            self.hits += 1
            return entry

    def put(self, key: str, entry: Any) -> None:
        """Store `entry` unless caching is off or it alone exceeds the byte bound."""
        if not self.enabled or entry.nbytes > self.max_bytes:
            return
        with self._lock:
            self._data[key] = entry

    def kept(self, key: tuple) -> Any:
        """The item stored by `keep` under `key`, or None (not counted as a hit or miss)."""
        with self._lock:
            return self._data.get(key)

    def keep(self, key: tuple, item: Any) -> bool:
        """Store `item` (with its `nbytes`) until evicted for room or replaced, never expired by
        age; False when caching is off or it alone exceeds the byte bound."""
        if not self.enabled or item.nbytes > self.max_bytes:
            return False
        with self._lock:
            self._data[key] = item
        return True

    def discard(self, key: str) -> None:
        """Forget `key` (a file found changed on disk)."""
        with self._lock:
            self._data.pop(key, None)

    def clear(self) -> None:
        """Forget everything."""
        with self._lock:
            evictions = self._data.evictions  # clear() pops items; they are not evictions
            self._data.clear()
            self._data.evictions = evictions

    def stats(self) -> dict[str, int]:
        """Counters and current size, for metrics and tests."""
        with self._lock:
            self._data.expire()
            return {
                "hits": self.hits,
                "misses": self.misses,
                "evictions": self._data.evictions,
                "expirations": self._data.expirations,
                "entries": len(self._data),
                "bytes": int(self._data.currsize),
                "max_bytes": self.max_bytes,
            }
