"""What a run needs before any server starts: the load tools and peers, file limits, a document root."""
from __future__ import annotations

import hashlib
import importlib.util
import os
import random
import resource
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from arbiter.config import FrontCacheConfig, configured

# Debian package that provides each command.
PACKAGES = {"ab": "apache2-utils", "wrk": "wrk", "apache2": "apache2", "nginx": "nginx", "openssl": "openssl"}
# pip distribution that provides each importable module.
PYTHON_MODULES = {"gunicorn": "gunicorn", "whitenoise": "whitenoise", "werkzeug": "werkzeug", "matplotlib": "matplotlib"}

# The files every server serves: (URL name, size in bytes, label in the table).
FILES = [("1k.txt", 1024, "1 KiB"), ("150k.txt", 150_000, "150 KB")]
MIB = 2**20
# Big downloads (issue 12), same shape: random bytes written out (no sparse holes a server could
# send without reading the disk), far above the front cache's object limit (1 MiB).
DOWNLOADS = [("10m.bin", 10 * MIB, "10 MiB"), ("100m.bin", 100 * MIB, "100 MiB")]


@dataclass(frozen=True)
class FileSet:
    """The many-files load's files (issue 12): `count` files of `size` random bytes in `directory`."""

    directory: str
    count: int
    size: int
    front_cache: int  # gows' default front cache budget, which the set outgrows

    @property
    def total(self) -> int:
        """Bytes of the whole set."""
        return self.count * self.size

    @property
    def label(self) -> str:
        """The file column of its rows: `4096 × 64 KiB`."""
        return f"{self.count} × {self.size // 1024} KiB"

    @property
    def names(self) -> list[str]:
        """Each file's path under the document root, `many/0000.bin` ..."""
        digits = len(str(self.count - 1))
        return [f"{self.directory}/{i:0{digits}d}.bin" for i in range(self.count)]


def many_files(multiple: int = 4, size: int = 64 * 1024) -> FileSet:
    """Files of `size` bytes whose total is `multiple` × gows' default front cache (frontCache.maxBytes
    as arbiter/config declares it: 64 MiB, so 4096 files of 64 KiB). One size, below both the front
    cache's and the workers' per-object limits, so that only the budget keeps a file out of a cache."""
    budget = configured(FrontCacheConfig).max_bytes
    return FileSet("many", multiple * budget // size, size, budget)


class MissingPrerequisite(Exception):
    """The run cannot go on without something the user must install (the CLI exits 2 with the message)."""


def which(command: str) -> str | None:
    """Find a command on PATH or in the sbin directories, where Debian puts the servers."""
    return shutil.which(command) or shutil.which(command, path="/usr/sbin:/sbin:/usr/local/sbin")


def version(argv: list[str]) -> str:
    """First line a tool prints about its version (for the report's notes)."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    lines = (done.stdout + done.stderr).strip().splitlines()
    line = next((l for l in lines if any(ch.isdigit() for ch in l)), "?")
    return line.removeprefix("This is ").split(" <$")[0].split(" Copyright")[0].strip()


def ensure_tools(commands: list[str], log=print) -> dict[str, str]:
    """Return {command: path}; install the missing ones with apt-get when root, else exit 2 saying how."""
    missing = [c for c in commands if which(c) is None]
    if missing:
        packages = sorted({PACKAGES[c] for c in missing})
        hint = "apt-get install -y --no-install-recommends " + " ".join(packages)
        if os.geteuid() != 0 or which("apt-get") is None:
            raise MissingPrerequisite(f"missing {', '.join(missing)}; install them as root with:\n  {hint}")
        log(f"installing {' '.join(packages)} with apt-get")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        # Another apt-get may hold the dpkg lock (other jobs on the machine): wait for it, bounded.
        wait_lock = ["-o", "DPkg::Lock::Timeout=300", "-q"]
        for args in (["apt-get", "update", *wait_lock],
                     ["apt-get", "install", "-y", "--no-install-recommends", *wait_lock, *packages]):
            if subprocess.run(args, env=env, stdout=subprocess.DEVNULL).returncode != 0:
                raise MissingPrerequisite(f"`{' '.join(args)}` failed; install by hand:\n  {hint}")
        still = [c for c in missing if which(c) is None]
        if still:
            raise MissingPrerequisite(f"still missing after apt-get: {', '.join(still)}")
    return {c: which(c) for c in commands}  # type: ignore[misc]


def ensure_python_modules(modules: list[str]) -> None:
    """Exit 2 naming the pip packages to install when a peer or the chart library is missing."""
    missing = [PYTHON_MODULES[m] for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise MissingPrerequisite(
            f"missing Python packages: {', '.join(missing)}; install with:\n"
            f"  {sys.executable} -m pip install {' '.join(missing)}   (or: pip install -e '.[bench]')"
        )


def raise_open_file_limit(wanted: int = 65536) -> int:
    """Raise the soft open file limit towards `wanted` (up to the hard limit) and return it: `ab -c 500`,
    `wrk -c5000` and the servers they talk to need more descriptors than the usual 1024 (children inherit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return sys.maxsize
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        return target
    return soft


def deterministic_text(size: int, seed: str) -> bytes:
    """`size` bytes of printable text that are the same on every run (so runs are comparable)."""
    alphabet = b"abcdefghijklmnopqrstuvwxyz      \n"
    out = bytearray()
    block = hashlib.sha256(seed.encode()).digest()
    while len(out) < size:
        block = hashlib.sha256(block).digest()
        out.extend(alphabet[b % len(alphabet)] for b in block)
    return bytes(out[:size])


def make_docroot(base: Path) -> Path:
    """Create the document root under `base`, readable by the servers' unprivileged users."""
    root = base / "www"
    root.mkdir()
    for name, size, _ in FILES:
        (root / name).write_bytes(deterministic_text(size, name))
    # Apache and nginx workers run as www-data: every directory up to the files must be traversable.
    for path in (base, root):
        path.chmod(0o755)
    for name, _, _ in FILES:
        (root / name).chmod(0o644)
    return root


def write_random(path: Path, size: int, rng: random.Random, chunk: int = MIB) -> None:
    """`size` bytes from `rng`, written out in `chunk`s, readable by the servers' users."""
    with open(path, "wb") as f:
        for done in range(0, size, chunk):
            f.write(rng.randbytes(min(chunk, size - done)))
    path.chmod(0o644)


def add_big_files(root: Path, files: FileSet) -> None:
    """The issue-12 loads' files under `root`: DOWNLOADS and `files`, the same bytes on every run
    (seeded), about 370 MiB on disk."""
    for name, size, _ in DOWNLOADS:
        write_random(root / name, size, random.Random(name))
    (root / files.directory).mkdir()
    (root / files.directory).chmod(0o755)
    rng = random.Random(files.directory)
    for name in files.names:
        write_random(root / name, files.size, rng)
