"""Reading gows.conf.json: parse, validate, resolve, and check what no single setting can.

Beyond each setting's own kind: the either/or forms (listen or masterPort, workers or
workerCount), which workers are local (spawned here) or remote (only checked), bounds between
settings, and that no two listeners share a port. Binding a configured address also reports
its failure here, as a ConfigError naming the key, so the socket layer never needs this one.
"""
from __future__ import annotations

import dataclasses
import errno
import ipaddress
import json
import os
import socket
from pathlib import Path
from typing import Any, TypeVar

from ..addresses import Address, WorkerAddress
from ..sockets import ListenError, bind_listener
from ..tls import CertificateInfo, TlsError, check
from .kinds import ConfigError, parse_object
from .settings import Config


T = TypeVar("T")


def configured(cls: type[T], **given: Any) -> T:
    """One settings section as a config file would give it: `given` under their JSON keys
    (`configured(ProxyConfig, maxConnections=5)`), the declared defaults for the rest, checked
    as a loaded file is (ConfigError naming the key)."""
    return parse_object(cls, given, "", Path.cwd())


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict:
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise ConfigError(f"{key}: given twice")
        out[key] = value
    return out


def is_local(host: str) -> bool:
    """True when `host` names this machine: binding one of its addresses succeeds."""
    if host == "localhost":
        return True
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise ConfigError(f"cannot resolve {host!r}: {e.strerror}") from None
    for family, _, _, _, sockaddr in infos:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            try:
                s.bind((sockaddr[0], 0))
                return True
            except OSError as e:
                if e.errno != errno.EADDRNOTAVAIL:
                    raise
    return False


def _resolve_workers(raw: dict, values: Config) -> tuple[WorkerAddress, ...]:
    shorthand = [k for k in ("workerCount", "workerBasePort", "workerHost") if k in raw]
    if "workers" in raw and shorthand:
        raise ConfigError(f"{shorthand[0]}: give either workers or workerCount, not both")
    if values.workers is None and values.worker_count is None:
        if shorthand:
            raise ConfigError(f"workerCount: required with {shorthand[0]}")
        raise ConfigError("workers: required (a list of {host, port}), or give workerCount")
    if values.workers is not None:
        pairs = list(values.workers)
    else:
        last = values.worker_base_port + values.worker_count - 1
        if last > 65535:
            raise ConfigError(f"workerCount: {values.worker_count} ports from workerBasePort {values.worker_base_port} run past 65535")
        pairs = [(values.worker_host, values.worker_base_port + i, "workerBasePort", 1, 0.0, True)
                 for i in range(values.worker_count)]
    out = []
    for host, port, label, weight, slow_start, spawn in pairs:
        literal = _is_literal(host)
        try:
            local = is_local(host)
        except ConfigError as e:
            if literal:
                raise ConfigError(f"{label.rsplit('.', 1)[0] + '.host' if label != 'workerBasePort' else 'workerHost'}: {e}") from None
            local = False  # a name that does not resolve yet: the master warns and tries again
        # Not started here (spawn false, or not this machine): only checked and balanced; a name
        # becomes one member per address.
        out.append(WorkerAddress(host, port, local and spawn, label, weight=weight, slow_start=slow_start,
                                 named=not literal and not (local and spawn)))
    return tuple(out)


def _is_literal(host: str) -> bool:
    """An IP address (or localhost), as opposed to a DNS name the master resolves itself."""
    if host == "localhost":
        return True
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def _check_ports(config: Config, listen_key: str) -> None:
    """No two listeners on one port: public, admin, local workers (any host); remote by host:port."""
    seen: dict[Any, str] = {}

    def claim(key: Any, label: str, what: str) -> None:
        if key in seen:
            raise ConfigError(f"{label}: {what} is already used by {seen[key]}")
        seen[key] = label

    if config.listen is not None:
        claim(("local", config.listen.port), listen_key, f"port {config.listen.port}")
    if config.tls.enabled:
        claim(("local", config.tls.listen.port), "tls.listen", f"port {config.tls.listen.port}")
        if config.tls.redirect_listen is not None:
            claim(("local", config.tls.redirect_listen.port), "tls.redirectListen",
                  f"port {config.tls.redirect_listen.port}")
    if config.admin is not None:
        claim(("local", config.admin.port), "admin", f"port {config.admin.port}")
    for w in config.workers:
        claim(("local", w.port) if w.local else (w.host, w.port), w.label, f"{'port ' + str(w.port) if w.local else str(w)}")


def load_data(raw: Any, source: Path) -> Config:
    """Validate an already-parsed config object; relative paths resolve against source's directory."""
    if not isinstance(raw, dict):
        raise ConfigError(f"must be a JSON object, got {type(raw).__name__}")
    base = source.parent.resolve()
    values = parse_object(Config, raw, "", base)
    listen_key = "listen"
    if "masterPort" in raw and "listen" in raw:
        raise ConfigError("masterPort: give either listen or masterPort, not both")
    listen = values.listen
    if values.master_port is not None:
        listen, listen_key = Address("127.0.0.1", values.master_port), "masterPort"
    fc = values.front_cache
    if fc.max_object_bytes > fc.max_bytes:
        raise ConfigError(f"frontCache.maxObjectBytes: {fc.max_object_bytes} exceeds frontCache.maxBytes {fc.max_bytes}")
    px = values.proxy
    if px.max_body_bytes > px.body_buffer_bytes:
        raise ConfigError(f"proxy.maxBodyBytes: {px.max_body_bytes} exceeds proxy.bodyBufferBytes {px.body_buffer_bytes}")
    if 0 < px.hash_balance_factor <= 1:
        raise ConfigError(f"proxy.hashBalanceFactor: must be 0 (no bound) or more than 1, got {px.hash_balance_factor:g}")
    _check_tls(values, listen)
    config = dataclasses.replace(values, listen=listen, workers=_resolve_workers(raw, values), source=source)
    _check_ports(config, listen_key)
    tls_certificate(config)
    return config


def _check_tls(values: Config, listen: Address | None) -> None:
    """The tls section's settings fit together, and something is served."""
    tls = values.tls
    if (tls.certificate is None) != (tls.key is None):
        raise ConfigError("tls.key: required with tls.certificate" if tls.key is None
                          else "tls.certificate: required with tls.key")
    if not tls.enabled:
        if tls.redirect_listen is not None:
            raise ConfigError("tls.redirectListen: needs tls.certificate (there is no HTTPS to redirect to)")
        if listen is None:
            raise ConfigError("listen: null serves nothing without tls.certificate (HTTPS only needs a certificate)")


def tls_certificate(config: Config) -> CertificateInfo | None:
    """Check the configured certificate and key as a proxy will load them; what the certificate
    says (None without TLS). ConfigError naming the key when they cannot serve (missing, not
    matching, protected by a passphrase, expired: the message gives the date)."""
    if not config.tls.enabled:
        return None
    try:
        return check(config.tls.certificate, config.tls.key)
    except TlsError as e:
        raise ConfigError(str(e)) from None


def read(path: str | os.PathLike) -> Any:
    """The parsed JSON of the config file at `path`, not yet validated (ConfigError when it cannot
    be read or is not strict JSON: no duplicate keys, no NaN or Infinity)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read: {getattr(e, 'strerror', None) or e}") from None
    try:
        return json.loads(text, object_pairs_hook=_no_duplicate_keys, parse_constant=_reject_constant)
    except json.JSONDecodeError as e:
        raise ConfigError(f"invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    except RecursionError:
        raise ConfigError("invalid JSON: nested too deeply") from None
    except ValueError as e:  # an integer of more digits than int() takes (sys.get_int_max_str_digits)
        raise ConfigError(f"invalid JSON: {e}".split(";")[0]) from None


def load(path: str | os.PathLike) -> Config:
    """Read, parse and validate the config file at `path` (ConfigError on any problem)."""
    return load_data(read(path), Path(path))


def _reject_constant(name: str) -> Any:
    raise ConfigError(f"invalid JSON: {name} is not a JSON number")


def listen_key(config: Config) -> str:
    """The key the public address came from, for error messages."""
    return "masterPort" if config.master_port is not None else "listen"


def bind_configured(host: str, port: int, key: str) -> socket.socket:
    """A listening socket on an address the config names; a failure is a ConfigError naming `key`."""
    try:
        return bind_listener(host, port)
    except ListenError as e:
        raise ConfigError(f"{key}: {e}") from None
