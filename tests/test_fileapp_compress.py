"""Compression on the fly (fileapp.compress) through create_app: codings by q-value, byte-exact
round trips, once per file version, Vary, per-encoding ETags and 304s, Range on identity, what is
never compressed, and bodies that are sent from memory rather than handed off."""
from __future__ import annotations

import gzip
import os
import threading

import brotli
import pytest
import zstandard
from werkzeug.test import Client

from fileapp import compress, create_app
from fileapp.handoff import FILE_HEADER

pytestmark = pytest.mark.unit

TOKEN = "s3cret-token"
MTIME = 1_700_000_000
# Compressible text, large enough to be handed off to gows' proxy were it sent as a file.
TEXT = b"".join(b"line %d: the quick brown fox jumps over the lazy dog\n" % i for i in range(2000))
DECODE = {"zstd": zstandard.ZstdDecompressor().decompress, "br": brotli.decompress,
          "gzip": gzip.decompress}


def write(path, data: bytes, mtime: int = MTIME) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.utime(path, (mtime, mtime))


@pytest.fixture
def root(tmp_path):
    r = tmp_path / "root"
    write(r / "page.txt", TEXT)
    write(r / "app.js", TEXT)
    write(r / "data.json", b'{"k": "%s"}' % (b"v" * 4000))
    write(r / "icon.svg", b"<svg>" + b"<g/>" * 1000 + b"</svg>")
    write(r / "tiny.txt", b"x" * (compress.MIN_SIZE - 1))
    write(r / "photo.png", TEXT)  # compressible bytes, but an image type: left alone
    write(r / "font.woff2", TEXT)
    write(r / "archive.gz", TEXT)
    write(r / "side.css", TEXT)
    write(r / "side.css.gz", gzip.compress(TEXT, mtime=0))
    write(r / "noise.txt", os.urandom(8192))  # compresses to more than it is
    return r


# "memory": the cache holds the file's bytes; "described": gows' worker, which keeps only the
# metadata of files it hands to the proxy, so the compressor reads the file itself.
MODES = {"memory": {}, "described": {"handoff_token": TOKEN}}


@pytest.fixture(params=list(MODES))
def app(request, root):
    return create_app(str(root), **MODES[request.param])


def get(app, path, method="GET", **headers):
    return Client(app).open(path, method=method, headers={k.replace("_", "-"): v
                                                           for k, v in headers.items()})


@pytest.mark.parametrize("coding", ["zstd", "br", "gzip"])
@pytest.mark.parametrize("path", ["/page.txt", "/app.js", "/data.json", "/icon.svg"])
def test_each_coding_round_trips_byte_exact(app, root, coding, path):
    r = get(app, path, Accept_Encoding=coding)
    assert r.status_code == 200
    assert r.headers["Content-Encoding"] == coding
    assert r.headers["Vary"] == "Accept-Encoding"
    assert int(r.headers["Content-Length"]) == len(r.data) < (root / path[1:]).stat().st_size
    assert DECODE[coding](r.data) == (root / path[1:]).read_bytes()


@pytest.mark.parametrize("accept, coding", [
    ("gzip, deflate, br, zstd", "zstd"),  # a browser's: ties go to zstd, then br, then gzip
    ("gzip, deflate, br", "br"),
    ("gzip", "gzip"),
    ("x-gzip", "gzip"),
    ("br;q=0.9, gzip", "gzip"),
    ("zstd;q=0.5, br;q=0.8", None),  # identity, unnamed, has q=1
    ("zstd;q=0.5, br;q=0.8, identity;q=0.1", "br"),
    ("zstd;q=0, br;q=0, gzip", "gzip"),
    ("zstd;q=0, br;q=0, gzip;q=0", None),
    ("*", "zstd"),
    ("*, zstd;q=0", "br"),
    ("identity;q=0, gzip", "gzip"),
    ("identity;q=0", None),  # nothing acceptable: identity all the same, as with sidecars
    ("br;q=0.5, identity", None),
    ("identity", None),
    ("deflate", None),
    ("", None),
])
def test_coding_follows_the_clients_q_values(app, accept, coding):
    r = get(app, "/page.txt", Accept_Encoding=accept)
    assert r.status_code == 200
    assert r.headers.get("Content-Encoding") == coding
    assert r.headers["Vary"] == "Accept-Encoding"
    assert (DECODE[coding](r.data) if coding else r.data) == TEXT


def test_compressed_once_per_file_version_and_coding(app):
    for _ in range(3):
        for coding in ("zstd", "br", "gzip"):
            assert get(app, "/page.txt", Accept_Encoding=coding).headers["Content-Encoding"] == coding
        app.cache.discard("/page.txt")  # as when its time in the cache is up: reloaded, same file
    assert app.compressor.compressions == 3
    assert get(app, "/page.txt", "HEAD", Accept_Encoding="br").headers["Content-Encoding"] == "br"
    assert app.compressor.compressions == 3
    stats = app.cache.stats()
    assert stats["bytes"] > sum(len(get(app, "/page.txt", Accept_Encoding=c).data)
                                for c in ("zstd", "br", "gzip"))  # kept, and counted


def test_a_changed_file_is_compressed_again_once(app, root):
    assert DECODE["br"](get(app, "/page.txt", Accept_Encoding="br").data) == TEXT
    new = TEXT.replace(b"fox", b"cat")
    write(root / "page.txt", new, MTIME + 5)
    app.cache.discard("/page.txt")
    for _ in range(3):
        assert DECODE["br"](get(app, "/page.txt", Accept_Encoding="br").data) == new
    assert app.compressor.compressions == 2


def test_an_in_place_rewrite_keeping_size_and_mtime_is_seen_when_the_bytes_are_cached(root):
    app = create_app(str(root))
    get(app, "/page.txt", Accept_Encoding="gzip")
    new = TEXT.replace(b"fox", b"cat")
    write(root / "page.txt", new)  # same size, same mtime
    app.cache.discard("/page.txt")
    assert gzip.decompress(get(app, "/page.txt", Accept_Encoding="gzip").data) == new
    assert app.compressor.compressions == 2


def test_etags_differ_per_encoding_and_each_answers_its_own_304(app):
    tags = {}
    for coding in ("identity", "zstd", "br", "gzip"):
        tags[coding] = get(app, "/page.txt", Accept_Encoding=coding).headers["ETag"]
    assert len(set(tags.values())) == 4
    identity = tags["identity"].strip('"')
    assert tags == {"identity": f'"{identity}"', "zstd": f'"{identity}-zst"',
                    "br": f'"{identity}-br"', "gzip": f'"{identity}-gz"'}
    for coding, tag in tags.items():
        r = get(app, "/page.txt", Accept_Encoding=coding, If_None_Match=tag)
        assert r.status_code == 304 and r.data == b""
        assert r.headers["ETag"] == tag and r.headers["Vary"] == "Accept-Encoding"
        for other in tags:
            if other != coding:
                assert get(app, "/page.txt", Accept_Encoding=other,
                           If_None_Match=tag).status_code == 200


def test_head_has_the_compressed_responses_headers_and_no_body(app):
    full = get(app, "/page.txt", Accept_Encoding="br")
    head = get(app, "/page.txt", "HEAD", Accept_Encoding="br")
    assert head.status_code == 200 and head.data == b""
    for name in ("Content-Encoding", "Content-Length", "ETag", "Vary", "Content-Type"):
        assert head.headers[name] == full.headers[name]


@pytest.mark.parametrize("spec, start, stop", [("bytes=0-99", 0, 100), ("bytes=-10", len(TEXT) - 10, len(TEXT))])
def test_ranges_are_answered_on_the_identity_representation(app, spec, start, stop):
    r = get(app, "/page.txt", Accept_Encoding="br", Range=spec)
    assert r.status_code == 206
    assert "Content-Encoding" not in r.headers
    assert r.data == TEXT[start:stop]
    assert r.headers["Content-Range"] == f"bytes {start}-{stop - 1}/{len(TEXT)}"
    assert app.compressor.compressions == 0


@pytest.mark.parametrize("path", ["/tiny.txt", "/photo.png", "/font.woff2", "/archive.gz"])
def test_tiny_and_already_compressed_files_are_sent_as_they_are(app, root, path):
    r = get(app, path, Accept_Encoding="gzip, br, zstd")
    assert r.status_code == 200
    assert "Content-Encoding" not in r.headers and "Vary" not in r.headers
    assert r.data == (root / path[1:]).read_bytes()
    assert app.compressor.compressions == 0


def test_a_body_compression_does_not_shrink_is_sent_as_it_is_and_not_tried_again(app, root):
    for _ in range(3):
        r = get(app, "/noise.txt", Accept_Encoding="br")
        assert "Content-Encoding" not in r.headers and r.headers["Vary"] == "Accept-Encoding"
        assert r.data == (root / "noise.txt").read_bytes()
    assert app.compressor.compressions == 1


def test_a_precompressed_sidecar_wins_over_compression_on_the_fly(app):
    for accept, coding in (("br, gzip, zstd", "gzip"), ("br", None)):
        r = get(app, "/side.css", Accept_Encoding=accept)
        assert r.headers.get("Content-Encoding") == coding
    assert app.compressor.compressions == 0


def test_compress_false_turns_it_off(root):
    app = create_app(str(root), compress=False)
    r = get(app, "/page.txt", Accept_Encoding="br, gzip, zstd")
    assert "Content-Encoding" not in r.headers and "Vary" not in r.headers and r.data == TEXT
    assert app.compressor.compressions == 0


@pytest.mark.parametrize("options", [{"cache_ttl": 0}, {"cache_max_bytes": 0},
                                     {"cache_max_bytes": len(TEXT) + 511},
                                     {"cache_max_file_size": len(TEXT) - 1}])
def test_a_body_that_could_not_be_kept_is_never_compressed(root, options):
    app = create_app(str(root), **options)
    for _ in range(2):
        r = get(app, "/page.txt", Accept_Encoding="br")
        assert "Content-Encoding" not in r.headers and r.data == TEXT
    assert app.compressor.compressions == 0


def test_concurrent_requests_wait_for_one_compression(root, monkeypatch):
    app = create_app(str(root))
    entered, release = threading.Event(), threading.Event()
    real = compress.ENCODERS["br"]

    def slow(data: bytes) -> bytes:
        entered.set()
        assert release.wait(10)
        return real(data)

    waiting = threading.Event()

    class Making(threading.Event):  # the event a request for a body being compressed waits on
        def wait(self, timeout=None):
            waiting.set()
            return super().wait(timeout)

    monkeypatch.setitem(compress.ENCODERS, "br", slow)
    monkeypatch.setattr(compress, "Event", Making)
    bodies = []
    first = threading.Thread(target=lambda: bodies.append(get(app, "/page.txt", Accept_Encoding="br").data))
    second = threading.Thread(target=lambda: bodies.append(get(app, "/page.txt", Accept_Encoding="br").data))
    first.start()
    assert entered.wait(10)
    second.start()
    assert waiting.wait(10)
    release.set()
    first.join(10)
    second.join(10)
    assert [brotli.decompress(b) for b in bodies] == [TEXT, TEXT]
    assert app.compressor.compressions == 1


def test_a_compressed_body_is_sent_by_the_worker_not_handed_to_the_proxy(root):
    app = create_app(str(root), handoff_token=TOKEN)
    ask = {"X-Gows-Handoff": TOKEN}
    plain = get(app, "/page.txt", **ask)
    assert FILE_HEADER in plain.headers and plain.data == b""  # identity: the proxy sends the file
    r = get(app, "/page.txt", Accept_Encoding="br", **ask)
    assert FILE_HEADER not in r.headers
    assert int(r.headers["Content-Length"]) == len(r.data) > 0
    assert brotli.decompress(r.data) == TEXT


def test_a_compressed_body_is_never_handed_to_nginx(root):
    app = create_app(str(root), sendfile_header="X-Accel-Redirect")
    r = get(app, "/page.txt", Accept_Encoding="gzip")
    assert "X-Accel-Redirect" not in r.headers and gzip.decompress(r.data) == TEXT


def test_embedded_in_flask(root):
    import flask  # a test extra: must run, never skip
    flask_app = flask.Flask(__name__)
    flask_app.wsgi_app = create_app(str(root), app=flask_app.wsgi_app, prefix="/static")
    client = flask_app.test_client()
    tags = set()
    for coding in ("zstd", "br", "gzip"):
        r = client.get("/static/page.txt", headers={"Accept-Encoding": coding})
        assert r.headers["Content-Encoding"] == coding and r.headers["Vary"] == "Accept-Encoding"
        assert DECODE[coding](r.data) == TEXT
        tags.add(r.headers["ETag"])
        assert client.get("/static/page.txt", headers={
            "Accept-Encoding": coding, "If-None-Match": r.headers["ETag"]}).status_code == 304
    assert len(tags) == 3


def test_headers_by_path_reach_the_bodies_compressed_on_the_fly(root):
    rules = [{"match": "*.txt", "set": {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}}]
    client = Client(create_app(str(root), headers=rules))
    plain = client.get("/page.txt")
    coded = client.get("/page.txt", headers={"Accept-Encoding": "gzip"})
    assert coded.headers["Content-Encoding"] == "gzip" and gzip.decompress(coded.data) == TEXT
    for r in (plain, coded):
        assert (r.headers["Cache-Control"], r.headers["X-Content-Type-Options"]) == ("no-cache", "nosniff")
    again = client.get("/page.txt", headers={"Accept-Encoding": "gzip", "If-None-Match": coded.headers["ETag"]})
    assert again.status_code == 304 and again.headers["Cache-Control"] == "no-cache"


def test_one_file_under_two_urls_gets_each_urls_own_headers_compressed(tmp_path):
    """A body compressed for one URL of a file is shared with its other URLs (an alias, a
    directory's index), but each answer keeps its own URL's Cache-Control, Content-Type and
    header rules, whichever URL was asked first."""
    r = tmp_path / "root"
    write(r / "app.3f2a9c1b.js", TEXT)  # a content-hashed name: immutable
    (r / "app.js").symlink_to("app.3f2a9c1b.js")  # its mutable alias
    write(r / "NOTES.md", TEXT)
    (r / "notes.txt").symlink_to("NOTES.md")
    write(r / "index.html", TEXT)
    rules = [{"match": "/index.html", "set": {"X-Rule": "index"}}]
    for order in (["/app.3f2a9c1b.js", "/app.js", "/NOTES.md", "/notes.txt", "/index.html", "/"],
                  ["/app.js", "/app.3f2a9c1b.js", "/notes.txt", "/NOTES.md", "/", "/index.html"]):
        client = Client(create_app(str(r), headers=rules))
        for path in order:
            plain = client.get(path)
            coded = client.get(path, headers={"Accept-Encoding": "gzip"})
            assert coded.headers["Content-Encoding"] == "gzip" and DECODE["gzip"](coded.data) == TEXT
            for name in ("Cache-Control", "Content-Type", "X-Rule"):
                assert coded.headers.get(name) == plain.headers.get(name), (order, path, name)
