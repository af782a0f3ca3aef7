"""Debian's Chromium (``apt-get install chromium chromium-driver``), launched headless by Playwright.

Playwright's Python package ships its driver; it is pointed at /usr/bin/chromium, so no browser
is ever downloaded (``playwright install`` is never run).
"""

from __future__ import annotations

import os
from typing import Any

CHROMIUM = os.environ.get("KAMIYO_TEST_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def launch(playwright: Any) -> Any:
    """A headless Chromium browser from ``playwright`` (the object ``sync_playwright()`` yields)."""
    return playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, timeout=30_000)
