"""The multi-host tests' hosts: network namespaces on a bridge (benchmarks/netns.py, which the
hosts bench shares), and the fixture that gives a test its own network and removes it after,
also when the test fails."""
from __future__ import annotations

import os
from typing import Iterator

import pytest

from benchmarks.netns import ADDRESS_RANGE, Host, Network, inside, remove_leftovers, thread_pool

__all__ = ["ADDRESS_RANGE", "Host", "Network", "inside", "remove_leftovers", "thread_pool", "network"]


@pytest.fixture(scope="module")
def network() -> Iterator[Network]:
    """A bridge of this module's own (leftovers of crashed runs removed first); hosts are added
    with `network.add(name)`. Root only: CI runs the tests as root, and nothing is skipped."""
    assert os.geteuid() == 0, "the multi-host tests make network namespaces: run them as root (CI does)"
    remove_leftovers()
    net = Network()
    try:
        yield net
    finally:
        net.close()
