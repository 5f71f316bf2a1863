"""Every piece of gunicorn that gows' worker relies on, reached from here and nowhere else.

gows runs inside gunicorn's threaded worker and builds on parts gunicorn does not promise to
keep: its request header policy and error classes, the rules and constants of its Response,
gthread's hooks and main-loop helpers. tests/test_gunicorn_compat.py names each one with the
shape relied on, so a gunicorn upgrade fails there first, by name, rather than somewhere in a
request.

Besides what is exported below, GowsThreadWorker overrides or calls these ThreadWorker members:
`init_process`, `init_signals`, `run`, `notify`, `handle_exit`, `handle_quit`, `is_parent_alive`,
`wait_for_and_dispatch_events(timeout)`, `handle_error(req, client, addr, exc)`,
`check_config(cfg, log)`, and the attributes `SIGNALS`, `alive`, `cfg` (with each setting's
`default` in `settings`), `log` (with `access_log_enabled`, `access(resp, req, environ,
request_time)` and the `error_log` logger), `sockets`,
`worker_connections`, `wsgi`, `pid`, `tmp`, `nr`, `max_requests`. fileapp.http1's Request is a
HeaderPolicy and calls its `_peer_trusted_for_forwarded()` and `_apply_header_policy(name,
value, scheme_state, seen, secure_scheme_headers, forwarder_headers)`, which read `cfg`,
`peer_addr`, `scheme` and `version` and set `_expected_100_continue`; it skips the call for the
fields `policy_may_act` says the policy only keeps (it restates the policy's conditions, and the
tests hold it to the policy).
"""
from __future__ import annotations

import logging
import selectors
from typing import Any, Callable

from gunicorn.config import Config
from gunicorn.glogging import Logger
from gunicorn.http import wsgi as _wsgi
from gunicorn.http.errors import (
    ConfigurationProblem,
    InvalidHeader,
    InvalidRequestLine,
    InvalidRequestMethod,
    LimitRequestHeaders,
    LimitRequestLine,
    NoMoreData,
)
from gunicorn.http.message import (
    DEFAULT_MAX_HEADERFIELD_SIZE,
    MAX_HEADERS,
    MAX_REQUEST_LINE,
    RFC9110_5_3_SINGLETON_FIELDS,
    TOKEN_RE,
    HeaderPolicy,
)
from gunicorn.util import close as close_socket
from gunicorn.util import has_fileno, hop_headers, http_date
from gunicorn.workers.gthread import STOP_KEEPALIVE_LINGER, ThreadWorker

# gunicorn's response rules and constants, which gows' own Response keeps.
FileWrapper = _wsgi.FileWrapper
HEADER_VALUE_RE = _wsgi.HEADER_VALUE_RE
STATUS_RE = _wsgi.STATUS_RE
InvalidResponseHeader = _wsgi.InvalidResponseHeader
InvalidResponseHeaderName = _wsgi.InvalidResponseHeaderName
SERVER = _wsgi.SERVER
HOP_HEADERS = frozenset(hop_headers)
base_environ = _wsgi.base_environ

__all__ = [
    "Config", "Logger", "NoMoreData", "STOP_KEEPALIVE_LINGER", "ThreadWorker", "close_socket",
    "has_fileno", "http_date", "HeaderPolicy", "TOKEN_RE", "MAX_HEADERS", "MAX_REQUEST_LINE",
    "DEFAULT_MAX_HEADERFIELD_SIZE", "ConfigurationProblem", "InvalidHeader", "InvalidRequestLine",
    "InvalidRequestMethod", "LimitRequestHeaders", "LimitRequestLine", "FileWrapper",
    "HEADER_VALUE_RE", "STATUS_RE", "InvalidResponseHeader", "InvalidResponseHeaderName",
    "SERVER", "HOP_HEADERS", "base_environ", "watch_readable", "watch_method_queue",
    "wake_main_loop", "request_hooks", "policy_may_act",
]


def policy_may_act(name: str) -> bool:
    """Whether HeaderPolicy._apply_header_policy may do more with the field `name` (upper case)
    than keep it as it is: a singleton field (refused when repeated), Expect, a name with an
    underscore. It acts on secure scheme headers too (cfg.secure_scheme_headers, which the
    caller checks): for every other name it returns (name, value) and changes nothing."""
    return name in RFC9110_5_3_SINGLETON_FIELDS or name == "EXPECT" or "_" in name


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


def request_hooks(cfg: Config, log: Logger) -> tuple[Callable | None, Callable | None]:
    """The pre_request and post_request hooks to call around each request: None for gunicorn's
    defaults when they would do nothing (pre_request's logs at debug level only, post_request's
    is empty), a few per cent of a worker's time on a small file."""
    pre, post = cfg.pre_request, cfg.post_request
    if pre is cfg.settings["pre_request"].default and not log.error_log.isEnabledFor(logging.DEBUG):
        pre = None
    if post is cfg.settings["post_request"].default:
        post = None
    return pre, post
