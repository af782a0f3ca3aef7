"""Database fixtures (every integration test runs on SQLite and on PostgreSQL), and the root logger kept as it was."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine

from kamiyo.config import Settings
from kamiyo.db.engine import make_engine
from kamiyo.db.migrate import upgrade
from support import make_settings, throwaway_postgres


@pytest.fixture(autouse=True)
def _root_logger_restored() -> Iterator[None]:
    """A test that calls ``configure_logging`` binds the root logger to the stderr of that moment
    (pytest's capture, Click's runner): put the root logger back as it was, so that no later test
    logs into a stream that is closed by then."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for added in [h for h in root.handlers if h not in handlers]:
        added.close()
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty database: a SQLite file, or a throwaway PostgreSQL database."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'kamiyo.db'}"
    else:
        with throwaway_postgres() as url:
            yield url


@pytest.fixture
def settings(database_url: str) -> Settings:
    return make_settings(database_url)


@pytest.fixture
def engine(settings: Settings) -> Iterator[Engine]:
    """An engine on a migrated database."""
    engine = make_engine(settings)
    upgrade(engine)
    yield engine
    engine.dispose()
