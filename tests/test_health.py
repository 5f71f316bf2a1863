"""The health probe and checker against tiny in-test servers: pass, fail, hang, garbage."""
from __future__ import annotations

import asyncio

import uvloop

from arbiter.config import HealthCheck
from arbiter.health import HealthChecker, probe
from arbiter.state import WorkerState, WorkerTable
from support import free_port


class Server:
    """An asyncio TCP server whose answer to every request the test can change."""

    def __init__(self) -> None:
        self.reply: bytes | None = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
        self.requests: list[bytes] = []

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def _handle(self, reader, writer) -> None:
        try:
            self.requests.append(await reader.readuntil(b"\r\n\r\n"))
            if self.reply is None:
                await asyncio.sleep(30)  # never answers
            writer.write(self.reply)
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


def run(coro):
    return uvloop.run(coro)


def test_probe_outcomes():
    async def main():
        s = Server()
        port = await s.start()
        assert await probe("127.0.0.1", port, "/healthcheck", 2) is None
        assert s.requests[0].startswith(b"GET /healthcheck HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n" % port)
        s.reply = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n"
        assert await probe("127.0.0.1", port, "/healthcheck", 2) == "HTTP 503"
        s.reply = b"HTTP/1.0 302 Found\r\n\r\n"
        assert await probe("127.0.0.1", port, "/healthcheck", 2) == "HTTP 302"
        s.reply = b"SSH-2.0-OpenSSH\r\n"
        assert (await probe("127.0.0.1", port, "/healthcheck", 2)).startswith("malformed status line")
        s.reply = b""
        assert await probe("127.0.0.1", port, "/healthcheck", 2) == "connection closed without a response"
        s.reply = None
        assert await probe("127.0.0.1", port, "/healthcheck", 0.3) == "no answer within 0.3s"
        s.server.close()
        assert "refused" in (await probe("127.0.0.1", free_port(), "/healthcheck", 2)).lower()
    run(main())


async def until(predicate, timeout: float = 10.0):
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        assert loop.time() < deadline, "condition not met"
        await asyncio.sleep(0.01)


def test_checker_applies_rise_and_fall_and_skips_local_workers_without_a_process():
    async def main():
        s = Server()
        port = await s.start()
        table = WorkerTable(rise=2, fall=3)
        remote = table.add(WorkerState("127.0.0.1", port, local=False))
        idle = table.add(WorkerState("127.0.0.1", free_port(), local=True))  # local, no process yet
        results = []
        checker = HealthChecker(table, HealthCheck("/hc", 0.05, 1.0, 2, 3, 5.0), on_result=results.append)
        checker.sync()
        await until(lambda: remote.up)
        assert remote.consecutive_successes >= 2 and remote.last_check_latency is not None
        s.reply = b"HTTP/1.1 500 Internal Server Error\r\n\r\n"
        await until(lambda: not remote.up)
        assert remote.consecutive_failures >= 3 and remote.last_error == "HTTP 500"
        assert idle not in results and idle.consecutive_failures == 0  # nothing to probe
        checker.hold(remote)
        before = (remote.consecutive_failures, remote.consecutive_successes)
        s.reply = b"HTTP/1.1 200 OK\r\n\r\n"
        await asyncio.sleep(0.3)
        assert (remote.consecutive_failures, remote.consecutive_successes) == before  # held: results dropped
        checker.release(remote)
        await until(lambda: remote.up)
        table.remove(remote)
        checker.sync()
        count = len(s.requests)
        await asyncio.sleep(0.3)
        assert len(s.requests) <= count + 1  # its checking task is gone
        await checker.close()
        s.server.close()
    run(main())
