"""The soak's timetable: when it samples, kills a worker or a proxy, reloads, scales and attacks.

Every minute repeats the same pattern. Samples fall on multiples of 10 s and everything else
in between: a worker kill 5 s after each sample, the attacks 1-3 s after one (done before the
next sample, so a sample counts no client of ours), wrk's runs end 5 s after one. TTIN and TTOU
come after the minute's HUP, which re-reads the worker count from the config (as gunicorn's
does): across a HUP they would not cancel out. A proxy kill comes once a minute, at +16 s (a
second after a worker kill, when the attacks of that slot are over), and the wrk run it falls
in ends KILL_WINDOW after it: its errors are that kill's. Every growth window (a whole minute)
holds one sample 4 s after a proxy kill, and the last sample still sees wrk's connections.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass

from .verdict import KILL_WINDOW

SAMPLE_EVERY = 10  # seconds between two samples of RSS and fds
KILL_EVERY, KILL_OFFSET = 10, 5  # SIGKILL of one worker
PROXY_KILL_OFFSET = 16  # SIGKILL of one proxy, in each minute
BASELINE_AT = 60  # growth is measured "after the first minute"


class Action(enum.Enum):
    """What the soak does at an event."""

    SAMPLE = "sample"
    KILL = "kill"
    HUP = "hup"
    TTIN = "ttin"
    TTOU = "ttou"
    PROXY_KILL = "proxy kill"
    SLOW_READERS = "slow readers"
    ABORTED_UPLOADS = "aborted uploads"


# The rest of each minute: (offset in the minute, action, clients). 200 slow readers and 200
# aborted uploads a minute, in batches.
MINUTE = [
    *((offset, Action.SLOW_READERS, 40) for offset in (1, 11, 21, 31, 41)),
    *((offset, Action.ABORTED_UPLOADS, 50) for offset in (3, 13, 33, 43)),
    (22, Action.HUP, 1),
    (37, Action.TTIN, 1),
    (52, Action.TTOU, 1),
    (PROXY_KILL_OFFSET, Action.PROXY_KILL, 1),
]


@dataclass(frozen=True)
class Event:
    """One thing to do `at` seconds after the load started (`count` clients for the attacks)."""

    at: float
    action: Action
    count: int = 1


def per_minute(action: Action) -> int:
    """How many clients (or signals) `action` gets a minute."""
    return sum(count for _, a, count in MINUTE if a is action)


def schedule(seconds: int) -> list[Event]:
    """Every event of a soak of `seconds`, in time order; a last sample at `seconds` itself."""
    events = [Event(float(t), Action.SAMPLE) for t in range(0, seconds, SAMPLE_EVERY)]
    events.append(Event(float(seconds), Action.SAMPLE))
    events += [Event(float(t), Action.KILL) for t in range(KILL_OFFSET, seconds, KILL_EVERY)]
    ttou_offset = next(offset for offset, action, _ in MINUTE if action is Action.TTOU)
    for minute in range(0, seconds, 60):
        for offset, action, count in MINUTE:
            # A TTIN whose TTOU falls after the end would leave one worker more.
            last = minute + (ttou_offset if action is Action.TTIN else offset)
            if last < seconds:
                events.append(Event(float(minute + offset), action, count))
    # At equal times the sample comes first: it sees the phase before the chaos.
    order = list(Action)
    return sorted(events, key=lambda e: (e.at, order.index(e.action)))


def wrk_run_ends(seconds: int) -> list[float]:
    """When wrk's runs end: at each worker kill's time (between two samples, so a sample never
    sees wrk's connections being replaced), KILL_WINDOW after each proxy kill (so the run a proxy
    kill falls in counts the errors of its window), and at the end of the soak."""
    events = schedule(seconds)
    ends = {e.at for e in events if e.action is Action.KILL}
    ends |= {e.at + KILL_WINDOW for e in events if e.action is Action.PROXY_KILL}
    return sorted(end for end in ends if end < seconds) + [float(seconds)]


def wrk_run_end(now: float, seconds: int) -> float:
    """When the wrk run starting `now` ends: the first of wrk_run_ends at least a second away
    (wrk needs a second at least), or the end of the soak."""
    return next((end for end in wrk_run_ends(seconds) if end - now >= 1), float(seconds))


def growth_windows(seconds: int) -> tuple[tuple[float, float], tuple[float, float]]:
    """The samples growth is measured between, as two (first, last) time ranges: the minute after
    the first one and the last minute. Their medians are compared: each window holds one sample
    of every phase of the minute (before or after the TTIN, a slow-reader batch, ...), so the
    phases cancel out and one sample taken in a burst does not decide. A run too short for two
    such minutes compares single samples: half-way and the end."""
    last_in_minute = 60 - SAMPLE_EVERY
    if seconds - last_in_minute >= BASELINE_AT + 60:
        return (BASELINE_AT, BASELINE_AT + last_in_minute), (seconds - last_in_minute, seconds)
    half = (seconds // 2) // SAMPLE_EVERY * SAMPLE_EVERY
    return (half, half), (seconds, seconds)
