"""``kamiyo db upgrade | current``: the database schema (Alembic migrations)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from kamiyo.cli.invocation import OK, PROBLEM, with_settings
from kamiyo.errors import KamiyoError

if TYPE_CHECKING:
    from sqlalchemy import Engine

    from kamiyo.config import Settings


@click.group(short_help="database schema", help="The database schema: Alembic migrations.")
def db() -> None:
    pass


@db.command(short_help="apply every pending migration", help="apply every pending migration")
@with_settings
def upgrade(settings: Settings) -> int:
    from kamiyo.db.engine import make_engine
    from kamiyo.db.migrate import upgrade as migrate

    engine = make_engine(settings)
    try:
        migrate(engine, statement_timeout=settings.database_maintenance_timeout_seconds)
        current, _head = schema_revisions(engine)
    finally:
        engine.dispose()
    print(f"database at revision {current}")
    return OK


@db.command(
    short_help="print the schema revision the database is at (exit 1 when behind)",
    help="print the schema revision the database is at (exit 1 when behind)",
)
@with_settings
def current(settings: Settings) -> int:
    from kamiyo.db.engine import make_engine

    engine = make_engine(settings)
    try:
        at, head = schema_revisions(engine)
    finally:
        engine.dispose()
    print(f"current {at or 'none'}, head {head}")
    return OK if at == head else PROBLEM


def schema_revisions(engine: Engine) -> tuple[str | None, str | None]:
    """The revision the database is at, and the newest this version knows."""
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    from kamiyo.db.migrate import alembic_config

    script = ScriptDirectory.from_config(alembic_config(engine.url.render_as_string(hide_password=False)))
    with engine.connect().execution_options(readonly=True) as connection:
        at = MigrationContext.configure(connection).get_current_revision()
    return at, script.get_current_head()


def require_current_schema(engine: Engine) -> None:
    at, head = schema_revisions(engine)
    if at != head:
        raise KamiyoError(
            f"database schema is at {at or 'nothing'}, this version needs {head}: run `kamiyo db upgrade`"
        )
