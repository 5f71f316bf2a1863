"""The request head as a worker gets it (the Rewrite of Go's ReverseProxy): the client's
hop-by-hop fields gone (reader.py leaves them out of `req.fwd`), forwarding fields set, and what
the proxy itself asks of the worker (a hand-off, a revalidation) added."""
from __future__ import annotations

from typing import Any

from ..addresses import host_port
from .cache import Entry
from .http1 import CRLF, VIA_SELF
from .request import Request


def worker_request_head(req: Request, peer: bytes, transport: Any, handoff_line: bytes | None,
                        stale: Entry | None, scheme: bytes = b"http") -> bytes:
    """The head for `req` from the client at `peer` (the body, if any, follows it as it is);
    `handoff_line`: asks the worker to name a file body rather than send it (fileapp.handoff);
    `stale`: the front-cache entry the request revalidates; `scheme`: the client's (http, https)."""
    parts = [req.method, b" ", req.target, b" HTTP/1.1\r\n"]
    if handoff_line is not None:
        parts.append(handoff_line)
    parts += req.fwd
    # A local fileapp worker (asked for a hand-off) gets only what it reads: the client's Host is
    # passed as it is, and its scheme is http unless told otherwise. Every field costs the
    # worker's parser about half a microsecond (the many-files load: X-Forwarded-Host and
    # X-Forwarded-Proto: http were 2 us of its 28 per request).
    local = handoff_line is not None
    if req.host is None:  # HTTP/1.0 without Host; HTTP/1.1 requires one upstream
        sock = transport.get_extra_info("sockname")
        parts += (b"Host: ", host_port(*sock[:2]).encode() if isinstance(sock, tuple) else b"localhost", CRLF)
    elif not local:
        parts += (b"X-Forwarded-Host: ", req.host, CRLF)
    parts += (b"X-Forwarded-For: ", req.xff + b", " + peer if req.xff else peer, CRLF)
    if not local or scheme != b"http":
        parts += (b"X-Forwarded-Proto: ", scheme, CRLF)
    parts += (b"Via: ", req.via + b", " + VIA_SELF if req.via else VIA_SELF, CRLF)
    if stale is not None:  # revalidating a front-cache entry for the client's plain GET/HEAD
        parts += (b"If-None-Match: ", stale.etag, CRLF) if stale.etag is not None else \
                 (b"If-Modified-Since: ", stale.last_modified, CRLF)
    if req.body is not None:
        parts.append(b"Content-Length: %d\r\n\r\n" % len(req.body))
    elif req.cl is not None or req.method in (b"POST", b"PUT", b"PATCH"):
        parts.append(b"Content-Length: 0\r\n\r\n")
    else:
        parts.append(CRLF)
    return b"".join(parts)
