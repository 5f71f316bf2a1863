"""The suite's own import rules: helpers come one way (`from support import ...`; through the
`tests` package they would load a second copy of each module, with its own state), and no
test module imports another (what tests share lives in conftest.py and the support modules)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

TESTS = Path(__file__).resolve().parent


def imported_modules(path: Path) -> set[str]:
    """The absolute module names `path` imports, wherever in the file."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
    return names


def breaches(directory: Path) -> dict[str, list[str]]:
    """{file: [imports that break the rules]} for the Python files in `directory`."""
    found = {}
    for path in sorted(directory.glob("*.py")):
        bad = sorted(name for name in imported_modules(path)
                     if name.split(".")[0] == "tests" or name.split(".")[0].startswith("test_"))
        if bad:
            found[path.name] = bad
    return found


def test_helpers_come_one_way_and_no_test_module_imports_another():
    assert breaches(TESTS) == {}
