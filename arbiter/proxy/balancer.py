"""Choosing a healthy worker per request: round robin, least outstanding requests, or consistent
hashing on the path with bounded load (so each worker's file cache holds its own share)."""
from __future__ import annotations

import bisect
import math
from hashlib import blake2b
from operator import attrgetter
from typing import Collection

from ..state import WorkerState
from .view import WorkerView

VIRTUAL_NODES = 160  # points per worker on the hash ring (ketama uses 160)
LOAD_FACTOR = 1.25  # bounded load: no worker takes more than c x the mean outstanding requests
# Round robin hands concurrent requests out in runs: a worker already busy with fewer than this
# keeps taking new ones, up to this many in a row. Waking one worker for a few requests is much
# cheaper than waking every worker for one each (context switches, cold caches) when workers
# outnumber the cores; bounding the run keeps every worker in turn under any load. A run never
# goes past the worker's threads either.
RUN = 8

_in_flight = attrgetter("in_flight")


def _hash64(data: bytes) -> int:
    return int.from_bytes(blake2b(data, digest_size=8).digest(), "big")


class Balancer:
    """Picks a worker from `table.healthy`; derived state is rebuilt lazily when the table changes.

    Whatever the policy, a worker with a request in flight per thread (`worker_threads`) is
    passed over while another has a thread to spare: stacked requests would wait in its queue
    while the other idles.
    """

    POLICIES = {"round-robin": "_round_robin", "least-outstanding": "_least_outstanding",
                "consistent-hash": "_consistent_hash"}  # the config's proxy.balance choices

    def __init__(self, table: WorkerView, policy: str = "round-robin", worker_threads: int = 4) -> None:
        self.table = table
        self.policy = policy
        self.worker_threads = worker_threads
        self._run_limit = min(RUN, worker_threads)
        self._next = 0
        self._run = 0  # consecutive picks of the current round-robin worker
        self._ring_generation = -1
        self._points: list[int] = []
        self._owners: list[WorkerState] = []
        self.pick = getattr(self, self.POLICIES[policy])

    def _round_robin(self, path: bytes, exclude: Collection[WorkerState] = ()) -> WorkerState | None:
        healthy = self.table.healthy
        n = len(healthy)
        if not n:
            return None
        i = self._next
        last = healthy[(i - 1) % n]
        limit = self._run_limit
        if self._run < limit and 0 < last.in_flight < limit and not (exclude and last in exclude):
            self._run += 1
            return last
        self._run = 1
        worker = healthy[i % n]
        if worker.in_flight < self.worker_threads and not (exclude and worker in exclude):
            self._next = i + 1
            return worker
        # Busy or excluded: the next one in turn with a thread to spare, else the next allowed.
        fallback = None
        for k in range(n):
            worker = healthy[(i + k) % n]
            if exclude and worker in exclude:
                continue
            if worker.in_flight < self.worker_threads:
                self._next = i + k + 1
                return worker
            if fallback is None:
                fallback = worker
        self._next = i + 1
        return fallback

    def _least_outstanding(self, path: bytes, exclude: Collection[WorkerState] = ()) -> WorkerState | None:
        healthy = self.table.healthy
        n = len(healthy)
        if not n:
            return None
        # Rotate the starting point so ties (e.g. everyone idle) are broken round robin.
        s = self._next % n
        self._next += 1
        order = healthy[s:] + healthy[:s]
        if exclude:
            order = [w for w in order if w not in exclude]
            if not order:
                return None
        return min(order, key=_in_flight)

    def _rebuild_ring(self) -> None:
        points: list[tuple[int, int, WorkerState]] = []
        for index, worker in enumerate(self.table.healthy):
            # Keyed on the address, not the position, so a worker leaving moves only its share.
            name = worker.address.encode()
            for v in range(VIRTUAL_NODES):
                points.append((_hash64(b"%s#%d" % (name, v)), index, worker))
        points.sort(key=lambda p: (p[0], p[1]))
        self._points = [p[0] for p in points]
        self._owners = [p[2] for p in points]
        self._ring_generation = self.table.generation

    def _consistent_hash(self, path: bytes, exclude: Collection[WorkerState] = ()) -> WorkerState | None:
        if self._ring_generation != self.table.generation:
            self._rebuild_ring()
        points = self._points
        if not points:
            return None
        healthy = self.table.healthy
        n = len(healthy)
        # Consistent hashing with bounded loads (Mirrokni, Thorup, Zadimoghaddam 2017): walk the
        # ring from the key's point to the first worker below ceil(c * (m + 1) / n), and below
        # its thread count while some worker is.
        loads = list(map(_in_flight, healthy))
        capacity = math.ceil(LOAD_FACTOR * (sum(loads) + 1) / n)
        allowed = [w.in_flight for w in healthy if w not in exclude] if exclude else loads
        if allowed and min(allowed) < self.worker_threads:
            capacity = min(capacity, self.worker_threads)
        owners = self._owners
        size = len(points)
        start = bisect.bisect_left(points, _hash64(path.partition(b"?")[0]))
        seen: set[int] = set()
        for k in range(size):
            worker = owners[(start + k) % size]
            wid = id(worker)
            if wid in seen:
                continue
            seen.add(wid)
            if worker.in_flight < capacity and not (exclude and worker in exclude):
                return worker
            if len(seen) == n:
                break
        return None
