"""What /proc says about a process of the soak: resident memory, open descriptors, and how many of
those are established connections between the master and its workers.

Those connections are the proxy's keep-alive pool: their number follows the load's concurrency
(up to proxy.poolSize per worker), not a leak, and alone moved the master's count by 10%
between two minutes of one soak. The growth check leaves them out; every other descriptor (client
connections, sockets left in CLOSE_WAIT, files, pipes) counts.
"""
from __future__ import annotations

import os

from .verdict import Usage

ESTABLISHED = "01"  # the state column of /proc/net/tcp
TCP_TABLES = ("/proc/net/tcp", "/proc/net/tcp6")


def parse_tcp_table(text: str) -> dict[int, tuple[int, int, str]]:
    """/proc/net/tcp{,6} as {socket inode: (local port, remote port, state)}."""
    sockets = {}
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 10:
            continue
        local, remote, state, inode = fields[1], fields[2], fields[3], int(fields[9])
        sockets[inode] = (int(local.rsplit(":", 1)[1], 16), int(remote.rsplit(":", 1)[1], 16), state)
    return sockets


def tcp_sockets() -> dict[int, tuple[int, int, str]]:
    """Every TCP socket of this network namespace, by inode."""
    sockets: dict[int, tuple[int, int, str]] = {}
    for path in TCP_TABLES:
        try:
            with open(path) as f:
                sockets.update(parse_tcp_table(f.read()))
        except OSError:
            pass
    return sockets


def worker_connections(links: list[str], sockets: dict[int, tuple[int, int, str]],
                       worker_ports: set[int] | frozenset[int]) -> int:
    """How many of a process's descriptors (their /proc/PID/fd link targets) are established TCP
    connections from or to one of `worker_ports`."""
    count = 0
    for link in links:
        if link.startswith("socket:["):
            local, remote, state = sockets.get(int(link[8:-1]), (0, 0, ""))
            if state == ESTABLISHED and (local in worker_ports or remote in worker_ports):
                count += 1
    return count


def usage(pids: list[int], worker_ports: set[int] | frozenset[int]) -> dict[int, Usage | None]:
    """VmRSS, open descriptors and worker connections of each pid (None: gone). The descriptors
    are listed before the TCP tables are read, so a connection opened in between is still known."""
    seen: dict[int, tuple[int, list[str]] | None] = {pid: _rss_and_links(pid) for pid in pids}
    sockets = tcp_sockets()
    return {pid: None if got is None else Usage(pid, got[0], len(got[1]),
                                                 worker_connections(got[1], sockets, worker_ports))
            for pid, got in seen.items()}


def _rss_and_links(pid: int) -> tuple[int, list[str]] | None:
    """VmRSS in KiB and the link target of every open descriptor of `pid`; None when it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
        fd_dir = f"/proc/{pid}/fd"
        links = []
        for fd in os.listdir(fd_dir):
            try:
                links.append(os.readlink(f"{fd_dir}/{fd}"))
            except OSError:  # closed meanwhile
                pass
    except (OSError, StopIteration, ValueError):
        return None
    return rss, links


def parent_of(pid: int) -> int | None:
    """The parent pid of `pid` (None when it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None
