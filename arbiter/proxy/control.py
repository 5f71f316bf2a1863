"""The control channel between the master and one proxy process: JSON objects, one per line,
over a Unix socketpair the master made (the proxy inherits its end).

Nothing here is on the request path. The master pushes settings, the worker table on every
change, purges and log reopens; the proxy answers with acknowledgements, the passive failures it
saw and its load. Either side reading end of file knows the other is gone: a proxy then exits
(it must never outlive its master), and the master treats the proxy as exited.
"""
from __future__ import annotations

import asyncio
import json
import logging
import socket
from typing import Any, Callable

log = logging.getLogger("gows.control")

MAX_LINE = 4 << 20  # bytes: a message longer than this is a bug on the other side; the channel closes
Message = dict[str, Any]


def encode(message: Message) -> bytes:
    """A message as the channel carries it: one line of JSON."""
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


class Channel(asyncio.Protocol):
    """One end of the channel: `send(message)`; each message received goes to `on_message`, and
    `on_close` is called once when the other end is gone (or the channel broke)."""

    def __init__(self, on_message: Callable[[Message], None], on_close: Callable[[], None]) -> None:
        self.on_message = on_message
        self.on_close = on_close
        self.transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self.closed = False

    @classmethod
    async def open(cls, sock: socket.socket, on_message: Callable[[Message], None],
                   on_close: Callable[[], None]) -> Channel:
        loop = asyncio.get_running_loop()
        _, channel = await loop.create_unix_connection(lambda: cls(on_message, on_close), sock=sock)
        return channel

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        start = 0
        while not self.closed:
            end = buffer.find(b"\n", start)
            if end < 0:
                break
            line = bytes(buffer[start:end])
            start = end + 1
            try:
                message = json.loads(line)
            except ValueError:
                log.error("control channel: unreadable message %r; closing it", line[:200])
                self.close()
                return
            try:
                self.on_message(message)
            except Exception:  # one bad message must not end the channel silently
                log.exception("control channel: cannot handle %r", message.get("op"))
        del buffer[:start]
        if len(buffer) > MAX_LINE:
            log.error("control channel: a message over %d bytes; closing it", MAX_LINE)
            self.close()

    def send(self, message: Message) -> None:
        self.write(encode(message))

    def write(self, line: bytes) -> None:
        """Send a message already encoded (one encoding for many channels)."""
        if not self.closed and self.transport is not None:
            self.transport.write(line)

    @property
    def backlog(self) -> int:
        """Bytes written and not yet taken by the other end."""
        return self.transport.get_write_buffer_size() if self.transport is not None and not self.closed else 0

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed:
            self.closed = True
            self.on_close()
