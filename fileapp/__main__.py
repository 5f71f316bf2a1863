"""`python -m fileapp --root DIR --port N`: one standalone fileapp worker (fileapp.bootstrap).

Bad arguments print one line on stderr and exit with status 2, never a traceback.
"""
from __future__ import annotations

import argparse
import errno
import json
import math
import os
import signal
import socket
import stat
import sys
from typing import NoReturn, Sequence

from . import cache, logs
from .files import url_path_option
from .handoff import TOKEN_ENV
from .version import VERSION

USAGE_ERROR = 2
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


class UsageError(Exception):
    """A mistake in the command line or its environment, reported as one line with status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, not the usage block
        raise UsageError(message)


MAX_FD = 2**31 - 1  # descriptors are C ints


def _number(kind: type, minimum: float, maximum: float | None = None):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a valid {kind.__name__}") from None
        if not math.isfinite(value) or value < minimum or (
                maximum is not None and value > maximum):
            bound = f"between {minimum} and {maximum}" if maximum is not None else f">= {minimum}"
            raise argparse.ArgumentTypeError(f"{text!r} must be {bound}")
        return value
    parse.__name__ = kind.__name__
    return parse


def _boolean(text: str) -> bool:
    value = {"true": True, "on": True, "1": True, "false": False, "off": False, "0": False}.get(
        text.lower())
    if value is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not true or false")
    return value


def _url_path(text: str) -> str:
    try:
        url_path_option(text, "")
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def _json(text: str):
    try:
        return json.loads(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{text!r} is not JSON: {e}") from None


def make_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m fileapp",
                description="Serve a directory with fileapp under gunicorn's threaded worker.")
    p.add_argument("--version", action="version", version=f"gows {VERSION}")
    p.add_argument("--root", required=True, help="document root directory")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=_number(int, 0, 65535), default=8000,
                   help="TCP port (default 8000)")
    p.add_argument("--fd", type=_number(int, 0, MAX_FD), default=None,
                   help="serve on this inherited listening socket instead of binding")
    p.add_argument("--unix-fd", type=_number(int, 0, MAX_FD), default=None,
                   help="also serve on this inherited listening Unix socket (a local proxy's way in)")
    p.add_argument("--threads", type=_number(int, 1, 1024), default=4)
    p.add_argument("--health-path", type=_url_path, default="/healthcheck")
    p.add_argument("--cache-ttl", type=_number(float, 0), default=cache.DEFAULT_TTL,
                   help="seconds a cached response is trusted without touching the disk")
    p.add_argument("--cache-max-bytes", type=_number(int, 0), default=cache.DEFAULT_MAX_BYTES)
    p.add_argument("--cache-max-file-size", type=_number(int, 0), default=cache.DEFAULT_MAX_FILE_SIZE,
                   help="files larger than this are streamed from disk (sendfile)")
    p.add_argument("--compress", type=_boolean, default=True, metavar="{true,false}",
                   help="compress text files without a sidecar on the fly (default true)")
    p.add_argument("--etag", choices=cache.ETAG_KINDS, default=cache.DEFAULT_ETAG,
                   help="ETags from mtime and size (default) or from a hash of the content")
    p.add_argument("--graceful-timeout", type=_number(float, 0), default=30.0)
    p.add_argument("--keepalive", type=_number(int, 0), default=5,
                   help="seconds an idle keep-alive connection stays open")
    p.add_argument("--write-timeout", type=_number(float, 0.001, 86400), default=30.0,
                   help="seconds a client may take nothing of a response before it is closed")
    p.add_argument("--parent-pid", type=_number(int, 1), default=None,
                   help="exit within a second when this process dies")
    p.add_argument("--log-level", choices=LOG_LEVELS, default="info")
    p.add_argument("--log-format", choices=logs.FORMATS, default="text",
                   help="text lines (default) or JSON lines, one object per line")
    p.add_argument("--access-log", action="store_true", help="log each request to stdout (errors go to stderr)")
    p.add_argument("--listing", action="store_true",
                   help="list directories without an index file (HTML, or JSON on Accept: application/json)")
    p.add_argument("--fallback", default=None, metavar="FILE",
                   help="file under the root answering unknown HTML paths (single-page apps), e.g. index.html")
    p.add_argument("--error-pages", type=_json, default=None, metavar="JSON",
                   help='error pages by status, e.g. \'{"404": "404.html"}\'')
    p.add_argument("--headers", type=_json, default=None, metavar="JSON",
                   help='headers by URL path glob, e.g. \'[{"match": "/assets/*", "set": {"Cache-Control": "max-age=600"}}]\'')
    return p


def _check_root(root: str) -> str:
    try:
        st = os.stat(root)
    except FileNotFoundError:
        raise UsageError(f"root directory does not exist: {root}") from None
    except OSError as e:
        raise UsageError(f"root directory {root}: {e.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise UsageError(f"root is not a directory: {root}")
    if not os.access(root, os.R_OK | os.X_OK):
        raise UsageError(f"root directory is not readable: {root}")
    return root


def _inherited_listener(fd: int, flag: str = "--fd", families=(socket.AF_INET, socket.AF_INET6),
                        kind: str = "TCP") -> socket.socket:
    """The inherited listening stream socket `fd` of one of `families` (UsageError otherwise)."""
    try:
        if not stat.S_ISSOCK(os.fstat(fd).st_mode):
            raise UsageError(f"{flag} {fd} is not a socket")
        sock = socket.socket(fileno=fd)
    except OSError as e:
        raise UsageError(f"{flag} {fd}: {e.strerror or e}") from None
    try:
        listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    except OSError:
        listening = 0
    if sock.family not in families or sock.type != socket.SOCK_STREAM or not listening:
        sock.detach()
        raise UsageError(f"{flag} {fd} is not a listening {kind} socket")
    return sock


def _bind(host: str, port: int) -> socket.socket:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise UsageError(f"cannot resolve --host {host}: {e.strerror}") from None
    family, _, _, _, address = infos[0]
    try:
        return socket.create_server(address, family=family, backlog=2048)
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise UsageError(f"port {port} on {host} is in use") from None
        raise UsageError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


def _exit_now(signum: int, frame) -> None:
    os._exit(0)


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the command line, set up the listener and app, and run the worker."""
    # Until the worker installs its own handlers: a closing terminal is ignored, and a stop
    # request is honoured at once and cleanly (there is nothing in flight to drain yet).
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
        signal.signal(sig, _exit_now)
    try:
        args = make_parser().parse_args(argv)
        root = _check_root(args.root)
        listener = _inherited_listener(args.fd) if args.fd is not None else _bind(
            args.host, args.port)
        # With --fd the socket's own port is the truth; --port is then only a default.
        port = listener.getsockname()[1]
        listeners = [listener]
        if args.unix_fd is not None:
            listeners.append(_inherited_listener(args.unix_fd, "--unix-fd", (socket.AF_UNIX,), "Unix"))
        from . import create_app  # after the cheap checks: a usage error stays instant
        logs.configure(args.log_format, args.log_level, port=port)  # before the app warns
        try:
            app = create_app(
                root, health_path=args.health_path, cache_ttl=args.cache_ttl,
                cache_max_bytes=args.cache_max_bytes,
                cache_max_file_size=args.cache_max_file_size, compress=args.compress, etag=args.etag,
                listing=args.listing, fallback=args.fallback, error_pages=args.error_pages,
                headers=args.headers,
                # Set by gows' master for its own workers (fileapp.handoff).
                handoff_token=os.environ.get(TOKEN_ENV),
            )
        except ValueError as e:
            raise UsageError(str(e)) from None
        if args.parent_pid is not None:
            from .processes import pid_alive
            if not pid_alive(args.parent_pid):
                raise UsageError(f"--parent-pid {args.parent_pid}: no such process")
    except UsageError as e:
        print(f"fileapp: error: {e}", file=sys.stderr)
        return USAGE_ERROR
    title = f"gows: worker :{port}"
    try:
        import setproctitle
        setproctitle.setproctitle(title)
    except ImportError:
        pass
    from .bootstrap import serve
    return serve(listeners, app, {
        "threads": args.threads, "graceful_timeout": args.graceful_timeout,
        "keepalive": args.keepalive, "write_timeout": args.write_timeout,
        "log_level": args.log_level, "log_format": args.log_format,
        "access_log": args.access_log, "parent_pid": args.parent_pid, "title": title,
    })


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # Worker threads still blocked on a client past the graceful timeout must not hold us up.
    os._exit(code)
