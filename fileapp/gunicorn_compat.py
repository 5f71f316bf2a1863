"""Every piece of gunicorn that gows' worker relies on, reached from here and nowhere else.

gows runs inside gunicorn's threaded worker and builds on parts gunicorn does not promise to
keep: its module-level Response (replaced), the parser's read-ahead buffer, gthread's hooks and
main-loop helpers. tests/test_gunicorn_compat.py names each one with the shape relied on, so a
gunicorn upgrade fails there first, by name, rather than somewhere in a request.

Besides what is exported below, GowsThreadWorker overrides or calls these ThreadWorker members:
`init_process`, `init_signals`, `run`, `notify`, `handle_exit`, `handle_quit`, `is_parent_alive`,
`wait_for_and_dispatch_events(timeout)`, `handle_request(req, conn)` (which reads `conn.sock`,
`conn.client`, `conn.server`, and `keepalived_conns`, left empty), `_keepalive_after(conn,
keepalive)`, `handle_error(req, client, addr, exc)`, `check_config(cfg, log)`, and the attributes
`SIGNALS`, `alive`, `cfg`, `log`, `sockets`, `worker_connections`, `wsgi`, `pid`, `tmp`.
CoalescingResponse overrides Response's `send_headers`, `_emit_body(data)`, `sendfile(respiter)`
and `close`, and reads `default_headers()`, `can_sendfile()`, `headers`, `headers_sent`,
`chunked`, `response_length`, `_omits_body` and `sock`.
"""
from __future__ import annotations

import selectors
from typing import Any, Callable

from gunicorn.config import Config
from gunicorn.glogging import Logger
from gunicorn.http import get_parser
from gunicorn.http import wsgi as _wsgi
from gunicorn.http.body import LengthReader
from gunicorn.http.errors import NoMoreData
from gunicorn.util import close as close_socket
from gunicorn.util import has_fileno
from gunicorn.workers.gthread import STOP_KEEPALIVE_LINGER, ThreadWorker

# gunicorn's HTTP/1 response writer, which gows' coalescing response extends.
Response = _wsgi.Response

__all__ = [
    "Config", "Logger", "LengthReader", "NoMoreData", "Response", "STOP_KEEPALIVE_LINGER",
    "ThreadWorker", "close_socket", "get_parser", "has_fileno", "install_response",
    "has_buffered_request", "body_read_to_end", "forget_request", "watch_readable",
    "watch_method_queue", "wake_main_loop",
]


def install_response(cls: type) -> None:
    """Make `cls` the response class of every request in this process: gunicorn's
    `wsgi.create` looks its module-level `Response` up at each call."""
    _wsgi.Response = cls


def has_buffered_request(parser: Any) -> bool:
    """Whether the parser has already read bytes of a next (pipelined) request: they no longer
    make the socket readable, so the connection must be served again without a poll."""
    return bool(parser.unreader.buf.getvalue())


def body_read_to_end(parser: Any) -> bool:
    """Whether the current request's body is known to be read to its end without draining:
    a Content-Length body of 0 bytes (every request without a body)."""
    reader = parser.mesg.body.reader
    return type(reader) is LengthReader and reader.length == 0


def forget_request(parser: Any) -> None:
    """Drop the parser's current request, so that its next one starts without a drain."""
    parser.mesg = None


def watch_readable(worker: ThreadWorker, fd: int, callback: Callable[[Any], None]) -> None:
    """Have the worker's main loop call `callback(fd)` whenever `fd` turns readable."""
    worker.poller.register(fd, selectors.EVENT_READ, callback)


def watch_method_queue(worker: ThreadWorker) -> None:
    """Run the callbacks other threads queue for the main thread (`wake_main_loop`)."""
    queue = worker.method_queue
    watch_readable(worker, queue.fileno(), queue.run_callbacks)


def wake_main_loop(worker: ThreadWorker) -> None:
    """Wake the worker's main thread from its poll (from any thread)."""
    worker.method_queue.defer(lambda: None)
