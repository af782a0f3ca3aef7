"""SQLite's engine (db/engine.py): writers of one process queue on its lock, never in SQLite's busy handler.

SQLite-only by nature: PostgreSQL has no single write lock, and its engine no lock of ours.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.exc import IntegrityError, OperationalError

from kamiyo.db.engine import REPLAYABLE_OPTION, WRITE_WAIT_OPTION, make_engine, sqlite_write_lock
from kamiyo.db.errors import LOCKED, fault_kind, is_database_fault
from kamiyo.db.migrate import upgrade
from kamiyo.processing.worker import Worker
from kamiyo.webhooks.inbox import insert_new_events
from support import commit_levels, event_row, make_settings, sqlite_write_locked

NORMAL, FULL, EXTRA = 1, 2, 3


def _engine_without_busy_wait(path: Path) -> Engine:
    """The service's SQLite engine, except that a BEGIN IMMEDIATE does not wait in SQLite's busy
    handler at all: one that finds the database locked fails at once and is counted
    (``busy_attempts``) before it is tried again."""
    return make_engine(make_settings(database_url=f"sqlite:///{path}"), busy_slice=0)


def _table(engine: Engine) -> None:
    with engine.begin() as connection:
        connection.execute(text("CREATE TABLE written (thread TEXT, n INTEGER)"))


def test_the_next_writer_begins_only_after_the_last_one_committed_or_rolled_back(tmp_path: Path) -> None:
    """A BEGIN IMMEDIATE that found another transaction of the process still committing (or
    rolling back) would find the database locked. Two threads writing as fast as they can,
    committing and rolling back: none may fail, and no BEGIN may ever find SQLite locked."""
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
        lock = sqlite_write_lock(engine)
        assert lock is not None
        assert lock.busy_attempts == 0
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


@pytest.mark.timeout(60)
def test_a_write_waits_for_another_process_only_as_long_as_it_may_and_then_fails_as_locked(tmp_path: Path) -> None:
    """SQLite's own busy timeout (30 s) no longer decides: the wait a connection asks for does,
    and what it gets at the end is a database fault of the kind "locked"."""
    path = tmp_path / "held.db"
    engine = make_engine(make_settings(database_url=f"sqlite:///{path}"))
    _table(engine)
    try:
        with sqlite_write_locked(path), engine.connect() as connection:
            connection.execution_options(**{WRITE_WAIT_OPTION: 0.5})
            started = time.monotonic()
            with pytest.raises(OperationalError) as failed:
                connection.execute(text("INSERT INTO written VALUES ('w', 1)"))
            waited = time.monotonic() - started
        assert 0.4 < waited < 2.0
        assert is_database_fault(failed.value)
        assert fault_kind(failed.value) == LOCKED
        with engine.begin() as connection:  # released: writes go through again
            connection.execute(text("INSERT INTO written VALUES ('w', 2)"))
    finally:
        engine.dispose()


@pytest.mark.timeout(60)
def test_a_thread_waiting_for_another_process_does_not_hold_up_a_thread_with_a_shorter_wait(tmp_path: Path) -> None:
    """The worker (30 s wait) finds SQLite locked by another process; the inbox writer (a short
    wait) must get its answer within its own wait, not queue behind the worker; and the worker
    writes as soon as the other process lets go."""
    path = tmp_path / "two.db"
    engine = make_engine(make_settings(database_url=f"sqlite:///{path}"))
    _table(engine)
    worker_done: list[float] = []
    writer_failed: list[float] = []

    def worker() -> None:
        with engine.begin() as connection:
            connection.execute(text("INSERT INTO written VALUES ('worker', 1)"))
        worker_done.append(time.monotonic())

    def writer() -> None:
        try:
            with engine.connect() as connection:
                connection.execution_options(**{WRITE_WAIT_OPTION: 0.5})
                connection.execute(text("INSERT INTO written VALUES ('writer', 1)"))
                connection.commit()
        except OperationalError:
            writer_failed.append(time.monotonic())

    try:
        with sqlite_write_locked(path):
            first = threading.Thread(target=worker, daemon=True)
            first.start()
            time.sleep(0.3)  # the worker is in its wait
            started = time.monotonic()
            second = threading.Thread(target=writer, daemon=True)
            second.start()
            second.join(timeout=20)
            assert writer_failed, "the short wait ended without an error"
            assert writer_failed[0] - started < 2.0
            assert not worker_done  # still waiting for the other process
            released = time.monotonic()
        first.join(timeout=20)
        assert worker_done
        assert worker_done[0] - released < 1.0
    finally:
        engine.dispose()


def test_a_replayable_transaction_commits_at_normal_and_every_other_write_at_the_configured_level(
    tmp_path: Path,
) -> None:
    """One pooled connection, used by both kinds of write in turn: each commits at its own level,
    whichever ran on the connection before (SQLITE_SYNCHRONOUS=EXTRA here)."""
    engine = make_engine(make_settings(f"sqlite:///{tmp_path / 'levels.db'}", sqlite_synchronous="EXTRA"))
    replayable = engine.execution_options(**{REPLAYABLE_OPTION: True})
    levels = commit_levels(engine)
    drivers = set()
    try:
        for writer in (engine, replayable, replayable, engine, engine, replayable, engine):
            with writer.begin() as connection:
                drivers.add(id(connection.connection.driver_connection))
                connection.execute(text("CREATE TABLE IF NOT EXISTS written (n INTEGER)"))
                connection.execute(text("INSERT INTO written VALUES (1)"))
        with engine.connect().execution_options(readonly=True) as connection:
            assert connection.execute(text("SELECT count(*) FROM written")).scalar() == 7
    finally:
        engine.dispose()
    assert len(drivers) == 1, "the writes did not share a connection: nothing was shown"
    assert levels == [EXTRA, NORMAL, NORMAL, EXTRA, EXTRA, NORMAL, EXTRA]


def test_a_worker_batch_commits_at_normal_and_the_events_it_applies_were_stored_at_full(tmp_path: Path) -> None:
    """A batch's events stay pending until it commits, so it can be applied again: its commit does
    not wait for the disk. The events themselves were stored at the service's level (FULL)."""
    settings = make_settings(f"sqlite:///{tmp_path / 'worker.db'}")
    assert settings.sqlite_synchronous == "FULL"
    engine = make_engine(settings)
    try:
        upgrade(engine)
        levels = commit_levels(engine)
        with engine.begin() as connection:
            insert_new_events(connection, [event_row("evt_stored_1"), event_row("evt_stored_2")])
        assert Worker(engine, settings).run_once() == 2
        with engine.begin() as connection:
            insert_new_events(connection, [event_row("evt_stored_3")])
    finally:
        engine.dispose()
    assert levels == [FULL, NORMAL, FULL]
