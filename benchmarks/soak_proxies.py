"""The soak's proxy kills: which proxy processes are ready, which one a kill may take, whether the
master replaces it, and whether it restarted proxies only when the soak killed one.

A kill never takes the longest-running proxy: that one lives through the whole run and carries
the growth check of the proxies' memory (benchmarks/verdict.py), as the largest worker does for
the workers. It comes only while every proxy is ready and there are two at least, so no kill
leaves the port without a proxy, and never two at once.
"""
from __future__ import annotations

import asyncio
import os
import random
import signal
from typing import Any, Protocol

from . import procstat
from .__main__ import progress
from .schedule import Event
from .soak_record import Record
from .verdict import ProxyKill, Usage, longest_running

BACK_TIMEOUT = 15.0  # seconds the master has to replace a killed proxy (the boot timeout's default)
BACK_POLL = 0.1  # seconds between two looks at /status.json while waiting for it


class SoakRun(Protocol):
    """What a proxy kill needs of the soak (soak.Soak)."""

    record: Record
    rng: random.Random

    @property
    def master_pid(self) -> int: ...

    @property
    def public_port(self) -> int: ...

    def clock(self) -> float: ...

    def master_alive(self) -> bool: ...

    async def fetch_status(self) -> dict[str, Any] | None: ...


def ready(status: dict[str, Any] | None, master_pid: int) -> dict[int, int] | None:
    """{pid: index} of the proxies when every row of `status` is ready with a live pid that is the
    master's child titled `gows: proxy N` (read in /proc); None otherwise (no rows either)."""
    rows = (status or {}).get("proxies")
    if not rows:
        return None
    live = procstat.proxies(master_pid)
    if not all(row["ready"] and row["pid"] and live.get(row["index"]) == row["pid"] for row in rows):
        return None
    return {row["pid"]: row["index"] for row in rows}


def victims(processes: list[Usage]) -> list[int]:
    """The pids a proxy kill may take: every one but the longest-running."""
    spared = longest_running(processes)
    return [p.pid for p in processes if p is not spared]


def restarts_since(start: list[dict[str, Any]], now: list[dict[str, Any]]) -> int:
    """Proxy restarts the master counted between two lists of /status.json's "proxies" rows."""
    return sum(row["restarts"] for row in now) - sum(row["restarts"] for row in start)


def check_restarts(record: Record, start: list[dict[str, Any]], now: list[dict[str, Any]]) -> None:
    """Keep the master's count of proxy restarts over the run in `record`: one more than the soak's
    kills is a proxy that died of its own, one fewer a kill the master missed."""
    restarts = record.proxy_restarts = restarts_since(start, now)
    if restarts != len(record.proxy_kills):
        record.problems.append(f"the master restarted proxies {restarts} times, the soak killed "
                               f"{len(record.proxy_kills)}")


async def kill(soak: SoakRun, event: Event) -> None:
    """SIGKILL a proxy process that `victims` allows, then wait until the master has every proxy
    ready again (a problem when it takes longer than BACK_TIMEOUT)."""
    found = ready(await soak.fetch_status(), soak.master_pid) or {}
    usages = procstat.usage(list(found), frozenset())
    choices = victims([u for u in usages.values() if u is not None]) if len(found) >= 2 else []
    pid = soak.rng.choice(choices) if choices else None
    # Its established connections on the public port, read just before: the clients it holds.
    held = procstat.established(pid, {soak.public_port}) if pid else None
    if pid is None or held is None:
        soak.record.skipped_proxy_kills.append(event.at)
        progress(f"{event.at:g} s: no proxy kill (not every proxy ready, or fewer than two)")
        return
    os.kill(pid, signal.SIGKILL)
    record = ProxyKill(soak.clock(), found[pid], pid, held)
    soak.record.proxy_kills.append(record)
    progress(f"{event.at:g} s: SIGKILL to proxy {record.index} (pid {pid}, {held} client connections)")
    while soak.clock() < record.at + BACK_TIMEOUT and soak.master_alive():
        now = ready(await soak.fetch_status(), soak.master_pid)
        if now is not None and len(now) == len(found) and pid not in now:
            record.back_after = soak.clock() - record.at
            return
        await asyncio.sleep(BACK_POLL)
    soak.record.problems.append(f"proxy {record.index} SIGKILLed at {record.at:.1f} s: not every proxy was "
                                f"ready again within {BACK_TIMEOUT:g} s")
