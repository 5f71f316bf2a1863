"""Helpers of the browser tests: Debian's chromium driven through chromium-driver (Selenium),
and screenshots kept under test-artifacts/ for a person to look at. The tests never install
the browser: `make test-deps` does (the `chromium` fixture in conftest.py says so when it is
missing)."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from support import REPO

ARTIFACTS = REPO / "test-artifacts"
CHROMIUM, DRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


def require_chromium() -> str:
    """The browser binary, once it and its driver are there; a missing one fails the test."""
    missing = [path for path in (CHROMIUM, DRIVER) if not os.path.exists(path)]
    if missing:
        pytest.fail(f"{' and '.join(missing)} missing: run `make test-deps` first", pytrace=False)
    return CHROMIUM


@contextlib.contextmanager
def chromium_session(binary: str, javascript: bool = True, flags: tuple[str, ...] = ()):
    """A headless Chromium with a fresh profile, driven through chromedriver; `flags`: more
    command-line switches."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="gows-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run",
                 "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--window-size=1280,900", *flags):
        options.add_argument(flag)
    if not javascript:
        options.add_experimental_option("prefs", {"profile.managed_default_content_settings.javascript": 2})
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def screenshot(driver, name: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / name
    driver.get_screenshot_as_file(str(path))
    assert path.stat().st_size > 5000  # a rendered page, not an empty image
    return path
