"""Workers by DNS name (arbiter/resolve.py): every address a member, vanished ones drained,
a failing resolution keeps what the name had."""
import asyncio
from types import SimpleNamespace

import pytest

from arbiter import resolve
from arbiter.addresses import WorkerAddress
from arbiter.state import WorkerState, WorkerTable

pytestmark = pytest.mark.unit


class Checker:
    def __init__(self) -> None:
        self.syncs = 0

    def sync(self) -> None:
        self.syncs += 1


def config(*names: str) -> SimpleNamespace:
    workers = [WorkerAddress(n, 8080, False, f"workers[{i}].port", named=True) for i, n in enumerate(names)]
    return SimpleNamespace(workers=[WorkerAddress("198.18.0.9", 8080, False, "x"), *workers], resolve_interval=3600)


def run_with(answers: dict, steps):
    async def fake(name: str, port: int) -> set[str]:
        answer = answers[name]
        if isinstance(answer, OSError):
            raise answer
        return set(answer)

    async def main():
        table = WorkerTable()
        table.add(WorkerState("198.18.0.9", 8080, local=False))  # a worker given by address
        named = resolve.NamedUpstreams(table, Checker())
        try:
            await steps(table, named)
        finally:
            await named.close()

    original = resolve.addresses
    resolve.addresses = fake
    try:
        asyncio.run(main())
    finally:
        resolve.addresses = original


def members(table: WorkerTable) -> set[tuple[str | None, str]]:
    return {(w.name, w.host) for w in table if w.name}


def test_every_address_of_a_name_is_a_member_and_a_vanished_one_leaves_the_table():
    answers = {"nodes.test": ["198.18.0.1", "198.18.0.2", "198.18.0.3"]}

    async def steps(table, named):
        await named.configure(config("nodes.test"))
        assert members(table) == {("nodes.test", f"198.18.0.{i}") for i in (1, 2, 3)}
        assert all(not w.up and not w.local for w in table if w.name)  # up once their checks pass
        kept = table.get("198.18.0.2", 8080)
        answers["nodes.test"] = ["198.18.0.2", "198.18.0.3"]
        await named.refresh()
        assert members(table) == {("nodes.test", "198.18.0.2"), ("nodes.test", "198.18.0.3")}
        assert table.get("198.18.0.2", 8080) is kept  # its state (up, counters) stays with it
        assert table.get("198.18.0.9", 8080) is not None  # the address-given worker is untouched

    run_with(answers, steps)


def test_a_name_that_does_not_resolve_is_no_error_and_keeps_the_members_it_had(caplog):
    answers = {"nodes.test": OSError(-2, "Name or service not known")}

    async def steps(table, named):
        await named.configure(config("nodes.test"))
        assert members(table) == set()
        answers["nodes.test"] = ["198.18.0.1"]
        await named.refresh()
        assert members(table) == {("nodes.test", "198.18.0.1")}
        answers["nodes.test"] = OSError(-3, "Temporary failure in name resolution")
        await named.refresh()
        assert members(table) == {("nodes.test", "198.18.0.1")}

    run_with(answers, steps)
    assert "cannot resolve 'nodes.test'" in caplog.text


def test_an_address_already_a_worker_is_not_added_twice_and_a_name_dropped_from_the_config_leaves():
    answers = {"a.test": ["198.18.0.9", "198.18.0.1"], "b.test": ["198.18.0.2"]}

    async def steps(table, named):
        await named.configure(config("a.test", "b.test"))
        assert members(table) == {("a.test", "198.18.0.1"), ("b.test", "198.18.0.2")}
        assert table.get("198.18.0.9", 8080).name == ""
        await named.configure(config("a.test"))
        assert members(table) == {("a.test", "198.18.0.1")}

    run_with(answers, steps)


def test_a_name_yielding_thousands_of_addresses_gets_at_most_max_members_those_it_had_first(caplog):
    """A resolver answering 5,000 addresses does not make the master check (and the proxies
    balance over) 5,000 hosts: MAX_MEMBERS of them, keeping the members the name already had."""
    many = [f"198.19.{i // 250 + 1}.{i % 250 + 1}" for i in range(5000)]
    answers = {"nodes.test": ["198.19.0.1", "198.19.0.2"]}

    async def steps(table, named):
        await named.configure(config("nodes.test"))
        answers["nodes.test"] = many + ["198.19.0.2"]
        await named.refresh()
        hosts = {host for _, host in members(table)}
        assert len(hosts) == resolve.MAX_MEMBERS
        assert "198.19.0.2" in hosts and "198.19.0.1" not in hosts  # kept; vanished
        await named.refresh()
        assert {host for _, host in members(table)} == hosts  # no churn while the answer stays long

    run_with(answers, steps)
    assert caplog.text.count("resolves to 5001 addresses") == 1
