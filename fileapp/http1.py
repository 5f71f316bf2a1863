"""HTTP/1 requests for gows' worker, parsed by httptools and handed to the app as a PEP 3333
environ, in place of gunicorn's pure-Python parser and `wsgi.create` (about 80 µs a request).

What gunicorn's own request handling decides stays gunicorn's: its limits (limit_request_line,
limit_request_fields, limit_request_field_size), its header policy (repeated singleton fields,
Expect, secure scheme headers from trusted peers, header names with underscores) and its error
classes, so a malformed request gets the same 400/414/431/417 answer from `handle_error`.
httptools frames the messages: Content-Length and chunked bodies arrive dechunked; anything it
refuses is a 400. A body is read from the socket only as the app reads wsgi.input.
"""
from __future__ import annotations

import os
import socket
from collections import deque
from typing import Callable
from urllib.parse import unquote_to_bytes, urlsplit

import httptools

from . import gunicorn_compat as compat

RECV_SIZE = 64 * 1024
# Header names as the header policy reads them (upper case), by their bytes, and whether the
# policy may act on them (gunicorn_compat.policy_may_act): the same few names come in every
# request. Bounded: clients may invent names.
_NAMES: dict[bytes, tuple[str, bool]] = {}
_NAMES_KNOWN = 256
# The environ key of each header name (upper case), bounded the same way.
_KEYS: dict[str, str] = {}
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


def _line_limit(setting: int) -> int:
    """gunicorn's reading of limit_request_line: 0 is unlimited (1 MiB here), and never more
    than its MAX_REQUEST_LINE otherwise."""
    if setting == 0:
        return 1 << 20
    return compat.MAX_REQUEST_LINE if setting < 0 else min(setting, compat.MAX_REQUEST_LINE)


class Request(compat.HeaderPolicy):
    """One request: its head, parsed, and its body as httptools delivers it."""

    def __init__(self, reader: "RequestReader") -> None:
        self.cfg = reader.cfg
        self.peer_addr = reader.peer
        self.scheme = reader.scheme
        self.uri = ""
        self.method = ""
        self.version = (1, 1)
        self.headers: list[tuple[str, str]] = []
        self.path = self.query = ""
        self.keep_alive = False
        self.complete = False  # the whole message (body included) has been parsed
        self.upgrade = False
        self.chunks: deque[bytes] = deque()  # body bytes parsed, not read by the app yet
        self.body = None  # (gunicorn's error environ reads it; the app's wsgi.input: build_environ)

    def should_close(self) -> bool:
        """For gunicorn's access log and error pages."""
        return not self.keep_alive


class Body:
    """wsgi.input: the request body, read from the socket only as the app asks for it. (It
    points to its Request, never the other way: a cycle would leave every request to the
    cyclic garbage collector, several per cent of a worker's time.)"""

    def __init__(self, req: Request, reader: "RequestReader") -> None:
        self._req, self._reader = req, reader
        self._buf = b""

    def _more(self) -> bool:
        """Move the next parsed chunk into the buffer, reading the socket if need be; False at
        the end of the body."""
        req = self._req
        while not req.chunks:
            if req.complete:
                return False
            self._reader.read_body(req)
        self._buf += req.chunks.popleft()
        return True

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            while self._more():
                pass
            data, self._buf = self._buf, b""
            return data
        while len(self._buf) < size and self._more():
            pass
        data, self._buf = self._buf[:size], self._buf[size:]
        return data

    def readline(self, size: int | None = -1) -> bytes:
        while True:
            end = self._buf.find(b"\n")
            if end >= 0 or (size is not None and 0 <= size <= len(self._buf)) or not self._more():
                break
        stop = len(self._buf) if end < 0 else end + 1
        if size is not None and size >= 0:
            stop = min(stop, size)
        data, self._buf = self._buf[:stop], self._buf[stop:]
        return data

    def readlines(self, hint: int | None = None) -> list[bytes]:
        lines, total = [], 0
        while True:
            line = self.readline()
            if not line:
                return lines
            lines.append(line)
            total += len(line)
            if hint is not None and 0 < hint <= total:
                return lines

    def __iter__(self):
        return iter(self.readline, b"")


class RequestReader:
    """The requests of one connection: bytes read from its socket are fed to httptools, and
    each request is handed out once its head is complete (its body may still be coming)."""

    def __init__(self, cfg, sock: socket.socket, peer,
                 before_wait: Callable[[], None] | None = None) -> None:
        self.cfg, self.sock, self.peer = cfg, sock, peer
        self._before_wait = before_wait  # called before a read that may wait for the client
        self.scheme = "https" if cfg.is_ssl else "http"
        self._parser = httptools.HttpRequestParser(self)
        self._ready: deque[Request] = deque()  # heads complete, not handed out yet
        self._current: Request | None = None  # the message being parsed
        self._error: Exception | None = None  # what the parser refused, after the ready ones
        self._in_head = False
        self._head_bytes = 0
        self._url = b""
        self._fields = 0
        self._scheme_seen: list[bool] = [False]
        self._seen: set[str] = set()
        self._limit_line = _line_limit(cfg.limit_request_line)
        self._limit_fields = min(cfg.limit_request_fields or compat.MAX_HEADERS, compat.MAX_HEADERS)
        self._limit_field_size = cfg.limit_request_field_size or compat.DEFAULT_MAX_HEADERFIELD_SIZE
        self._limit_head = self._limit_fields * (self._limit_field_size + 2) + 4 + self._limit_line
        self._trusted = None  # (secure scheme headers, forwarder headers) this peer may set
        self._scheme_names = cfg.secure_scheme_headers  # names the policy acts on if trusted
        self._casefold = cfg.casefold_http_method

    # -- feeding --------------------------------------------------------------------------

    @property
    def in_head(self) -> bool:
        """Whether a request's head has begun to arrive but is not complete yet."""
        return self._in_head

    def has_request(self) -> bool:
        """Whether a request (or the error that ends the connection) is ready without a read."""
        return bool(self._ready) or self._error is not None

    def plain_request_next(self) -> bool:
        """Whether a whole GET or HEAD is ready behind the request handed out last: answering
        it waits for nothing from the client, so the answer before it may wait for its own."""
        if not self._ready:
            return False
        req = self._ready[0]
        return req.complete and not req.upgrade and (req.method == "GET" or req.method == "HEAD")

    def next_request(self) -> Request | None:
        """The next request whose head is complete, or None if more bytes are needed; raises
        gunicorn's error for a malformed one (after the requests before it)."""
        if self._ready:
            return self._ready.popleft()
        if self._error is not None:
            error, self._error = self._error, compat.NoMoreData()
            raise error
        return None

    def receive(self) -> bool:
        """Read once from the socket and parse what came; False if the client closed it."""
        data = self.sock.recv(RECV_SIZE)
        if not data:
            return False
        self.feed(data)
        return True

    def read_body(self, req: Request) -> None:
        """Read more of `req`'s body from the socket (for wsgi.input); raises NoMoreData when
        the client closed the connection before its end, gunicorn's error when it is malformed."""
        if getattr(req, "_expected_100_continue", False):
            req._expected_100_continue = False
            self.sock.sendall(_CONTINUE)
        if self._error is not None:  # the body is malformed (400 if nothing is sent yet)
            raise self._error
        if self._before_wait is not None:
            self._before_wait()
        if not self.receive():
            raise compat.NoMoreData()

    def drain(self, req: Request) -> bool:
        """Parse what the client has already sent of `req`'s unread body, without waiting;
        whether the body is now over (else the connection cannot carry another request)."""
        req.chunks.clear()
        while not req.complete and self._error is None:
            try:
                data = self.sock.recv(RECV_SIZE, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return False
            if not data:
                return False
            self.feed(data)
            req.chunks.clear()
        return req.complete

    def feed(self, data: bytes) -> None:
        if self._in_head:
            self._head_bytes += len(data)
            if self._head_bytes > self._limit_head:
                self._fail(compat.LimitRequestHeaders("max buffer headers"))
                return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # The bytes after an upgrade request are another protocol: answer it and close.
            if self._current is not None:
                self._current.upgrade = True
                self._current.keep_alive = False
        except httptools.HttpParserCallbackError:
            pass  # _fail has recorded the reason
        except httptools.HttpParserInvalidMethodError as e:
            self._fail(compat.InvalidRequestMethod(str(e)))
        except httptools.HttpParserInvalidURLError as e:
            self._fail(compat.InvalidRequestLine(str(e)))
        except httptools.HttpParserError as e:
            self._fail(compat.InvalidHeader(str(e)))

    def _fail(self, error: Exception) -> None:
        if self._error is None:
            self._error = error

    # -- httptools callbacks --------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._current = Request(self)
        self._in_head = True
        self._head_bytes = 0
        self._url = b""
        self._fields = 0
        self._scheme_seen: list[bool] = [False]  # gunicorn's header policy state, per message
        self._seen: set[str] = set()

    def on_url(self, url: bytes) -> None:
        self._url += url
        # gunicorn's limit is on the whole line: method, target and " HTTP/1.x"
        length = len(self._parser.get_method()) + 1 + len(self._url) + 9
        if length > self._limit_line:
            self._raise(compat.LimitRequestLine(length, self._limit_line))

    def on_header(self, name: bytes, value: bytes) -> None:
        self._fields += 1
        if self._fields > self._limit_fields:
            self._raise(compat.LimitRequestHeaders("limit request headers fields"))
        if len(name) + len(value) > self._limit_field_size:
            self._raise(compat.LimitRequestHeaders("limit request headers fields size"))
        req = self._current
        if self._fields == 1:  # the request line is parsed: the policy reads the version
            req.version = (1, 1) if self._parser.get_http_version() == "1.1" else (1, 0)
        known = _NAMES.get(name)
        if known is None:
            upper = name.decode("latin-1").upper()
            known = upper, compat.policy_may_act(upper)
            if len(_NAMES) < _NAMES_KNOWN:
                _NAMES[name] = known
        upper, acts = known
        value = value.decode("latin-1").strip(" \t")
        if not acts and upper not in self._scheme_names:  # the policy would keep it as it is
            req.headers.append((upper, value))
            return
        if self._trusted is None:
            self._trusted = req._peer_trusted_for_forwarded()
        secure, forwarders = self._trusted
        try:
            kept = req._apply_header_policy(upper, value, self._scheme_seen, self._seen, secure, forwarders)
        except Exception as e:
            self._raise(e)
        if kept is not None:
            req.headers.append(kept)

    def on_headers_complete(self) -> None:
        req, parser = self._current, self._parser
        self._in_head = False
        try:
            req.method = parser.get_method().decode("latin-1")
            if self._casefold:
                req.method = req.method.upper()
            req.version = (1, 1) if parser.get_http_version() == "1.1" else (1, 0)
            req.keep_alive = parser.should_keep_alive()
            target = req.uri = self._url.decode("latin-1")
            if target.startswith("/"):
                path, _, query = target.partition("?")
                req.path, req.query = path, query.partition("#")[0]
            else:  # absolute-form (a proxy's request) or "*"
                parts = urlsplit(target)
                req.path, req.query = parts.path or ("*" if target == "*" else ""), parts.query
        except Exception as e:
            self._raise(e)
        self._ready.append(req)

    def on_body(self, body: bytes) -> None:
        self._current.chunks.append(body)

    def on_message_complete(self) -> None:
        self._current.complete = True

    def _raise(self, error: Exception):
        self._fail(error)
        raise error


def base_environ(cfg) -> dict:
    """The environ keys every request of this worker shares (gunicorn's base_environ)."""
    env = compat.base_environ(cfg)
    env["wsgi.multithread"] = True
    return env


def build_environ(req: Request, reader: RequestReader, client, server, base: dict) -> dict:
    """The PEP 3333 environ of `req`, read by `reader`, as gunicorn's `wsgi.create` builds it:
    HTTP_* headers (repeats joined with ","), CONTENT_TYPE/LENGTH, REMOTE_*, SERVER_*,
    SCRIPT_NAME/PATH_INFO."""
    env = base.copy()
    env["wsgi.input"] = Body(req, reader)
    env["gunicorn.socket"] = reader.sock
    env["REQUEST_METHOD"] = req.method
    env["QUERY_STRING"] = req.query
    env["RAW_URI"] = req.uri
    env["SERVER_PROTOCOL"] = "HTTP/1.1" if req.version == (1, 1) else "HTTP/1.0"
    env["wsgi.url_scheme"] = req.scheme
    host = None
    script_name = SCRIPT_NAME
    for name, value in req.headers:
        if name == "HOST":
            host = value
        elif name == "SCRIPT_NAME":
            script_name = value
        elif name == "CONTENT-TYPE":
            env["CONTENT_TYPE"] = value
            continue
        elif name == "CONTENT-LENGTH":
            env["CONTENT_LENGTH"] = value
            continue
        key = _KEYS.get(name)
        if key is None:
            key = "HTTP_" + name.replace("-", "_")
            if len(_KEYS) < _NAMES_KNOWN:
                _KEYS[name] = key
        if key in env:
            env[key] = env[key] + "," + value
        else:
            env[key] = value
    if isinstance(client, tuple):
        env["REMOTE_ADDR"], env["REMOTE_PORT"] = client[0], str(client[1])
    else:  # a Unix socket's peer has no address: it is on this host
        client = client.decode() if isinstance(client, bytes) else client
        env["REMOTE_ADDR"] = client or "127.0.0.1"
    if isinstance(server, tuple):
        env["SERVER_NAME"], env["SERVER_PORT"] = server[0], str(server[1])
    else:  # a Unix socket: the Host header names the server, as in gunicorn
        name, _, port = (host or "").partition(":")
        env["SERVER_NAME"] = name
        env["SERVER_PORT"] = port or ("" if host is None else "443" if req.scheme == "https" else "80")
    path = req.path
    if script_name:
        if not path.startswith(script_name):
            raise compat.ConfigurationProblem(
                "Request path %r does not start with SCRIPT_NAME %r" % (path, script_name))
        path = path[len(script_name):]
    env["PATH_INFO"] = path if "%" not in path else unquote_to_bytes(path).decode("latin-1")
    env["SCRIPT_NAME"] = script_name
    return env


SCRIPT_NAME = os.environ.get("SCRIPT_NAME", "")
