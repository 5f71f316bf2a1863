"""Listening sockets the master binds and keeps (the public listener, each local worker's port
and its Unix socket), and how to tell the master's own shortage of sockets from a peer's failure.

The proxy imports this module: it raises its own ListenError and knows nothing of the config
(arbiter.config.bind_configured turns a failure into a ConfigError naming the key).
"""
from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import socket
import tempfile
from dataclasses import dataclass

from fileapp.processes import pid_alive

from .addresses import host_port

log = logging.getLogger("gows.sockets")
# sun_path holds 108 bytes with the terminating NUL: a longer path cannot be bound.
UNIX_PATH_MAX = 107


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


@dataclass
class UnixListener:
    """A local worker's listening Unix socket and its file (removed by close())."""

    sock: socket.socket
    path: str

    def close(self) -> None:
        self.sock.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


class RuntimeDir:
    """The master's private directory for its workers' Unix sockets: mode 0700, so that only
    the master's user can connect to them, and removed (sockets and all) by remove().

    Filesystem sockets, not Linux's abstract namespace: an abstract name can be connected to
    by any process of any user in the network namespace, and its address is bytes, which
    gunicorn would put in the WSGI environ's SERVER_NAME as an int. The price is a directory
    left behind if the master is killed with SIGKILL ($XDG_RUNTIME_DIR is a tmpfs cleared at
    logout; mkdtemp never reuses a name).
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._made = 0

    @classmethod
    def create(cls) -> RuntimeDir | None:
        """A fresh directory under $XDG_RUNTIME_DIR (else the temp dir); None, with a warning,
        when none can be made: workers are then reached over TCP."""
        for parent in (os.environ.get("XDG_RUNTIME_DIR") or None, None):
            try:
                # mkdtemp: mode 0700. The pid in the name tells a later master whether it is stale.
                made = cls(tempfile.mkdtemp(prefix=f"gows-{os.getpid()}-", dir=parent))
            except OSError as e:
                error = e
                continue
            _remove_stale(os.path.dirname(made.path))
            return made
        log.warning("cannot make a directory for the workers' Unix sockets (%s); the proxies "
                    "reach local workers over TCP", error.strerror or error)
        return None

    def bind(self, port: int) -> UnixListener | None:
        """A listening Unix socket for the worker on `port`, with a name never used before in
        this directory (a retired slot's may still be draining); None, with a warning, when it
        cannot be had: that worker is then reached over TCP."""
        self._made += 1
        path = os.path.join(self.path, f"worker-{port}-{self._made}.sock")
        if len(os.fsencode(path)) > UNIX_PATH_MAX:
            log.warning("cannot bind a Unix socket for worker port %d: %s is longer than %d bytes; "
                        "the proxies reach it over TCP", port, path, UNIX_PATH_MAX)
            return None
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(path)
            sock.listen(somaxconn())
        except OSError as e:
            sock.close()
            log.warning("cannot bind a Unix socket for worker port %d at %s (%s); the proxies reach "
                        "it over TCP", port, path, e.strerror or e)
            return None
        return UnixListener(sock, path)

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def _remove_stale(parent: str) -> None:
    """Remove the runtime directories that masters killed with SIGKILL left in `parent`: ours
    (same owner), named for a process that no longer exists."""
    try:
        names = os.listdir(parent)
    except OSError:
        return
    uid = os.geteuid()
    for name in names:
        match = _RUNTIME_NAME.fullmatch(name)
        if match is None or pid_alive(int(match.group(1))):
            continue
        path = os.path.join(parent, name)
        try:
            if os.lstat(path).st_uid != uid:
                continue
        except OSError:
            continue
        shutil.rmtree(path, ignore_errors=True)


_RUNTIME_NAME = re.compile(r"gows-(\d+)-\w+")



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
