"""Balancing policies: round robin, least outstanding requests, consistent hashing on the path
with bounded load (sticky, moving only a leaving worker's share); only healthy workers."""
from __future__ import annotations

import math
import threading
from collections import Counter

import pytest
import requests

from arbiter.config import ProxyConfig, configured
from arbiter.proxy.balancer import LOAD_FACTOR, RUN, Balancer
from arbiter.state import WorkerState, WorkerTable
from proxy_harness import NO_CACHE, ProxyThread
from support import wait_until

pytestmark = pytest.mark.unit

PATHS = [b"/static/file%d.css?v=%d" % (i, i % 3) for i in range(2000)]


def take(worker: WorkerState, n: int = 1) -> None:
    """`n` more requests in flight on `worker`, each on a connection of its own (none pipelined)."""
    worker.in_flight += n
    worker.connections += n


def hold(ws: list[WorkerState], *counts: int) -> None:
    """Each worker of `ws` with its count of requests in flight, one per connection."""
    for w, n in zip(ws, counts):
        w.in_flight = w.connections = n


def table_of(n: int) -> tuple[WorkerTable, list[WorkerState]]:
    table = WorkerTable(rise=1, fall=1)
    workers = [table.add(WorkerState("127.0.0.1", 9000 + i)) for i in range(n)]
    for w in workers:
        table.record_check(w, True)
    return table, workers


def test_round_robin_even_and_only_healthy():
    table, ws = table_of(3)
    b = Balancer(table, "round-robin")
    assert Counter(b.pick(b"/") for _ in range(300)) == {w: 100 for w in ws}
    table.record_check(ws[1], False)
    picks = Counter(b.pick(b"/") for _ in range(300))
    assert set(picks) == {ws[0], ws[2]} and abs(picks[ws[0]] - picks[ws[2]]) <= 1
    assert b.pick(b"/", [ws[0]]) is ws[2] and b.pick(b"/", [ws[0], ws[2]]) is None
    table.record_check(ws[0], False)
    table.record_check(ws[2], False)
    assert b.pick(b"/") is None


def test_round_robin_hands_concurrent_requests_out_in_runs():
    table, ws = table_of(3)
    b = Balancer(table, "round-robin", worker_threads=RUN)
    first = b.pick(b"/")
    # The proxy counts each forwarded request in flight: a busy worker keeps taking new ones...
    for k in range(1, RUN):
        hold([first], k)
        assert b.pick(b"/") is first
    # ...until it holds RUN of them, then the next worker in turn starts its own run.
    hold([first], RUN)
    second = b.pick(b"/")
    assert second is not first
    hold([second], 1)
    assert b.pick(b"/") is second
    # A retry never goes back to the worker it excludes, busy or not.
    assert b.pick(b"/", [second]) not in (second, None)
    # A run ends after RUN picks even while the worker stays lightly loaded: all take turns.
    hold(ws, 1, 1, 1)
    picks = [b.pick(b"/") for _ in range(3 * RUN)]
    assert Counter(picks) == {w: RUN for w in ws}
    # Once requests no longer overlap, turns alternate one request at a time again.
    hold(ws, 0, 0, 0)
    picks = [b.pick(b"/") for _ in range(6)]
    assert all(picks[i] is not picks[i + 1] for i in range(5))
    assert Counter(picks) == {w: 2 for w in ws}


def test_round_robin_runs_stop_at_the_worker_threads():
    table, ws = table_of(2)
    b = Balancer(table, "round-robin", worker_threads=2)
    first = b.pick(b"/")
    hold([first], 1)
    assert b.pick(b"/") is first
    hold([first], 2)  # a request per thread: the next one goes to the other worker
    assert b.pick(b"/") is not first


def test_first_packs_the_load_onto_the_first_workers_with_a_thread_free():
    table, ws = table_of(3)
    b = Balancer(table, "first", worker_threads=4)
    # One request at a time: always the first worker, never a turn for the others.
    assert all(b.pick(b"/") is ws[0] for _ in range(20))
    # Concurrent requests fill its threads, then the next worker's, in table order.
    placed = []
    for _ in range(6):
        w = b.pick(b"/")
        take(w)
        placed.append(w)
    assert placed == [ws[0]] * 4 + [ws[1]] * 2
    take(ws[0], -1)  # one finishes on the first worker: the next request goes back there
    assert b.pick(b"/") is ws[0]
    # A retry skips the worker it excludes; a worker marked down is skipped too.
    assert b.pick(b"/", [ws[0]]) is ws[1]
    table.record_check(ws[0], False)
    assert b.pick(b"/") is ws[1]
    # Every thread busy everywhere: the least loaded, not the first nor nowhere.
    table.record_check(ws[0], True)
    hold(ws, 9, 6, 7)
    assert b.pick(b"/") is ws[1] and b.pick(b"/", [ws[1]]) is ws[2]
    assert b.pick(b"/", ws) is None


def test_first_starts_each_proxy_at_its_own_lane_and_wraps_around_the_table():
    table, ws = table_of(5)
    lanes = [Balancer(table, "first", worker_threads=2, lane=(k, 2)) for k in range(2)]
    assert lanes[0].pick(b"/") is ws[0] and lanes[1].pick(b"/") is ws[2]  # proxy k of 2 at worker k·5/2
    placed = []
    for _ in range(7):  # the second proxy fills its lane, then wraps to the start of the table
        w = lanes[1].pick(b"/")
        take(w)
        placed.append(w)
    assert placed == [ws[2]] * 2 + [ws[3]] * 2 + [ws[4]] * 2 + [ws[0]]
    # The lanes follow the healthy workers: with the first marked down, proxy 2 of 2 starts at
    # the second of the four left (ws[3]), proxy 1 at the first (ws[1]).
    hold(ws, 0, 0, 0, 0, 0)
    table.record_check(ws[0], False)
    assert lanes[1].pick(b"/") is ws[3] and lanes[0].pick(b"/") is ws[1]


def test_the_default_packs_local_workers_and_spreads_over_other_hosts():
    table, ws = table_of(3)
    b = Balancer(table, None)
    assert all(b.pick(b"/") is ws[0] for _ in range(6))  # all spawned here: first
    remote = table.add(WorkerState("198.18.0.7", 8080, local=False))
    table.record_check(remote, True)
    picks = Counter(b.pick(b"/") for _ in range(400))  # an edge: round robin across them all
    assert picks == {w: 100 for w in ws + [remote]}
    table.remove(remote)
    assert all(b.pick(b"/") is ws[0] for _ in range(6))


POLICIES = ("round-robin", "least-outstanding", "consistent-hash", "first")


@pytest.mark.parametrize("policy", POLICIES)
def test_requests_that_never_finish_fill_every_workers_threads_before_any_waits(policy):
    """Slow readers: each request stays in flight. Eight of them on two workers of four threads
    take four threads on each, whatever the policy (not eight on one worker, four waiting while
    the other worker idles); past that, requests are still placed."""
    table, ws = table_of(2)
    b = Balancer(table, policy, worker_threads=4)
    for i in range(8):
        take(b.pick(b"/big.bin"))
    assert [w.in_flight for w in ws] == [4, 4]
    for i in range(8):
        take(b.pick(b"/big.bin"))
    assert sum(w.in_flight for w in ws) == 16 and all(w.in_flight >= 4 for w in ws)


@pytest.mark.parametrize("policy", POLICIES)
def test_a_worker_with_every_thread_busy_is_passed_over_while_another_has_one_free(policy):
    table, ws = table_of(3)
    b = Balancer(table, policy, worker_threads=4)
    hold(ws, 4, 3, 9)
    assert all(b.pick(p) is ws[1] for p in PATHS[:200])
    # A retry that excludes the one with a free thread goes to a busy worker, not nowhere.
    assert b.pick(PATHS[0], [ws[1]]) in (ws[0], ws[2])
    hold([ws[1]], 4)  # every thread of every worker busy: any worker will do
    assert {b.pick(p) for p in PATHS[:200]} <= set(ws) and None not in {b.pick(p) for p in PATHS[:200]}


@pytest.mark.parametrize("policy", ("round-robin", "consistent-hash", "first"))
def test_requests_pipelined_on_a_connection_take_one_thread(policy):
    """A local worker answers the GETs pipelined on one connection in turn, on one thread: a
    worker with many requests in flight on fewer connections than threads still has one free
    (a proxy whose loop lags holds many whose answers it has not read yet), and is not passed
    over for an idle one (round robin: it keeps its turns); once its connections take every
    thread, it is."""
    table, ws = table_of(2)
    b = Balancer(table, policy, worker_threads=4, load_factor=0)
    owner = b.pick(PATHS[0])
    owner.in_flight, owner.connections = 40, 3
    picks = Counter(b.pick(PATHS[0]) for _ in range(20))
    assert picks[owner] == (10 if policy == "round-robin" else 20)
    owner.connections = 4
    assert owner not in {b.pick(PATHS[0]) for _ in range(20)}


def test_least_outstanding_prefers_idle_workers_and_rotates_ties():
    table, ws = table_of(3)
    b = Balancer(table, "least-outstanding")
    ws[0].in_flight, ws[1].in_flight, ws[2].in_flight = 5, 1, 3
    assert all(b.pick(b"/") is ws[1] for _ in range(10))
    assert b.pick(b"/", [ws[1]]) is ws[2]
    for w in ws:
        w.in_flight = 0
    assert Counter(b.pick(b"/") for _ in range(300)) == {w: 100 for w in ws}


def test_consistent_hash_is_sticky_and_spread():
    table, ws = table_of(4)
    b = Balancer(table, "consistent-hash")
    first = {p: b.pick(p) for p in PATHS}
    assert all(b.pick(p) is first[p] for p in PATHS)
    shares = Counter(first.values())
    assert set(shares) == set(ws)
    assert all(len(PATHS) * 0.12 < n < len(PATHS) * 0.40 for n in shares.values()), shares
    # The query string is not part of the key: the same file maps to the same worker.
    assert b.pick(b"/static/file1.css?v=1") is b.pick(b"/static/file1.css?other")


def test_consistent_hash_moves_only_the_leaving_workers_share():
    table, ws = table_of(4)
    b = Balancer(table, "consistent-hash")
    before = {p: b.pick(p) for p in PATHS}
    table.remove(ws[2])
    after = {p: b.pick(p) for p in PATHS}
    moved = [p for p in PATHS if before[p] is not after[p]]
    assert moved and all(before[p] is ws[2] for p in moved)
    assert all(after[p] is not ws[2] for p in PATHS)
    table.add(ws[2])  # back (still marked up): the original mapping returns
    assert {p: b.pick(p) for p in PATHS} == before
    table.record_check(ws[0], False)  # down, not removed: same rule
    down = {p: b.pick(p) for p in PATHS}
    assert all(before[p] is down[p] for p in PATHS if before[p] is not ws[0])


@pytest.mark.parametrize("factor", [LOAD_FACTOR, 2.0])
def test_consistent_hash_bounded_load(factor):
    table, ws = table_of(4)
    b = Balancer(table, "consistent-hash", load_factor=factor)
    hot = b"/hot.js"
    owner = b.pick(hot)  # where the path hashes to while no worker has a request
    # Requests to one hot path that never finish: they overflow to the next workers on the
    # ring instead of piling onto the owner.
    for i in range(1, 201):
        w = b.pick(hot)
        take(w)
        cap = math.ceil(factor * i / len(ws))
        assert max(x.in_flight for x in ws) <= max(cap, b.worker_threads)
    assert owner.in_flight == max(x.in_flight for x in ws)
    assert all(w.in_flight > 0 for w in ws)
    hold(ws, 0, 0, 0, 0)
    assert b.pick(hot) is owner  # load gone: sticky again


def test_consistent_hash_without_a_bound_only_spares_a_worker_whose_threads_are_all_busy():
    table, ws = table_of(3)
    b = Balancer(table, "consistent-hash", worker_threads=4, load_factor=0)
    hot = b"/hot.js"
    owner = b.pick(hot)
    for _ in range(4):
        take(b.pick(hot))
    assert owner.in_flight == 4  # all of them, where a bound of 1.25 would have spread them
    spilled = b.pick(hot)
    assert spilled is not owner  # its threads are busy while another worker has one free
    hold(ws, 4, 4, 4)
    assert b.pick(hot) is owner  # every worker is busy: back to the path's own


def test_ring_rebuilt_only_when_the_table_changes():
    table, ws = table_of(3)
    b = Balancer(table, "consistent-hash")
    b.pick(b"/x")
    ring = b._points
    b.pick(b"/y")
    assert b._points is ring
    table.record_check(ws[0], False)
    b.pick(b"/x")
    assert b._points is not ring and len(b._points) < len(ring)


# -- through the proxy --------------------------------------------------------------------
@pytest.mark.integration  # starts a server process
def test_consistent_hash_through_the_proxy(workers):
    p = ProxyThread(workers, proxy=configured(ProxyConfig, balance="consistent-hash"), front_cache=NO_CACHE)
    with p:
        seen = {}
        for i in range(40):
            path = f"/file/f{i}?max_age=0"
            owners = {requests.get(p.url + path).headers["X-Worker"] for _ in range(3)}
            assert len(owners) == 1  # sticky
            seen[path] = owners.pop()
        assert set(seen.values()) == {str(w.port) for w in workers}  # and spread


@pytest.mark.integration  # starts a server process
def test_least_outstanding_through_the_proxy_avoids_the_busy_worker(workers):
    p = ProxyThread(workers, proxy=configured(ProxyConfig, balance="least-outstanding"), front_cache=NO_CACHE)
    with p:
        slow = {}
        t = threading.Thread(target=lambda: slow.update(r=requests.get(p.url + "/sleep?s=1.5")))
        t.start()
        wait_until(lambda: sum(p.worker(w.port).in_flight for w in workers) == 1, message="slow request sent")
        busy = next(w.port for w in workers if p.worker(w.port).in_flight == 1)
        fast = {requests.get(p.url + "/echo").json()["worker"] for _ in range(10)}
        assert fast == {str(w.port) for w in workers if w.port != busy}
        t.join(10)
        assert slow["r"].headers["X-Worker"] == str(busy)


@pytest.mark.integration  # starts a server process
def test_the_default_keeps_requests_on_the_first_worker_until_its_threads_are_taken(workers):
    p = ProxyThread(workers, proxy=configured(ProxyConfig), front_cache=NO_CACHE, worker_threads=2)
    with p:
        first, second = (str(w.port) for w in p.table.healthy)
        assert {requests.get(p.url + "/echo").json()["worker"] for _ in range(6)} == {first}
        slow = [threading.Thread(target=requests.get, args=(p.url + "/sleep?s=1.5",)) for _ in range(2)]
        for t in slow:
            t.start()
        wait_until(lambda: p.worker(int(first)).in_flight == 2, message="both slow requests on the first worker")
        assert {requests.get(p.url + "/echo").json()["worker"] for _ in range(6)} == {second}
        for t in slow:
            t.join(10)
        wait_until(lambda: p.worker(int(first)).in_flight == 0, message="the slow requests answered")
        assert requests.get(p.url + "/echo").json()["worker"] == first


@pytest.mark.integration  # starts a server process
def test_policy_switch_on_reload(workers):
    p = ProxyThread(workers, front_cache=NO_CACHE)
    with p:
        path = "/file/sticky?max_age=0"
        assert len({requests.get(p.url + path).headers["X-Worker"] for _ in range(4)}) == 2
        p.update(proxy=configured(ProxyConfig, balance="consistent-hash"))
        assert len({requests.get(p.url + path).headers["X-Worker"] for _ in range(4)}) == 1
