"""TLS for the proxies' HTTPS listener: the server context (Mozilla's "intermediate" profile)
and what an operator needs to know of the certificate (subject, SANs, expiry).

Both the master and the proxies use this module: the master checks a certificate and key
(`--check-config`, start, each reload) before any proxy is told to load them, and reads the
certificate's fields for the admin page and metrics; each proxy builds its own context from
the same files. Nothing here parses TLS or holds key material beyond what OpenSSL loads: the
`ssl` module does the protocol, `cryptography` reads the certificate's fields.
"""
from __future__ import annotations

import datetime
import ipaddress
import ssl
from dataclasses import dataclass
from pathlib import Path

# Mozilla's "intermediate" configuration (server side TLS, version 5.7): TLS 1.2 with these
# suites (TLS 1.3's own suites are all fine and OpenSSL offers only those), the client's order.
# The DHE suites stay in the list as Mozilla gives it; without DH parameters OpenSSL skips them.
INTERMEDIATE_CIPHERS = ":".join((
    "ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-RSA-AES128-GCM-SHA256", "ECDHE-ECDSA-AES256-GCM-SHA384",
    "ECDHE-RSA-AES256-GCM-SHA384", "ECDHE-ECDSA-CHACHA20-POLY1305", "ECDHE-RSA-CHACHA20-POLY1305",
    "DHE-RSA-AES128-GCM-SHA256", "DHE-RSA-AES256-GCM-SHA384", "DHE-RSA-CHACHA20-POLY1305"))
ALPN = ["http/1.1"]  # never h2: it is not implemented, and a client told so would speak it
EXPIRY_WARNING_DAYS = 30  # --check-config and the start-up log warn when the certificate lapses sooner


class TlsError(Exception):
    """A certificate or key that cannot serve; the message is one line naming the file."""


@dataclass(frozen=True)
class CertificateInfo:
    """The leaf certificate's fields an operator watches (admin page, metrics, redirects)."""

    subject: str
    issuer: str
    names: tuple[str, ...]  # subjectAltName DNS names and IP addresses, in the certificate's order
    serial: int
    not_before: float  # Unix seconds
    not_after: float

    def as_dict(self) -> dict:
        return {"subject": self.subject, "issuer": self.issuer, "sans": list(self.names),
                "serial": format(self.serial, "x"), "not_before": self.not_before, "not_after": self.not_after}


def server_context(certificate: Path | str, key: Path | str) -> ssl.SSLContext:
    """A server context serving `certificate` (PEM chain, leaf first) with `key` (PEM); TlsError
    when they cannot be loaded (missing, unreadable, not matching, protected by a passphrase)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2  # SSLv3, TLS 1.0 and 1.1 hellos are refused
    ctx.set_ciphers(INTERMEDIATE_CIPHERS)
    # Intermediate: the client's preference (it knows whether it has AES hardware); no TLS 1.2
    # renegotiation (a client could make the server redo the costly half of a handshake at will).
    ctx.options &= ~ssl.OP_CIPHER_SERVER_PREFERENCE
    ctx.options |= ssl.OP_NO_RENEGOTIATION | ssl.OP_NO_COMPRESSION
    ctx.set_alpn_protocols(ALPN)
    # Curves: Python cannot set a list (set_ecdh_curve takes one); OpenSSL 3's default groups
    # (X25519, P-256, X448, P-521, P-384) include Mozilla's three, X25519 first.
    _load(ctx, Path(certificate), Path(key))
    return ctx


PASSPHRASE = ("is protected by a passphrase, and gows never prompts for one: give it a key without one "
              "(openssl pkey -in KEY -out KEY.plain), readable by the gows user only")


def _refuse_prompt() -> bytes:
    raise TlsError(PASSPHRASE)


def _load(ctx: ssl.SSLContext, certificate: Path, key: Path) -> None:
    for path, what in ((certificate, "tls.certificate"), (key, "tls.key")):
        try:
            with open(path, "rb") as f:
                head = f.read(1 << 20)
        except OSError as e:
            raise TlsError(f"{what}: cannot read {path}: {e.strerror or e}") from None
        if b"-----BEGIN" not in head:
            raise TlsError(f"{what}: {path} is not PEM (no -----BEGIN line)")
        if what == "tls.key" and (b"ENCRYPTED" in head):
            raise TlsError(f"tls.key: {path} {PASSPHRASE}")
    try:
        # The callable stands in for OpenSSL's terminal prompt: a key it did not see as
        # encrypted above still never blocks start-up waiting for a passphrase.
        ctx.load_cert_chain(str(certificate), str(key), password=_refuse_prompt)
    except TlsError as e:
        raise TlsError(f"tls.key: {key} {e}") from None
    except ssl.SSLError as e:
        if "KEY_VALUES_MISMATCH" in str(e) or "key values mismatch" in str(e):
            raise TlsError(f"tls.key: {key} does not match the certificate in {certificate}") from None
        raise TlsError(f"tls.certificate: cannot load {certificate} with the key {key}: {e.reason or e}") from None


def certificate_info(certificate: Path | str) -> CertificateInfo:
    """The fields of the leaf (first) certificate of the PEM chain at `certificate`."""
    from cryptography import x509  # (only the master reads certificates; proxies never import it)

    try:
        with open(certificate, "rb") as f:
            leaf = x509.load_pem_x509_certificates(f.read())[0]
    except (OSError, ValueError) as e:
        raise TlsError(f"tls.certificate: cannot read {certificate}: {getattr(e, 'strerror', None) or e}") from None
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = tuple([*san.get_values_for_type(x509.DNSName),
                       *(str(ip) for ip in san.get_values_for_type(x509.IPAddress))])
    except x509.ExtensionNotFound:
        names = ()
    return CertificateInfo(leaf.subject.rfc4514_string(), leaf.issuer.rfc4514_string(), names,
                           leaf.serial_number, leaf.not_valid_before_utc.timestamp(),
                           leaf.not_valid_after_utc.timestamp())


def check(certificate: Path | str, key: Path | str, now: float | None = None) -> CertificateInfo:
    """Load `certificate` and `key` as a proxy will and read the certificate; TlsError when they
    cannot serve, expired included (the message gives the date)."""
    server_context(certificate, key)
    info = certificate_info(certificate)
    now = datetime.datetime.now(datetime.timezone.utc).timestamp() if now is None else now
    if info.not_after <= now:
        raise TlsError(f"tls.certificate: {certificate} expired on {iso_date(info.not_after)}")
    if info.not_before > now:
        raise TlsError(f"tls.certificate: {certificate} is not valid before {iso_date(info.not_before)}")
    return info


def expiry_warning(info: CertificateInfo, now: float | None = None) -> str | None:
    """A warning when the certificate lapses within EXPIRY_WARNING_DAYS, else None."""
    now = datetime.datetime.now(datetime.timezone.utc).timestamp() if now is None else now
    days = (info.not_after - now) / 86400
    if days < EXPIRY_WARNING_DAYS:
        return f"tls.certificate expires on {iso_date(info.not_after)} (in {days:.1f} days)"
    return None


def iso_date(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def host_names(info: CertificateInfo) -> tuple[str, ...]:
    """The certificate's names a redirect may send a client to (lower case; IPv6 bracketed),
    wildcards kept as `*.example.com` for matching only."""
    out = []
    for name in info.names:
        try:
            ip = ipaddress.ip_address(name)
        except ValueError:
            out.append(name.lower().rstrip("."))
            continue
        out.append(f"[{ip}]" if ip.version == 6 else str(ip))
    return tuple(out)
