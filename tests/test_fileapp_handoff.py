"""fileapp's hand-off of file bodies to gows' proxy (fileapp.handoff): who gets it, what the
X-Gows-File header names, and the proxy's check that the named file is still the one decided on."""
from __future__ import annotations

import os

import pytest
from werkzeug.test import Client

from fileapp import create_app
from fileapp import handoff
from fileapp.handoff import FILE_HEADER, MIN_SIZE, FileRef, directory_stamp, open_verified, parse_file_header
from support import wait_until

pytestmark = pytest.mark.unit

TOKEN = "s3cret-token"
BIG = bytes(range(256)) * (MIN_SIZE // 256 + 4)  # a little over MIN_SIZE
ASK = {"X-Gows-Handoff": TOKEN}


@pytest.fixture
def root(tmp_path):
    r = tmp_path / "root"
    r.mkdir()
    (r / "big.bin").write_bytes(BIG)
    (r / "small.txt").write_bytes(b"small\n")
    (r / "huge.bin").write_bytes(BIG * 16)  # past the worker's cache limit below: streamed
    return r


@pytest.fixture
def client(root):
    return Client(create_app(str(root), handoff_token=TOKEN, cache_max_file_size=len(BIG) + 1))


@pytest.fixture
def settled(root, monkeypatch):
    """Directories stamped once unchanged for 50 ms (many clock ticks) rather than seconds."""
    monkeypatch.setattr(handoff, "STAMP_SETTLE", 0.05)
    wait_until(lambda: directory_stamp(root), timeout=5, message="the root settled")


def ref_of(response) -> FileRef:
    ref = parse_file_header(response.headers[FILE_HEADER].encode())
    assert ref is not None
    return ref


@pytest.mark.parametrize("name", ["big.bin", "huge.bin"])
def test_handed_off_head_names_the_file_and_has_no_body(client, root, settled, name):
    r = client.get(f"/{name}", headers=ASK)
    assert r.status_code == 200
    assert r.data == b""
    assert r.headers["Content-Length"] == "0"
    ref = ref_of(r)
    st = os.stat(root / name)
    assert ref == FileRef(os.fsencode(root / name), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, 0,
                          st.st_size, directory_stamp(root))
    assert ref.directory is not None
    assert r.headers["ETag"] and r.headers["Content-Type"] == "application/octet-stream"


def test_a_file_reached_through_a_symlink_is_named_without_its_directory(client, root, settled):
    """Repointing the link changes the directory holding it, not the file's: the proxy must not
    keep the name on the strength of the file's directory (arbiter.proxy.cache)."""
    (root / "release").mkdir()
    (root / "release" / "app.bin").write_bytes(BIG)
    (root / "current").symlink_to("release")
    wait_until(lambda: directory_stamp(root / "release"), timeout=5, message="the release settled")
    via_link = ref_of(client.get("/current/app.bin", headers=ASK))
    assert via_link.path == os.fsencode(root / "release" / "app.bin") and via_link.directory is None
    direct = ref_of(client.get("/release/app.bin", headers=ASK)).directory
    assert direct is not None and direct == directory_stamp(root / "release")


def test_the_directory_is_stamped_before_the_file_is_resolved(client, root, settled, monkeypatch):
    """A name added while the worker decides changes the directory after its stamp: the proxy
    then asks a worker again rather than keep a mapping the change may have altered."""
    from fileapp.files import Resolver
    resolve = Resolver.open

    def change_then_resolve(self, parts):
        (root / "big.bin.gz").write_bytes(b"a sidecar added meanwhile")
        return resolve(self, parts)

    monkeypatch.setattr(Resolver, "open", change_then_resolve)
    ref = ref_of(client.get("/big.bin", headers=ASK))
    assert ref.directory is not None
    assert wait_until(lambda: directory_stamp(root), timeout=5) != ref.directory


def test_a_directory_changed_lately_has_no_stamp_yet(tmp_path, monkeypatch):
    """File times advance by clock ticks (seconds on some filesystems): a second change within
    the tick of the first would keep the stamp, so a fresh change gives none."""
    (tmp_path / "d").mkdir()
    assert directory_stamp(tmp_path / "d") is None  # (STAMP_SETTLE: 2 s)
    assert directory_stamp(tmp_path / "gone") is None
    monkeypatch.setattr(handoff, "STAMP_SETTLE", 0.05)
    stamp = wait_until(lambda: directory_stamp(tmp_path / "d"), timeout=5)
    st = os.stat(tmp_path / "d")
    assert stamp == (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_ctime_ns)


def test_single_range_is_handed_off_with_its_offset(client, root):
    r = client.get("/huge.bin", headers={**ASK, "Range": f"bytes=100-{100 + MIN_SIZE}"})
    assert r.status_code == 206
    assert r.headers["Content-Range"] == f"bytes 100-{100 + MIN_SIZE}/{len(BIG) * 16}"
    ref = ref_of(r)
    assert (ref.offset, ref.count) == (100, MIN_SIZE + 1)


@pytest.mark.parametrize("headers", [
    {},  # not asked
    {"X-Gows-Handoff": "wrong"},  # asked by someone without the secret
    {"X-Gows-Handoff": "s3cret-token\u00e9"},  # not even ASCII
])
def test_only_the_secret_gets_a_hand_off(client, headers):
    r = client.get("/big.bin", headers=headers)
    assert r.status_code == 200 and r.data == BIG
    assert FILE_HEADER not in r.headers


def test_without_a_token_configured_nothing_is_handed_off(root):
    r = Client(create_app(str(root))).get("/big.bin", headers=ASK)
    assert r.data == BIG and FILE_HEADER not in r.headers


@pytest.mark.parametrize("path, headers, status", [
    ("/small.txt", {}, 200),  # small bodies go with the head
    ("/big.bin", {"Range": "bytes=0-9"}, 206),  # so do small ranges
    ("/big.bin", {"Range": "bytes=0-9,100-40000"}, 206),  # and multipart ones
])
def test_small_and_multipart_bodies_are_sent_by_the_worker(client, path, headers, status):
    r = client.get(path, headers={**ASK, **headers})
    assert r.status_code == status and r.data and FILE_HEADER not in r.headers


@pytest.mark.parametrize("options", [{"cache_ttl": 0}, {"cache_max_bytes": 0}, {"cache_max_file_size": 3}])
def test_a_small_file_whose_bytes_the_cache_does_not_hold_is_sent_by_the_worker(root, options):
    """Below MIN_SIZE nothing is handed off: with caching off, or a file past the cache's
    largest, the worker reads it from disk as it does for anyone else."""
    r = Client(create_app(str(root), handoff_token=TOKEN, **options)).get("/small.txt", headers=ASK)
    assert r.status_code == 200 and r.data == b"small\n" and FILE_HEADER not in r.headers


def test_head_conditionals_and_errors_are_never_handed_off(client):
    head = client.head("/big.bin", headers=ASK)
    assert head.headers["Content-Length"] == str(len(BIG)) and FILE_HEADER not in head.headers
    etag = head.headers["ETag"]
    r = client.get("/big.bin", headers={**ASK, "If-None-Match": etag})
    assert r.status_code == 304 and FILE_HEADER not in r.headers
    assert client.get("/missing", headers=ASK).status_code == 404


def test_parse_refuses_malformed_values():
    good = b"1 2 30 4 0 30 - /srv/a%20b"
    assert parse_file_header(good) == FileRef(b"/srv/a b", 1, 2, 30, 4, 0, 30)
    assert parse_file_header(b"1 2 30 4 0 30 5:6:7:8 /srv/a") == FileRef(b"/srv/a", 1, 2, 30, 4, 0, 30, (5, 6, 7, 8))
    for bad in (b"", b"1 2 3", b"1 2 30 4 0 31 - /srv/a", b"1 2 30 4 -1 3 - /srv/a", b"x 2 30 4 0 3 - /a",
                b"1 2 30 4 0 3 - relative", b"1 2 30 4 0 3 - /a%00b", b"1 2 30 4 0 30 /srv/a",
                b"1 2 30 4 0 30 5:6:7 /srv/a", b"1 2 30 4 0 30 5:6:x:8 /srv/a"):
        assert parse_file_header(bad) is None, bad


def _ref(of, **changes) -> FileRef:
    st = os.stat(of)
    fields = dict(path=os.fsencode(of), dev=st.st_dev, ino=st.st_ino, size=st.st_size,
                  mtime_ns=st.st_mtime_ns, offset=0, count=st.st_size)
    fields.update(changes)
    return FileRef(**fields)


def test_open_verified_opens_the_same_file_only(root, tmp_path):
    path = root / "big.bin"
    ref = _ref(path)
    fd = open_verified(ref)
    assert fd is not None
    try:
        assert os.pread(fd, 16, 0) == BIG[:16]
    finally:
        os.close(fd)
    assert open_verified(ref._replace(mtime_ns=ref.mtime_ns + 1)) is None
    assert open_verified(ref._replace(size=ref.size + 1, count=1)) is None
    assert open_verified(ref._replace(ino=ref.ino + 1)) is None
    # Replaced by another file (a new inode) at the same path.
    (root / "new.bin").write_bytes(BIG)
    os.replace(root / "new.bin", path)
    assert open_verified(ref) is None
    # Deleted.
    os.unlink(path)
    assert open_verified(ref) is None


def test_open_verified_never_follows_a_symlink_swapped_in(root, tmp_path):
    outside = tmp_path / "secret.bin"
    outside.write_bytes(BIG)
    path = root / "big.bin"
    ref = _ref(outside, path=os.fsencode(path))  # even naming the outside file's identity
    os.unlink(path)
    os.symlink(outside, path)
    assert open_verified(ref) is None
    # A directory on the way swapped for a symlink to outside the root.
    (root / "sub").mkdir()
    (root / "sub" / "f.bin").write_bytes(BIG)
    inside = _ref(root / "sub" / "f.bin")
    os.rename(root / "sub", root / "old")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "f.bin").write_bytes(BIG)
    os.symlink(tmp_path / "elsewhere", root / "sub")
    assert open_verified(inside) is None


def test_open_verified_refuses_a_fifo_without_blocking(root):
    fifo = root / "pipe"
    os.mkfifo(fifo)
    st = os.stat(fifo)
    assert open_verified(FileRef(os.fsencode(fifo), st.st_dev, st.st_ino, 0, st.st_mtime_ns, 0, 0)) is None


def test_with_a_token_the_worker_keeps_no_bytes_of_files_it_hands_off(root):
    app = create_app(str(root), handoff_token=TOKEN)
    client = Client(app)
    assert client.get("/big.bin", headers=ASK).data == b""
    assert client.get("/big.bin").data == BIG  # a client without the secret: streamed from disk
    assert client.get("/small.txt").data == b"small\n"
    assert app.cache.get("/big.bin").identity.body is None
    assert app.cache.get("/small.txt").identity.body == b"small\n"


def test_the_head_of_a_whole_file_handed_off_is_made_once_per_version(root, monkeypatch):
    from fileapp import app as app_module
    made = []
    real = app_module.file_header
    monkeypatch.setattr(app_module, "file_header", lambda *args: made.append(args) or real(*args))
    client = Client(create_app(str(root), handoff_token=TOKEN, cache_ttl=60))
    first, second = (client.get("/big.bin", headers=ASK) for _ in range(2))
    assert len(made) == 1 and first.headers == second.headers and ref_of(second).count == len(BIG)
    assert client.get("/big.bin").data == BIG  # a client without the secret gets the bytes all the same
    (root / "big.bin").write_bytes(BIG[::-1])  # a new version (size kept): a new head, naming it
    os.utime(root / "big.bin", ns=(1, 1))
    client.application.cache.clear()
    third = client.get("/big.bin", headers=ASK)
    assert len(made) == 2 and ref_of(third).mtime_ns == 1 and third.headers["ETag"] != first.headers["ETag"]
