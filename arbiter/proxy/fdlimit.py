"""How many open files a proxy process needs for its clients, and raising its limit towards that
(the master warns at start when the hard limit it hands down is too low: proxies.py)."""
from __future__ import annotations

import resource
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..config import ProxyConfig

# Descriptors per client: its own, and either one to a worker while a request is on its way
# there or, while a file body is sent, the file and a duplicate of the socket watched for room
# (a client's requests are answered one at a time); and aside from those, beyond the idle pool:
# listeners (ACCEPTORS duplicates of each of up to 3), logs, the control channel, the loop's own.
FDS_PER_CLIENT = 3
ACCEPTORS = 16
FD_RESERVE = 32 + 3 * ACCEPTORS


def fd_need(config: ProxyConfig) -> int:
    """Open files a proxy needs to serve `config.max_connections` clients."""
    return FDS_PER_CLIENT * config.max_connections + config.pool_size + FD_RESERVE


def raise_fd_limit(wanted: int) -> int:
    """Raise the soft open file limit towards `wanted` (up to the hard limit); the limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return wanted
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            return target
        except (ValueError, OSError):
            pass
    return soft
