"""Alembic, driven from code: ``kamiyo db upgrade`` and ``make run`` both call ``upgrade``."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine

from kamiyo.config import DEFAULT_MAINTENANCE_TIMEOUT
from kamiyo.db.engine import allow_long_statements

MIGRATIONS = Path(__file__).with_name("migrations")


def alembic_config(database_url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    # ConfigParser treats % specially; a password may contain one.
    config.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    return config


def upgrade(engine: Engine, revision: str = "head", *, statement_timeout: float = DEFAULT_MAINTENANCE_TIMEOUT) -> None:
    """Apply migrations up to ``revision`` on ``engine``'s database.

    On PostgreSQL the migration's transaction may run statements for ``statement_timeout``
    seconds (``DATABASE_MAINTENANCE_TIMEOUT_SECONDS``; 0: no limit), not the service's limit:
    rebuilding an index of a large inbox takes longer. Its waits for locks keep the service's
    ``lock_timeout``: a migration queued behind a long transaction would hold up every delivery
    queued behind it, so it fails instead and can be run again.
    """
    config = alembic_config(engine.url.render_as_string(hide_password=False))
    with engine.begin() as connection:
        allow_long_statements(connection, statement_timeout)
        config.attributes["connection"] = connection
        command.upgrade(config, revision)
