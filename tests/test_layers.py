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
