"""HTTP/1.1 wire rules shared by both sides of the proxy: which header fields need attention
(hop-by-hop ones never cross it, in either direction), status lines, what a valid Host is, and
the few responses the proxy writes itself, prepared once."""
from __future__ import annotations

import re
from http import HTTPStatus

GET, HEAD = b"GET", b"HEAD"
IDEMPOTENT = frozenset((b"GET", b"HEAD", b"OPTIONS"))
SAFE = IDEMPOTENT | {b"TRACE"}
CRLF = b"\r\n"
SEP = b": "
VIA_SELF = b"1.1 gows"
# A request whose Via lists this many gows proxies already is answered 508 Loop Detected (RFC
# 5842 7.2) rather than forwarded: a worker that leads back to this gows (a DNS name yielding its
# own address, two edges listing each other) would otherwise pass each request round until every
# connection to that worker is taken, all of them waiting out proxy.responseTimeout. (A client
# sending such a Via only gets its own request refused; 508 is no failure of the worker.)
VIA_HOPS_LIMIT = 8

# Request header fields needing attention; everything else is forwarded unchanged.
(H_FWD, H_HOST, H_CONNECTION, H_DROP, H_CL, H_TE, H_XFF, H_VIA, H_AE, H_INM, H_IMS, H_EXPECT,
 H_BYPASS) = range(13)
REQUEST_HEADERS = {
    b"host": H_HOST, b"connection": H_CONNECTION, b"content-length": H_CL, b"transfer-encoding": H_TE,
    b"x-forwarded-for": H_XFF, b"via": H_VIA, b"accept-encoding": H_AE, b"if-none-match": H_INM,
    b"if-modified-since": H_IMS, b"expect": H_EXPECT,
    # Hop-by-hop (RFC 9110 7.6.1, Go's ReverseProxy), and forwarding headers we set ourselves.
    b"keep-alive": H_DROP, b"proxy-connection": H_DROP, b"te": H_DROP, b"trailer": H_DROP, b"upgrade": H_DROP,
    b"proxy-authorization": H_DROP, b"proxy-authenticate": H_DROP,
    b"x-forwarded-host": H_DROP, b"x-forwarded-proto": H_DROP,
    # gunicorn's other secure-scheme fields: the scheme is the proxy's to tell (rewrite.py).
    b"x-forwarded-ssl": H_DROP, b"x-forwarded-protocol": H_DROP,
    # Only the proxy asks a worker to hand it a file body (fileapp.handoff), never a client.
    b"x-gows-handoff": H_DROP,
    # Forwarded, but the answer is the worker's to give, not the front cache's.
    b"range": H_BYPASS, b"if-range": H_BYPASS, b"authorization": H_BYPASS, b"if-match": H_BYPASS,
    b"if-unmodified-since": H_BYPASS, b"cookie": H_BYPASS,
}
# Response header fields needing attention.
R_FWD, R_CL, R_TE, R_CONNECTION, R_DROP, R_VIA, R_CC, R_NOSTORE, R_VARY, R_AGE, R_FILE = range(11)
RESPONSE_HEADERS = {
    b"content-length": R_CL, b"transfer-encoding": R_TE, b"connection": R_CONNECTION, b"via": R_VIA,
    b"keep-alive": R_DROP, b"proxy-connection": R_DROP, b"te": R_DROP, b"trailer": R_DROP,
    b"upgrade": R_DROP, b"proxy-authenticate": R_DROP,
    b"cache-control": R_CC, b"vary": R_VARY, b"age": R_AGE,
    b"set-cookie": R_NOSTORE, b"content-range": R_NOSTORE,
    b"x-gows-file": R_FILE,  # a file body named by a local worker (fileapp.handoff): never forwarded
}
# Never dropped because a peer named them in Connection: Host, and the framing fields (which
# are not forwarded as received anyway).
_NEVER_NAMED = frozenset((b"close", b"keep-alive", b"host", b"content-length", b"transfer-encoding", b""))
_PLAIN_CONNECTION = frozenset((b"keep-alive", b"close", b"Keep-Alive", b"Close"))  # name no field


def connection_named(connection: bytes) -> set[bytes]:
    """The field names (lower-cased) a `Connection` value names as hop-by-hop, that may be
    dropped: one rule for requests, responses and what the front cache keeps of them."""
    if connection in _PLAIN_CONNECTION:  # (gunicorn sends "keep-alive" on every response)
        return set()
    return {t.strip().lower() for t in connection.split(b",")} - _NEVER_NAMED


def drop_named(fields: list[bytes], named: set[bytes], start: int = 0) -> list[bytes]:
    """`fields` (flat name, ": ", value, CRLF runs from `start`) without those `named`
    (connection_named's)."""
    kept = fields[:start]
    for i in range(start, len(fields), 4):
        if fields[i].lower() not in named:
            kept += fields[i:i + 4]
    return kept


STATUS_LINES = {s.value: b"HTTP/1.1 %d %s\r\n" % (s.value, s.phrase.encode()) for s in HTTPStatus}


def status_line(code: int) -> bytes:
    line = STATUS_LINES.get(code)
    if line is None:
        line = STATUS_LINES[code] = b"HTTP/1.1 %d \r\n" % code
    return line


def reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


# RFC 9110 7.2 and RFC 3986 3.2.2: a bracketed IP literal, or a reg-name or IPv4 address, then an
# optional port. Anything else (empty, spaces, slashes, two colons) is answered 400, as nginx does.
_VALID_HOST = re.compile(rb"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._~!$&'()*+,;=%-]+)(?::[0-9]*)?")
VALID_HOSTS: set[bytes] = set()  # values seen valid (clients repeat theirs); bounded
_MEMO_LIMIT = 1024


def valid_host(value: bytes) -> bool:
    """Whether a Host header value is a well-formed authority (remembered in VALID_HOSTS)."""
    if _VALID_HOST.fullmatch(value) is None:
        return False
    if len(VALID_HOSTS) >= _MEMO_LIMIT:
        VALID_HOSTS.clear()
    VALID_HOSTS.add(value)
    return True


# Written to a connection accepted while the proxy is shutting down.
BUSY = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\n"
        b"Content-Length: 29\r\nRetry-After: 1\r\nConnection: close\r\n\r\n"
        b"503 Service Unavailable: busy")
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
CONN_CLOSE = b"Connection: close\r\n"
CONN_KEEP = b"Connection: keep-alive\r\n"
TE_CHUNKED = b"Transfer-Encoding: chunked\r\n"
LAST_CHUNK = b"0\r\n\r\n"
_PLAIN = b"Content-Type: text/plain; charset=utf-8\r\n"
NO_STORE = b"Cache-Control: no-store\r\n"


def error_response(status: int, date_line: bytes, keep: bool, http10: bool,
                   with_body: bool, extra: bytes = b"") -> tuple[bytes, int | None]:
    """The proxy's own answer `status` (a short text body; Retry-After on 503), and the length
    of the body sent (None without one); `extra`: more header fields, each ending in CRLF."""
    body = b"%d %s\n" % (status, reason(status).encode())
    parts = [status_line(status), _PLAIN, b"Content-Length: %d\r\n" % len(body), date_line, extra]
    if status == 503:
        parts.append(b"Retry-After: 1\r\n")
    if not keep:
        parts.append(CONN_CLOSE)
    elif http10:
        parts.append(CONN_KEEP)
    parts.append(CRLF)
    if not with_body:
        return b"".join(parts), None
    parts.append(body)
    return b"".join(parts), len(body)
