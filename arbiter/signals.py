"""The master's signals: queued by the event loop's handlers, answered in the loop one at a time
by the handler named after each (handle_hup for SIGHUP, as in gunicorn's Arbiter).

One wait serves the master's whole life. While the proxies start, a reload or the final drain
runs, the master answers only the signals that make sense then; the others wait in the queue
until it is done.
"""
from __future__ import annotations

import asyncio
import enum
import logging
import signal
from typing import Awaitable, Collection, Protocol

log = logging.getLogger("gows.arbiter")

# USR2 is gunicorn's re-exec (a binary upgrade), which gows does not do: handled only so that an
# operator's `kill -USR2` is logged and ignored instead of killing the master at once (its
# default action), with no drain and the pidfile left behind.
HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP, signal.SIGTTIN,
                   signal.SIGTTOU, signal.SIGUSR1, signal.SIGUSR2)
HANDLERS = {sig: f"handle_{sig.name[3:].lower()}" for sig in HANDLED_SIGNALS}  # SIGTTIN: handle_ttin
# While the proxies start or a reload runs (answer_while): a stop, and the logs' reopening.
ANSWERED_WHILE_BUSY = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGUSR1})
ANSWERED_DURING_STOP = frozenset({signal.SIGINT, signal.SIGQUIT})  # the rest are moot: it is leaving


class Stop(enum.Enum):
    """How the master stops: the workers drain first (TERM) or quit at once (INT, QUIT)."""

    GRACEFUL = "gracefully"
    NOW = "now"


class Handlers(Protocol):
    """The master's answer to each signal; a Stop ends the wait it came in."""

    async def handle_term(self) -> Stop | None: ...
    async def handle_int(self) -> Stop | None: ...
    async def handle_quit(self) -> Stop | None: ...
    async def handle_hup(self) -> Stop | None: ...
    async def handle_ttin(self) -> None: ...
    async def handle_ttou(self) -> None: ...
    async def handle_usr1(self) -> None: ...
    async def handle_usr2(self) -> None: ...


class SignalQueue:
    """The signals the loop received and the master has not answered yet."""

    def __init__(self) -> None:
        self._queue: asyncio.Queue[int] = asyncio.Queue()

    def put_nowait(self, sig: int) -> None:
        self._queue.put_nowait(sig)

    def install(self, loop: asyncio.AbstractEventLoop) -> None:
        for sig in HANDLED_SIGNALS:
            loop.add_signal_handler(sig, self.put_nowait, sig)

    def remove(self, loop: asyncio.AbstractEventLoop) -> None:
        for sig in HANDLED_SIGNALS:
            loop.remove_signal_handler(sig)

    async def answer(self, handlers: Handlers, busy: asyncio.Future | None = None,
                     answered: Collection[int] = HANDLED_SIGNALS) -> Stop | None:
        """The master's one wait: for the next signal, or for `busy` (a reload, the drain) to end.

        A signal in `answered` goes to its handler; any other waits in the queue until this wait
        is over. Returns the Stop a handler returned, or None once `busy` is done.
        """
        waiting: list[int] = []
        try:
            while busy is None or not busy.done():
                getter = asyncio.ensure_future(self._queue.get())
                await asyncio.wait({getter} if busy is None else {busy, getter},
                                   return_when=asyncio.FIRST_COMPLETED)
                if not getter.done():
                    getter.cancel()
                    continue
                sig = getter.result()
                log.info("received %s", signal.Signals(sig).name)
                if sig not in answered:
                    waiting.append(sig)
                    continue
                stop = await getattr(handlers, HANDLERS[sig])()
                if stop is not None:
                    return stop
            return None
        finally:
            for sig in waiting:
                self._queue.put_nowait(sig)

    async def answer_while(self, handlers: Handlers, work: Awaitable[None]) -> Stop | None:
        """Run `work` (the proxies' start, a reload) answering only ANSWERED_WHILE_BUSY meanwhile:
        a stop cancels it and is returned; else None once it is done (raising what it raised)."""
        task = asyncio.ensure_future(work)
        stop = await self.answer(handlers, task, ANSWERED_WHILE_BUSY)
        if stop is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            return stop
        task.result()
        return None
