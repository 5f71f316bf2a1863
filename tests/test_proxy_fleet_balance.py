"""The master keeping kept-alive clients spread over the proxy processes (ProxyFleet.balance): which
proxy is told to hand clients over, how many at a time, and how often."""
from __future__ import annotations

import json

import pytest

from arbiter import proxies
from arbiter.config import load_data
from arbiter.proxies import BALANCE_INTERVAL, ProxyFleet
from arbiter.proxy.control import encode
from arbiter.proxy_slot import ProxySlot
from arbiter.state import WorkerTable

pytestmark = pytest.mark.unit


class Channel:
    """A control channel's sending side: the messages sent, decoded."""

    def __init__(self) -> None:
        self.sent: list[dict] = []

    def send(self, message: dict) -> None:
        self.sent.append(json.loads(encode(message)))


@pytest.fixture
def fleet(tmp_path, monkeypatch):
    (tmp_path / "www").mkdir()
    config = load_data({"baseDirectory": "www", "workerCount": 1}, tmp_path / "gows.conf.json")
    fleet = ProxyFleet(config, WorkerTable(), None, None, timing=False)  # type: ignore[arg-type]  (no process is started)
    clock = [1000.0]
    monkeypatch.setattr(proxies.time, "monotonic", lambda: clock[0])
    fleet.clock = clock  # type: ignore[attr-defined]  (the tests move it on)
    yield fleet
    fleet.close()


def holding(fleet: ProxyFleet, *clients: int) -> list[Channel]:
    """Proxies holding these many client connections each, ready; their channels."""
    channels = []
    for index, count in enumerate(clients, 1):
        slot = ProxySlot(fleet, index)
        slot.ready = True
        channel = Channel()
        slot.channel = channel  # type: ignore[assignment]
        channels.append(channel)
        slot.counters.set_gauges(client_connections=count)
        fleet.slots.append(slot)
    return channels


def told(channels: list[Channel]) -> list[int | None]:
    """How many clients each proxy was told to hand over since the last look (None: nothing)."""
    out = []
    for channel in channels:
        counts = [m["clients"] for m in channel.sent if m["op"] == "hand_over"]
        assert len(counts) <= 1
        out.append(counts[0] if counts else None)
        channel.sent.clear()
    return out


def test_a_few_clients_all_on_one_proxy_are_spread_in_one_step(fleet):
    channels = holding(fleet, 8, 0)
    fleet.balance()
    assert told(channels) == [4, None]


def test_thousands_of_clients_are_handed_over_a_bounded_step_at_a_time(fleet):
    """Each client handed over reconnects, all of a step at once: 1,500 at once (half the
    difference) wait in the backlog and may all be taken again by one proxy, swinging the
    imbalance back. A step is at most 1/64 of all clients, once a second, until the spread is
    within the slack."""
    channels = holding(fleet, 4000, 1000)
    fleet.balance()
    assert told(channels) == [78, None]  # (5000 // 64; half the difference would be 1500)
    fleet.balance()  # (not again within BALANCE_INTERVAL)
    assert told(channels) == [None, None]
    fleet.clock[0] += BALANCE_INTERVAL  # type: ignore[attr-defined]
    fleet.slots[0].counters.set_gauges(client_connections=4000 - 78)
    fleet.slots[1].counters.set_gauges(client_connections=1000 + 78)
    fleet.balance()
    assert told(channels) == [78, None]


def test_the_busiest_of_three_is_told_and_a_small_fleet_spreads_in_one_step(fleet):
    channels = holding(fleet, 900, 2000, 1900)
    fleet.balance()
    assert told(channels) == [None, 75, None]  # (4800 // 64; half the difference would be 550)
    fleet.slots.clear()
    fleet.clock[0] += BALANCE_INTERVAL  # type: ignore[attr-defined]
    channels = holding(fleet, 84, 16)  # (one proxy took a whole burst, the other one turn's acceptors)
    fleet.balance()
    assert told(channels) == [34, None]  # (half the difference: under the step of 64 at least)


def test_a_spread_within_the_slack_is_left_as_it_is(fleet):
    channels = holding(fleet, 2400, 2100)  # (300 apart: under 10% of 4500)
    fleet.balance()
    assert told(channels) == [None, None]
