"""The soak's own hostile clients, on asyncio: slow readers and aborted uploads.

Each returns a ClientOutcome saying how it ended, with times on the soak's clock, so the
verdict can tell a response cut by a worker kill ("truncated", shortly after a kill) from any
other failure. Responses are parsed with httptools, as the proxy parses them.
"""
from __future__ import annotations

import asyncio
import socket
from typing import Callable

import httptools

from arbiter.addresses import host_port

from .verdict import ClientOutcome

Clock = Callable[[], float]
# A slow reader's receive buffer: small, so the server cannot park the whole file in our kernel.
SLOW_RCVBUF = 16 * 1024


class _Response:
    """httptools callbacks: the head's arrival, the body bytes and the end of the message."""

    def __init__(self) -> None:
        self.head = False
        self.body_bytes = 0
        self.complete = False

    def on_headers_complete(self) -> None:
        self.head = True

    def on_body(self, body: bytes) -> None:
        self.body_bytes += len(body)

    def on_message_complete(self) -> None:
        self.complete = True


async def _connect(host: str, port: int, timeout: float, rcvbuf: int | None = None
                   ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A TCP connection (with a small receive buffer when asked), or OSError/TimeoutError."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, (host, port)), timeout)
        return await asyncio.open_connection(sock=sock, limit=rcvbuf or 2**16)
    except BaseException:
        sock.close()
        raise


async def slow_reader(host: str, port: int, path: str, clock: Clock, *, rate: int = 64 * 1024,
                      hold: float = 1.0, head_timeout: float = 15.0, tick: float = 0.1) -> ClientOutcome:
    """GET `path`, then read about `rate` bytes/s for `hold` seconds after the head and close.

    "ok": it read for `hold` seconds (or got the whole body); "truncated": the connection ended
    mid-body; anything else (no head within `head_timeout`, stalled body, reset) is an error."""
    started = clock()

    def done(result: str, status: int | None = None) -> ClientOutcome:
        return ClientOutcome("slow reader", started, clock(), result, status)

    try:
        reader, writer = await _connect(host, port, head_timeout, SLOW_RCVBUF)
    except (OSError, asyncio.TimeoutError) as exc:
        return done(f"connect failed ({type(exc).__name__})")
    response = _Response()
    parser = httptools.HttpResponseParser(response)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {host_port(host, port)}\r\nUser-Agent: gows-soak\r\n\r\n".encode())
        loop = asyncio.get_running_loop()
        deadline = loop.time() + head_timeout
        while not response.head:
            data = await asyncio.wait_for(reader.read(4096), max(0.0, deadline - loop.time()))
            if not data:
                return done("closed before the head")
            parser.feed_data(data)
        status = parser.get_status_code()
        if status != 200:
            return done("ok", status)
        body_deadline = loop.time() + hold
        chunk = max(1, int(rate * tick))
        while not response.complete and loop.time() < body_deadline:
            await asyncio.sleep(tick)
            try:
                data = await asyncio.wait_for(reader.read(chunk), max(0.0, body_deadline - loop.time()))
            except asyncio.TimeoutError:
                break
            if not data:
                return done("truncated", status)
            parser.feed_data(data)
        if response.body_bytes == 0:
            return done(f"no body byte within {hold:g} s of the head", status)
        return done("ok", status)
    except asyncio.TimeoutError:
        return done(f"no head within {head_timeout:g} s")
    except ConnectionError:
        return done("truncated" if response.head else "reset before the head",
                    parser.get_status_code() if response.head else None)
    except httptools.HttpParserError as exc:
        return done(f"malformed response ({type(exc).__name__})")
    finally:
        writer.close()


async def aborted_upload(host: str, port: int, path: str, clock: Clock, *, declared: int = 1 << 20,
                         sent: int = (1 << 20) - (64 << 10), timeout: float = 10.0) -> ClientOutcome:
    """POST with `Content-Length: declared`, send `sent` bytes of the body, close.

    "ok": sent and closed; "refused": the server closed or reset first (a body budget may do that,
    and is no error); a failed connect is an error."""
    started = clock()
    try:
        reader, writer = await _connect(host, port, timeout)
    except (OSError, asyncio.TimeoutError) as exc:
        return ClientOutcome("aborted upload", started, clock(), f"connect failed ({type(exc).__name__})")
    result = "ok"
    try:
        writer.write(f"POST {path} HTTP/1.1\r\nHost: {host_port(host, port)}\r\nUser-Agent: gows-soak\r\n"
                     f"Content-Type: application/octet-stream\r\nContent-Length: {declared}\r\n\r\n".encode())
        writer.write(b"x" * sent)
        # A server that stops reading (back-pressure) keeps the rest in our buffer: close anyway.
        await asyncio.wait_for(writer.drain(), timeout)
    except asyncio.TimeoutError:
        pass
    except ConnectionError:
        result = "refused"
    finally:
        writer.close()
    return ClientOutcome("aborted upload", started, clock(), result)
