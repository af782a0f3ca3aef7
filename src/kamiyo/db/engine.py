"""Engine construction: SQLite in WAL mode with immediate write transactions, or PostgreSQL.

Every engine hides SQL parameters from its errors (``hide_parameters``): an error's text reaches
logs and stored errors, and its parameters would carry customers' emails there.

PostgreSQL connections start with the service's limits (``DATABASE_*_TIMEOUT_SECONDS``): a
connection attempt, a statement and a wait for a lock each end with an error instead of
hanging, and TCP keepalives notice a server that vanished without closing the connection.
Work that is long by nature (migrations, sync, backfill) raises the statement limit in its own
transactions (``allow_long_statements``).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.engine import make_url

from kamiyo.config import Settings
from kamiyo.db.driver import sqlalchemy_errors


def make_engine(settings: Settings, **kwargs: Any) -> Engine:
    """Build the engine for ``settings.database_url``; creates the SQLite file's folder."""
    url = make_url(settings.database_url)
    kwargs.setdefault("hide_parameters", True)
    if url.get_backend_name() != "sqlite":
        return create_engine(
            url,
            pool_pre_ping=True,
            pool_size=10,
            max_overflow=10,
            connect_args=postgresql_connect_args(settings, url.query.get("options")),
            **kwargs,
        )

    if url.database and url.database != ":memory:":
        Path(url.database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False}, **kwargs)
    synchronous = settings.sqlite_synchronous
    # SQLite allows one writer. Inside one process, writers queue on this lock and are handed
    # the database the moment it is free, instead of polling in SQLite's busy handler (whose
    # sleeps grow to 100 ms and would show up as latency on the webhook endpoint).
    write_lock = threading.Lock()

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy, not the driver, decide when a transaction begins (see _on_begin).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA synchronous={synchronous}")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.execute("PRAGMA foreign_keys=ON")
        # Statement journals in memory: a multi-row statement inside a transaction (the inbox
        # writer's batch insert, the worker's batch updates) journals every page it changes, and
        # past 64 KiB SQLite spills that journal to a temporary file created, written and deleted
        # per statement: 8 write calls per stored event instead of 5 (bench/: writer CPU per
        # event 54 -> 40 us). The journal is only ever needed to undo a failed statement.
        cursor.execute("PRAGMA temp_store=MEMORY")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        # A write transaction takes the write lock up front: two writers that both began reading
        # would otherwise deadlock on the upgrade (SQLITE_BUSY, no retry possible).
        if connection.get_execution_options().get("readonly"):
            _driver_send(connection, "BEGIN")
            return
        write_lock.acquire()
        connection.info["kamiyo_write_lock"] = True
        try:
            _driver_send(connection, "BEGIN IMMEDIATE")
        except BaseException:
            _release(connection)
            raise

    def _release(connection: Any) -> None:
        if connection.info.pop("kamiyo_write_lock", False):
            write_lock.release()

    # SQLAlchemy calls these before it asks the driver to commit or roll back. The lock must
    # cover the COMMIT (its fsync, and a checkpoint when one is due) and the ROLLBACK: the next
    # writer would otherwise find SQLite still locked and sleep in the busy handler (measured: a
    # delivery's batch waited 79 ms once). So the transaction of a write ends here, on the
    # driver, and the driver's own commit or rollback then finds nothing left to do.
    def _ending(sql: str) -> Callable[[Any], None]:
        def end(connection: Any) -> None:
            if "kamiyo_write_lock" not in connection.info:
                return
            try:
                _driver_end(connection, sql)
            except BaseException:
                # It did not end as asked (a failed COMMIT has committed nothing): roll it back, so
                # that the lock is free, and let the caller see the error.
                with contextlib.suppress(Exception):
                    _driver_end(connection, "ROLLBACK")
                raise
            finally:
                _release(connection)

        return end

    event.listen(engine, "commit", _ending("COMMIT"))
    event.listen(engine, "rollback", _ending("ROLLBACK"))

    return engine


# A peer that vanished (host down, network cut) is noticed within idle + interval * count seconds.
_KEEPALIVES = {"keepalives": 1, "keepalives_idle": 30, "keepalives_interval": 10, "keepalives_count": 3}


def postgresql_connect_args(settings: Settings, url_options: str | tuple[str, ...] | None = None) -> dict[str, Any]:
    """psycopg's connection arguments for the service's limits: ``connect_timeout``, and the
    session's ``statement_timeout`` and ``lock_timeout`` sent at connection start (``options``,
    after any the URL gives, so that no extra round trip is spent on them)."""
    options = " ".join(url_options) if isinstance(url_options, tuple) else (url_options or "")
    limits = (
        ("statement_timeout", settings.database_statement_timeout_seconds),
        ("lock_timeout", settings.database_lock_timeout_seconds),
    )
    ours = " ".join(f"-c {name}={_milliseconds(seconds)}" for name, seconds in limits)
    return {
        "connect_timeout": settings.database_connect_timeout_seconds,
        "options": f"{options} {ours}".strip(),
        **_KEEPALIVES,
    }


def allow_long_statements(connection: Connection, seconds: float) -> None:
    """PostgreSQL: this transaction's statements may run ``seconds`` (0: without a limit) instead
    of the service's ``DATABASE_STATEMENT_TIMEOUT_SECONDS``; the limit returns at its end."""
    if connection.dialect.name == "postgresql":
        connection.exec_driver_sql(f"SET LOCAL statement_timeout = {_milliseconds(seconds)}")


def _milliseconds(seconds: float) -> int:
    """PostgreSQL's setting in milliseconds; a positive limit never rounds down to 0 (no limit)."""
    return max(1, round(seconds * 1000)) if seconds > 0 else 0


def _driver_end(connection: Any, sql: str) -> None:
    """COMMIT or ROLLBACK on the driver, if its transaction is still open (SQLite may have
    rolled it back by itself after an error)."""
    if connection.closed or connection.invalidated:
        return  # its driver connection is gone, and with it the transaction
    if connection.connection.driver_connection.in_transaction:
        _driver_send(connection, sql)


def _driver_send(connection: Any, sql: str) -> None:
    """Send BEGIN, COMMIT or ROLLBACK to the driver as it is: through SQLAlchemy's execute a BEGIN
    cost more than the inbox writer's insert of a whole batch (the writer begins hundreds of
    transactions a second)."""
    with sqlalchemy_errors(connection, sql, None):
        connection.connection.driver_connection.execute(sql)
