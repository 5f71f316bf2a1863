"""The soak's own logic: its timetable, the verdict (growth, error accounting), wrk's mixed-load
script and output, and its hostile clients against a scripted loopback server.

No soak runs here (it needs wrk and minutes): tests/data/wrk-soak-mix.txt is the output of a real
wrk run of the mix script.
"""
from __future__ import annotations

import asyncio
import json
import os
from collections import Counter
from pathlib import Path

import pytest

from benchmarks import chaos, loads, prereqs, procstat, servers, soak, soak_record
from benchmarks.schedule import Action, growth_windows, per_minute, schedule, wrk_run_end
from benchmarks.verdict import (ClientOutcome, Sample, Usage, WrkTotals, after_kill, error_reasons,
                                growth_reasons, master_truncations)

pytestmark = pytest.mark.unit

DATA = Path(__file__).parent / "data"


# --- the timetable -------------------------------------------------------------------------------

def times(events, action):
    return [e.at for e in events if e.action is action]


def test_five_minute_schedule_has_the_issues_rates():
    events = schedule(300)
    assert times(events, Action.SAMPLE) == [float(t) for t in range(0, 301, 10)]
    assert times(events, Action.KILL) == [float(t) for t in range(5, 300, 10)]
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
    assert wrk_run_end(14.5, 300) == 25.0  # half a second is too short a run
    assert wrk_run_end(291.0, 300) == 295.0 and wrk_run_end(296.0, 300) == 300.0


def test_growth_compares_the_second_minute_with_the_last_or_single_samples_in_short_runs():
    assert growth_windows(300) == ((60, 110), (250, 300))
    assert growth_windows(170) == ((60, 110), (120, 170))
    assert growth_windows(165) == ((80, 80), (165, 165))
    assert growth_windows(60) == ((30, 30), (60, 60))
    assert growth_windows(25) == ((10, 10), (25, 25))


# --- growth ----------------------------------------------------------------------------------------

def sample(t, master_rss=100_000, master_fds=100, workers=((50_000, 40), (60_000, 30))):
    return Sample(t, Usage(1, master_rss, master_fds), [Usage(10 + i, r, f) for i, (r, f) in enumerate(workers)])


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
    def with_pool(t, pooled):
        return Sample(t, Usage(1, 100_000, 70 + pooled, pooled), [Usage(2, 50_000, 17 + pooled // 2, pooled // 2)])

    samples = [with_pool(t, 30 if t < 200 else 60) for t in range(0, 301, 10)]
    assert growth_reasons(samples, (60, 110), (250, 300)) == []
    # A descriptor the master keeps besides the pool (a CLOSE_WAIT socket, a file) counts.
    samples = [Sample(t, Usage(1, 100_000, 100 if t < 200 else 115, 30), []) for t in range(0, 301, 10)]
    reasons = growth_reasons(samples, (60, 110), (250, 300))
    assert reasons[0] == ("master fds (besides worker connections) grew 21%: 70 at 60–110 s (median), "
                          "85 at 250–300 s (median) (limit 10%)")


def test_workers_are_compared_by_the_largest_one_since_kills_replace_them():
    before = [sample(t, workers=((50_000, 40), (30_000, 20))) for t in (60, 70, 80)]
    # A fresh worker replaced the big one, another one grew past it: the largest grew 20%.
    after = [sample(t, workers=((25_000, 20), (60_000, 40))) for t in (280, 290, 300)]
    (reason,) = growth_reasons(before + after, (60, 110), (250, 300))
    assert reason.startswith("worker RSS (max over workers) grew 20%")


def test_a_master_that_cannot_be_read_at_the_end_fails():
    samples = [sample(t) for t in (60, 70, 80)] + [Sample(t, None, []) for t in (280, 290, 300)]
    reasons = growth_reasons(samples, (60, 110), (250, 300))
    assert "master RSS: nothing to read at the end" in reasons and len(reasons) == 4
    assert "worker fds (besides master connections, max over workers): nothing to read at the end" in reasons


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
    assert reasons == ["1 slow readers cut off with no worker kill in the 2 s before",
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
    reasons = record.reasons()
    assert reasons == ["1 responses outside 2xx/3xx: 503 ×1"]
    soak_record.write_record(record, tmp_path / "soak-x", "title", ["a note"], reasons, "log line", ["2 × WARNING w"])
    md = (tmp_path / "soak-x.md").read_text()
    assert "## Verdict: FAILED\n\n- 1 responses outside 2xx/3xx: 503 ×1" in md and "- a note" in md
    assert "|  30 |" in md and "log line" in md and "- 2 × WARNING w" in md
    data = json.loads((tmp_path / "soak-x.json").read_text())
    assert data["passed"] is False and data["wrk_runs"][1]["statuses"] == {"200": 499, "503": 1}
    assert len(data["samples"]) == 4
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
