"""What each signal does while the master serves, reloads or stops (gunicorn's table of signals).

The master runs in this process on uvloop with one remote worker (nothing is spawned); signals
are queued the way the loop's handlers queue them, and a test holds the reload open (or keeps
a slot draining) to send the next signal while it runs.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import signal
import time

import pytest
import uvloop

from arbiter.arbiter import Arbiter
from arbiter.config import bind_configured, load_data
from arbiter.ops.logs import LogSink
from support import free_port

pytestmark = pytest.mark.unit

LIMIT = 30.0  # seconds: a safety net for each wait, far above what any of them takes


async def until(predicate, what: str) -> None:
    """Wait (on the master's own loop) until `predicate()` holds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + LIMIT
    while not predicate():
        assert loop.time() < deadline, f"still waiting for {what} after {LIMIT:g}s"
        await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def master(tmp_path):
    """A running in-process master; yields (arbiter, the task of its run()) and restores logging."""
    (tmp_path / "www").mkdir()
    config = load_data({"baseDirectory": "www", "listen": f"127.0.0.1:{free_port()}",
                        "workers": [{"host": "127.0.0.1", "port": free_port()}],
                        "logging": {"file": str(tmp_path / "gows.log")}}, tmp_path / "gows.conf.json")
    config = dataclasses.replace(config, workers=(dataclasses.replace(config.workers[0], local=False),))
    root = logging.getLogger()
    level = root.level
    public = bind_configured(config.listen.host, config.listen.port, "listen")
    sink = LogSink(config.logging)
    try:
        arbiter = Arbiter(config, public, {}, sink)
        running = asyncio.ensure_future(arbiter.run())
        try:
            await until(lambda: len(arbiter.table) == 1, "the master to start")
            yield arbiter, running
        finally:
            running.cancel()
            await asyncio.gather(running, return_exceptions=True)
    finally:
        root.removeHandler(sink.handler)
        sink.handler.close()
        root.setLevel(level)
        public.close()


class HeldReload:
    """Stands in for the master's reload: the first one runs until released, later ones at once."""

    def __init__(self) -> None:
        self.started = 0
        self.finished = 0
        self.cancelled = False
        self.release = asyncio.Event()

    async def __call__(self) -> None:
        self.started += 1
        try:
            if self.started == 1:
                await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled = True
            raise
        self.finished += 1


class DrainingSlot:
    """Stands in for a local worker slot that keeps draining until told to quit at once."""

    def __init__(self) -> None:
        self.stops: list[bool] = []
        self.task = asyncio.get_running_loop().create_future()
        self.closed = False

    def stop(self, graceful: bool = True) -> None:
        self.stops.append(graceful)
        if not graceful and not self.task.done():
            self.task.set_result(None)

    def close(self) -> None:
        self.closed = True


def messages(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records]


@pytest.mark.parametrize("sig, how", [(signal.SIGTERM, "gracefully"), (signal.SIGINT, "now"),
                                      (signal.SIGQUIT, "now")])
def test_a_stop_signal_during_a_reload_abandons_the_reload_and_stops(tmp_path, caplog, sig, how):
    async def main():
        async with master(tmp_path) as (arbiter, running):
            reload = arbiter._reload = HeldReload()
            arbiter._signals.put_nowait(signal.SIGHUP)
            await until(lambda: reload.started, "the reload to start")
            arbiter._signals.put_nowait(sig)
            assert await asyncio.wait_for(running, LIMIT) == 0
            assert reload.cancelled and not reload.finished

    with caplog.at_level(logging.INFO):
        uvloop.run(main())
    log = messages(caplog)
    assert log.index("reload abandoned: stopping") < log.index(f"stopping {how}")
    assert "master exiting" in log


def test_usr1_during_a_reload_is_answered_at_once_and_other_signals_wait_for_the_reload(tmp_path, caplog):
    async def main():
        async with master(tmp_path) as (arbiter, running):
            reload = arbiter._reload = HeldReload()
            arbiter._signals.put_nowait(signal.SIGHUP)
            await until(lambda: reload.started, "the reload to start")
            for other in (signal.SIGTTIN, signal.SIGHUP, signal.SIGUSR1):
                arbiter._signals.put_nowait(other)
            # Signals are taken in order: once USR1 is answered, TTIN and HUP have been seen.
            await until(lambda: "reopened log file" in " ".join(messages(caplog)), "USR1 to reopen the log")
            assert reload.started == 1 and not any("SIGTTIN ignored" in m for m in messages(caplog))
            reload.release.set()
            await until(lambda: reload.finished == 2, "the deferred HUP to reload again")
            arbiter._signals.put_nowait(signal.SIGTERM)
            assert await asyncio.wait_for(running, LIMIT) == 0

    with caplog.at_level(logging.INFO):
        uvloop.run(main())
    log = messages(caplog)
    ttin = log.index("SIGTTIN ignored: there is no local worker to add one next to")
    assert log.index(next(m for m in log if m.startswith("reopened log file"))) < ttin
    assert "reload abandoned: stopping" not in log and "stopping gracefully" in log


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGQUIT])
def test_int_or_quit_during_a_graceful_stop_makes_draining_workers_quit_at_once(tmp_path, caplog, sig):
    async def main():
        async with master(tmp_path) as (arbiter, running):
            slot = arbiter.slots.serving[("127.0.0.1", 1)] = DrainingSlot()
            arbiter._signals.put_nowait(signal.SIGTERM)
            await until(lambda: slot.stops, "TERM to drain the slot")
            for other in (signal.SIGTERM, signal.SIGHUP, signal.SIGTTIN, signal.SIGUSR1):
                arbiter._signals.put_nowait(other)  # none of these changes a stop under way
            arbiter._signals.put_nowait(sig)
            assert await asyncio.wait_for(running, LIMIT) == 0
            assert slot.stops == [True, False] and slot.closed

    with caplog.at_level(logging.INFO):
        uvloop.run(main())
    log = messages(caplog)
    assert log.index("stopping gracefully") < log.index(f"received {sig.name}") < log.index("stopping now")
    assert log.index("stopping now") < log.index("master exiting")
    assert not any(m.startswith(("reopened log file", "SIGTTIN", "reload")) for m in log)


def test_term_on_a_checked_node_is_a_lame_duck_first_and_int_cuts_it_short(tmp_path, caplog):
    """An edge asked this master's health path lately: on TERM its proxies answer it 503 for
    lameDuck seconds (5 by default) before anything stops; INT ends that wait at once."""
    async def main():
        async with master(tmp_path) as (arbiter, running):
            slot = arbiter.slots.serving[("127.0.0.1", 1)] = DrainingSlot()
            arbiter.proxy.health_asked_at = time.monotonic()
            arbiter._signals.put_nowait(signal.SIGTERM)
            await until(lambda: any(m.startswith("lame duck") for m in messages(caplog)), "the lame duck")
            assert not arbiter.proxy.serving
            await asyncio.sleep(0.2)  # (nothing is to happen: the drain waits for the lame duck)
            assert slot.stops == [] and arbiter.stopping
            arbiter._signals.put_nowait(signal.SIGINT)
            assert await asyncio.wait_for(running, LIMIT) == 0
            assert slot.stops and not any(slot.stops)  # told to quit at once, never to drain

    with caplog.at_level(logging.INFO):
        uvloop.run(main())
    log = messages(caplog)
    assert log.index("stopping gracefully") < log.index(next(m for m in log if m.startswith("lame duck for 5s")))
    assert log.index("received SIGINT") < log.index("stopping now") < log.index("master exiting")


def test_term_on_a_master_nobody_checks_drains_without_a_lame_duck(tmp_path, caplog):
    async def main():
        async with master(tmp_path) as (arbiter, running):
            slot = arbiter.slots.serving[("127.0.0.1", 1)] = DrainingSlot()
            arbiter._signals.put_nowait(signal.SIGTERM)
            await until(lambda: slot.stops, "TERM to drain the slot")
            assert not arbiter.proxy.serving  # its health path fails from the first moment of the stop
            arbiter._signals.put_nowait(signal.SIGINT)
            assert await asyncio.wait_for(running, LIMIT) == 0

    with caplog.at_level(logging.INFO):
        uvloop.run(main())
    assert not any(m.startswith("lame duck") for m in messages(caplog))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_while_the_proxies_start_is_answered_at_once(tmp_path, caplog, monkeypatch, sig):
    """The proxies may take up to the boot timeout to accept; a stop meanwhile does not wait for
    them (gunicorn's arbiter answers it at once too)."""
    from arbiter.proxies import ProxyFleet

    started = asyncio.Event()

    async def never_ready(self) -> None:
        started.set()
        await asyncio.Event().wait()

    monkeypatch.setattr(ProxyFleet, "start", never_ready)

    async def main():
        async with master(tmp_path) as (arbiter, running):
            await asyncio.wait_for(started.wait(), LIMIT)
            arbiter._signals.put_nowait(sig)
            assert await asyncio.wait_for(running, LIMIT) == 0

    with caplog.at_level(logging.INFO):
        uvloop.run(main())
    assert "master exiting" in messages(caplog)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGQUIT])
def test_int_or_quit_makes_a_retired_worker_still_draining_quit_at_once(tmp_path, caplog, sig):
    """A slot retired by TTOU or a reload drains for up to the graceful timeout; a fast stop
    does not wait for that drain."""
    async def main():
        async with master(tmp_path) as (arbiter, running):
            retired = DrainingSlot()
            arbiter.slots.retiring[asyncio.ensure_future(retired.task)] = retired
            arbiter._signals.put_nowait(sig)
            assert await asyncio.wait_for(running, 5) == 0
            assert retired.stops and not any(retired.stops)  # told to quit at once, never to drain

    with caplog.at_level(logging.INFO):
        uvloop.run(main())
    assert "stopping now" in messages(caplog)
