"""The site settings end to end, through the public port of a real `python -m arbiter` (front
cache on) and its fileapp worker: listings (escaping, hidden entries, JSON, a 100,000-entry
directory listed by pages, the same worker serving other requests between them), the SPA
fallback's rules, error pages and their fallback to the built-in ones, headers by path on
cached and handed-off answers."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

import pytest

from e2e_support import fetch, patterned
from master_support import Master, serving
from support import free_port

pytestmark = pytest.mark.integration

MANY = 100_000
XSS = "<xss>.txt"
BROWSER = {"Accept": "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"}
RULES = [{"match": "/assets/*", "set": {"Cache-Control": "public, max-age=600", "X-Content-Type-Options": "nosniff"}},
         {"match": "*.bin", "set": {"X-Big": "yes"}}]


@pytest.fixture(scope="module")
def site() -> Path:
    """A root with a 100,000-entry directory: in memory (/dev/shm) where there is one, as
    creating that many files through a slow disk's journal takes longer than the test."""
    base = Path(tempfile.mkdtemp(prefix="gows-site-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None))
    root = base / "www"
    (root / "files" / "sub").mkdir(parents=True)
    (root / "files" / XSS).write_bytes(b"x")
    (root / "files" / "b.txt").write_bytes(b"bravo\n")
    (root / "files" / ".env").write_bytes(b"SECRET=1")
    (root / "files" / "out").symlink_to(base)
    (root / "a.txt").write_bytes(b"alpha\n")
    (root / "index.html").write_bytes(b"<h1>app shell</h1>")
    (root / "404.html").write_bytes(b"<h1>custom not found</h1>")
    (root / "assets").mkdir()
    (root / "assets" / "app.js").write_bytes(b"app()")
    (root / "assets" / "big.bin").write_bytes(patterned(100_000))
    (root / "many").mkdir()
    for i in range(MANY):
        os.close(os.open(root / "many" / f"n{i:06d}", os.O_CREAT | os.O_WRONLY, 0o644))
    yield root
    shutil.rmtree(base)


@pytest.fixture(scope="module")
def master(tmp_path_factory, site) -> Master:
    """One worker, so a listing and the other requests meet in the same process."""
    m = serving(tmp_path_factory.mktemp("site-master"), site, 1, cache={"ttl": 0.3},
                admin=f"127.0.0.1:{free_port()}", listing=True, fallback="index.html",
                errorPages={"404": "404.html", "405": "missing-405.html"}, headers=RULES)
    yield m
    m.stop()


def worker_requests(m: Master) -> int:
    admin = int(m.config["admin"].rsplit(":", 1)[1])
    return sum(w["requests"] for w in json.loads(fetch(admin, "GET", "/status.json")[2])["workers"])


def test_listing_through_the_master_escapes_names_and_hides_entries(master):
    status, headers, body = fetch(master.port, "GET", "/files/")
    assert status == 200 and headers["content-type"] == "text/html; charset=utf-8"
    assert b"&lt;xss&gt;.txt" in body and b"<xss>" not in body and b'href="./%3Cxss%3E.txt"' in body
    assert b".env" not in body and b'"./out/"' not in body
    status, headers, body = fetch(master.port, "GET", "/files/", {"Accept": "application/json"})
    assert status == 200 and headers["content-type"] == "application/json" and headers["vary"] == "Accept"
    assert [e["name"] for e in json.loads(body)["entries"]] == [XSS, "b.txt", "sub"]
    # The front cache keeps neither (they vary by Accept): each answer is the one asked for.
    assert fetch(master.port, "GET", "/files/")[1]["content-type"].startswith("text/html")


def test_a_100000_entry_directory_is_listed_by_pages_and_the_worker_serves_others_between_them(master):
    pages: list[dict] = []
    spans: list[tuple[float, float]] = []

    def list_three_pages() -> None:
        query = ""
        for _ in range(3):
            t0 = time.monotonic()
            status, _, body = fetch(master.port, "GET", "/many/" + query, {"Accept": "application/json"}, timeout=60)
            spans.append((t0, time.monotonic()))
            assert status == 200
            pages.append(json.loads(body))
            query = pages[-1]["next"]

    lister = threading.Thread(target=list_three_pages)
    lister.start()
    others: list[tuple[float, float]] = []
    i = 0
    while lister.is_alive():  # distinct targets: the front cache cannot answer them, the worker must
        t0 = time.monotonic()
        status, _, body = fetch(master.port, "GET", f"/a.txt?n={i}")
        assert (status, body) == (200, b"alpha\n")
        others.append((t0, time.monotonic()))
        i += 1
    lister.join()
    assert [p["total"] for p in pages] == [MANY] * 3 and [p["offset"] for p in pages] == [0, 1000, 2000]
    names = [e["name"] for p in pages for e in p["entries"]]
    assert names == [f"n{i:06d}" for i in range(3000)]  # sorted, in pages of 1000, nothing twice
    # A page takes the worker's serving thread for a CPU-bound while (about 0.14 s here, under
    # fileapp.standby's STANDBY, so no thread serves beside it): the requests that came meanwhile
    # are served as soon as it is done, between pages, not held until the lister has them all.
    between = [o for o in others if spans[0][0] < o[0] and o[1] < spans[-1][1]]
    assert between, f"no other request was served between the listing's pages: pages {spans}, others {others[:3]}"
    status, _, body = fetch(master.port, "GET", "/many/?after=n099500")
    assert status == 200 and "100,000 entries, sorted by name, 1,000 per page: showing 99,502\u2013100,000" in body.decode()


def test_spa_fallback_through_the_master_and_its_front_cache(master):
    for _ in range(2):  # the second time the front cache would answer, had it kept the first
        status, headers, body = fetch(master.port, "GET", "/app/route", BROWSER)
        assert (status, body) == (200, b"<h1>app shell</h1>") and "Accept" in headers["vary"]
        status, _, body = fetch(master.port, "GET", "/app/route", {"Accept": "*/*"})
        assert (status, body) == (404, b"<h1>custom not found</h1>")
    assert fetch(master.port, "GET", "/app/main.js", BROWSER)[0] == 404
    assert fetch(master.port, "GET", "/.env", BROWSER)[0] == 404
    assert fetch(master.port, "GET", "/files/out/x", BROWSER)[0] == 404  # a symlink out of the root
    # The health path is the master's own answer (its readiness), never the app shell.
    status, _, body = fetch(master.port, "GET", "/healthcheck", BROWSER)
    assert status == 200 and body != b"<h1>app shell</h1>"
    assert fetch(master.port, "POST", "/app/route", {**BROWSER, "Content-Length": "0"})[0] == 405


def test_error_pages_through_the_master_and_the_built_in_one_when_missing(master, site):
    for _ in range(2):
        status, headers, body = fetch(master.port, "GET", "/nothing.txt")
        assert (status, body) == (404, b"<h1>custom not found</h1>")
        assert headers["content-type"] == "text/html; charset=utf-8"
    status, headers, body = fetch(master.port, "GET", "/nothing.txt", {"If-None-Match": "*"})
    assert (status, body) == (404, b"<h1>custom not found</h1>")
    # A 404 is never kept by the front cache: the file is served once it exists.
    (site / "later.txt").write_bytes(b"here now\n")
    deadline = time.monotonic() + 10
    while fetch(master.port, "GET", "/later.txt")[0] != 200:
        assert time.monotonic() < deadline, "later.txt never served"
        time.sleep(0.1)
    status, headers, body = fetch(master.port, "POST", "/a.txt", {"Content-Length": "0"})
    assert (status, body) == (405, b"405 Method Not Allowed\n")  # its page is missing: the built-in one
    assert headers["allow"] == "GET, HEAD, OPTIONS"


def test_headers_by_path_are_kept_by_the_front_cache_and_on_handed_off_files(master):
    status, first, body = fetch(master.port, "GET", "/assets/app.js")
    assert status == 200 and first["x-content-type-options"] == "nosniff"
    assert first["cache-control"] == "public, max-age=600"
    sent = worker_requests(master)
    for _ in range(3):
        status, headers, _ = fetch(master.port, "GET", "/assets/app.js")
        assert status == 200 and headers["x-content-type-options"] == "nosniff"
        assert headers["cache-control"] == "public, max-age=600"
    status, headers, _ = fetch(master.port, "GET", "/assets/app.js", {"If-None-Match": first["etag"]})
    assert status == 304 and headers["cache-control"] == "public, max-age=600"
    # (each proxy process may miss once)
    assert worker_requests(master) - sent <= len(master.proxies())
    status, headers, body = fetch(master.port, "GET", "/assets/big.bin")  # sent by the proxy (hand-off)
    assert status == 200 and body == patterned(100_000)
    assert headers["x-big"] == "yes" and headers["x-content-type-options"] == "nosniff"
    assert "x-gows-file" not in headers
    assert "x-content-type-options" not in fetch(master.port, "GET", "/a.txt")[1]
