"""Handing a file body to the server in front instead of sending its bytes (zero-copy bodies).

The worker still decides everything about the response (path, security rules, representation,
conditionals, range, headers); only the bytes take the short road. gows' proxy asks for it with
`X-Gows-Handoff: <token>` (a secret the master gives its own workers in GOWS_HANDOFF_TOKEN) and
gets the response head with an empty body and `X-Gows-File`, naming the file and the identity
the worker saw (device, inode, size, mtime), the byte range to send and, when the URL maps to the
file without a symlink, its directory's stamp from before the decision (with which the proxy's
front cache keeps the name while the directory is unchanged). The proxy opens the file
itself and sends it only if the identity still matches (open_verified), so no path is served
that the worker would have refused: a symlink swapped in, or a file replaced, moved or truncated
in between, fails the check and the proxy asks the worker for the bytes instead.

Embedded behind nginx or Apache, fileapp hands bodies off the same way with the header those
servers read (SendfileHeader): X-Accel-Redirect names a URI under an internal nginx location
mapped to the root, X-Sendfile the file's absolute path (Apache's mod_xsendfile).
"""
from __future__ import annotations

import errno
import os
import stat
import time
from typing import Mapping, NamedTuple
from urllib.parse import quote_from_bytes, unquote_to_bytes

TOKEN_ENV = "GOWS_HANDOFF_TOKEN"
REQUEST_KEY = "HTTP_X_GOWS_HANDOFF"  # the request header, as WSGI names it
FILE_HEADER = "X-Gows-File"
# Smaller bodies go along with the head: cheaper than an open and a sendfile in the proxy.
MIN_SIZE = 32 * 1024

_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC


DirectoryStamp = tuple[int, int, int, int]  # (device, inode, mtime_ns, ctime_ns)
# File times advance in steps (a clock tick; a second or two on some filesystems): a directory
# changed less than this long ago may change again with the same times, so it has no stamp yet.
STAMP_SETTLE = 2.0


class FileRef(NamedTuple):
    """A file as the worker saw it, and the byte range of it that is the response body.

    `directory`: the stamp of the file's directory taken before the worker decided that the URL
    maps to this file, when it maps without a symlink on the way; while the directory keeps that
    stamp, the URL still maps to the same file. None: a symlink led there (repointing it changes
    another directory), so only a worker can tell where the URL leads now."""

    path: bytes
    dev: int
    ino: int
    size: int
    mtime_ns: int
    offset: int
    count: int
    directory: DirectoryStamp | None = None


def directory_stamp(directory: str | bytes) -> DirectoryStamp | None:
    """What changes when a name is added to, removed from or renamed in `directory`, or it is
    replaced or its permissions change; None when it is gone, or changed less than STAMP_SETTLE
    seconds ago (by the kernel's ctime, which no one can set back)."""
    try:
        st = os.stat(directory)
    except (OSError, ValueError):
        return None
    if time.time_ns() - st.st_ctime_ns < STAMP_SETTLE * 1e9:
        return None
    return st.st_dev, st.st_ino, st.st_mtime_ns, st.st_ctime_ns


def file_header(path: str, dev: int, ino: int, size: int, mtime_ns: int, offset: int, count: int,
                directory: DirectoryStamp | None = None) -> str:
    """The X-Gows-File value: the identity and range, the directory's stamp ("-": none), then
    the percent-encoded path (last, so it may hold any byte)."""
    stamp = "-" if directory is None else ":".join(map(str, directory))
    return f"{dev} {ino} {size} {mtime_ns} {offset} {count} {stamp} {quote_from_bytes(os.fsencode(path), '/')}"


def parse_file_header(value: bytes) -> FileRef | None:
    """The FileRef an X-Gows-File value names; None when it is malformed."""
    fields = value.split(b" ")
    if len(fields) != 8:
        return None
    try:
        dev, ino, size, mtime_ns, offset, count = map(int, fields[:6])
        directory = None if fields[6] == b"-" else tuple(map(int, fields[6].split(b":")))
    except ValueError:
        return None
    path = unquote_to_bytes(fields[7])
    if (not path.startswith(b"/") or b"\x00" in path or min(dev, ino, size, offset, count) < 0
            or offset + count > size or directory is not None and len(directory) != 4):
        return None
    return FileRef(path, dev, ino, size, mtime_ns, offset, count, directory)  # type: ignore[arg-type]


def open_verified(ref: FileRef) -> int | None:
    """A descriptor open for reading on the file `ref` names, if it still is the very file the
    worker saw (device, inode, size and mtime; a regular file); else None.

    Opened as the worker's resolver opens files (fileapp.files): never following a symlink in
    the last component, never blocking on a FIFO swapped in, never taking a terminal; then the
    open descriptor itself is checked, so whatever the path led to, only that file is sent.
    OSError (EMFILE and the like) is the caller's to handle.
    """
    try:
        fd = os.open(ref.path, _OPEN_FLAGS)
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        return None
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENXIO):  # a symlink now; a FIFO with no writer
            return None
        raise
    try:
        if same_file(os.fstat(fd), ref):
            return fd
    except OSError:
        pass
    os.close(fd)
    return None


def same_file(st: os.stat_result, ref: FileRef) -> bool:
    """Whether `st` is the regular file `ref` names, unchanged."""
    return (stat.S_ISREG(st.st_mode) and st.st_ino == ref.ino and st.st_dev == ref.dev
            and st.st_size == ref.size and st.st_mtime_ns == ref.mtime_ns)


X_ACCEL_REDIRECT = "X-Accel-Redirect"  # nginx: a URI under an internal location
X_SENDFILE = "X-Sendfile"  # Apache's mod_xsendfile: the file's absolute path
SENDFILE_HEADERS = (X_ACCEL_REDIRECT, X_SENDFILE)
DEFAULT_SENDFILE_PREFIX = "/_fileapp/"
# Request headers nginx and Apache would evaluate once more after the hand-off, against
# validators of their own (nginx's ETag is not fileapp's: If-Match would get a 412 from nginx
# that fileapp had passed). Such requests are answered by fileapp from start to end.
_REDECIDED = ("HTTP_RANGE", "HTTP_IF_RANGE", "HTTP_IF_MATCH", "HTTP_IF_NONE_MATCH",
              "HTTP_IF_MODIFIED_SINCE", "HTTP_IF_UNMODIFIED_SINCE")
_BAD_PREFIX_CHARS = frozenset("?#%\\") | {chr(c) for c in range(33)} | {chr(127)}


def handed_off_head(headers: list[tuple[str, str]],
                    handoff: tuple[str, str]) -> list[tuple[str, str]]:
    """The head of a handed-off response: `headers` for an empty body, less what the server in
    front adds itself (nginx its own Accept-Ranges: a second would repeat it), and `handoff`."""
    drop = "Accept-Ranges" if handoff[0] == X_ACCEL_REDIRECT else None
    out = [(k, "0") if k == "Content-Length" else (k, v) for k, v in headers if k != drop]
    out.append(handoff)
    return out


class SendfileHeader:
    """The header by which fileapp, behind nginx or Apache, hands them a file body to send.

    Both servers drop Content-Encoding (mod_xsendfile) or most upstream headers (nginx) and
    decide conditionals and ranges themselves, so only what needs none of that is handed off:
    a full 200 of an identity representation to a request with no Range and no precondition.
    """

    def __init__(self, header: str, root: str, prefix: str | None = None) -> None:
        if header not in SENDFILE_HEADERS:
            raise ValueError(f"sendfile_header must be one of {', '.join(SENDFILE_HEADERS)}, "
                             f"got {header!r}")
        if prefix is not None and header != X_ACCEL_REDIRECT:
            raise ValueError(f"sendfile_prefix applies to {X_ACCEL_REDIRECT} only")
        prefix = DEFAULT_SENDFILE_PREFIX if prefix is None else prefix
        if (not prefix.startswith("/") or not prefix.endswith("/") or "/../" in prefix + "/"
                or "/./" in prefix or any(c in _BAD_PREFIX_CHARS for c in prefix)):
            raise ValueError("sendfile_prefix must be a plain URI path starting and ending with"
                             f" '/' (the internal nginx location, e.g. {DEFAULT_SENDFILE_PREFIX!r}),"
                             f" got {prefix!r}")
        self.name = header
        self._root = os.fsencode(root.rstrip("/") + "/")
        self._lead = os.fsencode(prefix) if header == X_ACCEL_REDIRECT else self._root

    @staticmethod
    def takes(environ: Mapping[str, object], headers: list[tuple[str, str]]) -> bool:
        """Whether a full 200 with `headers` to this request may be handed off."""
        return (not any(key in environ for key in _REDECIDED)
                and not any(name == "Content-Encoding" for name, _ in headers))

    def header(self, path: str) -> tuple[str, str] | None:
        """The header naming the file at the real path `path`, percent-encoded (nginx decodes
        the URI, mod_xsendfile the path: XSendFileUnescape is on by default); None for a path
        outside the root, which is never handed off."""
        raw = os.fsencode(path)
        if not raw.startswith(self._root):
            return None
        return self.name, quote_from_bytes(self._lead + raw[len(self._root):], "/")


def sendfile_header_for(header: str | None, root: str,
                        prefix: str | None) -> SendfileHeader | None:
    """create_app's sendfile_header and sendfile_prefix options checked (ValueError); None
    when no server in front is to send bodies."""
    if header is None:
        if prefix is not None:
            raise ValueError(f"sendfile_prefix needs sendfile_header={X_ACCEL_REDIRECT!r}")
        return None
    return SendfileHeader(header, root, prefix)
