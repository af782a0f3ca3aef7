"""Fixtures for the operator console: the app in-process, real servers, real Chromium.

Chromium is Debian's (``apt-get install chromium chromium-driver``; .ci/run installs it), driven
by Playwright's Python client, which talks to that binary and downloads no browser of its own.
Without it the browser tests skip on a developer machine and fail in CI (CI=true).
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

from admin.app_client import ADMIN_TOKEN, AppClient, Console
from admin.chromium import CHROMIUM, launch
from e2e.harness import KamiyoServer, ServerFactory
from kamiyo.db.engine import make_engine
from kamiyo.db.migrate import upgrade
from kamiyo.web.app import create_app
from support import in_ci, make_settings


@pytest.fixture
def console(tmp_path: Path) -> Iterator[Console]:
    """The app with KAMIYO_ADMIN_TOKEN set, on a fresh SQLite file; the worker is run by the test."""
    settings = make_settings(f"sqlite:///{tmp_path / 'kamiyo.db'}", admin_token=ADMIN_TOKEN)
    engine = make_engine(settings)
    upgrade(engine)
    app = create_app(settings, engine=engine, run_worker=False)
    with AppClient(app) as client:
        yield Console(client, engine, settings)
    engine.dispose()


@pytest.fixture
def admin_log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO, logger="kamiyo.admin")
    return caplog


# -- real servers ---------------------------------------------------------------------------


def _servers(stack: ExitStack, make_dir: Callable[[], Path]) -> ServerFactory:
    def make(**settings: str) -> KamiyoServer:
        """A migrated SQLite database and a running ``kamiyo serve`` on it, the console on."""
        workdir = make_dir()
        url = f"sqlite:///{workdir / 'kamiyo.db'}"
        # The tests that send wrong tokens on purpose would otherwise throttle the rest; throttling
        # has tests of its own (test_admin_server_limits.py), which set a small limit.
        defaults = {"KAMIYO_ADMIN_TOKEN": ADMIN_TOKEN, "ADMIN_SIGNIN_MAX_FAILURES": "10000"}
        server = KamiyoServer(workdir, url, **{**defaults, **settings})
        stack.callback(server.close)
        # Migrated in this process: the same Alembic upgrade as `kamiyo db upgrade`, without a process start.
        engine = make_engine(make_settings(url))
        upgrade(engine)
        engine.dispose()
        server.start()
        return server

    return make


@pytest.fixture(scope="session")
def console_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KamiyoServer]:
    """One ``kamiyo serve`` with the console on, shared by the tests that do not restart it."""
    with ExitStack() as stack:
        yield _servers(stack, lambda: tmp_path_factory.mktemp("admin"))()


@pytest.fixture
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerFactory]:
    """Servers owned by one test (for tests that restart them)."""
    with ExitStack() as stack:
        yield _servers(stack, lambda: tmp_path_factory.mktemp("admin"))


# -- the browser ----------------------------------------------------------------------------


def _unavailable(message: str) -> None:
    if in_ci():
        pytest.fail(f"{message}: CI must run the browser tests (apt-get install chromium chromium-driver)")
    pytest.skip(message)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Debian's headless Chromium, launched by Playwright (one per test module)."""
    if not (os.path.isfile(CHROMIUM) or shutil.which(CHROMIUM)):
        _unavailable(f"Chromium not found at {CHROMIUM}")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("playwright is not installed (pip install -e '.[dev]')")
    with sync_playwright() as playwright:
        chromium = launch(playwright)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    """A fresh browser context (no cookies) and page; script errors fail the test."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    context.set_default_timeout(15_000)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    yield page
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"
