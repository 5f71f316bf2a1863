"""What a serving thread of fileapp.worker does with one ready connection: read the requests its
client sent, answer them through the WSGI app (more than one if pipelined) and send what the
client did not take at once when there is room; and what to wait for next on it."""
from __future__ import annotations

import errno
import select
import time
from datetime import timedelta
from typing import Any, Callable

from . import gunicorn_compat as compat
from .connection import Connection
from .http1 import Request, build_environ
from .response import Response

# A client must send each part of a request within these seconds (a kernel socket timeout,
# SO_RCVTIMEO: no extra poll per call); taking a response, see fileapp.response.
READ_TIMEOUT = 5.0
# What a serving thread waits for next on a connection: its next request, or room to send more
# of a response its client has not taken yet.
NEXT_REQUEST = select.EPOLLIN | select.EPOLLONESHOT
ROOM_TO_SEND = select.EPOLLOUT | select.EPOLLONESHOT
# Socket errors that only mean the client went away or was too slow: logged at debug level.
CLIENT_GONE = frozenset({errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN, errno.EAGAIN, errno.ETIMEDOUT})
# Seconds an answer may be held for the answers after it (fileapp.response): a batch of
# pipelined GETs takes well under this; a slow one behind (a cold disk) lets the held ones go.
HOLD_TIME = 0.002


class ConnectionServing:
    """GowsThreadWorker's serving of one connection at a time (a mixin: it uses the worker's
    settings, app, hooks and log, as gthread's handle_request does)."""

    cfg: Any
    log: Any
    wsgi: Callable[..., Any]
    alive: bool
    nr: int
    max_requests: int
    write_timeout: float
    _keepalive: float
    _base_environ: dict
    _pre_request: Callable[..., None] | None
    _post_request: Callable[..., None] | None
    handle_error: Callable[..., None]  # gunicorn's Worker.handle_error: the error page

    def _serve(self, conn: Connection) -> int | None:
        """Read what `conn`'s client has sent and answer the requests in it (more than one if
        pipelined), as far as the client takes the answers; what to wait for next on it (None:
        close it)."""
        reader = conn.reader
        was_in_head = reader.in_head
        try:
            if not reader.has_request() and not reader.receive():
                return None  # the client closed the connection
        except OSError as e:
            self._socket_error(e)
            return None
        served = False
        while reader.has_request():
            served = True
            keep = self._serve_one(conn)
            if conn.holding:  # answers held for the next one's: they leave with it, or now
                if keep and reader.has_request():
                    continue
                if not self._send_held(conn) and conn.rest is None:
                    return None  # the client is gone
            if conn.rest is not None:
                conn.keep = keep
                conn.timeout = time.monotonic() + self.write_timeout
                return ROOM_TO_SEND
            if not keep:
                return None
        # A head gets READ_TIMEOUT from its first bytes to arrive whole (more bytes of the same
        # head never push that back: a slowloris would hold the connection forever); an idle
        # connection gets the keep-alive time.
        if not reader.in_head:
            conn.timeout = time.monotonic() + self._keepalive
        elif served or not was_in_head:
            conn.timeout = time.monotonic() + READ_TIMEOUT
        return NEXT_REQUEST

    def _send_rest(self, conn: Connection) -> int | None:
        """Send more of the response `conn`'s client has not taken yet (there is room now); once
        it is all sent, go on with the connection's next request."""
        rest = conn.rest
        sent = rest.sent
        try:
            done = rest.send(conn.sock)
        except OSError as e:
            if e.errno in CLIENT_GONE:
                self.log.debug("Client gone: %s", e)
            else:
                self.log.warning("Response cut short: %s", e)
            return None
        if not done:
            if rest.sent != sent:  # only progress earns more time
                conn.timeout = time.monotonic() + self.write_timeout
            return ROOM_TO_SEND
        conn.rest = None
        if not conn.keep or not self.alive:
            return None
        if conn.reader.has_request():  # pipelined requests wait behind it
            return self._serve(conn)
        conn.timeout = time.monotonic() + self._keepalive
        return NEXT_REQUEST

    def _serve_one(self, conn: Connection) -> bool:
        """Answer the next parsed request; whether the connection can carry another."""
        req = None
        try:
            req = conn.reader.next_request()
            return self._answer(req, conn)
        except compat.NoMoreData as e:
            self.log.debug("Closing connection: %r", e)
        except OSError as e:
            self._socket_error(e)
        except Exception as e:
            # The answers held go before the error page; if the client cannot take them all
            # now, they leave later and the connection ends without the page.
            if conn.holding and not self._send_held(conn):
                return False
            self.handle_error(req, conn.sock, conn.client, e)
        return False

    def _send_held(self, conn: Connection) -> bool:
        """Send the answers held on `conn` as far as its client takes them now; whether all
        left (else they are its rest, or gone with the client: conn.rest None)."""
        conn.holding = False
        try:
            if conn.rest.send(conn.sock):
                conn.rest = None
                return True
        except OSError as e:
            self._socket_error(e)
            conn.rest.close()
            conn.rest = None
        return False

    def _socket_error(self, e: OSError) -> None:
        if isinstance(e, TimeoutError) or e.errno in CLIENT_GONE:
            self.log.debug("Client gone or too slow: %s", e)
        else:
            self.log.exception("Socket error processing request.")

    def _answer(self, req: Request, conn: Connection) -> bool:
        """Run the app for `req` and send its response (what the client does not take at once
        is left in conn.rest); whether the connection can carry another request. As gthread's
        handle_request, with gows' own environ and response."""
        if self._pre_request is not None:
            self._pre_request(self, req)
        # (conn.rest: the answers held for this one, if any; they stay there if it fails)
        resp = Response(req, conn.sock, self.write_timeout, conn.rest)
        environ = build_environ(req, conn.reader, conn.client, conn.server, self._base_environ)
        self.nr += 1
        if self.nr >= self.max_requests:
            if self.alive:
                self.log.info("Autorestarting worker after current request.")
                self.alive = False
                compat.wake_main_loop(self)
            resp.force_close()
        if not self.alive or not self._keepalive:
            resp.force_close()
        logged = self.log.access_log_enabled
        started = time.monotonic() if logged else 0.0
        try:
            respiter = self.wsgi(environ, resp.start_response)
            # An answer the app gave whole (a list or tuple, as fileapp's) waits to leave with
            # the next one's when another request is ready behind it: one sendmsg for a batch
            # of pipelined GETs. A body still being made leaves part by part (PEP 3333).
            if type(respiter) in (list, tuple) and conn.reader.plain_request_next():
                now = time.monotonic()
                if not conn.holding:
                    conn.hold_since = now
                resp.hold = now - conn.hold_since < HOLD_TIME
            try:
                if isinstance(respiter, compat.FileWrapper):
                    resp.write_file(respiter)
                else:
                    for item in respiter:
                        resp.write(item)
                conn.rest = resp.close()
                conn.holding = conn.rest is not None and not resp.tried
            finally:
                if logged:
                    self.log.access(resp, req, environ,
                                    timedelta(seconds=time.monotonic() - started))
                if hasattr(respiter, "close"):
                    respiter.close()
        except OSError:
            resp.discard()
            raise
        except Exception:
            resp.discard()
            if resp.headers_sent:  # a 500 now would corrupt the response begun
                self.log.exception("Error handling request")
                return False
            raise
        finally:
            if self._post_request is not None:
                try:
                    self._post_request(self, req, environ, resp)
                except Exception:
                    self.log.exception("Exception in post_request hook")
        if resp.should_close():
            return False
        # The app left part of the body unread: what has arrived of it is skipped; a body
        # still coming would hold a thread, so the connection ends instead.
        return req.complete or conn.reader.drain(req)
