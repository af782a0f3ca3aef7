"""The inbox stores each Stripe event once, and the group-commit writer answers every request truthfully."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, event, func, select, text
from sqlalchemy.exc import DBAPIError, IntegrityError

from kamiyo.db.engine import make_engine
from kamiyo.db.errors import fault_kind
from kamiyo.db.migrate import upgrade
from kamiyo.db.models import events_table
from kamiyo.webhooks.inbox import InboxUnavailable, InboxWriter, insert_new_events, write_probe
from kamiyo.webhooks.writer_health import FULL_STATE, LOCKED_STATE
from support import event_row, make_settings, sqlite_write_locked, stored_emails


def test_insert_new_events_reports_only_new_ids_and_keeps_the_first_copy(engine: Engine) -> None:
    """A second insert of a known id is not new and does not overwrite the first stored body."""
    with engine.begin() as connection:
        assert insert_new_events(connection, [event_row("evt_a"), event_row("evt_b")]) == {"evt_a", "evt_b"}
    with engine.begin() as connection:
        assert insert_new_events(connection, [event_row("evt_a", email="other@example.com"), event_row("evt_c")]) == {
            "evt_c"
        }
    with engine.begin() as connection:
        assert insert_new_events(connection, [event_row("evt_b")]) == set()
    assert stored_emails(engine) == {"evt_a": "ann@example.com", "evt_b": "ann@example.com", "evt_c": "ann@example.com"}


def test_a_row_sent_to_the_driver_reads_back_as_one_inserted_through_sqlalchemy(engine: Engine) -> None:
    """The raw multi-row insert converts each value as the column's type would (times, booleans, None)."""
    fast = {**event_row("evt_fast"), "api_version": None, "livemode": True, "available_at": 12.5, "attempts": 3}
    orm = {**fast, "stripe_event_id": "evt_orm"}
    with engine.begin() as connection:
        assert insert_new_events(connection, [fast]) == {"evt_fast"}
        connection.execute(events_table.insert().values(orm))
    columns = [c for c in events_table.c if c.name not in ("id", "stripe_event_id")]
    with engine.connect() as connection:
        read = {
            row.stripe_event_id: tuple(row[1:])
            for row in connection.execute(select(events_table.c.stripe_event_id, *columns))
        }
    assert read["evt_fast"] == read["evt_orm"]
    stored = dict(zip([c.name for c in columns], read["evt_fast"], strict=True))
    assert stored["received_at"].replace(tzinfo=None) == fast["received_at"].replace(tzinfo=None)
    assert (stored["livemode"], stored["api_version"], stored["available_at"]) == (True, None, 12.5)


def test_many_rows_go_in_chunks_and_each_new_id_is_reported_once(engine: Engine) -> None:
    rows = [event_row(f"evt_many_{n}") for n in range(600)]
    with engine.begin() as connection:
        assert insert_new_events(connection, rows[:10]) == {f"evt_many_{n}" for n in range(10)}
        assert insert_new_events(connection, rows + rows[:5]) == {f"evt_many_{n}" for n in range(10, 600)}
    assert len(stored_emails(engine)) == 600


def test_inbox_rejects_a_second_row_with_the_same_event_id_at_the_database(engine: Engine) -> None:
    """The unique constraint itself, not only the writer, guarantees one row per event id."""
    with engine.begin() as connection:
        connection.execute(events_table.insert().values(event_row("evt_once")))
    with pytest.raises(DBAPIError), engine.begin() as connection:
        connection.execute(events_table.insert().values(event_row("evt_once")))
    assert list(stored_emails(engine)) == ["evt_once"]


def _run_writer(engine: Engine, scenario: Any, **kwargs: Any) -> Any:
    """Run ``scenario(writer)`` on a fresh event loop with a started writer; stop the writer after."""
    writer = InboxWriter(engine, **kwargs)

    async def main() -> Any:
        try:
            return await scenario(writer)
        finally:
            await asyncio.get_running_loop().run_in_executor(None, writer.stop)

    return asyncio.run(main())


def test_writer_commits_every_concurrent_store_and_answers_new(engine: Engine) -> None:
    """200 concurrent requests, group-committed in batches of at most 16, are all stored and all new."""
    commits: list[int] = []
    ids = [f"evt_concurrent_{i:03d}" for i in range(200)]

    async def scenario(writer: InboxWriter) -> list[bool]:
        writer.start()
        return list(await asyncio.gather(*(writer.store(event_row(i)) for i in ids)))

    outcomes = _run_writer(engine, scenario, max_batch=16, on_commit=lambda: commits.append(1))
    assert outcomes == [True] * len(ids)
    assert sorted(stored_emails(engine)) == ids
    assert len(commits) >= len(ids) // 16  # the on_commit wake-up fires once per batch with a new row


def test_writer_answers_duplicate_when_two_deliveries_of_one_id_share_a_batch(engine: Engine) -> None:
    """Two deliveries of one id queued before the writer runs: exactly one is new, one row is stored."""

    async def scenario(writer: InboxWriter) -> list[bool]:
        tasks = [asyncio.ensure_future(writer.store(event_row(i))) for i in ("evt_twice", "evt_other", "evt_twice")]
        await asyncio.sleep(0)  # every request is queued; the writer then takes them as one batch
        writer.start()
        return list(await asyncio.gather(*tasks))

    assert _run_writer(engine, scenario) == [True, True, False]
    assert sorted(stored_emails(engine)) == ["evt_other", "evt_twice"]


def test_writer_answers_duplicate_for_an_id_committed_by_an_earlier_batch(engine: Engine) -> None:
    """A redelivery after the first copy was committed is answered 'not new' and not stored again."""

    async def scenario(writer: InboxWriter) -> tuple[bool, bool, bool]:
        writer.start()
        first = await writer.store(event_row("evt_redelivered"))
        second = await writer.store(event_row("evt_redelivered", email="changed@example.com"))
        third = await writer.store(event_row("evt_fresh"))
        return first, second, third

    assert _run_writer(engine, scenario) == (True, False, True)
    assert stored_emails(engine) == {"evt_redelivered": "ann@example.com", "evt_fresh": "ann@example.com"}


def test_writer_raises_on_storage_failure_for_every_waiting_request_and_recovers(engine: Engine) -> None:
    """When the insert fails, every request of that batch gets the exception (no false 'stored');
    once storage is back, the same writer thread stores again."""
    with engine.begin() as connection:
        connection.execute(text("ALTER TABLE webhook_events RENAME TO webhook_events_away"))

    async def scenario(writer: InboxWriter) -> tuple[list[Any], bool]:
        tasks = [asyncio.ensure_future(writer.store(event_row(i))) for i in ("evt_lost_1", "evt_lost_2")]
        await asyncio.sleep(0)
        writer.start()
        failures = list(await asyncio.gather(*tasks, return_exceptions=True))
        with engine.begin() as connection:
            connection.execute(text("ALTER TABLE webhook_events_away RENAME TO webhook_events"))
        return failures, await writer.store(event_row("evt_after_recovery"))

    failures, recovered = _run_writer(engine, scenario)
    assert len(failures) == 2
    assert all(isinstance(f, DBAPIError) for f in failures), failures
    assert recovered is True
    assert list(stored_emails(engine)) == ["evt_after_recovery"]


def test_writer_stop_commits_requests_already_queued(engine: Engine) -> None:
    """Stopping the writer finishes what is queued: those requests are answered and stored."""

    async def scenario(writer: InboxWriter) -> list[bool]:
        writer.start()
        tasks = [asyncio.ensure_future(writer.store(event_row(f"evt_queued_{i}"))) for i in range(5)]
        await asyncio.sleep(0)
        await asyncio.get_running_loop().run_in_executor(None, writer.stop)
        return list(await asyncio.gather(*tasks))

    assert _run_writer(engine, scenario) == [True] * 5
    with engine.connect() as connection:
        assert connection.execute(select(func.count()).select_from(events_table)).scalar_one() == 5


# -- faults: a locked or full database ----------------------------------------------------------


def _sqlite_engine(tmp_path: Path) -> Engine:
    """A migrated SQLite database: the locks and limits below are SQLite's own."""
    engine = make_engine(make_settings(f"sqlite:///{tmp_path / 'kamiyo.db'}"))
    upgrade(engine)
    return engine


def _eventually(probe: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not probe():
        assert time.monotonic() < deadline, f"timed out waiting for {probe}"
        time.sleep(0.02)


@pytest.mark.timeout(60)
def test_with_the_database_locked_a_batch_fails_whole_at_once_and_no_row_is_retried_alone(tmp_path: Path) -> None:
    """Four deliveries in one batch, the database locked by another process: every one fails
    after one wait for the lock (half a second here), not one wait per row after it."""
    engine = _sqlite_engine(tmp_path)
    ids = [f"evt_locked_{n}" for n in range(4)]

    async def scenario(writer: InboxWriter) -> tuple[list[Any], float, bool]:
        with sqlite_write_locked(engine.url.database or ""):
            tasks = [asyncio.ensure_future(writer.store(event_row(i))) for i in ids]
            await asyncio.sleep(0)  # all four queued: the writer takes them as one batch
            started = time.monotonic()
            writer.start()
            failures = list(await asyncio.gather(*tasks, return_exceptions=True))
            took = time.monotonic() - started
        return failures, took, await writer.store(event_row("evt_after_unlock"))

    try:
        # The wait for the lock as an execution option: the same on the writer's own engine.
        failures, took, stored = _run_writer(engine.execution_options(kamiyo_write_wait=0.5), scenario)
        assert all(isinstance(f, DBAPIError) and fault_kind(f) == "locked" for f in failures), failures
        assert took < 3.0
        assert stored is True
        assert list(stored_emails(engine)) == ["evt_after_unlock"]
    finally:
        engine.dispose()


def test_a_row_the_database_refuses_is_failed_alone_and_the_rest_of_its_batch_is_stored(engine: Engine) -> None:
    """An error of one row's data (a NOT NULL refused) is not a database fault: the batch is
    stored again one row at a time, and only that row fails."""
    bad = event_row("evt_bad") | {"type": None}

    async def scenario(writer: InboxWriter) -> list[Any]:
        tasks = [
            asyncio.ensure_future(writer.store(row)) for row in (event_row("evt_ok_1"), bad, event_row("evt_ok_2"))
        ]
        await asyncio.sleep(0)
        writer.start()
        return list(await asyncio.gather(*tasks, return_exceptions=True))

    first, refused, second = _run_writer(engine, scenario)
    assert (first, second) == (True, True)
    assert isinstance(refused, IntegrityError)
    assert sorted(stored_emails(engine)) == ["evt_ok_1", "evt_ok_2"]


@pytest.mark.timeout(60)
def test_the_writer_reports_a_locked_database_and_backs_off_then_reports_it_writes_again(tmp_path: Path) -> None:
    engine = _sqlite_engine(tmp_path)
    writer = InboxWriter(engine, write_wait=0.3, probe_seconds=0.1)
    writer.start()
    try:
        assert writer.health().ok
        with sqlite_write_locked(engine.url.database or ""):
            _eventually(lambda: writer.activity().failure == "locked")
            assert writer.health().state == LOCKED_STATE
            assert "locked" in writer.activity().failure_detail
        _eventually(lambda: writer.health().ok)
    finally:
        writer.stop()
        engine.dispose()


@pytest.mark.timeout(60)
def test_an_idle_writer_notices_a_full_database_by_its_probe_and_that_it_has_room_again(tmp_path: Path) -> None:
    """No delivery needed: the writer's own probe write finds that the database cannot grow
    (SQLite's max_page_count, as a full disk refuses a page), and later that it can. The probe
    leaves no row behind."""
    engine = _sqlite_engine(tmp_path)
    with engine.connect() as connection:
        connection.connection.driver_connection.execute("VACUUM")  # no free page left to reuse
    limit: list[int] = []

    @event.listens_for(engine, "checkout")
    def _limit_pages(dbapi_connection: Any, _record: Any, _proxy: Any) -> None:
        dbapi_connection.execute(f"PRAGMA max_page_count={limit[0] if limit else 1073741823}")

    writer = InboxWriter(engine, probe_seconds=0.1)
    writer.start()
    try:
        _eventually(lambda: writer.activity().busy_for == 0 and writer.health().ok)
        with engine.connect() as connection:
            limit.append(connection.execute(text("PRAGMA page_count")).scalar_one())
        _eventually(lambda: writer.health().state == FULL_STATE)
        assert writer.activity().failure == "full"
        limit.clear()
        _eventually(lambda: writer.health().ok)
    finally:
        writer.stop()
    with engine.connect() as connection:
        assert connection.execute(select(func.count()).select_from(events_table)).scalar_one() == 0
    engine.dispose()


def test_the_probe_writes_through_the_inbox_and_leaves_nothing(engine: Engine) -> None:
    with engine.begin() as connection:
        write_probe(connection)
    with engine.connect() as connection:
        assert connection.execute(select(func.count()).select_from(events_table)).scalar_one() == 0


@pytest.mark.timeout(30)
def test_a_writer_in_the_servers_process_answers_within_its_bound_and_refuses_beyond_its_queue(
    tmp_path: Path,
) -> None:
    """The same bounds as kamiyo serve's writer process, for a writer thread beside the event loop:
    with the database locked, at most ``max_waiting`` deliveries wait (the next is refused at
    once) and each waiting one is answered within ``store_timeout``."""
    engine = _sqlite_engine(tmp_path)

    async def scenario(writer: InboxWriter) -> tuple[list[Any], float]:
        with sqlite_write_locked(engine.url.database or ""):
            writer.start()
            started = time.monotonic()
            taken = asyncio.ensure_future(writer.store(event_row("evt_bound_taken")))
            await asyncio.sleep(0.1)  # the writer has taken it and waits for the lock
            queued = [asyncio.ensure_future(writer.store(event_row(f"evt_bound_{n}"))) for n in range(2)]
            await asyncio.sleep(0)
            with pytest.raises(InboxUnavailable, match="already wait"):
                await writer.store(event_row("evt_bound_refused"))
            answers = list(await asyncio.gather(taken, *queued, return_exceptions=True))
            return answers, time.monotonic() - started

    try:
        answers, took = _run_writer(engine, scenario, write_wait=5.0, store_timeout=0.5, max_waiting=2)
        assert [type(a) for a in answers] == [InboxUnavailable] * 3, answers
        assert took < 2.0
    finally:
        engine.dispose()
