"""Listening sockets the master binds and keeps (the public listener and each local worker's
port), and how to tell the master's own shortage of sockets from a peer's failure.

The proxy imports this module: it raises its own ListenError and knows nothing of the config
(arbiter.config.bind_configured turns a failure into a ConfigError naming the key).
"""
from __future__ import annotations

import errno
import socket

from .addresses import host_port


class ListenError(Exception):
    """An address cannot be listened on; the message is one line ("cannot listen on ...: why")."""


def somaxconn() -> int:
    """The kernel's cap on a listen backlog; asking for it gives the longest queue allowed."""
    try:
        with open("/proc/sys/net/core/somaxconn") as f:
            return int(f.read())
    except (OSError, ValueError):
        return socket.SOMAXCONN


def bind_listener(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port; ListenError when it cannot be had.

    The socket stays blocking and non-inheritable: workers get it through pass_fds and set the
    mode they need themselves (O_NONBLOCK is shared by every process holding the socket).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((host, port))
        sock.listen(somaxconn())
    except OSError as e:
        sock.close()
        reason = {errno.EADDRINUSE: "address already in use",
                  errno.EADDRNOTAVAIL: "address not available on this machine",
                  errno.EACCES: "permission denied"}.get(e.errno, e.strerror or str(e))
        raise ListenError(f"cannot listen on {host_port(host, port)}: {reason}") from None
    return sock


# errno values that say this process (or this host) ran out of descriptors or memory: a socket
# or connect failing with one of them says nothing about the peer it was meant for.
LOCAL_SHORTAGES = {errno.EMFILE: "file descriptors", errno.ENFILE: "file descriptors (system-wide)",
                   errno.ENOBUFS: "socket buffers", errno.ENOMEM: "memory",
                   errno.EADDRNOTAVAIL: "ephemeral ports"}


def local_shortage(exc: BaseException) -> str | None:
    """What the master is short of when `exc` is one of LOCAL_SHORTAGES, else None."""
    if isinstance(exc, OSError) and exc.errno in LOCAL_SHORTAGES:
        return f"the master is out of {LOCAL_SHORTAGES[exc.errno]} ({exc.strerror or exc})"
    return None
