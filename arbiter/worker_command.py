"""What a local worker slot takes from the config, and the worker command line derived from it.

Each WorkerOptions field is declared once, with the config attribute it is read from and the
fileapp flag that passes it to the worker (none for the settings the master itself applies to
the slot: checks, back-off). from_config and worker_argv both walk that one table, so a setting
added here reaches the worker without a second copy to keep in step.
"""
from __future__ import annotations

import os
import sys
from dataclasses import MISSING, dataclass, field, fields
from operator import attrgetter
from pathlib import Path
from typing import Any

from fileapp.cache import DEFAULT_ETAG

from .config import Config


def option(source: str, flag: str | None = None, default: Any = MISSING) -> Any:
    """A WorkerOptions field read from the config attribute `source` (dotted for a section),
    passed to the worker as `flag` when one is given."""
    return field(default=default, metadata={"source": source, "flag": flag})


@dataclass(frozen=True)
class WorkerOptions:
    """Everything a local worker slot needs from the config."""

    root: Path | str = option("base_directory", "--root")
    threads: int = option("threads", "--threads")
    health_path: str = option("health_check.path", "--health-path")
    check_interval: float = option("health_check.interval")
    check_timeout: float = option("health_check.timeout")
    boot_timeout: float = option("health_check.boot_timeout")
    cache_ttl: float = option("cache.ttl", "--cache-ttl")
    cache_max_bytes: int = option("cache.max_bytes", "--cache-max-bytes")
    cache_max_file_size: int = option("cache.max_file_size", "--cache-max-file-size")
    graceful_timeout: float = option("graceful_timeout", "--graceful-timeout")
    log_level: str = option("logging.level", "--log-level")
    log_format: str = option("logging.format", "--log-format")
    backoff_initial: float = option("restart_backoff.initial")
    backoff_max: float = option("restart_backoff.max")
    min_uptime: float = option("restart_backoff.min_uptime")
    cache_etag: str = option("cache.etag", "--etag", default=DEFAULT_ETAG)

    @classmethod
    def from_config(cls, config: Config) -> "WorkerOptions":
        return cls(**{f.name: attrgetter(f.metadata["source"])(config) for f in fields(cls)})


def worker_argv(options: WorkerOptions, fd: int, host: str, port: int,
                unix_fd: int | None = None) -> list[str]:
    """The command line of one worker incarnation serving the inherited TCP socket `fd` and,
    when given, the inherited Unix socket `unix_fd` too (which the proxies use).

    No --access-log: the master logs every request it proxies."""
    argv = [sys.executable, "-m", "fileapp", "--fd", str(fd), "--host", host, "--port", str(port),
            "--parent-pid", str(os.getpid())]
    if unix_fd is not None:
        argv += ["--unix-fd", str(unix_fd)]
    for f in fields(options):
        if f.metadata["flag"] is not None:
            argv += [f.metadata["flag"], str(getattr(options, f.name))]
    return argv
