"""Upstreams leaving the balance through the whole master: its proxy processes report a worker's
failures in a row and the master ejects it; a worker the master marks down hands its waiting
requests to another at once. The workers are scripted servers on loopback whose config entries
are marked non-local (as tests/test_remote.py does)."""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import signal

import pytest
import requests
import uvloop

from arbiter.arbiter import Arbiter
from arbiter.config import bind_configured, load_data
from arbiter.ops.logs import LogSink
from async_support import until
from support import free_port

pytestmark = pytest.mark.unit

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
UNAVAILABLE = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n"


class Upstream:
    """A scripted worker: `health` answers its health path, `answer` every other request; None
    takes the request and never answers."""

    def __init__(self, health: bytes | None, answer: bytes | None) -> None:
        self.health, self.answer = health, answer
        self.requests: list[bytes] = []

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def _handle(self, reader, writer) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                checked = head.startswith(b"GET /healthcheck ")
                if not checked:
                    self.requests.append(head)
                reply = self.health if checked else self.answer
                if reply is None:
                    await asyncio.sleep(3600)
                writer.write(reply)
                await writer.drain()
                if checked:
                    break
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()


async def serving(tmp_path, upstreams: list[Upstream], **settings) -> tuple[Arbiter, asyncio.Future, list, str]:
    """A master balancing over `upstreams` (remote workers), its proxy processes started."""
    ports = [await u.start() for u in upstreams]
    listen = free_port()
    config = load_data({"baseDirectory": "www", "listen": f"127.0.0.1:{listen}", "proxy": {"processes": 1},
                        "workers": [{"host": "127.0.0.1", "port": p} for p in ports],
                        "healthCheck": {"interval": 0.05, "timeout": 0.2, "rise": 1, "fall": 2},
                        "frontCache": {"enabled": False}, **settings}, tmp_path / "gows.conf.json")
    config = dataclasses.replace(config, workers=tuple(dataclasses.replace(w, local=False) for w in config.workers))
    sink = LogSink(config.logging)
    arbiter = Arbiter(config, bind_configured(config.listen.host, config.listen.port, "listen"), {}, sink)
    running = asyncio.ensure_future(arbiter.run())
    await until(lambda: arbiter.proxy.slots and all(s.ready for s in arbiter.proxy.slots), timeout=30)
    workers = [arbiter.table.get("127.0.0.1", p) for p in ports]
    return arbiter, running, workers, f"http://127.0.0.1:{listen}"


async def stop(arbiter: Arbiter, running: asyncio.Future, upstreams: list[Upstream]) -> None:
    arbiter._signals.put_nowait(signal.SIGTERM)
    assert await asyncio.wait_for(running, 30) == 0
    for u in upstreams:
        u.server.close()
    logging.getLogger().removeHandler(arbiter.sink.handler)


def get(url: str) -> requests.Response:
    return requests.get(url, timeout=60)


def test_the_proxies_report_a_worker_answering_503s_and_the_master_ejects_it(tmp_path):
    (tmp_path / "www").mkdir()

    async def main():
        bad, good = Upstream(OK, UNAVAILABLE), Upstream(OK, OK)
        arbiter, running, (b, g), url = await serving(
            tmp_path, [bad, good], outlierDetection={"consecutiveFailures": 3, "baseEjectionTime": 600})
        try:
            await until(lambda: b.up and g.up)
            loop = asyncio.get_running_loop()
            statuses: list[int] = []
            while statuses.count(503) < 3:
                statuses.append((await loop.run_in_executor(None, get, url + "/x")).status_code)
                assert len(statuses) <= 12, statuses
            # The proxy reports the streak, the master ejects and tells the proxies: from then on
            # the worker gets no request.
            await until(lambda: b.ejected_until is not None)
            after = [(await loop.run_in_executor(None, get, url + "/x")).status_code for _ in range(9)]
            assert after == [200] * 9 and len(bad.requests) == 3
            assert b.up and b.ejected_until is not None and b.ejections_total == 1
            assert g.ejected_until is None and g.ejections_total == 0
        finally:
            await stop(arbiter, running, [bad, good])

    uvloop.run(main())


def test_a_get_waiting_on_a_worker_the_master_marks_down_is_answered_by_another_at_once(tmp_path):
    """responseTimeout (120 s) is past the client's patience (60 s): only the retry on the
    master's down event answers it in time."""
    (tmp_path / "www").mkdir()

    async def main():
        hung, later = Upstream(OK, None), Upstream(UNAVAILABLE, b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nlater")
        arbiter, running, (h, l), url = await serving(tmp_path, [hung, later], proxy={"processes": 1,
                                                                                     "responseTimeout": 120})
        try:
            await until(lambda: h.up)
            answer = asyncio.get_running_loop().run_in_executor(None, get, url + "/page")
            await until(lambda: hung.requests, timeout=30)
            later.health = OK
            await until(lambda: l.up)
            hung.health = None  # its checks time out: marked down after fall of them
            r = await asyncio.wait_for(answer, 60)
            assert (r.status_code, r.content) == (200, b"later") and not h.up
        finally:
            await stop(arbiter, running, [hung, later])

    uvloop.run(main())
