"""Fixtures shared by the test modules, and the rule that every test says its kind."""
from __future__ import annotations

import logging
import socket
from pathlib import Path

import pytest

from browser_support import require_chromium
from master_support import Master
from proxy_harness import Worker


KINDS = ("unit", "integration", "browser")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Refuse a test without a kind marker: it would silently drop out of `make test-unit`."""
    unmarked = sorted({item.nodeid.split("::")[0] for item in items
                       if not any(item.get_closest_marker(kind) for kind in KINDS)})
    if unmarked:
        raise pytest.UsageError(f"set `pytestmark = pytest.mark.<{'|'.join(KINDS)}>` in {', '.join(unmarked)}")


@pytest.fixture(scope="session")
def chromium() -> str:
    """The browser of the browser tests (browser_support), once it and its driver are there."""
    return require_chromium()


@pytest.fixture
def masters():
    """A list the test appends each Master it starts to; every one is stopped afterwards."""
    started: list[Master] = []
    yield started
    for m in started:
        m.stop()


@pytest.fixture
def site(tmp_path: Path) -> Path:
    """A small document root (a.txt, b.txt) for the admin tests; a module that needs another
    tree defines its own `site`."""
    root = tmp_path / "www"
    root.mkdir()
    (root / "a.txt").write_text("alpha\n")
    (root / "b.txt").write_text("bravo!\n")
    return root


@pytest.fixture(scope="module")
def workers():
    """Two test upstreams (tests/proxy_upstream_app.py under gunicorn), shared by a module's tests."""
    with Worker() as a, Worker() as b:
        yield [a, b]


@pytest.fixture
def peers():
    """A connected socket pair: the server's side, then the client's."""
    server, client = socket.socketpair()
    yield server, client
    server.close()
    client.close()


@pytest.fixture(autouse=True)
def root_log_level_restored():
    """A test that configures the master's logging (LogSink) leaves the root logger's level as it
    found it: at INFO it would let other tests' log captures see records they do not expect."""
    root = logging.getLogger()
    level = root.level
    yield
    root.setLevel(level)
