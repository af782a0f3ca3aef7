"""Fixtures that start REAL ``kamiyo serve`` processes (SQLite file or throwaway PostgreSQL)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from e2e.harness import KamiyoServer, ServerFactory
from support import throwaway_postgres


def _factory(stack: ExitStack, make_dir: Callable[[], Path]) -> ServerFactory:
    def make(backend: str = "sqlite", *, start: bool = True, **settings: str) -> KamiyoServer:
        """A migrated database and (unless ``start=False``) a running server on it."""
        workdir = make_dir()
        if backend == "sqlite":
            url = f"sqlite:///{workdir / 'kamiyo.db'}"
        elif backend == "postgres":
            url = stack.enter_context(throwaway_postgres())
        else:
            raise ValueError(backend)
        server = KamiyoServer(workdir, url, **settings)
        # Registered after the database, so the server stops before its database is dropped.
        stack.callback(server.close)
        server.upgrade()
        if start:
            server.start()
        return server

    return make


@pytest.fixture(scope="module")
def module_servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerFactory]:
    """Start servers shared by one test module; all stopped when the module is done."""
    with ExitStack() as stack:
        yield _factory(stack, lambda: tmp_path_factory.mktemp("kamiyo"))


@pytest.fixture
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerFactory]:
    """Start servers owned by one test (for tests that restart or kill them)."""
    with ExitStack() as stack:
        yield _factory(stack, lambda: tmp_path_factory.mktemp("kamiyo"))
