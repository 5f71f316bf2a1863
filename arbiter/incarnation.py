"""One process serving a local worker slot (an "incarnation"): how it is started, signalled, and
what its end says.

Workers are exec'd (`python -m fileapp --fd N`), never forked from the master: a forked child
would inherit the uvloop loop, the proxy's sockets and connections and any threads, none of which
a worker must touch. Exec gives a clean process that also picks up new code on every (re)start.

A worker never outlives the master: it gets `--parent-pid` and arms PR_SET_PDEATHSIG, a pidfd
and a periodic check itself. There is deliberately no preexec_fn here: the spawn blocks the
loop until the child has exec'd, and Python code run between fork and exec would widen that.
"""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import time

log = logging.getLogger("gows.workers")

# Signals whose default action dumps core (signal(7)) are what a process gets for its own fault;
# SIGQUIT, the one of them only ever sent by another process, is left out.
_OWN_FAULTS = frozenset({signal.SIGABRT, signal.SIGBUS, signal.SIGFPE, signal.SIGILL, signal.SIGSEGV,
                         signal.SIGSYS, signal.SIGTRAP, signal.SIGXCPU, signal.SIGXFSZ})


def killed_from_outside(returncode: int | None) -> bool:
    """The process died of a signal another process sent (kill(1), the OOM killer), not of a
    fault of its own (SIGSEGV, SIGABRT, ...) and not by exiting."""
    return returncode is not None and returncode < 0 and -returncode not in _OWN_FAULTS


def describe_exit(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"was killed by signal {-returncode}"
    return f"exited with status {returncode}"


def _schedule_as_batch(pid: int) -> None:
    """Mark a fresh worker SCHED_BATCH (same CPU share; its threads, made later, inherit it).

    The proxy wakes a worker for every request it forwards; a normal worker then preempts the
    proxy in the middle of its event-loop pass, so with workers sharing the proxy's cores the
    one process every request crosses keeps losing the CPU. A batch task never preempts on
    wake-up: the proxy finishes its pass and workers then take several requests per run.
    """
    if hasattr(os, "sched_setscheduler"):
        try:
            os.sched_setscheduler(pid, os.SCHED_BATCH, os.sched_param(0))
        except OSError as exc:  # the worker already exited, or a sandbox forbids it
            log.debug("could not make worker %d SCHED_BATCH: %s", pid, exc)


class Incarnation:
    """One process serving a worker slot."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.pid: int = proc.pid
        self.started = time.monotonic()
        self.was_up = False
        # uvloop reaps its children itself on SIGCHLD and completes this at once.
        self.exited: asyncio.Future[int] = asyncio.ensure_future(proc.wait())

    @classmethod
    async def spawn(cls, argv: list[str], fds: tuple[int, ...], output: int | None, *,
                    batch: bool = True, stdout: bool = True) -> Incarnation:
        """Exec `argv`, which inherits the descriptors `fds`; its stderr (and its stdout, unless
        `stdout` is False: then the master's own is inherited) goes to `output` (a pipe for the
        master to relay) or, when None, to the master's stderr. `batch`: SCHED_BATCH (workers,
        see _schedule_as_batch). OSError when it cannot be started."""
        proc = await asyncio.create_subprocess_exec(
            *argv, pass_fds=fds, stdin=subprocess.DEVNULL,
            stdout=output if stdout else None,
            stderr=(subprocess.STDOUT if stdout else output) if output is not None else None,
        )
        if batch:
            _schedule_as_batch(proc.pid)
        return cls(proc)

    @property
    def alive(self) -> bool:
        return self.proc.returncode is None

    def send(self, sig: int) -> None:
        if self.alive:
            try:
                self.proc.send_signal(sig)
            except ProcessLookupError:
                pass
