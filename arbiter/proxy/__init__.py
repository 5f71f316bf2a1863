"""The master's L7 reverse proxy: client protocol, upstream pool, balancer, front cache."""
from .server import Proxy
from .settings import ProxySettings

__all__ = ["Proxy", "ProxySettings"]
