"""What a reload (HUP) takes from a new config: everything but what takes a restart (the
listeners, the admin address, the pidfile, HTTPS turned on or off), which stays as it runs."""
from __future__ import annotations

import dataclasses

from .settings import Config, TlsConfig


def as_reloaded(running: Config, new: Config) -> tuple[Config, list[str]]:
    """`new` with what takes a restart kept from `running`; and a warning for each such setting
    that `new` changes."""
    warnings = []
    for key in ("listen", "admin", "pidfile"):
        if getattr(new, key) != getattr(running, key):
            name = "masterPort" if key == "listen" and new.master_port is not None else key
            warnings.append(f"reload: {name} changed to {getattr(new, key)}; that takes a restart, "
                            f"still using {getattr(running, key)}")
    tls = _tls_kept(running.tls, new.tls, warnings)
    kept = dataclasses.replace(new, listen=running.listen, admin=running.admin, pidfile=running.pidfile, tls=tls)
    return kept, warnings


def _tls_kept(old: TlsConfig, tls: TlsConfig, warnings: list[str]) -> TlsConfig:
    """The new tls section with its listeners as they run: its certificate, key and HSTS change."""
    if tls.enabled != old.enabled:
        warnings.append(f"reload: HTTPS turned {'on' if tls.enabled else 'off'}; that takes a restart")
        return old
    for key, value, running in (("tls.listen", tls.listen, old.listen),
                                ("tls.redirectListen", tls.redirect_listen, old.redirect_listen)):
        if value != running and old.enabled:
            warnings.append(f"reload: {key} changed to {value}; that takes a restart, still using {running}")
    return dataclasses.replace(tls, listen=old.listen, redirect_listen=old.redirect_listen)
