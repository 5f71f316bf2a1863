"""Where the master's config comes from: a file, command-line flags (`gows serve`), or both.

Flags are overrides of the file's JSON keys, applied before validation, so a flag is checked
exactly as the same key in a file (one declaration, one set of messages); an error about a key a
flag gave names the flag. The master loads its source again on every HUP, so flags keep
overriding the file across reloads instead of being lost to the first one.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .kinds import ConfigError
from .load import load_data, read
from .settings import Config

SERVE_WORKERS = 2  # local workers of `gows serve` without a config file (as the bundled gows.conf.json)

# A flag's key replaces these keys of the file: each pair are two forms of one setting.
_REPLACES = {"listen": ("masterPort",), "workerCount": ("workers",)}


@dataclass(frozen=True)
class ConfigSource:
    """A config file (None: none) and the JSON keys given as flags over it, each with its flag's
    name for messages (`{"listen": ("--listen", "127.0.0.1:8000")}`)."""

    path: Path | None = None
    flags: dict[str, tuple[str, Any]] = field(default_factory=dict)

    def describe(self) -> str:
        """What the status page shows as the config: the file, and the flags over it."""
        given = " ".join(f"{flag} {value}" if flag.startswith("-") else str(value)
                         for flag, value in self.flags.values())
        if self.path is None:
            return f"gows serve {given}".rstrip()
        return str(self.path.resolve()) + (f" with {given}" if given else "")

    def load(self) -> Config:
        """The validated config (ConfigError naming the key, or the flag that gave it)."""
        if self.path is not None:
            raw = read(self.path)
            if not isinstance(raw, dict):
                raise ConfigError(f"must be a JSON object, got {type(raw).__name__}")
            source = self.path
        else:
            raw = {"baseDirectory": os.getcwd(), "workerCount": SERVE_WORKERS}
            source = Path(os.getcwd(), "gows serve")  # relative paths resolve against the working directory
        raw = dict(raw)
        for key, (_, value) in self.flags.items():
            for other in _REPLACES.get(key, ()):
                raw.pop(other, None)
            raw[key] = value
        try:
            return load_data(raw, source)
        except ConfigError as e:
            raise ConfigError(self.name_flag(str(e))) from None

    def name_flag(self, message: str) -> str:
        """`message` (a ConfigError's "key: problem") naming the flag instead when a flag gave the key."""
        key, sep, rest = message.partition(":")
        if sep and key in self.flags:
            return f"{self.flags[key][0]}:{rest}"
        return message
