"""What one proxy learned about files, shared with the other proxies through the master.

A front cache file entry (cache.py) costs a worker request to learn: which file and head a URL
maps to. Each proxy asking for itself, a site of N files costs N worker requests per proxy
before every proxy serves it alone. So a proxy sends the file entries it stores from workers'
answers to the master in batches, and the master passes them on to the other proxies, which keep
them as if they had asked: born when the worker answered, the file checked on every hit. Only
file entries travel (a path and a head, no body). The master passes on only what a proxy learned
after it confirmed the last purge, so a reload's purge is never undone (ProxyFleet.pass_on).
"""
from __future__ import annotations

import asyncio
from typing import Any, Sequence

from fileapp.handoff import FileRef

from .cache import FrontCache
from .control import Channel

FLUSH_DELAY = 0.05  # seconds a learned entry may wait for others to leave in the same message
MAX_BATCH = 256  # entries per message (a few hundred bytes each)
# Bytes of text per message, and per entry (a long path, long headers): beyond, an entry is not
# shared. A byte over 0x7f takes 6 in JSON; so a message stays well under control.MAX_LINE.
MAX_BATCH_TEXT = 512 * 1024
MAX_ENTRY_TEXT = 16 * 1024
# Bytes unread on a control channel past which learned entries are not sent on it: they only
# spare workers requests, and must not pile up for a process that does not keep up.
SHARE_BACKLOG = 1 << 20
Learned = list[Any]  # one entry as the control channel carries it (JSON): see `learned`


def learned(target: bytes, accept_encoding: bytes | None, vary: bool, headers: Sequence[tuple[bytes, bytes]],
            ttl: float, upstream_age: int, born: float, ref: FileRef) -> Learned:
    """A stored file entry as a JSON-ready list (bytes as latin-1 text, which maps every byte)."""
    return [target.decode("latin-1"), None if accept_encoding is None else accept_encoding.decode("latin-1"),
            vary, [[n.decode("latin-1"), v.decode("latin-1")] for n, v in headers], ttl, upstream_age, born,
            ref.path.decode("latin-1"), ref.dev, ref.ino, ref.size, ref.mtime_ns, ref.offset, ref.count,
            None if ref.directory is None else list(ref.directory)]


def adopt(cache: FrontCache, entries: Sequence[Learned]) -> int:
    """Keep what other proxies learned where this one has nothing stored; how many were kept."""
    kept = 0
    for (target, accept_encoding, vary, headers, ttl, upstream_age, born,
         path, dev, ino, size, mtime_ns, offset, count, directory) in entries:
        ref = FileRef(path.encode("latin-1"), dev, ino, size, mtime_ns, offset, count,
                      None if directory is None else tuple(directory))  # type: ignore[arg-type]
        fields = [(n.encode("latin-1").lower(), n.encode("latin-1"), v.encode("latin-1")) for n, v in headers]
        ae = None if accept_encoding is None else accept_encoding.encode("latin-1")
        if cache.store(target.encode("latin-1"), ae, vary, fields, b"", ttl, upstream_age, ref, born) is not None:
            kept += 1
    return kept


def _text(entry: Learned) -> int:
    """About how much text `entry` takes in a message: its target, coding, path and headers,
    and 200 for its numbers and the JSON around them."""
    target, accept_encoding, _, headers, _, _, _, path = entry[:8]
    return len(target) + len(accept_encoding or "") + len(path) + sum(len(n) + len(v) + 6 for n, v in headers) + 200


class Outbox:
    """Learned entries on their way to the master: sent FLUSH_DELAY after the first of a batch,
    or at once when MAX_BATCH or MAX_BATCH_TEXT are waiting (so the pending list stays bounded);
    dropped when the channel has SHARE_BACKLOG bytes unread."""

    def __init__(self, loop: asyncio.AbstractEventLoop, channel: Channel) -> None:
        self.loop = loop
        self.channel = channel
        self.pending: list[Learned] = []
        self.text = 0  # (the pending entries' text, about)
        self._timer: asyncio.TimerHandle | None = None

    def add(self, entry: Learned) -> None:
        text = _text(entry)
        if text > MAX_ENTRY_TEXT:
            return
        self.pending.append(entry)
        self.text += text
        if len(self.pending) >= MAX_BATCH or self.text >= MAX_BATCH_TEXT:
            self.flush()
        elif self._timer is None:
            self._timer = self.loop.call_later(FLUSH_DELAY, self.flush)

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        entries, self.pending, self.text = self.pending, [], 0
        if entries and self.channel.backlog < SHARE_BACKLOG:
            self.channel.send({"op": "learned", "entries": entries})

    def drop(self) -> None:
        """Forget what waits (a purge: it was learned before)."""
        self.pending.clear()
        self.text = 0
