"""Helpers for tests that run arbiter code on an event loop of the test process: a tiny TCP
server whose answer the test scripts, and an async wait on a condition."""
from __future__ import annotations

import asyncio


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


async def until(predicate, timeout: float = 10.0):
    """Wait on the running loop until `predicate()` is true; fail the test after `timeout` s."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        assert loop.time() < deadline, "condition not met"
        await asyncio.sleep(0.01)
