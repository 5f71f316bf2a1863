"""The real master's operations surface: admin endpoints (JSON shape, metrics that move with
traffic, a row and labelled metrics per proxy process that add up to the server's, readiness
when every worker is stopped, nothing of it on the public port), the access log (combined
format, USR1 after rotation loses no line, a full disk counted and logged sparingly) and
sd_notify (READY only once the workers are healthy; RELOADING/READY around HUP; STOPPING)."""
from __future__ import annotations

import os
import re
import signal
import socket
import time
from pathlib import Path

import pytest
import requests

from master_support import Admin, health, title
from support import children, wait_until

pytestmark = pytest.mark.integration

COMBINED = re.compile(r'^127\.0\.0\.1 - - \[\d\d/\w{3}/\d{4}:\d\d:\d\d:\d\d [+-]\d{4}\] "GET (\S+) HTTP/1\.1" '
                      r'(\d{3}) (\d+|-) "([^"]*)" "([^"]*)" (\d+)$')


WORKER_KEYS = {"address", "host", "port", "local", "pid", "up", "since", "consecutive_failures", "restarts",
               "requests", "in_flight", "last_check_seconds", "last_error", "name", "weight", "effective_weight",
               "slow_start_seconds", "slow_start_until", "ejected", "ejected_until", "ejections"}
WINDOW_KEYS = {"seconds", "requests", "rate_per_second", "p50_seconds", "p99_seconds"}
PROXY_KEYS = {"index", "pid", "ready", "restarts", "requests", "client_connections", "rate"}


def test_status_json_has_the_documented_shape_and_moves_with_traffic(masters, tmp_path, site):
    a = Admin(masters, tmp_path, site)
    pids = a.ready()
    before, metrics_before = a.json(), a.metrics()
    assert set(before) == {"version", "pid", "config", "started", "uptime", "ready", "stopping", "workers",
                           "front_cache", "totals", "proxy", "proxies", "access_log", "tls"}
    assert before["tls"] == {"enabled": False}
    assert before["pid"] == a.master.pid and before["config"] == str(a.master.config_path.resolve())
    assert before["ready"] is True and before["stopping"] is False
    assert [w["port"] for w in before["workers"]] == sorted(a.worker_ports)
    for w in before["workers"]:
        assert set(w) == WORKER_KEYS
        assert w["pid"] == pids[w["port"]] and w["up"] and w["local"] and w["last_check_seconds"] > 0
    assert set(before["totals"]) == {"requests", "responses", "last_10s", "last_5m", "all_time"}
    assert set(before["totals"]["last_10s"]) == WINDOW_KEYS == set(before["totals"]["last_5m"])
    assert set(before["totals"]["responses"]) == {"1xx", "2xx", "3xx", "4xx", "5xx"}
    assert set(before["front_cache"]) == {"enabled", "entries", "bytes", "max_bytes", "hits", "misses", "hit_ratio",
                                          "revalidated", "shared"}

    with requests.Session() as s:
        for i in range(60):
            r = s.get(f"http://127.0.0.1:{a.port}/{'a' if i % 2 else 'b'}.txt", timeout=10)
            assert r.status_code == 200
        for _ in range(5):
            assert s.get(f"http://127.0.0.1:{a.port}/missing", timeout=10).status_code == 404
    time.sleep(1.2)  # one sample of the counters later
    after, metrics_after = a.json(), a.metrics()

    t0, t1 = before["totals"], after["totals"]
    assert t1["requests"] - t0["requests"] == 65
    assert t1["responses"]["2xx"] - t0["responses"]["2xx"] == 60
    assert t1["responses"]["4xx"] - t0["responses"]["4xx"] == 5
    assert t1["last_10s"]["requests"] >= 65 and t1["last_10s"]["rate_per_second"] > 0
    assert 0 < t1["last_5m"]["p50_seconds"] <= t1["last_5m"]["p99_seconds"] < 30
    served = sum(w["requests"] for w in after["workers"]) - sum(w["requests"] for w in before["workers"])
    cache = after["front_cache"]
    assert served + cache["hits"] - before["front_cache"]["hits"] == 65  # each went to a worker or the cache
    assert cache["entries"] >= 2 and cache["hits"] > 0 and 0 < cache["hit_ratio"] <= 1

    def delta(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return metrics_after[key] - metrics_before.get(key, 0.0)

    assert delta("gows_http_request_duration_seconds_count") == 65
    assert delta("gows_http_request_duration_seconds_bucket", le="+Inf") == 65
    assert delta("gows_http_request_duration_seconds_sum") > 0
    assert delta("gows_http_responses_total", code="2xx") == 60
    assert delta("gows_http_responses_total", code="4xx") == 5
    assert delta("gows_front_cache_hits_total") == cache["hits"] - before["front_cache"]["hits"]
    for port in a.worker_ports:
        labels = (("local", "true"), ("name", f"127.0.0.1:{port}"), ("worker", f"127.0.0.1:{port}"))
        assert metrics_after[("gows_worker_up", labels)] == 1
        assert metrics_after[("gows_worker_weight", labels)] == metrics_after[("gows_worker_effective_weight", labels)] == 1
        assert metrics_after[("gows_worker_ejected", labels)] == metrics_after[("gows_worker_ejections_total", labels)] == 0
        assert metrics_after[("gows_worker_restarts_total", labels)] == 0
    assert metrics_after[("gows_ready", ())] == 1
    assert metrics_after[("gows_build_info", (("version", after["version"]),))] == 1


def _per_proxy(metrics: dict[tuple[str, tuple], float], name: str) -> dict[int, float]:
    """{proxy index: value} of a family labelled by proxy process."""
    return {int(dict(labels)["proxy"]): value for (n, labels), value in metrics.items() if n == name}


def _held_connection(port: int) -> socket.socket:
    """A keep-alive client connection that a proxy has accepted and answered once, left open."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(b"GET /a.txt HTTP/1.1\r\nHost: x\r\n\r\n")
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        assert chunk, data
        data += chunk
    assert data.startswith(b"HTTP/1.1 200 "), data
    return sock


def test_each_proxy_process_has_a_row_and_labelled_metrics_that_add_up_to_the_servers(masters, tmp_path, site):
    a = Admin(masters, tmp_path, site, workers=1, proxy={"processes": 2})
    a.ready()
    wait_until(lambda: all(p["ready"] for p in a.json()["proxies"]), timeout=30, message="every proxy ready")
    before, metrics_before = a.json(), a.metrics()
    assert [p["index"] for p in before["proxies"]] == [1, 2]
    for p in before["proxies"]:
        assert set(p) == PROXY_KEYS
        assert p["pid"] in children(a.master.pid) and title(p["pid"]) == f"gows: proxy {p['index']}"
        assert p["restarts"] == 0 and p["rate"] >= 0
    assert _per_proxy(metrics_before, "gows_proxy_up") == {1: 1, 2: 1}
    assert _per_proxy(metrics_before, "gows_proxy_restarts_total") == {1: 0, 2: 0}

    # Requests: each proxy counts its own in shared memory; together they are the server's.
    sent = 40
    for i in range(sent):  # a new connection each, taken by whichever proxy accepts first
        assert a.public(f"/a.txt?n={i}").status_code == 200
    wait_until(lambda: a.json()["totals"]["requests"] - before["totals"]["requests"] == sent, timeout=20,
               message=f"{sent} responses counted")
    after, metrics_after = a.json(), a.metrics()
    served = {p["index"]: p["requests"] - q["requests"] for p, q in zip(after["proxies"], before["proxies"])}
    assert sum(served.values()) == sent, served
    requests_before = _per_proxy(metrics_before, "gows_proxy_requests_total")
    requests_after = _per_proxy(metrics_after, "gows_proxy_requests_total")
    assert {i: requests_after[i] - requests_before[i] for i in requests_after} == served
    total = ("gows_http_requests_total", ())
    assert sum(requests_after.values()) == metrics_after[total] and metrics_after[total] - metrics_before[total] == sent

    # Open connections: each proxy's gauge (refreshed every 0.25 s), summed to the server's.
    held = [_held_connection(a.port) for _ in range(3)]
    try:
        wait_until(lambda: sum(p["client_connections"] for p in a.json()["proxies"]) == 3, timeout=20,
                   message="3 held connections in the proxy rows")
        status, metrics = a.json(), a.metrics()
        assert status["proxy"]["client_connections"] == 3
        assert sum(_per_proxy(metrics, "gows_proxy_client_connections").values()) == 3
        assert ("gows_proxy_client_connections", ()) not in metrics  # only per proxy
    finally:
        for sock in held:
            sock.close()
    wait_until(lambda: sum(_per_proxy(a.metrics(), "gows_proxy_client_connections").values()) == 0, timeout=20,
               message="closed connections gone from the metrics")

    # A proxy killed: its row shows the restart and the new pid, and keeps its count.
    victim = a.json()["proxies"][0]
    os.kill(victim["pid"], signal.SIGKILL)
    respawned = wait_until(lambda: (lambda p: p if p["restarts"] == 1 and p["ready"] else None)(
        a.json()["proxies"][0]), timeout=30, message="proxy 1 restarted and ready")
    assert respawned["pid"] not in (None, victim["pid"]) and title(respawned["pid"]) == "gows: proxy 1"
    assert respawned["requests"] == victim["requests"]
    metrics = a.metrics()
    assert _per_proxy(metrics, "gows_proxy_restarts_total") == {1: 1, 2: 0}
    assert _per_proxy(metrics, "gows_proxy_up") == {1: 1, 2: 1}
    assert _per_proxy(metrics, "gows_proxy_requests_total")[1] == victim["requests"]


def test_metrics_count_a_killed_worker_as_down_then_restarted(masters, tmp_path, site):
    a = Admin(masters, tmp_path, site, workers=1)
    pids = a.ready()
    port = a.worker_ports[0]
    os.kill(pids[port], signal.SIGKILL)
    labels = (("local", "true"), ("name", f"127.0.0.1:{port}"), ("worker", f"127.0.0.1:{port}"))
    wait_until(lambda: a.metrics()[("gows_worker_restarts_total", labels)] == 1, timeout=30,
               message="restart counted")
    wait_until(lambda: a.metrics()[("gows_worker_up", labels)] == 1, timeout=30, message="worker up again")
    worker = a.json()["workers"][0]
    assert worker["restarts"] == 1 and worker["pid"] != pids[port] and worker["up"]


def test_readyz_flips_to_503_when_every_worker_is_stopped_and_back(masters, tmp_path, site):
    # rise 8: a replacement needs about 1.6 s of passed checks, so both workers are down together
    # for a while even though the master replaces the stopped ones at once.
    a = Admin(masters, tmp_path, site, healthCheck={"interval": 0.2, "timeout": 0.5, "rise": 8, "fall": 2,
                                                    "bootTimeout": 30})
    pids = a.ready()
    assert a.get("/healthz").status_code == 200
    r = a.get("/readyz")
    assert (r.status_code, r.text) == (200, "ready: 2 of 2 workers up\n")
    for pid in pids.values():
        os.kill(pid, signal.SIGSTOP)  # alive but not answering: only health checks can tell
    try:
        # (a tuple: a 503 Response is falsy)
        seen, = wait_until(lambda: (lambda r: (r,) if r.status_code == 503 else None)(a.get("/readyz")),
                           timeout=30, interval=0.02, message="/readyz 503")
        assert seen.text == "not ready: no worker is up (0 of 2)\n"
        assert seen.headers["Retry-After"] == "1"
        assert a.get("/healthz").status_code == 200  # the master itself is fine
    finally:
        for pid in pids.values():
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
    # The master replaces the unresponsive workers; readiness comes back with them.
    wait_until(lambda: a.get("/readyz").status_code == 200, timeout=40, message="/readyz 200 again")


def test_admin_paths_are_404_on_the_public_port_and_only_get_head_on_the_admin_port(masters, tmp_path, site):
    a = Admin(masters, tmp_path, site, workers=1)
    a.ready()
    for path in ("/status", "/status.json", "/metrics", "/healthz", "/readyz"):
        public = a.public(path)
        assert public.status_code == 404, path
        assert "gows_" not in public.text and "workers" not in public.text
        assert a.get(path).status_code == 200, path
        assert requests.head(f"http://127.0.0.1:{a.admin_port}{path}", timeout=10).status_code == 200
    assert a.get("/a.txt").status_code == 404  # and the admin port serves no files
    assert a.get("/status/").status_code == 404
    r = requests.post(f"http://127.0.0.1:{a.admin_port}/status", data=b"x", timeout=10)
    assert (r.status_code, r.headers["Allow"]) == (405, "GET, HEAD")
    r = a.get("/", allow_redirects=False)
    assert (r.status_code, r.headers["Location"]) == (302, "/status")
    page = a.get("/status")
    assert page.headers["Content-Type"] == "text/html; charset=utf-8"
    assert "default-src 'none'" in page.headers["Content-Security-Policy"]
    metrics = a.get("/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert metrics.headers["Content-Type"].startswith("application/openmetrics-text")
    assert metrics.text.rstrip().endswith("# EOF")


def _raw_admin(port: int, data: bytes, timeout: float = 15.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        if data:
            s.sendall(data)
        out = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                return out
            out += chunk


def test_admin_listener_refuses_malformed_oversized_and_slow_requests(masters, tmp_path, site, monkeypatch):
    a = Admin(masters, tmp_path, site, workers=1)
    a.ready()
    assert _raw_admin(a.admin_port, b"NOT HTTP\r\n\r\n").startswith(b"HTTP/1.1 400 ")
    big = b"GET /status HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n"
    assert _raw_admin(a.admin_port, big).startswith(b"HTTP/1.1 431 ")
    started = time.monotonic()
    assert _raw_admin(a.admin_port, b"GET /status HTTP/1.1\r\n").startswith(b"HTTP/1.1 408 ")  # never finished
    assert time.monotonic() - started >= 5  # it was given its time first
    assert a.get("/healthz").status_code == 200  # and the listener still serves


def test_clients_that_never_finish_a_request_cannot_keep_the_probes_out(masters, tmp_path, site):
    """With every admin slot held by a client still sending its head, a newcomer takes the place
    of the oldest of them: /healthz and /readyz stay answered (they were reset for 10 s)."""
    from arbiter.ops.admin import MAX_CONNECTIONS
    a = Admin(masters, tmp_path, site, workers=1)
    a.ready()
    stalled = []
    try:
        for _ in range(MAX_CONNECTIONS + 8):
            s = socket.create_connection(("127.0.0.1", a.admin_port), timeout=10)
            s.sendall(b"GET /status HTTP/1.1\r\n")  # and no more
            stalled.append(s)
        for path in ("/healthz", "/readyz"):
            assert _raw_admin(a.admin_port, b"GET " + path.encode() + b" HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 200 ")
    finally:
        for s in stalled:
            s.close()


def test_access_log_is_combined_format_and_usr1_reopens_it_after_rotation(masters, tmp_path, site):
    a = Admin(masters, tmp_path, site, workers=1,
              logging={"level": "info", "accessLog": "access.log", "file": "gows.log"})
    a.ready()
    log_path = tmp_path / "access.log"
    for i in range(20):
        assert a.public(f"/a.txt?n={i}", headers={"User-Agent": "t/1", "Referer": "http://r/"}).status_code == 200
    wait_until(lambda: log_path.exists() and log_path.read_text().count("\n") == 20, timeout=20,
               message="20 access log lines")
    # (lines of different proxy processes may come in another order)
    line = next(x for x in log_path.read_text().splitlines() if "/a.txt?n=0 " in x)
    m = COMBINED.match(line)
    assert m, line
    assert m.groups()[:5] == ("/a.txt?n=0", "200", "6", "http://r/", "t/1")

    log_path.rename(tmp_path / "access.log.1")  # what logrotate does
    for i in range(20, 25):
        a.public(f"/a.txt?n={i}")
    wait_until(lambda: (tmp_path / "access.log.1").read_text().count("\n") == 25, timeout=20,
               message="lines go to the moved file until USR1")
    a.master.signal(signal.SIGUSR1)
    proxies = len(a.json()["proxies"])  # every proxy process writes the log, and reopens it
    wait_until(lambda: (tmp_path / "gows.log").read_text().count("reopened access log") == proxies, timeout=20,
               message="every proxy logs the reopen")
    wait_until(log_path.exists, timeout=10)
    for i in range(25, 40):
        a.public(f"/a.txt?n={i}")
    wait_until(lambda: log_path.read_text().count("\n") == 15, timeout=20, message="15 lines in the new file")
    targets = [COMBINED.match(x).group(1) for x in
               (tmp_path / "access.log.1").read_text().splitlines() + log_path.read_text().splitlines()]
    # None lost, none twice (lines of different proxy processes may come in another order).
    assert sorted(targets, key=lambda t: int(t.rsplit("=", 1)[1])) == [f"/a.txt?n={i}" for i in range(40)]
    assert "/a.txt" not in (tmp_path / "gows.log").read_text()  # workers do not log requests too


def test_access_log_on_a_full_disk_counts_every_lost_line_and_logs_the_error_a_few_times(masters, tmp_path, site):
    a = Admin(masters, tmp_path, site, workers=1, logging={"accessLog": "/dev/full"})  # ENOSPC on every write
    a.ready()
    sent = 300
    with requests.Session() as s:
        for i in range(sent):
            assert s.get(f"http://127.0.0.1:{a.port}/a.txt?n={i}", timeout=10).status_code == 200
    wait_until(lambda: a.json()["access_log"]["dropped"] >= sent, timeout=20, message="every line counted as dropped")
    status = a.json()["access_log"]
    assert status == {"enabled": True, "dropped": status["dropped"], "error": "No space left on device"}
    assert a.metrics()[("gows_access_log_dropped_lines_total", ())] >= sent
    page = a.get("/status").text
    assert '<dd id="f-astate">failing: No space left on device</dd>' in page
    assert re.search(r'<dd id="f-adropped">[\d,]+</dd>', page)
    errors = a.master.count(r"access log: cannot write to /dev/full: No space left on device")
    assert 1 <= errors <= 3, a.master.log()[-3000:]


def test_access_log_to_stdout(masters, tmp_path, site):
    a = Admin(masters, tmp_path, site, workers=1, logging={"accessLog": True})
    a.ready()
    assert a.public("/b.txt?stdout").status_code == 200
    a.master.wait_log(r'"GET /b\.txt\?stdout HTTP/1\.1" 200 7 "-" "python-requests/[^"]+" \d+')


def test_systemd_ready_only_after_workers_are_healthy_then_reloading_and_stopping(masters, tmp_path, site, monkeypatch):
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    try:
        a = Admin(masters, tmp_path, site)
        sock.settimeout(60)
        first = sock.recv(4096).decode()
        # At the moment READY arrives, every worker already answers its health check.
        assert all(health(p) == 200 for p in a.worker_ports)
        assert first.startswith("READY=1\n") and "with 2 of 2 workers up" in first, first
        for pid in a.master.workers().values():  # no worker can speak for the master
            assert b"NOTIFY_SOCKET=" not in Path(f"/proc/{pid}/environ").read_bytes()
        assert a.master.count(r"worker 127\.0\.0\.1:\d+ is up") == 2

        a.master.signal(signal.SIGHUP)
        assert sock.recv(4096).decode().startswith("RELOADING=1\nMONOTONIC_USEC=")
        ready = sock.recv(4096).decode()
        assert ready.startswith("READY=1\nSTATUS=reloaded"), ready
        assert "reload done" in a.master.log()

        a.master.signal(signal.SIGTERM)
        assert sock.recv(4096).decode().startswith("STOPPING=1")
        a.master.proc.wait(30)
    finally:
        sock.close()
