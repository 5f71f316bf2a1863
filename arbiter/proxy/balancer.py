"""Choosing a healthy worker per request: round robin, least outstanding requests, consistent
hashing on the path with bounded load (so each worker's file cache holds its own share), or the
first worker with a thread free (packing the load onto as few workers as it needs).

Every policy honours each worker's weight (workers[].weight) and slow start: a worker coming
back ramps from 1/SLOW_START_STEPS of its weight to all of it over workers[].slowStart seconds
(HAProxy's slowstart). While all weights in effect are equal, the plain policies run unchanged;
otherwise round robin is nginx's smooth weighted round robin, least outstanding compares
requests in flight per unit of weight, and the hash ring holds points in proportion to weight;
first gives each worker threads in proportion to its weight, and a ramping worker its share.
"""
from __future__ import annotations

import bisect
import math
import time
from hashlib import blake2b
from operator import attrgetter
from typing import Callable, Collection

from ..state import WorkerState
from .view import WorkerView

VIRTUAL_NODES = 160  # points per unit of weight on the hash ring (ketama uses 160)
MAX_RING_WEIGHT = 16  # weights scaled to at most this many units on the ring (its size stays bounded)
LOAD_FACTOR = 1.25  # bounded load: no worker takes more than c x its weighted share of outstanding requests
UNBOUNDED = 1 << 60  # a capacity no load reaches (load_factor 0: no bound)
SLOW_START_STEPS = 20  # a comeback's weight grows in this many steps (each one rebuilds the hash ring)
# Round robin hands concurrent requests out in runs: a worker already busy with fewer than this
# keeps taking new ones, up to this many in a row. Waking one worker for a few requests is much
# cheaper than waking every worker for one each (context switches, cold caches) when workers
# outnumber the cores; bounding the run keeps every worker in turn under any load. A run never
# goes past the worker's threads either.
RUN = 8
NEVER = math.inf

_in_flight = attrgetter("in_flight")


def _hash64(data: bytes) -> int:
    return int.from_bytes(blake2b(data, digest_size=8).digest(), "big")


def ramp(worker: WorkerState, now: float) -> tuple[float, float]:
    """(share of its weight `worker` gets at `now`, when that share next grows; NEVER: it is whole).

    The share grows in SLOW_START_STEPS even steps over `slow_start` seconds after a comeback,
    starting at one step (never 0: a worker that gets nothing would never show it is well)."""
    since = worker.recovered_at
    span = worker.slow_start
    if since is None or span <= 0 or now >= since + span:
        return 1.0, NEVER
    step = int((now - since) / span * SLOW_START_STEPS) + 1
    if step >= SLOW_START_STEPS:
        return 1.0, NEVER
    return step / SLOW_START_STEPS, since + span * step / SLOW_START_STEPS


class Balancer:
    """Picks a worker from `table.healthy`; derived state is rebuilt lazily when the table changes.

    Whatever the policy, a worker with a connection in use per thread (`worker_threads`, times
    its weight over the lightest's) is passed over while another has a thread to spare: stacked
    requests would wait in its queue while the other idles. Connections, not requests: those
    pipelined on one connection are answered in turn by one thread, and a proxy whose loop lags
    (a new connection per request, every core busy) holds many requests whose answers it has
    not read yet; counted, they would pass over a worker with threads free and wake idle ones.
    """

    POLICIES = {"round-robin": "_round_robin", "least-outstanding": "_least_outstanding",
                "consistent-hash": "_consistent_hash", "first": "_first"}  # the config's proxy.balance choices

    def __init__(self, table: WorkerView, policy: str | None = None, worker_threads: int = 4,
                 clock: Callable[[], float] = time.monotonic, load_factor: float = LOAD_FACTOR,
                 lane: tuple[int, int] = (0, 1)) -> None:
        """`lane`: (this proxy's place, how many proxies): where first starts in the table."""
        self.table = table
        self.lane = lane
        self.load_factor = load_factor  # consistent-hash's bound (0: none)
        self.policy = policy
        self.worker_threads = worker_threads
        self.clock = clock
        self._run_limit = min(RUN, worker_threads)
        self._next = 0
        self._run = 0  # consecutive picks of the current round-robin worker
        self._last = -1  # index of the last weighted round-robin pick
        # The weights in effect, per worker of `table.healthy` (refreshed by _refresh).
        self._weights_generation = -1
        self._weights_version = 0  # bumped by every refresh: the ring follows it
        self._refresh_at = NEVER  # when a ramping worker's share grows next
        self.uniform = True
        self.effective: list[float] = []
        self._total = 0.0
        self._caps: list[int] = []  # threads per worker
        self._fill: list[int] = []  # threads per worker during its slow start (first)
        self._start = 0  # where first starts in table.healthy: this proxy's lane
        self._credit: list[float] = []  # smooth weighted round robin's current weights
        self._ring_version = -1
        self._points: list[int] = []
        self._owners: list[int] = []  # index into table.healthy of each point's worker
        # The policy's pick on fresh weights; with none configured, _refresh chooses it for the
        # table as it is: first while every worker is local, round robin once any is remote (an edge
        # spreads its load across its nodes).
        self._policy: Callable[[bytes, Collection[WorkerState]], WorkerState | None] = (
            getattr(self, self.POLICIES[policy]) if policy else self._first)

    def pick(self, path: bytes, exclude: Collection[WorkerState] = ()) -> WorkerState | None:
        """The worker for a request to `path`, none of `exclude` (the ones it already failed on);
        None when no healthy worker is left. The weights in effect are refreshed here, once."""
        if (self._weights_generation != self.table.generation
                or self._refresh_at is not NEVER and self.clock() >= self._refresh_at):
            self._refresh()
        return self._policy(path, exclude)

    # -- weights in effect -------------------------------------------------------------------
    def _refresh(self) -> None:
        healthy = self.table.healthy
        now = self.clock()
        effective, due = [], NEVER
        for worker in healthy:
            share, grows = ramp(worker, now)
            effective.append(worker.weight * share)
            due = min(due, grows)
        if self._weights_generation != self.table.generation:
            self._credit = [0.0] * len(healthy)
            self._last = -1
        self._weights_generation = self.table.generation
        self._weights_version += 1
        self._refresh_at = due
        self.effective = effective
        self._total = sum(effective)
        self.uniform = len(set(effective)) <= 1
        lightest = min((w.weight for w in healthy), default=1)
        self._caps = [self.worker_threads * w.weight // lightest for w in healthy]
        self._fill = [max(1, int(cap * e / w.weight)) for cap, e, w in zip(self._caps, effective, healthy)]
        place, lanes = self.lane
        self._start = place * len(healthy) // lanes
        if self.policy is None:
            self._policy = self._first if all(w.local for w in self.table) else self._round_robin

    def _charge(self, index: int) -> None:
        """Smooth weighted round robin's step: every worker earns its weight, the one picked pays
        the total. Picks forced by runs, busy threads or retries can drift the credits, so they
        are held within twice the total."""
        credit, effective, total = self._credit, self.effective, self._total
        bound = 2 * total
        for k in range(len(credit)):
            c = credit[k] + effective[k]
            credit[k] = c if c < bound else bound
        c = credit[index] - total
        credit[index] = c if c > -bound else -bound

    # -- round robin ---------------------------------------------------------------------------
    def _round_robin(self, path: bytes, exclude: Collection[WorkerState] = ()) -> WorkerState | None:
        if not self.uniform:
            return self._smooth_round_robin(exclude)
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
        if worker.connections < self.worker_threads and not (exclude and worker in exclude):
            self._next = i + 1
            return worker
        # Busy or excluded: the next one in turn with a thread to spare, else the next allowed.
        fallback = None
        for k in range(n):
            worker = healthy[(i + k) % n]
            if exclude and worker in exclude:
                continue
            if worker.connections < self.worker_threads:
                self._next = i + k + 1
                return worker
            if fallback is None:
                fallback = worker
        self._next = i + 1
        return fallback

    def _smooth_round_robin(self, exclude: Collection[WorkerState]) -> WorkerState | None:
        """nginx's smooth weighted round robin (1:2:3 gives c b a b c c, not a b b c c c), with
        the runs and the thread rule of the plain one. A run goes on only while the step leaves
        the worker's credit at minus the total or more (as low as a pick in turn can leave it):
        a run never runs up a debt that the bound on credits would forgive, so the shares stay
        those of the weights at any concurrency (1:2:3 drifted to 29:31:40 with 16 in flight)."""
        healthy = self.table.healthy
        limit = self._run_limit
        last = self._last
        credit, effective, caps = self._credit, self.effective, self._caps
        if 0 <= last < len(healthy) and self._run < limit and credit[last] + effective[last] >= 0:
            worker = healthy[last]
            if 0 < worker.in_flight < limit and not (exclude and worker in exclude):
                self._run += 1
                self._charge(last)
                return worker
        best = fallback = -1
        for i, worker in enumerate(healthy):
            if exclude and worker in exclude:
                continue
            if worker.connections < caps[i]:
                if best < 0 or credit[i] + effective[i] > credit[best] + effective[best]:
                    best = i
            elif fallback < 0 or credit[i] + effective[i] > credit[fallback] + effective[fallback]:
                fallback = i
        pick = best if best >= 0 else fallback
        if pick < 0:
            return None
        self._charge(pick)
        self._run = 1
        self._last = pick
        return healthy[pick]

    # -- least outstanding ---------------------------------------------------------------------
    def _least_outstanding(self, path: bytes, exclude: Collection[WorkerState] = ()) -> WorkerState | None:
        if not self.uniform:
            return self._weighted_least(exclude)
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

    def _weighted_least(self, exclude: Collection[WorkerState]) -> WorkerState | None:
        """Fewest requests in flight per unit of weight; ties (everyone idle) broken by smooth
        weighted round robin, so sequential requests are shared by weight too."""
        healthy = self.table.healthy
        credit, effective = self._credit, self.effective
        best, best_load = -1, NEVER
        for i, worker in enumerate(healthy):
            if exclude and worker in exclude:
                continue
            load = worker.in_flight / effective[i]
            if load < best_load or load == best_load and credit[i] + effective[i] > credit[best] + effective[best]:
                best, best_load = i, load
        if best < 0:
            return None
        self._charge(best)
        return healthy[best]

    # -- first ---------------------------------------------------------------------------------
    def _first(self, path: bytes, exclude: Collection[WorkerState] = ()) -> WorkerState | None:
        """HAProxy's `balance first`: the first worker in table order with a thread free. The
        load stays on as few workers as it needs, hot in cache and awake, instead of waking each of
        many workers in turn (when workers outnumber the cores, round robin's context switches and
        cold caches cost more than the request). Every thread busy: the least loaded per thread.
        Each proxy starts at its own lane of the table (proxy k of P at worker k·N/P), so that
        the proxies do not all queue on the same worker while the one after it idles."""
        healthy, fill = self.table.healthy, self._fill
        fallback, least = None, NEVER
        n = len(healthy)
        start = self._start
        for i in range(start, start + n):
            if i >= n:
                i -= n
            worker = healthy[i]
            if exclude and worker in exclude:
                continue
            if worker.connections < fill[i]:
                return worker
            load = worker.in_flight / fill[i]
            if load < least:
                fallback, least = worker, load
        return fallback

    # -- consistent hash -----------------------------------------------------------------------
    def _rebuild_ring(self) -> None:
        healthy = self.table.healthy
        scale = min(1.0, MAX_RING_WEIGHT / max((w.weight for w in healthy), default=1))
        points: list[tuple[int, int]] = []
        for index, worker in enumerate(healthy):
            # Keyed on the address, not the position, so a worker leaving moves only its share;
            # a worker's points are a prefix of one sequence, so its weight growing only adds some.
            name = worker.address.encode()
            for v in range(max(1, round(VIRTUAL_NODES * self.effective[index] * scale))):
                points.append((_hash64(b"%s#%d" % (name, v)), index))
        points.sort()
        self._points = [p[0] for p in points]
        self._owners = [p[1] for p in points]
        self._ring_version = self._weights_version

    def _consistent_hash(self, path: bytes, exclude: Collection[WorkerState] = ()) -> WorkerState | None:
        if self._ring_version != self._weights_version:
            self._rebuild_ring()
        points = self._points
        if not points:
            return None
        healthy = self.table.healthy
        n = len(healthy)
        # Consistent hashing with bounded loads (Mirrokni, Thorup, Zadimoghaddam 2017): walk the
        # ring from the key's point to the first worker below ceil(c * (m + 1) * its weight's
        # share), and below its thread count while some worker is.
        loads = list(map(_in_flight, healthy))
        caps = self._caps
        if self.load_factor:
            bound = self.load_factor * (sum(loads) + 1) / self._total
            capacity = [math.ceil(bound * e) for e in self.effective]
        else:
            capacity = [UNBOUNDED] * n
        # Whether a worker has a thread free: when none has, the bound alone decides.
        spare = any(worker.connections < caps[i] for i, worker in enumerate(healthy)
                    if not (exclude and worker in exclude))
        owners = self._owners
        size = len(points)
        start = bisect.bisect_left(points, _hash64(path.partition(b"?")[0]))
        seen: set[int] = set()
        for k in range(size):
            index = owners[(start + k) % size]
            if index in seen:
                continue
            seen.add(index)
            worker = healthy[index]
            if (loads[index] < capacity[index] and (not spare or worker.connections < caps[index])
                    and not (exclude and worker in exclude)):
                return worker
            if len(seen) == n:
                break
        return None
