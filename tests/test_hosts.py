"""Many hosts: an edge gows in front of three node gows, each host in its own network namespace
(netns_support.py), under client load. Run as root (CI does).

One fleet per module (per xdist worker): three nodes (master, one proxy, one local worker,
listening on the host's 198.18.0.x), and in the edge's namespace three edges over the same nodes
("spawn": false): round robin, consistent hash, and one that names its nodes by DNS (/etc/hosts
in its namespace). Each test leaves the fleet whole for the next.

The load is a pool of client threads in the edge's namespace rather than wrk: wrk would take both
cores of the machine, and the health checks under test would then time out for want of CPU
rather than for the event the test causes. Each response names the node that served it (every
node serves its own copy of the site, whose files hold the node's name); the edges' front caches
are off so that every request reaches a node.
"""
from __future__ import annotations

import ipaddress
import os
import signal
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import requests

from master_support import Master
from benchmarks.netns import ADDRESS_RANGE, PREFIX, ip, namespaces, remove_leftovers
from netns_support import Host, Network, inside, network, thread_pool  # noqa: F401 (network: a fixture)
from support import wait_until

pytestmark = pytest.mark.integration

NODES = ("n1", "n2", "n3")
PORT, ADMIN = 8080, 9000
FILES = 60
DNS_NAME = "nodes.test"
EDGE_CHECK = {"interval": 0.5, "timeout": 0.5, "rise": 2, "fall": 3, "bootTimeout": 15}
# What an edge takes at most to mark a node down: `fall` probes, each up to its timeout and then
# an interval apart, after the one under way when the node went.
MARK_DOWN = EDGE_CHECK["fall"] * (EDGE_CHECK["interval"] + EDGE_CHECK["timeout"]) + EDGE_CHECK["interval"]
EDGES = {"rr": (8080, 9100, "round-robin"), "hash": (8081, 9101, "consistent-hash"), "dns": (8082, 9102, "round-robin"),
         "weighted": (8083, 9103, "round-robin")}
WEIGHTS = (1, 2, 3)  # of the nodes, in order, on the "weighted" edge
SLOW_START = 4.0  # seconds the "weighted" edge ramps a node up over after its comeback


def node_config(host: Host, site: Path) -> dict:
    return {
        "baseDirectory": str(site), "listen": f"{host.address}:{PORT}", "admin": f"127.0.0.1:{ADMIN}",
        "workers": [{"host": "127.0.0.1", "port": 9001}],
        "proxy": {"processes": 1}, "gracefulTimeout": 5,
        # Longer than an edge takes to mark it down, so TERM fails no request.
        "lameDuck": MARK_DOWN + 1,
        "healthCheck": {"interval": 0.2, "timeout": 1.0, "rise": 2, "fall": 3, "bootTimeout": 15},
    }


def edge_config(name: str, nodes: list[Host], site: Path) -> dict:
    port, admin, policy = EDGES[name]
    workers = ([{"host": DNS_NAME, "port": PORT}] if name == "dns"
               else [{"host": n.address, "port": PORT, "spawn": False} for n in nodes])
    if name == "weighted":
        for w, weight in zip(workers, WEIGHTS):
            w.update(weight=weight, slowStart=SLOW_START)
    return {
        "baseDirectory": str(site), "listen": f"{SUBNET_EDGE[0]}:{port}", "admin": f"127.0.0.1:{admin}",
        "workers": workers, "proxy": {"processes": 1, "balance": policy, "connectTimeout": 0.5},
        "frontCache": {"enabled": False}, "healthCheck": EDGE_CHECK, "resolveInterval": 0.5,
        "gracefulTimeout": 5,
    }


SUBNET_EDGE = [""]  # the edge host's address, set once the network exists


class Fleet:
    """The hosts, their masters, and a client for each edge."""

    def __init__(self, net: Network, base: Path) -> None:
        self.net = net
        self.base = base
        self.nodes = [net.add(name) for name in NODES]
        self.edge = net.add("edge")
        SUBNET_EDGE[0] = self.edge.address
        self.masters: dict[str, Master] = {}
        self.sites: dict[str, Path] = {}
        for node in self.nodes:
            site = self.sites[node.name] = base / f"site-{node.name}"
            site.mkdir()
            for i in range(FILES):
                (site / f"f{i}.txt").write_text(node.name)
        self.write_hosts([n.address for n in self.nodes])
        edge_site = base / "site-edge"
        edge_site.mkdir()
        for node in self.nodes:
            self.start_node(node)
        for name in EDGES:
            d = base / f"edge-{name}"
            d.mkdir()
            self.masters[name] = Master(d, edge_config(name, self.nodes, edge_site), wrap=self._wrap(self.edge))
        self.pool = thread_pool(self.edge.ns, 8)

    @staticmethod
    def _wrap(host: Host) -> tuple[str, ...]:
        return ("ip", "netns", "exec", host.ns)

    def start_node(self, node: Host) -> Master:
        old = self.masters.get(node.name)
        if old is not None:
            old.stop()
        d = self.base / f"node-{node.name}-{time.monotonic_ns()}"
        d.mkdir()
        m = self.masters[node.name] = Master(d, node_config(node, self.sites[node.name]), wrap=self._wrap(node))
        return m

    def write_hosts(self, addresses: list[str]) -> None:
        lines = ["127.0.0.1 localhost"] + [f"{a} {DNS_NAME}" for a in addresses]
        self.net.hosts_file(self.edge, "\n".join(lines) + "\n")

    def status(self, host: Host, admin: int) -> dict:
        with inside(host.ns):
            return requests.get(f"http://127.0.0.1:{admin}/status.json", timeout=5).json()

    def edge_status(self, edge: str) -> dict:
        return self.status(self.edge, EDGES[edge][1])

    def up(self, edge: str) -> set[str]:
        """The node addresses the edge has up."""
        try:
            return {w["host"] for w in self.edge_status(edge)["workers"] if w["up"]}
        except requests.RequestException:
            return set()

    def wait_whole(self, timeout: float = 90.0) -> None:
        """Every edge has every node up."""
        want = {n.address for n in self.nodes}
        for edge in EDGES:
            try:
                wait_until(lambda: self.up(edge) == want, timeout=timeout, interval=0.1)
            except TimeoutError:
                raise TimeoutError(f"edge {edge} has {self.up(edge)} of the nodes up; its log:\n"
                                   f"{self.masters[edge].log()[-2000:]}") from None

    def get(self, edge: str, path: str) -> tuple[int, str]:
        """One GET through `edge` from its namespace: (status, body)."""
        def go() -> tuple[int, str]:
            r = requests.get(f"http://{self.edge.address}:{EDGES[edge][0]}{path}", timeout=15)
            return r.status_code, r.text
        return self.pool.submit(go).result(timeout=30)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        for m in self.masters.values():
            m.stop()


class Load:
    """Client threads sending GETs of the site's files through an edge until stopped; every
    outcome is kept: the node that answered, or what went wrong."""

    def __init__(self, fleet: Fleet, edge: str, threads: int = 4) -> None:
        self.fleet, self.edge = fleet, edge
        self.served: Counter[str] = Counter()
        self.failed: list[str] = []
        self._stop = threading.Event()
        self._futures = [fleet.pool.submit(self._run, i) for i in range(threads)]

    def _run(self, seed: int) -> None:
        url = f"http://{self.fleet.edge.address}:{EDGES[self.edge][0]}/f%d.txt"
        i = seed
        with requests.Session() as s:
            while not self._stop.is_set():
                i += 7
                try:
                    r = s.get(url % (i % FILES), timeout=15)
                except requests.RequestException as e:
                    self.failed.append(f"{type(e).__name__}: {e}")
                    continue
                if r.status_code != 200:
                    self.failed.append(f"HTTP {r.status_code}: {r.text[:80]}")
                else:
                    self.served[r.text] += 1

    def total(self) -> int:
        return sum(self.served.values())

    def wait_served(self, count: int, timeout: float = 30.0) -> None:
        start = self.total()
        wait_until(lambda: self.total() >= start + count, timeout=timeout, message=f"{count} more requests served")

    def __enter__(self) -> Load:
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for f in self._futures:
            f.result(timeout=40)


@pytest.fixture(scope="module")
def fleet(network, tmp_path_factory):
    f = None
    try:
        f = Fleet(network, tmp_path_factory.mktemp("hosts"))
        f.wait_whole()
        yield f
    finally:
        if f is not None:
            f.close()


def addresses(*ns: str) -> list[str]:
    """Every IPv4 and IPv6 address of a namespace (the root one without `ns`)."""
    out = ip(*(("-n", ns[0]) if ns else ()), "-o", "addr", "show")
    return [line.split()[3] for line in out.splitlines()]


def test_the_harness_gives_each_host_its_own_namespace_and_nothing_outside_198_18(fleet):
    assert set(fleet.net.hosts) == {*NODES, "edge"}
    benchmark_range = ipaddress.ip_network(ADDRESS_RANGE)
    for host in fleet.net.hosts.values():
        found = {ipaddress.ip_interface(a) for a in addresses(host.ns)}
        outside_loopback = {a for a in found if not a.ip.is_loopback}
        assert outside_loopback == {ipaddress.ip_interface(f"{host.address}/24")}, found
        assert ipaddress.ip_address(host.address) in benchmark_range
    assert addresses(fleet.net.bridge_ns) == []  # the bridge only switches
    # The root namespace got no link and no address of the harness.
    assert not any(fleet.net.tag in line for line in ip("-o", "link", "show").splitlines())
    assert not any(ipaddress.ip_interface(a).ip in benchmark_range for a in addresses())


def test_a_node_answers_its_health_path_with_its_own_readiness(fleet):
    node = fleet.nodes[0]
    with inside(fleet.edge.ns):
        r = requests.get(f"http://{node.address}:{PORT}/healthcheck", timeout=5)
    assert r.status_code == 200
    assert r.headers["Cache-Control"] == "no-store"
    proxy = fleet.status(node, ADMIN)
    assert [w["up"] for w in proxy["workers"]] == [True]


def test_balanced_traffic_reaches_all_three_nodes(fleet):
    fleet.wait_whole()
    with Load(fleet, "rr") as load:
        load.wait_served(300)
    assert load.failed == []
    assert set(load.served) == set(NODES), load.served
    status = fleet.edge_status("rr")
    assert sorted(w["address"] for w in status["workers"]) == sorted(f"{n.address}:{PORT}" for n in fleet.nodes)
    assert all(not w["local"] and w["pid"] is None for w in status["workers"])  # never started by the edge


def test_a_cut_link_under_load_fails_no_request_and_the_node_comes_back(fleet):
    fleet.wait_whole()
    node = fleet.nodes[1]
    with Load(fleet, "rr") as load:
        load.wait_served(100)
        fleet.net.cut(node)
        cut = time.monotonic()
        wait_until(lambda: node.address not in fleet.up("rr"), timeout=30, interval=0.05, message="node marked down")
        took = time.monotonic() - cut
        assert took <= MARK_DOWN + 1.0, f"marked down after {took:.2f}s (fall x (interval + timeout) + interval: {MARK_DOWN}s)"
        before = load.served[node.name]
        load.wait_served(100)
        assert load.served[node.name] == before  # nothing reaches it meanwhile
        fleet.net.restore(node)
        wait_until(lambda: node.address in fleet.up("rr"), timeout=30, interval=0.05, message="node back up")
        wait_until(lambda: load.served[node.name] > before, timeout=30, message="node serving again")
    assert load.failed == [], load.failed[:5]


def test_a_node_stopped_under_load_goes_lame_duck_then_drains_failing_no_request(fleet):
    fleet.wait_whole()
    node = fleet.nodes[2]
    master = fleet.masters[node.name]
    with Load(fleet, "rr") as load:
        load.wait_served(100)
        master.signal(signal.SIGTERM)
        master.wait_log(r"lame duck for", timeout=10)
        with inside(fleet.edge.ns):  # still serving, but failing its checks
            assert requests.get(f"http://{node.address}:{PORT}/healthcheck", timeout=5).status_code == 503
            assert requests.get(f"http://{node.address}:{PORT}/f1.txt", timeout=5).text == node.name
        wait_until(lambda: node.address not in fleet.up("rr"), timeout=30, interval=0.05, message="node marked down")
        assert master.proc.wait(timeout=30) == 0
        load.wait_served(100)
    assert load.failed == [], load.failed[:5]
    fleet.start_node(node)
    fleet.wait_whole()


def test_a_dns_name_with_three_records_gives_three_members_and_a_removed_one_drains(fleet):
    fleet.wait_whole()
    members = {w["host"] for w in fleet.edge_status("dns")["workers"] if w["name"] == DNS_NAME}
    assert members == {n.address for n in fleet.nodes}
    gone = fleet.nodes[0]
    try:
        with Load(fleet, "dns") as load:
            load.wait_served(100)
            fleet.write_hosts([n.address for n in fleet.nodes[1:]])
            wait_until(lambda: {w["host"] for w in fleet.edge_status("dns")["workers"]}
                       == {n.address for n in fleet.nodes[1:]}, timeout=20, message="member removed")
            # Requests already sent to it finish there (drained, not cut): let each client thread
            # complete one more before counting.
            load.wait_served(20)
            before = load.served[gone.name]
            load.wait_served(100)
            assert load.served[gone.name] == before
        assert load.failed == [], load.failed[:5]
    finally:
        fleet.write_hosts([n.address for n in fleet.nodes])
    wait_until(lambda: len(fleet.edge_status("dns")["workers"]) == 3, timeout=20, message="member back")


def test_consistent_hashing_keeps_each_path_on_one_node_and_moves_only_the_lost_ones_share(fleet):
    fleet.wait_whole()
    paths = [f"/f{i}.txt" for i in range(FILES)]

    def owners() -> dict[str, str]:
        out = {}
        for p in paths:
            status, body = fleet.get("hash", p)
            assert status == 200
            out[p] = body
        return out

    first = owners()
    assert owners() == first  # the same node for each path, every time
    assert set(first.values()) == set(NODES)
    lost = fleet.nodes[1]
    fleet.net.cut(lost)
    try:
        wait_until(lambda: lost.address not in fleet.up("hash"), timeout=30, interval=0.05, message="marked down")
        after = owners()
    finally:
        fleet.net.restore(lost)
    moved = {p for p in paths if after[p] != first[p]}
    assert moved == {p for p in paths if first[p] == lost.name}
    assert lost.name not in after.values()
    fleet.wait_whole()


def shares(served: Counter[str]) -> list[float]:
    total = sum(served.values())
    return [served[name] / total for name in NODES]


def test_weights_1_2_3_give_shares_within_5_percent(fleet):
    fleet.wait_whole()
    wait_until(lambda: all(w["slow_start_until"] is None for w in fleet.edge_status("weighted")["workers"]),
               timeout=30, message="every node at full weight")
    with Load(fleet, "weighted") as load:
        load.wait_served(600)
    assert load.failed == [], load.failed[:5]
    expected = [w / sum(WEIGHTS) for w in WEIGHTS]
    assert all(abs(got - want) <= 0.05 for got, want in zip(shares(load.served), expected)), load.served


def test_a_node_back_from_a_cut_link_ramps_up_through_slow_start(fleet):
    fleet.wait_whole()
    node, weight = fleet.nodes[2], WEIGHTS[2]
    full_share = weight / sum(WEIGHTS)

    def row() -> dict:
        return next(w for w in fleet.edge_status("weighted")["workers"] if w["host"] == node.address)

    with Load(fleet, "weighted") as load:
        load.wait_served(100)
        fleet.net.cut(node)
        wait_until(lambda: not row()["up"], timeout=30, interval=0.05, message="node marked down")
        fleet.net.restore(node)
        wait_until(lambda: row()["up"], timeout=30, interval=0.05, message="node back up")
        back = row()
        ramp_start = load.served.copy()
        assert back["slow_start_until"] is not None and back["effective_weight"] < weight, back
        wait_until(lambda: row()["slow_start_until"] is None, timeout=SLOW_START + 10, message="ramp over")
        ramp = load.served - ramp_start
        assert row()["effective_weight"] == weight
        full_start = load.served.copy()
        load.wait_served(600)
        full = load.served - full_start
    assert load.failed == [], load.failed[:5]
    # While it ramped it took clearly less than its share, and its full share after.
    assert 0 < shares(ramp)[2] < full_share - 0.1, ramp
    assert abs(shares(full)[2] - full_share) <= 0.05, full


def test_leftovers_of_a_crashed_run_are_removed_and_live_runs_are_not(network):
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = f"{PREFIX}{dead.pid}x1-br"
    ip("netns", "add", stale)
    try:
        remove_leftovers()
        left = namespaces()
    finally:
        if stale in namespaces():
            ip("netns", "delete", stale)
    assert stale not in left
    assert network.bridge_ns in left  # ours: its owner (this process) is alive
