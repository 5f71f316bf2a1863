"""Addresses the master listens on or talks to, and the one way gows writes `host:port`.

An IPv6 literal is written in brackets (`[::1]:8080`, RFC 3986's authority), everywhere: in
logs, error messages, Host headers and URLs. Without them `::1:8080` is ambiguous, and a Host
header or URL written that way is malformed.
"""
from __future__ import annotations

from dataclasses import dataclass


def host_port(host: str, port: int) -> str:
    """`host:port`, with an IPv6 literal in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass(frozen=True)
class Address:
    """A bindable address: IP literal (or localhost) and port."""

    host: str
    port: int

    def __str__(self) -> str:
        return host_port(self.host, self.port)


@dataclass(frozen=True)
class WorkerAddress:
    """A worker's address; `local` workers are spawned here, others only checked. `weight` and
    `slow_start` say how the proxies balance onto it (see arbiter/proxy/balancer.py).

    A `named` one's host is a DNS name the master resolves (at start and every resolveInterval):
    each address it yields is a member of its own (arbiter/resolve.py).
    """

    host: str
    port: int
    local: bool
    label: str  # the config key that put it there, for error messages
    named: bool = False
    weight: int = 1
    slow_start: float = 0.0  # seconds

    def __str__(self) -> str:
        return host_port(self.host, self.port)
