"""Issue 15's compression load: a compressible 100 KB text file served brotli-compressed on the
fly against the same text with a precompressed .br sidecar, on the same gows server, in turn.

Both go through `ab -H "Accept-Encoding: br"` (no keep-alive, the ab load's requests and
concurrency). The target: on the fly reaches at least 0.9× the sidecar's req/s (report.TARGETS).
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Callable

import brotli

from . import loads
from .loads import Measurement
from .prereqs import deterministic_text

TOOL = "ab br"  # the tool column of these rows
ACCEPT = {"Accept-Encoding": "br"}
SIZE = 100_000
# (file name, row label); the sidecar file gets a .br beside it, as a site precompresses it.
ON_THE_FLY = ("text-100k.txt", "100 KB text, on the fly")
SIDECAR = ("text-100k-sidecar.txt", "100 KB text, br sidecar")
FILES = (ON_THE_FLY, SIDECAR)
KINDS = ["gows"]  # the servers that get these loads (every gows row: front cache on and off)


def prose(size: int) -> bytes:
    """`size` bytes of lines of words from a fixed vocabulary, the same on every run: text that
    compresses about as a site's HTML, CSS or JavaScript does (brotli 5 to about a third), which
    random letters (prereqs.deterministic_text) would not."""
    rng = random.Random("compress")
    words = [deterministic_text(rng.randint(2, 10), str(i)).replace(b" ", b"").replace(b"\n", b"") or b"a"
             for i in range(2000)]
    weights = [1 / rank for rank in range(1, len(words) + 1)]  # Zipf's law, as in real text
    out = bytearray()
    while len(out) < size:
        out += b" ".join(rng.choices(words, weights, k=rng.randint(4, 14))) + b"\n"
    return bytes(out[:size])


def add_files(root: Path) -> None:
    """The two text files (the same bytes) and the sidecar's .br (quality 11, as a build step makes it)."""
    text = prose(SIZE)
    for name, _ in FILES:
        (root / name).write_bytes(text)
        (root / name).chmod(0o644)
    sidecar = root / (SIDECAR[0] + ".br")
    sidecar.write_bytes(brotli.compress(text, quality=11))
    sidecar.chmod(0o644)


def planned() -> list[tuple[str, str]]:
    """The (tool, file label) of each row these loads add to a server, in the order they run."""
    return [(TOOL, label) for _, label in FILES]


def warm_up(url: Callable[[str], str], requests: int) -> None:
    """Not counted: the first request of each file compresses it (once per worker) or loads it."""
    for name, _ in FILES:
        loads.ab(url(name), min(1000, requests), 50, headers=ACCEPT)


def run(url: Callable[[str], str], requests: int, concurrency: int, repeat: int,
        observed: Callable[[Callable[[], Measurement]], Measurement] = lambda load: load()
        ) -> dict[str, list[Measurement]]:
    """`repeat` rounds of ab on each file, which goes first alternating round by round (a slow
    phase of the machine then hits both alike); every run of each label, in round order.
    `observed` runs one load (the benchmark's: noting each proxy's share and the server's CPU)."""
    runs: dict[str, list[Measurement]] = {label: [] for _, label in FILES}
    for i in range(repeat):
        for name, label in (FILES if i % 2 == 0 else FILES[::-1]):
            runs[label].append(observed(lambda: loads.ab(url(name), requests, concurrency, headers=ACCEPT)))
    return runs


def notes(kinds: list[str], requests: int, concurrency: int) -> list[str]:
    """The report's note on these rows ([] when no server gets them)."""
    if not kinds:
        return []
    return [f"{TOOL}: ab -n {requests} -c {concurrency} -H 'Accept-Encoding: br' on a {SIZE // 1000} KB "
            "text file compressed on the fly (brotli 5, once per file version, kept in the worker's cache) "
            "and on the same text with a precompressed .br sidecar (brotli 11), the two in turn; "
            f"for every {', '.join(kinds)} row, with its default compress setting"]
