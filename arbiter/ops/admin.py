"""The admin listener: status page, status JSON, Prometheus metrics and health/readiness probes,
served by the master's own event loop on its own (loopback by default) address.

    /status       HTML for people (arbiter/ops/status_page.py)
    /status/charts  its charts alone (an HTML fragment of inline SVG), for the page's script
    /status.json  the same data for machines (shape documented in arbiter/ops/status.py)
    /metrics      Prometheus exposition (arbiter/ops/metrics.py)
    /healthz      200 while the master's loop answers
    /readyz       200 when at least one worker is up, else 503 (load balancers, Kubernetes)

Nothing here is reachable through the public port: the front proxy has no route to it. Requests
are parsed with httptools; every connection is bounded in size and time and answered once.
"""
from __future__ import annotations

import asyncio
import json
import logging
import socket
from email.utils import formatdate
from typing import Any, Callable

from httptools import HttpParserError, HttpParserUpgrade, HttpRequestParser, parse_url

from ..addresses import host_port
from ..proxy.stats import Window
from . import status_page
from .metrics import exposition, make_registry
from .status import Master, ready, snapshot

log = logging.getLogger("gows.admin")

MAX_CONNECTIONS = 64  # admin clients served at once (see AdminProtocol.connection_made)
MAX_REQUEST_BYTES = 16384  # whole request, head and body
TIMEOUT = 10.0  # seconds for a client to send its request and read the answer
SAMPLE_EVERY = 1.0  # seconds between samples of the request counters (rates, percentiles)

Response = tuple[int, list[tuple[str, str]], bytes]
_REASONS = {200: "OK", 302: "Found", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            408: "Request Timeout", 431: "Request Header Fields Too Large", 500: "Internal Server Error",
            503: "Service Unavailable"}
_COMMON = [("Cache-Control", "no-store"), ("X-Content-Type-Options", "nosniff")]
_PAGE_HEADERS = [("Content-Type", "text/html; charset=utf-8"), ("Content-Security-Policy", status_page.CSP),
                 ("X-Frame-Options", "DENY"), ("Referrer-Policy", "no-referrer")]


def _text(status: int, body: str, extra: list[tuple[str, str]] | None = None) -> Response:
    return status, [("Content-Type", "text/plain; charset=utf-8")] + (extra or []), body.encode()


class AdminProtocol(asyncio.Protocol):
    """One admin connection: read one request (bounded), answer it, close."""

    def __init__(self, admin: AdminServer) -> None:
        self.admin = admin
        self.transport: Any = None
        self.parser: HttpRequestParser | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.size = 0
        self.url = b""
        self.accept = ""

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        admin = self.admin
        if len(admin.conns) >= MAX_CONNECTIONS:
            # Full: the oldest client still sending its request makes room, so that clients
            # that never finish one cannot keep the probes out; with none, this one goes.
            stalled = next((conn for conn in admin.conns if conn.parser is not None), None)
            if stalled is None:
                transport.abort()
                return
            del admin.conns[stalled]
            stalled.transport.abort()
        admin.conns[self] = None
        self.parser = HttpRequestParser(self)
        self.timer = asyncio.get_running_loop().call_later(TIMEOUT, self._timed_out)

    def connection_lost(self, exc: Exception | None) -> None:
        self.admin.conns.pop(self, None)
        self.parser = None
        if self.timer is not None:
            self.timer.cancel()

    def data_received(self, data: bytes) -> None:
        if self.parser is None:
            return
        self.size += len(data)
        if self.size > MAX_REQUEST_BYTES:
            self._answer(b"GET", _text(431, "431 Request Header Fields Too Large\n"))
            return
        try:
            self.parser.feed_data(data)
        except HttpParserUpgrade:
            self._answer(b"GET", _text(400, "400 Bad Request: no protocol upgrades here\n"))
        except HttpParserError:
            self._answer(b"GET", _text(400, "400 Bad Request\n"))

    def _timed_out(self) -> None:
        if self.parser is not None:  # the request is still incomplete: say so, then wait once more
            self._answer(b"GET", _text(408, "408 Request Timeout\n"))
            self.timer = asyncio.get_running_loop().call_later(TIMEOUT, self._timed_out)
        else:  # answered, but the client does not read the answer
            self.timer = None
            self.transport.abort()

    # -- httptools callbacks ---------------------------------------------------------------
    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() == b"accept":
            self.accept = value.decode("latin-1")

    def on_message_complete(self) -> None:
        if self.parser is None:  # a pipelined request after the answered one: ignored
            return
        method = self.parser.get_method()
        try:
            response = self.admin.handle(method, self.url, self.accept)
        except Exception:
            log.exception("admin request %s %r failed", method.decode("latin-1"), self.url)
            response = _text(500, "500 Internal Server Error\n")
        self._answer(method, response)

    def _answer(self, method: bytes, response: Response) -> None:
        """Write the response and close (the timer still aborts a client that does not read)."""
        if self.parser is None:
            return
        self.parser = None
        status, headers, body = response
        head = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}",
                f"Date: {formatdate(usegmt=True)}", "Server: gows-admin", "Connection: close",
                f"Content-Length: {len(body)}"]
        head += [f"{k}: {v}" for k, v in _COMMON + headers]
        data = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1")
        self.transport.write(data if method == b"HEAD" else data + body)
        self.transport.close()


class AdminServer:
    """The admin listener of a running master, plus the sampler behind its rates."""

    def __init__(self, master: Master) -> None:
        self.master = master
        self.window = Window(master.proxy.latency)
        self.registry = make_registry(master)
        self.conns: dict[AdminProtocol, None] = {}  # in the order they came (an ordered set)
        self._server: Any = None
        self._sampler: asyncio.TimerHandle | None = None
        self.routes: dict[bytes, Callable[[str], Response]] = {
            b"/status": self._status_page,
            b"/status/charts": self._status_charts,
            b"/status.json": self._status_json,
            b"/metrics": self._metrics,
            b"/healthz": lambda accept: _text(200, "ok\n"),
            b"/readyz": self._readyz,
            b"/": lambda accept: (302, [("Location", "/status"), ("Content-Type", "text/plain; charset=utf-8")],
                                  b"see /status\n"),
        }

    async def start(self, sock: socket.socket) -> None:
        """Serve the bound, listening `sock` (owned by the master) on the running loop."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: AdminProtocol(self), sock=sock.dup())
        self._sampler = loop.call_later(SAMPLE_EVERY, self._sample)
        log.info("admin listener on %s: /status /status.json /metrics /healthz /readyz",
                 host_port(*sock.getsockname()[:2]))

    def _sample(self) -> None:
        self.window.sample()
        self._sampler = asyncio.get_running_loop().call_later(SAMPLE_EVERY, self._sample)

    async def close(self) -> None:
        """Stop listening and drop admin connections."""
        if self._sampler is not None:
            self._sampler.cancel()
            self._sampler = None
        if self._server is not None:
            self._server.close()
            for conn in list(self.conns):
                if conn.transport is not None:
                    conn.transport.abort()
            await self._server.wait_closed()
            self._server = None

    # -- routes ----------------------------------------------------------------------------
    def handle(self, method: bytes, url: bytes, accept: str) -> Response:
        """The response to one admin request."""
        try:
            path = parse_url(url).path
        except HttpParserError:
            return _text(400, "400 Bad Request\n")
        route = self.routes.get(path)
        if route is None:
            return _text(404, "404 Not Found\n")
        if method not in (b"GET", b"HEAD"):
            return _text(405, "405 Method Not Allowed\n", [("Allow", "GET, HEAD")])
        return route(accept)

    def _status_json(self, accept: str) -> Response:
        body = json.dumps(snapshot(self.master, self.window), indent=1).encode()
        return 200, [("Content-Type", "application/json")], body

    def _status_page(self, accept: str) -> Response:
        html = status_page.render(snapshot(self.master, self.window), self.window.history())
        return 200, _PAGE_HEADERS, html.encode()

    def _status_charts(self, accept: str) -> Response:
        return 200, _PAGE_HEADERS, status_page.chart_figures(self.window.history()).encode()

    def _metrics(self, accept: str) -> Response:
        body, content_type = exposition(self.registry, accept)
        return 200, [("Content-Type", content_type)], body

    def _readyz(self, accept: str) -> Response:
        master = self.master
        if ready(master):
            return _text(200, f"ready: {len(master.table.healthy)} of {len(master.table)} workers up\n")
        why = "stopping" if master.stopping else f"no worker is up (0 of {len(master.table)})"
        return _text(503, f"not ready: {why}\n", [("Retry-After", "1")])
