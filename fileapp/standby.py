"""Which of a worker's threads serves (fileapp.worker), and when another serves beside it.

One serving thread polls and serves; the others stand by. Python runs one thread at a time
anyway, and two busy ones pass the GIL to each other at every syscall, a futex wake-up and a
context switch each (a standalone worker with 4 threads under wrk -c100: 4.8k req/s and 220 us
of CPU a request, against 13k and 80 us with one serving). One thread standing by looks every
STANDBY seconds whether the serving one has been on its batch that long (a slow disk, a request
body that does not come): it then serves beside it until that one is back, and the next one
standing by takes the watch. While nothing is served it sleeps until a batch is taken: an idle
worker wakes no thread at all.
"""
from __future__ import annotations

import threading
import time

STANDBY = 0.25


class Standby:
    """The serving thread's claim and its batches, as the threads standing by see them."""

    def __init__(self) -> None:
        self.stopped = False  # set when the worker is done: every thread returns
        self._serving = threading.Lock()  # held for good by the serving thread
        self._watch = threading.Lock()  # held by the thread standing by that watches it
        self._since = 0.0  # when the serving thread took its batch; 0.0: none
        # Set by the serving thread when it takes a batch while the watcher sleeps (its
        # `_watcher_idle`) until something is served.
        self._taken = threading.Event()
        self._watcher_idle = False

    def claim(self) -> bool:
        """Whether the calling thread is the serving thread from now on (the first to ask)."""
        return self._serving.acquire(blocking=False)

    def took_batch(self, now: float) -> None:
        """(The serving thread) starts on a batch at `now`."""
        self._since = now
        if self._watcher_idle:
            self._taken.set()

    def batch_done(self) -> None:
        """(The serving thread) is through its batch."""
        self._since = 0.0

    def stuck(self) -> bool:
        """Whether the serving thread has been on its batch for STANDBY: on one connection,
        since it hands the rest back after fileapp.worker's BATCH_TIME."""
        since = self._since
        return since != 0.0 and time.monotonic() - since > STANDBY

    def wait_turn(self) -> bool:
        """Wait until the serving thread is stuck (True: serve beside it) or the worker stops
        (False); one thread standing by watches at a time, the others wait behind it."""
        with self._watch:
            while not self.stopped:
                if self.stuck():
                    return True
                if self._since != 0.0:
                    time.sleep(STANDBY)
                    continue
                # Nothing is being served: sleep until a batch is taken. (The flag is up before
                # the second look, and the serving thread sets `_since` before it looks at the
                # flag: one of the two sees the other.)
                self._taken.clear()
                self._watcher_idle = True
                if self._since == 0.0 and not self.stopped:
                    self._taken.wait()
                self._watcher_idle = False
        return False

    def stop(self) -> None:
        """The worker is done: the threads standing by return (the poller's wake-up is the
        worker's to write, for the threads polling)."""
        self.stopped = True
        self._taken.set()
