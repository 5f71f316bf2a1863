"""The proxy's counters as one array of 64-bit integers, in memory the master can read.

Each proxy process counts straight into a memfd the master created for its slot and hands to
every incarnation of that slot: the master reads it whenever the admin page or /metrics asks,
nothing is sent per request, and a proxy killed with SIGKILL loses no count it had made (its
successor keeps adding to the same memory). Every slot has one writer (its proxy); aligned
64-bit stores are atomic on every platform gows runs on, so the master never reads a torn value.

Counters only grow. Gauges (open connections, bytes held) are the current incarnation's and are
zeroed by the master when it dies. An in-process Proxy (tests, embedding) counts into plain memory.
"""
from __future__ import annotations

import mmap
import os
from typing import Iterable

from ..state import WORKER_SLOTS
from .stats import SLOTS

# Counters: they only grow, across every incarnation of a slot.
COUNTERS = ("requests", "retries", "stale_retries", "upstream_errors", "no_healthy_worker",
            "truncated_responses", "timeouts", "rejected_connections", "rejected_requests",
            "shed_idle_connections", "shortages", "cache_hits", "cache_misses", "cache_stores",
            "cache_revalidated", "file_bodies", "file_refused", "health_checks", "cache_shared", "pipelined")
# Gauges: the current incarnation's, refreshed every tick, zeroed when it dies.
GAUGES = ("client_connections", "body_buffer_bytes", "cache_entries", "cache_bytes",
          "upstream_busy", "upstream_idle", "upstream_waiting")
_INDEX = {name: i for i, name in enumerate(COUNTERS + GAUGES)}
(REQUESTS, RETRIES, STALE_RETRIES, UPSTREAM_ERRORS, NO_WORKER, TRUNCATED, TIMEOUTS, REJECTED,
 REJECTED_REQUESTS, SHED_IDLE, SHORTAGES, CACHE_HITS, CACHE_MISSES, CACHE_STORES,
 CACHE_REVALIDATED, FILE_BODIES, FILE_REFUSED, HEALTH_CHECKS, CACHE_SHARED, PIPELINED) = range(len(COUNTERS))
STATUS = len(_INDEX)  # 6 slots: responses by status class, index 1..5
LATENCY = STATUS + 6  # SLOTS + 1 slots: the latency histogram and its sum (stats.RequestStats)
# Requests sent to each worker, by the worker's slot in the master's table (WorkerState.slot);
# one more for workers past the last slot, which are not counted apart.
WORKERS = LATENCY + SLOTS + 1
SIZE = WORKERS + WORKER_SLOTS + 1
NBYTES = SIZE * 8


class Counters:
    """The array (`values`, indexed by the constants above) and the memory behind it."""

    def __init__(self, memory: mmap.mmap | bytearray, fd: int | None = None) -> None:
        self._memory = memory
        self.fd = fd  # the memfd to hand a proxy process; None for private memory
        self.values = memoryview(memory).cast("q")
        self.status = self.values[STATUS:STATUS + 6]
        self.latency = self.values[LATENCY:LATENCY + SLOTS + 1]

    @classmethod
    def private(cls) -> Counters:
        return cls(bytearray(NBYTES))

    @classmethod
    def shared(cls, name: str) -> Counters:
        """Fresh zeroed memory another process can map (`attach`) through `fd`."""
        fd = os.memfd_create(name, os.MFD_CLOEXEC)
        os.ftruncate(fd, NBYTES)
        return cls(mmap.mmap(fd, NBYTES), fd)

    @classmethod
    def attach(cls, fd: int) -> Counters:
        """Map the memory the master made (in the proxy process); `fd` is closed after."""
        try:
            return cls(mmap.mmap(fd, NBYTES))
        finally:
            os.close(fd)

    def get(self, name: str) -> int:
        return self.values[_INDEX[name]]

    def set_gauges(self, **values: int) -> None:
        v = self.values
        for name, value in values.items():
            v[_INDEX[name]] = value

    def zero_gauges(self) -> None:
        """The writer is gone: what it held is not held any more."""
        v = self.values
        for name in GAUGES:
            v[_INDEX[name]] = 0

    def close(self) -> None:
        """Release the memory (the master, once it sums this slot no more)."""
        self.status.release()
        self.latency.release()
        self.values.release()
        if isinstance(self._memory, mmap.mmap):
            self._memory.close()
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def total(counters: Iterable[Counters]) -> list[int]:
    """Element-wise sum of several slots' arrays."""
    sums = [0] * SIZE
    for c in counters:
        for i, value in enumerate(c.values):
            sums[i] += value
    return sums


def named(values: list[int] | memoryview) -> dict[str, int]:
    """The counters and gauges of one array (or a sum) by name."""
    return {name: values[i] for name, i in _INDEX.items()}


def report(values: list[int] | memoryview, cache_enabled: bool, cache_max_bytes: int) -> dict:
    """The proxy's statistics as the admin page and metrics read them (Proxy.stats' shape)."""
    n = named(values)
    status = values[STATUS:STATUS + 6]
    return {
        "requests": n["requests"],
        "responses": {f"{i}xx": status[i] for i in range(1, 6)},
        "front_cache": {
            "enabled": cache_enabled, "hits": n["cache_hits"], "misses": n["cache_misses"],
            "stores": n["cache_stores"], "entries": n["cache_entries"], "bytes": n["cache_bytes"],
            "max_bytes": cache_max_bytes, "revalidated": n["cache_revalidated"], "shared": n["cache_shared"],
        },
        **{name: n[name] for name in ("retries", "stale_retries", "upstream_errors", "no_healthy_worker",
                                      "truncated_responses", "timeouts", "rejected_connections",
                                      "rejected_requests", "shed_idle_connections", "shortages",
                                      "client_connections", "file_bodies", "file_refused",
                                      "health_checks", "pipelined")},
        "body_buffer_bytes": n["body_buffer_bytes"],
        "upstream_connections": {"busy": n["upstream_busy"], "idle": n["upstream_idle"],
                                 "waiting": n["upstream_waiting"]},
    }
