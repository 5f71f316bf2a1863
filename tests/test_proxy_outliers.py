"""Workers leaving the balance: requests waiting on a worker marked down go elsewhere at once,
and outlier ejection (Envoy's) takes out a worker that keeps failing, charged only with its
own failures, for an exponentially growing while and never too many workers at once."""
from __future__ import annotations

import concurrent.futures
import socket

import pytest
import requests

from arbiter.config import ProxyConfig, configured
from arbiter.proxy.view import MirrorTable, rows
from arbiter.state import WorkerState, WorkerTable
from proxy_harness import NO_CACHE, ProxyThread, RawUpstream
from support import wait_until

pytestmark = pytest.mark.unit


def answering(status: int, body: bytes = b"ok"):
    """A scripted worker's answer: `status` with `body`, keeping the connection."""
    def respond(head: bytes, _: bytes, conn: socket.socket) -> bool:
        conn.sendall(b"HTTP/1.1 %d X\r\nContent-Length: %d\r\n\r\n%s" % (status, len(body), body))
        return True
    return respond


def silent(head: bytes, body: bytes, conn: socket.socket) -> bool:
    return True  # takes the request, never answers, keeps the connection


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def ejecting_table(n: int, percent: int = 50) -> tuple[WorkerTable, list[WorkerState], Clock, list]:
    clock, timers = Clock(), []
    table = WorkerTable(rise=1, fall=1, ejection_base=30.0, ejection_max=300.0, ejection_percent=percent,
                        clock=clock, schedule=lambda delay, fn: timers.append((delay, fn)))
    workers = [table.add(WorkerState("127.0.0.1", 9000 + i)) for i in range(n)]
    for w in workers:
        table.record_check(w, True)
    return table, workers, clock, timers


# -- a worker marked down: waiting requests go elsewhere at once ------------------------------
def test_a_get_waiting_on_a_worker_marked_down_is_answered_by_another_before_the_response_timeout():
    """The response timeout (120 s) is longer than the test's patience (60 s): only a retry on
    the down event can answer in time."""
    with RawUpstream(silent) as hung, RawUpstream(answering(200, b"from the other")) as good, \
            ProxyThread([hung.port, good.port], proxy=configured(ProxyConfig, responseTimeout=120.0),
                        front_cache=NO_CACHE, up=False) as pt, concurrent.futures.ThreadPoolExecutor(1) as pool:
        pt.set_up(hung.port, True)
        answer = pool.submit(requests.get, pt.url + "/page", timeout=60)
        wait_until(lambda: hung.heads, message="the request reaches the silent worker")
        pt.set_up(good.port, True)
        pt.set_up(hung.port, False)  # its health checks fail: marked down
        r = answer.result(60)
        assert (r.status_code, r.content) == (200, b"from the other")
        assert pt.stats()["retries"] == 1 and len(good.heads) == 1


def test_a_post_already_sent_to_a_worker_marked_down_is_not_sent_again():
    with RawUpstream(silent) as hung, RawUpstream(answering(200)) as good, \
            ProxyThread([hung.port, good.port], proxy=configured(ProxyConfig, responseTimeout=3.0),
                        front_cache=NO_CACHE, up=False) as pt, concurrent.futures.ThreadPoolExecutor(1) as pool:
        pt.set_up(hung.port, True)
        answer = pool.submit(requests.post, pt.url + "/form", data=b"x=1", timeout=60)
        wait_until(lambda: hung.heads, message="the request reaches the silent worker")
        pt.set_up(good.port, True)
        pt.set_up(hung.port, False)
        assert answer.result(60).status_code == 504  # its response timeout, as before
        assert good.heads == []


def test_the_mirror_tells_when_a_worker_leaves_the_balance_but_not_when_it_is_removed():
    master = WorkerTable(rise=1, fall=1)
    a, b = (master.add(WorkerState("127.0.0.1", p)) for p in (9001, 9002))
    mirror = MirrorTable(lambda w, error: None)
    left = []
    mirror.on_leave(lambda w: left.append(w.port))
    for w in (a, b):
        master.record_check(w, True)
    mirror.apply(rows(master))
    master.record_check(a, False)
    mirror.apply(rows(master))
    master.remove(b)
    mirror.apply(rows(master))
    assert left == [9001]


# -- outlier ejection: where the failures come from ---------------------------------------------
def test_a_worker_answering_503s_is_ejected_and_the_other_serves_everything():
    with RawUpstream(answering(503)) as bad, RawUpstream(answering(200)) as good, \
            ProxyThread([bad.port, good.port], front_cache=NO_CACHE, ejection_base=600.0) as pt:
        pt.call(lambda: setattr(pt.proxy.outliers, "threshold", 3))
        statuses = [requests.get(pt.url + "/x", timeout=10).status_code for _ in range(20)]
        assert len(bad.heads) == 3 and statuses.count(503) == 3 and statuses.count(200) == 17
        worker = pt.worker(bad.port)
        assert worker.ejected_until is not None and worker.ejections_total == 1 and worker.up
        assert pt.worker(good.port).ejected_until is None


@pytest.mark.parametrize("status", [501, 505, 404, 400])
def test_answers_to_a_clients_mistake_are_not_failures_of_the_worker(status):
    with RawUpstream(answering(status)) as odd, RawUpstream(answering(200)) as good, \
            ProxyThread([odd.port, good.port], front_cache=NO_CACHE) as pt:
        pt.call(lambda: setattr(pt.proxy.outliers, "threshold", 2))
        for _ in range(10):
            requests.get(pt.url + "/x", timeout=10)
        assert len(odd.heads) == 5 and pt.worker(odd.port).ejections_total == 0


def test_a_503_with_retry_after_sheds_load_and_is_not_a_failure_of_the_worker():
    """fileapp answers so past its concurrent listings: clients must not get a worker ejected."""
    def busy(head: bytes, _: bytes, conn: socket.socket) -> bool:
        conn.sendall(b"HTTP/1.1 503 X\r\nRetry-After: 1\r\nContent-Length: 4\r\n\r\nbusy")
        return True

    with RawUpstream(busy) as shedding, RawUpstream(answering(200)) as good, \
            ProxyThread([shedding.port, good.port], front_cache=NO_CACHE) as pt:
        pt.call(lambda: setattr(pt.proxy.outliers, "threshold", 2))
        statuses = [requests.get(pt.url + "/x", timeout=10).status_code for _ in range(10)]
        assert statuses.count(503) == 5 and pt.worker(shedding.port).ejections_total == 0


def test_a_success_in_between_starts_the_count_again():
    answers = iter([503, 503, 200, 503, 503, 200] * 3)

    def respond(head, body, conn):
        return answering(next(answers))(head, body, conn)

    with RawUpstream(respond) as flaky, RawUpstream(answering(200)) as good, \
            ProxyThread([flaky.port, good.port], front_cache=NO_CACHE) as pt:
        pt.call(lambda: setattr(pt.proxy.outliers, "threshold", 3))
        for _ in range(36):
            requests.get(pt.url + "/x", timeout=10)
        assert len(flaky.heads) == 18 and pt.worker(flaky.port).ejections_total == 0


def test_refused_connections_count_against_the_worker_that_refused():
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        refusing = closed.getsockname()[1]  # bound, never listening: connections are refused
        with RawUpstream(answering(200)) as good, \
                ProxyThread([refusing, good.port], front_cache=NO_CACHE, max_fails=1000) as pt:
            pt.call(lambda: setattr(pt.proxy.outliers, "threshold", 2))
            assert all(requests.get(pt.url + "/x", timeout=10).status_code == 200 for _ in range(10))
            assert pt.worker(refusing).ejections_total == 1 and pt.worker(good.port).ejections_total == 0


# -- outlier ejection: the master's rules --------------------------------------------------------
def test_ejections_last_twice_as_long_each_time_up_to_the_cap():
    table, ws, clock, timers = ejecting_table(2)
    durations = []
    for _ in range(6):
        assert table.record_outlier(ws[0], "5 x 503")
        assert ws[0] not in table.healthy
        delay, readmit = timers.pop()
        durations.append(delay)
        clock.now += delay
        readmit()
        assert ws[0] in table.healthy
    assert durations == [30, 60, 120, 240, 300, 300]
    clock.now += 301  # a long while without an ejection: the next one is short again
    assert table.record_outlier(ws[0], "5 x 503") and timers.pop()[0] == 30


def test_no_more_than_max_ejection_percent_are_ejected_and_never_the_last_one_up():
    table, ws, clock, timers = ejecting_table(4, percent=50)
    assert table.record_outlier(ws[0], "x") and table.record_outlier(ws[1], "x")
    assert not table.record_outlier(ws[2], "x")  # 3 of 4 would be over 50%
    assert len(table.healthy) == 2
    table2, ws2, _, _ = ejecting_table(2, percent=100)
    table2.record_check(ws2[1], False)
    assert not table2.record_outlier(ws2[0], "x") and table2.healthy == (ws2[0],)


def test_an_ejection_ended_early_by_a_new_process_is_not_ended_twice():
    table, ws, clock, timers = ejecting_table(2)
    ws[0].local = True
    assert table.record_outlier(ws[0], "x")
    table.spawned(ws[0], 4242)  # replaced meanwhile: a fresh process, not ejected
    assert ws[0].ejected_until is None
    table.record_check(ws[0], True)
    assert table.record_outlier(ws[0], "x")
    timers[0][1]()  # the first ejection's timer: stale, changes nothing
    assert ws[0].ejected_until is not None
