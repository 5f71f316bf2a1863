"""The master's L7 reverse proxy: client protocol, upstream pool, balancer, front cache."""
from .server import Proxy

__all__ = ["Proxy"]
