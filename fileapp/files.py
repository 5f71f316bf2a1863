"""Safe path resolution under a document root: URL path to an open, verified file descriptor.

Nothing outside the root is ever opened: the URL path is split without decoding it again,
dot segments are refused, and the file is opened component by component relative to directory
descriptors with O_NOFOLLOW. A path with a symlink on the way is resolved first (the link must
stay inside the root) and its real components are walked the same way, so a path swapped for a
symlink between the check and the open makes the open fail instead of escape.
"""
from __future__ import annotations

import errno
import os
import stat
from typing import NamedTuple

# Names starting with a dot are hidden; `.well-known` (RFC 8615) is the one public exception.
PUBLIC_DOT_NAMES = frozenset({".well-known"})

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
# O_NONBLOCK: a FIFO swapped in after the lstat must not block a thread on open.
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
# A directory on the way: anything else, a symlink included, fails the open itself (ENOTDIR,
# ELOOP) before any device or FIFO could be opened, so no lstat is needed first.
_WAY_FLAGS = _FILE_FLAGS | os.O_DIRECTORY
# Errors of the direct walk that a symlink on the way gives (or a file where a directory is).
_NOT_A_PLAIN_WAY = frozenset({errno.ELOOP, errno.ENOTDIR})


def hidden(name: str) -> bool:
    """Whether a path segment is hidden: a dot name other than the public ones (`name` non-empty)."""
    return name[0] == "." and name not in PUBLIC_DOT_NAMES


class _SymlinkOnTheWay(Exception):
    """The URL path walked as it is meets a symlink: it must be resolved first."""


def split_url_path(path_info: str) -> list[str] | None:
    """The path segments of a WSGI PATH_INFO, or None when the path is unacceptable.

    PATH_INFO is already percent-decoded once by the server (as latin-1); it is decoded as
    UTF-8 here and never percent-decoded again, so `%252e` stays the literal name `%2e`.
    Refused: invalid UTF-8 (overlong forms included), NUL, backslashes, `..`, hidden names.
    """
    try:
        path = path_info.encode("latin-1").decode("utf-8")
    except UnicodeError:
        return None
    if "\x00" in path or "\\" in path:
        return None
    parts = []
    for part in path.split("/"):
        if not part or part == ".":
            continue
        if hidden(part):
            return None
        parts.append(part)
    return parts


def url_path_option(value: str, where: str) -> str:
    """An option naming a URL path as it reads ("/santé"), in the form PATH_INFO holds a
    request's (its UTF-8 bytes as latin-1); refused (ValueError naming `where`) when no request's
    path could equal it: a query, a fragment, an escape, whitespace or a control character."""
    if not value.startswith("/") or any(c in "?#%" or not c.isprintable() or c.isspace()
                                        for c in value):
        raise ValueError(f"{where} must be an absolute URL path as it reads, without '?', '#', '%', "
                         f"spaces or control characters (e.g. '/static'), got {value!r}".lstrip())
    return value.encode("utf-8", "surrogatepass").decode("latin-1")


class Opened(NamedTuple):
    """A file or directory opened beneath the root: its descriptor, fstat result and real path,
    and whether the URL path led to it directly (no symlink on the way: the real path is it)."""

    fd: int
    st: os.stat_result
    path: str
    direct: bool

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.st.st_mode)


# Errors that say this process is out of a resource, not that the file is missing: such a
# request fails for now (503) rather than getting a 404 that clients and caches would keep.
_EXHAUSTED = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM})


class Exhausted(Exception):
    """A file could not be opened for lack of file descriptors or memory: try again later."""


def _unless_exhausted(e: Exception) -> None:
    """Re-raise an out-of-descriptors or out-of-memory OSError as Exhausted."""
    if isinstance(e, OSError) and e.errno in _EXHAUSTED:
        raise Exhausted(e.strerror or str(e)) from e


class Resolver:
    """Maps URL path segments to descriptors of regular files or directories inside `root`."""

    def __init__(self, root: str) -> None:
        self.root = os.path.realpath(root)
        self._prefix = self.root.rstrip("/") + "/"

    def path_of(self, parts: list[str]) -> str:
        """The path of `parts` (segments without a slash) under the root: os.path.join's, at a
        fraction of its cost (loading a file's entry makes several)."""
        return self._prefix + "/".join(parts) if parts else self.root

    def real_parts(self, parts: list[str]) -> list[str] | None:
        """The segments of the symlink-free path of `parts` relative to the root, if inside it."""
        try:
            real = os.path.realpath(os.path.join(self.root, *parts))
        except (OSError, ValueError):
            return None
        if real == self.root:
            return []
        if not real.startswith(self._prefix):
            return None
        rel = real[len(self._prefix):].split("/")
        # A link may point at a hidden name inside the root: that name stays hidden.
        if any(map(hidden, rel)):
            return None
        return rel

    def open(self, parts: list[str]) -> Opened | None:
        """Open `parts` beneath the root without following any symlink, or None if impossible.

        Only regular files and directories are opened; sockets, FIFOs and devices are absent.
        Raises Exhausted when the process is out of file descriptors or memory.
        """
        # Most URL paths have no symlink on the way: walked as they are, they cost a few
        # syscalls; resolving them first (realpath: an lstat per component from /) costs several
        # times more. A symlink met on the way sends the path through realpath.
        if all(p and "/" not in p and not hidden(p) for p in parts):
            try:
                return self._walk(parts, direct=True)
            except _SymlinkOnTheWay:
                pass
        rel = self.real_parts(parts)
        if rel is None:
            return None
        return self._walk(rel, direct=False)

    def _walk(self, names: list[str], direct: bool) -> Opened | None:
        """Open `names` one by one from the root with O_NOFOLLOW. `direct`: they are the URL
        path as it is, and a symlink on the way raises _SymlinkOnTheWay (the caller resolves
        it); else they are a real path, and a symlink swapped in since makes them absent."""
        try:
            fd = os.open(self.root, _DIR_FLAGS)
        except OSError as e:
            _unless_exhausted(e)
            return None
        try:
            for name in names[:-1]:
                try:
                    child = os.open(name, _WAY_FLAGS, dir_fd=fd)
                except OSError as e:
                    if direct and e.errno in _NOT_A_PLAIN_WAY:
                        os.close(fd)
                        raise _SymlinkOnTheWay from e
                    raise
                os.close(fd)
                fd = child
            if names:
                name = names[-1]
                lst = os.stat(name, dir_fd=fd, follow_symlinks=False)
                if not (stat.S_ISREG(lst.st_mode) or stat.S_ISDIR(lst.st_mode)):
                    os.close(fd)
                    if direct and stat.S_ISLNK(lst.st_mode):
                        raise _SymlinkOnTheWay
                    return None
                child = os.open(name, _FILE_FLAGS, dir_fd=fd)
                os.close(fd)
                fd = child
            st = os.fstat(fd)
        except (OSError, ValueError) as e:
            os.close(fd)
            _unless_exhausted(e)
            return None
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
            os.close(fd)
            return None
        return Opened(fd, st, self.path_of(names), direct)

    def may_exist(self, parts: list[str]) -> bool:
        """False when nothing is at `parts` (one lstat of the joined path): an optional name,
        like a sidecar, skipped without a walk. Only a negative answer is trusted; anything
        found is opened with `open`, which decides whether it may be served."""
        try:
            os.lstat(self.path_of(parts))
        except (FileNotFoundError, NotADirectoryError, ValueError):
            return False
        except OSError:  # (not allowed to look, say): `open` decides
            pass
        return True

    def reopen(self, path: str, dev: int, ino: int) -> tuple[int, os.stat_result] | None:
        """Reopen a file resolved earlier by its real path; None unless it is the same inode.

        The inode check makes the cheap path-based open safe: whatever an attacker swaps into
        the path, only the very file that was verified beneath the root is accepted.
        """
        try:
            fd = os.open(path, _FILE_FLAGS)
        except (OSError, ValueError) as e:
            _unless_exhausted(e)
            return None
        try:
            st = os.fstat(fd)
        except OSError:
            os.close(fd)
            return None
        if st.st_ino != ino or st.st_dev != dev or not stat.S_ISREG(st.st_mode):
            os.close(fd)
            return None
        return fd, st

    def readable(self) -> bool:
        """True when the root is a directory this process can list and traverse."""
        try:
            return stat.S_ISDIR(os.stat(self.root).st_mode) and os.access(
                self.root, os.R_OK | os.X_OK
            )
        except OSError:
            return False
