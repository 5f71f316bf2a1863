"""File entries one proxy learned, passed to the others through the master (arbiter/proxy/sharing.py):
what travels, what a proxy keeps of it, the batching, and the purge rule on both sides."""
from __future__ import annotations

import asyncio
import json
import time

import pytest

from arbiter.config import load_data
from arbiter.proxies import ProxyFleet
from arbiter.proxy.cache import FrontCache
from arbiter.proxy.counters import CACHE_SHARED, CACHE_STORES
from arbiter.proxy.process import ProxyProcess
from arbiter.proxy.control import MAX_LINE, encode
from arbiter.proxy.sharing import (FLUSH_DELAY, MAX_BATCH, MAX_ENTRY_TEXT, SHARE_BACKLOG, Outbox, adopt,
                                   learned)
from arbiter.proxy_slot import ProxySlot
from arbiter.state import WorkerTable
from fileapp.handoff import FileRef

pytestmark = pytest.mark.unit

REF = FileRef(b"/srv/www/caf\xe9 big.bin", 2049, 1234, 300_000, 1_700_000_000_123_456_789, 0, 300_000,
              (2049, 99, 1_699_999_999_000_000_000, 1_699_999_999_000_000_001))
HEADERS = [(b"Content-Type", b"application/octet-stream"), (b"ETag", b'"e1"'), (b"Cache-Control", b"max-age=60"),
           (b"X-Note", b"caf\xe9")]


class FakeChannel:
    """A control channel's sending side: what was sent (decoded), and a backlog to set."""

    def __init__(self) -> None:
        self.sent: list[dict] = []
        self.backlog = 0

    def send(self, message: dict) -> None:
        self.write(encode(message))

    def write(self, line: bytes) -> None:
        self.sent.append(json.loads(line))


def _lower(headers):
    return [(n.lower(), n, v) for n, v in headers]


def _through_the_channel(entries):
    """As the control channel carries them: JSON there and back (master included)."""
    return json.loads(json.dumps({"op": "learned", "entries": entries}))["entries"]


def _learned_by(cache: FrontCache, target: bytes = b"/big.bin", ae: bytes | None = None, vary: bool = False,
                age: int = 0) -> list:
    entry = cache.store(target, ae, vary, _lower(HEADERS), b"", 60, age, REF)
    assert entry is not None
    return learned(target, ae, vary, HEADERS, 60, age, entry.born, REF)


def test_an_entry_another_proxy_learned_is_kept_as_that_proxy_keeps_it():
    theirs, ours = FrontCache(1 << 20, 1 << 20), FrontCache(1 << 20, 1 << 20)
    entries = _through_the_channel([_learned_by(theirs, age=3)])
    assert adopt(ours, entries) == 1
    mine, original = ours.get(b"/big.bin", None, time.monotonic()), theirs.entries[b"/big.bin"]
    assert mine is not None and mine is not original
    assert (mine.file, mine.head, mine.nm, mine.born, mine.expires, mine.fresh_until, mine.initial_age) == (
        original.file, original.head, original.nm, original.born, original.expires, original.fresh_until, 3)
    assert mine.directory == original.directory == REF.directory and mine.directory_confirmed
    assert ours.counts[CACHE_SHARED] == 1 and ours.counts[CACHE_STORES] == 0


def test_a_varying_entry_is_kept_under_its_encoding_class():
    theirs, ours = FrontCache(1 << 20, 1 << 20), FrontCache(1 << 20, 1 << 20)
    adopt(ours, _through_the_channel([_learned_by(theirs, ae=b"gzip, br", vary=True)]))
    assert ours.get(b"/big.bin", b"br;q=1, gzip", time.monotonic()) is not None  # (the same class)
    assert ours.get(b"/big.bin", None, time.monotonic()) is None


def test_what_this_proxy_stored_itself_is_not_replaced():
    theirs, ours = FrontCache(1 << 20, 1 << 20), FrontCache(1 << 20, 1 << 20)
    own = ours.store(b"/big.bin", None, False, _lower(HEADERS), b"", 60, 0, REF._replace(ino=5))
    assert adopt(ours, _through_the_channel([_learned_by(theirs)])) == 0
    assert ours.entries[b"/big.bin"] is own and ours.counts[CACHE_SHARED] == 0


def test_an_entry_past_its_max_age_is_not_kept_and_one_past_the_recheck_is_kept_stale():
    ours = FrontCache(1 << 20, 1 << 20, revalidate_after=5)
    now = time.monotonic()
    expired = learned(b"/old.bin", None, False, HEADERS, 60, 0, now - 61, REF)
    unchecked = learned(b"/stale.bin", None, False, HEADERS, 60, 0, now - 10, REF._replace(directory=None))
    assert adopt(ours, _through_the_channel([expired, unchecked])) == 1
    assert b"/old.bin" not in ours.entries
    stale = ours.get(b"/stale.bin", None, time.monotonic())
    assert stale is not None and not stale.servable(time.monotonic())  # a worker is asked, as for our own


def _entry(name: str) -> list:
    return learned(name.encode(), None, False, HEADERS, 60, 0, 1.0, REF)


def test_the_outbox_sends_a_batch_once_after_the_first_entry_and_at_once_when_full():
    async def scenario():
        channel = FakeChannel()
        outbox = Outbox(asyncio.get_running_loop(), channel)  # type: ignore[arg-type]
        for i in range(3):
            outbox.add(_entry(f"/{i}"))
        assert channel.sent == []  # (waiting for more)
        await asyncio.sleep(FLUSH_DELAY * 3)
        assert [[e[0] for e in m["entries"]] for m in channel.sent] == [["/0", "/1", "/2"]]
        for i in range(MAX_BATCH):
            outbox.add(_entry(f"/{i}"))
        assert len(channel.sent) == 2 and len(channel.sent[1]["entries"]) == MAX_BATCH and outbox.pending == []
        outbox.add(_entry("/forgotten"))
        outbox.drop()
        channel.backlog = SHARE_BACKLOG  # the master does not keep up: what was learned is dropped
        for i in range(MAX_BATCH + 1):
            outbox.add(_entry(f"/{i}"))
        await asyncio.sleep(FLUSH_DELAY * 3)
        return channel.sent, outbox.pending

    sent, pending = asyncio.run(scenario())
    assert len(sent) == 2 and pending == []


def test_a_message_stays_under_the_channels_line_limit_whatever_the_entries_hold():
    async def scenario():
        channel = FakeChannel()
        outbox = Outbox(asyncio.get_running_loop(), channel)  # type: ignore[arg-type]
        outbox.add(learned(b"/huge", None, False, [(b"X-Long", b"\xff" * MAX_ENTRY_TEXT)], 60, 0, 1.0, REF))
        assert outbox.pending == []  # (too big to share: its worker is asked again elsewhere)
        worst = [(b"X-Note", b"\xff" * (MAX_ENTRY_TEXT - 1000))]  # 6 bytes each in JSON
        while not channel.sent:
            outbox.add(learned(b"/f", b"\xff" * 100, False, worst, 60, 0, 1.0, REF))
        return channel.sent[0]

    message = asyncio.run(scenario())
    assert len(encode(message)) < MAX_LINE and len(message["entries"]) < MAX_BATCH


def test_a_purge_drops_what_waits_to_be_sent_before_the_proxy_confirms_it():
    async def scenario():
        process = ProxyProcess(1, None, None, None)  # type: ignore[arg-type]
        channel = process.channel = FakeChannel()  # type: ignore[assignment]
        process.outbox = Outbox(asyncio.get_running_loop(), channel)  # type: ignore[arg-type]
        process.outbox.add(_entry("/learned-before-the-purge"))
        process._on_message({"op": "purge", "seq": 7})
        await asyncio.sleep(FLUSH_DELAY * 3)
        return channel.sent

    assert asyncio.run(scenario()) == [{"op": "ack", "seq": 7}]


@pytest.fixture
def fleet(tmp_path):
    (tmp_path / "www").mkdir()
    config = load_data({"baseDirectory": "www", "workerCount": 1}, tmp_path / "gows.conf.json")
    fleet = ProxyFleet(config, WorkerTable(), None, None, timing=False)  # type: ignore[arg-type]  (no process is started)
    yield fleet
    fleet.close()


def test_the_master_passes_entries_on_only_from_a_proxy_that_confirmed_the_last_purge(fleet):
    for index in (1, 2, 3):
        slot = ProxySlot(fleet, index)
        slot.channel = FakeChannel()  # type: ignore[assignment]
        fleet.slots.append(slot)
    one, two, three = fleet.slots

    def got() -> list[list]:
        return [slot.channel.sent for slot in fleet.slots]  # type: ignore[union-attr]

    message = {"op": "learned", "entries": [["an entry"]]}
    one._on_message(message)
    assert got() == [[], [message], [message]]
    fleet.purge_seq += 1  # a purge on its way: what proxy 1 sends before its ack may be older
    one._on_message(message)
    assert got() == [[], [message], [message]]
    one._on_message({"op": "ack", "seq": fleet.purge_seq})
    three.channel.backlog = SHARE_BACKLOG  # type: ignore[union-attr]  (not keeping up: spared)
    one._on_message(message)
    assert got() == [[], [message] * 2, [message]]


def test_only_a_proxy_with_another_beside_it_is_told_to_send_what_it_learns(fleet):
    assert fleet.settings()["share_learned"] is False  # (no other proxy: the work would be wasted)
    fleet.slots.append(ProxySlot(fleet, 1))
    assert fleet.settings()["share_learned"] is False
    fleet.slots.append(ProxySlot(fleet, 2))
    assert fleet.settings()["share_learned"] is True
    assert fleet.settings()["proxies"] == 2  # (each starts the balancer's first at its own lane)
