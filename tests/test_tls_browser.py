"""The demo site over HTTPS in the headless Chromium of the browser tests, with no certificate
error, and the admin page showing the certificate.

How the browser trusts the test's certificate: `--ignore-certificate-errors-spki-list` with the
SHA-256 of the server key's SubjectPublicKeyInfo. It trusts exactly that one key (any other
certificate still fails, as the control case below shows) and needs no system tool or shared
trust store: the alternative, the trustme CA in an NSS database made with certutil, would need
libnss3-tools installed and would trust everything that CA signs. The browser still does the
whole TLS handshake with gows (TLS 1.3, ALPN); only the chain's issuer is taken on trust."""
from __future__ import annotations

import base64
import hashlib

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from browser_support import chromium_session, screenshot
from e2e_support import bundled_site
from master_support import Master, base_config
from support import free_ports, wait_until

pytestmark = pytest.mark.browser


def spki_hash(pem: bytes) -> str:
    """base64 of the SHA-256 of the certificate's SubjectPublicKeyInfo, as Chromium takes it."""
    key = x509.load_pem_x509_certificate(pem).public_key()
    der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(hashlib.sha256(der).digest()).decode()


@pytest.fixture
def https_master(masters, tmp_path):
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "server.crt"))
    cert.private_key_pem.write_to_path(str(tmp_path / "server.key"))
    port, https, admin, *workers = free_ports(5)
    site = bundled_site(tmp_path)
    config = base_config(site, port, workers, admin=f"127.0.0.1:{admin}",
                         tls={"certificate": "server.crt", "key": "server.key", "listen": f"127.0.0.1:{https}"})
    m = Master(tmp_path, config)
    masters.append(m)
    m.wait_workers(workers)
    m.wait_log(r"is up \(", count=len(workers))
    return https, admin, spki_hash(cert.cert_chain_pems[0].bytes())


def _page_state(driver) -> dict:
    """The page's state once its load event has fired (the script timeout is the deadline):
    chromedriver's get() may return before it (seen under load, 1 run in 25: the logo fetched
    in full but not yet an image, so `logo` was false)."""
    return driver.execute_async_script("""
        var done = arguments[arguments.length - 1];
        function state() {
            var logo = document.querySelector('img');
            done({title: document.title, secure: window.isSecureContext, protocol: location.protocol,
                  logo: logo ? logo.complete && logo.naturalWidth > 0 : null,
                  // (how the logo's request went, for the message when it did not load)
                  logoFetch: performance.getEntriesByType('resource').filter(function (e) {
                      return e.initiatorType === 'img'; }).map(function (e) {
                      return [e.name, e.responseStatus, e.transferSize, Math.round(e.duration)]; }),
                  styled: document.styleSheets.length > 0 && document.styleSheets[0].cssRules.length > 0,
                  h1: (document.querySelector('h1') || {}).innerText || ''});
        }
        if (document.readyState === 'complete') { state(); } else { window.addEventListener('load', state); }""")


def test_the_demo_site_loads_over_https_with_no_certificate_error(https_master, chromium):
    https, admin, spki = https_master
    with chromium_session(chromium, flags=(f"--ignore-certificate-errors-spki-list={spki}",)) as driver:
        driver.get(f"https://localhost:{https}/")
        state = _page_state(driver)
        assert state["title"] == "gows is serving this page", state
        assert state["secure"] and state["protocol"] == "https:" and state["logo"] and state["styled"], state
        entry = driver.execute_script("return performance.getEntriesByType('navigation')[0].nextHopProtocol;")
        assert entry == "http/1.1"  # the ALPN gows advertises
        screenshot(driver, "tls-demo-site.png")
        driver.get(f"http://127.0.0.1:{admin}/status")
        wait_until(lambda: "HTTPS certificate" in driver.page_source, timeout=10, message="the certificate cards")
        sans = driver.find_element("id", "f-tlssans")
        assert sans.text == "localhost, 127.0.0.1"
        driver.execute_script("arguments[0].scrollIntoView();", sans)
        screenshot(driver, "tls-admin-certificate.png")


def test_without_the_key_trusted_the_browser_refuses_the_certificate(https_master, chromium):
    """The control case: the trust above comes from the flag, not from a lax browser."""
    https, _, _ = https_master
    with chromium_session(chromium) as driver:
        driver.get(f"https://localhost:{https}/")
        state = _page_state(driver)
        assert state["title"] != "gows is serving this page", state
        assert "Privacy error" in state["title"] or "NET::ERR_CERT" in driver.page_source, state
