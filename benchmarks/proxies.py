"""Each gows proxy process's share of a load, from the master's /status.json before and after it.

The master lists its proxy processes under `"proxies"` (issue 11): one row per proxy with its
`index`, `pid` and cumulative `requests` and `restarts`. A master without that key (one process
serving every client) yields no shares at all, never an error: the benchmark measures both.
Counters are per proxy slot (`index`) and stay exact across a restart, so shares are taken by
index, not by pid.
"""
from __future__ import annotations

import json
import urllib.request
from dataclasses import dataclass
from typing import Any, Callable

from .loads import Measurement


@dataclass(frozen=True)
class ProxyCount:
    """One proxy's cumulative counters as /status.json reports them."""

    index: int
    pid: int | None
    requests: int
    restarts: int = 0


@dataclass(frozen=True)
class ProxyShare:
    """What one proxy served during one load: its requests and how often it was restarted meanwhile."""

    index: int
    requests: int
    restarts: int = 0


def parse_status(status: Any) -> list[ProxyCount] | None:
    """The `proxies` rows of a /status.json document; None when there are none to read (no such
    key, as before issue 11, or rows without an integer index and request count)."""
    rows = status.get("proxies") if isinstance(status, dict) else None
    if not isinstance(rows, list) or not rows:
        return None
    counts = []
    for row in rows:
        if not isinstance(row, dict) or not all(type(row.get(k)) is int for k in ("index", "requests")):
            return None
        restarts = row.get("restarts")
        pid = row.get("pid")
        counts.append(ProxyCount(row["index"], pid if type(pid) is int else None, row["requests"],
                                 restarts if type(restarts) is int else 0))
    return sorted(counts, key=lambda c: c.index)


def shares(before: list[ProxyCount] | None, after: list[ProxyCount] | None) -> list[ProxyShare] | None:
    """Each proxy's requests and restarts between two readings, by index; None unless both readings
    have proxies. A proxy that appeared in between (one more was started) counts from zero."""
    if before is None or after is None:
        return None
    old = {c.index: c for c in before}
    out = []
    for c in after:
        prior = old.get(c.index, ProxyCount(c.index, None, 0, 0))
        out.append(ProxyShare(c.index, max(0, c.requests - prior.requests), max(0, c.restarts - prior.restarts)))
    return out


def fmt_shares(proxy_shares: list[ProxyShare] | None) -> str:
    """`51%/49%`, in proxy order, with restarts during the load said after it; "" without shares
    (a server without proxy processes, or a load no request of which was counted)."""
    total = sum(s.requests for s in proxy_shares or [])
    if not proxy_shares or total == 0:
        return ""
    restarts = sum(s.restarts for s in proxy_shares)
    text = "/".join(f"{s.requests / total:.0%}" for s in proxy_shares)
    return text + (f" ({_restarts(restarts)})" if restarts else "")


def fmt_counts(proxy_shares: list[ProxyShare] | None) -> str:
    """`proxy 1 2,550 (51%), proxy 2 2,450 (49%); least 0.98× even`, with restarts during the load."""
    rows = proxy_shares or []
    total = sum(s.requests for s in rows) or 1
    text = ", ".join(f"proxy {s.index} {s.requests:,} ({s.requests / total:.0%})"
                     + (f", {_restarts(s.restarts)}" if s.restarts else "") for s in rows)
    low = evenness(rows)
    return text + ("" if low is None else f"; least {low:.2f}× even")


def _restarts(n: int) -> str:
    return f"{n} restart" + ("" if n == 1 else "s")


def evenness(proxy_shares: list[ProxyShare] | None) -> float | None:
    """The least-loaded proxy's requests over an even share (1.0: perfectly even; issue 11's test
    asks for more than 1/3); None without shares or requests."""
    total = sum(s.requests for s in proxy_shares or [])
    if not proxy_shares or total == 0:
        return None
    return min(s.requests for s in proxy_shares) / (total / len(proxy_shares))


def read_status(admin_port: int, timeout: float = 5.0) -> dict | None:
    """The master's /status.json, or None when it cannot be read (the load's figures do not depend on it)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/status.json", timeout=timeout) as response:
            return json.load(response)
    except (OSError, ValueError):
        return None


def counted(admin_port: int | None, load: Callable[[], Measurement]) -> Measurement:
    """Run `load`; when the server has an admin listener, attach each proxy's share of it to the
    measurement (`Measurement.proxies`), read from /status.json just before and just after."""
    if admin_port is None:
        return load()
    before = parse_status(read_status(admin_port))
    result = load()
    if before is not None:
        result.proxies = shares(before, parse_status(read_status(admin_port)))
    return result
