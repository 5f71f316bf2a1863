"""Which interpreter the Makefile makes the venv with (`make -n`: nothing is run)."""
import os
import platform
import subprocess

import pytest

from support import REPO

pytestmark = pytest.mark.unit


def venv_command(tmp_path, *assignments: str) -> str:
    """The command `make` would run first to create a venv at tmp_path/venv."""
    venv = tmp_path / "venv"
    # (as a fresh `make` would be run: not as the sub-make of `make test`)
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHON", "VENV", "MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    out = subprocess.run(["make", "--no-print-directory", "-n", f"VENV={venv}", *assignments,
                          str(venv / "bin" / "python")],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=60, check=True)
    return out.stdout.splitlines()[0].replace(str(venv), "VENV")


def system_python_makes_venvs() -> bool:
    """Whether /usr/bin/python3 is 3.10 or newer and has venv and ensurepip (Debian: python3-venv)."""
    if platform.system() != "Linux" or not os.access("/usr/bin/python3", os.X_OK):
        return False
    probe = "import sys, venv, ensurepip; sys.exit(sys.version_info < (3, 10))"
    return subprocess.run(["/usr/bin/python3", "-c", probe], capture_output=True, timeout=60).returncode == 0


def test_the_venv_is_made_with_the_systems_python3_when_it_can_make_one(tmp_path):
    expected = "/usr/bin/python3" if system_python_makes_venvs() else "python3"
    assert venv_command(tmp_path) == f"{expected} -m venv VENV"


def test_PYTHON_chooses_the_interpreter(tmp_path):
    assert venv_command(tmp_path, "PYTHON=python3.99") == "python3.99 -m venv VENV"
