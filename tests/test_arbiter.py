"""The real master (`python -m arbiter`) on ephemeral ports: start, heal, back off, reload,
scale, stop; every claim of issue 3's "Done when" with assertions."""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import time
from pathlib import Path

import pytest
import requests

from master_support import (Admin, Hammer, Master, base_config, children, free_port_run, health, title, wait_gone)
from support import free_port, free_ports, pid_alive, refused, wait_until

pytestmark = pytest.mark.integration


@pytest.fixture
def site(tmp_path: Path) -> Path:
    root = tmp_path / "www"
    root.mkdir()
    (root / "a.txt").write_text("alpha\n")
    return root


def start(masters, directory: Path, config: dict) -> Master:
    m = Master(directory, config)
    masters.append(m)
    return m


def test_seed_config_of_the_proof_of_concept_works(masters, tmp_path, site):
    *ports, master_port = free_ports(3)
    config = {"workers": [{"host": "127.0.0.1", "port": p} for p in ports], "baseDirectory": "www",
              "masterPort": master_port}
    m = start(masters, tmp_path, config)
    pids = m.wait_workers(ports)
    for port in ports:
        assert requests.get(f"http://127.0.0.1:{port}/a.txt", timeout=10).text == "alpha\n"
        assert title(pids[port]) == f"gows: worker :{port}"
    assert title(m.pid) == "gows: master"
    with socket.create_connection(("127.0.0.1", master_port), timeout=5):
        pass  # the master holds the public port
    m.wait_log(r"worker 127\.0\.0\.1:\d+ is up", count=2)


def test_n_workers_come_up_and_pass_health_checks(masters, tmp_path, site):
    base = free_port_run(3)
    config = base_config(site, free_port(), [])
    del config["workers"]
    config.update(workerCount=3, workerBasePort=base)
    m = start(masters, tmp_path, config)
    ports = [base, base + 1, base + 2]
    m.wait_workers(ports)
    log = m.wait_log(r"is up \(2 checks passed\)", count=3)
    for port in ports:
        assert f"worker 127.0.0.1:{port} is up" in log
    assert len([p for p in children(m.pid) if title(p).startswith("gows: worker")]) == 3


def test_a_check_interval_longer_than_the_boot_timeout_still_lets_a_worker_come_up(masters, tmp_path, site):
    port, listen = free_ports(2)
    config = base_config(site, listen, [port])
    config["healthCheck"].update(interval=60, bootTimeout=10)  # rise 2: two passes 60s apart
    m = start(masters, tmp_path, config)
    m.wait_workers([port])
    m.wait_log(r"worker 127\.0\.0\.1:\d+ is up", timeout=10)
    assert requests.get(f"http://127.0.0.1:{m.port}/a.txt", timeout=10).text == "alpha\n"
    assert m.count("did not become healthy") == 0


def test_a_request_sent_while_the_workers_still_start_is_served_not_refused(masters, tmp_path, site):
    """The listener is bound before anything else starts: a client that connects at once waits
    (in the backlog, then held by a proxy) until a worker is up, as in front of gunicorn's
    arbiter, rather than getting 503 during the first seconds."""
    port, worker = free_ports(2)
    config = base_config(site, port, [worker])
    config["healthCheck"].update(interval=0.5, rise=4)  # up at least 1.5 s after it answers
    m = start(masters, tmp_path, config)
    with socket.socket() as s:
        s.settimeout(30)
        wait_until(lambda: s.connect_ex(("127.0.0.1", port)) == 0, timeout=30, message="the listener")
        s.sendall(b"GET /a.txt HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        assert "is up" not in m.log()  # (sent before any worker was up)
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b"\r\n\r\nalpha\n"), answer[:200]


def test_kill_9_worker_is_back_healthy_on_the_same_port_and_no_connection_is_refused(masters, tmp_path, site):
    a = Admin(masters, tmp_path, site)
    before = a.ready()
    victim, twin = a.worker_ports
    m = a.master
    with Hammer(victim) as hammer:
        time.sleep(0.3)
        os.kill(before[victim], signal.SIGKILL)
        killed = time.monotonic()
        wait_until(lambda: worker_pid(a, victim, up=True) not in (None, before[victim]), timeout=30,
                   message="the victim's replacement up in status.json")
        print(f"the replacement was up {time.monotonic() - killed:.2f}s after the kill")
        time.sleep(0.3)
    after = m.workers()
    assert after[victim] != before[victim] and after[twin] == before[twin]
    assert health(victim) == 200
    assert f"worker 127.0.0.1:{victim} (pid {before[victim]}) was killed by SIGKILL" in m.log()
    assert hammer.refused() == []
    # A connection made while no process served the port waited in the backlog and was served.
    served_late = [r for r in hammer.results if killed < r[0] and r[1] > killed + 0.05 and r[2] == 200]
    assert served_late, hammer.results[-20:]
    # Only a request in flight on the killed process may have been cut.
    assert len(hammer.failed()) <= 1, hammer.failed()


def test_stopped_worker_is_replaced_after_fall_checks(masters, tmp_path, site):
    listen, *ports = free_ports(2)
    m = start(masters, tmp_path, base_config(site, listen, ports))
    before = m.wait_workers(ports)
    m.wait_log("is up")
    os.kill(before[ports[0]], signal.SIGSTOP)
    try:
        log = m.wait_log(rf"worker 127\.0\.0\.1:{ports[0]} \(pid {before[ports[0]]}\) failed 3 health checks", timeout=30)
        assert f"worker 127.0.0.1:{ports[0]} is down (3 checks failed: no answer within 1s)" in log
        wait_gone([before[ports[0]]], timeout=20)  # the stopped one was continued, told to TERM, gone
        after = m.wait_workers(ports)
        assert after[ports[0]] != before[ports[0]]
        m.wait_log(rf"worker 127\.0\.0\.1:{ports[0]} is up", count=2)
    finally:
        if pid_alive(before[ports[0]]):
            os.kill(before[ports[0]], signal.SIGCONT)


def test_crash_loop_backs_off_exponentially_but_keeps_one_worker_starting_then_recovers(masters, tmp_path, site):
    *ports, listen = free_ports(3)
    config = base_config(site, listen, ports)
    config["restartBackoff"] = {"initial": 0.2, "max": 1.6, "minUptime": 1}
    m = start(masters, tmp_path, config)
    m.wait_workers(ports)
    m.wait_log("is up", count=2)
    hidden = site.with_name("hidden")
    site.rename(hidden)  # health turns 503; every new worker exits: its root is gone
    try:
        m.wait_log(r"restarting it now instead of in [\d.]+s: no local worker is up or starting", timeout=60)
        log = m.wait_log(r"restarting it in 1\.60s", count=2, timeout=60)
    finally:
        hidden.rename(site)
    for port in ports:
        assert f"worker 127.0.0.1:{port} is down (3 checks failed: HTTP 503)" in log
    # Each slot that waits doubles its delay up to the cap; one slot at a time is started at once
    # instead, so the pool always has a worker on its way (but not every slot spins).
    waited = []
    for port in ports:
        delays = [float(d) for d in re.findall(rf"worker 127\.0\.0\.1:{port} failed \d+ times in a row right after "
                                               r"starting \(last: exited with status 2\); restarting it in ([\d.]+)s", log)]
        assert delays == sorted(delays) and set(delays) <= {0.2, 0.4, 0.8, 1.6}, delays
        waited += delays
    assert waited.count(1.6) >= 2, waited
    m.wait_workers(ports)
    for port in ports:
        m.wait_log(rf"worker 127\.0\.0\.1:{port} is up", count=2, timeout=30)


def start_times(log: str) -> list[float]:
    """When the master logged each worker start, in seconds (its log's clock)."""
    return [time.mktime(time.strptime(stamp, "%Y-%m-%d %H:%M:%S")) + int(ms) / 1000
            for stamp, ms in re.findall(r"^(\S+ \S+),(\d+) .*started worker", log, re.M)]


def test_workers_that_cannot_start_at_all_are_retried_at_the_back_off_pace_not_process_start_pace(
        masters, tmp_path, site):
    """Every worker exits by itself at start, for as long as its root is gone: the rescue (no
    local worker up or starting) backs off too, doubling to restartBackoff.max, instead of
    starting one worker after another at process-start speed (about 9 a second, a core and two
    log lines each); a worker then found up again resets it."""
    *ports, listen = free_ports(3)
    config = base_config(site, listen, ports)
    config["restartBackoff"] = {"initial": 0.25, "max": 2, "minUptime": 1}
    m = start(masters, tmp_path, config)
    m.wait_workers(ports)
    m.wait_log("is up", count=2)
    hidden = site.with_name("hidden")
    site.rename(hidden)
    try:
        m.wait_log(r"right after starting \(last: [^)]*\); restarting it in 2\.00s", count=2, timeout=60)
        first = len(start_times(m.log()))
        log = m.wait_log("started worker", count=first + 12, timeout=90)
    finally:
        hidden.rename(site)
    # Each slot starts at most once per 2 s of its own, and the rescues at most once per 2 s
    # between them: 12 starts take at least 6 s (before: about 1.5 s).
    starts = start_times(log)[first:first + 12]
    assert starts[-1] - starts[0] >= 4.0, starts
    assert re.search(r"because no local worker was up or starting, and it exited before it was up "
                     r"\(\d+ such in a row\): the next such start waits 2\.00s", log)
    m.wait_workers(ports)
    for port in ports:
        m.wait_log(rf"worker 127\.0\.0\.1:{port} is up", count=2, timeout=30)


def worker_pid(admin: Admin, port: int, up: bool = False) -> int | None:
    """The pid /status.json gives the worker on `port` (with `up`, only once it is up)."""
    w = next(w for w in admin.json()["workers"] if w["port"] == port)
    return w["pid"] if w["up"] or not up else None


def test_a_healthy_worker_killed_again_and_again_restarts_at_once_every_time(masters, tmp_path, site):
    """Back-off is for crash loops: a worker that had become healthy and is then SIGKILLed (as the
    OOM killer does) is restarted at once, however often, while its twin keeps serving."""
    initial = 15.0  # far above any restart, however loaded the machine: "at once" is unmistakable
    a = Admin(masters, tmp_path, site, restartBackoff={"initial": initial, "max": 30, "minUptime": 60})
    pids = a.ready()
    victim, twin = a.worker_ports
    gaps = []
    for _ in range(4):
        pid = wait_until(lambda: worker_pid(a, victim, up=True), timeout=30, interval=0.02,
                         message="the victim up in status.json")
        os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()
        wait_until(lambda: worker_pid(a, victim) not in (None, pid), timeout=30, interval=0.005,
                   message="a new incarnation of the victim")
        gaps.append(time.monotonic() - killed)
    assert max(gaps) < initial, f"seconds from each kill to the next incarnation: {gaps}"
    assert worker_pid(a, twin) == pids[twin]
    assert "restarting it in" not in a.master.log()


def test_workers_killed_as_soon_as_they_start_always_leave_one_starting(masters, tmp_path, site):
    """Every incarnation of both workers is SIGKILLed as soon as the master reports it: both slots
    count failures and back off, yet never both at once: when neither has a worker up or
    starting, one starts at once."""
    initial = 6.0  # both slots empty that long would be the back-off, not a slow machine
    a = Admin(masters, tmp_path, site, restartBackoff={"initial": initial, "max": 8, "minUptime": 60})
    a.ready()
    killed: set[int] = set()
    empty_since = None
    while len(killed) < 16:
        pids = [w["pid"] for w in a.json()["workers"]]
        now = time.monotonic()
        if all(p is None for p in pids):
            empty_since = empty_since or now
            assert now - empty_since < initial, f"no worker up or starting for {now - empty_since:.2f}s"
        else:
            empty_since = None
        for pid in pids:
            if pid is not None and pid not in killed and pid in children(a.master.pid):
                os.kill(pid, signal.SIGKILL)
                killed.add(pid)
        time.sleep(0.005)
    assert "restarting it in" in a.master.log()  # back-off still holds the other slot back
    a.ready()


def test_hup_with_changed_worker_count_converges_without_a_failed_request(masters, tmp_path, site):
    *ports, listen = free_ports(4)
    config = base_config(site, listen, ports[:2])
    m = start(masters, tmp_path, config)
    first = m.wait_workers(ports[:2])
    m.wait_log("is up", count=2)

    config["workers"].append({"host": "127.0.0.1", "port": ports[2]})
    config["threads"] = 2
    m.write_config(config)
    with Hammer(ports[0]) as hammer:
        time.sleep(0.2)
        m.signal(signal.SIGHUP)
        m.wait_log(r"reload done: 3 local workers \(1 added, 2 replaced, 0 failed", timeout=60)
        time.sleep(0.2)
    wait_gone(first.values())  # the old incarnations drained and exited
    second = m.wait_workers(ports)
    assert all(second[p] != first[p] for p in ports[:2]), "kept workers are replaced with the new settings"
    assert hammer.results and hammer.failed() == []

    del config["workers"][1:]
    m.write_config(config)
    m.signal(signal.SIGHUP)
    m.wait_log(r"reload done: 1 local workers \(0 added, 1 replaced, 0 failed to reload, 2 stopped\)", timeout=60)
    wait_gone(second.values())
    third = m.wait_workers(ports[:1])
    for port in ports[1:]:  # (its socket is closed once the stopped worker has been reaped)
        wait_until(lambda: refused(port), timeout=10, message=f"port {port} refusing")

    # A broken config on HUP changes nothing.
    m.config_path.write_text(json.dumps({**config, "threads": "many"}))
    m.signal(signal.SIGHUP)
    m.wait_log(r"reload failed, keeping the running configuration: .*threads: must be an integer")
    time.sleep(0.5)
    assert m.workers() == third and health(ports[0]) == 200


def test_ttin_and_ttou_change_the_count_never_below_one(masters, tmp_path, site):
    base = free_port_run(4)
    config = base_config(site, free_port(), [])
    del config["workers"]
    config.update(workerCount=2, workerBasePort=base)
    m = start(masters, tmp_path, config)
    first = m.wait_workers([base, base + 1])

    m.signal(signal.SIGTTIN)
    m.wait_log(rf"SIGTTIN: added worker 127\.0\.0\.1:{base + 2}; 3 local workers")
    grown = m.wait_workers([base, base + 1, base + 2])
    assert {p: grown[p] for p in first} == first

    for expected in (2, 1):
        m.signal(signal.SIGTTOU)
        m.wait_log(rf"SIGTTOU: stopping worker 127\.0\.0\.1:\d+; {expected} local workers")
        m.wait_workers([base + i for i in range(expected)])
    m.signal(signal.SIGTTOU)
    m.wait_log("SIGTTOU ignored: keeping the last local worker")
    assert list(m.workers()) == [base]
    wait_gone([grown[base + 1], grown[base + 2]])


def test_term_drains_workers_and_leaves_no_process_behind(masters, tmp_path, site):
    *ports, listen = free_ports(3)
    m = start(masters, tmp_path, base_config(site, listen, ports, pidfile="gows.pid"))
    pids = m.wait_workers(ports)
    pidfile = tmp_path / "gows.pid"
    assert pidfile.read_text() == f"{m.pid}\n"
    m.signal(signal.SIGTERM)
    assert m.proc.wait(60) == 0
    assert not any(pid_alive(p) for p in pids.values())
    log = m.log()
    for port, pid in pids.items():
        assert f"worker 127.0.0.1:{port} (pid {pid}) exited with status 0" in log
    assert "stopping gracefully" in log and not pidfile.exists()


def test_int_stops_at_once(masters, tmp_path, site):
    listen, *ports = free_ports(2)
    m = start(masters, tmp_path, base_config(site, listen, ports, gracefulTimeout=60))
    pids = m.wait_workers(ports)
    m.signal(signal.SIGINT)
    assert m.proc.wait(30) == 0
    assert not any(pid_alive(p) for p in pids.values())
    assert "stopping now" in m.log()


def test_sigkill_of_the_master_leaves_no_worker_behind(masters, tmp_path, site):
    *ports, listen = free_ports(3)
    m = start(masters, tmp_path, base_config(site, listen, ports))
    pids = list(m.wait_workers(ports).values())
    m.proc.kill()
    killed = time.monotonic()
    m.proc.wait(10)
    wait_gone(pids, timeout=30)
    print(f"every worker gone {time.monotonic() - killed:.2f}s after the master")


def test_usr1_reopens_the_log_file_for_master_and_workers(masters, tmp_path, site):
    listen, *ports = free_ports(2)
    m = start(masters, tmp_path, base_config(site, listen, ports, logging={"file": "gows.log"}))
    pids = m.wait_workers(ports)
    logfile = tmp_path / "gows.log"
    wait_until(lambda: "is up" in logfile.read_text())
    logfile.rename(tmp_path / "gows.log.1")
    m.signal(signal.SIGUSR1)
    wait_until(lambda: logfile.exists() and "reopened log file" in logfile.read_text())
    os.kill(pids[ports[0]], signal.SIGKILL)  # the master logs it; the new worker logs its start
    new_pid = wait_until(lambda: m.workers().get(ports[0]) not in (None, pids[ports[0]]) and m.workers()[ports[0]])
    wait_until(lambda: f"fileapp worker {new_pid} serving" in logfile.read_text(), timeout=20)
    text = logfile.read_text()
    assert "was killed by SIGKILL" in text and "was killed by SIGKILL" not in (tmp_path / "gows.log.1").read_text()


def test_boot_timeout_kills_and_retries_a_worker_then_hup_fixes_it(masters, tmp_path, site):
    listen, *ports = free_ports(2)
    config = base_config(site, listen, ports)
    config["healthCheck"]["bootTimeout"] = 0.05  # no worker can answer this soon after exec
    m = start(masters, tmp_path, config)
    log = m.wait_log(r"restarting it in 0\.40s", timeout=60)
    assert log.count(f"worker 127.0.0.1:{ports[0]} is up") == 0
    assert len(re.findall(rf"worker 127\.0\.0\.1:{ports[0]} \(pid \d+\) did not become healthy within 0\.05s", log)) >= 3
    config["healthCheck"]["bootTimeout"] = 15
    m.write_config(config)
    m.signal(signal.SIGHUP)
    m.wait_log(rf"worker 127\.0\.0\.1:{ports[0]} is up", timeout=60)
    m.wait_workers(ports)


def test_hup_whose_new_worker_fails_keeps_the_old_one_serving(masters, tmp_path, site):
    listen, *ports = free_ports(2)
    config = base_config(site, listen, ports)
    config["healthCheck"]["bootTimeout"] = 2
    m = start(masters, tmp_path, config)
    before = m.wait_workers(ports)
    m.wait_log("is up")
    # Clients of the master: a connection straight to the worker's port could reach the new
    # process before the test stops it, and be cut when the master makes it quit.
    with Hammer(m.port) as hammer:
        m.signal(signal.SIGHUP)  # same config: HUP still replaces every worker (new code, new settings)
        # The new incarnation hangs: stopped after its exec, before it can answer a single probe.
        new = wait_until(lambda: [p for p in children(m.pid) if p != before[ports[0]]
                                  and title(p).startswith("gows: worker")], interval=0.005)[0]
        os.kill(new, signal.SIGSTOP)
        m.wait_log(rf"reload of worker 127\.0\.0\.1:{ports[0]} failed: the new process did not become healthy "
                   rf"within 2s \(no answer within [\d.]+s\); pid {before[ports[0]]} keeps serving", timeout=60)
        assert health(ports[0]) == 200 and pid_alive(before[ports[0]]) and before[ports[0]] in children(m.pid)
    wait_gone([new])  # told to quit (and continued) by the master
    assert hammer.results and hammer.failed() == []
    assert "reload done: 1 local workers (0 added, 0 replaced, 1 failed to reload, 0 stopped)" in m.log()


def test_workers_and_all_their_threads_run_sched_batch(masters, tmp_path, site):
    """Workers woken by the proxy must not preempt it: they run SCHED_BATCH, threads included."""
    base = free_port_run(1)
    listen = free_port()
    m = start(masters, tmp_path, base_config(site, listen, [base]))
    pid = m.wait_workers([base])[base]
    m.wait_log(r"is up \(2 checks passed\)")
    for _ in range(3):  # requests make gthread start its pool threads
        assert requests.get(f"http://127.0.0.1:{listen}/a.txt", timeout=10).status_code == 200
    threads = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    assert len(threads) > 1
    assert {os.sched_getscheduler(t) for t in threads} == {os.SCHED_BATCH}
    assert os.sched_getscheduler(m.pid) == os.SCHED_OTHER  # the proxy keeps the normal policy


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_the_master_and_its_workers_log_lines_of_one_format(masters, tmp_path, site, fmt):
    *ports, listen = free_ports(3)
    m = start(masters, tmp_path, base_config(site, listen, ports, logging={"format": fmt}))
    m.wait_workers(ports)
    m.wait_log(r"ready: all 2 workers up")
    m.signal(signal.SIGTERM)
    m.proc.wait(30)
    lines = [line for line in m.log().splitlines() if line.strip()]
    if fmt == "json":
        entries = [json.loads(line) for line in lines]  # every line, the master's and the workers'
    else:
        pattern = re.compile(r"(\S+ \S+) \[(\d+)\] \[([A-Z]+)\] ([\w.]+)(?::(\d+))?: (.*)")
        assert all(pattern.fullmatch(line) for line in lines), [x for x in lines if not pattern.fullmatch(x)][:3]
        entries = [dict(zip(("time", "pid", "level", "logger", "port", "message"), pattern.fullmatch(line).groups()))
                   for line in lines]
    masters_lines = [e for e in entries if e["logger"] == "gows.arbiter"]
    workers_lines = [e for e in entries if e["logger"] == "gows.worker"]
    assert masters_lines and {int(e["port"]) for e in workers_lines} == set(ports)
    assert {int(e["pid"]) for e in masters_lines} == {m.pid}


def test_int_during_a_graceful_stop_ends_the_wait_for_in_flight_downloads(masters, tmp_path, site):
    with open(site / "huge.bin", "wb") as f:
        f.truncate(1 << 30)  # sparse: costs no disk
    listen, *ports = free_ports(2)
    m = start(masters, tmp_path, base_config(site, listen, ports, gracefulTimeout=120,
                                             proxy={"responseTimeout": 300}))
    m.wait_workers(ports)
    m.wait_log(r"ready: all 1 workers up")
    with socket.create_connection(("127.0.0.1", m.port), timeout=10) as reader:
        reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        reader.sendall(b"GET /huge.bin HTTP/1.1\r\nHost: t\r\n\r\n")
        assert reader.recv(100).startswith(b"HTTP/1.1 200")  # then it reads no more: a download in flight
        m.signal(signal.SIGTERM)
        m.wait_log(r"stopping gracefully")
        m.signal(signal.SIGINT)
        started = time.monotonic()
        m.proc.wait(150)  # the graceful timeout (120 s) no longer applies
        assert time.monotonic() - started < 30, f"exited {time.monotonic() - started:.1f}s after SIGINT"
    assert "stopping now" in m.log()


def test_hup_with_a_config_the_system_refuses_keeps_serving(masters, tmp_path, site):
    """A reload whose config names what the operating system refuses (a symlink loop, a name too
    long) fails in one line like any other mistake; the running master keeps serving."""
    listen, *ports = free_ports(2)
    config = base_config(site, listen, ports)
    m = start(masters, tmp_path, config)
    m.wait_workers(ports)
    m.wait_log("is up")
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    for count, root in enumerate((str(tmp_path / "loop"), "x" * 300), start=1):
        m.write_config(dict(config, baseDirectory=root))
        m.signal(signal.SIGHUP)
        m.wait_log("reload failed, keeping the running configuration: .*baseDirectory: ", count=count)
        assert pid_alive(m.pid) and requests.get(f"http://127.0.0.1:{listen}/a.txt", timeout=10).text == "alpha\n"
    assert "Traceback" not in m.log()


def test_usr2_is_logged_and_ignored_not_the_end_of_the_master(masters, tmp_path, site):
    """gunicorn's USR2 re-execs for an upgrade; gows does not, and must not die of it either
    (the signal's default action) with no drain and its pidfile left behind."""
    listen, *ports = free_ports(2)
    m = start(masters, tmp_path, base_config(site, listen, ports))
    m.wait_workers(ports)
    m.wait_log("is up")
    m.signal(signal.SIGUSR2)
    m.wait_log("SIGUSR2 ignored")
    assert pid_alive(m.pid) and requests.get(f"http://127.0.0.1:{listen}/a.txt", timeout=10).text == "alpha\n"


def test_hup_while_a_retired_worker_drains_waits_for_its_port(masters, tmp_path, site):
    """TTOU retires the last worker, which drains a download; a HUP of a config still listing
    its port binds that port once the drain is over, instead of failing the whole reload with
    "address already in use" against the master's own socket."""
    (site / "big.bin").write_bytes(os.urandom(1) * (64 << 20))
    base = free_port_run(3)
    config = base_config(site, free_port(), [], gracefulTimeout=60)
    del config["workers"]
    config.update(workerCount=3, workerBasePort=base)
    m = start(masters, tmp_path, config)
    m.wait_workers([base, base + 1, base + 2])
    m.wait_log("is up", count=3)
    with socket.create_connection(("127.0.0.1", base + 2), timeout=10) as slow:
        slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        slow.sendall(b"GET /big.bin HTTP/1.1\r\nHost: x\r\n\r\n")
        assert slow.recv(64).startswith(b"HTTP/1.1 200")  # the download holds the worker draining
        m.signal(signal.SIGTTOU)
        m.wait_log(rf"SIGTTOU: stopping worker 127\.0\.0\.1:{base + 2}; 2 local workers")
        m.signal(signal.SIGHUP)  # the config still says 3 workers
        m.wait_log("reload: waiting for 1 retired worker")
    m.wait_log(r"reload done: 3 local workers \(1 added", timeout=60)
    assert "address already in use" not in m.log()
    m.wait_workers([base, base + 1, base + 2])
