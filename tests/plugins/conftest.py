"""Fixtures of the browser tests: headless Chromium from Debian's ``chromium`` package, driven by
Playwright with ``executable_path`` (never a downloaded browser), and optional screenshots."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@pytest.fixture()
def browser():
    """A launched headless Chromium; skips when the Debian package is missing, fails under ``CI=true``."""
    if CHROMIUM is None:
        if os.environ.get("CI") == "true":
            pytest.fail("CI=true but Debian's chromium is not installed (apt-get install chromium)")
        pytest.skip("Debian package chromium is not installed (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture()
def save_screenshot():
    """``save_screenshot(page, "name.png")``: keeps a screenshot in ``$BGREMOVAL_SCREENSHOTS`` when set
    (how ``docs/*.png`` are made); does nothing otherwise."""
    folder = os.environ.get("BGREMOVAL_SCREENSHOTS")

    def save(page, name: str) -> None:
        if folder:
            Path(folder).mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(Path(folder) / name), full_page=False)

    return save
