"""gows' L7 reverse proxy, run by each proxy process: client protocol, upstream pool, balancer,
front cache."""
from .server import Proxy

__all__ = ["Proxy"]
