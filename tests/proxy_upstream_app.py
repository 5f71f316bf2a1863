"""A WSGI app playing the worker behind the proxy in the proxy tests (run under gunicorn gthread).

Each route exercises one behaviour the proxy must relay or react to; every response names the
worker (its port) in X-Worker so tests can see where a request went.
"""
from __future__ import annotations

import json
import os
import signal
import threading
import time

from werkzeug.http import http_date
from werkzeug.wrappers import Request, Response

PORT = os.environ.get("WORKER_PORT", "?")
ROOT = os.environ.get("WORKER_ROOT", ".")
_counter = 0
_lock = threading.Lock()


def _count() -> int:
    global _counter
    with _lock:
        _counter += 1
        return _counter


def pattern(size: int) -> bytes:
    """Deterministic body bytes so a test can check every byte it received."""
    block = bytes(range(256)) * 64  # 16 KiB
    reps, rest = divmod(size, len(block))
    return block * reps + block[:rest]


def _stream(size: int, chunk: int, delay: float, die_after: int | None):
    block = bytes(range(256)) * max(1, chunk // 256)  # chunk is a multiple of 256: `pattern` holds
    sent = 0
    while sent < size:
        n = min(len(block), size - sent)
        if die_after is not None and sent >= die_after:
            os.kill(os.getpid(), signal.SIGKILL)
        yield block[:n]
        sent += n
        if delay:
            time.sleep(delay)


def app(environ, start_response):
    req = Request(environ)
    path = req.path
    args = req.args
    headers = {"X-Worker": PORT}
    if path == "/healthcheck":
        resp = Response("ok", headers=headers)
    elif path == "/echo":
        body = req.get_data()
        resp = Response(json.dumps({
            "method": req.method, "path": req.full_path if req.query_string else req.path,
            "headers": [[k, v] for k, v in req.headers.items()], "body": body.decode("latin-1"),
            "worker": PORT,
        }), content_type="application/json", headers=headers)
    elif path.startswith("/file/"):
        # Cacheable static-like content with validators, conditional and range support.
        size = int(args.get("size", 1024))
        max_age = args.get("max_age", "60")
        resp = Response(pattern(size), content_type="application/octet-stream", headers=headers)
        resp.headers["Cache-Control"] = f"public, max-age={max_age}"
        resp.set_etag(f"e{size}-{path}")
        resp.last_modified = 1_700_000_000
        if "vary" in args:
            resp.headers["Vary"] = args["vary"]
        if "cookie" in args:
            resp.set_cookie("session", "abc")
        resp.headers["X-Count"] = str(_count())
        resp.make_conditional(req, accept_ranges=True, complete_length=size)
    elif path == "/counter":
        # Cacheable for max_age seconds; the body changes on every request that reaches here.
        resp = Response(f"count={_count()} worker={PORT}", headers=headers)
        resp.headers["Cache-Control"] = f"max-age={args.get('max_age', '60')}"
        if "cc" in args:
            resp.headers["Cache-Control"] = args["cc"]
    elif path == "/negotiated":
        ae = req.headers.get("Accept-Encoding", "")
        chosen = "br" if "br" in ae else "gzip" if "gzip" in ae else "identity"
        resp = Response(f"encoded={chosen} count={_count()}", headers=headers)
        if chosen != "identity":
            resp.headers["Content-Encoding"] = chosen
        resp.headers["Cache-Control"] = "max-age=60"
        resp.headers["Vary"] = "Accept-Encoding"
    elif path == "/status":
        code = int(args.get("code", 200))
        resp = Response(b"" if code in (204, 304) else f"status {code}", status=code, headers=headers)
        resp.headers["Cache-Control"] = "max-age=60"
    elif path == "/chunked":
        # No length: gunicorn sends it chunked to HTTP/1.1 clients (the proxy).
        parts = int(args.get("parts", 5))
        resp = Response((f"part{i};".encode() for i in range(parts)), headers=headers)
    elif path == "/stream":
        size = int(args.get("size", 1 << 20))
        chunk = int(args.get("chunk", 65536))
        delay = float(args.get("delay", 0))
        die_after = int(args["die_after"]) if "die_after" in args else None
        resp = Response(_stream(size, chunk, delay, die_after), headers=headers)
        if "nolength" not in args:
            resp.headers["Content-Length"] = str(size)
    elif path == "/sleep":
        time.sleep(float(args.get("s", 1)))
        resp = Response(f"slept worker={PORT}", headers=headers)
    elif path == "/die":
        os.kill(os.getpid(), signal.SIGKILL)
        resp = Response("unreachable")
    elif path == "/hop":
        resp = Response("hop", headers=headers)
        resp.headers["Connection"] = "X-Secret"
        resp.headers["X-Secret"] = "leak"
        resp.headers["Keep-Alive"] = "timeout=5"
        resp.headers["Proxy-Authenticate"] = "Basic"
    elif path == "/date":
        resp = Response(http_date(time.time()), headers=headers)
    else:
        resp = Response("not found", status=404, headers=headers)
    return resp(environ, start_response)
