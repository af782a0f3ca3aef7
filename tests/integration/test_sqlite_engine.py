"""SQLite's engine (db/engine.py): writers of one process queue on its lock, never in SQLite's busy handler.

SQLite-only by nature: PostgreSQL has no single write lock, and its engine no lock of ours.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, event, text
from sqlalchemy.exc import IntegrityError

from kamiyo.db.engine import make_engine
from support import make_settings


def _engine_without_busy_wait(path: Path) -> Engine:
    """The service's SQLite engine, except that SQLite's busy timeout is 0: a write that finds
    the database locked fails at once instead of sleeping in the busy handler."""
    engine = make_engine(make_settings(database_url=f"sqlite:///{path}"))

    @event.listens_for(engine, "connect")
    def _no_busy_wait(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.execute("PRAGMA busy_timeout=0")

    return engine


def test_the_next_writer_begins_only_after_the_last_one_committed_or_rolled_back(tmp_path: Path) -> None:
    """With SQLite's busy timeout at 0, a BEGIN IMMEDIATE that finds another transaction of the
    process still committing (or rolling back) fails at once as "database is locked". Two threads
    writing as fast as they can, committing and rolling back: none may fail."""
    engine = _engine_without_busy_wait(tmp_path / "lock.db")
    with engine.begin() as connection:
        connection.execute(text("CREATE TABLE written (thread TEXT, n INTEGER)"))
    errors: list[BaseException] = []

    def write(name: str) -> None:
        try:
            for n in range(400):
                with engine.connect() as connection:
                    connection.begin()
                    connection.execute(text("INSERT INTO written VALUES (:thread, :n)"), {"thread": name, "n": n})
                    if n % 5:
                        connection.commit()
                    else:
                        connection.rollback()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(name,)) for name in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    try:
        assert errors == []
        with engine.connect() as connection:
            assert connection.execute(text("SELECT count(*) FROM written")).scalar_one() == 2 * 320
    finally:
        engine.dispose()


def test_a_commit_that_fails_leaves_nothing_stored_and_the_lock_free(tmp_path: Path) -> None:
    """A deferred foreign key fails at COMMIT, which SQLite leaves open: the transaction is rolled
    back and the lock released, so another thread writes at once while the failed connection is
    still checked out."""
    engine = _engine_without_busy_wait(tmp_path / "fail.db")
    with engine.begin() as connection:
        connection.execute(text("CREATE TABLE parent (id INTEGER PRIMARY KEY)"))
        connection.execute(
            text("CREATE TABLE child (parent_id INTEGER REFERENCES parent (id) DEFERRABLE INITIALLY DEFERRED)")
        )
    written: list[str] = []

    def write_elsewhere() -> None:
        with engine.begin() as connection:
            connection.execute(text("INSERT INTO parent VALUES (1)"))
        written.append("parent 1")

    try:
        with engine.connect() as failing:
            failing.begin()
            failing.execute(text("INSERT INTO child VALUES (42)"))  # no parent 42: refused at COMMIT
            with pytest.raises(IntegrityError, match="FOREIGN KEY"):
                failing.commit()
            other = threading.Thread(target=write_elsewhere, daemon=True)
            other.start()
            other.join(timeout=10)
            assert written == ["parent 1"]
        with engine.connect() as connection:
            assert connection.execute(text("SELECT count(*) FROM child")).scalar_one() == 0
            assert connection.execute(text("SELECT id FROM parent")).scalars().all() == [1]
    finally:
        engine.dispose()
