"""Who imports whom: the proxy and the socket code stay below the config layer and the operations
modules, fileapp below arbiter."""
from __future__ import annotations

import json
import socket
import subprocess

import pytest

from arbiter.config import ConfigError, bind_configured
from arbiter.sockets import ListenError, bind_listener
from support import PYTHON, python_env

pytestmark = pytest.mark.unit


def loaded_modules(statement: str) -> list[str]:
    """The modules a fresh interpreter has loaded after running `statement`."""
    code = f"import json, sys\n{statement}\nprint(json.dumps(sorted(sys.modules)))"
    result = subprocess.run([PYTHON, "-c", code], env=python_env(), capture_output=True, text=True, timeout=60,
                            check=True)
    return json.loads(result.stdout)


def test_importing_the_proxy_loads_no_part_of_the_config_layer():
    modules = loaded_modules("import arbiter.proxy")
    assert "arbiter.proxy.server" in modules
    assert [m for m in modules if m.startswith("arbiter.config")] == []


def test_importing_the_proxy_loads_no_operations_module():
    """Ops (admin, status, metrics, access log, ...) read the proxy; the hot path never loads them."""
    modules = loaded_modules("import arbiter.proxy")
    assert "arbiter.proxy.server" in modules
    assert [m for m in modules if m == "arbiter.ops" or m.startswith("arbiter.ops.")] == []


def test_fileapp_imports_nothing_of_the_master():
    modules = loaded_modules("import fileapp, fileapp.__main__, fileapp.cache")
    assert "fileapp.cache" in modules
    assert [m for m in modules if m == "arbiter" or m.startswith("arbiter.")] == []


def test_a_busy_port_is_a_listen_error_below_and_a_config_error_naming_the_key_above():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(ListenError) as below:
            bind_listener("127.0.0.1", port)
        assert not isinstance(below.value, ConfigError)
        assert str(below.value) == f"cannot listen on 127.0.0.1:{port}: address already in use"
        with pytest.raises(ConfigError) as above:
            bind_configured("127.0.0.1", port, "workers[0].port")
        assert str(above.value) == f"workers[0].port: cannot listen on 127.0.0.1:{port}: address already in use"


def _imports(path, module: str, package: str, known: set[str]) -> set[str]:
    """The project modules `path` imports when it runs (imports under `if TYPE_CHECKING:` are for
    type checkers only and never run)."""
    import ast

    found: set[str] = set()

    def visit(node) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and getattr(child.test, "id", getattr(child.test, "attr", "")) == "TYPE_CHECKING":
                for sub in child.orelse:
                    visit(sub)
                continue
            if isinstance(child, ast.Import):
                names = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    parts = package.split(".")
                    base = ".".join(parts[:len(parts) - child.level + 1] + ([base] if base else []))
                names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in child.names]
            else:
                visit(child)
                continue
            found.update(n for n in names if n in known and n != module)
    visit(ast.parse(path.read_text()))
    return found


def test_the_import_graph_of_the_master_and_fileapp_has_no_cycle():
    from support import REPO
    files = {}
    for path in sorted([*REPO.glob("arbiter/**/*.py"), *REPO.glob("fileapp/**/*.py")]):
        parts = path.relative_to(REPO).with_suffix("").parts
        is_package = parts[-1] == "__init__"
        module = ".".join(parts[:-1] if is_package else parts)
        files[module] = (path, module if is_package else ".".join(parts[:-1]))
    known = set(files)
    graph = {m: _imports(path, m, package, known) for m, (path, package) in files.items()}
    assert "arbiter.proxy.relay" in graph["arbiter.proxy.client"]  # the scan sees relative imports
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def walk(m: str) -> None:
        state[m] = 1
        path.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(n):] + [n]))
            if n not in state:
                walk(n)
        path.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            walk(m)
