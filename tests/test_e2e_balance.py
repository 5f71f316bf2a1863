"""Balancing policies of a real master, observed through the workers' own file caches: with a
long worker cache TTL, a worker that served a file keeps its old bytes after the file changes,
one that never served it reads the new ones. So asking each worker directly, after a change,
tells which workers the master sent each path to."""
from __future__ import annotations

import signal
from pathlib import Path

import pytest

from e2e_support import fetch
from master_support import Master, serving

pytestmark = pytest.mark.integration

WORKERS = 3


@pytest.fixture
def site(tmp_path: Path) -> Path:
    root = tmp_path / "www"
    root.mkdir()
    return root


def _served_by(m: Master, site: Path, paths: list[str], requests: int) -> dict[str, set[int]]:
    """GET each path `requests` times through the master, change the files, then find for each
    path the workers that still hold the old bytes (the ones that served it)."""
    for p in paths:
        (site / p[1:]).write_bytes(b"old " + p.encode())
    for p in paths:
        for _ in range(requests):
            status, _, body = fetch(m.port, "GET", p)
            assert (status, body) == (200, b"old " + p.encode())
    for p in paths:
        (site / p[1:]).write_bytes(b"the new " + p.encode())
    served: dict[str, set[int]] = {p: set() for p in paths}
    for p in paths:
        for port in m.worker_ports:
            status, _, body = fetch(port, "GET", p)
            assert status == 200 and body in (b"old " + p.encode(), b"the new " + p.encode())
            if body.startswith(b"old"):
                served[p].add(port)
    return served


def test_round_robin_spreads_consistent_hash_keeps_a_path_on_one_worker_and_moves_only_a_leavers_share(tmp_path, site):
    m = serving(tmp_path, site, WORKERS, cache={"ttl": 600}, frontCache={"enabled": False},
                proxy={"balance": "round-robin", "processes": 1})  # (each proxy takes its own turns)
    with m:
        # Round robin: 12 paths once each, in turn over the 3 workers; one path 3 times in a row.
        served = _served_by(m, site, [f"/rr{i:02}.txt" for i in range(12)], 1)
        assert all(len(ports) == 1 for ports in served.values()), served
        shares = [sum(port in ports for ports in served.values()) for port in m.worker_ports]
        assert shares == [4, 4, 4], served
        assert _served_by(m, site, ["/rr-same.txt"], WORKERS)["/rr-same.txt"] == set(m.worker_ports)

        # The policy comes from the config: a reload switches it (and replaces the workers).
        m.config["proxy"]["balance"] = "consistent-hash"
        m.write_config(m.config)
        m.signal(signal.SIGHUP)
        m.wait_log(rf"reload done: {WORKERS} local workers \(0 added, {WORKERS} replaced", timeout=60)
        # The replaced processes drain on the same ports: until they are gone, asking a port
        # directly may reach one of them, which never served the paths asked for below.
        m.wait_log(r"worker 127\.0\.0\.1:\d+ \(pid \d+\) (exited|was killed)", count=WORKERS, timeout=30)
        workers = m.workers()

        # Consistent hashing: every path is served by one worker, however often it is asked for,
        # and the paths are spread over the workers.
        served = _served_by(m, site, [f"/ch{i:02}.txt" for i in range(24)], 3)
        assert m.workers() == workers, m.log()[-3000:]  # (a new process would hold no cache)
        assert all(len(ports) == 1 for ports in served.values()), served
        owner = {p: ports.pop() for p, ports in served.items()}
        assert len(set(owner.values())) >= 2, owner

        # A worker leaving moves only its share: every other path stays on its worker, which
        # still answers from its cache with the old bytes; the leaver's paths go elsewhere.
        leaver = max(m.worker_ports)
        assert leaver in owner.values(), owner  # 24 paths on 3 workers: it has its share
        m.signal(signal.SIGTTOU)
        m.wait_log(rf"SIGTTOU: stopping worker 127\.0\.0\.1:{leaver}")
        for p, port in owner.items():
            body = fetch(m.port, "GET", p)[2]
            assert body == (b"the new " if port == leaver else b"old ") + p.encode(), (p, port, leaver)
