"""A headless Chromium for page tests: Debian's ``chromium`` driven by Playwright.

Playwright's own browser downloads are never used (``playwright install``
needs the internet); `launch` points it at the system binary and skips the
test where none is installed.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import AsyncIterator
from typing import Any

import pytest

#: Where Debian's package puts the browser.
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@contextlib.asynccontextmanager
async def launch() -> AsyncIterator[Any]:
    """A headless Chromium browser (Playwright's async API) for the duration of the block."""
    if not shutil.which(CHROMIUM):
        pytest.skip("Debian's chromium is not installed (scripts/install.sh installs it)")
    playwright_api = pytest.importorskip("playwright.async_api")
    async with playwright_api.async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        try:
            yield browser
        finally:
            await browser.close()
