"""fileapp's hand-off to nginx (X-Accel-Redirect) and Apache's mod_xsendfile (X-Sendfile): which
responses are handed off, what the header names, and the options' checks."""
from __future__ import annotations

import os
from urllib.parse import unquote_to_bytes

import pytest
from werkzeug.test import Client

from fileapp import create_app
from fileapp.handoff import FILE_HEADER, MIN_SIZE

pytestmark = pytest.mark.unit

BIG = bytes(range(256)) * (MIN_SIZE // 256 + 4)  # a little over MIN_SIZE
ODD = "dir with space/a%20b?#\u00fc.bin"


@pytest.fixture
def root(tmp_path):
    r = tmp_path / "root"
    (r / "dir with space").mkdir(parents=True)
    (r / "big.bin").write_bytes(BIG)
    (r / ODD).write_bytes(BIG)
    (r / "small.txt").write_bytes(b"small\n")
    (r / "huge.bin").write_bytes(BIG * 16)  # past the cache limit below: streamed from disk
    (r / "page.html").write_bytes(b"<p>" * MIN_SIZE)
    (r / "page.html.gz").write_bytes(b"\x1f\x8b" + BIG)  # a precompressed sidecar
    (r / "link.bin").symlink_to("big.bin")
    (tmp_path / "secret.bin").write_bytes(BIG)
    (r / "escape.bin").symlink_to(tmp_path / "secret.bin")
    return r


def client(root, **options) -> Client:
    return Client(create_app(str(root), cache_max_file_size=len(BIG) + 1, **options))


@pytest.fixture
def nginx(root):
    return client(root, sendfile_header="X-Accel-Redirect")


@pytest.mark.parametrize("name", ["big.bin", "huge.bin"])
def test_x_accel_redirect_names_the_file_under_the_internal_prefix(nginx, name):
    own = nginx.head(f"/{name}")
    r = nginx.get(f"/{name}")
    assert r.status_code == 200 and r.data == b""
    assert r.headers["X-Accel-Redirect"] == f"/_fileapp/{name}"
    assert r.headers["Content-Length"] == "0"
    # nginx keeps Content-Type and Cache-Control; the README's snippet puts ETag back.
    for header in ("ETag", "Last-Modified", "Cache-Control", "Content-Type"):
        assert r.headers[header] == own.headers[header]
    assert "Accept-Ranges" not in r.headers  # nginx adds its own for the file it sends
    assert FILE_HEADER not in r.headers


def test_the_prefix_is_configurable_and_the_path_percent_encoded(root):
    r = client(root, sendfile_header="X-Accel-Redirect", sendfile_prefix="/protected/www/").get(
        "/dir%20with%20space/a%2520b%3F%23%C3%BC.bin")
    value = r.headers["X-Accel-Redirect"]
    assert value == "/protected/www/dir%20with%20space/a%2520b%3F%23%C3%BC.bin"
    assert unquote_to_bytes(value) == b"/protected/www/" + ODD.encode()


def test_x_sendfile_names_the_real_absolute_path(root, tmp_path):
    os.symlink(root, tmp_path / "alias")  # the root given through a symlink: the real path goes out
    app = client(tmp_path / "alias", sendfile_header="X-Sendfile")
    r = app.get("/dir%20with%20space/a%2520b%3F%23%C3%BC.bin")
    assert r.status_code == 200 and r.data == b"" and r.headers["Content-Length"] == "0"
    assert unquote_to_bytes(r.headers["X-Sendfile"]) == os.fsencode(root / ODD)
    assert r.headers["X-Sendfile"].startswith(str(root) + "/dir%20with%20space/")
    assert r.headers["Accept-Ranges"] == "bytes"  # Apache keeps the script's headers
    assert app.get("/big.bin").headers["X-Sendfile"] == f"{root}/big.bin"


def test_a_symlink_inside_the_root_is_named_by_its_target(nginx):
    assert nginx.get("/link.bin").headers["X-Accel-Redirect"] == "/_fileapp/big.bin"


def test_a_symlink_leading_outside_the_root_is_never_named(nginx):
    r = nginx.get("/escape.bin")
    assert r.status_code == 404 and "X-Accel-Redirect" not in r.headers


@pytest.mark.parametrize("path, headers, status", [
    ("/small.txt", {}, 200),  # small bodies go with the head
    ("/big.bin", {"Range": "bytes=0-40000"}, 206),  # nginx and Apache would cut ranges again
    ("/big.bin", {"Range": "bytes=0-9,100-40000"}, 206),
    ("/big.bin", {"Range": "bytes=0-", "If-Range": '"stale"'}, 200),
    ("/big.bin", {"If-None-Match": '"other"'}, 200),  # preconditions they would evaluate again
    ("/big.bin", {"If-Modified-Since": "Thu, 01 Jan 1970 00:00:00 GMT"}, 200),
    ("/big.bin", {"If-Match": "*"}, 200),
    ("/big.bin", {"If-Unmodified-Since": "Fri, 01 Jan 2100 00:00:00 GMT"}, 200),
    ("/page.html", {"Accept-Encoding": "gzip"}, 200),  # both drop Content-Encoding
])
def test_fileapp_sends_what_the_server_in_front_would_decide_again(nginx, path, headers, status):
    r = nginx.get(path, headers=headers)
    assert r.status_code == status and r.data
    assert "X-Accel-Redirect" not in r.headers


def test_the_identity_of_a_file_with_a_sidecar_is_handed_off_with_its_vary(nginx):
    r = nginx.get("/page.html")
    assert r.headers["X-Accel-Redirect"] == "/_fileapp/page.html"
    assert r.headers["Vary"] == "Accept-Encoding" and "Content-Encoding" not in r.headers


def test_head_conditionals_and_errors_are_never_handed_off(nginx):
    head = nginx.head("/big.bin")
    assert head.headers["Content-Length"] == str(len(BIG))
    assert "X-Accel-Redirect" not in head.headers
    r = nginx.get("/big.bin", headers={"If-None-Match": head.headers["ETag"]})
    assert r.status_code == 304 and "X-Accel-Redirect" not in r.headers
    assert nginx.get("/big.bin", headers={"If-Match": '"other"'}).status_code == 412
    assert nginx.get("/missing").status_code == 404


def test_without_sendfile_header_nothing_changes(root):
    r = client(root).get("/big.bin")
    assert r.data == BIG and r.headers["Content-Length"] == str(len(BIG))
    assert "X-Accel-Redirect" not in r.headers and "X-Sendfile" not in r.headers


def test_gows_proxy_asking_with_its_secret_gets_its_own_hand_off(root):
    app = client(root, sendfile_header="X-Accel-Redirect", handoff_token="tok")
    r = app.get("/big.bin", headers={"X-Gows-Handoff": "tok"})
    assert FILE_HEADER in r.headers and "X-Accel-Redirect" not in r.headers
    r = app.get("/huge.bin", headers={"X-Gows-Handoff": "tok", "Range": "bytes=0-40000"})
    assert r.status_code == 206 and FILE_HEADER in r.headers
    r = app.get("/big.bin", headers={"X-Gows-Handoff": "wrong"})
    assert r.headers["X-Accel-Redirect"] == "/_fileapp/big.bin" and FILE_HEADER not in r.headers


def test_a_handed_off_stream_leaves_no_descriptor_open(nginx):
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(50):
        assert nginx.get("/huge.bin").headers["X-Accel-Redirect"] == "/_fileapp/huge.bin"
    assert len(os.listdir("/proc/self/fd")) == before


@pytest.mark.parametrize("options, message", [
    ({"sendfile_header": "X-Accel"}, "sendfile_header must be one of"),
    ({"sendfile_header": "x-sendfile"}, "sendfile_header must be one of"),
    ({"sendfile_prefix": "/_fileapp/"}, "sendfile_prefix needs sendfile_header"),
    ({"sendfile_header": "X-Sendfile", "sendfile_prefix": "/x/"},
     "applies to X-Accel-Redirect only"),
    *[({"sendfile_header": "X-Accel-Redirect", "sendfile_prefix": bad}, "sendfile_prefix must be")
      for bad in ("_fileapp/", "/_fileapp", "", "/a/../b/", "/a/./b/", "/a?b/", "/a#/",
                  "/a%2e/", "/a b/", "/a\nb/", "@named/")],
])
def test_bad_options_raise_value_error_naming_the_problem(root, options, message):
    with pytest.raises(ValueError, match=message):
        create_app(str(root), **options)


@pytest.mark.parametrize("header", ["X-Accel-Redirect", "X-Sendfile"])
def test_a_file_changed_within_the_ttl_is_named_only_with_its_own_head(root, tmp_path, header):
    """The server in front opens the path it is named: fileapp checks the file is still the one
    its head describes first, even one small enough for the cache to hold its bytes (which a hit
    would otherwise serve without looking at the disk). A file replaced gets its own validators;
    one replaced by a symlink out of the root is not named at all."""
    app = Client(create_app(str(root), sendfile_header=header, cache_ttl=3600))
    first = app.get("/big.bin")
    assert header in first.headers
    new = BIG * 2  # the same name deployed anew (rename over it), within the TTL
    (root / "next.tmp").write_bytes(new)
    os.replace(root / "next.tmp", root / "big.bin")
    r = app.get("/big.bin")
    fresh = Client(create_app(str(root))).head("/big.bin")
    assert r.headers["ETag"] == fresh.headers["ETag"] != first.headers["ETag"]
    assert r.headers["Last-Modified"] == fresh.headers["Last-Modified"]
    (root / "big.bin").unlink()
    (root / "big.bin").symlink_to(tmp_path / "secret.bin")
    r = app.get("/big.bin")
    assert r.status_code == 404 and header not in r.headers
