"""The gows command (`gows`, `python -m arbiter`): validate the config, bind, and run the master.

    gows [-c FILE] [--check-config]                     serve as a config file says (./gows.conf.json)
    gows [-c FILE] serve [DIR] [--listen ADDR] [--workers N] [--admin ADDR] [--check-config]
                                                        serve DIR (default .), flags over the file if any
    gows --version

User mistakes (config, flags, ports, pidfile) print one line naming the key or flag and exit
with status 2, never a traceback.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import NoReturn, Sequence

from fileapp.processes import pid_alive

from .config.source import SERVE_WORKERS, ConfigSource

USAGE_ERROR = 2


def may_be_gows(pid: int) -> bool:
    """Whether the live process `pid` may be a gows master: titled by gows ("gows: master", set
    once it runs) or started as one (`gows ...`, `python -m arbiter ...`, before it sets its
    title). True when /proc cannot tell (refusing to start is the safe mistake)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        return True
    if argv[0].startswith(b"gows:"):
        return True
    return (any(os.path.basename(arg) == b"gows" for arg in argv[:2])
            or any(a == b"-m" and b == b"arbiter" for a, b in zip(argv, argv[1:])))


def write_pidfile(path: Path) -> None:
    """Write our pid atomically; refuse when the file names another live gows.

    A pidfile a master killed with SIGKILL left behind may name a pid the kernel has since
    given to another program (a container's restart reuses the same few pids): that one is
    stale, and replaced with a warning, where refusing would keep gows down until someone
    deletes the file by hand."""
    from .config import ConfigError
    try:
        old = int(path.read_text().strip() or "0")
    except (OSError, ValueError):
        old = 0
    if old > 0 and old != os.getpid() and pid_alive(old):
        if may_be_gows(old):
            raise ConfigError(f"pidfile: {path} names running process {old}; is gows already running?")
        import logging
        logging.getLogger("gows.arbiter").warning("pidfile %s named process %d, which is not gows: a stale "
                                                  "pidfile, replaced", path, old)
    # A fresh file of a name no one can guess (O_EXCL, never through a symlink), renamed over the
    # pidfile: `.gows.pid.<our pid>` written as the master (root) wrote through whatever stood
    # there, so in a shared directory such as /tmp a symlink planted at that name had the master
    # overwrite the file it pointed to (with fs.protected_symlinks off).
    tmp = None
    try:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        tmp = Path(name)
        with open(fd, "w") as f:
            f.write(f"{os.getpid()}\n")
        os.chmod(tmp, 0o644)  # (mkstemp's 0600 would hide it from the tools that read it)
        os.replace(tmp, path)
    except OSError as e:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        raise ConfigError(f"pidfile: cannot write {path}: {e.strerror or e}") from None


def remove_pidfile(path: Path) -> None:
    """Remove the pidfile if it is still ours (a successor may have replaced it)."""
    try:
        if int(path.read_text().strip()) == os.getpid():
            path.unlink()
    except (OSError, ValueError):
        pass


class UsageError(Exception):
    """A mistake on the command line, reported as one line with status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line naming the problem, not the usage block
        raise UsageError(f"{self.prog}: {message}")


def make_parser() -> argparse.ArgumentParser:
    """The command line: today's `-c FILE [--check-config]`, and the `serve` subcommand."""
    from fileapp.version import VERSION

    version = f"gows {VERSION}"
    parser = _Parser(prog="gows", description="The gows master: supervise a pool of fileapp workers "
                     "and serve their files.")
    parser.add_argument("--version", action="version", version=version)
    parser.add_argument("-c", "--config", metavar="FILE", help="config file (default ./gows.conf.json; with serve: none)")
    parser.add_argument("--check-config", action="store_true", help="validate the config and exit "
                        "(ports are not bound: a running server holds its own)")
    commands = parser.add_subparsers(dest="command", metavar="{serve}")
    serve = commands.add_parser("serve", help="serve a directory, no config file needed",
                                description="Serve DIR with the defaults of every setting; the flags "
                                "override a config file's keys when one is given with -c.")
    serve.add_argument("--version", action="version", version=version)
    serve.add_argument("directory", nargs="?", metavar="DIR", help="directory to serve (default: ., or the "
                       "config's baseDirectory)")
    # Each flag is a config key (SERVE_FLAGS), validated exactly as in a file: strings go through as given.
    serve.add_argument("-c", "--config", dest="serve_config", metavar="FILE", help="config file whose keys the flags override")
    serve.add_argument("--listen", metavar="ADDR", help='public address, "host:port" (listen; default '
                       '127.0.0.1:8080)')
    serve.add_argument("--workers", metavar="N", type=int, help=f"local workers (workerCount; default "
                       f"{SERVE_WORKERS} without a config file)")
    serve.add_argument("--worker-base-port", metavar="PORT", type=int, help="first worker port (workerBasePort; "
                       "default 9001)")
    serve.add_argument("--admin", metavar="ADDR", help='admin listener (status page, metrics), "host:port"')
    serve.add_argument("--check-config", dest="serve_check", action="store_true",
                       help="validate the config and flags and exit")
    return parser


# serve's flags and the config keys they give: (attribute, key, the flag's name in messages).
SERVE_FLAGS = (("directory", "baseDirectory", "directory"), ("listen", "listen", "--listen"),
               ("workers", "workerCount", "--workers"), ("worker_base_port", "workerBasePort", "--worker-base-port"),
               ("admin", "admin", "--admin"))


def config_source(args: argparse.Namespace) -> ConfigSource:
    """Where the config comes from, for the parsed command line `args`."""
    if args.command != "serve":
        return ConfigSource(Path(args.config or "gows.conf.json"))
    if args.config and args.serve_config:
        raise UsageError("gows serve: -c: give the config file once, before or after serve")
    path = args.config or args.serve_config
    flags = {}
    for attr, key, flag in SERVE_FLAGS:
        value = getattr(args, attr)
        if value is not None:
            if attr == "directory":  # as typed on the command line: relative to the working directory
                value = os.path.abspath(value)
            flags[key] = (flag, value)
    return ConfigSource(Path(path) if path else None, flags)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the gows master; returns the process exit status."""
    from .config import ConfigError, bind_configured, listen_key

    try:
        args = make_parser().parse_args(argv)
        source = config_source(args)
    except UsageError as e:
        print(e, file=sys.stderr)
        return USAGE_ERROR
    name = str(source.path) if source.path is not None else "gows serve"
    try:
        config = source.load()
    except ConfigError as e:
        print(f"{name}: {e}", file=sys.stderr)
        return USAGE_ERROR
    if args.check_config or getattr(args, "serve_check", False):
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
        arbiter = Arbiter(config, public, workers, sink, admin, tls, source=source)
        if config.pidfile is not None:
            write_pidfile(config.pidfile)
    except ConfigError as e:
        for sock in sockets:
            sock.close()
        print(f"{name}: {source.name_flag(str(e))}", file=sys.stderr)
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
