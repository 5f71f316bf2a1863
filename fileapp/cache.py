"""A thread-safe TTL cache of prepared responses, bounded in bytes, with hit/miss/evict counters.

Entries live `ttl` seconds; while one lives, serving it touches no file. An entry whose time is
up stays where it is (`stale`) until it is renewed after a cheap check that its file is unchanged
(`refresh`, fileapp.loader), replaced, or evicted: renewing touches nothing but a timestamp, where
a cache that drops entries by age (cachetools' TLRUCache, with a heap ordered by expiry) paid a
heap push and pop per renewal (with a side table of stale entries: the cache took about a
fifth of a worker's time on a site of a few thousand big files, by py-spy).
Kept items (`keep`: bodies compressed on the fly, fileapp.compress) share the same byte budget
but never expire by age: they carry the file version they were made from and are replaced when
it changes (a deleted file's stay until evicted for room). The byte bound counts each item's
body bytes plus a fixed overhead for its headers, live and stale ones alike; the least recently
used items are evicted first when it is exceeded.
"""
from __future__ import annotations

import math
import threading
import time
from typing import Any, Callable, Hashable

from cachetools import Cache, LRUCache

# The worker cache's defaults, declared here once: fileapp's CLI and FileApp use them, and so
# does the master's config (its `cache` section), which passes them on to the workers.
DEFAULT_TTL = 1.0  # seconds an entry is served before the file is looked at again
DEFAULT_MAX_BYTES = 64 * 2**20  # byte budget of the whole cache
DEFAULT_MAX_FILE_SIZE = 256 * 2**10  # largest file whose bytes are cached; bigger ones are streamed
# How ETags are made: from the modification time and size, or from a hash of the bytes.
ETAG_KINDS = ("mtime", "content")
DEFAULT_ETAG = "mtime"
_COUNTED = -math.inf  # the expiry of a stale slot whose expiration is counted already


class _Slot:
    """An item and the monotonic time its life ends (inf: never; _COUNTED: ended, counted)."""

    __slots__ = ("item", "expires")

    def __init__(self, item: Any, expires: float) -> None:
        self.item = item
        self.expires = expires


class _CountingCache(LRUCache):
    """LRUCache of slots that counts what it drops for room: live items (evictions) and
    stale ones (expirations, unless counted when found stale)."""

    def __init__(self, maxsize: int, timer: Callable[[], float]) -> None:
        super().__init__(maxsize, getsizeof=lambda slot: slot.item.nbytes)
        self.timer = timer
        self.evictions = 0
        self.expirations = 0

    def popitem(self) -> tuple[Hashable, Any]:
        key, slot = super().popitem()
        if slot.expires > self.timer():
            self.evictions += 1
        elif slot.expires != _COUNTED:
            self.expirations += 1
        return key, slot

    def slots(self) -> list[_Slot]:
        """Every slot, leaving the order of use as it is (indexing would make each the last used)."""
        return [Cache.__getitem__(self, key) for key in Cache.__iter__(self)]

    def ended(self, slot: _Slot) -> None:
        """`slot` is found stale: count its expiration, once."""
        if slot.expires != _COUNTED:
            slot.expires = _COUNTED
            self.expirations += 1


class ResponseCache:
    """Maps a request path to a prepared entry, and a tuple key to a kept item (`keep`); both
    report their size via `nbytes`."""

    def __init__(self, ttl: float, max_bytes: int, timer: Callable[[], float] = time.monotonic):
        self.ttl = ttl
        self.max_bytes = max_bytes
        self.enabled = ttl > 0 and max_bytes > 0
        self._lock = threading.Lock()
        self._timer = timer
        self._data = _CountingCache(max(max_bytes, 1), timer)
        self.hits = 0
        self.misses = 0

    def get(self, key: str) -> Any:
        """The live entry for `key`, or None (counted as a miss)."""
        now = self._timer()
        with self._lock:
            try:
                slot = self._data[key]
            except KeyError:
                self.misses += 1
                return None
            if now < slot.expires:
                self.hits += 1
                return slot.item
            self._data.ended(slot)
            self.misses += 1
            return None

    def stale(self, key: str) -> Any:
        """The entry for `key` whose time is up, kept for a cheap check (see `refresh`); None
        when there is none, or it is live."""
        now = self._timer()
        with self._lock:
            slot = self._data.get(key)
            return slot.item if slot is not None and slot.expires <= now else None

    def refresh(self, key: str, entry: Any) -> None:
        """Give `entry`, found stale under `key` and checked unchanged, another `ttl`."""
        now = self._timer()
        with self._lock:
            slot = self._data.get(key)
            if slot is not None and slot.item is entry:
                slot.expires = now + self.ttl
                return
        self.put(key, entry)

    def put(self, key: str, entry: Any) -> None:
        """Store `entry` unless caching is off or it alone exceeds the byte bound."""
        if not self.enabled or entry.nbytes > self.max_bytes:
            return
        # Path keys are str; error pages' and kept items' keys are tuples: never stale.
        slot = _Slot(entry, self._timer() + self.ttl if key.__class__ is str else math.inf)
        with self._lock:
            self._data[key] = slot

    def kept(self, key: tuple) -> Any:
        """The item stored by `keep` under `key`, or None (not counted as a hit or miss)."""
        with self._lock:
            slot = self._data.get(key)
            return None if slot is None else slot.item

    def keep(self, key: tuple, item: Any) -> bool:
        """Store `item` (with its `nbytes`) until evicted for room or replaced, never expired by
        age; False when caching is off or it alone exceeds the byte bound."""
        if not self.enabled or item.nbytes > self.max_bytes:
            return False
        with self._lock:
            self._data[key] = _Slot(item, math.inf)
        return True

    def discard(self, key: str) -> None:
        """Forget `key` (a file found changed on disk)."""
        with self._lock:
            self._data.pop(key, None)

    def clear(self) -> None:
        """Forget everything."""
        with self._lock:
            counts = self._data.evictions, self._data.expirations  # clear() pops: neither
            self._data.clear()
            self._data.evictions, self._data.expirations = counts

    def stats(self) -> dict[str, int]:
        """Counters, and the live entries and their bytes, for metrics and tests."""
        now = self._timer()
        with self._lock:
            data = self._data
            live = []
            for slot in data.slots():
                if now < slot.expires:
                    live.append(slot)
                else:
                    data.ended(slot)
            return {
                "hits": self.hits,
                "misses": self.misses,
                "evictions": data.evictions,
                "expirations": data.expirations,
                "entries": len(live),
                "bytes": sum(slot.item.nbytes for slot in live),
                "max_bytes": self.max_bytes,
            }
