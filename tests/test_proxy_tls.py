"""HTTPS in one proxy on a test loop, in front of the echo workers: what the worker is told
(X-Forwarded-Proto), HSTS on HTTPS answers only (the front cache is shared by both listeners),
and a new certificate for new handshakes while a connection opened before goes on."""
from __future__ import annotations

import http.client
import json
import socket
import ssl
from pathlib import Path

import pytest
import trustme
from cryptography import x509

from arbiter.config import FrontCacheConfig, configured
from proxy_harness import ProxyThread
from support import wait_until

pytestmark = pytest.mark.integration

HSTS = "Strict-Transport-Security: max-age=600"


def tls_settings(directory: Path, ca: trustme.CA, name: str) -> dict:
    cert = ca.issue_cert("localhost", "127.0.0.1")
    certificate, key = directory / f"{name}.crt", directory / f"{name}.key"
    cert.cert_chain_pems[0].write_to_path(str(certificate))
    cert.private_key_pem.write_to_path(str(key))
    return {"certificate": str(certificate), "key": str(key), "names": ["localhost", "127.0.0.1"],
            "default_host": "localhost", "port": 8443, "hsts": HSTS}


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def proxy(workers, tmp_path, ca):
    p = ProxyThread(workers, front_cache=configured(FrontCacheConfig), tls=tls_settings(tmp_path, ca, "one"))
    yield p
    p.stop()


def connect(proxy: ProxyThread, ca: trustme.CA) -> http.client.HTTPSConnection:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    conn = http.client.HTTPSConnection("127.0.0.1", proxy.tls_port, context=ctx, timeout=10)
    conn.connect()
    return conn


def get(conn: http.client.HTTPConnection, path: str) -> tuple[int, dict[str, str], bytes]:
    conn.request("GET", path)
    r = conn.getresponse()
    return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()


def serial(conn: http.client.HTTPSConnection) -> int:
    return x509.load_der_x509_certificate(conn.sock.getpeercert(binary_form=True)).serial_number


def test_workers_are_told_https_and_https_answers_carry_hsts(proxy, ca):
    conn = connect(proxy, ca)
    status, headers, body = get(conn, "/echo")
    assert status == 200 and headers["strict-transport-security"] == "max-age=600"
    assert {k.lower(): v for k, v in json.loads(body)["headers"]}["x-forwarded-proto"] == "https"
    plain = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
    status, headers, body = get(plain, "/echo")
    assert "strict-transport-security" not in headers
    assert {k.lower(): v for k, v in json.loads(body)["headers"]}["x-forwarded-proto"] == "http"


def test_a_front_cache_entry_gets_hsts_over_https_only(proxy, ca):
    path = "/file/c?size=3000&max_age=60"
    conn, plain = connect(proxy, ca), http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
    answers = [get(c, path) for c in (plain, conn, plain, conn, conn)]  # stored by the first
    assert proxy.stats()["front_cache"]["hits"] >= 4
    for i, (status, headers, body) in enumerate(answers):
        assert status == 200 and len(body) == 3000
        assert ("strict-transport-security" in headers) == (i in (1, 3, 4)), i


def test_a_new_certificate_serves_new_handshakes_while_an_open_connection_goes_on(proxy, ca, tmp_path):
    before = connect(proxy, ca)
    old = serial(before)
    assert get(before, "/echo")[0] == 200
    assert proxy.call(lambda: proxy.proxy.tls.configure(tls_settings(tmp_path, ca, "two")))
    proxy.call(proxy.proxy.listeners.relisten)
    after = connect(proxy, ca)
    assert serial(after) != old
    assert get(after, "/echo")[0] == 200
    assert get(before, "/echo")[0] == 200 and serial(before) == old  # undisturbed, on its old session


def test_a_certificate_that_fails_to_load_keeps_the_old_one(proxy, ca, tmp_path, caplog):
    old = serial(connect(proxy, ca))
    broken = tls_settings(tmp_path, ca, "three")
    Path(broken["key"]).write_text("-----BEGIN PRIVATE KEY-----\nbroken\n-----END PRIVATE KEY-----\n")
    assert not proxy.call(lambda: proxy.proxy.tls.configure(broken))
    assert "keeping the certificate loaded before" in caplog.text
    assert serial(connect(proxy, ca)) == old


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_a_client_resumes_its_session_on_the_same_proxy_process(proxy, ca, version):
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    ctx.maximum_version = version
    first = http.client.HTTPSConnection("127.0.0.1", proxy.tls_port, context=ctx, timeout=10)
    assert get(first, "/echo")[0] == 200  # (TLS 1.3: the ticket comes after the handshake)
    session = first.sock.session
    assert not first.sock.session_reused
    with socket.create_connection(("127.0.0.1", proxy.tls_port), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname="127.0.0.1", session=session) as again:
            assert again.session_reused  # an abbreviated handshake
            again.sendall(b"GET /echo HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            assert again.recv(12) == b"HTTP/1.1 200"


def test_a_front_cache_304_gets_hsts_over_https_only(proxy, ca):
    path = "/file/d?size=2000&max_age=60"
    conn, plain = connect(proxy, ca), http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
    etag = get(plain, path)[1]["etag"]
    for c, expected in ((plain, False), (conn, True)):
        c.request("GET", path, headers={"If-None-Match": etag})
        r = c.getresponse()
        r.read()
        assert r.status == 304 and (r.getheader("Strict-Transport-Security") is not None) == expected
    assert proxy.stats()["front_cache"]["hits"] >= 2


def test_connections_in_their_handshake_count_against_the_connection_limit(workers, tmp_path, ca):
    """Each holds a descriptor: uncounted, clients that never finish a handshake took every
    descriptor the proxy had (the connection limit never applied to them)."""
    from arbiter.config import ProxyConfig
    p = ProxyThread(workers, proxy=configured(ProxyConfig, maxConnections=5, headerTimeout=2),
                    tls=tls_settings(tmp_path, ca, "one"))
    silent = []
    try:
        silent += [socket.create_connection(("127.0.0.1", p.tls_port), timeout=10) for _ in range(10)]  # no ClientHello
        wait_until(lambda: p.call(p.proxy.listeners.held) >= 5, timeout=10,
                   message="the limit's worth of handshakes accepted")
        with socket.create_connection(("127.0.0.1", p.port), timeout=10) as waiting:
            waiting.sendall(b"GET /echo HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
            waiting.settimeout(0.5)
            with pytest.raises(socket.timeout):
                waiting.recv(1)  # at the limit: it waits in the backlog
            waiting.settimeout(10)
            assert waiting.recv(12) == b"HTTP/1.1 200"  # once the handshakes' time is up
    finally:
        for s in silent:
            s.close()
        p.stop()
