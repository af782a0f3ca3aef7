"""Engine construction: SQLite in WAL mode with immediate write transactions, or PostgreSQL.

Every engine hides SQL parameters from its errors (``hide_parameters``): an error's text reaches
logs and stored errors, and its parameters would carry customers' emails there.

PostgreSQL connections start with the service's limits (``DATABASE_*_TIMEOUT_SECONDS``): a
connection attempt, a statement and a wait for a lock each end with an error instead of
hanging, and TCP keepalives notice a server that vanished without closing the connection.
Work that is long by nature (migrations, sync, backfill) raises the statement limit in its own
transactions (``allow_long_statements``).

On SQLite every wait for the write lock is bounded too (``SqliteWriteLock``): a write
transaction's by ``DEFAULT_WRITE_WAIT`` or its connection's ``WRITE_WAIT_OPTION``. A write
transaction commits at ``SQLITE_SYNCHRONOUS``, unless its connection says it is replayable
(``REPLAYABLE_OPTION``).
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.pool import Pool

from kamiyo.config import Settings
from kamiyo.db.driver import as_sqlalchemy_error, sqlalchemy_errors

# How long a write transaction waits for SQLite's write lock unless it says otherwise (the
# execution option WRITE_WAIT_OPTION): what `kamiyo worker` and the CLI wait, and what every
# other statement may spend in SQLite's busy handler.
DEFAULT_WRITE_WAIT = 30.0
WRITE_WAIT_OPTION = "kamiyo_write_wait"
# A write transaction whose every effect can be made again from what is committed before it (a
# worker's batch: its events stay pending in the inbox until it commits; a page of a sync: it
# can be read from Stripe again, and the run's cursor moves with it). On SQLite it commits at
# synchronous=NORMAL, without waiting for the disk: in WAL mode a crash of the process loses
# nothing, and a power loss may undo the last such transactions, each whole or not at all; their
# events are then pending again, the sync resumes from the page before. Every other write
# transaction (the inbox's, an override's) commits at SQLITE_SYNCHRONOUS, and its fsync makes
# what was written before it durable too.
REPLAYABLE_OPTION = "kamiyo_replayable"
# One BEGIN IMMEDIATE attempt's wait in SQLite's busy handler. Between attempts the process's
# own write lock is let go, so that no thread of this process queues behind one that waits for
# another process.
BUSY_SLICE = 0.05
_BUSY_CODES = (5, 6)  # SQLITE_BUSY, SQLITE_LOCKED
_PRAGMA_KEY = "kamiyo_pragma_"  # + a PRAGMA's name: its value on the connection, in the pool's info


class SqliteWriteLock:
    """SQLite's one writer, among the threads of one process.

    Writers queue on a lock of ours and are handed the database the moment it is free, instead
    of polling in SQLite's busy handler (whose sleeps grow to 100 ms and would show up as
    latency on the webhook endpoint). The lock is held from BEGIN IMMEDIATE until the COMMIT or
    ROLLBACK has returned. When another process holds SQLite's lock, a BEGIN waits at most
    ``busy_slice`` in SQLite's busy handler, lets go of our lock, and tries again until its
    deadline: every wait is bounded, and a thread with a short deadline (the inbox writer) never
    waits behind one with a long one (the worker) that is itself waiting for another process.
    """

    def __init__(self, busy_slice: float) -> None:
        self._lock = threading.Lock()
        self._slice_ms = max(0, round(busy_slice * 1000))
        self.busy_attempts = 0  # BEGIN IMMEDIATEs that found the database locked by another process
        # Per thread: when its current BEGIN first found the database locked by another process.
        self._busy_since: dict[int, float] = {}

    def busy_for(self, thread_id: int) -> float:
        """How long ``thread_id``'s current BEGIN has found SQLite locked by another process (0: it has not)."""
        since = self._busy_since.get(thread_id)
        return 0.0 if since is None else time.monotonic() - since

    def begin(self, connection: Any, wait: float) -> None:
        """BEGIN IMMEDIATE on ``connection`` within ``wait`` seconds, holding our lock after it."""
        started = time.monotonic()
        deadline = started + wait
        thread = threading.get_ident()
        driver = connection.connection.driver_connection
        try:
            while True:
                if not self._lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
                    locked = sqlite3.OperationalError(
                        f"database is locked: another transaction of this process held the write lock "
                        f"for the {wait:g} s this one could wait"
                    )
                    locked.sqlite_errorcode = 5
                    raise as_sqlalchemy_error(connection.dialect, "BEGIN IMMEDIATE", None, locked)
                try:
                    _pragma(connection, "busy_timeout", self._slice_ms)
                    driver.execute("BEGIN IMMEDIATE")
                except sqlite3.OperationalError as exc:
                    self._lock.release()
                    if getattr(exc, "sqlite_errorcode", 0) & 0xFF not in _BUSY_CODES or time.monotonic() >= deadline:
                        raise as_sqlalchemy_error(connection.dialect, "BEGIN IMMEDIATE", None, exc) from exc
                    self.busy_attempts += 1
                    self._busy_since.setdefault(thread, time.monotonic())
                    time.sleep(0.001)  # lets a thread of ours that waits for the lock take its turn
                    continue
                except BaseException:
                    self._lock.release()
                    raise
                connection.info["kamiyo_write_lock"] = True
                return
        finally:
            self._busy_since.pop(thread, None)

    def release(self, connection: Any) -> None:
        if connection.info.pop("kamiyo_write_lock", False):
            self._lock.release()


_write_locks: weakref.WeakKeyDictionary[Pool, SqliteWriteLock] = weakref.WeakKeyDictionary()


def sqlite_write_lock(engine: Engine) -> SqliteWriteLock | None:
    """The write lock of a SQLite engine made by ``make_engine`` (None for PostgreSQL)."""
    return _write_locks.get(engine.pool)


def _json_text(value: Any) -> str:
    return orjson.dumps(value).decode()


def make_engine(settings: Settings, *, busy_slice: float = BUSY_SLICE, **kwargs: Any) -> Engine:
    """Build the engine for ``settings.database_url``; creates the SQLite file's folder.

    On SQLite a write transaction waits at most ``DEFAULT_WRITE_WAIT`` for the write lock, or
    what its connection's execution option ``WRITE_WAIT_OPTION`` says."""
    url = make_url(settings.database_url)
    kwargs.setdefault("hide_parameters", True)
    # JSON columns (an event's outcome, audit states): orjson, several times faster than json.
    kwargs.setdefault("json_serializer", _json_text)
    kwargs.setdefault("json_deserializer", orjson.loads)
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
    engine = create_engine(url, connect_args={"timeout": DEFAULT_WRITE_WAIT, "check_same_thread": False}, **kwargs)
    synchronous = settings.sqlite_synchronous
    write_lock = _write_locks[engine.pool] = SqliteWriteLock(busy_slice)
    wait_ms = round(DEFAULT_WRITE_WAIT * 1000)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, record: Any) -> None:
        # Let SQLAlchemy, not the driver, decide when a transaction begins (see _on_begin).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        # The two a transaction may change as it begins (_pragma), and what they are now.
        for name, value in (("synchronous", synchronous), ("busy_timeout", wait_ms)):
            cursor.execute(f"PRAGMA {name}={value}")
            record.info[_PRAGMA_KEY + name] = value
        cursor.execute("PRAGMA foreign_keys=ON")
        # Statement journals in memory: a multi-row statement inside a transaction (the inbox
        # writer's batch insert, the worker's batch updates) journals every page it changes, and
        # past 64 KiB SQLite spills that journal to a temporary file created, written and deleted
        # per statement, three more write calls per stored event (docs/PERFORMANCE.md). The
        # journal is only ever needed to undo a failed statement.
        cursor.execute("PRAGMA temp_store=MEMORY")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        # A write transaction takes the write lock up front: two writers that both began reading
        # would otherwise deadlock on the upgrade (SQLITE_BUSY, no retry possible).
        options = connection.get_execution_options()
        if options.get("readonly"):
            # A reader waits in the busy handler as long as it takes (in WAL mode only a recovery
            # or an exclusive lock makes it wait at all).
            _pragma(connection, "busy_timeout", wait_ms)
            _driver_send(connection, "BEGIN")
            return
        _pragma(connection, "synchronous", "NORMAL" if options.get(REPLAYABLE_OPTION) else synchronous)
        write_lock.begin(connection, float(options.get(WRITE_WAIT_OPTION, DEFAULT_WRITE_WAIT)))

    # SQLAlchemy calls these before it asks the driver to commit or roll back. The lock must
    # cover the COMMIT (its fsync, and a checkpoint when one is due) and the ROLLBACK: the next
    # writer would otherwise find SQLite still locked and sleep in the busy handler, and a
    # delivery's batch with it. So the transaction of a write ends here, on the
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
                write_lock.release(connection)

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


def _pragma(connection: Any, name: str, value: int | str) -> None:
    """Set the connection's PRAGMA ``name`` (busy_timeout, synchronous) to ``value`` unless it is
    so already: one statement when it changes. Called outside a transaction (SQLite takes
    synchronous only there)."""
    info = connection.info
    if info.get(_PRAGMA_KEY + name) != value:
        connection.connection.driver_connection.execute(f"PRAGMA {name}={value}")
        info[_PRAGMA_KEY + name] = value


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
