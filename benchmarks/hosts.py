"""`make bench ARGS=hosts`: an edge gows in front of three node gows, each host in its own network
namespace (netns.py; root only), loaded by wrk from the edge's namespace with uniformly random
GETs over a working set three times one node's front cache.

Reported per edge policy (round robin, consistent hash): requests per second and the aggregate
front-cache hit ratio of the nodes (the sum of their hits over the sum of their lookups, from
each node's status.json, over the measured run only). With round robin every node sees every
file and holds a third of them; with consistent hashing each file lives on one node, so the
three caches hold the whole working set between them. The nodes are restarted for each policy
(empty caches), warmed with one run, then measured.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .loads import parse_wrk, wrk_files_script
from .netns import Host, Network, inside, remove_leftovers

PYTHON = sys.executable
PORT, ADMIN, WORKER = 8080, 9000, 9001
FILE_BYTES = 8 * 1024  # under fileapp.handoff.MIN_SIZE: the front cache keeps the bytes
# What one such entry costs a front cache: the body twice (also joined to its head, proxy/cache.py
# JOIN_LIMIT), its prepared heads and ENTRY_OVERHEAD; measured 19,400 B (status.json bytes / entries).
ENTRY_BYTES = 2 * FILE_BYTES + 3300
EDGE_THREADS = 64
POLICIES = ("round-robin", "consistent-hash")


def _progress(message: str) -> None:
    print(f"[hosts] {message}", file=sys.stderr, flush=True)


def _status(host: Host, port: int) -> dict:
    import urllib.request
    with inside(host.ns):
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/status.json", timeout=5) as r:
            return json.load(r)


def _wait(what: str, predicate, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{what}: not within {timeout:g}s")


class Run:
    """The hosts and the gows processes on them."""

    def __init__(self, work: Path, cache_bytes: int) -> None:
        self.work = work
        self.cache_bytes = cache_bytes
        self.files = 3 * cache_bytes // ENTRY_BYTES
        self.site = work / "site"
        self.site.mkdir()
        for i in range(self.files):
            (self.site / f"f{i}.bin").write_bytes(bytes([i % 251]) * FILE_BYTES)
        remove_leftovers()
        self.net = Network()
        self.nodes = [self.net.add(f"n{i}") for i in (1, 2, 3)]
        self.edge = self.net.add("edge")
        self.procs: dict[str, subprocess.Popen] = {}

    def _start(self, name: str, host: Host, config: dict) -> None:
        path = self.work / f"{name}.json"
        path.write_text(json.dumps(config))
        log = open(self.work / f"{name}.log", "ab")
        self.procs[name] = host.run(PYTHON, "-m", "arbiter", "-c", str(path), stdin=subprocess.DEVNULL,
                                    stdout=log, stderr=subprocess.STDOUT)

    def _stop(self, name: str) -> None:
        proc = self.procs.pop(name, None)
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def start_nodes(self) -> None:
        for node in self.nodes:
            self._stop(node.name)
            self._start(node.name, node, {
                "baseDirectory": str(self.site), "listen": f"{node.address}:{PORT}", "admin": f"127.0.0.1:{ADMIN}",
                "workers": [{"host": "127.0.0.1", "port": WORKER}], "proxy": {"processes": 1},
                "frontCache": {"maxBytes": self.cache_bytes, "maxObjectBytes": 4 * FILE_BYTES}, "lameDuck": 0,
                "healthCheck": {"interval": 0.5}})
        for node in self.nodes:
            _wait(f"node {node.name}", lambda: all(w["up"] for w in _status(node, ADMIN)["workers"]))

    def start_edge(self, policy: str) -> None:
        self._stop("edge")
        self._start("edge", self.edge, {
            "baseDirectory": str(self.site), "listen": f"{self.edge.address}:{PORT}", "admin": f"127.0.0.1:{ADMIN}",
            "workers": [{"host": n.address, "port": PORT, "spawn": False} for n in self.nodes],
            # hashBalanceFactor 2: a path leaves its node (and that node's cache) only past twice
            # the node's share of the requests in flight (1.25, the default, spills a fifth of them).
            "proxy": {"processes": 1, "balance": policy, "hashBalanceFactor": 2}, "frontCache": {"enabled": False},
            # An edge has no threads of its own: this is how many requests in flight make a node
            # busy to its balancer (which spills a hashed path past a busy node).
            "threads": EDGE_THREADS,
            "healthCheck": {"interval": 0.5}})
        _wait("edge", lambda: sum(w["up"] for w in _status(self.edge, ADMIN)["workers"]) == 3)

    def cache_counts(self) -> tuple[int, int]:
        """The nodes' front-cache hits and lookups, summed."""
        hits = lookups = 0
        for node in self.nodes:
            cache = _status(node, ADMIN)["front_cache"]
            hits += cache["hits"]
            lookups += cache["hits"] + cache["misses"]
        return hits, lookups

    def wrk(self, seconds: int, connections: int) -> dict:
        script = self.work / "files.lua"
        script.write_text(wrk_files_script([f"/f{i}.bin" for i in range(self.files)]))
        argv = ["ip", "netns", "exec", self.edge.ns, "wrk", "-t1", f"-c{connections}", f"-d{seconds}s",
                "--latency", "--timeout=10s", "-s", str(script), f"http://{self.edge.address}:{PORT}/"]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 70)
        m = parse_wrk(done.stdout)
        return {"rps": m.rps, "requests": m.requests, "errors": m.failed + m.non2xx}

    def close(self) -> None:
        for name in list(self.procs):
            self._stop(name)
        self.net.close()


def measure(run: Run, policy: str, seconds: int, connections: int) -> dict:
    run.start_nodes()
    run.start_edge(policy)
    _progress(f"{policy}: warming the nodes' caches ({seconds}s)")
    run.wrk(seconds, connections)
    hits0, lookups0 = run.cache_counts()
    _progress(f"{policy}: measuring ({seconds}s)")
    result = run.wrk(seconds, connections)
    hits1, lookups1 = run.cache_counts()
    held = [_status(n, ADMIN)["front_cache"] for n in run.nodes]
    _progress(f"{policy}: the nodes' front caches hold {[c['entries'] for c in held]} of {run.files} files "
              f"({[c['bytes'] for c in held]} bytes)")
    lookups = lookups1 - lookups0
    result["hit_ratio"] = round((hits1 - hits0) / lookups, 4) if lookups else None
    result["policy"] = policy
    return result


def main(seconds: int, cache_kib: int, connections: int = 32, keep: bool = False) -> int:
    """Measure both policies; print a table (stdout) and return 0, or 1 when a run failed."""
    if shutil.which("wrk") is None:
        print("the hosts bench needs wrk", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="gows-hosts-"))
    run = Run(work, cache_kib * 1024)
    _progress(f"{run.files} files of {FILE_BYTES} B (3x a node's front cache of {cache_kib} KiB), "
              f"wrk -c{connections} -d{seconds}s; work dir {work}")
    try:
        results = [measure(run, policy, seconds, connections) for policy in POLICIES]
    finally:
        run.close()
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
    print(f"{'edge policy':<18}{'req/s':>10}{'hit ratio':>11}{'errors':>8}")
    for r in results:
        ratio = "-" if r["hit_ratio"] is None else f"{r['hit_ratio']:.3f}"
        print(f"{r['policy']:<18}{r['rps']:>10.0f}{ratio:>11}{r['errors']:>8}")
    rr, ch = results
    if rr["rps"]:
        print(f"consistent-hash / round-robin req/s: {ch['rps'] / rr['rps']:.2f}x "
              "(targets: hit ratio >= 0.9 vs <= 0.5, >= 1.2x req/s)")
    return 1 if any(r["errors"] for r in results) else 0
