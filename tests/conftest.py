"""Fixtures shared by the test modules that start real masters."""
from __future__ import annotations

import logging

import pytest

from master_support import Master
from proxy_harness import Worker


@pytest.fixture
def masters():
    """A list the test appends each Master it starts to; every one is stopped afterwards."""
    started: list[Master] = []
    yield started
    for m in started:
        m.stop()


@pytest.fixture(scope="module")
def workers():
    """Two test upstreams (tests/proxy_upstream_app.py under gunicorn), shared by a module's tests."""
    ws = [Worker(), Worker()]
    yield ws
    for w in ws:
        w.stop()


@pytest.fixture(autouse=True)
def root_log_level_restored():
    """A test that configures the master's logging (LogSink) leaves the root logger's level as it
    found it: at INFO it would let other tests' log captures see records they do not expect."""
    root = logging.getLogger()
    level = root.level
    yield
    root.setLevel(level)
