"""One `host:port` for the whole master: IPv6 literals in brackets wherever an address is written."""
from __future__ import annotations

import asyncio
import time

import pytest

from arbiter.addresses import Address, WorkerAddress, host_port
from arbiter.state import WorkerState
from benchmarks import chaos

pytestmark = pytest.mark.unit


def test_an_ipv6_literal_is_written_in_brackets_and_others_as_they_are():
    assert host_port("127.0.0.1", 8080) == "127.0.0.1:8080"
    assert host_port("example.org", 80) == "example.org:80"
    assert host_port("::1", 8080) == "[::1]:8080"
    assert host_port("fe80::1%eth0", 9001) == "[fe80::1%eth0]:9001"


def test_every_address_the_master_prints_uses_the_one_formatter():
    assert str(Address("::1", 8443)) == "[::1]:8443"
    assert str(WorkerAddress("::1", 9001, True, "workers[0].port")) == "[::1]:9001"
    assert WorkerState("::1", 9001).address == "[::1]:9001"
    assert str(Address("127.0.0.1", 8080)) == WorkerState("127.0.0.1", 8080).address == "127.0.0.1:8080"


def test_the_soaks_clients_send_a_well_formed_host_header_to_an_ipv6_server():
    """`Host: ::1:port` is malformed (RFC 9112 answers it with 400); `[::1]:port` is the authority."""
    heads: list[bytes] = []

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        heads.append(await reader.readuntil(b"\r\n\r\n"))
        try:
            writer.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
            await writer.drain()
        except ConnectionError:  # the aborted upload may be gone already
            pass
        writer.close()

    async def main() -> tuple[int, object, object]:
        server = await asyncio.start_server(answer, "::1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server:
            reader = await chaos.slow_reader("::1", port, "/a", time.monotonic, head_timeout=10)
            upload = await chaos.aborted_upload("::1", port, "/u", time.monotonic, declared=10, sent=0)
        return port, reader, upload

    port, reader, upload = asyncio.run(main())
    assert (reader.result, reader.status, upload.result) == ("ok", 404, "ok")
    assert [h.split(b"\r\n")[1] for h in heads] == [f"Host: [::1]:{port}".encode()] * 2
