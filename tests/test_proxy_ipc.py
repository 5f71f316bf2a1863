"""What the master and its proxy processes share: the control channel's framing, the proxy's copy
of the worker table, and the counters in shared memory; and how a proxy process sets its
garbage collector."""
from __future__ import annotations

import asyncio
import gc
import os
import socket

import pytest

from arbiter.config import load_data
from arbiter.proxies import share
from arbiter.proxy.control import MAX_LINE, Channel
from arbiter.proxy.counters import GAUGES, REQUESTS, WORKERS, Counters, named, report, total
from arbiter.proxy.process import GC_YOUNG_THRESHOLD, tune_gc
from arbiter.proxy.view import MirrorTable, rows
from arbiter.state import WORKER_SLOTS, WorkerState, WorkerTable

pytestmark = pytest.mark.unit


def test_the_mirror_keeps_each_workers_object_and_follows_pid_up_and_membership():
    failures = []
    mirror = MirrorTable(lambda w, error: failures.append((w.port, w.pid, error)))
    table = WorkerTable()
    a, b = table.add(WorkerState("127.0.0.1", 9001)), table.add(WorkerState("127.0.0.1", 9002))
    table.spawned(a, 100)
    table.spawned(b, 200)
    a.up = True
    mirror.apply(rows(table))
    first = mirror.get("127.0.0.1", 9001)
    assert [w.port for w in mirror.healthy] == [9001] and first.pid == 100 and first.slot == a.slot
    generation = mirror.generation
    table.spawned(a, 101)  # the master replaced its process: same address, another pid
    b.up = True
    mirror.apply(rows(table))
    assert mirror.get("127.0.0.1", 9001) is first and first.pid == 101 and not first.up
    assert [w.port for w in mirror.healthy] == [9002] and mirror.generation > generation
    table.remove(b)
    mirror.apply(rows(table))
    assert mirror.get("127.0.0.1", 9002) is None and len(mirror) == 1
    mirror.record_passive_failure(first, "connection refused")  # reported, not decided here
    assert failures == [(9001, 101, "connection refused")] and not first.up


def test_the_table_gives_each_worker_its_own_counter_slot_and_reuses_a_leavers():
    table = WorkerTable()
    workers = [table.add(WorkerState("127.0.0.1", 9000 + i)) for i in range(3)]
    assert [w.slot for w in workers] == [0, 1, 2]
    table.remove(workers[1])
    assert table.add(WorkerState("127.0.0.1", 9100)).slot == 1


def test_counters_in_shared_memory_are_seen_by_another_mapping_and_summed():
    master = Counters.shared("test")
    proxy = Counters.attach(os.dup(master.fd))  # what a proxy process maps
    try:
        proxy.values[REQUESTS] += 3
        proxy.status[2] += 3
        proxy.values[WORKERS + 5] += 2
        proxy.set_gauges(client_connections=7)
        other = Counters.private()
        other.values[REQUESTS] += 1
        sums = total([master, other])
        assert sums[REQUESTS] == 4 and sums[WORKERS + 5] == 2
        stats = report(sums, True, 1024)
        assert stats["requests"] == 4 and stats["responses"]["2xx"] == 3 and stats["client_connections"] == 7
        master.zero_gauges()  # the proxy died: what it held is not held, what it counted stays
        assert all(named(proxy.values)[g] == 0 for g in GAUGES) and proxy.values[REQUESTS] == 3
    finally:
        proxy.close()
        master.close()


def test_a_worker_past_the_last_counter_slot_is_counted_in_the_shared_overflow_slot():
    table = WorkerTable()
    for i in range(WORKER_SLOTS + 1):
        last = table.add(WorkerState("127.0.0.1", 10000 + i))
    assert last.slot == WORKER_SLOTS and WORKERS + last.slot < len(Counters.private().values)


def test_the_channel_reassembles_split_messages_and_closes_on_an_oversized_one():
    async def scenario() -> tuple[list, bool]:
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair()
        theirs.setblocking(False)
        got: list = []
        closed = asyncio.Event()
        await Channel.open(ours, got.append, closed.set)
        await loop.sock_sendall(theirs, b'{"op": "a", "n": 1}\n{"op"')
        await asyncio.sleep(0.05)
        await loop.sock_sendall(theirs, b': "b"}\n')
        while len(got) < 2:
            await asyncio.sleep(0.01)
        # No newline: a runaway peer. (Sent while the channel reads, in the same loop.)
        runaway = asyncio.ensure_future(loop.sock_sendall(theirs, b"x" * (MAX_LINE + 1)))
        await asyncio.wait_for(closed.wait(), 10)
        runaway.cancel()
        await asyncio.gather(runaway, return_exceptions=True)
        theirs.close()
        return got, closed.is_set()

    got, closed = asyncio.run(scenario())
    assert got == [{"op": "a", "n": 1}, {"op": "b"}] and closed


def test_each_proxy_may_take_a_tenth_over_its_even_share_of_the_connections(tmp_path):
    (tmp_path / "www").mkdir()
    config = load_data({"baseDirectory": "www", "workerCount": 1, "proxy": {"maxConnections": 10_000},
                        "frontCache": {"maxBytes": 3_000_000}}, tmp_path / "gows.conf.json")
    for n, connections in ((1, 10_000), (2, 5_500), (3, 3_667)):
        proxy, front = share(config, n)
        assert proxy.max_connections == connections
        assert front.max_bytes == 3_000_000 // n  # (memory budgets are split exactly)
        assert proxy.body_buffer_bytes == config.proxy.body_buffer_bytes // n


def test_a_proxy_collects_its_youngest_generation_less_often_and_leaves_the_older_ones_alone():
    saved = gc.get_threshold()
    try:
        gc.set_threshold(700, 11, 12)
        tune_gc()
        assert gc.get_threshold() == (GC_YOUNG_THRESHOLD, 11, 12)
        assert GC_YOUNG_THRESHOLD > 700
    finally:
        gc.set_threshold(*saved)
