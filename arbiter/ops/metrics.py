"""Prometheus exposition of the master's counters (/metrics) with prometheus-client.

Nothing here runs per request: a custom Collector reads the proxies' counters, their latency
histogram and the worker table when scraped. Every proxy process counts into shared memory the
master sums (arbiter/proxies.py), so the unlabelled numbers are the whole server's, with no
per-process files to merge (prometheus-client's multiprocess mode is not needed and not used).
The `gows_proxy_*{proxy="N"}` families are each proxy process's own: one series per slot N
(1, 2, ...), counting on across the restarts of its process; a slot retired at a reload drops
its series (its counts stay in the totals). Open client connections are only given per proxy,
so one family never mixes a total with its parts: sum(gows_proxy_client_connections) is the server's.
"""
from __future__ import annotations

import time
from typing import Any, Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from ..proxy.stats import BOUNDS
from .status import VERSION, Master, balance, ready

_PROXY_COUNTERS = (
    ("retries", "proxy_retries", "Requests retried on another worker after a connection failure."),
    ("upstream_errors", "proxy_upstream_errors", "Failed attempts to get a response from a worker."),
    ("timeouts", "proxy_timeouts", "Client or worker timeouts."),
    ("no_healthy_worker", "proxy_no_healthy_worker", "Requests answered 503 because no worker was up."),
    ("truncated_responses", "proxy_truncated_responses", "Responses cut off because their worker failed mid-body."),
    ("rejected_connections", "proxy_rejected_connections", "Client connections refused while the master stops."),
    ("rejected_requests", "proxy_rejected_requests", "Malformed or over-limit requests answered with an error."),
    ("shed_idle_connections", "proxy_shed_idle_connections",
     "Idle keep-alive connections closed at proxy.maxConnections to let waiting clients in."),
    ("shortages", "proxy_shortages", "Requests answered 503 because the master ran out of descriptors or memory."),
    ("file_bodies", "proxy_file_bodies", "File bodies the proxy sent itself with sendfile (named by a local worker)."),
    ("file_refused", "proxy_file_refused",
     "Files named by a worker that had changed by the time the proxy opened them (the worker sent the bytes)."),
    ("pipelined", "proxy_pipelined",
     "GETs sent to a local worker behind others in flight on the same connection (HTTP/1.1 pipelining)."),
)


class MasterCollector(Collector):
    """Reads the running master's state into metric families at scrape time."""

    def __init__(self, master: Master) -> None:
        self.master = master

    def collect(self) -> Iterator[Metric]:
        master = self.master
        proxy = master.proxy
        stats = proxy.stats()

        info = GaugeMetricFamily("gows_build_info", "Version of the running gows master.", labels=["version"])
        info.add_metric([VERSION], 1)
        yield info
        yield GaugeMetricFamily("gows_start_time_seconds", "Unix time the master started.", value=master.started)
        yield GaugeMetricFamily("gows_ready", "1 while at least one worker is up and the master is not stopping.",
                                value=1 if ready(master) else 0)

        buckets = proxy.latency.buckets
        cumulative, running = [], 0
        for bound, n in zip(BOUNDS, buckets):
            running += n
            cumulative.append((repr(bound), running))
        cumulative.append(("+Inf", running + buckets[-1]))
        yield HistogramMetricFamily("gows_http_request_duration_seconds",
                                    "Time from a request's first byte to its complete response, at the front proxy.",
                                    buckets=cumulative, sum_value=proxy.latency.seconds)
        responses = CounterMetricFamily("gows_http_responses", "Responses by status class.", labels=["code"])
        for code, n in stats["responses"].items():
            responses.add_metric([code], n)
        yield responses
        yield CounterMetricFamily("gows_http_requests", "Requests read by the front proxy.", value=stats["requests"])
        for key, name, doc in _PROXY_COUNTERS:
            yield CounterMetricFamily(f"gows_{name}", doc, value=stats[key])

        cache = stats["front_cache"]
        yield CounterMetricFamily("gows_front_cache_hits", "Requests answered from the front cache.", value=cache["hits"])
        yield CounterMetricFamily("gows_front_cache_misses", "Cacheable requests the front cache could not answer.",
                                  value=cache["misses"])
        yield GaugeMetricFamily("gows_front_cache_entries", "Responses held in the front cache.", value=cache["entries"])
        yield GaugeMetricFamily("gows_front_cache_bytes", "Bytes held in the front cache.", value=cache["bytes"])
        yield GaugeMetricFamily("gows_front_cache_max_bytes", "Byte budget of the front cache.", value=cache["max_bytes"])
        yield CounterMetricFamily("gows_front_cache_revalidations", "Stale responses a worker confirmed unchanged (304).",
                                  value=cache["revalidated"])
        yield CounterMetricFamily("gows_front_cache_shared", "File entries a proxy took from what another proxy learned.",
                                  value=cache["shared"])
        yield GaugeMetricFamily("gows_proxy_body_buffer_bytes", "Request body bytes held for clients.",
                                value=stats["body_buffer_bytes"])

        yield from _per_proxy(proxy.rows())

        labels = ["worker", "name", "local"]  # its address, how the config names it, whether spawned here
        up = GaugeMetricFamily("gows_worker_up", "1 when the worker passes its health checks.", labels=labels)
        restarts = CounterMetricFamily("gows_worker_restarts", "Times the master restarted the worker.", labels=labels)
        served = CounterMetricFamily("gows_worker_requests", "Requests the proxy sent to the worker.", labels=labels)
        in_flight = GaugeMetricFamily("gows_worker_in_flight", "Requests outstanding on the worker.", labels=labels)
        failures = GaugeMetricFamily("gows_worker_consecutive_failures", "Health checks failed in a row.", labels=labels)
        latency = GaugeMetricFamily("gows_worker_health_check_seconds", "Duration of the last passed health check.",
                                    labels=labels)
        weight = GaugeMetricFamily("gows_worker_weight", "The worker's configured weight.", labels=labels)
        effective = GaugeMetricFamily("gows_worker_effective_weight", "The worker's weight as balanced now (less while "
                                      "it ramps up after a comeback: slow start).", labels=labels)
        ejected = GaugeMetricFamily("gows_worker_ejected", "1 while outlier detection keeps the worker out of balancing.",
                                    labels=labels)
        ejected_until = GaugeMetricFamily("gows_worker_ejected_until_seconds", "Unix time the worker's current "
                                          "ejection ends (only while ejected).", labels=labels)
        ejections = CounterMetricFamily("gows_worker_ejections", "Times outlier detection ejected the worker.",
                                        labels=labels)
        now, mono = time.time(), time.monotonic()
        for w in master.table:
            values = [w.address, w.label, "true" if w.local else "false"]
            state = balance(w, now, mono)
            weight.add_metric(values, w.weight)
            effective.add_metric(values, state["effective_weight"])
            ejected.add_metric(values, 1 if state["ejected"] else 0)
            if state["ejected_until"] is not None:
                ejected_until.add_metric(values, state["ejected_until"])
            ejections.add_metric(values, w.ejections_total)
            up.add_metric(values, 1 if w.up else 0)
            restarts.add_metric(values, w.restarts)
            served.add_metric(values, w.requests)
            in_flight.add_metric(values, w.in_flight)
            failures.add_metric(values, w.consecutive_failures)
            if w.last_check_latency is not None:
                latency.add_metric(values, w.last_check_latency)
        yield from (up, restarts, served, in_flight, failures, latency, weight, effective, ejected, ejected_until,
                    ejections)

        cert = master.certificate
        if cert is not None:
            yield GaugeMetricFamily("gows_tls_certificate_expiry_timestamp_seconds",
                                    "Unix time the HTTPS certificate new handshakes get expires (alert on it minus time()).",
                                    value=cert.not_after)
            info = GaugeMetricFamily("gows_tls_certificate_info", "The HTTPS certificate new handshakes get.",
                                     labels=["subject", "serial"])
            info.add_metric([cert.subject, format(cert.serial, "x")], 1)
            yield info

        access_log = master.access_log
        if access_log is not None:
            yield CounterMetricFamily("gows_access_log_dropped_lines", "Access log lines not written: the writer "
                                      "fell behind or a write failed (a full disk).", value=access_log.dropped)


def _per_proxy(rows: list[dict[str, Any]]) -> Iterator[Metric]:
    """Families labelled by proxy process (its slot index), from ProxyFleet.rows()."""
    up = GaugeMetricFamily("gows_proxy_up", "1 while the proxy process accepts clients.", labels=["proxy"])
    restarts = CounterMetricFamily("gows_proxy_restarts", "Times the master restarted the proxy process.",
                                   labels=["proxy"])
    served = CounterMetricFamily("gows_proxy_requests", "Requests read by the proxy process.", labels=["proxy"])
    connections = GaugeMetricFamily("gows_proxy_client_connections", "Open client connections of the proxy process.",
                                    labels=["proxy"])
    for row in rows:
        label = [str(row["index"])]
        up.add_metric(label, 1 if row["ready"] else 0)
        restarts.add_metric(label, row["restarts"])
        served.add_metric(label, row["requests"])
        connections.add_metric(label, row["client_connections"])
    yield from (up, restarts, served, connections)


def make_registry(master: Master) -> CollectorRegistry:
    """A registry of its own (not the process-global default) holding only the master's collector."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(MasterCollector(master))
    return registry


def exposition(registry: CollectorRegistry, accept: str) -> tuple[bytes, str]:
    """The scrape body and its content type, negotiated from the Accept header (OpenMetrics or text)."""
    encoder, content_type = choose_encoder(accept)
    return encoder(registry), content_type
