"""Handing a file body to the server in front instead of sending its bytes (zero-copy bodies).

The worker still decides everything about the response (path, security rules, representation,
conditionals, range, headers); only the bytes take the short road. gows' proxy asks for it with
`X-Gows-Handoff: <token>` (a secret the master gives its own workers in GOWS_HANDOFF_TOKEN) and
gets the response head with an empty body and `X-Gows-File`, naming the file and the identity
the worker saw (device, inode, size, mtime) and the byte range to send. The proxy opens the file
itself and sends it only if the identity still matches (open_verified), so no path is served
that the worker would have refused: a symlink swapped in, or a file replaced, moved or truncated
in between, fails the check and the proxy asks the worker for the bytes instead.
"""
from __future__ import annotations

import errno
import os
import stat
from typing import NamedTuple
from urllib.parse import quote_from_bytes, unquote_to_bytes

TOKEN_ENV = "GOWS_HANDOFF_TOKEN"
REQUEST_KEY = "HTTP_X_GOWS_HANDOFF"  # the request header, as WSGI names it
FILE_HEADER = "X-Gows-File"
# Smaller bodies go along with the head: cheaper than an open and a sendfile in the proxy.
MIN_SIZE = 32 * 1024

_PATH_FLAGS = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
_READ_FLAGS = os.O_RDONLY | os.O_CLOEXEC


class FileRef(NamedTuple):
    """A file as the worker saw it, and the byte range of it that is the response body."""

    path: bytes
    dev: int
    ino: int
    size: int
    mtime_ns: int
    offset: int
    count: int


def file_header(path: str, dev: int, ino: int, size: int, mtime_ns: int, offset: int, count: int) -> str:
    """The X-Gows-File value: the identity and range, then the percent-encoded path (last, so
    it may hold any byte)."""
    return f"{dev} {ino} {size} {mtime_ns} {offset} {count} {quote_from_bytes(os.fsencode(path), '/')}"


def parse_file_header(value: bytes) -> FileRef | None:
    """The FileRef an X-Gows-File value names; None when it is malformed."""
    fields = value.split(b" ")
    if len(fields) != 7:
        return None
    try:
        dev, ino, size, mtime_ns, offset, count = map(int, fields[:6])
    except ValueError:
        return None
    path = unquote_to_bytes(fields[6])
    if (not path.startswith(b"/") or b"\x00" in path or min(dev, ino, size, offset, count) < 0
            or offset + count > size):
        return None
    return FileRef(path, dev, ino, size, mtime_ns, offset, count)


def open_verified(ref: FileRef) -> int | None:
    """A descriptor open for reading on the file `ref` names, if it still is the very file the
    worker saw (device, inode, size and mtime; a regular file); else None.

    The path is first opened with O_PATH, which reads nothing and has no side effect even on a
    FIFO or a device swapped in; only once it is proven to be the same file is it opened for
    reading, through that very descriptor (/proc/self/fd), so it cannot be swapped in between.
    OSError (EMFILE and the like) is the caller's to handle.
    """
    try:
        pfd = os.open(ref.path, _PATH_FLAGS)
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # the last component is a symlink now
            return None
        raise
    try:
        st = os.fstat(pfd)
        if not same_file(st, ref):
            return None
        fd = os.open(f"/proc/self/fd/{pfd}", _READ_FLAGS)
    finally:
        os.close(pfd)
    return fd


def same_file(st: os.stat_result, ref: FileRef) -> bool:
    """Whether `st` is the regular file `ref` names, unchanged."""
    return (stat.S_ISREG(st.st_mode) and st.st_ino == ref.ino and st.st_dev == ref.dev
            and st.st_size == ref.size and st.st_mtime_ns == ref.mtime_ns)
