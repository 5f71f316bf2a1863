"""fileapp's site features through werkzeug's test Client and embedded in Flask: directory
listings (escaping, hidden entries, JSON, pages, memory bounded by the page), the single-page
app fallback's rules, error pages and their fallback to the built-in ones, headers by path."""
from __future__ import annotations

import json
import os
import re
import tracemalloc
from html.parser import HTMLParser

import pytest
from werkzeug.middleware.dispatcher import DispatcherMiddleware
from werkzeug.test import Client

from fileapp import create_app, listing
from fileapp.handoff import FILE_HEADER, MIN_SIZE

pytestmark = pytest.mark.unit

TOKEN = "t0ken"
XSS = "<xss>.txt"
IMG = '<img src=x onerror="alert(1)">.txt'


@pytest.fixture
def root(tmp_path):
    r = tmp_path / "root"
    (r / "files" / "sub").mkdir(parents=True)
    (r / "files" / "a.txt").write_bytes(b"a" * 1500)
    (r / "files" / XSS).write_bytes(b"x")
    (r / "files" / IMG).write_bytes(b"y")
    (r / "files" / ".env").write_bytes(b"SECRET=1")
    (r / "files" / ".git").mkdir()
    (r / "files" / "link-in").symlink_to("a.txt")
    (r / "files" / "link-out").symlink_to(tmp_path / "outside.txt")
    (r / "files" / "link-dot").symlink_to(".env")
    (r / "files" / "back\\slash.txt").write_bytes(b"z")
    os.mkfifo(r / "files" / "fifo")
    (r / "files" / os.fsdecode(b"latin-\xe9.txt")).write_bytes(b"not utf-8")
    (tmp_path / "outside.txt").write_bytes(b"outside")
    (r / "index.html").write_bytes(b"<h1>app shell</h1>")
    (r / "404.html").write_bytes(b"<h1>custom not found</h1>")
    (r / "assets" / "css").mkdir(parents=True)
    (r / "assets" / "app.js").write_bytes(b"app()")
    (r / "assets" / "css" / "site.css").write_bytes(b"body{}")
    (r / "assets" / "big.bin").write_bytes(b"B" * (MIN_SIZE + 10))
    (r / "other.txt").write_bytes(b"other")
    (r / "withindex").mkdir()
    (r / "withindex" / "index.html").write_bytes(b"the index")
    return r


class _Links(HTMLParser):
    """The hrefs and the text a browser would show."""

    def __init__(self) -> None:
        super().__init__()
        self.hrefs: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "a":
            self.hrefs.append(dict(attrs)["href"])

    def handle_data(self, data):
        self.text.append(data)


def parsed(body: bytes) -> _Links:
    p = _Links()
    p.feed(body.decode())
    return p


# -- listings ----------------------------------------------------------------------------------

def test_listing_keeps_names_as_text_and_links_them_percent_encoded(root):
    r = Client(create_app(str(root), listing=True)).get("/files/")
    assert r.status_code == 200 and r.headers["Content-Type"] == "text/html; charset=utf-8"
    assert r.headers["Vary"] == "Accept"
    assert b"<xss>" not in r.data and b"<img" not in r.data
    page = parsed(r.data)
    shown = "".join(page.text)
    assert XSS in shown and IMG in shown  # as text, exactly as named
    assert "./%3Cxss%3E.txt" in page.hrefs
    assert "./" + "%3Cimg%20src%3Dx%20onerror%3D%22alert%281%29%22%3E.txt" in page.hrefs
    assert "../" in page.hrefs  # the parent link
    assert "1.5 KiB" in shown and re.search(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\dZ", shown)


def test_listing_hides_what_the_app_refuses_to_serve(root):
    c = Client(create_app(str(root), listing=True))
    names = [e["name"] for e in c.get("/files/", headers={"Accept": "application/json"}).json["entries"]]
    assert names == sorted(names)
    assert set(names) == {"a.txt", XSS, IMG, "link-in", "sub"}
    # ... and each listed link is served (hidden ones are not: the same rules).
    for name in names:
        assert c.get("/files/" + name + ("/" if name == "sub" else "")).status_code == 200, name
    for hidden in (".env", ".git/", "link-out", "link-dot", "fifo"):
        assert c.get("/files/" + hidden).status_code == 404, hidden


def test_listing_as_json_on_accept(root):
    c = Client(create_app(str(root), listing=True))
    r = c.get("/files/", headers={"Accept": "application/json"})
    assert r.status_code == 200 and r.headers["Content-Type"] == "application/json"
    assert r.headers["Vary"] == "Accept"
    data = r.json
    assert data["path"] == "/files/" and data["total"] == 5 and data["offset"] == 0
    assert data["next"] is None and data["previous"] is None
    by_name = {e["name"]: e for e in data["entries"]}
    assert by_name["a.txt"]["size"] == 1500 and by_name["a.txt"]["type"] == "file"
    assert by_name["sub"] == {**by_name["sub"], "type": "directory", "size": None}
    assert by_name[XSS]["modified"].endswith("Z")
    # HTML wins a tie, and is the answer to browsers and to */*.
    for accept in ("*/*", "text/html,application/json", "text/html,application/xhtml+xml,*/*;q=0.8", None):
        headers = {"Accept": accept} if accept else {}
        assert c.get("/files/", headers=headers).headers["Content-Type"].startswith("text/html"), accept


def test_index_wins_over_the_listing_and_a_slashless_directory_redirects(root):
    c = Client(create_app(str(root), listing=True))
    assert c.get("/withindex/").data == b"the index"
    r = c.get("/files")
    assert r.status_code == 301 and r.headers["Location"] == "./files/"
    assert c.head("/files/").data == b"" and c.head("/files/").status_code == 200


def test_listing_is_off_by_default(root):
    assert Client(create_app(str(root))).get("/files/").status_code == 404


def test_pages_follow_each_other_by_name_and_cover_every_entry_once(tmp_path, monkeypatch):
    monkeypatch.setattr(listing, "PAGE_SIZE", 10)
    (tmp_path / "many").mkdir()
    names = sorted(f"f{i:03d}.txt" for i in range(25))
    for name in names:
        (tmp_path / "many" / name).write_bytes(b"")
    c = Client(create_app(str(tmp_path), listing=True))
    seen, query, offsets = [], "", []
    while query is not None:
        data = c.get("/many/" + query, headers={"Accept": "application/json"}).json
        assert data["total"] == 25 and len(data["entries"]) <= 10
        offsets.append(data["offset"])
        seen += [e["name"] for e in data["entries"]]
        query = data["next"]
    assert seen == names and offsets == [0, 10, 20]
    back = c.get("/many/?before=f020.txt", headers={"Accept": "application/json"}).json
    assert [e["name"] for e in back["entries"]] == names[10:20] and back["offset"] == 10
    assert back["previous"] == "?before=f010.txt" and back["next"] == "?after=f019.txt"
    html = c.get("/many/?after=f009.txt").data.decode()
    assert "25 entries, sorted by name, 10 per page: showing 11\u201320" in html
    assert 'href="?after=f019.txt"' in html and 'href="?before=f010.txt"' in html


def fill(directory, count: int) -> None:
    """`count` empty files with longish names in a new `directory`."""
    directory.mkdir()
    for i in range(count):
        os.close(os.open(directory / f"entry-with-a-longish-name-{i:06d}.txt", os.O_CREAT | os.O_WRONLY, 0o644))


def _peak_listing_bytes(client: Client, path: str) -> int:
    tracemalloc.start()
    try:
        r = client.get(path, headers={"Accept": "application/json"})
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert r.status_code == 200 and len(r.json["entries"]) == listing.PAGE_SIZE
    return peak


def test_listing_memory_is_bounded_by_the_page_not_the_directory(tmp_path, monkeypatch):
    """A directory eight times bigger costs the same memory to list: one page is kept."""
    monkeypatch.setattr(listing, "PAGE_SIZE", 100)
    fill(tmp_path / "small", 800)
    fill(tmp_path / "large", 6_400)
    c = Client(create_app(str(tmp_path), listing=True))
    small = _peak_listing_bytes(c, "/small/")
    large = _peak_listing_bytes(c, "/large/")
    # Holding the large directory's names alone would take about 0.8 MB more.
    assert large < small * 1.5 + 100_000, (small, large)


def test_listings_beyond_the_limit_at_once_get_503(root):
    app = create_app(str(root), listing=True)
    for _ in range(listing.LISTINGS_AT_ONCE):
        assert app.lister.slots.acquire(blocking=False)
    r = Client(app).get("/files/")
    assert r.status_code == 503 and r.headers["Retry-After"] == "1"
    app.lister.slots.release()
    assert Client(app).get("/files/").status_code == 200


# -- single-page app fallback --------------------------------------------------------------------

BROWSER = {"Accept": "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"}


@pytest.fixture
def spa(root):
    return Client(create_app(str(root), fallback="index.html"))


@pytest.mark.parametrize("path", ["/dashboard", "/users/42/edit", "/v1.2/users", "/files/nothing/"])
def test_fallback_answers_unknown_html_paths_with_the_app_page(spa, path):
    r = spa.get(path, headers=BROWSER)
    assert r.status_code == 200 and r.data == b"<h1>app shell</h1>"
    assert r.headers["Content-Type"] == "text/html; charset=utf-8"
    assert "Accept" in r.headers["Vary"]
    etag = r.headers["ETag"]
    again = spa.get(path, headers={**BROWSER, "If-None-Match": etag})
    assert again.status_code == 304 and "Accept" in again.headers["Vary"]
    head = spa.head(path, headers=BROWSER)
    assert head.status_code == 200 and head.data == b""


@pytest.mark.parametrize("accept", [None, "*/*", "application/json", "text/*", "text/html;q=0"])
def test_fallback_needs_text_html_named_in_accept(spa, accept):
    headers = {"Accept": accept} if accept else {}
    assert spa.get("/dashboard", headers=headers).status_code == 404


@pytest.mark.parametrize("path", ["/app.js", "/assets/missing.css", "/favicon.ico", "/users/42/photo.png"])
def test_fallback_never_answers_a_path_with_a_file_extension(spa, path):
    assert spa.get(path, headers=BROWSER).status_code == 404


@pytest.mark.parametrize("path", ["/.env", "/.git/config", "/files/.git/", "/files/link-out", "/files/link-out/x",
                                  "/files/link-dot", "/%2e%2e/etc/passwd"])
def test_fallback_never_answers_a_path_refused_for_security(root, spa, path):
    r = spa.get(path, headers=BROWSER)
    assert r.status_code == 404 and b"app shell" not in r.data


def test_fallback_never_answers_the_health_path_or_other_methods(root):
    c = Client(create_app(str(root), fallback="index.html", health_path="/health"))
    assert c.get("/health", headers=BROWSER).data == b"ok"
    assert c.post("/dashboard", headers=BROWSER).status_code == 405


def test_files_are_served_as_ever_and_a_missing_fallback_is_a_404(root, spa):
    r = spa.get("/other.txt", headers=BROWSER)
    assert r.data == b"other" and "Vary" not in r.headers
    (root / "index.html").unlink()
    c = Client(create_app(str(root), fallback="index.html"))
    assert c.get("/dashboard", headers=BROWSER).status_code == 404


def test_a_listing_wins_over_the_fallback_for_an_existing_directory(root):
    c = Client(create_app(str(root), fallback="index.html", listing=True))
    assert b"a.txt" in c.get("/files/", headers=BROWSER).data
    assert c.get("/nowhere/", headers=BROWSER).data == b"<h1>app shell</h1>"


@pytest.mark.parametrize("bad", ["", "/", ".env", "../index.html", "dir/", "a/../../b"])
def test_fallback_outside_what_the_app_serves_is_refused(root, bad):
    with pytest.raises(ValueError):
        create_app(str(root), fallback=bad)


# -- error pages ---------------------------------------------------------------------------------

def test_error_page_is_sent_with_the_status_it_stands_for(root):
    c = Client(create_app(str(root), error_pages={"404": "404.html"}))
    r = c.get("/missing.txt")
    assert r.status_code == 404 and r.data == b"<h1>custom not found</h1>"
    assert r.headers["Content-Type"] == "text/html; charset=utf-8"
    assert "ETag" not in r.headers and "Last-Modified" not in r.headers
    assert c.get("/missing.txt", headers={"If-None-Match": "*"}).status_code == 404
    head = c.head("/.env")
    assert head.status_code == 404 and head.data == b""
    assert head.headers["Content-Length"] == str(len(b"<h1>custom not found</h1>"))
    assert c.get("/404.html").status_code == 200  # the page itself is still a file


def test_error_pages_for_other_statuses_keep_their_headers(root):
    (root / "errors").mkdir()
    (root / "errors" / "405.txt").write_bytes(b"not that method")
    c = Client(create_app(str(root), error_pages={405: "errors/405.txt"}))
    r = c.post("/other.txt")
    assert r.status_code == 405 and r.data == b"not that method"
    assert r.headers["Allow"] == "GET, HEAD, OPTIONS"
    assert r.headers["Content-Type"] == "text/plain; charset=utf-8"
    assert c.get("/missing").data == b"404 Not Found\n"  # no page for 404: the built-in one


@pytest.mark.parametrize("cache", [{}, {"cache_ttl": 0}], ids=["cached", "uncached"])
def test_missing_or_unreadable_error_page_falls_back_to_the_built_in_one(root, cache, caplog):
    (root / "404.html").unlink()
    c = Client(create_app(str(root), error_pages={"404": "404.html", "405": "405.html"}, **cache))
    assert c.get("/missing").data == b"404 Not Found\n"
    assert "error page for 404 (404.html) is missing" in caplog.text
    (root / "404.html").mkdir()  # not a regular file
    r = c.get("/missing")
    assert r.status_code == 404 and r.data == b"404 Not Found\n"
    (root / "404.html").rmdir()
    os.mkfifo(root / "404.html")
    assert c.get("/missing").data == b"404 Not Found\n"
    (root / "404.html").unlink()
    (root / "404.html").write_bytes(b"back")
    assert c.get("/missing").data == b"back"


@pytest.mark.parametrize("pages", [{"200": "a.html"}, {"600": "a.html"}, {"40": "a.html"}, {"404": ".hidden"},
                                   {"404": "../x.html"}, ["404.html"], {"404": 7}])
def test_bad_error_pages_are_refused(root, pages):
    with pytest.raises(ValueError):
        create_app(str(root), error_pages=pages)


# -- headers by path -----------------------------------------------------------------------------

RULES = [{"match": "/assets/*", "set": {"Cache-Control": "public, max-age=600", "X-Content-Type-Options": "nosniff"}},
         {"match": "/assets/*.js", "set": {"X-Served-By": "rule-2", "Content-Type": "application/javascript"}},
         {"match": "*.js", "set": {"X-Served-By": "rule-3"}},
         {"match": "/files/*", "set": {"X-Listing": "yes"}}]


@pytest.mark.parametrize("options", [{}, {"cache_max_file_size": 0}, {"cache_ttl": 0}],
                         ids=["memory", "stream", "nocache"])
def test_headers_apply_by_glob_and_later_rules_win(root, options):
    c = Client(create_app(str(root), headers=RULES, listing=True, **options))
    js = c.get("/assets/app.js")
    assert js.headers["Cache-Control"] == "public, max-age=600" and js.headers["X-Content-Type-Options"] == "nosniff"
    assert js.headers["X-Served-By"] == "rule-3" and js.headers["Content-Type"] == "application/javascript"
    assert js.headers.getlist("Cache-Control") == ["public, max-age=600"]  # replaced, not repeated
    css = c.get("/assets/css/site.css")  # `*` crosses "/"
    assert css.headers["X-Content-Type-Options"] == "nosniff" and "X-Served-By" not in css.headers
    other = c.get("/other.txt")
    assert other.headers["Cache-Control"] == "public, max-age=60" and "X-Content-Type-Options" not in other.headers
    ranged = c.get("/assets/app.js", headers={"Range": "bytes=0-1"})
    assert ranged.status_code == 206 and ranged.headers["X-Content-Type-Options"] == "nosniff"
    nm = c.get("/assets/app.js", headers={"If-None-Match": js.headers["ETag"]})
    assert nm.status_code == 304 and nm.headers["Cache-Control"] == "public, max-age=600"
    assert c.get("/files/").headers["X-Listing"] == "yes"
    missing = c.get("/assets/missing.js")
    assert missing.status_code == 404 and "X-Content-Type-Options" not in missing.headers


@pytest.mark.parametrize("path", ["//assets/app.js", "/./assets/app.js", "/assets//app.js", "/assets/app.js/.",
                                  "/assets/./app.js"])
@pytest.mark.parametrize("options", [{}, {"cache_ttl": 0}], ids=["cached", "nocache"])
def test_headers_match_the_path_as_resolved_not_as_spelled(root, path, options):
    """A rule is matched against the URL path of the file served, not the request's spelling
    of it: empty and "." segments reach the same file (as nginx's merge_slashes and dot-segment
    removal do before locations are matched), so they must not shed a rule's headers (a CSP or
    X-Frame-Options stripped from a page by asking for //page.html)."""
    rules = [{"match": "/assets/*", "set": {"X-Frame-Options": "DENY"}},
             {"match": "*.js", "set": {"X-Content-Type-Options": "nosniff"}}]
    c = Client(create_app(str(root), headers=rules, **options))
    r = c.get("/", environ_overrides={"PATH_INFO": path})
    assert r.status_code == 200 and r.data == b"app()"
    assert r.headers.get("X-Frame-Options") == "DENY" and r.headers.get("X-Content-Type-Options") == "nosniff"


def test_listing_headers_match_the_path_as_resolved(root):
    c = Client(create_app(str(root), headers=[{"match": "/files/", "set": {"X-Listing": "yes"}}], listing=True))
    for path in ("/files/", "//files/", "/./files/", "/files//"):
        r = c.get("/", environ_overrides={"PATH_INFO": path})
        assert r.status_code == 200 and r.headers.get("X-Listing") == "yes", path


def test_headers_ride_on_a_handed_off_head(root):
    c = Client(create_app(str(root), headers=RULES, handoff_token=TOKEN))
    r = c.get("/assets/big.bin", headers={"X-Gows-Handoff": TOKEN})
    assert FILE_HEADER in r.headers and r.data == b""
    assert r.headers["X-Content-Type-Options"] == "nosniff" and r.headers["Cache-Control"] == "public, max-age=600"


@pytest.mark.parametrize("name", ["Connection", "keep-alive", "Transfer-Encoding", "content-length", "TE", "Trailer",
                                  "Upgrade", "Proxy-Authenticate", "Proxy-Foo", "Content-Range", "ETag", "Vary",
                                  "X-Accel-Redirect", "X-Sendfile", "X-Gows-File", "Bad Name", ""])
def test_refused_headers_raise_naming_the_header(root, name):
    with pytest.raises(ValueError, match="headers\\[0\\]"):
        create_app(str(root), headers=[{"match": "/*", "set": {name: "x"}}])


@pytest.mark.parametrize("rules", [[{"match": "/a", "set": {"X-A": "a\r\nX-B: b"}}], [{"match": "/a", "set": {"X-A": ""}}],
                                   [{"match": "a", "set": {"X-A": "b"}}], [{"match": "/a", "set": {}}],
                                   [{"match": "/a"}], {"match": "/a", "set": {"X-A": "b"}}])
def test_malformed_rules_are_refused(root, rules):
    with pytest.raises(ValueError):
        create_app(str(root), headers=rules)


# -- embedded in Flask ---------------------------------------------------------------------------

@pytest.fixture
def flask_site(root):
    import flask  # a test extra: these tests must run, never skip
    app = flask.Flask(__name__)

    @app.route("/")
    def home():
        return "flask home"

    site = create_app(str(root), listing=True, fallback="index.html", error_pages={"404": "404.html"},
                      headers=RULES, health_path=None)
    app.wsgi_app = DispatcherMiddleware(app.wsgi_app, {"/site": site})
    return app.test_client()


def test_flask_embedding_lists_escaped_and_as_json(flask_site):
    assert flask_site.get("/").data == b"flask home"
    r = flask_site.get("/site/files/")
    assert r.status_code == 200 and b"<xss>" not in r.data and "Index of /site/files/" in r.data.decode()
    assert "./%3Cxss%3E.txt" in parsed(r.data).hrefs
    assert flask_site.get("/site/files/" + XSS).data == b"x"
    data = flask_site.get("/site/files/", headers={"Accept": "application/json"}).json
    assert XSS in [e["name"] for e in data["entries"]] and ".env" not in json.dumps(data)


def test_flask_embedding_falls_back_errors_and_sets_headers(flask_site):
    r = flask_site.get("/site/some/route", headers=BROWSER)
    assert r.status_code == 200 and r.data == b"<h1>app shell</h1>"
    assert flask_site.get("/site/some/route.json", headers=BROWSER).data == b"<h1>custom not found</h1>"
    missing = flask_site.get("/site/some/route")
    assert missing.status_code == 404 and missing.data == b"<h1>custom not found</h1>"
    assert flask_site.get("/site/.env", headers=BROWSER).status_code == 404
    assert flask_site.get("/site/assets/app.js").headers["X-Content-Type-Options"] == "nosniff"
