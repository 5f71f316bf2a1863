"""The proxy's tunables, one frozen value the master builds from the config and swaps on reload."""
from __future__ import annotations

from dataclasses import dataclass

BALANCE_POLICIES = ("round-robin", "least-outstanding", "consistent-hash")


@dataclass(frozen=True)
class ProxySettings:
    """Limits, timeouts (seconds), balancing policy and front-cache bounds of the front proxy."""

    balance: str = "round-robin"
    retries: int = 2  # extra attempts on another worker for an idempotent request
    connect_timeout: float = 2.0
    response_timeout: float = 30.0  # until the response head, then between reads/writes
    idle_timeout: float = 15.0  # keep-alive client connection with no request
    header_timeout: float = 10.0  # whole request head (slowloris)
    max_connections: int = 4096
    max_request_line: int = 8190
    max_header_bytes: int = 32768
    max_headers: int = 100
    max_body_bytes: int = 1048576
    body_buffer_bytes: int = 64 * 2**20  # request bodies held for all clients at once
    pool_size: int = 64  # idle keep-alive connections kept per worker
    worker_threads: int = 4  # serving threads per worker: the balancer's bound on stacking requests
    front_cache_enabled: bool = True
    front_cache_max_bytes: int = 64 * 2**20
    front_cache_max_object_bytes: int = 2**20
    front_cache_revalidate: float = 1.0  # seconds before a stored response is checked with a worker (cache.ttl)

    def __post_init__(self) -> None:
        if self.balance not in BALANCE_POLICIES:
            raise ValueError(f"balance: {self.balance!r} is not one of {', '.join(BALANCE_POLICIES)}")
        for name in ("connect_timeout", "response_timeout", "idle_timeout", "header_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}: must be a positive number of seconds, got {getattr(self, name)!r}")
        if self.retries < 0:
            raise ValueError(f"retries: must be >= 0, got {self.retries!r}")
        for name in ("max_connections", "max_request_line", "max_header_bytes", "max_headers", "pool_size",
                     "worker_threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)!r}")
        for name in ("max_body_bytes", "body_buffer_bytes", "front_cache_max_bytes", "front_cache_max_object_bytes",
                     "front_cache_revalidate"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must be >= 0, got {getattr(self, name)!r}")
