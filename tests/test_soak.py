"""The soak's own logic: its timetable, the verdict (growth, error accounting), wrk's mixed-load
script and output, its hostile clients against a scripted loopback server, and its proxy kills
against processes the tests start under a proxy's title.

No soak runs here (it needs wrk and minutes): tests/data/wrk-soak-mix.txt is the output of a real
wrk run of the mix script.
"""
from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import signal
import subprocess
import time
from collections import Counter
from contextlib import ExitStack
from pathlib import Path

import pytest

from benchmarks import chaos, loads, prereqs, procstat, servers, soak, soak_proxies, soak_record
from benchmarks.schedule import Action, Event, growth_windows, per_minute, schedule, wrk_run_end, wrk_run_ends
from benchmarks.verdict import (PROXY_RSS, ClientOutcome, ProxyKill, Sample, Usage, WrkTotals, after_kill,
                                error_reasons, growth_reasons, master_truncations, proxy_kill_errors)

pytestmark = pytest.mark.unit

DATA = Path(__file__).parent / "data"


# --- the timetable -------------------------------------------------------------------------------

def times(events, action):
    return [e.at for e in events if e.action is action]


def test_five_minute_schedule_has_the_issues_rates():
    events = schedule(300)
    assert times(events, Action.SAMPLE) == [float(t) for t in range(0, 301, 10)]
    assert times(events, Action.KILL) == [float(t) for t in range(5, 300, 10)]
    assert times(events, Action.PROXY_KILL) == [16.0, 76.0, 136.0, 196.0, 256.0]
    for minute in range(5):
        in_minute = [e for e in events if 60 * minute <= e.at < 60 * (minute + 1)]
        assert sum(e.count for e in in_minute if e.action is Action.SLOW_READERS) == 200
        assert sum(e.count for e in in_minute if e.action is Action.ABORTED_UPLOADS) == 200
        assert [e.action for e in in_minute if e.action in (Action.HUP, Action.TTIN, Action.TTOU)] == [
            Action.HUP, Action.TTIN, Action.TTOU]  # a HUP resets the count: TTIN and TTOU both after it
    assert per_minute(Action.SLOW_READERS) == per_minute(Action.ABORTED_UPLOADS) == 200
    assert [e.at for e in events] == sorted(e.at for e in events)


def test_samples_see_no_chaos_at_their_moment_and_no_client_of_ours():
    events = schedule(300)
    samples = set(times(events, Action.SAMPLE))
    assert not samples & {e.at for e in events if e.action is not Action.SAMPLE}
    # Attacks start 1-3 s after a sample: 7 s for a batch to end before the next one.
    for e in events:
        if e.action in (Action.SLOW_READERS, Action.ABORTED_UPLOADS):
            assert 1 <= e.at % 10 <= 3


@pytest.mark.parametrize("seconds", [20, 30, 50, 60, 75, 100, 300])
def test_every_ttin_has_its_ttou_so_the_run_ends_with_the_workers_it_began_with(seconds):
    events = schedule(seconds)
    ttin, ttou = times(events, Action.TTIN), times(events, Action.TTOU)
    assert len(ttin) == len(ttou) and all(i < o for i, o in zip(ttin, ttou))
    assert all(e.at < seconds for e in events if e.action is not Action.SAMPLE)
    assert times(events, Action.SAMPLE)[-1] == seconds


def test_wrk_runs_end_at_kill_times_between_samples():
    assert wrk_run_end(0.0, 300) == 5.0
    assert wrk_run_end(5.03, 300) == 15.0
    assert wrk_run_end(24.5, 300) == 35.0  # half a second is too short a run
    assert wrk_run_end(291.0, 300) == 295.0 and wrk_run_end(296.0, 300) == 300.0
    assert wrk_run_end(15.1, 300) == 18.0 and wrk_run_end(18.2, 300) == 25.0  # a proxy kill at 16 s


@pytest.mark.parametrize("seconds", [60, 100, 300])
def test_a_proxy_kill_falls_alone_in_a_wrk_run_that_ends_two_seconds_after_it(seconds):
    events = schedule(seconds)
    proxy_kills = times(events, Action.PROXY_KILL)
    assert proxy_kills and len(proxy_kills) == len(range(16, seconds, 60))  # one a minute, never two at once
    ends = wrk_run_ends(seconds)
    assert not set(times(events, Action.SAMPLE)) & set(ends[:-1])  # a sample never sees wrk reconnecting
    for at in proxy_kills:
        # Nothing else happens in its window: its run's errors are its own (and the worker kill's before).
        assert [e.action for e in events if at <= e.at <= at + 2] == [Action.PROXY_KILL]
        # The run it falls in began at the worker kill a second before (wrk's connections are all up)
        # and ends two seconds after it.
        assert at - 1 in times(events, Action.KILL) and max(end for end in ends if end < at) == at - 1
        assert wrk_run_end(at - 1 + 0.03, seconds) == at + 2


def test_growth_compares_the_second_minute_with_the_last_or_single_samples_in_short_runs():
    assert growth_windows(300) == ((60, 110), (250, 300))
    assert growth_windows(170) == ((60, 110), (120, 170))
    assert growth_windows(165) == ((80, 80), (165, 165))
    assert growth_windows(60) == ((30, 30), (60, 60))
    assert growth_windows(25) == ((10, 10), (25, 25))


# --- growth ----------------------------------------------------------------------------------------

def sample(t, master_rss=100_000, master_fds=100, workers=((50_000, 40), (60_000, 30)),
           proxies=((40_000, 60), (45_000, 50))):
    """A sample; proxies as (RSS, fds), the first the longest-running (the lowest start time)."""
    return Sample(t, Usage(1, master_rss, master_fds), [Usage(10 + i, r, f) for i, (r, f) in enumerate(workers)],
                  [Usage(20 + i, r, f, started=1000 + i) for i, (r, f) in enumerate(proxies)])


def test_flat_or_slightly_growing_usage_passes():
    samples = [sample(t, master_rss=100_000 + 20 * t) for t in range(0, 301, 10)]  # +6% in 300 s, 4% after 60 s
    assert growth_reasons(samples, (60, 110), (250, 300)) == []


def test_master_rss_growth_above_ten_percent_fails_with_the_numbers():
    samples = [sample(t, master_rss=100_000 if t < 200 else 111_000) for t in range(0, 301, 10)]
    (reason,) = growth_reasons(samples, (60, 110), (250, 300))
    assert reason.startswith("master RSS grew 11%: 100,000 KiB at 60–110 s (median), 111,000 KiB at 250–300 s")


def test_growth_in_the_first_minute_does_not_count():
    samples = [sample(t, master_fds=20 if t < 60 else 150) for t in range(0, 301, 10)]
    assert growth_reasons(samples, (60, 110), (250, 300)) == []


def test_one_sample_in_a_burst_does_not_decide_growth():
    samples = [sample(t, master_fds=300 if t == 290 else 100) for t in range(0, 301, 10)]
    assert growth_reasons(samples, (60, 110), (250, 300)) == []
    samples = [sample(t, master_fds=300 if t >= 270 else 100) for t in range(0, 301, 10)]
    assert growth_reasons(samples, (60, 110), (250, 300))[0].startswith(
        "master fds (besides worker connections) grew 200%: 100 at 60–110 s (median), 300 at 250–300 s")


def test_pooled_worker_connections_do_not_count_as_growth():
    def with_pool(t, pooled, master_fds=25):
        # The proxies' keep-alive connections to the workers: both ends are left out.
        return Sample(t, Usage(1, 100_000, master_fds), [Usage(2, 50_000, 17 + pooled, pooled)],
                      [Usage(3, 40_000, 70 + pooled // 2, pooled // 2, 1),
                       Usage(4, 40_000, 60 + pooled // 2, pooled // 2, 2)])

    samples = [with_pool(t, 30 if t < 200 else 60) for t in range(0, 301, 10)]
    assert growth_reasons(samples, (60, 110), (250, 300)) == []
    # A descriptor kept besides the pool (a CLOSE_WAIT socket, a file) counts.
    samples = [with_pool(t, 30, master_fds=100 if t < 200 else 115) for t in range(0, 301, 10)]
    assert growth_reasons(samples, (60, 110), (250, 300)) == [
        "master fds (besides worker connections) grew 15%: 100 at 60–110 s (median), 115 at 250–300 s (median) "
        "(limit 10%)"]


def test_a_proxy_may_grow_by_its_front_cache_share_whatever_the_cache_held_at_the_baseline():
    # The soak run of 2026-12-02 18:21: a HUP purged the cache before the baseline, the load
    # filled it again by the end (33 -> 55 MiB, within the 32 MiB share).
    samples = [sample(t, proxies=((33_000 if t < 200 else 55_000, 60), (50_000, 50))) for t in range(0, 301, 10)]
    (reason,) = growth_reasons(samples, (60, 110), (250, 300))
    assert reason.startswith("proxy RSS (the longest-running proxy) grew 67%")
    assert growth_reasons(samples, (60, 110), (250, 300), allowances={PROXY_RSS: 32_768}) == []
    # Beyond the share and the 10%, it is growth all the same.
    samples = [sample(t, proxies=((33_000 if t < 200 else 70_000, 60), (50_000, 50))) for t in range(0, 301, 10)]
    (reason,) = growth_reasons(samples, (60, 110), (250, 300), allowances={PROXY_RSS: 32_768})
    assert reason == ("proxy RSS (the longest-running proxy) grew 112%: 33,000 KiB at 60–110 s (median), "
                      "70,000 KiB at 250–300 s (median) (limit 10% + 32,768 KiB)")


def test_workers_are_compared_by_the_largest_one_since_kills_replace_them():
    before = [sample(t, workers=((50_000, 40), (30_000, 20))) for t in (60, 70, 80)]
    # A fresh worker replaced the big one, another one grew past it: the largest grew 20%.
    after = [sample(t, workers=((25_000, 20), (60_000, 40))) for t in (280, 290, 300)]
    (reason,) = growth_reasons(before + after, (60, 110), (250, 300))
    assert reason.startswith("worker RSS (max over workers) grew 20%")


def test_proxies_are_compared_by_the_longest_running_one_and_their_descriptors_summed():
    # The young proxy, killed every minute, is smaller or bigger at random; the old one holds steady
    # and wrk's 50 connections move between them: no growth.
    def steady(t):
        young, held = (30_000 if t % 20 else 50_000), (10 if t % 20 else 40)
        return sample(t, proxies=((40_000, 20 + 50 - held), (young, 20 + held)))

    samples = [steady(t) for t in range(0, 301, 10)]
    assert growth_reasons(samples, (60, 110), (250, 300)) == []
    # The longest-running one grows 15% while the young one stays the largest: that is growth.
    samples = [sample(t, proxies=((40_000 if t < 200 else 46_000, 60), (50_000, 50))) for t in range(0, 301, 10)]
    (reason,) = growth_reasons(samples, (60, 110), (250, 300))
    assert reason == ("proxy RSS (the longest-running proxy) grew 15%: 40,000 KiB at 60–110 s (median), "
                      "46,000 KiB at 250–300 s (median) (limit 10%)")
    # Descriptors besides the pool grow in one proxy: their sum shows it.
    samples = [sample(t, proxies=((40_000, 60 if t < 200 else 77), (40_000, 50))) for t in range(0, 301, 10)]
    (reason,) = growth_reasons(samples, (60, 110), (250, 300))
    assert reason.startswith("proxy fds (besides worker connections, sum over proxies) grew 15%: 110 at")


def test_a_master_or_proxies_that_cannot_be_read_at_the_end_fail():
    samples = [sample(t) for t in (60, 70, 80)] + [Sample(t, None, []) for t in (280, 290, 300)]
    reasons = growth_reasons(samples, (60, 110), (250, 300))
    assert "master RSS: nothing to read at the end" in reasons and len(reasons) == 6
    assert "worker fds (besides proxy connections, max over workers): nothing to read at the end" in reasons
    assert "proxy RSS (the longest-running proxy): nothing to read at the end" in reasons


def test_a_soak_that_ended_early_has_no_growth_to_measure():
    assert growth_reasons([sample(0), sample(10)], (60, 110), (250, 300)) == [
        "no sample after the first minute to measure growth with (the soak ended early)"]


# --- error accounting ------------------------------------------------------------------------------

def test_after_kill_covers_the_window_after_each_kill_only():
    kills = [10.0, 40.0]
    assert after_kill(10.5, 10.5, kills) and after_kill(11.9, 12.5, kills)
    assert after_kill(9.0, 10.1, kills)  # the poll interval contains the kill
    assert not after_kill(9.0, 9.9, kills)  # before it
    assert not after_kill(12.5, 13.0, kills)  # long after it
    assert not after_kill(1.0, 2.0, [])


def test_master_truncations_are_split_by_kill_windows():
    polls = [(0.0, 0), (1.0, 0), (2.0, 3), (4.0, 3), (6.0, 5), (7.0, 6), (8.0, 1)]
    # +3 in (1, 2] right after the kill at 1.5; +2 in (4, 6] and +1 in (6, 7] after its window; a drop counts nothing.
    assert master_truncations(polls, [1.5]) == (3, 3)
    assert master_truncations(polls, []) == (0, 6)


def test_truncations_of_a_killed_worker_are_excused():
    wrk = WrkTotals(requests=10_000, read=4, statuses=Counter({200: 9_000, 206: 996}))
    clients = [ClientOutcome("slow reader", 4.0, 5.2, "truncated", 200),
               ClientOutcome("slow reader", 4.0, 6.0, "ok", 200),
               ClientOutcome("aborted upload", 4.0, 4.1, "refused")]
    polls = [(4.0, 0), (5.5, 5), (7.0, 5)]
    assert error_reasons(wrk, clients, polls, kills=[5.0]) == []


def test_read_errors_beyond_the_kill_truncations_fail():
    wrk = WrkTotals(requests=100, read=7)
    reasons = error_reasons(wrk, [], [(4.0, 0), (5.5, 5)], kills=[5.0])
    assert reasons == ["2 wrk read errors beyond the 5 responses the master truncated within 2 s of a worker kill"]


def test_a_slow_readers_truncation_is_not_also_spent_on_wrk():
    wrk = WrkTotals(read=1)
    clients = [ClientOutcome("slow reader", 4.0, 5.2, "truncated", 200)]
    reasons = error_reasons(wrk, clients, [(4.0, 0), (5.5, 1)], kills=[5.0])
    assert reasons == ["1 wrk read errors beyond the 0 responses the master truncated within 2 s of a worker kill"]


def test_truncations_with_no_kill_before_them_fail():
    clients = [ClientOutcome("slow reader", 20.0, 21.0, "truncated", 200)]
    reasons = error_reasons(WrkTotals(read=2), clients, [(20.0, 0), (21.0, 3)], kills=[5.0])
    assert reasons == ["1 slow readers cut off with no worker or proxy kill in the 2 s before",
                       "2 wrk read errors beyond the 0 responses the master truncated within 2 s of a worker kill",
                       "the master truncated 3 responses with no worker kill in the 2 s before"]


def test_every_status_outside_2xx_3xx_fails_even_right_after_a_kill():
    wrk = WrkTotals(statuses=Counter({200: 10, 304: 2, 503: 7, 502: 1}))
    clients = [ClientOutcome("slow reader", 5.0, 5.1, "ok", 503)]
    (reason,) = error_reasons(wrk, clients, [], kills=[5.0])
    assert reason == "9 responses outside 2xx/3xx: 502 ×1, 503 ×8"


def test_other_socket_errors_and_client_failures_are_never_excused():
    wrk = WrkTotals(connect=3, timeout=2)
    clients = [ClientOutcome("slow reader", 5.0, 20.0, "no head within 15 s"),
               ClientOutcome("aborted upload", 5.0, 5.1, "connect failed (ConnectionRefusedError)")]
    reasons = error_reasons(wrk, clients, [], kills=[5.0])
    assert reasons == ["wrk socket errors no kill explains: connect 3, timeout 2",
                       "2 soak clients failed: aborted upload: connect failed (ConnectionRefusedError) ×1, "
                       "slow reader: no head within 15 s ×1"]


def run(started, ended, read=0, write=0, connect=0, timeout=0, requests=1000):
    return soak_record.WrkRun(started, ended, requests, requests / (ended - started),
                              {"connect": connect, "read": read, "write": write, "timeout": timeout}, {200: requests})


def totals(runs):
    record = soak_record.Record(seconds=300)
    record.wrk_runs = runs
    return record.wrk_totals()


def test_wrk_errors_of_the_run_a_proxy_kill_falls_in_are_excused_up_to_its_connections():
    runs = [run(5, 15), run(15, 18, read=20, write=2), run(18, 25)]
    kill = ProxyKill(16.0, 2, 4321, connections=25, back_after=0.6)
    assert error_reasons(totals(runs), [], [], kills=[15.0], runs=runs, proxy_kills=[kill]) == []
    assert proxy_kill_errors(runs, [kill]) == (20, 2)
    # It held 10 connections: 10 errors at most, write errors first (nothing else explains them).
    kill.connections = 10
    assert proxy_kill_errors(runs, [kill]) == (8, 2)
    assert error_reasons(totals(runs), [], [], kills=[15.0], runs=runs, proxy_kills=[kill]) == [
        "12 wrk read errors beyond the 0 responses the master truncated within 2 s of a worker kill "
        "(and 8 the proxy kills explain)"]


def test_a_proxy_kill_explains_no_error_of_another_run_nor_other_kinds_of_errors():
    runs = [run(5, 15, read=5, write=1), run(15, 18, connect=3, timeout=2), run(18, 25)]
    kill = ProxyKill(16.0, 2, 4321, connections=25)
    assert proxy_kill_errors(runs, [kill]) == (0, 0)
    assert error_reasons(totals(runs), [], [], kills=[15.0], runs=runs, proxy_kills=[kill]) == [
        "wrk socket errors no kill explains: connect 3, write 1, timeout 2",
        "5 wrk read errors beyond the 0 responses the master truncated within 2 s of a worker kill"]


def test_soak_clients_cut_by_a_proxy_kill_are_excused_and_not_also_spent_on_wrk():
    runs = [run(15, 18, read=2), run(18, 25)]
    kill = ProxyKill(16.0, 1, 4321, connections=3)  # two of ours and one of wrk's
    cut = [ClientOutcome("slow reader", 15.5, 16.2, "closed before the head"),
           ClientOutcome("slow reader", 15.0, 16.1, "truncated", 200),
           ClientOutcome("aborted upload", 15.5, 16.0, "refused")]
    late = ClientOutcome("slow reader", 17.0, 18.5, "reset before the head")  # 2.5 s after the kill
    reasons = error_reasons(totals(runs), [*cut, late], [], kills=[5.0], runs=runs, proxy_kills=[kill])
    assert reasons == ["1 wrk read errors beyond the 0 responses the master truncated within 2 s of a worker kill "
                       "(and 1 the proxy kills explain)",
                       "1 soak clients failed: slow reader: reset before the head ×1"]


# --- wrk ---------------------------------------------------------------------------------------------

def test_mix_statuses_and_socket_errors_are_read_from_wrk_output():
    text = (DATA / "wrk-soak-mix.txt").read_text()
    assert loads.parse_wrk_statuses(text) == {200: 9263, 206: 3946}
    assert loads.wrk_errors(text) == {"connect": 0, "read": 0, "write": 0, "timeout": 0}
    errors = (DATA / "wrk-reset.txt").read_text()
    assert loads.wrk_errors(errors)["read"] > 0 and loads.parse_wrk_statuses(errors) == {}


def test_mix_script_cycles_through_the_entries_with_random_ranges():
    script = loads.wrk_mix_script([loads.MixEntry("/a.txt"), loads.MixEntry('/b"c', 4096, 150_000)])
    assert '{"/a.txt", 0, 0},\n  {"/b\\"c", 4096, 150000}' in script
    assert 'string.format("bytes=%d-%d", first, first + e[2] - 1)' in script
    for hook in ("function setup(thread)", "function init(args)", "function request()",
                 "function response(status, headers, body)", "function done(summary, latency, requests)"):
        assert hook in script
    assert 'io.write(string.format("soak-status %d %d\\n", status, n))' in script


# --- the soak's own clients against a scripted server --------------------------------------------

class Scripted:
    """A loopback server that reads one request head and answers with `reply(writer)`."""

    def __init__(self, reply):
        self.reply = reply
        self.requests: list[bytes] = []

    async def handle(self, reader, writer):
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            self.requests.append(head)
            await self.reply(reader, writer)
            writer.close()
        finally:
            self.handled.set()

    async def run(self, client):
        self.handled = asyncio.Event()
        server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        async with server:
            outcome = await client(server.sockets[0].getsockname()[1])
            await self.handled.wait()  # the server's side of the exchange is over too
            return outcome


def run_client(reply, client):
    return asyncio.run(asyncio.wait_for(Scripted(reply).run(client), 30))


def clock():
    return asyncio.get_running_loop().time()


def big_response(writer, send):
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (64 << 20) + b"x" * send)


async def until_closed(reader):
    try:
        await reader.read()
    except ConnectionError:
        pass


def test_slow_reader_reads_for_its_time_and_closes():
    async def reply(reader, writer):
        big_response(writer, 4 << 20)
        await until_closed(reader)

    outcome = run_client(reply, lambda port: chaos.slow_reader("127.0.0.1", port, "/big", clock, hold=0.3))
    assert (outcome.kind, outcome.result, outcome.status) == ("slow reader", "ok", 200)
    assert 0.3 <= outcome.ended - outcome.started < 5


def test_slow_reader_tells_a_cut_transfer_from_other_failures():
    async def cut(reader, writer):
        big_response(writer, 32 * 1024)

    outcome = run_client(cut, lambda port: chaos.slow_reader("127.0.0.1", port, "/big", clock, hold=20))
    assert outcome.result == "truncated" and outcome.status == 200

    async def silent(reader, writer):
        await until_closed(reader)

    outcome = run_client(silent, lambda port: chaos.slow_reader("127.0.0.1", port, "/big", clock, head_timeout=0.3))
    assert outcome.result == "no head within 0.3 s" and outcome.status is None

    async def nothing(reader, writer):
        pass

    outcome = run_client(nothing, lambda port: chaos.slow_reader("127.0.0.1", port, "/big", clock))
    assert outcome.result == "closed before the head"


def test_slow_reader_reports_the_status_of_an_error_response():
    async def busy(reader, writer):
        writer.write(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 5\r\n\r\nbusy\n")

    outcome = run_client(busy, lambda port: chaos.slow_reader("127.0.0.1", port, "/big", clock))
    assert (outcome.result, outcome.status) == ("ok", 503)


def test_aborted_upload_sends_part_of_a_declared_body_and_closes():
    received = []

    async def reply(reader, writer):
        received.append(len(await reader.read()))  # until the client closes

    server = Scripted(reply)
    outcome = asyncio.run(server.run(lambda port: chaos.aborted_upload("127.0.0.1", port, "/upload", clock,
                                                                       declared=1 << 20, sent=300_000)))
    assert outcome.result == "ok"
    assert b"Content-Length: 1048576\r\n" in server.requests[0] and server.requests[0].startswith(b"POST /upload ")
    assert received == [300_000]


def test_aborted_upload_to_nothing_fails_to_connect():
    port = servers.free_port()
    outcome = asyncio.run(chaos.aborted_upload("127.0.0.1", port, "/upload", clock))
    assert outcome.result == "connect failed (ConnectionRefusedError)"


# --- the command and its record ----------------------------------------------------------------

@pytest.mark.parametrize("env, argv, seconds", [(None, [], 300), ("60", [], 60), ("60", ["--seconds", "90"], 90)])
def test_duration_comes_from_soak_seconds(monkeypatch, env, argv, seconds):
    if env is None:
        monkeypatch.delenv("SOAK_SECONDS", raising=False)
    else:
        monkeypatch.setenv("SOAK_SECONDS", env)
    assert soak.parse_args(argv).seconds == seconds


@pytest.mark.parametrize("value", ["5m", "10", ""])
def test_a_bad_soak_seconds_exits_2_with_one_line(monkeypatch, capsys, value):
    monkeypatch.setenv("SOAK_SECONDS", value)
    with pytest.raises(SystemExit) as exc:
        soak.parse_args([])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("python -m benchmarks.soak: error: SOAK_SECONDS")


def test_missing_wrk_exits_2_naming_the_package(monkeypatch, capsys):
    def missing(commands, log):
        raise prereqs.MissingPrerequisite("missing wrk; install them as root with:\n  apt-get install -y wrk")

    monkeypatch.setattr(prereqs, "ensure_tools", missing)
    monkeypatch.setattr(soak.signal, "signal", lambda signum, handler: None)  # keep pytest's SIGTERM
    assert soak.main(["--seconds", "20"]) == 2
    assert "missing wrk" in capsys.readouterr().err


def test_docroot_holds_the_mix_files(tmp_path):
    root = soak.make_docroot(tmp_path)
    for entry in soak.MIX:
        path = root / entry.path.lstrip("/")
        assert (path / "index.html" if entry.path.endswith("/") else path).is_file(), entry.path
        if entry.range_bytes:
            assert path.stat().st_size == entry.size
    assert (root / "soak" / "big.bin").stat().st_size == soak.BIG_FILE
    assert (root / "soak" / "large.bin").stat().st_size == soak.LARGE_FILE > 1 << 20


def test_record_sums_wrk_runs_and_writes_the_verdict(tmp_path):
    record = soak_record.Record(seconds=30)
    record.wrk_runs = [soak_record.WrkRun(0, 10, 1000, 100.0, {"connect": 0, "read": 1, "write": 0, "timeout": 0},
                                   {200: 990, 206: 10}),
                       soak_record.WrkRun(10, 20, 500, 50.0, {"connect": 0, "read": 0, "write": 0, "timeout": 0},
                                   {200: 499, 503: 1})]
    totals = record.wrk_totals()
    assert (totals.requests, totals.read, totals.statuses) == (1500, 1, Counter({200: 1489, 206: 10, 503: 1}))
    record.samples = [sample(t) for t in (0, 10, 20, 30)]
    record.master_counters = [{"requests": 5 + t, "responses": {"5xx": 5}, "truncated_responses": 0,
                               "client_connections": 50} for t in (0, 10, 20, 30)]
    record.kills, record.polls = [5.0], [(5.5, 0), (6.0, 2)]  # one for wrk, one for the slow reader
    record.clients = [ClientOutcome("slow reader", 5.0, 5.6, "truncated", 200), ClientOutcome("slow reader", 1, 2, "ok")]
    record.proxy_kills, record.proxy_restarts = [ProxyKill(16.0, 2, 4321, 24, 0.7)], 1
    record.skipped_proxy_kills = [76.0]
    reasons = record.reasons()
    assert reasons == ["1 responses outside 2xx/3xx: 503 ×1"]
    lines = soak_record.summary(record)
    assert ("chaos: 1 workers SIGKILLed (0 kills skipped: fewer than two workers up), 1 proxies SIGKILLed "
            "(1 kills skipped: not every proxy ready, or fewer than two)") in lines
    assert "proxy kills: proxy 2 at 16.0 s holding 24 client connections" in lines
    assert "every proxy ready again after a kill: within 0.7–0.7 s" in lines
    assert ("errors explained by the proxy kills: wrk read 0, wrk write 0, soak clients 0; "
            "proxy restarts counted by the master over the run: 1") in lines
    assert ("RSS MiB, master / proxies together / longest-running proxy: 97.7 / 83.0 / 39.1 at 0 s, "
            "97.7 / 83.0 / 39.1 at 30 s") in lines
    soak_record.write_record(record, tmp_path / "soak-x", "title", ["a note"], reasons, "log line", ["2 × WARNING w"])
    md = (tmp_path / "soak-x.md").read_text()
    assert "## Verdict: FAILED\n\n- 1 responses outside 2xx/3xx: 503 ×1" in md and "- a note" in md
    assert "|  30 |" in md and "log line" in md and "- 2 × WARNING w" in md
    head, rule, first = md.split("## Samples\n\n")[1].splitlines()[:3]
    assert [c.strip() for c in head.split("|")[11:17]] == [
        "proxies", "proxy RSS max MiB", "proxy RSS sum MiB", "proxy RSS oldest MiB", "proxy fds sum", "besides pool"]
    assert [c.strip() for c in first.split("|")[11:17]] == ["2", "43.9", "83.0", "39.1", "110", "110"]
    data = json.loads((tmp_path / "soak-x.json").read_text())
    assert data["passed"] is False and data["wrk_runs"][1]["statuses"] == {"200": 499, "503": 1}
    assert len(data["samples"]) == 4
    assert data["samples"][0]["proxies"][1] == {"pid": 21, "rss_kib": 45_000, "fds": 50, "pooled": 0, "started": 1001}
    assert data["proxy_kills"] == [{"at": 16.0, "index": 2, "pid": 4321, "connections": 24, "back_after": 0.7}]
    assert data["clients"] == [{"kind": "slow reader", "started": 5.0, "ended": 5.6, "result": "truncated",
                                "status": 200}]
    assert data["client_counts"] == {"slow reader": {"truncated": 1, "ok": 1}}


def test_log_digest_counts_warnings_and_errors_by_message():
    log = """2026-12-02 06:36:18,991 [19778] [WARNING] gows.workers: worker 127.0.0.1:30621 (pid 20156) was killed by SIGKILL
2026-12-02 06:36:19,001 [19778] [INFO] gows.workers: started worker 127.0.0.1:30621 (pid 20208)
2026-12-02 06:36:28,993 [19778] [WARNING] gows.workers: worker 127.0.0.1:30620 (pid 20208) was killed by SIGKILL
2026-12-02 06:36:30,000 [19778] [ERROR] gows.proxy: boom
"""
    assert soak_record.log_digest(log) == [
        "2 × WARNING gows.workers: worker #.#.#.#:# (pid #) was killed by SIGKILL", "1 × ERROR gows.proxy: boom"]


# --- /proc ---------------------------------------------------------------------------------------

TCP_TABLE = """  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1001 1 0 100 0 0 10 0
   1: 0100007F:D2F0 0100007F:2329 01 00000000:00000000 00:00000000 00000000     0        0 1002 1 0 20 4 30 10 -1
   2: 0100007F:2329 0100007F:D2F0 01 00000000:00000000 00:00000000 00000000     0        0 1003 1 0 20 4 30 10 -1
   3: 0100007F:1F90 0100007F:C350 08 00000000:00000000 00:00000000 00000000     0        0 1004 1 0 20 4 30 10 -1
   4: 0100007F:1F90 0100007F:C351 01 00000000:00000000 00:00000000 00000000     0        0 1005 1 0 20 4 30 10 -1
"""


def test_tcp_table_is_read_by_inode():
    sockets = procstat.parse_tcp_table(TCP_TABLE)
    assert sockets[1001] == (8080, 0, "0A") and sockets[1002] == (54000, 9001, "01")
    assert sockets[1004] == (8080, 50000, "08") and len(sockets) == 5


def test_worker_connections_are_the_established_ones_to_or_from_a_worker_port():
    sockets = procstat.parse_tcp_table(TCP_TABLE)
    master = ["socket:[1001]", "socket:[1002]", "socket:[1004]", "socket:[1005]", "pipe:[7]", "/tmp/x.log"]
    # 1002: master -> worker 9001 (pooled); 1004 is a client in CLOSE_WAIT, 1005 a live client, 1001 the listener.
    assert procstat.worker_connections(master, sockets, {9001, 9002}) == 1
    assert procstat.worker_connections(["socket:[1003]", "socket:[9999]"], sockets, {9001}) == 1  # the worker's side
    assert procstat.worker_connections(master, sockets, set()) == 0


UNIX_TABLE = """Num       RefCount Protocol Flags    Type St Inode Path
0000000000000001: 00000002 00000000 00010000 0001 01 2001 /run/gows-42-abc/worker-9001-1.sock
0000000000000002: 00000003 00000000 00000000 0001 03 2002 /run/gows-42-abc/worker-9001-1.sock
0000000000000003: 00000003 00000000 00000000 0001 03 2003
0000000000000004: 00000003 00000000 00000000 0001 03 2004 /run/systemd/journal/stdout
0000000000000005: 00000002 00000000 00000000 0002 01 2005 /dev/log
0000000000000006: 00000003 00000000 00000000 0001 04 2006
"""


def test_unix_pool_connections_are_the_connected_worker_sockets_and_unnamed_ones():
    pooled = procstat.parse_unix_table(UNIX_TABLE)
    # 2002: a worker's side (named for its socket); 2003: a proxy's side (unnamed); not the
    # listener (2001), another service's connection (2004), a datagram socket (2005) or one
    # disconnecting (2006).
    assert pooled == {2002, 2003}
    sockets = procstat.parse_tcp_table(TCP_TABLE)
    links = ["socket:[2002]", "socket:[2003]", "socket:[2004]", "socket:[1002]"]
    assert procstat.worker_connections(links, sockets, {9001}, pooled) == 3


def test_usage_reads_this_process_and_its_connections():
    import socket as sockets_module

    with sockets_module.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        with sockets_module.create_connection(("127.0.0.1", port)):
            accepted, _ = server.accept()
            with accepted:
                found = procstat.usage([os.getpid(), 2**22 + 1], {port})  # the second is above pid_max
    mine = found[os.getpid()]
    assert mine is not None and mine.rss_kib > 1000 and mine.fds >= 6
    assert mine.pooled == 2  # both ends of the connection to `port` (the listener is not established)
    assert found[2**22 + 1] is None
    assert procstat.parent_of(os.getpid()) == os.getppid()


# --- the proxy processes: found by title, killed, replaced --------------------------------------

def titled(stack: ExitStack, title: str) -> subprocess.Popen:
    """A child of this test whose title in /proc (its first argument) is `title`; ended by pid."""
    proc = subprocess.Popen([title, "60"], executable=shutil.which("sleep"))
    stack.callback(lambda: (proc.kill(), proc.wait()))
    return proc


def test_the_masters_proxies_are_its_children_titled_gows_proxy_n():
    assert procstat.proxy_index("gows: proxy 12") == 12
    assert procstat.proxy_index("gows: worker :9001") is None and procstat.proxy_index("gows: proxy 1x") is None
    with ExitStack() as stack:
        first, worker, second = (titled(stack, t) for t in ("gows: proxy 1", "gows: worker :9001", "gows: proxy 2"))
        assert {first.pid, worker.pid, second.pid} <= set(procstat.children(os.getpid()))
        assert procstat.title(worker.pid) == "gows: worker :9001"
        assert procstat.proxies(os.getpid()) == {1: first.pid, 2: second.pid}
        found = procstat.usage([first.pid, second.pid], frozenset())
        assert procstat.start_time(os.getpid()) <= found[first.pid].started <= found[second.pid].started
    assert procstat.proxies(os.getpid()) == {} and procstat.title(first.pid) == ""


def test_a_proxy_kill_may_take_any_proxy_but_the_longest_running():
    younger, oldest, same_tick = Usage(30, 1, 1, started=500), Usage(31, 1, 1, started=400), Usage(32, 1, 1, started=400)
    assert soak_proxies.victims([younger, same_tick, oldest]) == [30, 32]  # equal starts: the lower pid is older
    assert soak_proxies.victims([younger]) == []


class FakeSoak:
    """The soak as a proxy kill sees it: this test process plays the master, its children titled
    `gows: proxy N` its proxies, and /status.json shows a new one for each that died (`respawn`)."""

    def __init__(self, stack: ExitStack, count: int, respawn: bool = True) -> None:
        self.stack, self.respawn = stack, respawn
        self.procs = {index: titled(stack, f"gows: proxy {index}") for index in range(1, count + 1)}
        self.restarts = dict.fromkeys(self.procs, 0)
        self.not_ready: set[int] = set()
        self.record = soak_record.Record(seconds=60)
        self.rng = random.Random(7)
        self.master_pid = os.getpid()
        self.public_port = servers.free_port()
        self.t0 = time.monotonic()

    def clock(self) -> float:
        return time.monotonic() - self.t0

    def master_alive(self) -> bool:
        return True

    async def fetch_status(self):
        rows = []
        for index, proc in self.procs.items():
            if proc.poll() is not None and self.respawn:
                self.procs[index], self.restarts[index] = titled(self.stack, f"gows: proxy {index}"), self.restarts[index] + 1
            alive = self.procs[index].poll() is None
            rows.append({"index": index, "pid": self.procs[index].pid if alive else None,
                         "ready": alive and index not in self.not_ready, "restarts": self.restarts[index]})
        return {"proxies": rows}


def kill_proxy(soak: FakeSoak) -> None:
    asyncio.run(asyncio.wait_for(soak_proxies.kill(soak, Event(16.0, Action.PROXY_KILL)), 30))


def test_a_proxy_kill_spares_the_longest_running_proxy_and_waits_for_its_replacement():
    with ExitStack() as stack:
        soak = FakeSoak(stack, 2)
        oldest, victim = soak.procs[1], soak.procs[2]
        start_rows = asyncio.run(soak.fetch_status())["proxies"]
        kill_proxy(soak)
        assert victim.wait(10) == -signal.SIGKILL and oldest.poll() is None
        (kill,) = soak.record.proxy_kills
        assert (kill.index, kill.pid, kill.connections) == (2, victim.pid, 0)
        assert kill.back_after is not None and 0 <= kill.back_after < soak_proxies.BACK_TIMEOUT
        assert soak.procs[2].pid != victim.pid and soak.record.problems == []
        # The master's count of restarts matches the soak's kills; one more is a proxy that died of its own.
        now = asyncio.run(soak.fetch_status())["proxies"]
        soak_proxies.check_restarts(soak.record, start_rows, now)
        assert soak.record.proxy_restarts == 1 and soak.record.problems == []
        soak_proxies.check_restarts(soak.record, start_rows, [*now[:1], {**now[1], "restarts": 2}])
        assert soak.record.problems == ["the master restarted proxies 2 times, the soak killed 1"]


def test_no_proxy_kill_while_a_proxy_is_not_ready_or_only_one_runs():
    with ExitStack() as stack:
        alone = FakeSoak(stack, 1)
        kill_proxy(alone)
        assert alone.record.proxy_kills == [] and alone.record.skipped_proxy_kills == [16.0]
        pair = FakeSoak(stack, 2)
        pair.not_ready = {1}
        kill_proxy(pair)
        assert pair.record.proxy_kills == [] and pair.record.skipped_proxy_kills == [16.0]
        assert all(proc.poll() is None for proc in (*alone.procs.values(), *pair.procs.values()))


def test_a_killed_proxy_the_master_does_not_replace_in_time_is_a_problem(monkeypatch):
    monkeypatch.setattr(soak_proxies, "BACK_TIMEOUT", 0.3)
    with ExitStack() as stack:
        soak = FakeSoak(stack, 3, respawn=False)
        kill_proxy(soak)
        (kill,) = soak.record.proxy_kills
        assert kill.index in (2, 3) and kill.back_after is None  # never proxy 1, the longest-running
        assert soak.record.problems == [f"proxy {kill.index} SIGKILLed at {kill.at:.1f} s: not every proxy "
                                        "was ready again within 0.3 s"]
