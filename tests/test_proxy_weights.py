"""Weights and slow start in every balancing policy: shares follow workers[].weight, and a
worker coming back ramps up over its slowStart seconds (an injected clock stands for time)."""
from __future__ import annotations

import random
from collections import Counter

import pytest

from arbiter.proxy.balancer import SLOW_START_STEPS, Balancer, ramp
from arbiter.state import WorkerState, WorkerTable

pytestmark = pytest.mark.unit

POLICIES = ("round-robin", "least-outstanding", "consistent-hash")
PATHS = [b"/assets/%d/file%d.js" % (i % 97, i) for i in range(30000)]


class Clock:
    """Monotonic time a test moves by hand."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def weighted(weights: list[int], slow_start: float = 0.0, clock: Clock | None = None
             ) -> tuple[WorkerTable, list[WorkerState]]:
    table = WorkerTable(rise=1, fall=1, clock=clock or Clock())
    workers = []
    for i, weight in enumerate(weights):
        worker = WorkerState("127.0.0.1", 9000 + i, weight=weight, slow_start=slow_start)
        workers.append(table.add(worker))
        table.record_check(worker, True)
    return table, workers


def shares(picks: Counter, workers: list[WorkerState]) -> list[float]:
    total = sum(picks.values())
    return [picks[w] / total for w in workers]


def assert_shares(got: list[float], weights: list[int], within: float = 0.05) -> None:
    want = [w / sum(weights) for w in weights]
    assert all(abs(g - w) <= within for g, w in zip(got, want)), (got, want)


@pytest.mark.parametrize("policy", POLICIES)
def test_weights_1_2_3_give_shares_within_5_percent_one_request_at_a_time(policy):
    table, ws = weighted([1, 2, 3])
    b = Balancer(table, policy)
    picks = Counter(b.pick(p) for p in PATHS)
    assert_shares(shares(picks, ws), [1, 2, 3])


def concurrent_picks(b: Balancer, concurrency: int) -> tuple[Counter, int]:
    """Each of PATHS picked with `concurrency` requests in flight, a random one finishing before
    each new one starts: the picks per worker, and how many went on a run (the worker picked
    just before, still busy)."""
    rng = random.Random(7)
    in_flight: list[WorkerState] = []
    picks: Counter = Counter()
    runs = 0
    for path in PATHS:
        if len(in_flight) == concurrency:
            done = in_flight.pop(rng.randrange(len(in_flight)))
            done.in_flight -= 1
            done.connections -= 1
        worker = b.pick(path)
        runs += worker.in_flight > 0 and bool(in_flight) and worker is in_flight[-1]
        worker.in_flight += 1
        worker.connections += 1
        in_flight.append(worker)
        picks[worker] += 1
    return picks, runs


@pytest.mark.parametrize("policy", POLICIES)
def test_weights_1_2_3_give_shares_within_5_percent_under_concurrency(policy):
    table, ws = weighted([1, 2, 3])
    picks, _ = concurrent_picks(Balancer(table, policy, worker_threads=4), 12)
    assert_shares(shares(picks, ws), [1, 2, 3])


@pytest.mark.parametrize("threads, concurrency", [(4, 12), (8, 4), (64, 4), (64, 16)])
def test_runs_under_concurrency_never_bend_the_weights_of_round_robin(threads, concurrency):
    """A worker already busy takes the next requests in a run, but never more than its weight
    has earned: the shares stay 1:2:3 (within half a per cent), at any concurrency."""
    table, ws = weighted([1, 2, 3])
    picks, runs = concurrent_picks(Balancer(table, "round-robin", worker_threads=threads), concurrency)
    assert_shares(shares(picks, ws), [1, 2, 3], within=0.005)
    assert runs > len(PATHS) / 10  # runs still happen: a busy worker keeps taking requests


def test_weighted_round_robin_is_smooth_as_nginx():
    table, ws = weighted([5, 1, 1])
    b = Balancer(table, "round-robin")
    a, x, y = ws
    # nginx's example: weights 5, 1, 1 give a a b a c a a, not a a a a a b c.
    assert [b.pick(b"/") for _ in range(7)] == [a, a, x, a, y, a, a]


def test_equal_weights_keep_the_plain_policies():
    table, ws = weighted([3, 3, 3])
    b = Balancer(table, "round-robin")
    assert [b.pick(b"/") for _ in range(6)] == ws + ws and b.uniform


def test_a_heavier_worker_keeps_more_threads_busy_before_it_is_passed_over():
    table, ws = weighted([1, 3])
    b = Balancer(table, "round-robin", worker_threads=2)
    ws[0].connections, ws[1].connections = 2, 5  # the light one full; the heavy one has 6 threads' worth
    assert {b.pick(b"/") for _ in range(10)} == {ws[1]}


def test_under_first_a_weight_is_threads_and_a_ramping_worker_takes_its_share_of_them():
    clock = Clock()
    table, ws = weighted([3, 1], slow_start=60.0, clock=clock)
    b = Balancer(table, "first", worker_threads=2, clock=clock)

    placed = []
    for _ in range(8):
        w = b.pick(b"/")
        w.connections += 1
        placed.append(w)
    assert placed == [ws[0]] * 6 + [ws[1]] * 2  # 3 x 2 threads before the light worker gets any
    table.record_check(ws[0], False)
    clock.now += 5
    table.record_check(ws[0], True)  # back: a twentieth of its threads at first (at least one)
    taken = []
    for elapsed in (0, 20, 40, 60):
        clock.now = ws[0].recovered_at + elapsed
        for w in ws:
            w.connections = 0
        first = 0
        while b.pick(b"/") is ws[0]:
            ws[0].connections += 1
            first += 1
        taken.append(first)
    assert taken == [1, 2, 4, 6]


def test_weighted_consistent_hash_keeps_a_path_on_one_worker_and_moves_only_a_leavers_share():
    table, ws = weighted([1, 2, 3])
    b = Balancer(table, "consistent-hash")
    before = {p: b.pick(p) for p in PATHS[:3000]}
    assert all(b.pick(p) is before[p] for p in PATHS[:3000])
    table.record_check(ws[0], False)
    after = {p: b.pick(p) for p in PATHS[:3000]}
    assert all(after[p] is before[p] for p in before if before[p] is not ws[0])


def test_the_ramp_grows_in_even_steps_from_one_step_to_the_whole_weight():
    worker = WorkerState("127.0.0.1", 9000, weight=4, slow_start=10.0, recovered_at=100.0)
    assert ramp(worker, 100.0) == (1 / SLOW_START_STEPS, 100.5)
    assert ramp(worker, 104.9) == (0.5, 105.0) and ramp(worker, 105.0) == (0.55, 105.5)
    assert ramp(worker, 109.99)[0] == 1.0 and ramp(worker, 110.0) == (1.0, float("inf"))
    worker.recovered_at = None
    assert ramp(worker, 100.0)[0] == 1.0


def test_workers_start_at_full_weight_when_the_master_starts():
    clock = Clock()
    table, ws = weighted([1, 1], slow_start=60.0, clock=clock)
    assert [w.recovered_at for w in ws] == [None, None]
    b = Balancer(table, "round-robin", clock=clock)
    assert Counter(b.pick(b"/") for _ in range(100)) == {ws[0]: 50, ws[1]: 50}


@pytest.mark.parametrize("policy", POLICIES)
def test_a_recovered_worker_ramps_up_linearly_over_slow_start(policy):
    clock = Clock()
    table, ws = weighted([1, 1], slow_start=60.0, clock=clock)
    b = Balancer(table, policy, clock=clock)
    table.record_check(ws[1], False)
    clock.now += 5
    table.record_check(ws[1], True)  # back: its share starts small
    assert ws[1].recovered_at == clock.now
    measured = []
    for elapsed in (0, 15, 30, 45, 60):
        clock.now = ws[1].recovered_at + elapsed
        picks = Counter(b.pick(p) for p in PATHS[:6000])
        measured.append(picks[ws[1]] / 6000)
    # Its weight is a fraction f of 1 against the other's 1: a share of f / (1 + f).
    for got, f in zip(measured, (1 / SLOW_START_STEPS, 0.25, 0.5, 0.75, 1.0)):
        assert abs(got - f / (1 + f)) <= 0.05, measured
    assert b.uniform  # ramp over: the plain policy again


def test_an_ejection_ending_ramps_up_too_and_a_new_master_does_not():
    clock = Clock()
    timers = []
    table = WorkerTable(rise=1, fall=1, clock=clock, schedule=lambda delay, fn: timers.append((delay, fn)))
    ws = [table.add(WorkerState("127.0.0.1", 9000 + i, slow_start=30.0)) for i in range(2)]
    for w in ws:
        table.record_check(w, True)
    assert table.record_outlier(ws[0], "5 x 503")
    clock.now += timers[0][0]
    timers[0][1]()
    assert ws[0].ejected_until is None and ws[0].recovered_at == clock.now
    assert ramp(ws[0], clock.now)[0] == 1 / SLOW_START_STEPS


def test_a_reload_changing_a_weight_is_followed_at_once():
    table, ws = weighted([1, 1])
    b = Balancer(table, "round-robin")
    table.tune(ws[1], 3, 0.0)
    assert_shares(shares(Counter(b.pick(b"/") for _ in range(4000)), ws), [1, 3])


def test_weights_and_ramps_reach_the_proxy_processes_copy():
    from arbiter.proxy.view import MirrorTable, rows

    clock = Clock()
    table, ws = weighted([2, 5], slow_start=30.0, clock=clock)
    table.record_check(ws[0], False)
    table.record_check(ws[0], True)
    mirror = MirrorTable(lambda w, error: None)
    mirror.apply(rows(table))
    copy = {w.port: w for w in mirror}
    assert [(copy[w.port].weight, copy[w.port].slow_start, copy[w.port].recovered_at) for w in ws] == [
        (2, 30.0, clock.now), (5, 30.0, None)]
