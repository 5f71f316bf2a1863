"""The kinds of the settings that name paths (baseDirectory, pidfile, log files, certificates):
resolved against the config file's directory and checked as the master will use them, with
whatever the system refuses on the way (a symlink loop, a name too long, a NUL) named in one
line like any other mistake."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .kinds import STDOUT, ConfigError, Kind, got


class _PathKind(Kind):
    """A non-empty path string, resolved against the config file's directory."""

    def resolve(self, value: Any, key: str, base: Path) -> Path:
        if not isinstance(value, str) or not value:
            raise self.fail(value, key)
        if "\0" in value:
            raise ConfigError(f"{key}: must not contain a NUL character, got {got(value)}")
        try:
            value.encode("utf-8")
            return (base / value).resolve()
        except UnicodeEncodeError:
            raise ConfigError(f"{key}: must be valid Unicode (a lone surrogate?), got {got(value)}") from None
        except RuntimeError:  # (Python < 3.13: resolve() on a symlink loop)
            raise ConfigError(f"{key}: {base / value} is a symlink loop") from None
        except OSError as e:
            raise ConfigError(f"{key}: {base / value}: {e.strerror or e}") from None

    @staticmethod
    def checked(key: str, path: Path, check: Any) -> bool:
        """`check(path)` (exists, is_dir, ...), an OSError (a name too long, EACCES on the way)
        turned into a ConfigError naming the key."""
        try:
            return check(path)
        except OSError as e:
            raise ConfigError(f"{key}: {path}: {e.strerror or e}") from None

    def existing(self, value: Any, key: str, base: Path, is_kind: Any, kind: str, access: int) -> Path:
        """The path `value` names, which must exist, be `kind` (by `is_kind`: Path.is_dir,
        Path.is_file) and be readable (os.access with `access`)."""
        path = self.resolve(value, key, base)
        if not self.checked(key, path, Path.exists):
            raise ConfigError(f"{key}: {path} does not exist")
        if not self.checked(key, path, is_kind):
            raise ConfigError(f"{key}: {path} is not {kind}")
        if not os.access(path, access):
            raise ConfigError(f"{key}: {path} is not readable")
        return path

    def schema(self):
        return {"type": "string", "minLength": 1}


class Directory(_PathKind):
    expect = "a directory path"

    def parse(self, value, key, base):
        return self.existing(value, key, base, Path.is_dir, "a directory", os.R_OK | os.X_OK)


class FilePath(_PathKind):
    """A file the master writes (log, pidfile): its directory must exist."""

    expect = "a file path"

    def parse(self, value, key, base):
        path = self.resolve(value, key, base)
        if not self.checked(key, path.parent, Path.is_dir):
            raise ConfigError(f"{key}: directory {path.parent} does not exist")
        if self.checked(key, path, Path.is_dir):
            raise ConfigError(f"{key}: {path} is a directory")
        return path


class PidFilePath(FilePath):
    """The pidfile: absent or a regular file. The master replaces it (a rename over it) and
    removes it at exit, and reads it first: a device (/dev/null), a FIFO or a socket there would
    be replaced and deleted, block the start for ever, or be read without end (/dev/zero)."""

    def parse(self, value, key, base):
        path = super().parse(value, key, base)
        if self.checked(key, path, Path.exists) and not self.checked(key, path, Path.is_file):
            raise ConfigError(f"{key}: {path} exists and is not a regular file")
        return path


class InputFile(_PathKind):
    """A file the master reads (a certificate, a key): it must exist and be readable."""

    expect = "a file path"

    def parse(self, value, key, base):
        return self.existing(value, key, base, Path.is_file, "a file", os.R_OK)


class LogTarget(Kind):
    """Where a log goes: false (off), true or "-" (stdout), or a file path."""

    expect = 'false, true (stdout), "-" (stdout) or a file path'

    def parse(self, value, key, base):
        if value is False or value is None:
            return None
        if value is True or value == "-":
            return STDOUT
        if not isinstance(value, str):
            raise self.fail(value, key)
        return FilePath().parse(value, key, base)

    def schema(self):
        return {"anyOf": [{"type": "boolean"}, {"type": "string", "minLength": 1}]}
