"""Operations pieces in-process: the proxy's per-response hook (every kind of response counted
once, with its status and length), latency percentiles and windows, the access log's format,
writer thread, reopen, bound and full disk, sd_notify datagrams, the status page's escaping and
proxy rows, and the metrics' names and labels."""
from __future__ import annotations

import base64
import contextlib
import errno
import hashlib
import logging
import os
import re
import socket
import threading
import time
import types
from pathlib import Path

import pytest

from arbiter.config import ConfigError, FrontCacheConfig, ProxyConfig, bind_configured, configured, load_data
from arbiter.ops import status_page
from arbiter.ops.metrics import exposition, make_registry
from arbiter.ops.accesslog import AccessLog, format_line
from arbiter.ops.logs import Throttle
from arbiter.ops.notify import Notifier
from arbiter.proxy import Proxy
from arbiter.proxy import client as client_module
from arbiter.proxy.client import ClientProtocol
from arbiter.proxy.counters import SIZE, report
from arbiter.proxy.request import Request, now_ns
from arbiter.proxy.stats import BOUNDS, RequestStats, Window, quantile
from arbiter.state import WorkerTable
from proxy_harness import ProxyThread, RawUpstream, parse_responses, raw
from support import wait_until

pytestmark = pytest.mark.unit

COMBINED = re.compile(r'^(\S+) - - \[(\d\d/\w{3}/\d{4}:\d\d:\d\d:\d\d [+-]\d{4})\] "([^"\\]*(?:\\.[^"\\]*)*)" '
                      r'(\d{3}) (\d+|-) "([^"\\]*(?:\\.[^"\\]*)*)" "([^"\\]*(?:\\.[^"\\]*)*)" (\d+)$')


# -- latency histogram ------------------------------------------------------------------------
def test_quantile_interpolates_inside_the_bucket_and_is_none_without_data():
    buckets = [0] * (len(BOUNDS) + 1)
    assert quantile(0.5, buckets) is None
    i = BOUNDS.index(2 ** 23 / 1e9)
    buckets[i] = 100  # all observations in (4.19 ms, 8.39 ms]
    assert quantile(0.5, buckets) == pytest.approx(3 * 2 ** 21 / 1e9)
    assert 2 ** 22 / 1e9 < quantile(0.99, buckets) <= 2 ** 23 / 1e9
    buckets[-1] = 1000  # most beyond the last bound: the answer says "at least the last bound"
    assert quantile(0.99, buckets) == BOUNDS[-1]


@pytest.fixture
def still(monkeypatch) -> int:
    """The proxy's clock held still (the nanoseconds it reads), so a response is counted at
    exactly the age a test gives it: a busy machine cannot move it into the next bucket."""
    now = now_ns()
    monkeypatch.setattr(client_module, "now_ns", lambda: now)
    return now


def _completed(stats: RequestStats, now: int, *durations_ns: int) -> None:
    """Complete one response per duration through the proxy's own counting (ClientProtocol.finish),
    each born that long before `now`, the clock held `still`."""
    proxy = Proxy(WorkerTable(), configured(ProxyConfig), configured(FrontCacheConfig), 4, 1.0)
    proxy.timing = stats.counts
    conn = ClientProtocol(proxy)
    conn.transport = types.SimpleNamespace(close=lambda: None)
    for ns in durations_ns:
        req = Request()
        req.born = now - ns
        conn.current = req
        conn.finish(req, keep=True)


def test_each_response_is_counted_in_its_bucket(still):
    stats = RequestStats()
    _completed(stats, still, *(round(seconds * 1e9) for seconds in (0.000001, 0.0004, 0.0004, 0.2, 3.0, 100.0)))
    assert stats.count == 6
    assert stats.seconds == pytest.approx(103.200801)
    buckets = stats.buckets
    assert len(buckets) == len(BOUNDS) + 1 and sum(buckets) == 6
    assert buckets[0] == 1  # below the first bound
    assert buckets[-1] == 1  # beyond the last bound (68.7 s)
    for seconds, n in ((0.0004, 2), (0.2, 1), (3.0, 1)):  # each in the bucket whose bounds hold it
        i = next(i for i, bound in enumerate(BOUNDS) if seconds <= bound)
        assert BOUNDS[i - 1] < seconds and buckets[i] == n
    assert quantile(0.5, buckets) < 0.001 < 0.1 < quantile(0.8, buckets)


def test_the_sum_of_durations_wraps_in_shared_memory_instead_of_failing_every_response(still):
    from arbiter.proxy.counters import Counters
    from arbiter.proxy.stats import SUM

    counters = Counters.private()  # the proxy's 64-bit slots, as shared with the master
    stats = RequestStats(counters.latency)
    counters.latency[SUM] = 2 ** 63 - 10 ** 9  # 292 years of request time summed, less a second
    # (the addition overflowed the slot: ValueError in ClientProtocol.finish, for every response
    # from then on, of every later incarnation of the slot too)
    _completed(stats, still, 3 * 10 ** 9, 10 ** 9)
    assert stats.count == 2
    assert stats.seconds == pytest.approx(3.0)  # wrapped, as a counter that was reset


def test_window_rates_cover_only_the_last_seconds(still):
    clock = [1000.0]
    stats = RequestStats()
    window = Window(stats, clock=lambda: clock[0])
    for second in range(300):  # 10 responses a second for 5 minutes ...
        _completed(stats, still, *[50_000] * 10)
        clock[0] += 1
        window.sample()
    _completed(stats, still, *[50_000] * 290)  # ... then a burst since the last sample
    short, long = window.over(10), window.over(300)
    assert short["seconds"] == 10 and short["requests"] == 100 + 290
    assert short["rate"] == pytest.approx(39.0)
    assert long["seconds"] == 300 and long["requests"] == 3000 + 290
    assert long["rate"] == pytest.approx(3290 / 300)
    clock[0] += 400  # the sampler stopped: the window reaches back to the newest sample it has
    assert window.over(10)["requests"] == 290 and window.over(10)["seconds"] == 400


# -- the proxy's hook: one call per completed response ----------------------------------------
@pytest.fixture
def origin():
    def respond(head: bytes, body: bytes, conn) -> bool:
        path = head.split(b" ")[1]
        if path == b"/chunked":
            conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n")
        elif path == b"/cached":
            conn.sendall(b"HTTP/1.1 200 OK\r\nCache-Control: max-age=60\r\nETag: \"v1\"\r\n"
                         b"Content-Length: 5\r\n\r\n" + (b"" if head.startswith(b"HEAD") else b"hello"))
        else:
            conn.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Length: 7\r\n\r\n" + b"missing")
        return True

    upstream = RawUpstream(respond)
    yield upstream
    upstream.stop()


def test_every_response_is_observed_once_with_its_status_and_length(origin):
    proxy = ProxyThread([origin.port])
    seen: list[tuple[int, object]] = []

    def observe(client, req):
        seen.append((req.status, req.length))

    proxy.call(lambda: setattr(proxy.proxy, "observe", observe))
    with proxy:
        get = b"GET %s HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        assert parse_responses(raw(proxy.port, get % b"/cached"))[0][0] == 200  # relayed, stored
        assert parse_responses(raw(proxy.port, get % b"/cached"))[0][0] == 200  # front cache hit
        assert parse_responses(raw(proxy.port, b"GET /cached HTTP/1.1\r\nHost: x\r\nIf-None-Match: \"v1\"\r\n"
                                               b"Connection: close\r\n\r\n"))[0][0] == 304
        assert parse_responses(raw(proxy.port, b"HEAD /cached HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
                               head_only=True)[0][0] == 200
        assert parse_responses(raw(proxy.port, get % b"/chunked"))[0][0] == 200
        assert parse_responses(raw(proxy.port, get % b"/nope"))[0][0] == 404
        assert parse_responses(raw(proxy.port, b"GET / HTTP/1.1\r\nContent-Length: x\r\n\r\n"))[0][0] == 400
        proxy.set_up(origin.port, False)
        assert parse_responses(raw(proxy.port, get % b"/cached?other"))[0][0] == 503
        wait_until(lambda: len(seen) >= 8, timeout=10)
        assert [(s, int(n) if isinstance(n, bytes) else n) for s, n in seen] == [
            (200, 5), (200, 5), (304, None), (200, None), (200, None), (404, 7), (400, 16), (503, 24)]
        assert proxy.call(lambda: proxy.proxy.latency.count) == 8


# -- access log ---------------------------------------------------------------------------------
def test_a_line_is_apache_combined_plus_microseconds_with_hostile_fields_escaped():
    fwd = [b"Referer", b": ", b"http://a/\"x\"", b"\r\n", b"User-Agent", b": ", b"bot\x01\xff", b"\r\n"]
    line = format_line(b"127.0.0.1", 1700000000.5, 0.0123456, b"GET", b'/a b"c', False, 200, b"1234", fwd)
    m = COMBINED.match(line.rstrip("\n"))
    assert m, line
    assert m.group(3) == 'GET /a b\\"c HTTP/1.1'
    assert (m.group(4), m.group(5), m.group(6), m.group(7), m.group(8)) == (
        "200", "1234", 'http://a/\\"x\\"', "bot\\x01\\xff", "12346")
    stamp = time.strftime("%d/%b/%Y:%H:%M:%S", time.localtime(1700000000.5 - 0.0123456))
    assert m.group(2).startswith(stamp)
    empty = format_line(b"::1", 1700000000.0, 0.0, b"HEAD", b"/", True, 304, None, [])
    assert empty.endswith('"HEAD / HTTP/1.0" 304 - "-" "-" 0\n')


def _fake(peer=b"127.0.0.1", status=200, target=b"/x"):
    client = types.SimpleNamespace(remote=lambda: peer)
    req = types.SimpleNamespace(born=time.perf_counter_ns(), method=b"GET", target=target, http10=False,
                                status=status, length=3, fwd=[])
    return client, req


def test_the_writer_thread_writes_in_order_and_reopens_after_rotation(tmp_path):
    path = tmp_path / "access.log"
    log = AccessLog(path)
    try:
        for i in range(100):
            log.observe(*_fake(target=b"/before/%d" % i))
        wait_until(lambda: path.exists() and path.read_text().count("\n") == 100, timeout=10)
        path.rename(tmp_path / "access.log.1")
        log.observe(*_fake(target=b"/still-old"))
        log.reopen()
        for i in range(50):
            log.observe(*_fake(target=b"/after/%d" % i))
    finally:
        log.close()
    old = (tmp_path / "access.log.1").read_text().splitlines()
    new = path.read_text().splitlines()
    assert [line.split('"')[1] for line in old] == [f"GET /before/{i} HTTP/1.1" for i in range(100)] + [
        "GET /still-old HTTP/1.1"]
    assert [line.split('"')[1] for line in new] == [f"GET /after/{i} HTTP/1.1" for i in range(50)]
    assert all(COMBINED.match(line) for line in old + new)
    assert log.dropped == 0


def test_lines_beyond_the_queue_bound_are_counted_as_dropped_not_held(tmp_path, monkeypatch):
    import arbiter.ops.accesslog as accesslog
    monkeypatch.setattr(accesslog, "MAX_QUEUED", 0)
    path = tmp_path / "access.log"
    log = AccessLog(path)
    for _ in range(10):
        log.observe(*_fake())
    log.close()
    assert log.dropped == 10
    assert path.read_text() == ""


def test_every_line_a_full_disk_refuses_is_dropped_and_the_error_is_logged_once_per_interval(caplog):
    log = AccessLog(Path("/dev/full"))  # every write fails with ENOSPC
    with caplog.at_level(logging.WARNING, logger="gows.access"):
        for sent in range(200, 1001, 200):  # in several batches, each written (and failed) apart
            for _ in range(200):
                log.observe(*_fake())
            wait_until(lambda: log.dropped >= sent, timeout=10)
        log.close()
    assert (log.dropped, log.write_failed, log.queue_full) == (1000, 1000, 0)
    assert log.error == os.strerror(errno.ENOSPC)
    # The first failure at once; the rest, held back for REPORT_INTERVAL, when the log closes.
    first, last = [r.getMessage() for r in caplog.records]
    lost = int(re.fullmatch(r"access log: cannot write to /dev/full: No space left on device; (\d+) lines lost "
                            r"\(\d+ dropped in all; reported at most every 10s\)", first).group(1))
    assert last == f"access log: {1000 - lost} more lines were lost before it was closed (No space left on device)"


def test_the_access_log_says_when_writing_works_again_and_how_many_lines_it_lost(tmp_path, monkeypatch, caplog):
    import arbiter.ops.accesslog as accesslog
    real_write, full = os.write, [True]

    def write(fd, data):
        if full[0]:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)

    monkeypatch.setattr(accesslog.os, "write", write)
    path = tmp_path / "access.log"
    log = AccessLog(path)
    with caplog.at_level(logging.WARNING, logger="gows.access"):
        for sent in (1, 2):  # the second failure is held back: within REPORT_INTERVAL of the first
            log.observe(*_fake(target=b"/lost"))
            wait_until(lambda: log.write_failed == sent, timeout=10)
        full[0] = False
        log.observe(*_fake(target=b"/kept"))
        # (the writer thread clears the error just after the line is written)
        wait_until(lambda: path.exists() and path.read_text().count("\n") == 1 and log.error == "", timeout=10)
        full[0] = True
        log.observe(*_fake(target=b"/lost-at-close"))
        wait_until(lambda: log.write_failed == 3, timeout=10)
        log.observe(*_fake(target=b"/lost-at-close"))
        log.close()
    assert log.dropped == 4 and "/kept" in path.read_text()
    assert [r.getMessage() for r in caplog.records] == [
        "access log: cannot write to %s: No space left on device; 1 lines lost (1 dropped in all; reported at most "
        "every 10s)" % path,
        f"access log: writing to {path} again after 1 more lines were lost",
        "access log: cannot write to %s: No space left on device; 1 lines lost (3 dropped in all; reported at most "
        "every 10s)" % path,
        "access log: 1 more lines were lost before it was closed (No space left on device)"]


def test_throttle_reports_the_first_occurrence_then_a_count_per_interval():
    clock = [100.0]
    throttle = Throttle(10.0, clock=lambda: clock[0])
    assert throttle.due(3) == 3  # the first: reported at once
    assert [throttle.due() for _ in range(50)] == [0] * 50
    clock[0] += 9.9
    assert throttle.due(2) == 0
    clock[0] += 0.1
    assert throttle.due() == 53  # everything held back meanwhile
    assert throttle.due() == 0 and throttle.flush() == 1
    assert throttle.due() == 1  # over and back again: reported at once


@contextlib.contextmanager
def _unread_fifo(path: Path):
    """A FIFO at `path` that no process reads; on the way out one reader opens and closes it, so
    that a writer still waiting in open() (the defect) is let go and the test ends either way."""
    os.mkfifo(path)
    try:
        yield path
    finally:
        os.close(os.open(path, os.O_RDONLY | os.O_NONBLOCK))


def test_a_log_replaced_by_a_fifo_no_one_reads_is_refused_at_once_at_usr1_not_waited_on(tmp_path, caplog):
    from arbiter.config import LoggingConfig
    from arbiter.ops.logs import LogSink

    path = tmp_path / "error.log"
    sink = LogSink(LoggingConfig(level="info", access_log=None, file=path, format="text"))
    try:
        path.rename(tmp_path / "error.log.1")
        with _unread_fifo(path), caplog.at_level(logging.INFO, logger="gows.logs"):
            reopening = threading.Thread(target=sink.reopen, daemon=True)
            reopening.start()
            reopening.join(5)  # (it hung in open() for ever: the master's loop, TERM unanswered)
            assert not reopening.is_alive()
            logging.getLogger("gows.test").warning("still logged")
    finally:
        logging.getLogger().removeHandler(sink.handler)
        sink.handler.close()
    assert [r.getMessage() for r in caplog.records if r.name == "gows.logs"] == [
        f"cannot reopen {path}: a FIFO that no process reads; still writing to the old file"]
    assert "still logged" in (tmp_path / "error.log.1").read_text()


def test_an_access_log_replaced_by_a_fifo_no_one_reads_is_refused_at_once_and_the_old_file_kept(tmp_path, caplog):
    path = tmp_path / "access.log"
    log = AccessLog(path)
    try:
        path.rename(tmp_path / "access.log.1")
        with _unread_fifo(path), caplog.at_level(logging.ERROR, logger="gows.access"):
            log.reopen()
            log.observe(*_fake(target=b"/after"))
            # (the writer thread waited in open() for ever, every line after it dropped)
            wait_until(lambda: "/after" in (tmp_path / "access.log.1").read_text(), timeout=5)
            refused: list[BaseException] = []

            def open_it() -> None:  # a proxy's start or a HUP, on its loop
                try:
                    AccessLog.open(path)
                except ConfigError as e:
                    refused.append(e)

            opener = threading.Thread(target=open_it, daemon=True)
            opener.start()
            opener.join(timeout=10)  # (before: it waited in open() for a reader, for ever)
            assert not opener.is_alive() and "a FIFO that no process reads" in str(refused[0])
    finally:
        log.close()
    assert [r.getMessage() for r in caplog.records] == [
        f"access log: cannot reopen {path}: a FIFO that no process reads; still writing to the old file"]


def test_output_that_never_ends_a_line_is_relayed_in_bounded_pieces_not_held(tmp_path):
    import asyncio

    from arbiter.config import LoggingConfig
    from arbiter.ops.logs import LogSink

    sink = LogSink(LoggingConfig(level="info", access_log=None, file=tmp_path / "error.log", format="text"))
    written: list[int] = []
    sink._write = lambda data: written.append(len(data))  # what the relay hands the file, write by write

    async def relay() -> None:
        stream = asyncio.StreamReader()
        for _ in range(160):  # 10 MiB from a worker, no newline anywhere
            stream.feed_data(b"x" * 65536)
        stream.feed_data(b"end\n")
        stream.feed_eof()
        await sink.relay(stream)

    try:
        asyncio.run(relay())
    finally:
        logging.getLogger().removeHandler(sink.handler)
        sink.handler.close()
    assert sum(written) > 160 * 65536 and max(written) <= 2 * 65536 + 1  # (before: one write of 10 MiB)


def test_access_log_setting_forms(tmp_path):
    (tmp_path / "www").mkdir()

    def setting(value):
        return load_data({"baseDirectory": "www", "workerCount": 1, "logging": {"accessLog": value}},
                         tmp_path / "gows.conf.json").logging.access_log

    assert setting(False) is None and setting(None) is None
    assert setting(True) == "-" and setting("-") == "-"
    assert setting("logs.txt") == (tmp_path / "logs.txt").resolve()
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro" / "access.log").mkdir()  # a directory where the file should be
    with pytest.raises(ConfigError, match="logging.accessLog: .* is a directory"):
        setting("ro/access.log")
    with pytest.raises(ConfigError, match="logging.accessLog: cannot open"):
        AccessLog.open(tmp_path / "missing" / "a.log")


# -- sd_notify ------------------------------------------------------------------------------------
def test_notifier_sends_datagrams_and_removes_the_variable(tmp_path):
    path = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        sock.settimeout(5)
        env = {"NOTIFY_SOCKET": path}
        n = Notifier(env)
        assert "NOTIFY_SOCKET" not in env  # children must not inherit it
        assert n.ready("serving")
        assert sock.recv(4096) == b"READY=1\nSTATUS=serving"
        assert n.reloading()
        assert re.fullmatch(rb"RELOADING=1\nMONOTONIC_USEC=\d+\nSTATUS=reloading the configuration", sock.recv(4096))
        assert n.stopping()
        assert sock.recv(4096) == b"STOPPING=1\nSTATUS=stopping"


def test_notifier_abstract_address_and_absent_socket():
    name = f"gows-test-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        assert Notifier({"NOTIFY_SOCKET": "@" + name}).ready("x")
        assert sock.recv(100).startswith(b"READY=1")
    assert not Notifier({}).enabled and Notifier({}).ready("x") is False
    assert Notifier({"NOTIFY_SOCKET": "@" + name}).ready("x") is False  # nobody listening: no exception


# -- status page ------------------------------------------------------------------------------------
# One proxy accepting, one spawned but not yet accepting, one between two incarnations.
_PROXY_ROWS = [
    {"index": 1, "pid": 4242, "ready": True, "restarts": 0, "requests": 1234567, "client_connections": 1500,
     "rate": 812.345},
    {"index": 2, "pid": 4343, "ready": False, "restarts": 1, "requests": 7, "client_connections": 0, "rate": 0.0},
    {"index": 3, "pid": None, "ready": False, "restarts": 12, "requests": 0, "client_connections": 0, "rate": 0.0},
]


def _document(**worker):
    w = {"address": "127.0.0.1:9001", "host": "127.0.0.1", "port": 9001, "local": True, "pid": 42, "up": False,
         "since": time.time() - 75, "consecutive_failures": 3, "restarts": 2, "requests": 12345, "in_flight": 1,
         "last_check_seconds": 0.0012, "last_error": "<script>alert(1)</script>", "name": "127.0.0.1:9001",
         "weight": 1, "effective_weight": 1, "slow_start_seconds": 0.0, "slow_start_until": None, "ejected": False,
         "ejected_until": None, "ejections": 0}
    w.update(worker)
    window = {"seconds": 10, "requests": 5, "rate_per_second": 0.5, "p50_seconds": 0.002, "p99_seconds": None}
    return {"version": "0.1.0", "pid": 1, "config": "/etc/gows/<x>.json", "started": 0, "uptime": 3700,
            "ready": False, "stopping": False, "workers": [w],
            "front_cache": {"enabled": True, "entries": 3, "bytes": 2048, "max_bytes": 1 << 20, "hits": 1,
                            "misses": 3, "hit_ratio": 0.25},
            "totals": {"requests": 5, "responses": {"1xx": 0, "2xx": 4, "3xx": 0, "4xx": 1, "5xx": 0},
                       "last_10s": window, "last_5m": window, "all_time": {"p50_seconds": None, "p99_seconds": None}},
            "proxy": {"client_connections": 2},
            "proxies": _PROXY_ROWS,
            "access_log": {"enabled": True, "dropped": 1234, "error": "No space left on device"}}


def test_status_page_shows_names_weights_slow_start_and_ejections():
    html = status_page.render(_document(name="node-1.example:8080", address="198.18.0.2:8080", up=True,
                                        weight=3, effective_weight=0.9, slow_start_seconds=60,
                                        slow_start_until=time.time() + 40, ejections=2))
    assert ">node-1.example:8080 (198.18.0.2:8080)<" in html
    assert '<td data-label="Weight" class="n">0.9 / 3 (slow start)</td>' in html
    assert '<td data-label="Ejections" class="n">2</td>' in html
    html = status_page.render(_document(up=True, ejected=True, ejected_until=86400 + 3600 + 120, ejections=1))
    assert ">ejected</span><span class=\"err\">until 01:02:00 UTC</span>" in html
    assert '<td data-label="Weight" class="n">1</td>' in html


def test_status_page_escapes_worker_errors_and_allows_only_its_own_script():
    html = status_page.render(_document())
    assert "<script>alert(1)</script>" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "/etc/gows/&lt;x&gt;.json" in html
    assert re.search(r'<td data-label="Requests" class="n">12,345</td>', html)
    assert ">1m 15s ago<" in html and ">1h 1m<" in html and "1.20 ms" in html and "25.0 %" in html
    assert '<dd id="f-astate">failing: No space left on device</dd>' in html and '<dd id="f-adropped">1,234</dd>' in html
    assert "http://" not in html and "https://" not in html and "src=" not in html  # no external assets
    digest = base64.b64encode(hashlib.sha256(status_page.SCRIPT.encode()).digest()).decode()
    assert f"'sha256-{digest}'" in status_page.CSP and f"<script>{status_page.SCRIPT}</script>" in html


def test_status_page_has_a_row_per_proxy_process_with_its_state_and_counts():
    html = status_page.render(_document())
    body = re.search(r'<tbody id="proxies">(.*?)</tbody>', html).group(1)
    rows = {int(m.group(1)): dict(re.findall(r'<td data-label="([^"]+)"[^>]*>(.*?)</td>', m.group(2)))
            for m in re.finditer(r'<tr data-proxy="(\d+)">(.*?)</tr>', body)}
    assert rows == {
        1: {"Proxy": "1", "PID": "4242", "State": '<span class="badge up">ready</span>', "Connections": "1,500",
            "Requests/s": "812", "Requests": "1,234,567", "Restarts": "0"},
        2: {"Proxy": "2", "PID": "4343", "State": '<span class="badge down">starting</span>', "Connections": "0",
            "Requests/s": "0.00", "Requests": "7", "Restarts": "1"},
        3: {"Proxy": "3", "PID": "\u2013", "State": '<span class="badge down">down</span>', "Connections": "0",
            "Requests/s": "0.00", "Requests": "0", "Restarts": "12"},
    }
    assert '<span id="f-proxiesup">1 / 3</span>' in html
    # The script rebuilds the same rows from /status.json (the browser tests run it).
    assert 'getElementById("proxies")' in status_page.SCRIPT


# -- metrics ------------------------------------------------------------------------------------------
class _Fleet:
    """The proxies as the admin listener reads them (status.ProxyCounters), with fixed numbers."""

    def __init__(self) -> None:
        self.latency = RequestStats()

    def stats(self):
        return report([0] * SIZE, True, 1 << 20)

    def rows(self):
        return _PROXY_ROWS


def test_metrics_give_each_proxy_process_labelled_series_and_no_family_twice():
    from prometheus_client.parser import text_string_to_metric_families

    master = types.SimpleNamespace(table=WorkerTable(), proxy=_Fleet(), started=1.0, stopping=False,
                                   access_log=None, config_path="gows.conf.json", certificate=None,
                                   tls_listen=None)
    text = exposition(make_registry(master), "text/plain")[0].decode()
    families = list(text_string_to_metric_families(text))
    names = [f.name for f in families]
    assert [n for n in set(names) if names.count(n) > 1] == []  # (gows_proxy_client_connections was a total)
    by_name = {f.name: f for f in families}

    def series(name):
        return {(s.name, tuple(sorted(s.labels.items()))): s.value for s in by_name[name].samples}

    assert (by_name["gows_proxy_up"].type, series("gows_proxy_up")) == ("gauge", {
        ("gows_proxy_up", (("proxy", "1"),)): 1, ("gows_proxy_up", (("proxy", "2"),)): 0,
        ("gows_proxy_up", (("proxy", "3"),)): 0})
    assert (by_name["gows_proxy_requests"].type, series("gows_proxy_requests")) == ("counter", {
        ("gows_proxy_requests_total", (("proxy", "1"),)): 1234567,
        ("gows_proxy_requests_total", (("proxy", "2"),)): 7, ("gows_proxy_requests_total", (("proxy", "3"),)): 0})
    assert (by_name["gows_proxy_restarts"].type, series("gows_proxy_restarts")) == ("counter", {
        ("gows_proxy_restarts_total", (("proxy", "1"),)): 0,
        ("gows_proxy_restarts_total", (("proxy", "2"),)): 1, ("gows_proxy_restarts_total", (("proxy", "3"),)): 12})
    # Open connections only per proxy: no unlabelled total beside its parts.
    assert (by_name["gows_proxy_client_connections"].type, series("gows_proxy_client_connections")) == ("gauge", {
        ("gows_proxy_client_connections", (("proxy", "1"),)): 1500,
        ("gows_proxy_client_connections", (("proxy", "2"),)): 0,
        ("gows_proxy_client_connections", (("proxy", "3"),)): 0})
    # The whole server's families stay unlabelled.
    assert series("gows_http_requests") == {("gows_http_requests_total", ()): 0}


def test_metrics_and_status_give_each_worker_its_name_weight_slow_start_and_ejections():
    from prometheus_client.parser import text_string_to_metric_families

    from arbiter.ops.status import balance
    from arbiter.state import WorkerState

    table = WorkerTable(rise=1, fall=1, schedule=lambda delay, fn: None)
    ramping = table.add(WorkerState("198.18.0.2", 8080, local=False, name="node-1:8080", weight=3, slow_start=60.0))
    other = table.add(WorkerState("198.18.0.3", 8080, local=False))
    for w in (ramping, other):
        table.record_check(w, True)  # up at the start: at full weight
    table.record_check(ramping, False)
    table.record_check(ramping, True)  # a comeback: slow start
    assert table.record_outlier(other, "5 x 503")
    now, mono = time.time(), time.monotonic()
    state = balance(ramping, now, mono)
    assert state["name"] == "node-1:8080" and state["weight"] == 3 and 0 < state["effective_weight"] < 3
    assert now < state["slow_start_until"] <= now + 60.5 and not state["ejected"]
    ejected = balance(other, now, mono)
    assert ejected["ejected"] and now < ejected["ejected_until"] <= now + 30.5 and ejected["ejections"] == 1
    master = types.SimpleNamespace(table=table, proxy=_Fleet(), started=1.0, stopping=False,
                                   access_log=None, config_path="gows.conf.json", certificate=None,
                                   tls_listen=None)
    text = exposition(make_registry(master), "text/plain")[0].decode()
    samples = {(s.name, s.labels.get("name")): s.value
               for f in text_string_to_metric_families(text) for s in f.samples if "name" in s.labels}
    assert samples[("gows_worker_weight", "node-1:8080")] == 3
    assert 0 < samples[("gows_worker_effective_weight", "node-1:8080")] < 3
    assert samples[("gows_worker_ejected", "198.18.0.3:8080")] == 1
    assert samples[("gows_worker_ejections_total", "198.18.0.3:8080")] == 1
    assert samples[("gows_worker_ejected_until_seconds", "198.18.0.3:8080")] > now
    assert ("gows_worker_ejected_until_seconds", "node-1:8080") not in samples



@pytest.mark.parametrize("admin", [False, True])  # without it nothing reads latencies
@pytest.mark.parametrize("access_log", [False, True])
def test_the_per_response_work_runs_only_when_something_reads_it(tmp_path, admin, access_log):
    import logging

    from arbiter.arbiter import Arbiter
    from arbiter.ops.logs import LogSink
    from arbiter.proxy.counters import Counters
    from arbiter.proxy.process import ProxyProcess
    from support import free_port

    (tmp_path / "www").mkdir()
    data = {"baseDirectory": "www", "listen": f"127.0.0.1:{free_port()}", "workerCount": 1,
            "workerBasePort": free_port(), "logging": {"accessLog": str(tmp_path / "access.log") if access_log else False}}
    config = load_data(data, tmp_path / "gows.conf.json")
    public = bind_configured(config.listen.host, config.listen.port, "listen")
    admin_sock = bind_configured("127.0.0.1", 0, "admin") if admin else None
    sink = LogSink(config.logging)
    try:
        arbiter = Arbiter(config, public, {}, sink, admin_sock)
        settings = arbiter.proxy.settings()  # what every proxy process is told
        assert settings["timing"] is admin
        assert settings["access_log"] == (str(tmp_path / "access.log") if access_log else None)
        process = ProxyProcess(1, public, socket.socket(), Counters.private())
        process.proxy = Proxy(process.table, config.proxy, config.front_cache, config.threads, config.cache.ttl,
                              process.counters)
        process._apply(settings)
        proxy = process.proxy
        assert proxy.timing is (proxy.latency.counts if admin else None)
        assert proxy.observe == (process.access_log.observe if access_log else None)
        if process.access_log is not None:
            process.access_log.close(wait=True)
        process.control.close()
    finally:
        logging.getLogger().removeHandler(sink.handler)
        public.close()
        if admin_sock is not None:
            admin_sock.close()
