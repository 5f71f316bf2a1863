"""Helpers shared by the integration tests: free ports, waiting for servers, owned processes, and
context managers that end whatever a test started, however the test ends."""
from __future__ import annotations

import abc
import contextlib
import errno
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import ContextManager, Iterable, Iterator, TypeVar

from fileapp.processes import pid_alive  # noqa: F401  (re-exported for the tests)

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable


def free_port(host: str = "127.0.0.1") -> int:
    """An ephemeral port that was free a moment ago (the kernel picks it)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """`count` different ports that were free a moment ago (two free_port calls in a row may get
    the same one back)."""
    ports: list[int] = []
    while len(ports) < count:
        port = free_port(host)
        if port not in ports:
            ports.append(port)
    return ports


def wait_for_port(port: int, host: str = "127.0.0.1", timeout: float = 10.0) -> None:
    """Block until something accepts TCP connections on host:port, or raise TimeoutError."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {host}:{port} after {timeout}s")


def refused(port: int, host: str = "127.0.0.1") -> bool:
    """Whether a TCP connection to host:port is refused now (nothing listens there)."""
    with socket.socket() as s:
        s.settimeout(5)  # (a full backlog leaves a connect waiting: not refused)
        return s.connect_ex((host, port)) == errno.ECONNREFUSED


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.05, message: str = "condition"):
    """Poll `predicate` until it returns a truthy value (returned), or raise TimeoutError."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{message} not met after {timeout}s")
        time.sleep(interval)


def children(pid: int) -> list[int]:
    """The pids of the direct children of `pid` (none once it is gone)."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def stop_process(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """End a process this test started (by its pid), TERM first, KILL if it lingers."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)


def python_env() -> dict[str, str]:
    """The environment for child Pythons: this checkout importable, output unbuffered."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    return env


# -- ending what a test starts, however the test ends ---------------------------------------
_S = TypeVar("_S", bound="StoppedOnExit")
_T = TypeVar("_T")


class StoppedOnExit(abc.ABC):
    """For what a test starts in its constructor and ends with `stop()`: `with Thing(...) as t:`
    stops it on the way out, whatever happened inside."""

    @abc.abstractmethod
    def stop(self) -> None:
        """End what the constructor started; safe to call more than once."""

    def __enter__(self: _S) -> _S:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def closing_all(sockets: list[socket.socket]) -> Iterator[list[socket.socket]]:
    """Close every socket `sockets` holds when the block ends (the test appends them as it goes)."""
    try:
        yield sockets
    finally:
        for s in sockets:
            s.close()


@contextlib.contextmanager
def running(proc: subprocess.Popen, timeout: float = 10.0) -> Iterator[subprocess.Popen]:
    """End `proc`, a process this test started, when the block ends: its stdin closed when it is
    a pipe (a child reading it sees the end), then TERM, then KILL if it lingers."""
    try:
        yield proc
    finally:
        if proc.stdin is not None:
            proc.stdin.close()
        stop_process(proc, timeout)


@contextlib.contextmanager
def together(things: Iterable[ContextManager[_T]]) -> Iterator[list[_T]]:
    """Enter each of `things` in turn, and leave them all (the last first) when the block ends."""
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(t) for t in things]
