"""WorkerTable transitions: rise/fall for active checks, max_fails/fail_timeout for passive ones."""
import logging

import pytest

from arbiter.state import WorkerState, WorkerTable

pytestmark = pytest.mark.unit


def make(rise=2, fall=3, max_fails=3, fail_timeout=10.0):
    table = WorkerTable(rise=rise, fall=fall, max_fails=max_fails, fail_timeout=fail_timeout)
    worker = table.add(WorkerState("127.0.0.1", 9001))
    events = []
    table.subscribe(lambda w, up: events.append((w.port, up)))
    return table, worker, events


def test_rise_then_fall():
    table, w, events = make()
    table.spawned(w, 1234)
    table.record_check(w, True, 0.001)
    assert not w.up and table.healthy == ()
    table.record_check(w, True, 0.002)
    assert w.up and table.healthy == (w,) and w.last_check_latency == 0.002
    table.record_check(w, False, error="timeout")
    table.record_check(w, False, error="timeout")
    assert w.up
    table.record_check(w, True, 0.001)  # a success resets the failure streak
    for _ in range(3):
        table.record_check(w, False, error="503")
    assert not w.up and table.healthy == () and w.last_error == "503"
    assert events == [(9001, True), (9001, False)]


def test_passive_failures_within_window_mark_down():
    table, w, events = make(rise=1, max_fails=2, fail_timeout=60)
    table.record_check(w, True, 0.001)
    assert w.up
    table.record_passive_failure(w, "refused")
    assert w.up
    table.record_passive_failure(w, "reset")
    assert not w.up and events[-1] == (9001, False)


def test_passive_failures_outside_window_are_forgotten():
    table, w, _ = make(rise=1, max_fails=2, fail_timeout=0.0)
    table.record_check(w, True, 0.001)
    table.record_passive_failure(w, "refused")
    table.record_passive_failure(w, "refused")
    assert w.up


def test_generation_changes_on_membership_and_state():
    table, w, _ = make(rise=1)
    g = table.generation
    table.record_check(w, True, 0.001)
    assert table.generation > g
    g = table.generation
    other = table.add(WorkerState("127.0.0.1", 9000))
    assert table.generation > g
    table.record_check(other, True, 0.001)
    assert [x.port for x in table.healthy] == [9000, 9001]
    table.remove(other)
    assert table.healthy == (w,)


def test_a_worker_the_master_stopped_is_logged_as_news_one_that_died_as_a_warning(caplog):
    table, w, _ = make(rise=1)
    other = table.add(WorkerState("127.0.0.1", 9002))
    for worker, pid in ((w, 42), (other, 43)):
        table.spawned(worker, pid)
        table.record_check(worker, True, 0.001)
    with caplog.at_level(logging.INFO, logger="gows.state"):
        table.exited(w, "stopped", deliberate=True)
        table.exited(other, "killed by signal 9")
    levels = {r.getMessage(): r.levelno for r in caplog.records if "is down" in r.getMessage()}
    assert levels == {"worker 127.0.0.1:9001 is down (stopped)": logging.INFO,
                      "worker 127.0.0.1:9002 is down (killed by signal 9)": logging.WARNING}


def test_exited_marks_down_and_clears_pid():
    table, w, _ = make(rise=1)
    table.spawned(w, 42)
    table.record_check(w, True, 0.001)
    table.exited(w, "killed by signal 9")
    assert not w.up and w.pid is None and w.last_error == "killed by signal 9"
