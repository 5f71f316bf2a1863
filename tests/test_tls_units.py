"""TLS without a server: the context's profile, the certificate checks `--check-config` makes
(each a named error, exit 2), and where the redirect listener sends a client."""
from __future__ import annotations

import datetime
import json
import ssl
import subprocess
from pathlib import Path

import pytest
import trustme

from arbiter import tls
from arbiter.__main__ import main
from arbiter.proxy.https import TlsState, location
from arbiter.proxies import tls_settings
from arbiter import config as cfg

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def pem_files(directory: Path, cert: trustme.LeafCert, name: str = "server") -> tuple[Path, Path]:
    certificate, key = directory / f"{name}.crt", directory / f"{name}.key"
    cert.private_key_pem.write_to_path(str(key))
    for i, blob in enumerate(cert.cert_chain_pems):
        blob.write_to_path(str(certificate), append=i > 0)
    return certificate, key


@pytest.fixture
def site(tmp_path: Path) -> Path:
    (tmp_path / "www").mkdir()
    (tmp_path / "www" / "index.html").write_text("hello")
    return tmp_path


def check_config(path: Path, capsys) -> tuple[int, str, str]:
    code = main(["-c", str(path), "--check-config"])
    out, err = capsys.readouterr()
    return code, out, err


def config_with(site: Path, **tls_section) -> Path:
    path = site / "gows.conf.json"
    path.write_text(json.dumps({"baseDirectory": "www", "workerCount": 1, "tls": tls_section}))
    return path


# -- the context ------------------------------------------------------------------------------
def test_the_context_is_mozillas_intermediate_profile(tmp_path, ca):
    ctx = tls.server_context(*pem_files(tmp_path, ca.issue_cert("localhost")))
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert not ctx.options & ssl.OP_CIPHER_SERVER_PREFERENCE  # the client's order
    assert ctx.options & ssl.OP_NO_RENEGOTIATION and ctx.options & ssl.OP_NO_COMPRESSION
    tls12 = {c["name"] for c in ctx.get_ciphers() if c["protocol"] == "TLSv1.2"}
    assert tls12 and tls12 <= set(tls.INTERMEDIATE_CIPHERS.split(":"))
    assert not any("CBC" in c or "SHA" == c[-3:] for c in tls12)  # no CBC, no SHA-1 MACs


def test_certificate_info_reads_subject_sans_serial_and_expiry(tmp_path, ca):
    not_after = datetime.datetime(2031, 5, 4, tzinfo=datetime.timezone.utc)
    cert = ca.issue_cert("example.test", "*.example.test", "127.0.0.1", "::1", not_after=not_after)
    certificate, key = pem_files(tmp_path, cert)
    info = tls.check(certificate, key)
    assert info.names == ("example.test", "*.example.test", "127.0.0.1", "::1")
    assert info.not_after == not_after.timestamp()
    openssl = subprocess.run(["openssl", "x509", "-in", str(certificate), "-noout", "-serial"], check=True,
                             capture_output=True, text=True).stdout
    assert int(openssl.strip().split("=")[1], 16) == info.serial
    assert tls.host_names(info) == ("example.test", "*.example.test", "127.0.0.1", "[::1]")


# -- --check-config: named errors, exit 2 ----------------------------------------------------------
def test_check_config_names_a_missing_certificate(site, capsys):
    code, out, err = check_config(config_with(site, certificate="nope.crt", key="nope.key"), capsys)
    assert code == 2 and out == "" and "tls.certificate: " in err and "nope.crt does not exist" in err


def test_check_config_names_a_key_that_does_not_match(site, capsys, ca):
    certificate, _ = pem_files(site, ca.issue_cert("localhost"), "one")
    _, other = pem_files(site, ca.issue_cert("localhost"), "two")
    code, _, err = check_config(config_with(site, certificate=str(certificate), key=str(other)), capsys)
    assert code == 2 and f"tls.key: {other} does not match the certificate" in err
    assert err.count("\n") == 1


def test_check_config_refuses_a_key_with_a_passphrase_instead_of_prompting(site, capsys, ca):
    certificate, key = pem_files(site, ca.issue_cert("localhost"))
    locked = site / "locked.key"
    subprocess.run(["openssl", "pkey", "-in", str(key), "-aes256", "-passout", "pass:secret", "-out", str(locked)],
                   check=True, stdin=subprocess.DEVNULL)
    code, _, err = check_config(config_with(site, certificate=str(certificate), key=str(locked)), capsys)
    assert code == 2 and "tls.key: " in err and "passphrase" in err


def test_check_config_names_an_expired_certificate_with_its_date(site, capsys, ca):
    lapsed = datetime.datetime(2024, 3, 1, 12, 0, tzinfo=datetime.timezone.utc)
    cert = ca.issue_cert("localhost", not_before=lapsed - datetime.timedelta(days=90), not_after=lapsed)
    certificate, key = pem_files(site, cert)
    code, _, err = check_config(config_with(site, certificate=str(certificate), key=str(key)), capsys)
    assert code == 2 and "tls.certificate: " in err and "expired on 2024-03-01 12:00:00 UTC" in err


def test_check_config_warns_of_a_certificate_about_to_lapse_and_passes(site, capsys, ca):
    soon = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(days=5)
    certificate, key = pem_files(site, ca.issue_cert("localhost", not_after=soon))
    code, out, err = check_config(config_with(site, certificate=str(certificate), key=str(key)), capsys)
    assert code == 0 and "tls.certificate: " in out and "names localhost" in out
    assert f"expires on {tls.iso_date(soon.timestamp())}" in err and "warning" in err


@pytest.mark.parametrize("section,message", [
    ({"certificate": "x.crt"}, "tls.key: required with tls.certificate"),
    ({"redirectListen": "127.0.0.1:8081"}, "tls.redirectListen: needs tls.certificate"),
])
def test_tls_settings_that_do_not_fit_together_are_named(site, capsys, section, message):
    (site / "x.crt").write_text("x")
    code, _, err = check_config(config_with(site, **section), capsys)
    assert code == 2 and message in err


def test_listen_null_needs_https(site, capsys):
    path = site / "gows.conf.json"
    path.write_text(json.dumps({"baseDirectory": "www", "workerCount": 1, "listen": None}))
    code, _, err = check_config(path, capsys)
    assert code == 2 and "listen: null serves nothing without tls.certificate" in err


def test_the_https_port_may_not_be_another_listeners(site, capsys, ca):
    certificate, key = pem_files(site, ca.issue_cert("localhost"))
    path = site / "gows.conf.json"
    path.write_text(json.dumps({"baseDirectory": "www", "workerCount": 1, "listen": "127.0.0.1:8443",
                                "tls": {"certificate": str(certificate), "key": str(key)}}))
    code, _, err = check_config(path, capsys)
    assert code == 2 and "tls.listen: port 8443 is already used by listen" in err


# -- what the proxies are told, and the redirect's target ------------------------------------------
def test_proxies_are_told_the_hsts_line_only_when_asked_for(site, ca):
    certificate, key = pem_files(site, ca.issue_cert("www.example.test"))
    base = {"certificate": str(certificate), "key": str(key)}
    off = cfg.load(config_with(site, **base))
    assert tls_settings(off, tls.certificate_info(certificate))["hsts"] is None
    on = cfg.load(config_with(site, **base, hsts={"maxAge": 600, "includeSubDomains": True}))
    told = tls_settings(on, tls.certificate_info(certificate))
    assert told["hsts"] == "Strict-Transport-Security: max-age=600; includeSubDomains"
    assert told["default_host"] == "www.example.test" and told["port"] == 8443


def state(names: tuple[str, ...], port: int = 8443, default: str = "www.example.test") -> TlsState:
    s = TlsState()
    s.names, s.port, s.default_host = names, port, default
    return s


NAMES = ("www.example.test", "example.test", "*.cdn.example.test", "127.0.0.1", "[::1]")


@pytest.mark.parametrize("host,target,expected", [
    (b"example.test", b"/a/b?c=d", b"https://example.test:8443/a/b?c=d"),
    (b"EXAMPLE.test:80", b"/", b"https://example.test:8443/"),
    (b"img.cdn.example.test", b"/x", b"https://img.cdn.example.test:8443/x"),
    (b"127.0.0.1:8080", b"/x", b"https://127.0.0.1:8443/x"),
    (b"[::1]:8080", b"/x", b"https://[::1]:8443/x"),
    # Not named by the certificate: never reflected (an open redirect), the default host instead.
    (b"evil.test", b"/a", b"https://www.example.test:8443/a"),
    (b"example.test.evil.test", b"/a", b"https://www.example.test:8443/a"),
    (b"a.b.cdn.example.test", b"/a", b"https://www.example.test:8443/a"),
    (b"x'y.cdn.example.test", b"/a", b"https://www.example.test:8443/a"),
    (None, b"/a", b"https://www.example.test:8443/a"),
    # A path that looks like an authority stays a path on our host.
    (b"evil.test", b"//evil.test/x", b"https://www.example.test:8443//evil.test/x"),
    # Absolute form: its authority is the host asked for, checked the same way.
    (b"example.test", b"http://evil.test/p?q", b"https://www.example.test:8443/p?q"),
    (b"evil.test", b"http://example.test", b"https://example.test:8443/"),
    (b"example.test", b"*", b"https://example.test:8443/"),
])
def test_a_redirect_keeps_the_path_and_only_a_host_the_certificate_names(host, target, expected):
    assert location(host, target, state(NAMES)) == expected


def test_a_redirect_to_port_443_leaves_the_port_out():
    assert location(b"example.test", b"/", state(NAMES, port=443)) == b"https://example.test/"
