"""HTTPS in the proxy: the TLS context new handshakes get (reloaded with the settings), the
connection kinds of the listeners (plain, TLS, redirect to HTTPS) and the redirect's target.

What a reader would otherwise get wrong: over TLS the bytes must pass through the transport
(which encrypts them), so a file body is not sent with sendfile to the socket underneath
(filebody.StreamSender instead); and a redirect's host comes from the certificate's names, so
a Host header can choose among them but never send a client anywhere else (an open redirect).
"""
from __future__ import annotations

import hashlib
import logging
import re
from typing import TYPE_CHECKING, Any

from ..tls import TlsError, server_context
from .client import ClientProtocol
from .filebody import StreamSender
from .http1 import CONN_CLOSE, CONN_KEEP, CRLF
from .request import Request

if TYPE_CHECKING:
    import ssl

log = logging.getLogger("gows.proxy")

PLAIN, TLS, REDIRECT = "plain", "tls", "redirect"  # kinds of listener
HTTPS = b"https"
_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")  # what a wildcard name's * stands for
REDIRECT_HEAD = b"HTTP/1.1 308 Permanent Redirect\r\nContent-Length: 0\r\nLocation: "


class TlsState:
    """The HTTPS settings of one proxy process: the context for new handshakes, and the HSTS
    header and redirect target that go with them."""

    def __init__(self) -> None:
        self.context: ssl.SSLContext | None = None
        self.loaded: bytes | None = None  # digest of the certificate and key files the context holds
        self.hsts: bytes | None = None  # the Strict-Transport-Security line, or None (off)
        self.names: tuple[str, ...] = ()  # the certificate's names (tls.host_names)
        self.default_host = "localhost"  # where a redirect goes when the Host is not one of them
        self.port = 443

    def configure(self, settings: dict[str, Any] | None) -> bool:
        """Take the master's tls settings; True when a new context must serve new handshakes.
        A certificate that fails to load keeps the old one serving (the reason is logged)."""
        if settings is None:
            return False
        self.hsts = settings["hsts"].encode() + CRLF if settings["hsts"] else None
        self.names = tuple(settings["names"])
        self.default_host = settings["default_host"]
        self.port = settings["port"]
        certificate, key = settings["certificate"], settings["key"]
        try:
            digest = _digest(certificate, key)
            if digest == self.loaded:
                return False  # the same files: keep the context (and its session tickets)
            context = server_context(certificate, key)
        except (OSError, TlsError) as e:
            what = "keeping the certificate loaded before" if self.context is not None else "no HTTPS until it loads"
            log.error("cannot load the TLS certificate (%s): %s", what, e)
            return False
        self.context, self.loaded = context, digest
        return True


def _digest(certificate: str, key: str) -> bytes:
    h = hashlib.sha256()
    for path in (certificate, key):
        with open(path, "rb") as f:
            h.update(f.read())
    return h.digest()


class TlsClientProtocol(ClientProtocol):
    """A client connection of the HTTPS listener: as a plain one, with file bodies written
    through the (encrypting) transport and the scheme told to workers as https."""

    __slots__ = ()
    scheme = HTTPS
    sender_class = StreamSender

    def connection_made(self, transport: Any) -> None:
        self.proxy.listeners.shaken(self)  # (asyncio calls this once the handshake is done)
        super().connection_made(transport)

    def eof_received(self) -> bool | None:
        # TLS has no half-close (asyncio's SSL transport warns when asked to keep it open):
        # what is still queued for this client is dropped with the connection.
        super().eof_received()
        return None


class RedirectProtocol(ClientProtocol):
    """A client connection of the redirect listener: every request, once read under the same
    limits and deadlines as any other, is answered 308 to the same path on HTTPS."""

    __slots__ = ()

    def _serve(self, req: Request) -> None:
        self.current = req
        if req.error:
            self.respond_error(req, req.error)
            return
        proxy = self.proxy
        keep = req.keep_alive and not proxy.draining
        head = [REDIRECT_HEAD, location(req.host, req.target, proxy.tls), CRLF, proxy.date_line]
        if not keep:
            head.append(CONN_CLOSE)
        elif req.http10:
            head.append(CONN_KEEP)
        head.append(CRLF)
        self.transport.write(b"".join(head))
        proxy.status_counts[3] += 1
        req.status, req.length = 308, 0
        self.finish(req, keep)


def location(host: bytes | None, target: bytes, tls: TlsState) -> bytes:
    """The HTTPS URL a request for `target` with Host `host` is redirected to: the host only
    when the certificate names it (else tls.default_host), the path kept."""
    if target[:7].lower() == b"http://" or target[:8].lower() == b"https://":  # absolute form
        rest = target.split(b"//", 1)[1]
        slash = rest.find(b"/")
        host, path = (rest, b"/") if slash < 0 else (rest[:slash], rest[slash:])
    else:
        path = target if target.startswith(b"/") else b"/"  # (OPTIONS *)
    name = _named(host, tls.names) or tls.default_host
    port = b"" if tls.port == 443 else b":%d" % tls.port
    return b"https://" + name.encode() + port + path


def _named(host: bytes | None, names: tuple[str, ...]) -> str | None:
    """The host part of a Host value when one of `names` covers it (a wildcard one label)."""
    if not host:
        return None
    text = host.decode("latin-1").lower()
    hostname = text[:text.find("]") + 1] if text.startswith("[") else text.rsplit(":", 1)[0] if ":" in text else text
    hostname = hostname.rstrip(".")
    if not hostname:
        return None
    for name in names:
        if name == hostname:
            return hostname
        if name.startswith("*.") and "." in hostname:
            label, parent = hostname.split(".", 1)
            if parent == name[2:] and _LABEL.fullmatch(label):
                return hostname
    return None


PROTOCOLS: dict[str, type[ClientProtocol]] = {PLAIN: ClientProtocol, TLS: TlsClientProtocol,
                                              REDIRECT: RedirectProtocol}
