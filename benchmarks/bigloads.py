"""Issue 12's loads, the road past the front cache: big downloads, judged in MB/s, and many files
whose total is 4× the front cache, judged in req/s.

Both run on files `prereqs.add_big_files` writes into the run's document root. A download row's
ratios compare bytes per second (report.rate), since a 100 MiB response completes only a few
times a second and wrk counts the bytes of responses still under way.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

from . import loads
from .loads import DOWNLOAD_CONNECTIONS, DOWNLOAD_TIMEOUT, DOWNLOAD_TOOL, FILES_TOOL, Measurement
from .prereqs import DOWNLOADS, FileSet
from .servers import NAMES, Running

# The many-files load holds as many connections as the 1 KiB wrk load.
FILES_CONNECTIONS = 100


def planned(files: FileSet) -> list[tuple[str, str]]:
    """The (tool, file label) of each row these loads add to a server, in the order they run."""
    return [(DOWNLOAD_TOOL, label) for _, _, label in DOWNLOADS] + [(FILES_TOOL, files.label)]


def runs(server: Running, files: FileSet, seconds: int, workdir: Path
         ) -> Iterator[tuple[str, str, Callable[[], Measurement]]]:
    """Each load as (tool, file label, a function running it once against `server`); the Lua
    script of the many-files load is written to `workdir`."""
    for name, _, label in DOWNLOADS:
        yield DOWNLOAD_TOOL, label, lambda name=name: loads.wrk(
            server.url(name), DOWNLOAD_CONNECTIONS, seconds, timeout=DOWNLOAD_TIMEOUT)
    workdir.mkdir(parents=True, exist_ok=True)
    script = workdir / "many-files.lua"
    script.write_text(loads.wrk_files_script(["/" + name for name in files.names]))
    yield FILES_TOOL, files.label, lambda: loads.wrk(server.url(""), FILES_CONNECTIONS, seconds, script=script)


def describe(m: Measurement, tool: str) -> str:
    """The figures of a progress line: MB/s for a download, req/s otherwise, then the failures."""
    speed = f"{mb_per_s(m):,.0f} MB/s ({m.rps:,.1f} req/s)" if tool == DOWNLOAD_TOOL else f"{m.rps:,.0f} req/s"
    return f"{speed}, p99 {m.p99_ms:g} ms, {m.failed} socket errors, {m.non2xx} non-2xx"


def mb_per_s(m: Measurement) -> float:
    """wrk's Transfer/sec in its own MB (2**20 bytes), as wrk prints it."""
    return m.transfer_kbs / 1024


def notes(kinds: list[str], files: FileSet, seconds: int) -> list[str]:
    """The report's notes on these loads ([] when no server gets them)."""
    if not kinds:
        return []
    sizes = ", ".join(label for _, _, label in DOWNLOADS)
    return [
        f"{DOWNLOAD_TOOL}: wrk -t1 -c{DOWNLOAD_CONNECTIONS} -d{seconds}s --timeout={DOWNLOAD_TIMEOUT}s --latency "
        f"on a {sizes} file of random bytes (keep-alive), judged in MB/s (wrk's Transfer/sec, MB = 2^20 bytes, "
        "counting responses still under way); ratios of these rows are MB/s over MB/s",
        f"{FILES_TOOL}: wrk -t1 -c{FILES_CONNECTIONS} -d{seconds}s --latency with a Lua script requesting one of "
        f"{files.count} distinct files of {files.size // 1024} KiB ({files.total // 2**20} MiB, "
        f"{files.total / files.front_cache:g}× gows' default front cache of {files.front_cache // 2**20} MiB) "
        "at random, uniformly, the same seeded sequence on every server; no warm-up",
        f"both for {', '.join(NAMES[k] for k in kinds)}, before the many-clients load",
    ]
