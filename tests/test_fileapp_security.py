"""No request escapes the document root: a generated traversal corpus, symlinks out (sidecars
included), dotfiles, special files, files swapped between check and open, and header fuzzing
that must never produce a 500."""
from __future__ import annotations

import itertools
import os
import random
import secrets
import socket
import subprocess
import sys
from urllib.parse import unquote_to_bytes

import pytest
from werkzeug.test import Client, EnvironBuilder, run_wsgi_app

from fileapp import create_app
from fileapp.files import Resolver
from support import free_port, python_env, stop_process, wait_for_port

pytestmark = pytest.mark.unit

SECRET = b"TOP-SECRET-" + secrets.token_hex(8).encode()
DOT_SECRET = b"DOT-SECRET-" + secrets.token_hex(8).encode()
PASSWD_MARK = b"root:x:0:0"


@pytest.fixture
def tree(tmp_path):
    """root/ with traps around it; tmp_path/secret.txt is outside the root."""
    outside = tmp_path
    (outside / "secret.txt").write_bytes(SECRET)
    (outside / "secret.txt.gz").write_bytes(SECRET)
    (outside / "elsewhere").mkdir()
    (outside / "elsewhere" / "victim.txt").write_bytes(SECRET)
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "public.txt").write_bytes(b"public")
    (root / "sub" / "ok.txt").write_bytes(b"ok")
    (root / "link-out").symlink_to(outside / "secret.txt")
    (root / "rel-link-out").symlink_to("../secret.txt")
    (root / "dirlink-out").symlink_to(outside)
    (root / "link-in").symlink_to("public.txt")
    (root / "sub" / "link-up-in").symlink_to("../public.txt")
    (root / ".hidden-file").write_bytes(DOT_SECRET)
    (root / ".git").mkdir()
    (root / ".git" / "config").write_bytes(DOT_SECRET)
    (root / "link-to-dot").symlink_to(".hidden-file")
    (root / "page.txt").write_bytes(b"page")
    (root / "page.txt.gz").symlink_to(outside / "secret.txt")
    (root / "page.txt.br").symlink_to("../secret.txt")
    (root / "loop").symlink_to("loop")
    (root / ".well-known").mkdir()
    (root / ".well-known" / "acme.txt").write_bytes(b"challenge")
    (root / "d").mkdir()
    (root / "d" / "victim.txt").write_bytes(b"innocent")
    os.mkfifo(root / "fifo")
    return root


def traversal_corpus(secret_abs: str) -> list[str]:
    """Raw (percent-encoded, as sent on the wire) request targets that try to leave the root."""
    dots = ["..", "%2e%2e", "%2E%2E", ".%2e", "%2e.", "%252e%252e", "%c0%ae%c0%ae",
            "%e0%80%ae%e0%80%ae", "%c0%2e%c0%2e", "..%00", "%ef%bc%8e%ef%bc%8e", "...."]
    seps = ["/", "%2f", "%2F", "\\", "%5c", "%5C", "%252f", "%c0%af", "%e0%80%af", "%c1%9c"]
    targets = ["secret.txt", "elsewhere/victim.txt"]
    corpus = []
    for dot, sep, depth, target in itertools.product(dots, seps, (1, 2, 3), targets):
        corpus.append("/" + (dot + sep) * depth + target.replace("/", sep))
    for dot, sep in itertools.product(dots[:4], seps[:6]):
        corpus.append("/sub" + sep + (dot + sep) * 2 + "secret.txt")
        corpus.append("/" + (dot + sep) * 12 + "etc" + sep + "passwd")
    quoted_abs = secret_abs.replace("/", "%2f")
    corpus += [
        secret_abs, "/" + secret_abs, "//" + secret_abs.lstrip("/"), "/%2f" + quoted_abs,
        "/" + quoted_abs, "/\\" + secret_abs, "/%5c" + secret_abs, "/file:" + secret_abs,
        "/etc/passwd", "//etc/passwd", "/%2fetc%2fpasswd", "/../../../../etc/passwd",
        "/public.txt%00../secret.txt", "/%00/../secret.txt", "/..;/secret.txt",
        "/sub/..%2f..%2fsecret.txt", "/sub/%2e%2e/%2e%2e/secret.txt", "/./../secret.txt",
        "/link-out", "/rel-link-out", "/dirlink-out/secret.txt", "/dirlink-out/elsewhere/victim.txt",
        "/dirlink-out/root/public.txt", "/link-to-dot", "/.hidden-file", "/.git/config",
        "/%2egit/config", "/.git%2fconfig", "/sub/../.hidden-file", "/loop", "/loop/x",
        "/page.txt.gz", "/page.txt.br", "/fifo", "/" + "a" * 5000, "/a" * 3000,
        "/%ff%fe", "/%c0%80", "/%", "/%zz", "/%%32%65%%32%65/secret.txt",
    ]
    return corpus


def path_info(raw: str) -> str:
    """PATH_INFO for a raw target, decoded once as a WSGI server does (bytes as latin-1)."""
    return unquote_to_bytes(raw.split("?", 1)[0]).decode("latin-1")


HEADER_SETS = [
    {},
    {"Accept-Encoding": "gzip, br"},
    {"Accept-Encoding": "br", "Range": "bytes=0-"},
]


@pytest.mark.parametrize("options", [{}, {"cache_max_file_size": 0}, {"listing": True}],
                         ids=["memory", "stream", "listing"])
def test_traversal_corpus_never_leaks(tree, options):
    client = Client(create_app(str(tree), **options))
    corpus = traversal_corpus(str(tree.parent / "secret.txt"))
    assert len(corpus) > 500
    statuses = set()
    for target in [path_info(raw) for raw in corpus]:
        for headers in HEADER_SETS:
            r = client.open("/", headers=headers, environ_overrides={"PATH_INFO": target})
            statuses.add(r.status_code)
            assert r.status_code < 500, (target, r.status_code)
            body = r.get_data()
            assert SECRET not in body and DOT_SECRET not in body, target
            assert PASSWD_MARK not in body, target
            if r.status_code in (200, 206):
                # The only files reachable through these paths are the public ones.
                assert body in (b"public", b"ok", b"page", b"") or body.startswith(b"<!doctype")
    assert 404 in statuses


@pytest.mark.parametrize("target", ["/\u2603", "/sub/\u2603/../../secret.txt", "/\udcff"])
def test_path_info_outside_latin1_is_404(tree, target):
    """A lax server may hand over PATH_INFO that is not latin-1 text; that is a 404, not a 500."""
    environ = EnvironBuilder("/").get_environ()
    environ["PATH_INFO"] = target
    app_iter, status, _ = run_wsgi_app(create_app(str(tree)), environ)
    assert status.startswith("404")
    assert SECRET not in b"".join(app_iter)


def test_positive_control_the_secret_is_detectable(tree):
    """Guards the corpus test: were the secret under the root, the same check would see it."""
    (tree / "copy.txt").write_bytes(SECRET)
    assert SECRET in Client(create_app(str(tree))).get("/copy.txt").data


def test_symlinks_inside_the_root_are_followed(tree):
    c = Client(create_app(str(tree)))
    assert c.get("/link-in").data == b"public"
    assert c.get("/sub/link-up-in").data == b"public"


def test_sidecar_symlinked_out_is_never_selected(tree):
    c = Client(create_app(str(tree)))
    for accept in ("gzip", "br", "br, gzip", "*"):
        r = c.get("/page.txt", headers={"Accept-Encoding": accept})
        assert r.status_code == 200
        assert r.data == b"page"
        assert "Content-Encoding" not in r.headers


@pytest.mark.parametrize("path", ["/.hidden-file", "/.git/config", "/.git/", "/.git",
                                  "/sub/../.hidden-file", "/link-to-dot"])
def test_dotfiles_are_404(tree, path):
    r = Client(create_app(str(tree), listing=True)).get(path)
    assert r.status_code == 404


def test_well_known_is_served(tree):
    assert Client(create_app(str(tree))).get("/.well-known/acme.txt").data == b"challenge"


def test_listing_never_shows_dot_entries(tree):
    r = Client(create_app(str(tree), listing=True)).get("/")
    assert r.status_code == 200
    assert b"public.txt" in r.data
    assert b".hidden-file" not in r.data and b".git" not in r.data


def test_fifo_is_404_without_blocking(tree):
    assert Client(create_app(str(tree))).get("/fifo").status_code == 404


@pytest.mark.parametrize("options", [{"cache_max_file_size": 0}, {"cache_ttl": 0}],
                         ids=["stream", "nocache"])
def test_file_swapped_for_symlink_after_caching_is_not_followed(tree, options):
    c = Client(create_app(str(tree), **options))
    assert c.get("/d/victim.txt").data == b"innocent"
    (tree / "d" / "victim.txt").unlink()
    (tree / "d" / "victim.txt").symlink_to(tree.parent / "secret.txt")
    r = c.get("/d/victim.txt")
    assert r.status_code == 404 and SECRET not in r.data


@pytest.mark.parametrize("options", [{"cache_max_file_size": 0}, {"cache_ttl": 0}],
                         ids=["stream", "nocache"])
def test_directory_swapped_for_symlink_after_caching_is_not_followed(tree, options):
    c = Client(create_app(str(tree), **options))
    assert c.get("/d/victim.txt").data == b"innocent"
    (tree / "d").rename(tree / "d-old")
    (tree / "d").symlink_to(tree.parent / "elsewhere")
    r = c.get("/d/victim.txt")
    assert r.status_code == 404 and SECRET not in r.data


def test_open_does_not_follow_a_symlink_swapped_in_after_the_check(tree, monkeypatch):
    """The race itself: realpath saw a directory, then `d` became a symlink before the open."""
    resolver = Resolver(str(tree))
    assert resolver.real_parts(["d", "victim.txt"]) == ["d", "victim.txt"]
    (tree / "d").rename(tree / "d-old")
    (tree / "d").symlink_to(tree.parent / "elsewhere")
    monkeypatch.setattr(resolver, "real_parts", lambda parts: ["d", "victim.txt"])
    assert resolver.open(["d", "victim.txt"]) is None
    # and the final component alike
    (tree / "d").unlink()
    (tree / "d-old").rename(tree / "d")
    (tree / "d" / "victim.txt").unlink()
    (tree / "d" / "victim.txt").symlink_to(tree.parent / "secret.txt")
    assert resolver.open(["d", "victim.txt"]) is None


def test_a_path_without_symlinks_is_opened_without_resolving_it(tree, monkeypatch):
    """The common case is walked as it is (no realpath: an lstat per component from /); a
    symlink on the way, in the root or out of it, goes through realpath and its checks."""
    import fileapp.files as files
    resolver = Resolver(str(tree))
    resolved = []
    realpath = os.path.realpath
    monkeypatch.setattr(files.os.path, "realpath", lambda p: resolved.append(p) or realpath(p))
    for parts in (["public.txt"], ["sub", "ok.txt"], ["sub"], []):
        opened = resolver.open(parts)
        assert opened is not None and opened.direct and opened.path == os.path.join(resolver.root, *parts)
        os.close(opened.fd)
    assert resolved == []
    opened = resolver.open(["sub", "link-up-in"])
    assert opened is not None and not opened.direct and opened.path == os.path.join(resolver.root, "public.txt")
    os.close(opened.fd)
    for parts in (["link-out"], ["dirlink-out", "victim.txt"], ["link-to-dot"], ["loop"], ["loop", "x"]):
        assert resolver.open(parts) is None
    assert len(resolved) == 6
    # Not a directory on the way, or not a file at the end: absent, and nothing blocks on the FIFO.
    for parts in (["public.txt", "x"], ["fifo"], ["fifo", "x"], ["missing", "x"], ["sub", "missing"]):
        assert resolver.open(parts) is None


def test_a_file_without_sidecars_is_opened_once(tree, monkeypatch):
    """A sidecar that is not there is ruled out by one lstat, not a walk; the file's own
    descriptor from the resolution is the one read."""
    app = create_app(str(tree))
    opened = []
    real_open = app.resolver.open
    monkeypatch.setattr(app.resolver, "open", lambda parts: opened.append(parts) or real_open(parts))
    c = Client(app)
    assert c.get("/sub/ok.txt", headers={"Accept-Encoding": "br, gzip"}).data == b"ok"
    assert opened == [["sub", "ok.txt"]]
    # A sidecar that is there is opened (and checked) as any file is.
    (tree / "sub" / "ok.txt.gz").write_bytes(b"gzipped")
    os.utime(tree / "sub" / "ok.txt.gz", ns=(os.stat(tree / "sub" / "ok.txt").st_mtime_ns + 1,) * 2)
    r = Client(create_app(str(tree))).get("/sub/ok.txt", headers={"Accept-Encoding": "gzip"})
    assert r.headers.get("Content-Encoding") == "gzip" and r.data == b"gzipped"


def test_reopen_refuses_another_inode(tree):
    resolver = Resolver(str(tree))
    opened = resolver.open(["public.txt"])
    os.close(opened.fd)
    assert resolver.reopen(opened.path, opened.st.st_dev, opened.st.st_ino) is not None
    (tree / "public.txt").unlink()
    (tree / "public.txt").write_bytes(b"replaced")
    assert resolver.reopen(opened.path, opened.st.st_dev, opened.st.st_ino) is None


def _fuzz_values(rng: random.Random, count: int) -> list[str]:
    alphabet = 'abyz019-=,;*" \tW/\\%:.\x7f\u00e9'
    fixed = ["", " ", ",", "*", "bytes=", "bytes=-", "bytes=0--1", "bytes=99999999999999999999-",
             "bytes=-99999999999999999999", "W/", '"', 'W/"', "q=", "gzip;q=", "gzip;q=2",
             "gzip;q=-1", "gzip;q=nan", "br;q=1e400", "Mon, 32 Foo 2024", "0", "-1",
             "Thu, 01 Jan 1970 00:00:00 GMT", "Fri, 31 Dec 9999 23:59:59 GMT",
             "bytes=" + ",".join(["0-0"] * 500), "bytes=" + "1" * 5000 + "-"]
    return fixed + ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40)))
                    for _ in range(count)]


def test_header_fuzz_never_500(tree):
    rng = random.Random(20240611)
    c = Client(create_app(str(tree)))
    names = ["Range", "If-Range", "If-Match", "If-None-Match", "If-Modified-Since",
             "If-Unmodified-Since", "Accept-Encoding"]
    values = _fuzz_values(rng, 150)
    for value in values:
        for name in names:
            for path in ("/public.txt", "/page.txt"):
                r = c.get(path, headers={name: value})
                assert r.status_code < 500, (name, value, r.status_code)
    for _ in range(300):
        headers = {name: rng.choice(values) for name in rng.sample(names, 3)}
        r = c.get("/public.txt", headers=headers)
        assert r.status_code < 500, headers


@pytest.mark.parametrize("method", ["GET", "HEAD", "POST", "OPTIONS", "PROPFIND", "get", "X" * 50])
def test_any_method_is_not_500(tree, method):
    r = Client(create_app(str(tree))).open("/public.txt", method=method)
    assert r.status_code < 500


# -- the same corpus over a real socket, through gunicorn --------------------------------------

def _raw_request(port: int, target: str) -> tuple[int, bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(f"GET {target} HTTP/1.1\r\nHost: t\r\nAccept-Encoding: gzip, br\r\n"
                  "Connection: close\r\n\r\n".encode("latin-1"))
        chunks = []
        while True:
            data = s.recv(65536)
            if not data:
                break
            chunks.append(data)
    response = b"".join(chunks)
    status = int(response.split(b" ", 2)[1]) if response.startswith(b"HTTP/") else 0
    return status, response


@pytest.mark.integration  # starts a server process
def test_traversal_corpus_over_gunicorn(tree):
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "fileapp", "--root", str(tree), "--port", str(port),
         "--log-level", "error"],
        env=python_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for_port(port, timeout=20)
        corpus = traversal_corpus(str(tree.parent / "secret.txt"))
        # Targets the HTTP parser itself accepts; gunicorn answers 400 to the others, fine too.
        sample = [t for t in corpus if " " not in t and len(t) < 4000][::2]
        assert len(sample) > 250
        for target in sample:
            status, response = _raw_request(port, target)
            assert status and status < 500, (target, status)
            assert SECRET not in response and DOT_SECRET not in response, target
            assert PASSWD_MARK not in response, target
    finally:
        stop_process(proc)
