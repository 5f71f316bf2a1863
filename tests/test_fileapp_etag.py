"""Content ETags (etag="content", the config's cache.etag): equal for equal bytes whatever the
mtimes, hashed once per file version (never per request), big files hashed in blocks."""
from __future__ import annotations

import gzip
import os
from hashlib import blake2b

import pytest
from werkzeug.test import Client

from fileapp import create_app
from fileapp.loader import HASH_BLOCK

pytestmark = pytest.mark.unit

BODY = b"body { color: red }\n" * 50


def site(root, mtime: int, big: bytes = b"") -> None:
    root.mkdir()
    (root / "style.css").write_bytes(BODY)
    os.utime(root / "style.css", (mtime, mtime))
    if big:
        (root / "big.bin").write_bytes(big)
        os.utime(root / "big.bin", (mtime, mtime))


def etag(app, path: str = "/style.css", **headers) -> str:
    return Client(app).get(path, headers=headers).headers["ETag"]


@pytest.mark.parametrize("max_file_size", [1 << 20, 0])  # bytes held, or only described (streamed)
def test_equal_bytes_get_equal_content_etags_whatever_their_mtimes(tmp_path, max_file_size):
    site(tmp_path / "a", 1_600_000_000)
    site(tmp_path / "b", 1_700_000_000)
    content = [create_app(str(tmp_path / r), etag="content", cache_max_file_size=max_file_size) for r in "ab"]
    default = [create_app(str(tmp_path / r), cache_max_file_size=max_file_size) for r in "ab"]
    assert etag(content[0]) == etag(content[1]) == '"%s"' % blake2b(BODY, digest_size=16).hexdigest()
    assert etag(default[0]) != etag(default[1])


def test_default_etags_agree_across_hosts_when_mtimes_are_preserved(tmp_path):
    site(tmp_path / "a", 1_600_000_000)
    site(tmp_path / "b", 1_600_000_000)  # as rsync -a copies it
    assert etag(create_app(str(tmp_path / "a"))) == etag(create_app(str(tmp_path / "b")))


@pytest.mark.parametrize("cache_ttl", [1.0, 0])  # cached entries, or none at all
def test_a_file_is_hashed_once_per_version_not_per_request(tmp_path, cache_ttl):
    site(tmp_path / "a", 1_600_000_000)
    app = create_app(str(tmp_path / "a"), etag="content", cache_ttl=cache_ttl)
    first = etag(app)
    for _ in range(50):
        assert etag(app) == first
    assert app.loader.hashed == 1
    app.cache.clear()  # an entry's expiry: the same version is not hashed again
    assert etag(app) == first and app.loader.hashed == 1
    os.utime(tmp_path / "a" / "style.css", (1_600_000_100, 1_600_000_100))  # a new version
    app.cache.clear()
    assert etag(app) == first and app.loader.hashed == 2


def test_big_files_are_hashed_in_blocks_never_read_whole(tmp_path, monkeypatch):
    big = os.urandom(3 * HASH_BLOCK + 12345)
    site(tmp_path / "a", 1_600_000_000, big)
    reads = []
    pread = os.pread

    def spy(fd, n, offset):
        reads.append(n)
        return pread(fd, n, offset)

    monkeypatch.setattr(os, "pread", spy)
    app = create_app(str(tmp_path / "a"), etag="content")
    r = Client(app).get("/big.bin")
    assert r.headers["ETag"] == '"%s"' % blake2b(big, digest_size=16).hexdigest()
    assert len(reads) == 4 and max(reads) == HASH_BLOCK


def test_content_etags_validate_and_tell_sidecars_apart(tmp_path):
    site(tmp_path / "a", 1_600_000_000)
    (tmp_path / "a" / "style.css.gz").write_bytes(gzip.compress(BODY))
    app = create_app(str(tmp_path / "a"), etag="content")
    plain = etag(app)
    zipped = etag(app, **{"Accept-Encoding": "gzip"})
    assert zipped.endswith('-gz"') and zipped != plain
    assert Client(app).get("/style.css", headers={"If-None-Match": plain}).status_code == 304


def test_an_unknown_etag_kind_is_refused(tmp_path):
    site(tmp_path / "a", 1_600_000_000)
    with pytest.raises(ValueError, match="etag"):
        create_app(str(tmp_path / "a"), etag="sha1")
