"""What a server's processes cost: the CPU time of its whole process group (gows' master, proxies
and workers; Apache's parent and children), read from /proc, and a load's share of it."""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Callable

from .loads import Measurement, per_request

if TYPE_CHECKING:
    from .servers import Running


def group_usage(pgid: int) -> tuple[int, float]:
    """How many live processes process group `pgid` has, and the CPU seconds (user + system) its
    processes used, with their children that have ended: a child's time moves from its own entry
    (kept while it is a zombie) into its parent's cutime when the parent waits for it (Apache's
    and gows' masters reap the processes they replace: what those used still counts)."""
    count, ticks = 0, 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # After "(comm)": state, ppid, pgrp, ..., utime, stime, cutime, cstime.
        if int(fields[2]) == pgid:
            count += fields[0] != "Z"
            ticks += sum(map(int, fields[11:15]))
    return count, ticks / os.sysconf("SC_CLK_TCK")


def charged(running: Running, load: Callable[[], Measurement]) -> Measurement:
    """Run `load` on `running` and note the CPU time its processes spent a completed request
    (`Measurement.server_cpu_us`), read from /proc just before and just after."""
    before = group_usage(running.proc.pid)[1]
    result = load()
    result.server_cpu_us = per_request(group_usage(running.proc.pid)[1] - before, result.requests)
    return result
