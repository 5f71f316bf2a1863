"""Compression on the fly through a real `python -m arbiter` (default config: front cache on):
each coding byte-exact, per-encoding ETags and 304s, Range on identity, and clients with
different Accept-Encoding never given one another's representation by the proxies' front cache."""
from __future__ import annotations

import gzip
from pathlib import Path

import brotli
import pytest
import zstandard

from e2e_support import fetch
from master_support import Master, serving

pytestmark = pytest.mark.integration

TEXT = b"".join(b"row %d, a compressible line of text for the proxies\n" % i for i in range(2000))
DECODE = {"zstd": zstandard.ZstdDecompressor().decompress, "br": brotli.decompress,
          "gzip": gzip.decompress, None: lambda body: body}
# Clients as browsers and tools send it, and the coding each must get.
CLIENTS = [
    (None, None),
    ("gzip, deflate, br, zstd", "zstd"),
    ("gzip, deflate, br", "br"),
    ("gzip, deflate", "gzip"),
    ("identity", None),
    ("zstd;q=0, br;q=0, gzip;q=0", None),
    ("br;q=0.5, gzip;q=0.9, identity;q=0.1", "gzip"),
]


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("site") / "www"
    root.mkdir()
    (root / "page.txt").write_bytes(TEXT)  # over the hand-off size: identity goes as a file
    (root / "small.js").write_bytes(TEXT[:4000])  # under it: identity goes as bytes
    return root


@pytest.fixture(scope="module")
def master(tmp_path_factory, site) -> Master:
    m = serving(tmp_path_factory.mktemp("master"), site, 2)
    yield m
    m.stop()


@pytest.mark.parametrize("path", ["/page.txt", "/small.js"])
def test_clients_each_get_their_coding_and_never_anothers(master, site, path):
    expected = (site / path[1:]).read_bytes()
    tags: dict[str | None, str] = {}
    for _ in range(4):  # again and again: the later rounds are front cache hits
        for accept, coding in CLIENTS:
            status, headers, body = fetch(master.port, "GET", path,
                                          {"Accept-Encoding": accept} if accept else {})
            assert status == 200, (accept, headers)
            assert headers.get("content-encoding") == coding, accept
            assert headers["vary"] == "Accept-Encoding"
            assert int(headers["content-length"]) == len(body)
            assert DECODE[coding](body) == expected, accept
            assert tags.setdefault(coding, headers["etag"]) == headers["etag"]
    assert len(set(tags.values())) == 4  # one ETag per encoding, the same from both workers


@pytest.mark.parametrize("coding", ["zstd", "br", "gzip", None])
def test_each_encoding_answers_its_own_304_and_not_anothers(master, coding):
    accept = {"Accept-Encoding": coding or "identity"}
    etag = fetch(master.port, "GET", "/page.txt", accept)[1]["etag"]
    for _ in range(2):
        status, headers, body = fetch(master.port, "GET", "/page.txt", {**accept, "If-None-Match": etag})
        assert (status, body, headers["etag"]) == (304, b"", etag)
        for other in ("zstd", "br", "gzip", "identity"):
            if other != (coding or "identity"):
                status, headers, _ = fetch(master.port, "GET", "/page.txt",
                                           {"Accept-Encoding": other, "If-None-Match": etag})
                assert status == 200 and headers["etag"] != etag


def test_range_and_head_through_the_proxy(master):
    status, headers, body = fetch(master.port, "GET", "/page.txt",
                                  {"Accept-Encoding": "br", "Range": "bytes=100-199"})
    assert (status, body) == (206, TEXT[100:200]) and "content-encoding" not in headers
    full = fetch(master.port, "GET", "/page.txt", {"Accept-Encoding": "br"})[1]
    status, headers, body = fetch(master.port, "HEAD", "/page.txt", {"Accept-Encoding": "br"})
    assert (status, body) == (200, b"")
    for name in ("content-encoding", "content-length", "etag", "vary"):
        assert headers[name] == full[name]
