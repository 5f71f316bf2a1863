"""HTTPS end to end through a real master, with certificates made at test time (trustme) and real
clients: Python's ssl with verification, curl --cacert and openssl s_client. The site over
HTTPS byte for byte (file bodies through the encrypting transport, never sendfile under it, and
in bounded memory for a slow reader), HSTS, the redirect listener, the admin page's certificate,
hostile clients, and certificates reloaded by SIGHUP under load without a failed request."""
from __future__ import annotations

import hashlib
import http.client
import signal
import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path

import pytest
import requests
import trustme
from cryptography import x509
from prometheus_client.parser import text_string_to_metric_families

from e2e_support import bundled_site, read_head
from master_support import Master, base_config, proxies_rss_kib
from support import closing_all, free_ports, wait_until

pytestmark = pytest.mark.integration

HEADER_TIMEOUT = 2  # proxy.headerTimeout of these masters: it bounds a TLS handshake too
HUGE = 64 * 1024 * 1024


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def write_certificate(ca: trustme.CA, directory: Path) -> int:
    """A new certificate for localhost and 127.0.0.1 in directory/server.crt and .key; its serial."""
    cert = ca.issue_cert("localhost", "127.0.0.1")
    cert.private_key_pem.write_to_path(str(directory / "server.key"))
    cert.cert_chain_pems[0].write_to_path(str(directory / "server.crt"))
    return x509.load_pem_x509_certificate(cert.cert_chain_pems[0].bytes()).serial_number


def client_context(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    return ctx


class TlsMaster:
    """A master serving HTTP, HTTPS and the redirect listener, with an admin listener."""

    def __init__(self, directory: Path, site: Path, ca: trustme.CA, **extra) -> None:
        self.directory = directory
        self.ca = ca
        self.serial = write_certificate(ca, directory)
        (self.directory / "ca.pem").write_bytes(ca.cert_pem.bytes())
        self.port, self.https, self.redirect, self.admin, *self.worker_ports = free_ports(6)
        tls = {"certificate": "server.crt", "key": "server.key", "listen": f"127.0.0.1:{self.https}",
               "redirectListen": f"127.0.0.1:{self.redirect}", "hsts": {"maxAge": 600}}
        tls.update(extra.pop("tls", {}))
        config = base_config(site, self.port, self.worker_ports, admin=f"127.0.0.1:{self.admin}", tls=tls,
                             proxy={"processes": 2, "headerTimeout": HEADER_TIMEOUT},
                             frontCache={"maxObjectBytes": 65536}, **extra)
        self.master = Master(directory, config)
        try:
            self.master.wait_workers(self.worker_ports)
            wait_until(lambda: all(w["up"] for w in self.status()["workers"]) and self.status()["tls"]["enabled"],
                       timeout=30, message="every worker up, HTTPS on")
        except BaseException:
            self.master.stop()
            raise
        self.context = client_context(ca)

    def status(self) -> dict:
        for _ in range(100):
            try:
                return requests.get(f"http://127.0.0.1:{self.admin}/status.json", timeout=5).json()
            except requests.ConnectionError:
                time.sleep(0.1)
        raise TimeoutError("no admin listener")

    def get(self, path: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes, int]:
        """GET over a new verified HTTPS connection: status, headers, body, the certificate's serial."""
        conn = http.client.HTTPSConnection("127.0.0.1", self.https, context=self.context, timeout=30)
        try:
            conn.request("GET", path, headers=headers or {})
            r = conn.getresponse()
            body = r.read()
            der = conn.sock.getpeercert(binary_form=True)
            return r.status, {k.lower(): v for k, v in r.getheaders()}, body, \
                x509.load_der_x509_certificate(der).serial_number
        finally:
            conn.close()

    def stop(self) -> None:
        self.master.stop()


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    root = bundled_site(tmp_path_factory.mktemp("site"))
    with open(root / "huge.bin", "wb") as f:
        f.truncate(HUGE)  # reads as zeros, takes no disk
    return root


@pytest.fixture(scope="module")
def https(tmp_path_factory, site, ca):
    m = TlsMaster(tmp_path_factory.mktemp("tls"), site, ca)
    yield m
    m.stop()


# -- real clients -----------------------------------------------------------------------------------
def test_the_site_over_https_is_the_site_over_http_verified_by_python_ssl(https, site):
    for path in ("/", "/style.css", "/a.txt", "/a.txt"):  # (the second /a.txt: a front-cache hit)
        status, headers, body, serial = https.get(path)
        plain = requests.get(f"http://127.0.0.1:{https.port}{path}", timeout=10)
        assert (status, body) == (plain.status_code, plain.content) == (200, plain.content)
        assert serial == https.serial
        assert headers["strict-transport-security"] == "max-age=600", path  # HSTS over HTTPS only
        assert "strict-transport-security" not in plain.headers


def test_curl_with_the_ca_gets_http_1_1_over_tls(https, site):
    out = subprocess.run(["curl", "-sS", "--cacert", str(https.directory / "ca.pem"), "-o", "-", "-w",
                          "\n%{http_code} %{http_version} %{ssl_verify_result}",
                          f"https://localhost:{https.https}/index.html"],
                         capture_output=True, timeout=30, stdin=subprocess.DEVNULL)
    assert out.returncode == 0, out.stderr
    body, _, summary = out.stdout.rpartition(b"\n")
    assert summary == b"200 1.1 0" and body == (site / "index.html").read_bytes()


def s_client(port: int, *options: str, send: bytes = b"") -> subprocess.CompletedProcess:
    return subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-servername", "localhost",
                           *options], input=send, capture_output=True, timeout=30)


def renegotiate(port: int, ca_file: Path) -> bytes:
    """What s_client says when asked to renegotiate a TLS 1.2 session ("R" on its input, which
    stays open: it leaves on the server's answer, or is killed after 20 s)."""
    proc = subprocess.Popen(["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-tls1_2", "-CAfile",
                             str(ca_file)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    timer = threading.Timer(20, proc.kill)
    timer.start()
    try:
        proc.stdin.write(b"R\n")
        proc.stdin.flush()
        return proc.stdout.read()
    finally:
        timer.cancel()
        proc.kill()
        proc.wait()
        proc.stdin.close()
        proc.stdout.close()


@pytest.mark.parametrize("version", ["-tls1_2", "-tls1_3"])
def test_openssl_s_client_is_served_over_tls_1_2_and_1_3(https, version):
    out = s_client(https.https, version, "-CAfile", str(https.directory / "ca.pem"), "-alpn", "h2,http/1.1", "-ign_eof",
                   send=b"GET /a.txt HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
    text = out.stdout.decode(errors="replace")
    assert f"Protocol  : TLSv1.{version[-1]}" in text, text[-2000:]
    assert "Verify return code: 0 (ok)" in text
    assert "ALPN protocol: http/1.1" in text  # never h2, which gows does not speak
    assert "HTTP/1.1 200 OK" in text and "alpha" in text


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1:DeprecationWarning")
@pytest.mark.parametrize("version", ["-tls1", "-tls1_1"])
def test_tls_1_0_and_1_1_hellos_are_refused(https, version):
    # SECLEVEL=0: the client's own OpenSSL would not even offer these versions otherwise.
    out = s_client(https.https, version, "-cipher", "DEFAULT@SECLEVEL=0")
    text = out.stdout.decode(errors="replace")
    assert out.returncode != 0 and "no peer certificate available" in text, text
    assert "Cipher is (NONE)" in text  # no session was made
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    ctx.set_ciphers("DEFAULT@SECLEVEL=0")
    ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1_1 if version == "-tls1_1" else ssl.TLSVersion.TLSv1
    with socket.create_connection(("127.0.0.1", https.https), timeout=10) as raw:
        with pytest.raises((ssl.SSLError, ConnectionError)):
            ctx.wrap_socket(raw, server_hostname="localhost")
    assert https.get("/a.txt")[0] == 200


# -- file bodies over TLS --------------------------------------------------------------------------
def test_a_big_file_over_https_is_byte_exact_whole_and_in_ranges(https, site):
    expected = (site / "big.bin").read_bytes()
    sent_before = https.status()["proxy"]["file_bodies"]
    status, headers, body, _ = https.get("/big.bin")
    assert status == 200 and len(body) == len(expected) and hashlib.sha256(body).digest() == hashlib.sha256(expected).digest()
    status, headers, body, _ = https.get("/big.bin", {"Range": "bytes=100000-1199999"})
    assert status == 206 and body == expected[100000:1200000]
    # Both sent by a proxy from the file a worker named (through the transport, which encrypts).
    assert https.status()["proxy"]["file_bodies"] >= sent_before + 2


def test_a_slow_https_reader_of_a_huge_file_holds_bounded_memory_then_gets_every_byte(https):
    before = proxies_rss_kib(https.master.pid)
    raw = socket.socket()
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    raw.settimeout(30)
    raw.connect(("127.0.0.1", https.https))
    with https.context.wrap_socket(raw, server_hostname="127.0.0.1") as s:
        s.sendall(b"GET /huge.bin HTTP/1.1\r\nHost: localhost\r\n\r\n")
        head, rest = read_head(s)
        assert head.startswith(b"HTTP/1.1 200") and b"Content-Length: %d" % HUGE in head
        # The client reads nothing for a while: the proxy stops at its transport's high-water
        # mark instead of reading the file into memory (a 64 MiB file would show at once).
        peak = 0
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            peak = max(peak, proxies_rss_kib(https.master.pid) - before)
            time.sleep(0.1)
        assert peak < 16 * 1024, f"proxies grew by {peak} KiB while a client read nothing of a {HUGE >> 20} MiB file"
        got, digest = len(rest), hashlib.sha256(rest)
        while got < HUGE:
            chunk = s.recv(1 << 20)
            assert chunk, f"connection closed after {got} of {HUGE} bytes"
            got += len(chunk)
            digest.update(chunk)
    assert got == HUGE and digest.digest() == hashlib.sha256(bytes(HUGE)).digest()


# -- redirect listener ---------------------------------------------------------------------------------
@pytest.mark.parametrize("host,target,location", [
    ("localhost", "/a/b?c=d", "https://localhost:{https}/a/b?c=d"),
    ("127.0.0.1:{redirect}", "/style.css", "https://127.0.0.1:{https}/style.css"),
    ("evil.example", "/login", "https://localhost:{https}/login"),  # never an open redirect
    ("localhost.evil.example", "//evil.example/", "https://localhost:{https}//evil.example/"),
])
def test_the_redirect_listener_answers_308_to_https_on_a_host_the_certificate_names(https, host, target, location):
    ports = {"https": https.https, "redirect": https.redirect}
    r = requests.get(f"http://127.0.0.1:{https.redirect}{target}", headers={"Host": host.format(**ports)},
                     allow_redirects=False, timeout=10)
    assert r.status_code == 308 and r.headers["Location"] == location.format(**ports)
    assert r.content == b""


def test_following_the_redirect_lands_on_the_page_over_https(https, site):
    r = requests.get(f"http://localhost:{https.redirect}/style.css", verify=str(https.directory / "ca.pem"),
                     timeout=10)
    assert r.status_code == 200 and r.url == f"https://localhost:{https.https}/style.css"
    assert r.content == (site / "style.css").read_bytes() and [h.status_code for h in r.history] == [308]


# -- admin ------------------------------------------------------------------------------------------------
def test_the_admin_page_and_metrics_show_the_certificate(https):
    tls = https.status()["tls"]
    assert tls["enabled"] and tls["listen"] == f"127.0.0.1:{https.https}"
    assert tls["sans"] == ["localhost", "127.0.0.1"] and int(tls["serial"], 16) == https.serial
    cert = x509.load_pem_x509_certificate((https.directory / "server.crt").read_bytes())
    assert tls["not_after"] == cert.not_valid_after_utc.timestamp() and tls["expires_in_seconds"] > 0
    text = requests.get(f"http://127.0.0.1:{https.admin}/metrics", timeout=5).text
    samples = {s.name: s for family in text_string_to_metric_families(text) for s in family.samples}
    assert samples["gows_tls_certificate_expiry_timestamp_seconds"].value == cert.not_valid_after_utc.timestamp()
    assert int(samples["gows_tls_certificate_info"].labels["serial"], 16) == https.serial
    page = requests.get(f"http://127.0.0.1:{https.admin}/status", timeout=5).text
    assert "HTTPS certificate" in page and "localhost, 127.0.0.1" in page and tls["serial"] in page


# -- hostile clients ----------------------------------------------------------------------------------------
def closed_by_server(s: socket.socket, timeout: float) -> bytes:
    """Everything the server sends until it closes (the safety net: `timeout` seconds)."""
    s.settimeout(timeout)
    got = b""
    try:
        while chunk := s.recv(65536):
            got += chunk
    except ConnectionResetError:
        pass
    return got


def test_plain_http_sent_to_the_https_port_is_closed_unanswered(https):
    with socket.create_connection(("127.0.0.1", https.https), timeout=10) as s:
        s.sendall(b"GET /a.txt HTTP/1.1\r\nHost: localhost\r\n\r\n")
        got = closed_by_server(s, 20)
    assert b"alpha" not in got and b"HTTP/1.1 200" not in got
    assert https.get("/a.txt")[0] == 200


@pytest.mark.parametrize("sent", [b"", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"], ids=["silent", "half-hello"])
def test_a_handshake_that_never_finishes_is_closed_after_the_head_timeout(https, sent):
    with socket.create_connection(("127.0.0.1", https.https), timeout=10) as s:
        s.sendall(sent)
        t0 = time.monotonic()
        got = closed_by_server(s, 10 * HEADER_TIMEOUT)
        took = time.monotonic() - t0
    assert took < 10 * HEADER_TIMEOUT, f"still open after {took:.1f}s"
    assert b"HTTP" not in got


def test_a_handshake_flood_and_renegotiation_block_no_one_and_crash_nothing(https):
    proxies = https.master.proxies()
    stalled = []
    with closing_all(stalled):
        for _ in range(300):  # each holds a descriptor and a handshake in progress
            s = socket.create_connection(("127.0.0.1", https.https), timeout=10)
            s.sendall(b"\x16\x03\x01\x02\x00\x01")
            stalled.append(s)
        errors: list[BaseException] = []

        def handshakes() -> None:
            try:
                for _ in range(10):
                    assert https.get("/a.txt")[2] == b"alpha\n"
            except BaseException as e:  # noqa: BLE001 (reported below)
                errors.append(e)

        threads = [threading.Thread(target=handshakes) for _ in range(8)]
        for t in threads:
            t.start()
        # Renegotiation asked for meanwhile (TLS 1.2's "R" of s_client): refused, nothing breaks.
        said = renegotiate(https.https, https.directory / "ca.pem")
        assert b"RENEGOTIATING" in said and b"no renegotiation" in said, said[-500:]
        for t in threads:
            t.join(60)
        assert not errors, errors[:3]
    assert https.master.proxies() == proxies  # none crashed nor was replaced


# -- HTTPS only, and reloads --------------------------------------------------------------------------------
def test_listen_null_serves_https_only(masters, tmp_path, site, ca):
    write_certificate(ca, tmp_path)
    port, https, *workers = free_ports(3)
    config = base_config(site, port, workers, listen=None,
                         tls={"certificate": "server.crt", "key": "server.key", "listen": f"127.0.0.1:{https}"})
    m = Master(tmp_path, config)
    masters.append(m)
    m.wait_workers(workers)
    m.wait_log(r"is up \(")
    r = requests.get(f"https://127.0.0.1:{https}/a.txt", verify=_ca_file(ca, tmp_path), timeout=10)
    assert r.status_code == 200 and r.content == b"alpha\n"
    assert r.headers.get("Strict-Transport-Security") is None  # (off unless asked for)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()


def _ca_file(ca: trustme.CA, directory: Path) -> str:
    path = directory / "ca.pem"
    path.write_bytes(ca.cert_pem.bytes())
    return str(path)


def test_hup_with_a_new_certificate_under_load_fails_no_request(tmp_path, site, ca):
    m = TlsMaster(tmp_path, site, ca)
    try:
        old = m.serial
        seen: list[tuple[float, object]] = []  # (when it started, serial or what went wrong)
        stop = threading.Event()

        def load() -> None:
            while not stop.is_set():
                t0 = time.monotonic()
                try:
                    status, _, body, serial = m.get("/a.txt")  # a handshake per request
                    seen.append((t0, serial if (status, body) == (200, b"alpha\n") else status))
                except Exception as e:  # noqa: BLE001 (counted as a failure)
                    seen.append((t0, e))

        threads = [threading.Thread(target=load) for _ in range(4)]
        for t in threads:
            t.start()
        try:
            wait_until(lambda: len(seen) >= 20, timeout=30, message="load running")
            new = write_certificate(ca, tmp_path)
            hup = time.monotonic()
            m.master.signal(signal.SIGHUP)
            m.master.wait_log("reload done")
            wait_until(lambda: sum(1 for t, s in seen if t > hup and s == new) >= 20, timeout=30,
                       message="new handshakes with the new certificate")
            switched = time.monotonic()
            wait_until(lambda: sum(1 for t, _ in seen if t > switched) >= 20, timeout=30, message="more load")
        finally:
            stop.set()
            for t in threads:
                t.join(60)
        failed = [s for _, s in seen if s not in (old, new)]
        assert not failed, f"{len(failed)} of {len(seen)} requests failed: {failed[:3]}"
        assert all(s == new for t, s in seen if t > switched), "an old certificate after the switch"
        assert int(m.status()["tls"]["serial"], 16) == new
    finally:
        m.stop()


def test_hup_with_a_broken_certificate_keeps_the_old_one_serving(tmp_path, site, ca):
    m = TlsMaster(tmp_path, site, ca)
    try:
        (tmp_path / "server.crt").write_text("-----BEGIN CERTIFICATE-----\nbroken\n-----END CERTIFICATE-----\n")
        m.master.signal(signal.SIGHUP)
        log = m.master.wait_log("reload failed")
        assert "tls.certificate" in log.split("reload failed", 1)[1].splitlines()[0]
        assert m.get("/a.txt")[3] == m.serial
        assert int(m.status()["tls"]["serial"], 16) == m.serial
    finally:
        m.stop()
