"""A directory listing in a real headless Chromium (as tests/test_admin_browser.py drives it),
served by a real master: names shown as text exactly as named (no markup of theirs runs), the
links lead to the files, the parent link works, and it is complete without JavaScript.
Screenshots go to test-artifacts/ for a person to look at."""
from __future__ import annotations

import pytest

from browser_support import chromium_session, screenshot
from master_support import serving

pytestmark = pytest.mark.browser

XSS = '<img src=x onerror="document.title=\'pwned\'">.txt'


@pytest.fixture
def listed(tmp_path):
    root = tmp_path / "www"
    (root / "docs" / "guides").mkdir(parents=True)
    (root / "docs" / XSS).write_bytes(b"just a file\n")
    (root / "docs" / "<xss>.txt").write_bytes(b"x\n")
    (root / "docs" / "report 2026.pdf").write_bytes(b"%PDF-1.4\n" + b"0" * 150_000)
    (root / "docs" / "notes.md").write_bytes(b"# notes\n")
    (root / "docs" / ".env").write_bytes(b"SECRET=1\n")
    (root / "docs" / "guides" / "start.html").write_bytes(b"<h1>start</h1>")
    (tmp_path / "master").mkdir()
    m = serving(tmp_path / "master", root, 1, listing=True)
    yield m
    m.stop()


def _names(driver) -> list[str]:
    return driver.execute_script(
        "return Array.from(document.querySelectorAll('#listing tbody a')).map(a => a.textContent);")


@pytest.mark.parametrize("javascript", [True, False], ids=["js", "nojs"])
def test_listing_shows_names_as_text_and_links_to_them(listed, chromium, javascript):
    with chromium_session(chromium, javascript=javascript) as driver:
        driver.get(f"http://127.0.0.1:{listed.port}/docs/")
        assert driver.title == "Index of /docs/"
        assert _names(driver) == ["../", XSS, "<xss>.txt", "guides/", "notes.md", "report 2026.pdf"]
        assert not driver.find_elements("css selector", "#listing img")  # the name's markup stayed text
        assert driver.find_element("id", "summary").text == "5 entries, sorted by name"
        cells = driver.execute_script(
            "return Array.from(document.querySelectorAll('#listing tbody tr')).map(r => r.innerText);")
        assert any("report 2026.pdf" in row and "146.5 KiB" in row for row in cells)
        screenshot(driver, f"site-listing{'' if javascript else '-nojs'}.png")
        driver.find_element("link text", XSS).click()
        assert driver.find_element("tag name", "body").text == "just a file"
        driver.back()
        driver.find_element("link text", "guides/").click()
        assert driver.title == "Index of /docs/guides/"
        driver.find_element("link text", "../").click()
        assert driver.title == "Index of /docs/"
