"""fileapp behind a real nginx, with the README's snippet: big bodies go out through
X-Accel-Redirect byte-exact with fileapp's own validators, ranges and conditionals are answered
by fileapp, and nothing outside the root is ever reachable."""
from __future__ import annotations

import hashlib
import http.client
import os
import re
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from shutil import which
from urllib.parse import quote

import pytest

from support import REPO, free_ports, python_env, running, wait_for_port, wait_until

pytestmark = pytest.mark.integration

NGINX = which("nginx") or "/usr/sbin/nginx"
BIG = os.urandom(8 * 1024 * 1024 + 123)
# A name that needs percent-encoding in the X-Accel-Redirect URI: space, %, ?, #, non-ASCII.
ODD = "dir with space/a%20b?#\u00fc.bin"
SECRET = b"outside the root\n" * 4096  # big enough to be handed off, were it ever served


def readme_snippet() -> str:
    """The nginx server block the README documents."""
    text = (REPO / "README.md").read_text()
    return re.search(r"```nginx\n(.*?)```", text, re.S).group(1)


def nginx_config(work: Path, root: Path, port: int, app_port: int) -> str:
    """The README's server block on our ports and root, inside a minimal unprivileged nginx.conf
    whose access log records the worker's X-Accel-Redirect and what nginx sent."""
    server = (readme_snippet().replace("listen 80;", f"listen 127.0.0.1:{port};")
              .replace("127.0.0.1:8000", f"127.0.0.1:{app_port}")
              .replace("/srv/www/", f"{root}/"))
    assert f"{root}/" in server and f"127.0.0.1:{app_port}" in server
    temp = "".join(f"{kind}_temp_path {work}/{kind}_temp;\n"
                   for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    # As root, workers would run as nobody, who cannot read the test's 0700 temp directory.
    user = "user root;\n" if os.geteuid() == 0 else ""
    return f"""{user}worker_processes 1;
pid {work}/nginx.pid;
error_log {work}/error.log;
events {{ worker_connections 64; }}
http {{
include /etc/nginx/mime.types;
log_format handoff '$request_uri $status "$upstream_http_x_accel_redirect" $body_bytes_sent';
access_log {work}/access.log handoff;
{temp}{server}
}}
"""


@pytest.fixture
def site(tmp_path):
    root = tmp_path / "www"
    (root / "dir with space").mkdir(parents=True)
    (root / "big.bin").write_bytes(BIG)
    (root / ODD).write_bytes(BIG[::-1])
    (root / "small.txt").write_bytes(b"small\n")
    (root / "page.html").write_bytes(b"<p>" * 20_000)
    (root / "page.html.gz").write_bytes(b"\x1f\x8b" + BIG[:40_000])  # a precompressed sidecar
    (tmp_path / "secret.bin").write_bytes(SECRET)
    (root / "escape.bin").symlink_to(tmp_path / "secret.bin")
    return root


@pytest.fixture
def nginx(tmp_path, site):
    """nginx in front of fileapp under gunicorn (sendfile_header="X-Accel-Redirect"), both on
    loopback ports; both stopped by pid whatever the test does. Yields (port, access log)."""
    with front(tmp_path, site, f"fileapp:create_app({str(site)!r}, sendfile_header='X-Accel-Redirect')") as served:
        yield served


@contextmanager
def front(tmp_path: Path, site: Path, app_spec: str):
    """nginx with the README's snippet in front of the WSGI app `app_spec` under gunicorn."""
    if not os.access(NGINX, os.X_OK):
        pytest.fail(f"{NGINX} missing: run `make test-deps` first", pytrace=False)
    work = tmp_path / "nginx"
    work.mkdir()
    port, app_port = free_ports(2)
    (work / "nginx.conf").write_text(nginx_config(work, site, port, app_port))
    app = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "-w", "1", "-b", f"127.0.0.1:{app_port}",
         "--log-level", "warning", app_spec],
        env=python_env(), cwd=tmp_path, stdout=subprocess.DEVNULL)
    with running(app):  # (stopped even if nginx cannot start)
        front = subprocess.Popen(
            [NGINX, "-p", str(work), "-e", str(work / "error.log"), "-c", str(work / "nginx.conf"),
             "-g", "daemon off;"], stdout=subprocess.DEVNULL)
        with running(front):
            wait_for_port(app_port, timeout=30)
            wait_for_port(port, timeout=30)
            yield port, work / "access.log"


def get(port: int, path: str, headers: dict[str, str] | None = None,
        method: str = "GET") -> tuple[int, http.client.HTTPMessage, bytes]:
    """One request with `path` sent exactly as given (no client-side normalising)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request(method, path, headers=headers or {})
        r = conn.getresponse()
        return r.status, r.headers, r.read()
    finally:
        conn.close()


def logged(log: Path, path: str, count: int = 1) -> list[str]:
    """The access-log lines of the `count` requests for `path` (nginx logs after sending)."""
    def lines():
        text = log.read_text() if log.exists() else ""
        found = [ln for ln in text.splitlines() if ln.split(" ", 1)[0] == path]
        return found if len(found) >= count else None
    return wait_until(lines, timeout=10, message=f"{count} access log lines for {path}")


@pytest.mark.parametrize("name, data", [("big.bin", BIG), (ODD, BIG[::-1])])
def test_a_big_file_goes_out_through_x_accel_redirect_byte_exact(nginx, name, data):
    port, log = nginx
    path = "/" + quote(name)
    status, headers, body = get(port, path)
    assert status == 200
    assert hashlib.sha256(body).hexdigest() == hashlib.sha256(data).hexdigest()
    assert "X-Accel-Redirect" not in headers
    [line] = logged(log, path)
    assert line == f'{path} 200 "/_fileapp/{quote(name)}" {len(data)}'


def test_the_handed_off_answer_carries_fileapps_own_headers(nginx):
    """The same validators and caching headers as fileapp's own answer to HEAD, so a client
    revalidates with the ETag fileapp knows."""
    port, log = nginx
    _, own, _ = get(port, "/big.bin", method="HEAD")
    status, sent, _ = get(port, "/big.bin")
    assert status == 200 and '"/_fileapp/big.bin"' in logged(log, "/big.bin", 2)[-1]
    for name in ("ETag", "Last-Modified", "Cache-Control", "Content-Type", "Content-Length"):
        assert sent.get_all(name) == own.get_all(name), name
    assert sent.get_all("Accept-Ranges") == ["bytes"]


def test_a_file_with_a_sidecar_keeps_its_vary_and_the_sidecar_is_sent_by_fileapp(nginx):
    port, log = nginx
    status, headers, body = get(port, "/page.html")
    assert (status, body) == (200, b"<p>" * 20_000)
    assert headers.get_all("Vary") == ["Accept-Encoding"] and "Content-Encoding" not in headers
    status, headers, body = get(port, "/page.html", {"Accept-Encoding": "gzip"})
    assert (status, body) == (200, b"\x1f\x8b" + BIG[:40_000])
    assert headers["Content-Encoding"] == "gzip" and headers.get_all("Vary") == ["Accept-Encoding"]
    assert [line.split(" ", 2)[2] for line in logged(log, "/page.html", 2)] == [
        '"/_fileapp/page.html" 60000', '"-" 40002']


def test_conditional_requests_get_fileapps_answer(nginx):
    port, log = nginx
    _, headers, _ = get(port, "/big.bin")
    etag, modified = headers["ETag"], headers["Last-Modified"]
    for condition in ({"If-None-Match": etag}, {"If-Modified-Since": modified}):
        status, h, body = get(port, "/big.bin", condition)
        assert (status, body, h["ETag"]) == (304, b"", etag), condition
    status, _, body = get(port, "/big.bin", {"If-Match": etag})
    assert status == 200 and body == BIG
    assert get(port, "/big.bin", {"If-Match": '"other"'})[0] == 412
    status, _, body = get(port, "/big.bin", {"If-None-Match": '"other"'})
    assert status == 200 and body == BIG
    # Answered by fileapp itself: none of these was handed off.
    assert [line.split(" ", 2)[2] for line in logged(log, "/big.bin", 6)][1:] == [
        '"-" 0', '"-" 0', f'"-" {len(BIG)}', '"-" 24', f'"-" {len(BIG)}']


def test_ranges_are_answered_by_fileapp(nginx):
    port, log = nginx
    _, headers, _ = get(port, "/big.bin")
    etag = headers["ETag"]
    start, stop = 1_000_000, 5_000_000
    status, h, body = get(port, "/big.bin", {"Range": f"bytes={start}-{stop - 1}"})
    assert status == 206 and body == BIG[start:stop]
    assert h["Content-Range"] == f"bytes {start}-{stop - 1}/{len(BIG)}" and h["ETag"] == etag
    status, _, body = get(port, "/big.bin", {"Range": "bytes=-100", "If-Range": etag})
    assert status == 206 and body == BIG[-100:]
    status, _, body = get(port, "/big.bin", {"Range": "bytes=-100", "If-Range": '"stale"'})
    assert status == 200 and body == BIG
    status, h, _ = get(port, "/big.bin", {"Range": f"bytes={len(BIG)}-"})
    assert status == 416 and h["Content-Range"] == f"bytes */{len(BIG)}"
    assert all(' "-" ' in line for line in logged(log, "/big.bin", 5)[1:])


@pytest.mark.parametrize("path", [
    "/escape.bin",  # a symlink inside the root to a file outside it
    "/../secret.bin", "/%2e%2e/secret.bin", "/_fileapp/../secret.bin",
    "/_fileapp/big.bin",  # the internal location straight from a client
    "/_fileapp/%2e%2e/secret.bin", "/_fileapp/..%2fsecret.bin", "/_fileapp/../../secret.bin",
])
def test_nothing_outside_the_root_is_reachable(nginx, path):
    port, _ = nginx
    status, headers, body = get(port, path)
    assert status in (400, 404), (path, status)
    assert SECRET[:16] not in body and BIG[:16] not in body
    assert "X-Accel-Redirect" not in headers


def test_small_files_and_head_are_sent_by_fileapp(nginx):
    port, log = nginx
    assert get(port, "/small.txt")[2] == b"small\n"
    status, headers, body = get(port, "/big.bin", method="HEAD")
    assert status == 200 and body == b"" and headers["Content-Length"] == str(len(BIG))
    assert logged(log, "/small.txt") == ['/small.txt 200 "-" 6']
    assert logged(log, "/big.bin") == ['/big.bin 200 "-" 0']


def test_a_symlink_swapped_in_after_fileapps_check_is_not_followed(tmp_path, site):
    """The instant between fileapp's check of the file it names and nginx's open of that path,
    played by an app naming a symlink out of the root: the snippet's disable_symlinks refuses it."""
    (tmp_path / "swapped.py").write_text(
        "def app(environ, start_response):\n"
        "    start_response('200 OK', [('X-Accel-Redirect', '/_fileapp/escape.bin'), ('Content-Length', '0')])\n"
        "    return [b'']\n")
    with front(tmp_path, site, "swapped:app") as (port, log):
        status, _, body = get(port, "/anything")
        assert '"/_fileapp/escape.bin"' in logged(log, "/anything")[0]
        assert status == 403 and SECRET[:16] not in body
