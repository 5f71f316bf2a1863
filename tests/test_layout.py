"""The arbiter's two halves: the proxy (the hot path) loads none of the operations modules."""
from __future__ import annotations

import subprocess
import sys

from support import REPO


def modules_loaded_by(statement: str) -> set[str]:
    """The arbiter modules a fresh interpreter has loaded after running `statement`."""
    script = f"{statement}\nimport sys\nprint('\\n'.join(m for m in sys.modules if m.startswith('arbiter')))"
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, check=True)
    return set(out.stdout.split())


def test_importing_the_proxy_loads_no_operations_module():
    loaded = modules_loaded_by("import arbiter.proxy")
    assert "arbiter.proxy.server" in loaded
    assert not {m for m in loaded if m == "arbiter.ops" or m.startswith("arbiter.ops.")}
