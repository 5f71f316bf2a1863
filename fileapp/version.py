"""The installed gows distribution's version, for `--version` and the status page."""
from __future__ import annotations

from importlib import metadata

try:
    VERSION = metadata.version("gows")
except metadata.PackageNotFoundError:  # running from a checkout that was never installed
    VERSION = "unknown"
