"""The master's state as one plain dict: what /status.json returns and /status renders.

The shape is stable (fields are added, never renamed or removed); times are Unix seconds,
durations are seconds, latencies may be null when nothing was measured:

    {"version": str, "pid": int, "config": str, "started": float, "uptime": float,
     "ready": bool, "stopping": bool,
     "workers": [{"address": str, "host": str, "port": int, "local": bool, "pid": int|null,
                  "up": bool, "since": float, "consecutive_failures": int, "restarts": int,
                  "requests": int, "in_flight": int, "last_check_seconds": float|null,
                  "last_error": str, "name": str, "weight": int, "effective_weight": float,
                  "slow_start_seconds": float, "slow_start_until": float|null,
                  "ejected": bool, "ejected_until": float|null, "ejections": int}],
     "front_cache": {"enabled": bool, "entries": int, "bytes": int, "max_bytes": int,
                     "hits": int, "misses": int, "hit_ratio": float|null, "revalidated": int,
                     "shared": int},
     "totals": {"requests": int, "responses": {"1xx": int, ..., "5xx": int},
                "last_10s": WINDOW, "last_5m": WINDOW, "all_time": {"p50_seconds", "p99_seconds"}},
     "proxy": {"client_connections": int, "retries": int, "upstream_errors": int, "timeouts": int,
               "no_healthy_worker": int, "truncated_responses": int,
               "rejected_connections": int, "rejected_requests": int,
               "shed_idle_connections": int, "shortages": int, "body_buffer_bytes": int,
               "file_bodies": int, "file_refused": int, "pipelined": int},
     "proxies": [{"index": int, "pid": int|null, "ready": bool, "restarts": int, "requests": int,
                  "client_connections": int, "rate": float}],
     "access_log": {"enabled": bool, "dropped": int, "error": str},
     "tls": {"enabled": bool, "listen": str|null, "subject": str, "issuer": str, "sans": [str],
             "serial": str, "not_before": float, "not_after": float, "expires_in_seconds": float}}

    WINDOW = {"seconds": float, "requests": int, "rate_per_second": float,
              "p50_seconds": float|null, "p99_seconds": float|null}

A worker's `name` is how the config names it (its address when it gives none); its
`effective_weight` is its `weight` as balanced now, less while it ramps up after a comeback
until `slow_start_until` (null: at full weight); `ejected_until` (null: not ejected) ends its
current outlier ejection, and `ejections` counts them all.

`requests` counts completed responses (the latency histogram); `responses` counts them by
status class; a window covers the samples within reach (shorter just after start). `proxies`
has one row per proxy process slot: its current pid (null between two incarnations), `ready`
while it accepts clients, the requests it has read (across its restarts), its open client
connections (refreshed every 0.25 s) and its requests per second between its last two load
reports (about a second apart); a slot retired at a reload leaves the rows, its counts stay in
the totals. The access log's `dropped` counts every line not written (its writer fell behind,
or a write failed: a full disk), `error` says why the last write failed ("" while writes succeed).
`tls` is {"enabled": false} without HTTPS; with it, the certificate new handshakes get (the one
loaded at start or at the last reload): its serial in hexadecimal, its validity in Unix seconds.
"""
from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any, Protocol

from fileapp.version import VERSION

from ..proxy.balancer import ramp
from ..proxy.stats import RequestStats, Window, quantile
from ..state import WorkerState, WorkerTable

if TYPE_CHECKING:
    from ..proxy_slot import AccessLogState
    from ..tls import CertificateInfo



class ProxyCounters(Protocol):
    """What the admin listener reads of the proxies (proxies.ProxyFleet)."""

    latency: RequestStats

    def stats(self) -> dict[str, Any]:
        """All proxies' counters together, in Proxy.stats' shape."""

    def rows(self) -> list[dict[str, Any]]:
        """One row per proxy process."""


class Master(Protocol):
    """What the admin listener reads from the running master."""

    table: WorkerTable
    proxy: ProxyCounters
    started: float  # Unix time
    stopping: bool
    access_log: AccessLogState | None  # None: the access log is off
    certificate: CertificateInfo | None  # the HTTPS certificate; None without HTTPS
    tls_listen: str | None  # the HTTPS address; None without HTTPS

    @property
    def config_path(self) -> str: ...


def ready(master: Master) -> bool:
    """At least one worker is up and the master is not stopping (/readyz)."""
    return bool(master.table.healthy) and not master.stopping


def _window(w: dict[str, Any]) -> dict[str, Any]:
    return {"seconds": w["seconds"], "requests": w["requests"], "rate_per_second": round(w["rate"], 3),
            "p50_seconds": w["p50"], "p99_seconds": w["p99"]}


def balance(w: WorkerState, now: float, mono: float) -> dict[str, Any]:
    """A worker's weight, slow start and ejections at Unix time `now` (monotonic `mono`)."""
    share, _ = ramp(w, mono)
    ramping = share < 1.0 and w.recovered_at is not None
    return {"name": w.label, "weight": w.weight, "effective_weight": round(w.weight * share, 3),
            "slow_start_seconds": w.slow_start,
            "slow_start_until": round(now + w.recovered_at + w.slow_start - mono, 3) if ramping else None,
            "ejected": w.ejected_until is not None,
            "ejected_until": round(now + w.ejected_until - mono, 3) if w.ejected_until is not None else None,
            "ejections": w.ejections_total}


def snapshot(master: Master, window: Window) -> dict[str, Any]:
    """The whole status document (see the module docstring for its shape)."""
    proxy = master.proxy
    stats = proxy.stats()
    cache = stats["front_cache"]
    lookups = cache["hits"] + cache["misses"]
    buckets = proxy.latency.buckets
    now = time.time()
    mono = time.monotonic()
    access_log = master.access_log
    return {
        "version": VERSION,
        "pid": os.getpid(),
        "config": master.config_path,
        "started": master.started,
        "uptime": round(now - master.started, 3),
        "ready": ready(master),
        "stopping": master.stopping,
        "workers": [{
            "address": w.address, "host": w.host, "port": w.port, "local": w.local, "pid": w.pid,
            "up": w.up, "since": w.since, "consecutive_failures": w.consecutive_failures,
            "restarts": w.restarts, "requests": w.requests, "in_flight": w.in_flight,
            "last_check_seconds": w.last_check_latency, "last_error": w.last_error, **balance(w, now, mono),
        } for w in sorted(master.table, key=lambda w: (w.port, w.host))],
        "front_cache": {
            "enabled": cache["enabled"], "entries": cache["entries"], "bytes": cache["bytes"],
            "max_bytes": cache["max_bytes"], "hits": cache["hits"], "misses": cache["misses"],
            "hit_ratio": round(cache["hits"] / lookups, 4) if lookups else None,
            "revalidated": cache["revalidated"], "shared": cache["shared"],
        },
        "totals": {
            "requests": sum(buckets),
            "responses": stats["responses"],
            "last_10s": _window(window.over(10)),
            "last_5m": _window(window.over(300)),
            "all_time": {"p50_seconds": quantile(0.5, buckets), "p99_seconds": quantile(0.99, buckets)},
        },
        "proxy": {key: stats[key] for key in (
            "client_connections", "retries", "upstream_errors", "timeouts", "no_healthy_worker",
            "truncated_responses", "rejected_connections", "rejected_requests", "shed_idle_connections",
            "shortages", "body_buffer_bytes", "file_bodies", "file_refused", "pipelined")},
        "proxies": master.proxy.rows(),
        "access_log": {"enabled": access_log is not None,
                       "dropped": access_log.dropped if access_log is not None else 0,
                       "error": access_log.error if access_log is not None else ""},
        "tls": tls_status(master, now),
    }


def tls_status(master: Master, now: float) -> dict[str, Any]:
    cert = master.certificate
    if cert is None:
        return {"enabled": False}
    return {"enabled": True, "listen": master.tls_listen, **cert.as_dict(),
            "expires_in_seconds": round(cert.not_after - now, 3)}
