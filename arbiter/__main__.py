"""`python -m arbiter [-c PATH] [--check-config]`: validate the config, bind, and run the master.

User mistakes (config, ports, pidfile) print one line naming the key and exit with status 2.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Sequence

from fileapp.processes import pid_alive

USAGE_ERROR = 2


def write_pidfile(path: Path) -> None:
    """Write our pid atomically; refuse when the file names another live process."""
    from .config import ConfigError
    try:
        old = int(path.read_text().strip() or "0")
    except (OSError, ValueError):
        old = 0
    if old > 0 and old != os.getpid() and pid_alive(old):
        raise ConfigError(f"pidfile: {path} names running process {old}; is gows already running?")
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    try:
        tmp.write_text(f"{os.getpid()}\n")
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise ConfigError(f"pidfile: cannot write {path}: {e.strerror or e}") from None


def remove_pidfile(path: Path) -> None:
    """Remove the pidfile if it is still ours (a successor may have replaced it)."""
    try:
        if int(path.read_text().strip()) == os.getpid():
            path.unlink()
    except (OSError, ValueError):
        pass


def main(argv: Sequence[str] | None = None) -> int:
    """Run the gows master; returns the process exit status."""
    parser = argparse.ArgumentParser(prog="python -m arbiter", description="The gows master: supervise "
                                     "a pool of fileapp workers and serve their files.")
    parser.add_argument("-c", "--config", default="gows.conf.json", help="config file (default ./gows.conf.json)")
    parser.add_argument("--check-config", action="store_true", help="validate the config file and exit "
                        "(ports are not bound: a running server holds its own)")
    args = parser.parse_args(argv)

    from .config import ConfigError, bind_configured, listen_key, load
    name = args.config
    try:
        config = load(args.config)
    except ConfigError as e:
        print(f"{name}: {e}", file=sys.stderr)
        return USAGE_ERROR
    if args.check_config:
        local = len(config.local_workers)
        listening = [str(a) for a in (config.listen, config.tls.enabled and config.tls.listen) if a]
        print(f"{name}: OK ({local} local and {len(config.workers) - local} remote workers, "
              f"listening on {' and '.join(listening)})")
        if config.tls.enabled:
            from .config import tls_certificate
            from .tls import expiry_warning, iso_date
            cert = tls_certificate(config)
            print(f"{name}: tls.certificate: {cert.subject}, names {', '.join(cert.names) or 'none'}, "
                  f"expires {iso_date(cert.not_after)}")
            soon = expiry_warning(cert)
            if soon:
                print(f"{name}: warning: {soon}", file=sys.stderr)
        return 0

    from .ops.logs import LogSink
    try:
        sink = LogSink(config.logging)
    except OSError as e:
        print(f"{name}: logging.file: cannot open {config.logging.file}: {e.strerror or e}", file=sys.stderr)
        return USAGE_ERROR
    sockets = []
    try:
        public = None
        if config.listen is not None:
            public = bind_configured(config.listen.host, config.listen.port, listen_key(config))
            sockets.append(public)
        tls = {}
        if config.tls.enabled:
            tls["tls"] = bind_configured(config.tls.listen.host, config.tls.listen.port, "tls.listen")
            sockets.append(tls["tls"])
            if config.tls.redirect_listen is not None:
                where = config.tls.redirect_listen
                tls["redirect"] = bind_configured(where.host, where.port, "tls.redirectListen")
                sockets.append(tls["redirect"])
        workers = {}
        for w in config.local_workers:
            workers[(w.host, w.port)] = bind_configured(w.host, w.port, w.label)
            sockets.append(workers[(w.host, w.port)])
        admin = None
        if config.admin is not None:
            admin = bind_configured(config.admin.host, config.admin.port, "admin")
            sockets.append(admin)
        from .arbiter import Arbiter
        arbiter = Arbiter(config, public, workers, sink, admin, tls)
        if config.pidfile is not None:
            write_pidfile(config.pidfile)
    except ConfigError as e:
        for sock in sockets:
            sock.close()
        print(f"{name}: {e}", file=sys.stderr)
        return USAGE_ERROR

    import setproctitle
    import uvloop

    setproctitle.setproctitle("gows: master")
    try:
        return uvloop.run(arbiter.run())
    finally:
        if config.pidfile is not None:
            remove_pidfile(config.pidfile)


if __name__ == "__main__":
    sys.exit(main())
