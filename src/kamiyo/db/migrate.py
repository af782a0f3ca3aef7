"""Alembic, driven from code: ``kamiyo db upgrade`` and ``make run`` both call ``upgrade``."""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine

from kamiyo.config import DEFAULT_MAINTENANCE_TIMEOUT
from kamiyo.db.engine import allow_long_statements

MIGRATIONS = Path(__file__).with_name("migrations")
log = logging.getLogger("kamiyo.db")
_INCREMENTAL = 2  # PRAGMA auto_vacuum: 0 none, 1 full, 2 incremental


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
    queued behind it, so it fails instead and can be run again. SQLite: the database is put in
    incremental vacuum mode first (``enable_incremental_vacuum``).
    """
    if engine.dialect.name == "sqlite":
        enable_incremental_vacuum(engine)
    config = alembic_config(engine.url.render_as_string(hide_password=False))
    with engine.begin() as connection:
        allow_long_statements(connection, statement_timeout)
        config.attributes["connection"] = connection
        command.upgrade(config, revision)


def enable_incremental_vacuum(engine: Engine) -> bool:
    """SQLite: put the file in ``auto_vacuum=INCREMENTAL`` mode, so that the pages of pruned rows can
    be given back to the file system (``PRAGMA incremental_vacuum``, operations/prune.py). True when
    the database is (now) in that mode.

    SQLite changes that mode only on a database that holds nothing yet, or through a VACUUM, which
    rewrites the whole file; setting WAL mode, as every connection does, already counts as
    writing. So a new database and an existing one alike are converted here, once, by a VACUUM:
    instant on a new database. On an existing one it holds the write lock while it copies the
    file (the image runs ``kamiyo db upgrade`` before ``kamiyo serve``; a delivery meanwhile gets
    503 and Stripe retries it) and needs room for a copy of the file beside it and one in the
    temporary directory; without that room it is left for a later upgrade, and until then the
    pages of pruned rows are reused for new rows but not given back.
    """
    database = engine.url.database
    if not database or database == ":memory:" or engine.url.query.get("mode") == "memory":
        return False
    raw = engine.raw_connection()
    try:
        sqlite = raw.driver_connection
        assert sqlite is not None
        if sqlite.execute("PRAGMA auto_vacuum").fetchone()[0] == _INCREMENTAL:
            return True
        pages, page_size = (
            sqlite.execute("PRAGMA page_count").fetchone()[0],
            sqlite.execute("PRAGMA page_size").fetchone()[0],
        )
        size = int(pages) * int(page_size)
        folder = Path(database).resolve().parent
        if size and (shutil.disk_usage(folder).free < 2 * size or shutil.disk_usage(tempfile.gettempdir()).free < size):
            log.warning(
                "SQLite database of %d MiB left without incremental vacuum: not enough free space to rewrite it "
                "(run `kamiyo db upgrade` again once there is); pruned pages are reused but not given back",
                size >> 20,
            )
            return False
        if sqlite.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]:
            log.warning("SQLite database of %d MiB rewritten once (VACUUM) for incremental vacuum", size >> 20)
        sqlite.execute("PRAGMA auto_vacuum=INCREMENTAL")
        # VACUUM copies the database into a temporary one: on disk, not in memory (temp_store).
        sqlite.execute("PRAGMA temp_store=FILE")
        try:
            sqlite.execute("VACUUM")
        finally:
            sqlite.execute("PRAGMA temp_store=MEMORY")
        return bool(sqlite.execute("PRAGMA auto_vacuum").fetchone()[0] == _INCREMENTAL)
    finally:
        raw.close()
