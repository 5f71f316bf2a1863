"""Hosts for multi-host tests and the hosts bench: one network namespace per host, joined by veth pairs to a bridge
that lives in a namespace of its own, with addresses from 198.18.0.0/15 (RFC 2544's range for
network benchmarks) and nothing else outside loopback: the root namespace gets no link, address
or route, so no test traffic can leave the machine.

Needs root (CI runs as root). Every name starts with PREFIX, the owning pytest process's pid and
a counter, so runs in parallel (`pytest -n 2`) never meet, and a run that crashed is cleaned up
by the next one (`remove_leftovers`: namespaces whose owner pid is dead, the processes in them,
their /etc/netns files). Processes run inside with `ip netns exec`; a test thread enters a
namespace with setns(2), which moves only that thread (`inside`, `ThreadsInside`).
"""
from __future__ import annotations

import contextlib
import ctypes
import itertools
import os
import re
import shutil
import signal
import subprocess
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from fileapp.processes import pid_alive

PREFIX = "gowst"
NETNS_DIR = Path("/run/netns")
ETC_NETNS = Path("/etc/netns")
ADDRESS_RANGE = "198.18.0.0/15"  # RFC 2544: reserved for network benchmarks; nothing else is used
SUBNET = "198.18.0"  # hosts get .1, .2, ... (a /24 inside ADDRESS_RANGE)
CLONE_NEWNET = 0x40000000
_NAME = re.compile(rf"{PREFIX}(\d+)x\d+-")
_counter = itertools.count(1)
_libc = ctypes.CDLL(None, use_errno=True)


def ip(*args: str) -> str:
    """Run `ip ...`; its output (CalledProcessError with its stderr when it fails)."""
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10)
    if done.returncode != 0:
        raise subprocess.CalledProcessError(done.returncode, ["ip", *args], done.stdout, done.stderr)
    return done.stdout


def namespaces() -> list[str]:
    return [line.split()[0] for line in ip("netns", "list").splitlines() if line.strip()]


def _kill_inside(ns: str) -> None:
    """SIGKILL what still runs in `ns` (a test's own processes, or a crashed run's)."""
    try:
        pids = [int(p) for p in ip("netns", "pids", ns).split()]
    except subprocess.CalledProcessError:
        return
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _delete(ns: str) -> None:
    _kill_inside(ns)
    with contextlib.suppress(subprocess.CalledProcessError):
        ip("netns", "delete", ns)
    shutil.rmtree(ETC_NETNS / ns, ignore_errors=True)


def remove_leftovers() -> list[str]:
    """Delete what runs whose pytest process is gone left behind; the names removed."""
    removed = []
    for ns in namespaces():
        m = _NAME.match(ns)
        if m and not pid_alive(int(m.group(1))):
            _delete(ns)
            removed.append(ns)
    if ETC_NETNS.is_dir():
        for d in ETC_NETNS.iterdir():
            m = _NAME.match(d.name)
            if m and not pid_alive(int(m.group(1))):
                shutil.rmtree(d, ignore_errors=True)
    return removed


def _setns(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), path)
    finally:
        os.close(fd)


@contextlib.contextmanager
def inside(ns: str) -> Iterator[None]:
    """The calling thread is in namespace `ns` for the block (sockets made there stay there)."""
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        _setns(str(NETNS_DIR / ns))
        try:
            yield
        finally:
            if _libc.setns(own, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "cannot return to the test's own namespace")
    finally:
        os.close(own)


def thread_pool(ns: str, workers: int) -> ThreadPoolExecutor:
    """Threads that each enter `ns` once, for the client load of a test."""
    return ThreadPoolExecutor(workers, initializer=_setns, initargs=(str(NETNS_DIR / ns),))


@dataclass
class Host:
    """One host: its namespace, its address on the bridge, and the bridge side of its link."""

    name: str
    ns: str
    address: str
    link: str  # the veth end in the bridge's namespace: `cut` sets it down

    def run(self, *argv: str, **kw) -> subprocess.Popen:
        return subprocess.Popen(["ip", "netns", "exec", self.ns, *argv], **kw)


@dataclass
class Network:
    """A bridge and the hosts on it; `close()` removes everything, also after a failure."""

    tag: str = field(default_factory=lambda: f"{PREFIX}{os.getpid()}x{next(_counter)}")
    hosts: dict[str, Host] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.bridge_ns = f"{self.tag}-br"
        ip("netns", "add", self.bridge_ns)
        ip("-n", self.bridge_ns, "link", "add", "br0", "type", "bridge")
        # No IPv6 link-local address (fe80::) on any link either: 198.18.0.0/15 and loopback only.
        ip("-n", self.bridge_ns, "link", "set", "br0", "addrgenmode", "none")
        ip("-n", self.bridge_ns, "link", "set", "br0", "up")
        self._lock = threading.Lock()

    def add(self, name: str) -> Host:
        """A new host on the bridge, at the next address of SUBNET; loopback up."""
        with self._lock:
            index = len(self.hosts) + 1
            ns, link = f"{self.tag}-{name}", f"v{index}"
            ip("netns", "add", ns)
            ip("-n", ns, "link", "set", "lo", "up")
            ip("-n", self.bridge_ns, "link", "add", link, "type", "veth", "peer", "name", "eth0", "netns", ns)
            ip("-n", self.bridge_ns, "link", "set", link, "addrgenmode", "none")
            ip("-n", self.bridge_ns, "link", "set", link, "master", "br0", "up")
            address = f"{SUBNET}.{index}"
            ip("-n", ns, "link", "set", "eth0", "addrgenmode", "none")
            ip("-n", ns, "addr", "add", f"{address}/24", "dev", "eth0")
            ip("-n", ns, "link", "set", "eth0", "up")
            host = self.hosts[name] = Host(name, ns, address, link)
            return host

    def cut(self, host: Host) -> None:
        """Pull the host's cable: its link goes down, packets are dropped (no reset)."""
        ip("-n", self.bridge_ns, "link", "set", host.link, "down")

    def restore(self, host: Host) -> None:
        ip("-n", self.bridge_ns, "link", "set", host.link, "up")

    def hosts_file(self, host: Host, text: str) -> None:
        """/etc/hosts as processes `ip netns exec`ed in `host` see it (bind-mounted over /etc/hosts
        at exec; getaddrinfo rereads it on each call)."""
        d = ETC_NETNS / host.ns
        d.mkdir(parents=True, exist_ok=True)
        tmp = d / "hosts.tmp"
        tmp.write_text(text)
        # Rewritten in place: a bind mount follows the inode, not the name.
        target = d / "hosts"
        if target.exists():
            with open(target, "r+") as f:
                f.write(text)
                f.truncate()
            tmp.unlink()
        else:
            tmp.rename(target)

    def close(self) -> None:
        for host in self.hosts.values():
            _delete(host.ns)
        _delete(self.bridge_ns)
        self.hosts.clear()
