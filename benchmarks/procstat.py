"""What /proc says about a process of the soak: resident memory, open descriptors, how many of
those are established connections between a proxy and its workers, and which of the master's
children are its proxy processes.

Those connections are the proxies' keep-alive pool: their number follows the load's concurrency
(up to proxy.poolSize per worker), not a leak, and alone moved the count by 10% between two
minutes of one soak. The growth check leaves them out; every other descriptor (client
connections, sockets left in CLOSE_WAIT, files, pipes) counts. Local workers are reached over
Unix sockets: a worker's side of such a connection is named for the worker's socket in
/proc/net/unix; the proxy's side has no name, and every connected unnamed Unix socket of a
process (also its few fixed socketpairs with the master) counts as pooled.
"""
from __future__ import annotations

import os
import re

from .verdict import Usage

ESTABLISHED = "01"  # the state column of /proc/net/tcp
TCP_TABLES = ("/proc/net/tcp", "/proc/net/tcp6")
UNIX_CONNECTED = "03"  # the St column of /proc/net/unix
_WORKER_SOCKET = re.compile(r"/gows-[^/]+/worker-\d+-\d+\.sock$")


def parse_unix_table(text: str) -> set[int]:
    """The inodes of the connected Unix sockets in /proc/net/unix that are pool connections
    to or from a worker: unnamed ones (a connecting side), or named for a worker's socket."""
    pooled = set()
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 7 or fields[5] != UNIX_CONNECTED:
            continue
        if len(fields) == 7 or _WORKER_SOCKET.search(fields[7]):
            pooled.add(int(fields[6]))
    return pooled


def unix_pool_sockets() -> set[int]:
    try:
        with open("/proc/net/unix") as f:
            return parse_unix_table(f.read())
    except OSError:
        return set()


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
                       worker_ports: set[int] | frozenset[int], unix: set[int] = frozenset()) -> int:
    """How many of a process's descriptors (their /proc/PID/fd link targets) are established TCP
    connections from or to one of `worker_ports`, or Unix pool sockets (`unix`'s inodes)."""
    count = 0
    for link in links:
        if link.startswith("socket:["):
            inode = int(link[8:-1])
            local, remote, state = sockets.get(inode, (0, 0, ""))
            if state == ESTABLISHED and (local in worker_ports or remote in worker_ports) or inode in unix:
                count += 1
    return count


def usage(pids: list[int], worker_ports: set[int] | frozenset[int], unix: bool = True) -> dict[int, Usage | None]:
    """VmRSS, open descriptors, worker connections (`unix`: also over Unix sockets) and start
    time of each pid (None: gone). The descriptors are listed before the socket tables are read,
    so a connection opened in between is still known."""
    seen: dict[int, tuple[int, list[str]] | None] = {pid: _rss_and_links(pid) for pid in pids}
    started = {pid: start_time(pid) for pid in pids}
    sockets = tcp_sockets()
    pooled = unix_pool_sockets() if unix else set()
    return {pid: None if got is None else Usage(pid, got[0], len(got[1]),
                                                 worker_connections(got[1], sockets, worker_ports, pooled),
                                                 started[pid] or 0)
            for pid, got in seen.items()}


def established(pid: int, ports: set[int] | frozenset[int]) -> int | None:
    """How many established TCP connections `pid` has from or to one of `ports` (None: gone); with
    the public port, the client connections a proxy holds."""
    found = usage([pid], ports, unix=False)[pid]
    return None if found is None else found.pooled


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


def _stat_field(pid: int, index: int) -> int | None:
    """Field `index` (counted from the state, the one after the command name) of /proc/PID/stat;
    None when the process is gone. The name may hold spaces and parentheses: split after the last."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[index])
    except (OSError, ValueError, IndexError):
        return None


def parent_of(pid: int) -> int | None:
    """The parent pid of `pid` (None when it is gone)."""
    return _stat_field(pid, 1)


def start_time(pid: int) -> int | None:
    """When `pid` started, in clock ticks since boot (None when it is gone): orders processes by age."""
    return _stat_field(pid, 19)


def children(pid: int) -> list[int]:
    """The pids whose parent is `pid`, by a walk over /proc (a children file lists only those of
    one thread, and is not in every kernel)."""
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit() and parent_of(int(name)) == pid:
            found.append(int(name))
    return sorted(found)


def title(pid: int) -> str:
    """The process title (its first argument, which setproctitle sets); "" when it is gone."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().split(b"\0")[0].decode(errors="replace")
    except OSError:
        return ""


PROXY_TITLE = re.compile(r"gows: proxy (\d+)")


def proxy_index(process_title: str) -> int | None:
    """N in a proxy process's title `gows: proxy N`; None for any other title."""
    match = PROXY_TITLE.fullmatch(process_title)
    return int(match.group(1)) if match else None


def proxies(master_pid: int) -> dict[int, int]:
    """{index: pid} of the master's proxy processes: its children titled `gows: proxy N`."""
    found = {}
    for pid in children(master_pid):
        index = proxy_index(title(pid))
        if index is not None:
            found[index] = pid
    return found
