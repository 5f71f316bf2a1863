"""Fixtures shared by the test modules that start real masters."""
from __future__ import annotations

import pytest

from master_support import Master


@pytest.fixture
def masters():
    """A list the test appends each Master it starts to; every one is stopped afterwards."""
    started: list[Master] = []
    yield started
    for m in started:
        m.stop()
