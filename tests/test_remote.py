"""A worker on another host is health-checked and reported, never spawned or restarted.

The master runs in this process on uvloop; the "remote" worker is a tiny server on loopback
whose config entry is marked non-local (tests talk only to 127.0.0.1).
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal

import pytest
import uvloop

from arbiter.arbiter import Arbiter
from arbiter.config import bind_configured, load_data
from arbiter.ops.logs import LogSink
from async_support import Server, until
from master_support import children
from support import free_port

pytestmark = pytest.mark.unit


def test_remote_worker_is_checked_and_reported_never_spawned(tmp_path, caplog):
    (tmp_path / "www").mkdir()

    async def main():
        server = Server()
        port = await server.start()
        config = load_data({"baseDirectory": "www", "listen": f"127.0.0.1:{free_port()}",
                            "workers": [{"host": "127.0.0.1", "port": port}],
                            "healthCheck": {"interval": 0.05, "rise": 2, "fall": 2}}, tmp_path / "gows.conf.json")
        config = dataclasses.replace(config, workers=(dataclasses.replace(config.workers[0], local=False),))
        public = bind_configured(config.listen.host, config.listen.port, "listen")
        sink = LogSink(config.logging)
        try:
            arbiter = Arbiter(config, public, {}, sink)
            running = asyncio.ensure_future(arbiter.run())
            await until(lambda: arbiter.table.get("127.0.0.1", port) is not None)
            worker = arbiter.table.get("127.0.0.1", port)
            await until(lambda: worker.up)
            server.reply = b"HTTP/1.1 503 Service Unavailable\r\n\r\n"
            await until(lambda: not worker.up)
            await asyncio.sleep(0.3)
            assert arbiter.slots.serving == {} and worker.pid is None and worker.restarts == 0
            server.reply = b"HTTP/1.1 200 OK\r\n\r\n"
            await until(lambda: worker.up)
            arbiter._signals.put_nowait(signal.SIGTERM)
            assert await asyncio.wait_for(running, 30) == 0
            return port
        finally:
            logging.getLogger().removeHandler(sink.handler)
            server.server.close()

    with caplog.at_level(logging.INFO):
        before = children(os.getpid())
        port = uvloop.run(main())
    assert children(os.getpid()) == before  # nothing was spawned
    messages = [r.getMessage() for r in caplog.records]
    assert f"remote worker 127.0.0.1:{port} is down (HTTP 503); it is not restarted from here, only checked" in messages
    assert not any("started worker" in m for m in messages)


def test_a_local_worker_with_spawn_false_is_checked_and_balanced_never_started(tmp_path):
    """Another gows on this machine, or a worker systemd runs: "spawn": false (no test hack)."""
    (tmp_path / "www").mkdir()

    async def main():
        server = Server()
        port = await server.start()
        config = load_data({"baseDirectory": "www", "listen": f"127.0.0.1:{free_port()}",
                            "workers": [{"host": "127.0.0.1", "port": port, "spawn": False}],
                            "healthCheck": {"interval": 0.05, "rise": 2, "fall": 2}}, tmp_path / "gows.conf.json")
        public = bind_configured(config.listen.host, config.listen.port, "listen")
        sink = LogSink(config.logging)
        try:
            arbiter = Arbiter(config, public, {}, sink)
            running = asyncio.ensure_future(arbiter.run())
            await until(lambda: arbiter.table.get("127.0.0.1", port) is not None)
            worker = arbiter.table.get("127.0.0.1", port)
            await until(lambda: worker.up)
            assert arbiter.slots.serving == {} and worker.pid is None and not worker.local
            assert worker in arbiter.table.healthy  # what the proxies balance over
            arbiter._signals.put_nowait(signal.SIGTERM)
            assert await asyncio.wait_for(running, 30) == 0
        finally:
            logging.getLogger().removeHandler(sink.handler)
            server.server.close()

    uvloop.run(main())
