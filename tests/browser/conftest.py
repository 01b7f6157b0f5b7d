"""Headless Chromium (Debian's ``chromium`` package) driven by Playwright, never a downloaded browser build.

Without /usr/bin/chromium the browser tests are skipped locally; under CI=true they fail, so a missing
install step shows up.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")  # Debian package "chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--disable-background-networking",
        "--disable-component-update", "--no-first-run", "--disable-sync",
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1, EXCLUDE localhost"]


def _unavailable(msg: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(msg)
    pytest.skip(msg)


# Module scope, not session: between its sync calls Playwright marks its own event loop as the thread's
# running loop, so while a browser is open, pytest-asyncio cannot run the async tests of other modules.
@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not os.path.exists(CHROMIUM):
        _unavailable(f"{CHROMIUM} missing: apt-get install -y chromium")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("playwright missing: pip install -e '.[test]'")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser: Any, base_url: str) -> Iterator[Any]:
    ctx = browser.new_context(base_url=base_url, viewport={"width": 1280, "height": 800})
    pg = ctx.new_page()
    pg.set_default_timeout(5000)
    yield pg
    ctx.close()


@pytest.fixture
def artifacts(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    """Where a test keeps what a person may want to look at afterwards (screenshots): under
    ``$TEST_ARTIFACTS/<test name>`` when set (a CI job can keep that folder), else the test's tmp_path."""
    root = os.environ.get("TEST_ARTIFACTS")
    if not root:
        return tmp_path
    folder = Path(root) / request.node.name
    folder.mkdir(parents=True, exist_ok=True)
    return folder
