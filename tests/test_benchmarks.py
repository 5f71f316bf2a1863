"""The benchmark harness's own logic: parsing real ab/wrk output, ratios, the table, targets, configs.

No load is run here: the fixtures in tests/data are outputs captured from real ab and wrk runs.
"""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import brotli
import pytest
from support import pid_alive, wait_until

from benchmarks import __main__ as cli
from benchmarks import bigloads, compressloads, loads, prereqs, proxies, report, servers, usage
from benchmarks.loads import LoadError, Measurement
from benchmarks.report import Row
from benchmarks.servers import ServerSpec

pytestmark = pytest.mark.unit

DATA = Path(__file__).parent / "data"


class FakeProc:
    """A server process as servers.Running holds it, for runs whose servers are not started."""

    pid = 4242


def fixture(name: str) -> str:
    return (DATA / name).read_text()


def m(rps: float, failed: int = 0, non2xx: int = 0) -> Measurement:
    return Measurement(requests=1000, rps=rps, mean_ms=1.0, transfer_kbs=10.0, failed=failed, non2xx=non2xx,
                       p50_ms=1.0, p99_ms=2.0)


# --- ab ---------------------------------------------------------------------------------------

def test_parse_ab_clean_run():
    got = loads.parse_ab(fixture("ab-nginx-1k.txt"))
    assert got == Measurement(requests=2000, rps=27885.06, mean_ms=7.172, transfer_kbs=34284.46,
                              failed=0, non2xx=0, p50_ms=7.0, p99_ms=10.0)


def test_parse_ab_takes_the_per_request_mean_not_the_across_all_concurrent_one():
    got = loads.parse_ab(fixture("ab-apache-150k.txt"))
    assert got.mean_ms == 18.251
    assert got.rps == 10958.06 and got.transfer_kbs == 1608170.73
    assert (got.p50_ms, got.p99_ms) == (16.0, 37.0)


def test_parse_ab_counts_non_2xx_responses():
    got = loads.parse_ab(fixture("ab-apache-404.txt"))
    assert got.non2xx == 500 and got.failed == 0


def test_parse_ab_counts_failed_requests_from_resets():
    got = loads.parse_ab(fixture("ab-reset.txt"))
    assert got.failed == 400 and got.transfer_kbs == 0.0


def test_parse_ab_rejects_output_without_a_report():
    text = "Benchmarking 127.0.0.1 (be patient)...apr_socket_recv: Connection refused (111)\n"
    with pytest.raises(LoadError, match="Requests per second|Complete requests"):
        loads.parse_ab(text)


# --- wrk --------------------------------------------------------------------------------------

def test_parse_wrk_converts_units_to_ms_and_kib():
    got = loads.parse_wrk(fixture("wrk-nginx-1k.txt"))
    assert got.requests == 237091 and got.rps == 118463.58
    assert got.mean_ms == 0.88
    assert got.p50_ms == pytest.approx(0.678)  # printed as 678.00us
    assert got.p99_ms == 4.6
    assert got.transfer_kbs == pytest.approx(142.80 * 1024)  # 142.80MB
    assert (got.failed, got.non2xx) == (0, 0)


def test_parse_wrk_counts_socket_errors_and_non_2xx():
    got = loads.parse_wrk(fixture("wrk-apache-404.txt"))
    assert got.failed == 9 and got.non2xx == 50901
    reset = loads.parse_wrk(fixture("wrk-reset.txt"))
    assert reset.failed == 21418 + 60085 and reset.requests == 0 and reset.rps == 0.0


def test_parse_wrk_latency_in_seconds():
    text = fixture("wrk-apache-1k.txt").replace("Latency    13.86ms", "Latency     1.50s ").replace(
        "99%   94.20ms", "99%    2.10s")
    got = loads.parse_wrk(text)
    assert got.mean_ms == 1500.0 and got.p99_ms == 2100.0


def test_parse_wrk_takes_percentiles_printed_with_trailing_blanks():
    # wrk pads some values ("99%    1.89s "): a run of the soak's mix printed this one.
    got = loads.parse_wrk(fixture("wrk-soak-mix.txt"))
    assert got.requests == 13209 and got.p99_ms == pytest.approx(1890.0) and got.p50_ms == pytest.approx(27.19)


def test_parse_wrk_rejects_truncated_output():
    text = "\n".join(fixture("wrk-nginx-1k.txt").splitlines()[:4])
    with pytest.raises(LoadError):
        loads.parse_wrk(text)


# --- repeats and per-request times --------------------------------------------------------------

def test_median_run_returns_the_middle_run_itself():
    runs = [m(300), m(100, failed=3), m(200, failed=1)]
    assert loads.median_run(runs) is runs[2]
    assert loads.median_run([m(5)]).rps == 5
    assert loads.median_run([m(100), m(400)]).rps == 100  # lower middle: a real run, never an average
    with pytest.raises(ValueError):
        loads.median_run([])


def test_spread_is_relative_to_the_median():
    assert loads.spread([m(90), m(100), m(130)]) == pytest.approx(0.4)


def test_read_gnuplot_gives_total_times_in_file_order():
    assert loads.read_gnuplot(DATA / "ab-gnuplot.tsv") == [4.0] * 5 + [7.0] * 4 + [10.0] * 4


# --- ratios, table, targets ---------------------------------------------------------------------

APACHE, NGINX = ServerSpec("apache"), ServerSpec("nginx")
GOWS_ON, GOWS_OFF = ServerSpec("gows", 2, True), ServerSpec("gows", 2, False)
WN2, WN10 = ServerSpec("whitenoise", 2), ServerSpec("whitenoise", 10)


def sample_rows() -> list[Row]:
    return [
        Row(APACHE, "1 KiB", "ab", m(10000), [9000, 10000, 12000]),
        Row(NGINX, "1 KiB", "ab", m(20000)),
        Row(NGINX, "1 KiB", "wrk", m(100000)),
        Row(GOWS_ON, "1 KiB", "ab", m(12500)),
        Row(GOWS_ON, "1 KiB", "wrk", m(40000)),
        Row(GOWS_OFF, "1 KiB", "ab", m(3000, failed=2)),
        Row(WN10, "1 KiB", "ab", m(1000)),
        Row(WN2, "1 KiB", "ab", m(4000)),
    ]


def test_ratio_against_same_file_and_tool():
    rows = sample_rows()
    assert report.ratio(rows[3], rows, "apache") == 1.25
    assert report.ratio(rows[4], rows, "nginx") == 0.4
    assert report.ratio(rows[4], rows, "apache") is None  # Apache has no wrk row here


def test_a_reference_measured_at_both_ends_of_the_run_counts_by_the_geometric_mean_of_its_two_runs():
    """The machine's speed drifts during a run: a server measured between a reference's two runs
    is compared with their geometric mean, and the reference's own rows show the drift."""
    again = ServerSpec("apache", again=True)
    rows = [Row(APACHE, "1 KiB", "ab", m(12500)), Row(GOWS_OFF, "1 KiB", "ab", m(10000)),
            Row(again, "1 KiB", "ab", m(8000))]
    assert report.ratio(rows[1], rows, "apache") == pytest.approx(1.0)  # over the square root of 12500 × 8000
    assert report.ratio(rows[0], rows, "apache") == pytest.approx(1.25)
    assert report.ratio(rows[2], rows, "apache") == pytest.approx(0.8)
    (check,) = [c for c in report.check_targets("compare", rows)
                if c["server"] == "gows 2w cache off" and c["baseline"] == "apache"]
    assert check["met"] and check["ratio"] == pytest.approx(1.0)
    assert again.name == "Apache (again)" and again.label == "Apache (again)" and again != APACHE
    # A latency bound is the mean of the reference's p99s.
    fast, slow = lat(1, 4.0), lat(1, 6.0)
    rows = [Row(NGINX, "1 KiB", "wrk", fast), Row(GOWS_ON, "1 KiB", "wrk", lat(1, 5.8)),
            Row(ServerSpec("nginx", again=True), "1 KiB", "wrk", slow)]
    (p99,) = [c for c in report.check_targets("compare", rows) if c["target"] == ISSUE_11_P99]
    assert p99["limit_ms"] == pytest.approx(6.0) and p99["met"]


def test_ratio_against_whitenoise_uses_the_same_worker_count():
    rows = sample_rows()
    assert report.ratio(rows[5], rows, "whitenoise", same_workers=True) == 0.75  # 2 workers, not 10


def test_ratio_ignores_a_baseline_that_failed_to_run():
    rows = [Row(APACHE, "1 KiB", "ab", error="apache2 exited with status 1"), Row(GOWS_ON, "1 KiB", "ab", m(5))]
    assert report.ratio(rows[1], rows, "apache") is None


def test_fmt_ratio():
    assert report.fmt_ratio(1.2345) == "1.23×"
    assert report.fmt_ratio(None) == "–"


def test_table_has_a_ratio_column_per_measured_baseline_and_aligned_lines():
    rows = sample_rows()
    text = report.table(rows)
    lines = text.splitlines()
    assert lines[0].split("|")[1].strip() == "server"
    assert "×Apache" in lines[0] and "×nginx" in lines[0] and "×whitenoise" in lines[0]
    assert len(lines) == 2 + len(rows)
    assert len({len(line) for line in lines}) == 1
    gows_ab = next(line for line in lines if "gows" in line and " on " in line and " ab " in line)
    assert "12,500" in gows_ab and "1.25×" in gows_ab and "0.62×" in gows_ab


def test_table_omits_baselines_that_were_not_measured():
    text = report.table([Row(ServerSpec("fileapp", 2), "1 KiB", "ab", m(5000)),
                         Row(WN2, "1 KiB", "ab", m(4000))])
    assert "×Apache" not in text and "×nginx" not in text
    assert "1.25×" in text


def test_table_shows_errors_in_place_of_figures():
    rows = [Row(APACHE, "1 KiB", "ab", m(100)),
            Row(GOWS_ON, "1 KiB", "ab", error="gows 2w cache on not ready after 64s (status 503):\nlog tail")]
    text = report.table(rows)
    assert "error: gows 2w cache on not ready after 64s (status 503)" in text
    assert "log tail" not in text


def test_targets_met_and_missed():
    checks = report.check_targets("compare", sample_rows())
    by = {(c["target"], c["tool"], c["server"]): c for c in checks}
    ab_on = by[("front cache on, ab 1 KiB, 0 failed", "ab", "gows 2w cache on")]
    assert ab_on["met"] and ab_on["ratio"] == 1.25
    wrk_on = by[("front cache on, wrk keep-alive", "wrk", "gows 2w cache on")]
    assert not wrk_on["met"] and wrk_on["ratio"] == 0.4
    off = by[("front cache off vs whitenoise, same workers", "ab", "gows 2w cache off")]
    assert not off["met"] and off["ratio"] == 0.75
    assert "MISSED" in report.targets_text(checks) and "met" in report.targets_text(checks)


def test_target_without_a_baseline_is_not_measured_rather_than_missed():
    rows = [Row(GOWS_ON, "1 KiB", "wrk", m(2000))]
    (check,) = [c for c in report.check_targets("compare", rows) if c["target"] == "front cache on, wrk keep-alive"]
    assert check["met"] is None and check["ratio"] is None
    assert "no nginx figure" in report.targets_text([check]) and "not measured" in report.targets_text([check])


def test_target_requiring_zero_failed_is_missed_with_failures():
    rows = [Row(APACHE, "1 KiB", "ab", m(1000)), Row(GOWS_ON, "1 KiB", "ab", m(2000, non2xx=1))]
    (check,) = [c for c in report.check_targets("compare", rows) if c["baseline"] == "apache"]
    assert check["ratio"] == 2.0 and check["failed"] == 1 and not check["met"]


def test_metrics_cost_is_against_the_twin_measured_in_turn():
    metrics = ServerSpec("gows-metrics", 2, True)
    # A separate gows row of the same kind is not the baseline: only the twin measured in turn is.
    # The target is the median of the rounds' ratios, not the ratio of the two medians.
    rows = [Row(GOWS_ON, "1 KiB", "wrk", m(50000)),
            Row(metrics, "1 KiB", "wrk", m(78000), paired=m(80000), paired_ratios=[0.5, 0.97, 1.2])]
    (check,) = [c for c in report.check_targets("compare", rows) if c["server"] == "gows+metrics 2w cache on"]
    assert check["ratio"] == 0.97 and check["minimum"] == 0.95 and check["met"]
    rows[-1] = Row(metrics, "1 KiB", "wrk", m(70000), paired=m(80000), paired_ratios=[0.9, 0.94, 1.5, 0.8])
    (check,) = [c for c in report.check_targets("compare", rows) if c["server"] == "gows+metrics 2w cache on"]
    assert check["ratio"] == pytest.approx(0.92) and not check["met"]
    rows[-1] = Row(metrics, "1 KiB", "wrk", m(70000))
    (check,) = [c for c in report.check_targets("compare", rows) if c["server"] == "gows+metrics 2w cache on"]
    assert check["ratio"] is None and check["met"] is None


def test_paired_ratios_are_taken_round_by_round_and_reported():
    assert cli.ratios([m(90), m(120), m(50)], [m(100), m(100), m(0)]) == [0.9, 1.2]
    assert cli.ratios([m(90)], []) == [] and cli.ratios([m(90)]) == []
    # Against two twins: their geometric mean, round by round.
    assert cli.ratios([m(90), m(120)], [m(100), m(200)], [m(100), m(50)]) == [0.9, 1.2]
    metrics = ServerSpec("gows-metrics", 2, True)
    rows = [Row(metrics, "1 KiB", "wrk", m(90), paired=m(100), paired_ratios=[0.9, 1.2, 1.0],
                control_ratios=[1.03, 0.97, 0.99])]
    checks = report.check_targets("compare", rows)
    assert checks[0]["ratio"] == 1.0 and checks[0]["noise_floor"] == 0.99
    text = report.markdown("t", [], rows, checks, None)
    assert "gows+metrics 2w cache on, wrk 1 KiB: 0.900 / 1.200 / 1.000" in text
    assert "identical second twin: 1.030 / 0.970 / 0.990" in text
    assert "1.00× gows-noadmin (target ≥ 0.95×; identical twins: 0.99×) — met" in text


def test_metrics_twins_are_two_gows_without_admin():
    twins = cli.twins_of(ServerSpec("gows-metrics", 10, True))
    assert twins == [ServerSpec("gows-noadmin", 10, True)] * 2 and not twins[0].admin
    assert twins[0].name == "gows (no admin)"
    assert cli.twins_of(GOWS_ON) == [] and cli.twins_of(ServerSpec("apache")) == []


def test_gows_rows_and_the_metrics_row_have_an_admin_listener_the_twins_none(tmp_path):
    assert GOWS_ON.admin and GOWS_OFF.admin and ServerSpec("gows-metrics", 2, True).admin
    assert not ServerSpec("gows-noadmin", 2, True).admin and not NGINX.admin
    conf = servers.gows_config(tmp_path, 4242, ServerSpec("gows-metrics", 2, True), admin_port=4343)
    assert conf["admin"] == "127.0.0.1:4343" and conf["frontCache"] == {"enabled": True}
    assert "admin" not in servers.gows_config(tmp_path, 4242, ServerSpec("gows-noadmin", 2, True))


def test_serve_gives_an_admin_listener_exactly_to_the_servers_that_want_one(tmp_path, monkeypatch):
    written = {}

    def fake_command(spec, root, port, workdir, admin_port=None, tls=None):
        written[spec.kind] = admin_port
        return ["true"], {}

    monkeypatch.setattr(servers, "command", fake_command)
    monkeypatch.setattr(servers, "wait_ready", lambda running, timeout: None)
    monkeypatch.setattr(servers, "settle", lambda running, timeout: True)
    for kind in ("gows", "gows-noadmin", "nginx"):
        with servers.serve(ServerSpec(kind, 2, True), tmp_path, tmp_path / kind) as running:
            assert running.admin_port == written[kind]
    assert isinstance(written["gows"], int) and written["gows"] > 0
    assert written["gows-noadmin"] is None and written["nginx"] is None


def test_twin_kinds_are_not_servers_to_choose(capsys):
    assert "gows-noadmin" not in servers.KINDS and "gows-metrics" in servers.KINDS
    with pytest.raises(SystemExit):
        cli.parse_args(["--only", "gows-noadmin"])
    assert "unknown server gows-noadmin" in capsys.readouterr().err


def test_fileapp_target_is_against_whitenoise():
    rows = [Row(ServerSpec("fileapp", 2), "150 KB", "wrk", m(6000)), Row(WN2, "150 KB", "wrk", m(4000))]
    (check,) = report.check_targets("fileapp", rows)
    assert check["met"] and check["ratio"] == 1.5 and check["minimum"] == 1.2


def test_markdown_and_json_records(tmp_path):
    rows = sample_rows()
    checks = report.check_targets("compare", rows)
    text = report.markdown("title", ["note one"], rows, checks, tmp_path / "x.png")
    assert text.startswith("# title\n") and "- note one" in text and report.table(rows) in text
    assert "## Targets" in text and "](x.png)" in text
    assert "- Apache, 1 KiB: 9,000 / 10,000 / 12,000" in text
    out = tmp_path / "r.json"
    report.write_json(out, {"suite": "compare"}, rows, checks)
    record = json.loads(out.read_text())
    assert record["suite"] == "compare" and len(record["rows"]) == len(rows)
    assert record["rows"][0]["runs_rps"] == [9000, 10000, 12000]
    assert record["rows"][0]["result"]["rps"] == 10000 and record["rows"][0]["workers"] is None
    assert record["targets"] == json.loads(json.dumps(checks))


def test_chart_writes_a_png(tmp_path):
    path = tmp_path / "chart.png"
    report.chart(path, {APACHE: [0.0, 1.0, 5.0, 40.0], GOWS_OFF: [2.0, 3.0, 300.0], WN2: [9.0]}, "t")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_chart_puts_runs_of_any_length_on_one_percentile_axis():
    short, long = [5.0, 1.0, 3.0, 2.0], [float(i % 7) for i in range(20000)]
    for times in (short, long):
        xs, ys = report.percentile_points(times)
        assert xs[-1] == 100.0 and 0 < xs[0] <= 25.0 and len(xs) == len(times)
        assert ys == sorted(times)
    assert report.percentile_points([]) == ([], [])


def test_chart_marks_p50_and_p99_by_nearest_rank():
    times = [float(i) for i in range(100, 0, -1)]  # 1 .. 100 ms, unordered
    assert report.nearest_rank(times, 0.5) == 50.0 and report.nearest_rank(times, 0.99) == 99.0
    assert report.nearest_rank([7.0], 0.99) == 7.0 and report.nearest_rank([], 0.5) is None


def test_chart_axis_is_the_percentile_with_p50_and_p99_drawn(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt
    saved = []
    monkeypatch.setattr(plt.Figure, "savefig", lambda fig, path: saved.append(fig))
    report.chart(tmp_path / "c.png", {APACHE: [float(i) for i in range(5000)], GOWS_OFF: [1.0] * 20000}, "t")
    (ax,) = saved[0].axes
    assert ax.get_xlim() == (0.0, 100.0) and "percentile" in ax.get_xlabel()
    lines = [line for line in ax.get_lines() if line.get_label().startswith(("Apache", "gows"))]
    assert {round(line.get_xdata()[-1]) for line in lines} == {100}
    assert [a.get_text() for a in ax.texts] == ["p50", "p99"]
    marks = sorted((float(line.get_xdata()[0]), float(line.get_ydata()[0])) for line in ax.get_lines()
                   if line.get_marker() in ("o", "D"))
    assert marks == [(50.0, 1.0), (50.0, 2499.0), (99.0, 1.0), (99.0, 4949.0)]


def test_chart_pairs_gows_and_whitenoise_of_the_same_worker_count():
    workers = [2, 10]
    on, off = report.line_style(GOWS_ON, workers), report.line_style(GOWS_OFF, workers)
    wn2, wn10 = report.line_style(WN2, workers), report.line_style(WN10, workers)
    assert on["color"] == off["color"] == wn2["color"] != wn10["color"]
    assert (on["linestyle"], off["linestyle"], wn2["linestyle"]) == ("-", "--", ":")
    # Without gows (the fileapp suite) each peer has its own colour.
    peers = {report.line_style(ServerSpec(k, 2), [])["color"] for k in servers.PEERS}
    assert len(peers) == len(servers.PEERS)


# --- per-proxy counts (issue 11) --------------------------------------------------------------------

def status(*proxies_rows: tuple[int, int, int], **extra) -> dict:
    """A /status.json document with one `proxies` row per (index, requests, restarts)."""
    rows = [{"index": i, "pid": 1000 + i, "requests": n, "client_connections": 3, "restarts": r, "rate": 1.5}
            for i, n, r in proxies_rows]
    return {"version": "x", "workers": [], "proxies": rows, **extra}


def test_status_without_proxies_gives_no_counts():
    assert proxies.parse_status({"version": "x", "workers": [], "proxy": {"client_connections": 4}}) is None
    assert proxies.parse_status(None) is None and proxies.parse_status([1, 2]) is None
    assert proxies.parse_status({"proxies": []}) is None
    # A row the benchmark cannot read makes the whole reading unusable, never a wrong share.
    assert proxies.parse_status({"proxies": [{"index": 1, "requests": "12"}]}) is None
    assert proxies.parse_status({"proxies": [{"index": 1, "requests": True}]}) is None


def test_status_proxies_are_read_in_index_order():
    got = proxies.parse_status(status((2, 70, 1), (1, 30, 0)))
    assert got == [proxies.ProxyCount(1, 1001, 30, 0), proxies.ProxyCount(2, 1002, 70, 1)]
    # restarts and pid are optional
    assert proxies.parse_status({"proxies": [{"index": 1, "requests": 5}]}) == [proxies.ProxyCount(1, None, 5, 0)]


def test_shares_are_differences_by_index_across_a_restart():
    before = proxies.parse_status(status((1, 1000, 0), (2, 900, 0)))
    # Proxy 2 was restarted (new pid, counters kept exact by the master), proxy 3 was added.
    after = proxies.parse_status({"proxies": [{"index": 1, "pid": 1, "requests": 3550, "restarts": 0},
                                              {"index": 2, "pid": 99, "requests": 3350, "restarts": 1},
                                              {"index": 3, "pid": 7, "requests": 100, "restarts": 0}]})
    assert proxies.shares(before, after) == [proxies.ProxyShare(1, 2550, 0), proxies.ProxyShare(2, 2450, 1),
                                             proxies.ProxyShare(3, 100, 0)]
    assert proxies.shares(None, after) is None and proxies.shares(before, None) is None


def test_shares_are_printed_as_percentages_with_restarts():
    even = [proxies.ProxyShare(1, 2550), proxies.ProxyShare(2, 2450)]
    assert proxies.fmt_shares(even) == "51%/49%"
    assert proxies.fmt_shares([proxies.ProxyShare(1, 1), proxies.ProxyShare(2, 3, restarts=2)]) == "25%/75% (2 restarts)"
    assert proxies.fmt_shares(None) == "" and proxies.fmt_shares([]) == ""
    assert proxies.fmt_shares([proxies.ProxyShare(1, 0), proxies.ProxyShare(2, 0)]) == ""
    assert proxies.fmt_counts(even) == "proxy 1 2,550 (51%), proxy 2 2,450 (49%); least 0.98× even"
    assert proxies.fmt_counts([proxies.ProxyShare(1, 10, 1)]) == "proxy 1 10 (100%), 1 restart; least 1.00× even"


def test_evenness_is_the_least_loaded_proxy_over_an_even_share():
    assert proxies.evenness([proxies.ProxyShare(1, 2550), proxies.ProxyShare(2, 2450)]) == pytest.approx(0.98)
    assert proxies.evenness([proxies.ProxyShare(i, n) for i, n in ((1, 500), (2, 2000), (3, 500))]) == 0.5
    assert proxies.evenness([]) is None and proxies.evenness([proxies.ProxyShare(1, 0)]) is None


def test_counted_reads_status_before_and_after_the_load(monkeypatch):
    events: list[str] = []
    readings = iter([status((1, 100, 0), (2, 100, 0)), status((1, 3100, 0), (2, 2100, 0))])

    def read(port):
        events.append(f"read {port}")
        return next(readings)

    def load():
        events.append("load")
        return m(5000)

    monkeypatch.setattr(proxies, "read_status", read)
    got = proxies.counted(4343, load)
    assert events == ["read 4343", "load", "read 4343"]
    assert got.proxies == [proxies.ProxyShare(1, 3000), proxies.ProxyShare(2, 2000)]


def test_counted_without_admin_or_proxies_leaves_the_measurement_alone(monkeypatch):
    reads: list[int] = []
    monkeypatch.setattr(proxies, "read_status", lambda port: reads.append(port) or {"workers": []})
    assert proxies.counted(None, lambda: m(10)).proxies is None and reads == []
    # Today's master: /status.json has no proxies; read once, nothing reported, nothing fails.
    assert proxies.counted(4343, lambda: m(10)).proxies is None and reads == [4343]
    # The status went unreadable after the load: no shares rather than wrong ones.
    readings = iter([status((1, 5, 0)), None])
    monkeypatch.setattr(proxies, "read_status", lambda port: next(readings))
    assert proxies.counted(4343, lambda: m(10)).proxies is None


def test_read_status_fetches_the_admin_json_and_tolerates_no_listener():
    import http.server
    import threading

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = json.dumps(status((1, 7, 0)) if self.path == "/status.json" else {}).encode()
            self.send_response(200 if self.path == "/status.json" else 404)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    with http.server.HTTPServer(("127.0.0.1", 0), Handler) as server:
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            got = proxies.read_status(server.server_address[1])
        finally:
            server.shutdown()
            thread.join()
    assert proxies.parse_status(got) == [proxies.ProxyCount(1, 1001, 7, 0)]
    assert proxies.read_status(servers.free_port(), timeout=2) is None  # nothing listening


def test_table_has_a_per_proxy_column_only_when_some_row_was_counted():
    rows = sample_rows()
    assert "per proxy" not in report.table(rows)
    rows[4].result.proxies = [proxies.ProxyShare(1, 20000), proxies.ProxyShare(2, 20000)]  # gows wrk
    rows[3].result.proxies = [proxies.ProxyShare(1, 0), proxies.ProxyShare(2, 0)]  # nothing counted: blank
    lines = report.table(rows).splitlines()
    assert lines[0].rstrip(" |").endswith("per proxy") and len({len(line) for line in lines}) == 1
    gows_wrk = next(line for line in lines if "gows" in line and " on " in line and " wrk " in line)
    assert gows_wrk.rstrip(" |").endswith("50%/50%")
    gows_ab = next(line for line in lines if "gows" in line and " on " in line and " ab " in line)
    assert gows_ab.split("|")[-2].strip() == ""
    text = report.markdown("t", [], rows, [], None)
    assert "## Requests per proxy process" in text
    assert "- gows 2w cache on, wrk 1 KiB: proxy 1 20,000 (50%), proxy 2 20,000 (50%); least 1.00× even" in text
    record = report.row_record(rows[4])
    assert record["result"]["proxies"] == [{"index": 1, "requests": 20000, "restarts": 0},
                                           {"index": 2, "requests": 20000, "restarts": 0}]


# --- CPU steal: how much of the machine a row's run had ------------------------------------------

def test_cpu_times_reads_steal_and_the_total_from_proc_stat(tmp_path):
    stat = tmp_path / "stat"
    stat.write_text("cpu  100 5 50 800 10 0 5 30 7 0\ncpu0 50 2 25 400 5 0 2 15 3 0\n")
    assert loads.cpu_times(str(stat)) == (30, 1000)  # guest time (7) is inside user already
    assert loads.cpu_times(str(tmp_path / "none")) is None
    stat.write_text("intr 1 2 3\n")
    assert loads.cpu_times(str(stat)) is None
    assert loads.stolen((30, 1000), (80, 2000)) == 0.05
    assert loads.stolen(None, (80, 2000)) is None and loads.stolen((30, 1000), (30, 1000)) is None


def test_every_ab_and_wrk_run_notes_the_cpu_steal_while_it_ran(monkeypatch):
    readings = iter([(30, 1000), (80, 2000), (80, 2000), (80, 3000)])
    monkeypatch.setattr(loads, "cpu_times", lambda: next(readings))
    outputs = {"wrk": fixture("wrk-nginx-1k.txt"), "ab": fixture("ab-nginx-1k.txt")}
    monkeypatch.setattr(loads, "_run", lambda argv, timeout: outputs[argv[0]])
    assert loads.wrk("http://127.0.0.1:1/", 100, 10).steal == 0.05
    assert loads.ab("http://127.0.0.1:1/", 2000, 500).steal == 0.0


def gows_ab_check(rows: list[Row]) -> dict:
    """The check of gows (2 workers, front cache off) on ab 1 KiB against Apache."""
    (check,) = [c for c in report.check_targets("compare", rows)
                if c["server"] == "gows 2w cache off" and c["file"] == "1 KiB" and c["tool"] == "ab"
                and c["baseline"] == "apache"]
    return check


def test_steal_has_a_column_and_a_check_names_it_once_it_reaches_a_percent():
    rows = issue_12_rows()
    assert "steal" not in report.table(rows).splitlines()[0]  # not read: no column
    for row in rows:
        if row.result is not None:
            row.result.steal = 0.004
    lines = report.table(rows).splitlines()
    assert "| steal |" in lines[0] and len({len(line) for line in lines}) == 1
    assert all("0.4%" in line for line in lines[2:] if "error" not in line)
    checks = report.check_targets("compare", rows)
    assert checks and not any("steal" in report.check_line(c) for c in checks)  # below 1%: not named
    gows = next(r for r in rows if r.spec == GOWS_OFF and r.file == "1 KiB" and r.tool == "ab")
    gows.result.steal = 0.062
    check = gows_ab_check(rows)
    assert (check["steal"], check["baseline_steal"]) == (0.062, 0.004)
    assert "; CPU steal 6.2%, apache 0.4%) — " in report.check_line(check)
    assert report.row_record(gows)["result"]["steal"] == 0.062


# --- CPU time a request: what each server and its load tool spend --------------------------------

def test_every_ab_and_wrk_run_notes_its_own_cpu_time_a_request(monkeypatch):
    readings = iter([10.0, 12.5, 12.5, 12.5])  # wrk used 2.5 s; ab (say, killed early) none
    monkeypatch.setattr(loads, "children_cpu", lambda: next(readings))
    outputs = {"wrk": fixture("wrk-nginx-1k.txt"), "ab": fixture("ab-nginx-1k.txt")}
    monkeypatch.setattr(loads, "_run", lambda argv, timeout: outputs[argv[0]])
    m = loads.wrk("http://127.0.0.1:1/", 100, 10)
    assert m.client_cpu_us == pytest.approx(2.5e6 / m.requests)
    assert loads.ab("http://127.0.0.1:1/", 2000, 500).client_cpu_us == 0.0
    assert loads.per_request(1.0, 0) is None  # no request completed: nothing to spread it over


def test_a_load_is_charged_the_cpu_time_of_every_process_of_its_server(monkeypatch):
    seen = []
    readings = iter([(5, 40.0), (5, 43.0)])

    def reading(pgid):
        seen.append(pgid)
        return next(readings)

    monkeypatch.setattr(usage, "group_usage", reading)
    running = servers.Running(ServerSpec("apache"), 4242, FakeProc(), Path("log"))  # type: ignore[arg-type]
    m = usage.charged(running, lambda: loads.parse_wrk(fixture("wrk-nginx-1k.txt")))
    assert seen == [4242, 4242] and m.server_cpu_us == pytest.approx(3e6 / m.requests)


def group_after(script: str) -> tuple[int, float]:
    """usage.group_usage of a process group led by a Python `script`, once the script has printed
    its line (the state to look at); the leader then waits for its stdin to close."""
    leader = subprocess.Popen([sys.executable, "-c", script + "print('ready', flush=True)\nsys.stdin.read()\n"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert leader.stdout.readline() == "ready\n"
        return usage.group_usage(leader.pid)
    finally:
        leader.stdin.close()
        leader.wait(10)


def test_a_server_group_counts_the_processes_it_has_reaped():
    """A master that replaces its children (Apache's, gows') has their CPU time in its own
    cutime once it has waited for them: the group's total keeps it."""
    count, seconds = group_after(
        "import subprocess, sys, time\n"
        "subprocess.run([sys.executable, '-c', 'import time\\nwhile time.process_time() < 0.3: pass'])\n")
    assert count == 1 and seconds >= 0.3  # the child is gone; its 0.3 s are not


def test_a_server_group_counts_a_child_that_has_ended_but_is_not_reaped_yet():
    """Between a child's exit and its master's wait (Apache's parent, stopping a spare child
    after a load), its CPU time is in no live process nor in the master's cutime yet: the
    zombie's own /proc entry still holds it, and the group's total keeps it."""
    count, seconds = group_after(
        "import os, sys, time\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    while time.process_time() < 0.3: pass\n"
        "    os._exit(0)\n"
        "while open(f'/proc/{pid}/stat').read().rsplit(')', 1)[1].split()[0] != 'Z':\n"
        "    time.sleep(0.01)\n")
    assert count == 1 and seconds >= 0.3  # one live process; the ended child's 0.3 s still count


def test_cpu_time_a_request_has_columns_and_a_check_names_it_beside_the_baselines():
    rows = issue_12_rows()
    assert "CPU µs" not in report.table(rows).splitlines()[0]  # not measured: no columns
    for row in rows:
        if row.result is not None:
            row.result.server_cpu_us, row.result.client_cpu_us = 80.0, 30.0
    gows = next(r for r in rows if r.spec == GOWS_OFF and r.file == "1 KiB" and r.tool == "ab")
    gows.result.server_cpu_us, gows.result.client_cpu_us = 1234.4, 20.0
    lines = report.table(rows).splitlines()
    assert "| server CPU µs | client CPU µs |" in lines[0] and len({len(line) for line in lines}) == 1
    assert any(re.search(r"\| +1,234 \| +20 \|", line) for line in lines)
    check = gows_ab_check(rows)
    assert (check["server_cpu_us"], check["baseline_server_cpu_us"]) == (1234.4, 80.0)
    assert "; CPU a request: server 1,234 µs (apache 80), client 20 µs (apache 30)) — " in report.check_line(check)
    assert report.row_record(gows)["result"]["server_cpu_us"] == 1234.4


# --- issue 11 targets ----------------------------------------------------------------------------

ISSUE_11 = "issue 11: proxy processes at least as fast as nginx, front cache on, 0 failed"
ISSUE_11_P99 = "issue 11: p99 at most nginx's p99 + 1 ms, wrk -c100"


def lat(rps: float, p99: float, failed: int = 0) -> Measurement:
    return Measurement(requests=1000, rps=rps, mean_ms=1.0, transfer_kbs=1.0, failed=failed, non2xx=0,
                       p50_ms=0.5, p99_ms=p99)


def issue_11_rows() -> list[Row]:
    gows10 = ServerSpec("gows", 10, True)
    return [
        Row(NGINX, "1 KiB", "ab", m(34000)), Row(NGINX, "150 KB", "ab", m(18000)),
        Row(NGINX, "1 KiB", "wrk", lat(140000, 4.5)), Row(NGINX, "1 KiB", "wrk -c5000", lat(96000, 129.0)),
        Row(GOWS_ON, "1 KiB", "ab", m(38000)), Row(GOWS_ON, "150 KB", "ab", m(18000)),
        Row(GOWS_ON, "1 KiB", "wrk", lat(150000, 5.4)), Row(GOWS_ON, "1 KiB", "wrk -c5000", lat(100000, 90.0, failed=3)),
        Row(gows10, "1 KiB", "wrk", lat(120000, 5.6)),
        Row(GOWS_OFF, "1 KiB", "wrk -c5000", lat(10000, 900.0)),  # cache off: no issue-11 target
    ]


def test_issue_11_speed_targets_cover_every_load_and_require_zero_failed():
    checks = [c for c in report.check_targets("compare", issue_11_rows()) if c["target"] == ISSUE_11]
    got = {(c["server"], c["tool"], c["file"]): (round(c["ratio"], 3), c["failed"], c["met"]) for c in checks}
    assert got == {
        ("gows 2w cache on", "ab", "1 KiB"): (1.118, 0, True),
        ("gows 2w cache on", "ab", "150 KB"): (1.0, 0, True),  # "at least as fast": 1.0× is met
        ("gows 2w cache on", "wrk", "1 KiB"): (1.071, 0, True),
        ("gows 2w cache on", "wrk -c5000", "1 KiB"): (1.042, 3, False),  # faster, but 3 socket errors
        ("gows 10w cache on", "wrk", "1 KiB"): (0.857, 0, False),
    }


def test_issue_11_p99_target_is_nginx_p99_plus_one_ms_on_wrk_c100():
    checks = [c for c in report.check_targets("compare", issue_11_rows()) if c["target"] == ISSUE_11_P99]
    by = {c["server"]: c for c in checks}
    assert set(by) == {"gows 2w cache on", "gows 10w cache on"}  # wrk -c100 only, cache on only
    assert by["gows 2w cache on"]["met"] and by["gows 2w cache on"]["limit_ms"] == pytest.approx(5.5)
    assert by["gows 10w cache on"]["met"] is False and by["gows 10w cache on"]["p99_ms"] == 5.6
    text = report.targets_text(checks)
    assert "gows 2w cache on, wrk 1 KiB: p99 5.4 ms, nginx 4.5 ms (target ≤ nginx's + 1 ms) — met" in text
    assert "gows 10w cache on, wrk 1 KiB: p99 5.6 ms, nginx 4.5 ms (target ≤ nginx's + 1 ms) — MISSED" in text
    # Without an nginx figure: not measured, not missed.
    (alone,) = [c for c in report.check_targets("compare", [Row(GOWS_ON, "1 KiB", "wrk", lat(1, 0.1))])
                if c["target"] == ISSUE_11_P99]
    assert alone["met"] is None and "no nginx figure" in report.targets_text([alone])


def test_targets_are_printed_under_their_target_with_the_per_proxy_spread():
    rows = issue_11_rows()
    rows[6].result.proxies = [proxies.ProxyShare(1, 760000), proxies.ProxyShare(2, 740000)]
    checks = report.check_targets("compare", rows)
    lines = report.targets_text(checks).splitlines()
    assert lines[lines.index(f"- {ISSUE_11}:") + 1].startswith("  - gows 2w cache on, ab 1 KiB: 1.12× nginx")
    assert ("  - gows 2w cache on, wrk 1 KiB: 1.07× nginx (target ≥ 1.0×; per proxy 51%/49%) — met (7.1% above the "
            "target)" in lines)
    assert ("  - gows 2w cache on, wrk -c5000 1 KiB: 1.04× nginx (target ≥ 1.0×, 3 failed/non-2xx) — MISSED: 3 "
            "failed/non-2xx (4.2% above the target)" in lines)
    (wrk,) = [c for c in checks if c["target"] == ISSUE_11 and c["tool"] == "wrk" and c["server"].startswith("gows 2w")]
    assert wrk["per_proxy"] == "51%/49%" and wrk["evenness"] == pytest.approx(740000 / 750000)
    assert all("per_proxy" not in c for c in checks if c["tool"] != "wrk" or not c["server"].startswith("gows 2w"))


def test_wrk_runs_with_the_threads_and_connections_asked(monkeypatch):
    argvs: list[list[str]] = []
    monkeypatch.setattr(loads, "_run", lambda argv, timeout: argvs.append(argv) or fixture("wrk-nginx-1k.txt"))
    loads.wrk("http://127.0.0.1:1/1k.txt", 5000, 10, threads=2)
    loads.wrk("http://127.0.0.1:1/1k.txt", 100, 10)
    assert argvs[0][:5] == ["wrk", "-t2", "-c5000", "-d10s", "--latency"]
    assert argvs[1][:4] == ["wrk", "-t1", "-c100", "-d10s"]


def test_open_file_limit_is_raised_towards_the_hard_limit_and_returned(monkeypatch):
    import resource

    limits = {"now": (1024, 20000)}
    monkeypatch.setattr(prereqs.resource, "getrlimit", lambda which: limits["now"])
    monkeypatch.setattr(prereqs.resource, "setrlimit", lambda which, value: limits.update(now=value))
    assert prereqs.raise_open_file_limit(65536) == 20000 and limits["now"] == (20000, 20000)
    limits["now"] = (30000, resource.RLIM_INFINITY)
    assert prereqs.raise_open_file_limit(65536) == 65536 and limits["now"] == (65536, resource.RLIM_INFINITY)
    limits["now"] = (100000, 200000)
    assert prereqs.raise_open_file_limit(65536) == 100000  # never lowered
    limits["now"] = (resource.RLIM_INFINITY, resource.RLIM_INFINITY)
    assert prereqs.raise_open_file_limit(65536) > 10**9 and limits["now"][0] == resource.RLIM_INFINITY


# --- plans and arguments ------------------------------------------------------------------------

def test_default_plan_is_the_issue_4_comparison():
    plan = cli.build_plan(cli.parse_args([]))
    labels = [s.label for s in plan.specs]
    assert labels[:2] == ["Apache", "nginx"]
    for n in (2, 10, 100):
        assert {f"gows {n}w cache on", f"gows {n}w cache off", f"gunicorn+whitenoise {n}w"} <= set(labels)
    assert (plan.ab_requests, plan.ab_concurrency, plan.repeat) == (5000, 500, 3)
    assert (plan.wrk_connections, plan.wrk_seconds, plan.wrk_files) == (100, 10, ["1 KiB"])
    assert (plan.many_threads, plan.many_clients, plan.many_kinds) == (2, 5000, ["apache", "nginx", "gows"])
    assert labels[-2:] == ["Apache (again)", "nginx (again)"]  # the references at both ends


def test_references_are_measured_again_only_beside_another_server():
    def labels(*argv: str) -> list[str]:
        return [s.label for s in cli.build_plan(cli.parse_args(list(argv))).specs]

    assert labels("--only", "apache,gows", "--workers", "2") == [
        "Apache", "gows 2w cache on", "gows 2w cache off", "Apache (again)"]
    assert labels("--only", "apache,nginx") == ["Apache", "nginx"]
    assert labels("--only", "gows", "--workers", "2") == ["gows 2w cache on", "gows 2w cache off"]
    assert "Apache (again)" not in labels("fileapp")


def test_many_clients_load_is_planned_for_apache_nginx_and_gows_only():
    plan = cli.build_plan(cli.parse_args([]))
    many = {s.label for s in plan.specs if (loads.MANY_TOOL, "1 KiB") in cli.planned_loads(s, plan)}
    assert many == {"Apache", "nginx", "Apache (again)", "nginx (again)"} | {
        f"gows {n}w cache {c}" for n in (2, 10, 100) for c in ("on", "off")}
    assert cli.planned_loads(NGINX, plan) == [("ab", "1 KiB"), ("ab", "150 KB"), ("wrk", "1 KiB"),
                                              ("wrk -c8", "10 MiB"), ("wrk -c8", "100 MiB"),
                                              ("wrk files", "4096 × 64 KiB"), ("ab TLS1.2", "1 KiB"),
                                              ("wrk TLS", "1 KiB"), ("wrk -c5000", "1 KiB")]
    fileapp = cli.build_plan(cli.parse_args(["fileapp"]))
    assert fileapp.many_kinds == [] and all(t != loads.MANY_TOOL for s in fileapp.specs
                                            for t, _ in cli.planned_loads(s, fileapp))


def test_https_loads_are_planned_for_nginx_and_gows_with_its_front_cache_on():
    plan = cli.build_plan(cli.parse_args([]))
    tls = {s.label for s in plan.specs if ("ab TLS1.2", "1 KiB") in cli.planned_loads(s, plan)}
    assert tls == {"nginx", "nginx (again)"} | {f"gows {n}w cache on" for n in (2, 10, 100)}
    assert all(not cli.wants_tls(s, cli.build_plan(cli.parse_args(["fileapp"]))) for s in plan.specs)


def test_nginx_and_gows_serve_https_with_the_same_certificate_and_profile(tmp_path):
    tls = servers.Tls(8443, tmp_path / "c.crt", tmp_path / "c.key")
    conf = servers.nginx_config(tmp_path, 8080, tmp_path, tls)
    assert "listen 127.0.0.1:8080;" in conf and "listen 127.0.0.1:8443 ssl;" in conf
    assert f"ssl_certificate {tmp_path / 'c.crt'};" in conf and "ssl_protocols TLSv1.2 TLSv1.3;" in conf
    assert "ssl_prefer_server_ciphers off;" in conf and "ECDHE-ECDSA-AES128-GCM-SHA256" in conf
    assert "ssl" not in servers.nginx_config(tmp_path, 8080, tmp_path)
    gows = servers.gows_config(tmp_path, 8080, servers.ServerSpec("gows", 2, True), tls=tls)
    assert gows["tls"] == {"certificate": str(tls.certificate), "key": str(tls.key), "listen": "127.0.0.1:8443"}


def test_fileapp_plan_is_the_issue_2_comparison():
    plan = cli.build_plan(cli.parse_args(["fileapp", "--requests", "30000"]))
    assert [(s.kind, s.workers) for s in plan.specs] == [("fileapp", 2), ("fileapp-worker", 2), ("whitenoise", 2),
                                                         ("whitenoise-worker", 2), ("werkzeug", 2)]
    assert plan.ab_requests == 30000 and plan.wrk_files == ["1 KiB", "150 KB"]


def test_quick_and_only_shrink_the_plan():
    plan = cli.build_plan(cli.parse_args(["--quick", "--only", "gows,apache"]))
    assert [s.label for s in plan.specs] == ["Apache", "gows 2w cache on", "gows 2w cache off", "Apache (again)"]
    assert plan.repeat == 1 and plan.wrk_seconds == 2 and plan.ab_requests < 5000
    assert plan.many_clients == 5000  # the smoke run tries the many-clients load too, for 2 s


@pytest.mark.parametrize("argv", [["--requests", "0"], ["--only", "iis"], ["--workers", "2,x"], ["bogus"]])
def test_bad_arguments_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.parse_args(argv)
    assert exc.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_only_matching_nothing_says_so(capsys):
    assert cli.main(["fileapp", "--only", "nginx"]) == 2
    assert "matches no server" in capsys.readouterr().err


# --- prerequisites and server configs ------------------------------------------------------------

def test_missing_tools_without_root_name_the_packages(monkeypatch):
    monkeypatch.setattr(prereqs, "which", lambda cmd: None if cmd in ("wrk", "ab") else f"/usr/bin/{cmd}")
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(prereqs.MissingPrerequisite) as exc:
        prereqs.ensure_tools(["ab", "wrk", "nginx"])
    assert "apt-get install -y --no-install-recommends apache2-utils wrk" in str(exc.value)


def test_missing_tools_as_root_are_installed_with_apt_get(monkeypatch):
    installed: set[str] = set()
    calls: list[list[str]] = []

    def run(args, **kwargs):
        calls.append(args)
        if args[1] == "install":
            installed.update({"ab", "wrk"})
        return subprocess.CompletedProcess(args, 0)

    present = {"nginx", "apt-get"}
    monkeypatch.setattr(prereqs, "which", lambda cmd: f"/usr/bin/{cmd}" if cmd in installed | present else None)
    monkeypatch.setattr(prereqs.subprocess, "run", run)
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    paths = prereqs.ensure_tools(["ab", "wrk", "nginx"], log=lambda message: None)
    assert paths == {"ab": "/usr/bin/ab", "wrk": "/usr/bin/wrk", "nginx": "/usr/bin/nginx"}
    assert [c[:2] for c in calls] == [["apt-get", "update"], ["apt-get", "install"]]
    assert calls[1][-2:] == ["apache2-utils", "wrk"] and "--no-install-recommends" in calls[1]


def test_failed_apt_get_says_what_to_install(monkeypatch):
    monkeypatch.setattr(prereqs, "which", lambda cmd: None if cmd == "wrk" else f"/usr/bin/{cmd}")
    monkeypatch.setattr(prereqs.subprocess, "run", lambda args, **kw: subprocess.CompletedProcess(args, 100))
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    with pytest.raises(prereqs.MissingPrerequisite, match="install by hand:\n  apt-get install .* wrk"):
        prereqs.ensure_tools(["wrk"], log=lambda message: None)


def test_missing_python_peer_names_the_pip_package(monkeypatch):
    monkeypatch.setattr(prereqs.importlib.util, "find_spec", lambda name: None if name == "whitenoise" else object())
    with pytest.raises(prereqs.MissingPrerequisite, match="pip install whitenoise"):
        prereqs.ensure_python_modules(["gunicorn", "whitenoise"])


def test_docroot_files_are_deterministic_and_readable(tmp_path):
    root = prereqs.make_docroot(tmp_path)
    for name, size, _ in prereqs.FILES:
        data = (root / name).read_bytes()
        assert len(data) == size and data == prereqs.deterministic_text(size, name)
        assert (root / name).stat().st_mode & 0o777 == 0o644
    assert prereqs.deterministic_text(64, "a") != prereqs.deterministic_text(64, "b")


def test_apache_config_keeps_debian_defaults_but_listens_only_on_our_port(tmp_path):
    stock = ("Timeout 300\nIncludeOptional mods-enabled/*.load\nInclude ports.conf\n"
             "IncludeOptional conf-enabled/*.conf\nIncludeOptional sites-enabled/*.conf\n")
    conf = servers.apache_config(stock, tmp_path, 4242)
    assert "IncludeOptional mods-enabled/*.load" in conf and "IncludeOptional conf-enabled/*.conf" in conf
    assert "ports.conf" not in conf and "sites-enabled" not in conf
    assert "Listen 127.0.0.1:4242" in conf and f"DocumentRoot {tmp_path}" in conf


def test_apache_env_uses_debian_user_and_moves_runtime_dirs(tmp_path):
    env = servers.apache_env("export APACHE_RUN_USER=www-data\nexport APACHE_RUN_GROUP=www-data\n"
                             "export APACHE_LOG_DIR=/var/log/apache2$SUFFIX\n", tmp_path)
    assert env["APACHE_RUN_USER"] == "www-data" and env["APACHE_RUN_GROUP"] == "www-data"
    assert env["APACHE_LOG_DIR"] == str(tmp_path) and env["APACHE_PID_FILE"].startswith(str(tmp_path))


def test_nginx_config(tmp_path):
    conf = servers.nginx_config(tmp_path / "www", 4242, tmp_path)
    for line in ("worker_processes auto;", "sendfile on;", "listen 127.0.0.1:4242;", f"root {tmp_path}/www;",
                 f"pid {tmp_path}/nginx.pid;"):
        assert line in conf
    # Room for wrk's 5000 clients in one worker (Debian's 768 would refuse most of them).
    connections = int(conf.split("worker_connections ")[1].split(";")[0])
    rlimit = int(conf.split("worker_rlimit_nofile ")[1].split(";")[0])
    assert connections >= loads.MANY_CLIENTS + 100 and rlimit >= 2 * connections


def test_gows_config_follows_the_contract(tmp_path):
    conf = servers.gows_config(tmp_path, 4242, ServerSpec("gows", 10, False))
    assert conf["baseDirectory"] == str(tmp_path) and conf["listen"] == "127.0.0.1:4242"
    assert conf["workerCount"] == 10 and conf["frontCache"] == {"enabled": False}
    base = conf["workerBasePort"]
    assert 20000 <= base and base + 10 <= 32000  # below the kernel's ephemeral range


def test_peer_command_runs_gunicorn_gthread(tmp_path):
    argv, env = servers.command(ServerSpec("whitenoise", 2), tmp_path, 4242, tmp_path)
    assert argv[1:6] == ["-m", "gunicorn", "-k", "gthread", "-w"] and argv[6] == "2"
    assert argv[-1] == f"benchmarks.apps:whitenoise_app({str(tmp_path)!r})"
    assert str(servers.REPO) in env["PYTHONPATH"]
    argv, _ = servers.command(ServerSpec("fileapp-worker", 2), tmp_path, 4242, tmp_path)
    assert argv[4] == "fileapp.worker.GowsThreadWorker" and "fileapp_app(" in argv[-1]


def test_peer_apps_serve_the_docroot(tmp_path):
    from benchmarks import apps
    from werkzeug.test import Client

    root = prereqs.make_docroot(tmp_path)
    for factory in (apps.whitenoise_app, apps.werkzeug_app):
        client = Client(factory(str(root)))
        response = client.get("/1k.txt")
        assert response.status_code == 200 and response.data == (root / "1k.txt").read_bytes()
        assert client.get("/nope.txt").status_code == 404


def test_stop_kills_a_server_that_ignores_term_and_its_orphans():
    proc = subprocess.Popen(["bash", "-c", "trap '' TERM; sleep 60 & echo $!; wait"], stdout=subprocess.PIPE,
                            text=True, start_new_session=True)
    child = int(proc.stdout.readline())
    servers.stop(proc, grace=0.5)
    assert proc.returncode == -signal.SIGKILL
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and pid_alive(child):
        time.sleep(0.05)
    assert not pid_alive(child)


def test_free_port_range_is_free():
    base = servers.free_port_range(5)
    for port in range(base, base + 5):
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))


def test_group_usage_counts_the_processes_of_a_server_group():
    proc = subprocess.Popen(["bash", "-c", "sleep 30 & sleep 30 & echo ready; wait"], stdout=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        assert proc.stdout.readline() == "ready\n"
        count, cpu = usage.group_usage(proc.pid)
        assert count == 3 and cpu >= 0.0
    finally:
        servers.stop(proc, grace=2)
    # The orphaned sleeps got SIGKILL from stop(); they vanish once the kernel has delivered it.
    wait_until(lambda: usage.group_usage(proc.pid)[0] == 0, timeout=5, message="group emptied")


# --- the run as a whole, with servers and load tools replaced by recorded outputs -----------------

def test_run_measures_each_server_and_writes_the_report(tmp_path, monkeypatch, capsys):
    from contextlib import contextmanager

    started: list[str] = []
    ab_calls: list[tuple[str, int, int]] = []

    @contextmanager
    def fake_serve(spec, root, workdir, certificate=None):
        if spec.kind == "nginx":
            raise servers.ServerError("nginx exited with status 1:\nbind() failed")
        started.append(spec.label)
        workdir.mkdir()
        yield servers.Running(spec, 4242, FakeProc(), workdir / "server.log", idle=True)  # type: ignore[arg-type]

    def fake_ab(url, requests, concurrency, gnuplot=None, protocol=None):
        ab_calls.append((url, requests, concurrency))
        if gnuplot is not None:
            gnuplot.write_text(fixture("ab-gnuplot.tsv"))
        result = loads.parse_ab(fixture("ab-nginx-1k.txt"))
        result.rps += len(ab_calls)  # distinct runs, so the median is a choice
        return result

    monkeypatch.setattr(cli, "serve", fake_serve)
    monkeypatch.setattr(loads, "ab", fake_ab)
    cpu_seconds = iter(range(10_000))  # each reading a second more: every load costs the server 1 s
    monkeypatch.setattr(usage, "group_usage", lambda pgid: (3, float(next(cpu_seconds))))
    wrk_calls: list[tuple[str, int, int, int, int | None, str | None]] = []

    def fake_wrk(url, connections, seconds, threads=1, timeout=None, script=None):
        wrk_calls.append((url.split("/", 3)[-1], threads, connections, seconds, timeout,
                          script and script.read_text().count(".bin")))
        return loads.parse_wrk(fixture("wrk-nginx-1k.txt"))

    written: list[Path] = []
    monkeypatch.setattr(loads, "wrk", fake_wrk)
    monkeypatch.setattr(prereqs, "add_big_files", lambda root, files: written.append(root))
    monkeypatch.setattr(prereqs, "ensure_tools", lambda commands, log: {})
    monkeypatch.setattr(cli, "RESULTS", tmp_path)

    status = cli.main(["--only", "apache,nginx", "--requests", "300", "--repeat", "3"])
    assert status == 1  # nginx failed to start
    assert started == ["Apache"]
    # -c100, the downloads (10 s timeout), the 4096 files (in the Lua script), the many-clients load last.
    assert wrk_calls == [("1k.txt", 1, 100, 10, None, None), ("10m.bin", 1, 8, 10, 10, None),
                         ("100m.bin", 1, 8, 10, 10, None), ("", 1, 100, 10, None, 4096),
                         ("1k.txt", 2, 5000, 10, None, None)]
    assert len(written) == 1  # the big files are written once, into the docroot every server shares
    warm_up, measured = ab_calls[:2], ab_calls[2:]
    assert [c[2] for c in warm_up] == [50, 50]  # one short warm-up per file, not counted
    assert len(measured) == 6 and all(c[1:] == (300, 500) for c in measured)  # 3 runs x 2 files
    out = capsys.readouterr().out
    assert "| Apache" in out and "error: nginx exited with status 1:" in out
    (md,) = tmp_path.glob("compare-*.md")
    assert "error: nginx exited" in md.read_text() and md.with_suffix(".png").exists()
    record = json.loads(md.with_suffix(".json").read_text())
    apache_ab = [r for r in record["rows"] if r["kind"] == "apache" and r["tool"] == "ab"]
    assert len(apache_ab) == 2 and all(sorted(r["runs_rps"])[1] == r["result"]["rps"] for r in apache_ab)
    # Every load is charged the server's CPU time: 1 s over its completed requests.
    apache = [r["result"] for r in record["rows"] if r["kind"] == "apache"]
    assert apache and all(m["server_cpu_us"] == 1e6 / m["requests"] for m in apache)
    assert "server CPU µs" in md.read_text()
    nginx = [r for r in record["rows"] if r["kind"] == "nginx"]
    assert {(r["file"], r["tool"]) for r in nginx} == {("1 KiB", "ab"), ("150 KB", "ab"), ("1 KiB", "wrk"),
                                                       ("10 MiB", "wrk -c8"), ("100 MiB", "wrk -c8"),
                                                       ("4096 × 64 KiB", "wrk files"), ("1 KiB", "ab TLS1.2"),
                                                       ("1 KiB", "wrk TLS"), ("1 KiB", "wrk -c5000")}
    assert all(r["result"] is None and "bind() failed" in r["error"] for r in nginx)
    apache_many = [r for r in record["rows"] if r["kind"] == "apache" and r["tool"] == "wrk -c5000"]
    assert len(apache_many) == 1 and apache_many[0]["result"]["proxies"] is None
    assert "per proxy" not in out  # no server listed proxy processes: no column
    assert any("wrk -t2 -c5000" in note for note in record["notes"])


def test_run_reports_each_proxy_share_of_every_gows_load(tmp_path, monkeypatch, capsys):
    from contextlib import contextmanager

    @contextmanager
    def fake_serve(spec, root, workdir, certificate=None):
        workdir.mkdir()
        yield servers.Running(spec, 4242, FakeProc(), workdir / "server.log", idle=True,  # type: ignore[arg-type]
                              admin_port=4343 if spec.admin else None)

    served = {"n": 0}

    def fake_status(port):
        assert port == 4343
        return status((1, 3 * served["n"], 0), (2, 2 * served["n"], 0))

    def load(text):
        served["n"] += 1000
        return text

    monkeypatch.setattr(cli, "serve", fake_serve)
    monkeypatch.setattr(usage, "group_usage", lambda pgid: (1, 0.0))
    monkeypatch.setattr(proxies, "read_status", fake_status)
    monkeypatch.setattr(loads, "ab", lambda url, n, c, gnuplot=None, headers=None, protocol=None: (
        gnuplot.write_text(fixture("ab-gnuplot.tsv")) if gnuplot else None,
        loads.parse_ab(load(fixture("ab-nginx-1k.txt"))))[1])
    monkeypatch.setattr(loads, "wrk", lambda url, c, s, threads=1, timeout=None, script=None: loads.parse_wrk(
        load(fixture("wrk-nginx-1k.txt"))))
    monkeypatch.setattr(prereqs, "add_big_files", lambda root, files: None)
    monkeypatch.setattr(prereqs, "ensure_tools", lambda commands, log: {})
    monkeypatch.setattr(cli, "RESULTS", tmp_path)

    assert cli.main(["--only", "gows", "--workers", "2", "--repeat", "1"]) == 0
    out = capsys.readouterr().out
    assert "per proxy" in out
    record = json.loads(next(tmp_path.glob("compare-*.json")).read_text())
    cache_on = {r["tool"] + " " + r["file"]: r["result"]["proxies"] for r in record["rows"] if r["cache"]}
    assert set(cache_on) == {"ab 1 KiB", "ab 150 KB", "wrk 1 KiB", "wrk -c8 10 MiB", "wrk -c8 100 MiB",
                             "wrk files 4096 × 64 KiB", "wrk -c5000 1 KiB", "ab br 100 KB text, on the fly",
                             "ab br 100 KB text, br sidecar", "ab TLS1.2 1 KiB", "wrk TLS 1 KiB"}
    assert all(p == [{"index": 1, "requests": 3000, "restarts": 0}, {"index": 2, "requests": 2000, "restarts": 0}]
               for p in cache_on.values())
    md = next(tmp_path.glob("compare-*.md")).read_text()
    assert "- gows 2w cache on, wrk -c5000 1 KiB: proxy 1 3,000 (60%), proxy 2 2,000 (40%); least 0.80× even" in md
    assert "per proxy 60%/40%" in md  # beside the issue-11 targets


# --- issue 12: downloads and many files -----------------------------------------------------------

def dl(mb_s: float, rps: float = 1.0, failed: int = 0) -> Measurement:
    """A download run: `mb_s` in wrk's MB (2**20 bytes) per second, `rps` completed responses a second."""
    return Measurement(requests=10, rps=rps, mean_ms=500.0, transfer_kbs=mb_s * 1024, failed=failed, non2xx=0,
                       p50_ms=400.0, p99_ms=900.0)


def test_parse_wrk_download_gives_mb_per_second():
    got = loads.parse_wrk(fixture("wrk-nginx-10m.txt"))
    assert got.requests == 156 and got.rps == 73.87 and got.p99_ms == pytest.approx(207.15)
    assert bigloads.mb_per_s(got) == pytest.approx(738.74)
    text = fixture("wrk-nginx-10m.txt").replace("Transfer/sec:    738.74MB", "Transfer/sec:      1.38GB")
    assert bigloads.mb_per_s(loads.parse_wrk(text)) == pytest.approx(1.38 * 1024)


def test_parse_wrk_of_the_many_files_script():
    got = loads.parse_wrk(fixture("wrk-nginx-files.txt"))
    assert got.requests == 16438 and got.rps == 7953.82 and (got.failed, got.non2xx) == (0, 0)


def test_wrk_passes_the_timeout_and_the_script(monkeypatch, tmp_path):
    argvs: list[list[str]] = []
    monkeypatch.setattr(loads, "_run", lambda argv, timeout: argvs.append(argv) or fixture("wrk-nginx-10m.txt"))
    loads.wrk("http://127.0.0.1:1/10m.bin", 8, 10, timeout=10)
    loads.wrk("http://127.0.0.1:1/", 100, 10, script=tmp_path / "x.lua")
    assert argvs[0] == ["wrk", "-t1", "-c8", "-d10s", "--latency", "--timeout=10s", "http://127.0.0.1:1/10m.bin"]
    assert argvs[1] == ["wrk", "-t1", "-c100", "-d10s", "--latency", "-s", str(tmp_path / "x.lua"),
                        "http://127.0.0.1:1/"]


def test_many_files_are_four_times_the_default_front_cache():
    from arbiter.config import FrontCacheConfig, configured

    files = prereqs.many_files()
    assert files.total == 4 * configured(FrontCacheConfig).max_bytes == 256 * 2**20
    assert (files.count, files.size, files.label) == (4096, 65536, "4096 × 64 KiB")
    names = files.names
    assert len(set(names)) == 4096 and names[0] == "many/0000.bin" and names[-1] == "many/4095.bin"
    # Each file is small enough for both caches: only their budgets keep the set out.
    assert files.size <= configured(FrontCacheConfig).max_object_bytes


def test_many_files_script_requests_every_file_at_random_without_a_response_hook():
    paths = [f"/many/{i}.bin" for i in range(3)] + ['/odd "name".bin']
    script = loads.wrk_files_script(paths, seed=7)
    assert all(loads._lua_string(p) in script for p in paths)
    assert "math.random(#prepared)" in script and "math.randomseed(7 * 1000 + id)" in script
    assert "function response" not in script  # wrk would hand every response to Lua
    assert loads.wrk_files_script(paths, seed=7) == script


def test_big_files_are_random_deterministic_written_out_and_readable(tmp_path, monkeypatch):
    import zlib

    monkeypatch.setattr(prereqs, "DOWNLOADS", [("a.bin", 3 * 2**20 + 5, "3 MiB")])
    files = prereqs.FileSet("many", 5, 4096, 8192)
    roots = []
    for name in ("one", "two"):
        (tmp_path / name).mkdir()
        prereqs.add_big_files(tmp_path / name, files)
        roots.append(tmp_path / name)
    for rel, size in [("a.bin", 3 * 2**20 + 5)] + [(n, 4096) for n in files.names]:
        one, two = roots[0] / rel, roots[1] / rel
        data = one.read_bytes()
        assert len(data) == size and data == two.read_bytes()  # the same bytes on every run
        assert one.stat().st_blocks * 512 >= size  # no sparse holes
        assert len(zlib.compress(data)) > 0.99 * size  # random: nothing for gzip to gain
        assert one.stat().st_mode & 0o777 == 0o644
    assert len({(roots[0] / n).read_bytes() for n in files.names}) == 5
    assert (roots[0] / "many").stat().st_mode & 0o777 == 0o755


def test_big_loads_are_planned_for_apache_nginx_and_every_gows_row_of_the_compare_suite():
    plan = cli.build_plan(cli.parse_args([]))
    assert plan.big_kinds == ["apache", "nginx", "gows"] and plan.files == prereqs.many_files()
    big = {s.label for s in plan.specs if ("wrk -c8", "10 MiB") in cli.planned_loads(s, plan)}
    assert big == {"Apache", "nginx", "Apache (again)", "nginx (again)"} | {
        f"gows {n}w cache {c}" for n in (2, 10, 100) for c in ("on", "off")}
    assert cli.build_plan(cli.parse_args(["fileapp"])).big_kinds == []
    quick = cli.build_plan(cli.parse_args(["--quick"]))
    assert quick.big_kinds == plan.big_kinds and quick.wrk_seconds == 2
    notes = bigloads.notes(plan.big_kinds, plan.files, 10)
    assert "wrk -t1 -c8 -d10s --timeout=10s" in notes[0] and "MB/s" in notes[0]
    assert "4096 distinct files of 64 KiB (256 MiB, 4× gows' default front cache of 64 MiB)" in notes[1]
    assert bigloads.notes([], plan.files, 10) == []


def test_download_ratios_and_the_mb_column_are_in_bytes_per_second():
    rows = [Row(NGINX, "10 MiB", "wrk -c8", dl(1000, rps=100)), Row(GOWS_ON, "10 MiB", "wrk -c8", dl(850, rps=10)),
            Row(NGINX, "1 KiB", "wrk", m(1000)), Row(GOWS_ON, "1 KiB", "wrk", m(500))]
    assert report.ratio(rows[1], rows, "nginx") == pytest.approx(0.85)  # MB/s, not 10 req/s against 100
    assert report.ratio(rows[3], rows, "nginx") == 0.5
    lines = report.table(rows).splitlines()
    head = [c.strip() for c in lines[0].split("|")]
    mb = head.index("MB/s")
    assert head.index("req/s") + 1 == mb and len({len(line) for line in lines}) == 1
    cells = {(r.spec.label, r.tool): [c.strip() for c in line.split("|")] for r, line in zip(rows, lines[2:])}
    assert cells["gows 2w cache on", "wrk -c8"][mb] == "850" and cells["gows 2w cache on", "wrk"][mb] == ""
    assert "MB/s" not in report.table(rows[2:])  # no download row: no column


def test_download_speed_counts_although_no_response_completed():
    # A 100 MiB download over 2 s may complete none: wrk still counts the bytes received.
    rows = [Row(NGINX, "100 MiB", "wrk -c8", dl(400, rps=0.0)), Row(GOWS_OFF, "100 MiB", "wrk -c8", dl(360, rps=0.0))]
    assert report.ratio(rows[1], rows, "nginx") == pytest.approx(0.9)


ISSUE_12_OFF = "issue 12: front cache off at least as fast as Apache, 0 failed"


def issue_12_rows() -> list[Row]:
    files = prereqs.many_files().label
    off10, off100 = ServerSpec("gows", 10, False), ServerSpec("gows", 100, False)
    return [
        Row(APACHE, "1 KiB", "ab", m(18000)), Row(APACHE, "150 KB", "ab", m(13000)),
        Row(APACHE, "1 KiB", "wrk", m(30000, failed=900)),  # Apache's keep-alive closes are its own
        Row(APACHE, files, "wrk files", m(8000, failed=700)),
        Row(NGINX, "10 MiB", "wrk -c8", dl(2000)), Row(NGINX, "100 MiB", "wrk -c8", dl(1400)),
        Row(GOWS_OFF, "1 KiB", "ab", m(18000)), Row(GOWS_OFF, "150 KB", "ab", m(12000)),
        Row(GOWS_OFF, "1 KiB", "wrk", m(36000, non2xx=2)),
        Row(off10, "1 KiB", "ab", m(19800)), Row(off100, "1 KiB", "wrk", m(30000)),
        Row(GOWS_OFF, "10 MiB", "wrk -c8", dl(1700)), Row(GOWS_OFF, "100 MiB", "wrk -c8", dl(700, failed=1)),
        Row(GOWS_ON, "10 MiB", "wrk -c8", dl(1600)),
        Row(GOWS_ON, files, "wrk files", m(8800)), Row(GOWS_OFF, files, "wrk files", m(6000)),
        Row(GOWS_ON, "1 KiB", "ab", m(40000)),  # cache on: not an issue-12 row
    ]


def test_issue_12_cache_off_target_covers_ab_and_wrk_at_every_worker_count_with_zero_failed():
    checks = [c for c in report.check_targets("compare", issue_12_rows()) if c["target"] == ISSUE_12_OFF]
    got = {(c["server"], c["tool"], c["file"]): (round(c["ratio"], 3), c["failed"], c["met"]) for c in checks}
    assert got == {
        ("gows 2w cache off", "ab", "1 KiB"): (1.0, 0, True),  # "at least as fast": 1.0× is met
        ("gows 2w cache off", "ab", "150 KB"): (0.923, 0, False),
        ("gows 2w cache off", "wrk", "1 KiB"): (1.2, 2, False),  # faster, but 2 non-2xx
        ("gows 10w cache off", "ab", "1 KiB"): (1.1, 0, True),
        ("gows 100w cache off", "wrk", "1 KiB"): (1.0, 0, True),
    }
    lines = report.targets_text(checks).splitlines()
    assert lines[0] == f"- {ISSUE_12_OFF}:"
    assert "  - gows 2w cache off, ab 150 KB: 0.92× apache (target ≥ 1.0×) — MISSED (7.7% below the target)" in lines
    assert ("  - gows 2w cache off, wrk 1 KiB: 1.20× apache (target ≥ 1.0×, 2 failed/non-2xx) — MISSED: 2 "
            "failed/non-2xx (20.0% above the target)") in lines
    assert "  - gows 10w cache off, ab 1 KiB: 1.10× apache (target ≥ 1.0×) — met (10.0% above the target)" in lines


def test_issue_12_download_targets_are_mb_per_s_against_nginx_cache_on_and_off():
    checks = [c for c in report.check_targets("compare", issue_12_rows()) if "downloads" in c["target"]]
    got = {(c["server"], c["file"]): (round(c["ratio"], 3), c["met"], round(c["margin"], 4)) for c in checks}
    assert got == {("gows 2w cache off", "10 MiB"): (0.85, True, 0.0625),
                   ("gows 2w cache off", "100 MiB"): (0.5, False, -0.375),
                   ("gows 2w cache on", "10 MiB"): (0.8, True, 0.0)}
    text = report.targets_text(checks)
    assert ("gows 2w cache off, wrk -c8 100 MiB: 0.50× nginx, 700 MB/s against 1,400 (target ≥ 0.8×, 1 "
            "failed/non-2xx) — MISSED (37.5% below the target)") in text
    assert "front cache on:" in text and "front cache off:" in text


def test_issue_12_many_files_target_is_against_apache_cache_on_and_off():
    checks = [c for c in report.check_targets("compare", issue_12_rows()) if "many files" in c["target"]]
    assert {c["server"]: (round(c["ratio"], 2), c["met"]) for c in checks} == {
        "gows 2w cache on": (1.1, True), "gows 2w cache off": (0.75, False)}
    # A download or many-files row without its baseline is not measured, not missed.
    alone = [c for c in report.check_targets("compare", issue_12_rows()[4:]) if "many files" in c["target"]]
    assert alone and all(c["met"] is None and c["margin"] is None for c in alone)


def test_verdict_says_by_how_much_a_target_is_met_or_missed():
    base = {"failed": 0, "ratio": 1.0, "minimum": 1.0}
    assert report.verdict({**base, "met": True, "margin": 0.123}) == "met (12.3% above the target)"
    assert report.verdict({**base, "met": False, "margin": -0.05}) == "MISSED (5.0% below the target)"
    assert report.verdict({**base, "met": False, "failed": 3, "margin": 0.0}) == \
        "MISSED: 3 failed/non-2xx (0.0% above the target)"
    assert report.verdict({**base, "met": None, "margin": None}) == "not measured"
    p99 = {"failed": 0, "limit_ms": 5.5, "p99_ms": 5.6}
    assert report.verdict({**p99, "met": False, "margin": -0.1}) == "MISSED (0.10 ms over the bound)"
    assert report.verdict({**p99, "met": True, "margin": 0.25}) == "met (0.25 ms under the bound)"
    # The p99 target's margin is the limit less the p99 reached.
    (check,) = [c for c in report.check_targets("compare", issue_11_rows())
                if c["target"] == ISSUE_11_P99 and c["server"] == "gows 10w cache on"]
    assert check["margin"] == pytest.approx(-0.1)


# --- issue 15: compression on the fly against a sidecar -------------------------------------------

def test_compression_rows_are_planned_for_every_gows_row_only():
    plan = cli.build_plan(cli.parse_args([]))
    rows = [("ab br", "100 KB text, on the fly"), ("ab br", "100 KB text, br sidecar")]
    planned = cli.planned_loads(GOWS_ON, plan)
    assert [load for load in planned if load[0] == "ab br"] == rows
    assert planned[-1][0] == cli.MANY_TOOL  # both before the many-clients load
    assert not set(rows) & set(cli.planned_loads(NGINX, plan))
    assert cli.build_plan(cli.parse_args(["fileapp"])).compress_kinds == []


def test_compression_target_is_the_ratio_to_the_same_servers_sidecar_row():
    rows = [Row(GOWS_ON, "100 KB text, on the fly", "ab br", m(950)),
            Row(GOWS_ON, "100 KB text, br sidecar", "ab br", m(1000)),
            Row(GOWS_OFF, "100 KB text, on the fly", "ab br", m(100)),  # front cache off: not the target's
            Row(GOWS_OFF, "100 KB text, br sidecar", "ab br", m(1000))]
    (check,) = [c for c in report.check_targets("compare", rows) if c["target"].startswith("issue 15")]
    assert (check["server"], check["ratio"], check["met"]) == ("gows 2w cache on", 0.95, True)
    assert "0.95× br sidecar (target ≥ 0.9×" in report.check_line(check)
    rows[0] = Row(GOWS_ON, "100 KB text, on the fly", "ab br", m(850))
    (check,) = [c for c in report.check_targets("compare", rows) if c["target"].startswith("issue 15")]
    assert check["met"] is False
    (check,) = [c for c in report.check_targets("compare", rows[:1]) if c["target"].startswith("issue 15")]
    assert check["met"] is None  # no sidecar row: not measured


def test_compression_load_sends_accept_encoding_and_alternates_which_file_goes_first(monkeypatch, tmp_path):
    argvs = []
    monkeypatch.setattr(loads, "_run", lambda argv, timeout: argvs.append(argv) or fixture("ab-nginx-1k.txt"))
    runs = compressloads.run(lambda name: f"http://h/{name}", 100, 10, 2)
    assert {label: len(r) for label, r in runs.items()} == {"100 KB text, on the fly": 2, "100 KB text, br sidecar": 2}
    assert [a[-1] for a in argvs] == ["http://h/text-100k.txt", "http://h/text-100k-sidecar.txt",
                                      "http://h/text-100k-sidecar.txt", "http://h/text-100k.txt"]
    assert all(a[a.index("-H") + 1] == "Accept-Encoding: br" for a in argvs)
    compressloads.add_files(tmp_path)
    text = (tmp_path / "text-100k.txt").read_bytes()
    assert len(text) == 100_000 and (tmp_path / "text-100k-sidecar.txt").read_bytes() == text
    assert brotli.decompress((tmp_path / "text-100k-sidecar.txt.br").read_bytes()) == text
    assert not (tmp_path / "text-100k.txt.br").exists()
