"""Worker slot pieces: the command line matches fileapp's CLI, back-off, exit descriptions and causes."""
from __future__ import annotations

import os
import signal
import sys

import pytest

from arbiter.backoff import Backoff, Pool
from arbiter.config import load_data
from arbiter.incarnation import describe_exit, killed_from_outside
from arbiter.worker_command import WorkerOptions, worker_argv
from fileapp.__main__ import make_parser

pytestmark = pytest.mark.unit


def test_worker_command_line_is_accepted_by_fileapp_and_carries_the_settings(tmp_path):
    (tmp_path / "www").mkdir()
    config = load_data({"baseDirectory": "www", "workerCount": 1, "threads": 7, "gracefulTimeout": 2.5,
                        "healthCheck": {"path": "/hc"}, "cache": {"ttl": 0.5, "maxBytes": 1000, "maxFileSize": 10, "etag": "content"},
                        "logging": {"level": "warning", "accessLog": True}}, tmp_path / "gows.conf.json")
    argv = worker_argv(WorkerOptions.from_config(config), 5, "127.0.0.1", 9001)
    assert argv[:3] == [sys.executable, "-m", "fileapp"]
    args = make_parser().parse_args(argv[3:])
    assert (args.root, args.fd, args.port, args.threads) == (str((tmp_path / "www").resolve()), 5, 9001, 7)
    assert (args.health_path, args.cache_ttl, args.cache_max_bytes, args.cache_max_file_size) == ("/hc", 0.5, 1000, 10)
    assert args.etag == "content"
    # The master writes the access log: workers must not log every request a second time.
    assert (args.graceful_timeout, args.log_level, args.access_log, args.parent_pid) == (2.5, "warning", False, os.getpid())


def test_backoff_is_zero_for_one_failure_then_doubles_up_to_the_cap():
    b = Backoff()
    delays = []
    for _ in range(8):
        b.failures += 1
        delays.append(b.delay(0.5, 5.0))
    assert delays == [0.0, 0.5, 1.0, 2.0, 4.0, 5.0, 5.0, 5.0]
    b.failures = 0
    assert b.delay(0.5, 5.0) == 0.0
    b.failures = 5000  # a crash loop of hours: the delay stays at the cap (before: OverflowError)
    assert b.delay(0.5, 5.0) == 5.0


def test_failed_rescues_make_the_next_wait_from_initial_doubling_to_the_cap_until_a_worker_is_up():
    pool = Pool()
    assert pool.rescue_in() == 0.0
    assert [pool.rescue_failed(0.5, 3.0) for _ in range(5)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    assert 2.5 < pool.rescue_in() <= 3.0 and pool.rescues_failed == 5
    pool.worker_up()
    assert pool.rescue_in() == 0.0 and pool.rescues_failed == 0
    assert pool.rescue_failed(0.5, 3.0) == 0.5
    assert [pool.rescue_failed(0.5, 3.0) for _ in range(5000)][-1] == 3.0


def test_exit_descriptions():
    assert describe_exit(0) == "exited with status 0"
    assert describe_exit(2) == "exited with status 2"
    assert describe_exit(-signal.SIGKILL) == "was killed by SIGKILL"


def test_only_a_signal_from_outside_is_no_crash_loop_evidence():
    for sig in (signal.SIGKILL, signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP):
        assert killed_from_outside(-sig), sig.name
    for sig in (signal.SIGSEGV, signal.SIGABRT, signal.SIGBUS, signal.SIGFPE, signal.SIGILL):
        assert not killed_from_outside(-sig), sig.name  # the worker's own fault
    assert not killed_from_outside(0) and not killed_from_outside(2) and not killed_from_outside(None)


def test_handover_keeps_a_reloaded_worker_up_without_a_transition():
    from arbiter.state import WorkerState, WorkerTable
    table = WorkerTable(rise=1)
    worker = table.add(WorkerState("127.0.0.1", 9001))
    events = []
    table.subscribe(lambda w, up: events.append(up))
    table.spawned(worker, 100)
    table.record_check(worker, True, 0.001)
    table.record_passive_failure(worker, "reset")
    generation = table.generation
    table.handover(worker, 200)
    assert worker.up and worker.pid == 200 and worker.passive_failure_times == []
    assert events == [True] and table.generation == generation and table.healthy == (worker,)
