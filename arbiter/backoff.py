"""Restart back-off for workers in a crash loop, and the pool-wide rule that keeps it from
leaving every local slot without a worker up or on its way (a rescue), with a back-off of its
own for the rescues of a pool whose workers cannot start at all."""
from __future__ import annotations

import time
from typing import Protocol

from .incarnation import Incarnation, killed_from_outside

# The exponent's own cap: past about 1,024 failures in a row (a few minutes of a fast crash
# loop) initial x 2^n no longer fits a float, and the OverflowError ended the slot's supervisor,
# leaving its port without a worker for good.
MAX_DOUBLINGS = 40


def doubled(initial: float, times: int, maximum: float) -> float:
    """`initial` doubled `times` times, at most `maximum`."""
    return min(maximum, initial * 2 ** min(times, MAX_DOUBLINGS))


class Backoff:
    """Restart delay for a worker failing right after start: none for the first failure, then
    `initial`, doubling per further consecutive failure, capped at `maximum`.

    Back-off is for crash loops, so only crash-loop evidence counts (record), and a Pool never
    lets it leave every local slot without a worker up or starting.
    """

    def __init__(self) -> None:
        self.failures = 0

    def delay(self, initial: float, maximum: float) -> float:
        if self.failures <= 1:
            return 0.0
        return doubled(initial, self.failures - 2, maximum)

    def record(self, inc: Incarnation, min_uptime: float) -> None:
        """Count crash-loop evidence: an incarnation that never became healthy, or that exited,
        faulted or failed its checks sooner than `min_uptime` seconds after it started.

        One that had become healthy and was then killed from outside (kill -9, the OOM killer)
        says nothing about the next one: the slot restarts at once and its count starts over.
        """
        lived = time.monotonic() - inc.started
        if inc.was_up and killed_from_outside(inc.proc.returncode):
            self.failures = 0
        elif not inc.was_up or lived < min_uptime:
            self.failures += 1
        else:
            self.failures = 0


class Slot(Protocol):
    """What the pool sees of a local worker slot (workers.LocalWorker)."""

    @property
    def on_its_way(self) -> bool:
        """The slot has a worker up, or on its way up."""

    def notify(self) -> None:
        """Something the slot depends on changed: it looks again."""


class Pool:
    """The local worker slots of one master, seen together so that back-off never leaves them
    all without a worker: when no slot has a worker up or starting, one slot waiting out its
    back-off starts at once (one, not all: a bad config must not spin every slot).

    Checking and claiming happen in one step of the event loop (no await between them), so two
    slots woken by the same change cannot both take the rescue.

    A rescued worker that exits by itself before it was ever up (its root gone, a port it cannot
    use: what the next one meets too) makes the next rescue wait: `initial`, doubling for each
    one more in a row, to `maximum`; until then the slots keep their own back-off. Without that,
    such a pool starts a worker after another at process-start speed, a core and two log lines
    each, for as long as the cause lasts. Any worker up again ends the wait. One killed from
    outside (SIGKILL, the OOM killer) says nothing about the next one: the rescue stays at once.
    """

    def __init__(self) -> None:
        self._slots: set[Slot] = set()
        self.rescues_failed = 0  # rescued workers in a row that exited by themselves, never up
        self._rescue_at = 0.0  # (time.monotonic) no rescue before this

    def join(self, slot: Slot) -> None:
        self._slots.add(slot)

    def leave(self, slot: Slot) -> None:
        self._slots.discard(slot)
        self.changed()

    def has_worker_on_its_way(self) -> bool:
        """Some slot has an incarnation (up, booting, or still being checked) or is starting one."""
        return any(slot.on_its_way for slot in self._slots)

    def changed(self) -> None:
        """A slot lost its incarnation: slots waiting out a back-off look again."""
        for slot in list(self._slots):
            slot.notify()

    def rescue_in(self) -> float:
        """Seconds before a rescue may start (0: now)."""
        return max(0.0, self._rescue_at - time.monotonic())

    def rescue_failed(self, initial: float, maximum: float) -> float:
        """A rescued worker exited by itself before it was up: the seconds the next rescue waits."""
        self.rescues_failed += 1
        delay = doubled(initial, self.rescues_failed - 1, maximum)
        self._rescue_at = time.monotonic() + delay
        return delay

    def worker_up(self) -> None:
        """A worker is up: the next rescue, if one is needed, starts at once."""
        self.rescues_failed = 0
        self._rescue_at = 0.0
