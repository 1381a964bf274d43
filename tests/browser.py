"""A real browser for the page tests: Debian's chromium driven by Playwright (its own browser download cannot
run here), and the folder screenshots go to (artifacts/screenshots/, or $MVFA_SCREENSHOTS)."""

import contextlib
import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def chromium() -> str:
    """The chromium executable, or a skip saying what to install."""
    pytest.importorskip(
        "playwright.sync_api", reason="playwright absent: pip install -r tests/requirements.txt"
    )
    found = os.environ.get("MVFA_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        pytest.skip("chromium absent: apt-get install -y chromium (or MVFA_CHROMIUM=/path/to/chromium)")
    return found


@contextlib.contextmanager
def browser_page(width: int = 1200, height: int = 900):
    """A fresh page in headless chromium; closed on exit."""
    from playwright.sync_api import sync_playwright

    executable = chromium()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        try:
            yield browser.new_page(viewport={"width": width, "height": height})
        finally:
            browser.close()


def screenshot_path(name: str) -> Path:
    folder = Path(os.environ.get("MVFA_SCREENSHOTS") or REPO / "artifacts" / "screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder / name
