"""fileapp's HTTP behaviour through werkzeug's test Client: methods, validators, conditionals,
ranges, content coding, directories, health and middleware use, for cached and streamed files."""
from __future__ import annotations

import errno
import gzip
import os
from urllib.parse import unquote, urljoin, urlsplit

import pytest
from werkzeug.http import http_date, parse_date
from werkzeug.test import Client
from werkzeug.wsgi import FileWrapper

from fileapp import create_app

pytestmark = pytest.mark.unit

DATA = bytes(range(256)) * 4  # 1024 bytes, every offset recognisable
CSS = b"body { color: #333; }\n" * 20
CSS_GZ = gzip.compress(CSS)
CSS_BR = b"BROTLI-SIDECAR" + bytes(range(40))  # content is opaque to the server
MTIME = 1_700_000_000  # fixed, so Last-Modified comparisons are exact


def write(path, data: bytes, mtime: int | None = MTIME) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    if mtime is not None:
        os.utime(path, (mtime, mtime))


@pytest.fixture
def root(tmp_path):
    r = tmp_path / "root"
    write(r / "index.html", b"<h1>home</h1>")
    write(r / "hello.txt", b"hello world\n")
    write(r / "data.bin", DATA)
    write(r / "empty.txt", b"")
    write(r / "style.css", CSS)
    write(r / "style.css.gz", CSS_GZ)
    write(r / "style.css.br", CSS_BR)
    write(r / "only-gz.js", b"console.log(1)\n" * 10)
    write(r / "only-gz.js.gz", gzip.compress(b"console.log(1)\n" * 10))
    write(r / "app.3f2a9c1b.js", b"hashed()")
    write(r / "report-20240101.pdf", b"%PDF-1.4")
    write(r / "logo.png", b"\x89PNG\r\n\x1a\n")
    write(r / "data.json", b"{}")
    write(r / "blob.xyz123", b"?")
    write(r / "sub" / "index.html", b"sub index")
    write(r / "sub" / "nested" / "file.txt", b"nested")
    write(r / "sub" / "nested" / "<script>&.txt", b"x")
    write(r / ".secret", b"dotfile")
    write(r / ".hidden" / "x.txt", b"hidden dir")
    write(r / ".well-known" / "acme.txt", b"challenge")
    (r / "evil.com").mkdir()
    (r / "http:").mkdir()
    return r


MODES = {
    "memory": ({}, {}),
    "stream": ({"cache_max_file_size": 0}, {}),
    "sendfile": ({"cache_max_file_size": 0}, {"wsgi.file_wrapper": FileWrapper}),
    "nocache": ({"cache_ttl": 0}, {}),
}


@pytest.fixture(params=list(MODES))
def client(request, root):
    options, environ = MODES[request.param]
    return Client(create_app(str(root), **options)), environ


def fetch(client, path, method="GET", headers=None, raw_path=False, **kw):
    """Request `path`; with raw_path it becomes PATH_INFO verbatim, as gunicorn would pass it."""
    c, environ = client
    if raw_path:
        environ = dict(environ, PATH_INFO=path)
        path = "/"
    return c.open(path, method=method, headers=headers or {}, environ_overrides=environ, **kw)


# -- methods -----------------------------------------------------------------------------------

def test_get_serves_bytes_with_validators(client):
    r = fetch(client, "/data.bin")
    assert r.status_code == 200
    assert r.data == DATA
    assert r.headers["Content-Length"] == "1024"
    assert r.headers["Accept-Ranges"] == "bytes"
    assert r.headers["Last-Modified"] == http_date(MTIME)
    etag = r.headers["ETag"]
    assert etag.startswith('"') and etag.endswith('"') and not etag.startswith("W/")


def test_head_has_same_headers_and_no_body(client):
    get, head = fetch(client, "/data.bin"), fetch(client, "/data.bin", "HEAD")
    assert head.status_code == 200
    assert head.data == b""
    assert dict(head.headers) == dict(get.headers)


@pytest.mark.parametrize("wrapper", [None, FileWrapper])
def test_a_file_that_shrinks_while_streamed_raises_rather_than_ending_short(root, wrapper):
    """A server reading the body (or closing it after sending the file itself) learns that it
    cannot reach its Content-Length, and ends the connection instead of keeping it alive."""
    write(root / "long.bin", DATA * 256)
    app = create_app(str(root), cache_max_file_size=0)
    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": "/long.bin", "SERVER_NAME": "x",
               "SERVER_PORT": "80", "wsgi.url_scheme": "http"}
    if wrapper is not None:
        environ["wsgi.file_wrapper"] = wrapper
    body, unread = (app(environ, lambda status, headers, exc_info=None: None) for _ in range(2))
    blocks = iter(body)
    assert next(blocks)
    os.truncate(root / "long.bin", 100)
    with pytest.raises(OSError, match="shrank"):
        for _ in blocks:
            pass
    for short in (unread, body):  # unread: as gunicorn's sendfile leaves it
        with pytest.raises(OSError, match="shrank"):
            short.close()


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH", "TRACE", "CONNECT", "FOO"])
def test_other_methods_get_405_with_allow(client, method):
    r = fetch(client, "/hello.txt", method)
    assert r.status_code == 405
    assert r.headers["Allow"] == "GET, HEAD, OPTIONS"


def test_options_answers_204_with_allow(client):
    r = fetch(client, "/hello.txt", "OPTIONS")
    assert r.status_code == 204
    assert r.headers["Allow"] == "GET, HEAD, OPTIONS"
    assert r.data == b""


def test_missing_file_is_a_small_plain_404(client):
    r = fetch(client, "/nope.txt")
    assert r.status_code == 404
    assert r.headers["Content-Type"] == "text/plain; charset=utf-8"
    assert r.data == b"404 Not Found\n"
    assert fetch(client, "/nope.txt", "HEAD").data == b""


def test_empty_file(client):
    r = fetch(client, "/empty.txt")
    assert r.status_code == 200 and r.data == b"" and r.headers["Content-Length"] == "0"


def test_etag_changes_with_content(client, root):
    before = fetch(client, "/hello.txt").headers["ETag"]
    write(root / "hello.txt", b"hello there, world\n", mtime=MTIME + 10)
    fresh = Client(create_app(str(root)))
    assert fresh.get("/hello.txt").headers["ETag"] != before


@pytest.mark.parametrize("code", [errno.EMFILE, errno.ENFILE, errno.ENOMEM])
def test_out_of_descriptors_is_a_503_to_retry_not_a_404(client, monkeypatch, code):
    c, environ = client
    real_open = os.open

    def failing_open(path, flags, *args, **kwargs):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "open", failing_open)
    for path in ("/hello.txt", "/data.bin", "/sub/", "/missing.txt"):
        r = c.get(path, environ_overrides=environ)
        assert r.status_code == 503, path
        assert r.headers["Retry-After"] == "1" and r.headers["Cache-Control"] == "no-store"
    monkeypatch.setattr(os, "open", real_open)  # descriptors free again: nothing was kept
    r = c.get("/hello.txt", environ_overrides=environ)
    assert r.status_code == 200 and r.data == b"hello world\n"
    assert c.get("/missing.txt", environ_overrides=environ).status_code == 404


# -- content type and cache control -------------------------------------------------------------

@pytest.mark.parametrize("path, ctype", [
    ("/hello.txt", "text/plain; charset=utf-8"),
    ("/index.html", "text/html; charset=utf-8"),
    ("/style.css", "text/css; charset=utf-8"),
    ("/app.3f2a9c1b.js", "text/javascript; charset=utf-8"),
    ("/data.json", "application/json; charset=utf-8"),
    ("/logo.png", "image/png"),
    ("/report-20240101.pdf", "application/pdf"),
    ("/blob.xyz123", "application/octet-stream"),
    ("/style.css.gz", "application/gzip"),
])
def test_content_type_from_extension(client, path, ctype):
    assert fetch(client, path).headers["Content-Type"] == ctype


@pytest.mark.parametrize("path, expected", [
    ("/hello.txt", "public, max-age=60"),
    ("/app.3f2a9c1b.js", "public, max-age=31536000, immutable"),
    ("/report-20240101.pdf", "public, max-age=60"),  # a date is not a content hash
])
def test_default_cache_control(client, path, expected):
    assert fetch(client, path).headers["Cache-Control"] == expected


def test_cache_control_is_configurable(root):
    c = Client(create_app(str(root), max_age=5, immutable_pattern=r"^report-"))
    assert c.get("/hello.txt").headers["Cache-Control"] == "public, max-age=5"
    assert c.get("/report-20240101.pdf").headers["Cache-Control"].endswith("immutable")
    assert c.get("/app.3f2a9c1b.js").headers["Cache-Control"] == "public, max-age=5"
    off = Client(create_app(str(root), immutable_pattern=None))
    assert off.get("/app.3f2a9c1b.js").headers["Cache-Control"] == "public, max-age=60"


# -- conditional requests ---------------------------------------------------------------------

LM = http_date(MTIME)
BEFORE = http_date(MTIME - 3600)
AFTER = http_date(MTIME + 3600)


def _conditional_cases():
    E = "{etag}"
    weak = "W/{etag}"
    return [
        # (headers, expected status) -- "{etag}" is replaced by the file's real ETag
        ({"If-None-Match": E}, 304),
        ({"If-None-Match": weak}, 304),  # weak comparison
        ({"If-None-Match": '"other"'}, 200),
        ({"If-None-Match": '"other", ' + E}, 304),
        ({"If-None-Match": "*"}, 304),
        ({"If-None-Match": "garbage-no-quotes"}, 200),
        ({"If-Modified-Since": LM}, 304),
        ({"If-Modified-Since": AFTER}, 304),
        ({"If-Modified-Since": BEFORE}, 200),
        ({"If-Modified-Since": "not a date"}, 200),
        ({"If-None-Match": '"other"', "If-Modified-Since": LM}, 200),  # INM takes precedence
        ({"If-None-Match": E, "If-Modified-Since": BEFORE}, 304),
        ({"If-Match": E}, 200),
        ({"If-Match": "*"}, 200),
        ({"If-Match": '"other"'}, 412),
        ({"If-Match": weak}, 412),  # If-Match compares strongly
        ({"If-Match": '"a", ' + E}, 200),
        ({"If-Unmodified-Since": LM}, 200),
        ({"If-Unmodified-Since": AFTER}, 200),
        ({"If-Unmodified-Since": BEFORE}, 412),
        ({"If-Unmodified-Since": "yesterday"}, 200),
        ({"If-Match": E, "If-Unmodified-Since": BEFORE}, 200),  # If-Match takes precedence
        ({"If-Match": '"other"', "If-None-Match": E}, 412),  # If-Match is evaluated first
        ({"If-Match": E, "If-None-Match": E}, 304),
    ]


@pytest.mark.parametrize("method", ["GET", "HEAD"])
@pytest.mark.parametrize("headers, status", _conditional_cases())
def test_conditional_table(client, method, headers, status):
    etag = fetch(client, "/data.bin").headers["ETag"]
    headers = {k: v.replace("{etag}", etag) for k, v in headers.items()}
    r = fetch(client, "/data.bin", method, headers)
    assert r.status_code == status, headers
    if status == 304:
        assert r.data == b""
        assert r.headers["ETag"] == etag
        assert "Content-Length" not in r.headers
    elif status == 412:
        assert DATA not in r.data
    else:
        assert r.data == (DATA if method == "GET" else b"")


# -- ranges ------------------------------------------------------------------------------------

@pytest.mark.parametrize("spec, start, stop", [
    ("bytes=0-9", 0, 10),
    ("bytes=-10", 1014, 1024),
    ("bytes=1000-", 1000, 1024),
    ("bytes=1000-5000", 1000, 1024),  # end clamped
    ("bytes=0-0", 0, 1),
    ("bytes=1023-1023", 1023, 1024),
    ("bytes=-5000", 0, 1024),  # suffix longer than the file: all of it
    ("bytes=0-1023", 0, 1024),
    ("bytes= 5-9", 5, 10),
    ("BYTES=5-9", 5, 10),  # unit is case-insensitive
    ("bytes=0-1,2000-3000", 0, 2),  # one satisfiable range left: single part
])
def test_single_range(client, spec, start, stop):
    r = fetch(client, "/data.bin", headers={"Range": spec})
    assert r.status_code == 206, spec
    assert r.data == DATA[start:stop]
    assert r.headers["Content-Range"] == f"bytes {start}-{stop - 1}/1024"
    assert r.headers["Content-Length"] == str(stop - start)
    assert r.headers["Content-Type"] == "application/octet-stream"
    assert "ETag" in r.headers and "Last-Modified" in r.headers


@pytest.mark.parametrize("spec", [
    "bytes=1024-", "bytes=5000-6000", "bytes=2000-2999,3000-4000", "bytes=1024-1024",
])
def test_unsatisfiable_range_is_416(client, spec):
    r = fetch(client, "/data.bin", headers={"Range": spec})
    assert r.status_code == 416
    assert r.headers["Content-Range"] == "bytes */1024"
    assert r.headers["Accept-Ranges"] == "bytes"
    assert "ETag" in r.headers
    assert DATA[:64] not in r.data


def test_range_on_empty_file_is_416(client):
    r = fetch(client, "/empty.txt", headers={"Range": "bytes=0-"})
    assert r.status_code == 416
    assert r.headers["Content-Range"] == "bytes */0"


@pytest.mark.parametrize("spec", [
    "items=0-5",  # not bytes: ignored
    "bytes=abc",
    "bytes=5-2",
    "bytes=-0",
    "bytes=",
    "bytes 0-5",
    "bytes=0-1,1-2",  # overlapping
    "bytes=5-6,0-1",  # out of order
    "bytes=0-99,-1000",  # overlapping through a suffix: more bytes than the file
    "bytes=" + ",".join(f"{i * 10}-{i * 10 + 1}" for i in range(17)),  # too many ranges
    "bytes=0-1x",
    "bytes=--1",
])
def test_ignored_range_serves_the_whole_file(client, spec):
    r = fetch(client, "/data.bin", headers={"Range": spec})
    assert r.status_code == 200, spec
    assert r.data == DATA
    assert "Content-Range" not in r.headers


def parse_byteranges(response) -> list[tuple[str, str, bytes]]:
    """(Content-Type, Content-Range, data) of each part of a multipart/byteranges body."""
    ctype = response.headers["Content-Type"]
    assert ctype.startswith("multipart/byteranges; boundary=")
    boundary = ctype.split("boundary=", 1)[1].encode()
    body = response.data
    assert len(body) == int(response.headers["Content-Length"])
    assert body.endswith(b"\r\n--" + boundary + b"--\r\n")
    parts = []
    for chunk in body.split(b"--" + boundary)[1:-1]:
        head, data = chunk[2:].split(b"\r\n\r\n", 1)
        assert data.endswith(b"\r\n")
        fields = dict(line.split(b": ", 1) for line in head.split(b"\r\n"))
        parts.append((fields[b"Content-Type"].decode(), fields[b"Content-Range"].decode(),
                      data[:-2]))
    return parts


@pytest.mark.parametrize("spec, expected", [
    ("bytes=0-1,5-6", [(0, 2), (5, 7)]),
    ("bytes=0-9,-10", [(0, 10), (1014, 1024)]),
    ("bytes=10-19,500-,", None),  # trailing empty item is malformed
    ("bytes=0-0,2-2,4-4,1000-2000", [(0, 1), (2, 3), (4, 5), (1000, 1024)]),
    ("bytes=0-1,5-6,4000-5000", [(0, 2), (5, 7)]),  # the unsatisfiable one is dropped
])
def test_multiple_ranges_are_multipart(client, spec, expected):
    r = fetch(client, "/data.bin", headers={"Range": spec})
    if expected is None:
        assert r.status_code == 200 and r.data == DATA
        return
    assert r.status_code == 206
    parts = parse_byteranges(r)
    assert [(a, b) for a, b in expected] == [
        (int(cr.split()[1].split("-")[0]), int(cr.split("-")[1].split("/")[0]) + 1)
        for _, cr, _ in parts]
    for (start, stop), (ptype, prange, pdata) in zip(expected, parts):
        assert ptype == "application/octet-stream"
        assert prange == f"bytes {start}-{stop - 1}/1024"
        assert pdata == DATA[start:stop]


def test_multipart_head_has_length_and_no_body(client):
    get = fetch(client, "/data.bin", headers={"Range": "bytes=0-1,5-6"})
    head = fetch(client, "/data.bin", "HEAD", headers={"Range": "bytes=0-1,5-6"})
    assert head.status_code == 206 and head.data == b""
    assert head.headers["Content-Length"] == get.headers["Content-Length"]


@pytest.mark.parametrize("if_range, status", [
    ("{etag}", 206),
    ('"other"', 200),
    ("W/{etag}", 200),  # If-Range needs a strong match
    (LM, 206),
    (BEFORE, 200),
    (AFTER, 200),  # only an exact date match counts
    ("garbage", 200),
])
def test_if_range(client, if_range, status):
    etag = fetch(client, "/data.bin").headers["ETag"]
    r = fetch(client, "/data.bin", headers={
        "Range": "bytes=0-4", "If-Range": if_range.replace("{etag}", etag)})
    assert r.status_code == status
    assert r.data == (DATA[:5] if status == 206 else DATA)


def test_conditional_beats_range(client):
    etag = fetch(client, "/data.bin").headers["ETag"]
    r = fetch(client, "/data.bin", headers={"Range": "bytes=0-4", "If-None-Match": etag})
    assert r.status_code == 304 and r.data == b""


# -- precompressed sidecars --------------------------------------------------------------------

@pytest.mark.parametrize("accept, coding", [
    (None, None),
    ("gzip", "gzip"),
    ("br", "br"),
    ("gzip, br", "br"),
    ("gzip, deflate, br, zstd", "br"),
    ("br;q=0.5, gzip", "gzip"),
    ("br;q=0, gzip;q=0", None),
    ("br;q=0, gzip", "gzip"),
    ("*", "br"),
    ("*;q=0, gzip", "gzip"),
    ("*, br;q=0", "gzip"),
    ("identity", None),
    ("gzip;q=0.5, identity", None),
    ("gzip;q=1, identity;q=0.5", "gzip"),
    ("x-gzip", "gzip"),
    ("GZIP", "gzip"),
    ("deflate", None),
    ("", None),
    (";;;q=x,,", None),
])
def test_sidecar_negotiation(client, accept, coding):
    headers = {"Accept-Encoding": accept} if accept is not None else {}
    r = fetch(client, "/style.css", headers=headers)
    assert r.status_code == 200
    assert r.headers["Vary"] == "Accept-Encoding"
    assert r.headers["Content-Type"] == "text/css; charset=utf-8"
    assert r.headers.get("Content-Encoding") == coding
    expected = {None: CSS, "gzip": CSS_GZ, "br": CSS_BR}[coding]
    assert r.data == expected
    assert r.headers["Content-Length"] == str(len(expected))


def test_sidecar_etags_differ_per_encoding_and_match_their_own_304(client):
    tags = {}
    for accept in ("identity", "gzip", "br"):
        tags[accept] = fetch(client, "/style.css", headers={"Accept-Encoding": accept}).headers[
            "ETag"]
    assert len(set(tags.values())) == 3
    gz = fetch(client, "/style.css", headers={"Accept-Encoding": "gzip",
                                               "If-None-Match": tags["gzip"]})
    assert gz.status_code == 304 and gz.headers["Vary"] == "Accept-Encoding"
    # The gzip tag does not validate the identity representation.
    plain = fetch(client, "/style.css", headers={"If-None-Match": tags["gzip"]})
    assert plain.status_code == 200 and plain.data == CSS


def test_ranges_apply_to_the_selected_encoding(client):
    r = fetch(client, "/style.css", headers={"Accept-Encoding": "gzip", "Range": "bytes=0-9"})
    assert r.status_code == 206
    assert r.data == CSS_GZ[:10]
    assert r.headers["Content-Range"] == f"bytes 0-9/{len(CSS_GZ)}"
    assert r.headers["Content-Encoding"] == "gzip"


@pytest.mark.parametrize("method", ["GET", "HEAD"])
def test_an_unsatisfiable_range_of_a_sidecar_is_a_plain_416(client, method):
    """The 416's body is fileapp's own plain text, not the sidecar's bytes: labelled
    Content-Encoding: gzip it could not be decoded (curl --compressed fails on it, as any
    client decoding the content would); it still names the sidecar's length and ETag."""
    r = fetch(client, "/style.css", method, headers={"Accept-Encoding": "gzip", "Range": "bytes=9999-"})
    assert r.status_code == 416 and r.headers["Content-Range"] == f"bytes */{len(CSS_GZ)}"
    assert "Content-Encoding" not in r.headers and r.headers["Vary"] == "Accept-Encoding"
    assert r.headers["ETag"].endswith('-gz"')
    if method == "GET":
        assert r.data.startswith(b"416 ") and r.headers["Content-Length"] == str(len(r.data))


def test_only_existing_sidecars_are_offered(client):
    r = fetch(client, "/only-gz.js", headers={"Accept-Encoding": "br, gzip"})
    assert r.headers["Content-Encoding"] == "gzip"
    assert gzip.decompress(r.data) == b"console.log(1)\n" * 10
    plain = fetch(client, "/hello.txt", headers={"Accept-Encoding": "br, gzip"})
    assert "Content-Encoding" not in plain.headers and "Vary" not in plain.headers


def test_sidecar_requested_directly_is_a_plain_file(client):
    r = fetch(client, "/style.css.gz", headers={"Accept-Encoding": "gzip"})
    assert r.data == CSS_GZ
    assert "Content-Encoding" not in r.headers


# -- directories -------------------------------------------------------------------------------

@pytest.mark.parametrize("path, query, location", [
    ("/sub", "", "./sub/"),
    ("/sub", "a=1&b=%20", "./sub/?a=1&b=%20"),
    ("/sub/nested", "", "./nested/"),
    ("//evil.com", "", "./evil.com/"),
    ("/http:", "", "./http%3A/"),
    ("", "", "/"),  # empty PATH_INFO at the top: an absolute "/" rather than ".//"
])
def test_directory_redirects_relative(client, path, query, location):
    r = fetch(client, path, query_string=query, raw_path=True)
    assert r.status_code == 301
    assert r.headers["Location"] == location
    assert not r.headers["Location"].startswith("//")
    # Resolved against the request URL, the redirect stays on the same origin.
    target = urljoin(f"http://example.test{path}", location)
    assert target.startswith("http://example.test/")


@pytest.mark.parametrize("raw, location", [
    ("/sub%2Fnested", "./sub%2Fnested/"),
    ("/sub%2fnested?a=1", "./sub%2Fnested/?a=1"),
    ("/sub/%6eested", "./nested/"),  # (an escape that is no slash changes nothing)
])
def test_directory_redirect_keeps_a_slash_sent_encoded_in_its_segment(client, raw, location):
    """PATH_INFO has %2F decoded ("/sub/nested"), but the browser resolves the redirect against
    the URL it asked for, whose last segment is "sub%2Fnested": "./nested/" would send it to
    /nested/, another directory. The segment as sent (RAW_URI) keeps it on /sub%2Fnested/, which
    is /sub/nested/ again."""
    path, _, query = raw.partition("?")
    r = fetch(client, path, query_string=query)
    assert r.status_code == 301 and r.headers["Location"] == location
    target = urljoin(f"http://example.test{path}", location)
    assert unquote(urlsplit(target).path) == "/sub/nested/"


def test_root_and_directory_index(client):
    assert fetch(client, "/").data == b"<h1>home</h1>"
    assert fetch(client, "/sub/").data == b"sub index"
    assert fetch(client, "/sub//").data == b"sub index"


def test_file_with_trailing_slash_is_404(client):
    assert fetch(client, "/hello.txt/").status_code == 404


def test_directory_without_index_is_404_when_listing_is_off(client):
    r = fetch(client, "/sub/nested/")
    assert r.status_code == 404
    assert b"file.txt" not in r.data


def test_configurable_index_names(root):
    write(root / "sub" / "default.htm", b"default page")
    c = Client(create_app(str(root), index_names=("default.htm", "index.html")))
    assert c.get("/sub/").data == b"default page"
    assert c.get("/").data == b"<h1>home</h1>"


def test_listing_escapes_names_and_hides_dotfiles(root):
    write(root / "sub" / "nested" / ".private", b"p")
    c = Client(create_app(str(root), listing=True))
    r = c.get("/sub/nested/")
    assert r.status_code == 200
    assert r.headers["Content-Type"] == "text/html; charset=utf-8"
    assert b"file.txt" in r.data
    assert b"&lt;script&gt;&amp;.txt" in r.data
    assert b"<script>" not in r.data
    assert b"%3Cscript%3E%26.txt" in r.data
    assert b".private" not in r.data
    # An index still wins over the listing.
    assert c.get("/sub/").data == b"sub index"


# -- health ------------------------------------------------------------------------------------

def test_health_ok_and_draining(root):
    app = create_app(str(root))
    c = Client(app)
    r = c.get("/healthcheck")
    assert r.status_code == 200 and r.data == b"ok"
    assert r.headers["Cache-Control"] == "no-store"
    app.health.draining = True
    assert c.get("/healthcheck").status_code == 503
    assert c.get("/hello.txt").status_code == 200  # draining still serves in-flight clients
    app.health.draining = False
    assert c.get("/healthcheck").status_code == 200


def test_health_unhealthy_when_root_is_missing(root, tmp_path):
    c = Client(create_app(str(root)))
    assert c.get("/healthcheck").status_code == 200
    root.rename(tmp_path / "moved")
    r = c.get("/healthcheck")
    assert r.status_code == 503
    assert b"root" in r.data
    (tmp_path / "moved").rename(root)
    assert c.get("/healthcheck").status_code == 200


def test_health_path_takes_precedence_over_a_file(root):
    write(root / "healthcheck", b"a real file")
    assert Client(create_app(str(root))).get("/healthcheck").data == b"ok"
    assert Client(create_app(str(root), health_path=None)).get("/healthcheck").data == (
        b"a real file")
    custom = Client(create_app(str(root), health_path="/_gows/health"))
    assert custom.get("/_gows/health").data == b"ok"
    assert custom.get("/healthcheck").data == b"a real file"


def test_health_rejects_other_methods(root):
    c = Client(create_app(str(root)))
    assert c.post("/healthcheck").status_code == 405
    assert c.head("/healthcheck").status_code == 200


# -- middleware --------------------------------------------------------------------------------

@pytest.fixture
def flask_stack(root):
    import flask  # a test extra: the middleware tests must run, never skip
    app = flask.Flask(__name__)

    @app.route("/")
    def home():
        return "flask home"

    @app.route("/static/dynamic")
    def dynamic():
        return "flask dynamic"

    @app.route("/static/form", methods=["POST"])
    def form():
        return "flask form", 201

    app.wsgi_app = create_app(str(root), app=app.wsgi_app, prefix="/static", health_path=None)
    return app.test_client()


def test_middleware_serves_files_under_prefix(flask_stack):
    r = flask_stack.get("/static/hello.txt")
    assert r.status_code == 200 and r.data == b"hello world\n"
    assert flask_stack.get("/static/sub/").data == b"sub index"
    r = flask_stack.get("/static/sub")
    assert r.status_code == 301 and r.headers["Location"] == "./sub/"
    r = flask_stack.get("/static")
    assert r.status_code == 301 and r.headers["Location"] == "./static/"


def test_middleware_falls_through_to_the_wrapped_app(flask_stack):
    assert flask_stack.get("/").data == b"flask home"
    assert flask_stack.get("/static/dynamic").data == b"flask dynamic"
    r = flask_stack.post("/static/form")
    assert r.status_code == 201 and r.data == b"flask form"
    missing = flask_stack.get("/static/missing.txt")
    assert missing.status_code == 404 and b"404 Not Found\n" != missing.data  # Flask's page
    assert flask_stack.get("/static/.secret").status_code == 404
    assert flask_stack.get("/hello.txt").status_code == 404  # outside the prefix


def test_prefix_without_wrapped_app(root):
    c = Client(create_app(str(root), prefix="/files"))
    assert c.get("/files/hello.txt").data == b"hello world\n"
    assert c.get("/hello.txt").status_code == 404
    assert c.get("/filesystem").status_code == 404
    assert c.get("/healthcheck").status_code == 200


def test_non_ascii_health_path_and_prefix_match_their_requests(root):
    """Options name URL paths as they read ("/santé"); PATH_INFO holds their UTF-8 bytes."""
    write(root / "hello.txt", b"hello world\n")
    c = Client(create_app(str(root), prefix="/stätic", health_path="/santé"))
    assert c.get("/sant%C3%A9").data == b"ok"
    assert c.get("/st%C3%A4tic/hello.txt").data == b"hello world\n"
    r = c.get("/st%C3%A4tic")
    assert r.status_code == 301 and r.headers["Location"] == "./st%C3%A4tic/"


@pytest.mark.parametrize("kwargs", [{"prefix": "static"}, {"prefix": "/static/"},
                                    {"health_path": "health"},
                                    # no request's path can equal these:
                                    {"health_path": "/health?full=1"}, {"health_path": "/health#x"},
                                    {"health_path": "/health%20check"}, {"health_path": "/health check"},
                                    {"health_path": "/health\n"}, {"prefix": "/st%C3%A4tic"},
                                    {"prefix": "/a?b"}, {"prefix": "/a b"}])
def test_bad_options_are_rejected(root, kwargs):
    with pytest.raises(ValueError, match="prefix|health_path"):
        create_app(str(root), **kwargs)


def test_root_must_be_a_directory(root):
    with pytest.raises(ValueError):
        create_app(str(root / "hello.txt"))


def test_dates_in_headers_parse(client):
    r = fetch(client, "/hello.txt")
    assert parse_date(r.headers["Last-Modified"]).timestamp() == MTIME


def test_stale_sidecar_older_than_its_original_is_ignored(root):
    write(root / "style.css", CSS + b"/* edited */\n", mtime=MTIME + 60)
    r = Client(create_app(str(root))).get("/style.css", headers={"Accept-Encoding": "gzip, br"})
    assert "Content-Encoding" not in r.headers
    assert r.data == CSS + b"/* edited */\n"
    assert r.headers["Vary"] == "Accept-Encoding"


def test_redirect_query_is_kept_but_made_safe(client):
    r = fetch(client, "/sub", raw_path=True, query_string="a=%41&b=\u00e9\x7f")
    assert r.status_code == 301
    location = r.headers["Location"]
    assert location.startswith("./sub/?a=%41&b=")
    assert all(33 <= ord(ch) < 127 for ch in location)


def test_unstarted_file_bodies_release_their_descriptor(root):
    """A server may close a response iterable without iterating it (client gone)."""
    from werkzeug.test import EnvironBuilder

    app = create_app(str(root), cache_max_file_size=0)
    fds_before = len(os.listdir("/proc/self/fd"))
    for headers in ({}, {"Range": "bytes=0-1,5-6"}):
        for _ in range(20):
            environ = EnvironBuilder("/data.bin", headers=headers).get_environ()
            body = app(environ, lambda status, headers: None)
            body.close()
    assert len(os.listdir("/proc/self/fd")) <= fds_before + 2
