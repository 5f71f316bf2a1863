"""The standalone worker's process concerns: gows' epoll worker run without gunicorn's arbiter.

It ignores SIGHUP (no config to reload; a closing terminal must not stop it), quits at once on
SIGINT/SIGQUIT, keeps no heartbeat file (the master checks health over HTTP), and, when told its
parent's pid, exits within a second of that parent dying: PR_SET_PDEATHSIG, a pidfd in the main
loop's poller, and a /proc check after each poll, at most once a second.
"""
from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import time

from . import gunicorn_compat as compat
from .processes import pid_alive
from .response import WRITE_TIMEOUT
from .worker import IDLE_SWEEP_INTERVAL, GowsThreadWorker

PR_SET_PDEATHSIG = 1
# The kernel sends this when the parent (thread) that forked us dies; the handler then checks
# the parent really is gone, since the signal also fires when only the forking thread exits.
PDEATH_SIGNAL = signal.SIGUSR2
# gthread asks after every poll whether the parent lives; /proc is read at most this often
# (the pidfd and PR_SET_PDEATHSIG report a death at once anyway).
PARENT_CHECK_INTERVAL = 1.0


class FileAppWorker(GowsThreadWorker):
    """The standalone worker: also fast quit on SIGINT/SIGQUIT and parent watching."""

    main_thread_signals = GowsThreadWorker.main_thread_signals | {PDEATH_SIGNAL}

    def __init__(self, *args, parent_pid: int | None, write_timeout: float = WRITE_TIMEOUT,
                 **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.parent_pid = parent_pid
        self.write_timeout = write_timeout
        self._pidfd: int | None = None
        self._parent_checked = 0.0

    def notify(self) -> None:
        """No heartbeat file: nothing watches it here; the master checks health over HTTP."""

    # -- signals ----------------------------------------------------------------------------

    def init_signals(self) -> None:
        super().init_signals()
        # A closing terminal must not stop a standalone worker; there is no config to reload.
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        if self.parent_pid is None:
            return
        signal.signal(PDEATH_SIGNAL, self._on_pdeath_signal)
        signal.siginterrupt(PDEATH_SIGNAL, False)
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, int(PDEATH_SIGNAL), 0, 0, 0)
        except (OSError, AttributeError):
            self.log.debug("prctl(PR_SET_PDEATHSIG) unavailable; relying on the parent check")
        if not self._parent_alive():  # died before the watch was armed
            self.fast_exit("parent process %s is gone" % self.parent_pid)

    def handle_quit(self, sig, frame) -> None:
        """SIGINT/SIGQUIT: leave now, without waiting for requests or threads."""
        self.fast_exit("received %s" % signal.Signals(sig).name)

    def _on_pdeath_signal(self, sig, frame) -> None:
        if not self._parent_alive():
            self.fast_exit("parent process %s died" % self.parent_pid)

    def fast_exit(self, reason: str, code: int = 0) -> None:
        """Exit the process immediately (no graceful drain), after flushing the logs."""
        self.alive = False
        self.set_draining()
        try:
            self.log.info("Worker exiting (pid: %s): %s", os.getpid(), reason)
            logging.shutdown()  # flushes every handler (gunicorn's and fileapp.logs')
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)

    # -- parent watch -----------------------------------------------------------------------

    def idle_wake_interval(self) -> float:
        """No heartbeat to keep; without a pidfd, the parent is looked for every second."""
        if self.parent_pid is not None and self._pidfd is None:
            return PARENT_CHECK_INTERVAL
        return IDLE_SWEEP_INTERVAL

    def _parent_alive(self) -> bool:
        if self.parent_pid is None:
            return True
        return pid_alive(self.parent_pid)

    def is_parent_alive(self) -> bool:
        """Called by the run loop after every poll; standalone workers have no parent to watch.

        Without --parent-pid the worker must survive its launching shell, so this is always
        True; with it, a dead parent means exit at once (the master owns our clients anyway).
        """
        now = time.monotonic()
        if now - self._parent_checked < PARENT_CHECK_INTERVAL:
            return True
        self._parent_checked = now
        if not self._parent_alive():
            self.fast_exit("parent process %s died" % self.parent_pid)
        return True

    def run(self) -> None:
        if self.parent_pid is not None and hasattr(os, "pidfd_open"):
            try:
                self._pidfd = os.pidfd_open(self.parent_pid)
            except ProcessLookupError:
                self.fast_exit("parent process %s is gone" % self.parent_pid)
            except OSError:
                self._pidfd = None  # old kernel: the periodic check still covers it
            if self._pidfd is not None:
                # Readable as soon as the parent exits: no need to wait for the 1 s loop tick.
                compat.watch_readable(self, self._pidfd, self._on_parent_exit)
        super().run()

    def _on_parent_exit(self, _fileobj) -> None:
        self.fast_exit("parent process %s exited" % self.parent_pid)
