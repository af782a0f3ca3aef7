"""Per-minute delivery counts, the inbox writer that keeps them, the state read back, heartbeats."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from sqlalchemy import Engine, event, insert, select

from kamiyo import synthetic
from kamiyo.db.models import delivery_stats_table, events_table, user_overrides_table, users_table
from kamiyo.telemetry.delivery_stats import (
    add_delivery_counts,
    delivery_rows,
    delivery_totals,
    minute_of,
    read_state,
)
from kamiyo.telemetry.heartbeat import Heartbeat
from kamiyo.webhooks.envelope import read_envelope
from kamiyo.webhooks.inbox import InboxWriter, inbox_row


def _row(event_id: str, event_type: str = "customer.updated", **overrides: Any) -> dict[str, Any]:
    obj = synthetic.customer(customer_id="cus_stats", email="s@example.com", created=100)
    body = orjson.dumps(synthetic.event(event_type, obj, created=100, event_id=event_id))
    envelope, _ = read_envelope(body)
    row = inbox_row(envelope, body, status="pending")
    row.update(overrides)
    return row


def _stats(engine: Engine) -> dict[tuple[str, str, str], int]:
    with engine.connect() as connection:
        rows = connection.execute(
            select(
                delivery_stats_table.c.outcome,
                delivery_stats_table.c.reason,
                delivery_stats_table.c.event_type,
                delivery_stats_table.c.count,
            )
        ).all()
    totals: dict[tuple[str, str, str], int] = {}
    for outcome, reason, event_type, count in rows:
        totals[(outcome, reason, event_type)] = totals.get((outcome, reason, event_type), 0) + count
    return totals


def test_adding_counts_for_an_existing_key_sums_them(engine: Engine) -> None:
    """ON CONFLICT adds to the stored count instead of replacing it (two processes, one minute)."""
    key = (minute_of(1_800_000_000), "rejected", "timestamp", "")
    with engine.begin() as connection:
        add_delivery_counts(connection, {key: 3})
    with engine.begin() as connection:
        add_delivery_counts(connection, {key: 4, (key[0], "accepted", "", "invoice.paid"): 2})
    rows = delivery_rows(engine, 1_800_000_000 - 60, 1_800_000_000 + 60)
    assert [(r.outcome, r.reason, r.event_type, r.count) for r in rows] == [
        ("accepted", "", "invoice.paid", 2),
        ("rejected", "timestamp", "", 7),
    ]


def test_delivery_totals_cover_only_the_minutes_in_the_range(engine: Engine) -> None:
    """Counts of minutes before the range or after it are left out; the ratio is of what remains."""
    base = minute_of(1_800_000_000)
    with engine.begin() as connection:
        add_delivery_counts(
            connection,
            {
                (base - 3600, "rejected", "invalid_signature", ""): 50,  # an hour earlier
                (base, "accepted", "", "invoice.paid"): 18,
                (base + 60, "rejected", "invalid_signature", ""): 2,
                (base + 7200, "rejected", "timestamp", ""): 9,  # later
            },
        )
    totals = delivery_totals(engine, base, base + 120)
    assert (totals.accepted, totals.duplicate, totals.rejected) == (18, 0, 2)
    assert totals.by_reason == {"invalid_signature": 2}
    assert totals.success_ratio == 0.9


def test_writer_counts_accepted_and_duplicate_deliveries_in_the_batch_that_stores_them(engine: Engine) -> None:
    """A batch with a new event, its duplicate and a second type adds one count per kind."""
    writer = InboxWriter(engine)

    async def scenario() -> list[bool]:
        writer.start()
        try:
            return list(
                await asyncio.gather(
                    writer.store(_row("evt_1")),
                    writer.store(_row("evt_1")),
                    writer.store(_row("evt_2", "invoice.paid")),
                )
            )
        finally:
            writer.stop()

    assert asyncio.run(scenario()) == [True, False, True]
    assert _stats(engine) == {
        ("accepted", "", "customer.updated"): 1,
        ("duplicate", "", "customer.updated"): 1,
        ("accepted", "", "invoice.paid"): 1,
    }


def test_a_flood_of_rejections_costs_one_upsert_per_batch_not_a_write_per_request(engine: Engine) -> None:
    """1,000 rejections queued before the writer runs are written by a single statement."""
    statements: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if "webhook_delivery_stats" in statement:
            statements.append(statement)

    event.listen(engine, "before_cursor_execute", record)
    try:
        writer = InboxWriter(engine, max_batch=5000)
        for _ in range(700):
            writer.count_rejection("invalid_signature")
        for _ in range(300):
            writer.count_rejection("timestamp")
        writer.start()
        writer.stop()  # finishes what is queued, then stops
    finally:
        event.remove(engine, "before_cursor_execute", record)
    assert len(statements) == 1
    assert _stats(engine) == {("rejected", "invalid_signature", ""): 700, ("rejected", "timestamp", ""): 300}


def test_rejections_counted_while_the_database_fails_are_kept_for_the_next_batch(engine: Engine) -> None:
    """A failed commit loses no rejection: they ride along with the next batch that commits.

    The writer tries twice before it stops (its batch, then a last flush at stop): both fail here."""
    failures = {"left": 2}

    def fail_once(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if "webhook_delivery_stats" in statement and failures["left"]:
            failures["left"] -= 1
            raise RuntimeError("database went away")

    event.listen(engine, "before_cursor_execute", fail_once)
    try:
        writer = InboxWriter(engine)
        for _ in range(5):
            writer.count_rejection("missing_signature")
        writer.start()
        writer.stop()
        assert _stats(engine) == {}
        writer.count_rejection("missing_signature")
        writer.start()
        writer.stop()
    finally:
        event.remove(engine, "before_cursor_execute", fail_once)
    assert _stats(engine) == {("rejected", "missing_signature", ""): 6}


def test_writer_with_counting_off_writes_no_stats(engine: Engine) -> None:
    writer = InboxWriter(engine, count_deliveries=False)

    async def scenario() -> bool:
        writer.start()
        try:
            writer.count_rejection("timestamp")
            return await writer.store(_row("evt_quiet"))
        finally:
            writer.stop()

    assert asyncio.run(scenario()) is True
    assert _stats(engine) == {}


def test_state_reads_backlog_parked_ages_and_live_workers(engine: Engine) -> None:
    """The gauges' source: counts by status, the oldest pending, the newest webhook, fresh heartbeats."""
    now = time.time()
    ten_min_ago = datetime.fromtimestamp(now - 600, UTC)
    rows = [
        _row("evt_p1", received_at=ten_min_ago),
        _row("evt_p2", received_at=datetime.fromtimestamp(now - 30, UTC)),
        _row("evt_f", status="failed"),
        _row("evt_a", status="applied", received_at=datetime.fromtimestamp(now - 5, UTC)),
        _row("evt_backfill", status="applied", source="backfill", received_at=datetime.fromtimestamp(now, UTC)),
    ]
    with engine.begin() as connection:
        connection.execute(insert(events_table), rows)
    assert read_state(engine, now=now).workers_alive == 0
    fresh, stale = Heartbeat(engine), Heartbeat(engine)
    fresh.beat(now=now - 2)
    stale.beat(now=now - 300)

    state = read_state(engine, now=now)
    assert (state.backlog, state.parked, state.workers_alive) == (2, 1, 1)
    assert abs(state.oldest_pending_age - 600) < 1
    # The backfilled row is newer but did not come through the endpoint.
    assert state.last_accepted_age is not None
    assert abs(state.last_accepted_age - 5) < 1


def test_state_counts_only_active_manual_overrides(engine: Engine) -> None:
    """An override without expiry or expiring later counts; an expired one does not."""
    now = time.time()
    with engine.begin() as connection:
        connection.execute(
            insert(users_table), [{"email": f"o{n}@example.com", "subscription_tier": "free"} for n in range(3)]
        )
        ids = connection.execute(select(users_table.c.id).order_by(users_table.c.id)).scalars().all()
        at = datetime.fromtimestamp(now, UTC)
        connection.execute(
            insert(user_overrides_table),
            [
                {"user_id": ids[0], "tier": "pro", "reason": "r", "set_by": "x", "set_at": at, "expires_at": None},
                {
                    "user_id": ids[1],
                    "tier": "pro",
                    "reason": "r",
                    "set_by": "x",
                    "set_at": at,
                    "expires_at": at + timedelta(hours=1),
                },
                {
                    "user_id": ids[2],
                    "tier": "pro",
                    "reason": "r",
                    "set_by": "x",
                    "set_at": at,
                    "expires_at": at - timedelta(hours=1),
                },
            ],
        )
    assert read_state(engine, now=now).active_overrides == 2


def test_a_stopped_worker_removes_its_heartbeat(engine: Engine) -> None:
    beat = Heartbeat(engine)
    beat.beat()
    assert read_state(engine).workers_alive == 1
    beat.stop()
    assert read_state(engine).workers_alive == 0


def test_state_of_an_empty_inbox_has_no_last_accepted_age(engine: Engine) -> None:
    state = read_state(engine)
    assert (state.backlog, state.parked, state.oldest_pending_age, state.last_accepted_age) == (0, 0, 0.0, None)


def test_minute_of_truncates_to_the_minute() -> None:
    moment = datetime(2026, 11, 27, 10, 31, 59, tzinfo=UTC)
    assert minute_of(moment.timestamp()) == (moment - timedelta(seconds=59)).timestamp()


def test_counts_gather_in_memory_and_go_out_with_a_later_batch_once_due(engine: Engine) -> None:
    """Within ``stats_seconds`` of the last write, batches carry no stats statement; the counts
    come out, complete, with the first batch after that (or on their own when none comes)."""
    statements: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if statement.startswith("INSERT INTO webhook_delivery_stats"):
            statements.append(statement)

    writer = InboxWriter(engine, stats_seconds=1.5)
    event.listen(engine, "before_cursor_execute", record)

    async def scenario() -> None:
        writer.start()
        try:
            assert await writer.store(_row("evt_a"))  # the first batch writes (nothing was written yet)
            written = len(statements)
            for n in range(5):
                assert await writer.store(_row(f"evt_b{n}"))
            writer.count_rejection("timestamp")
            assert len(statements) == written  # five batches, no stats statement
            assert _stats(engine) == {("accepted", "", "customer.updated"): 1}
            await asyncio.sleep(2.5)  # no delivery: the writer writes the due counts by itself
            assert len(statements) == written + 1
            assert _stats(engine) == {("accepted", "", "customer.updated"): 6, ("rejected", "timestamp", ""): 1}
        finally:
            writer.stop()

    try:
        asyncio.run(scenario())
    finally:
        event.remove(engine, "before_cursor_execute", record)


def test_counts_still_pending_are_written_when_the_writer_stops(engine: Engine) -> None:
    writer = InboxWriter(engine, stats_seconds=3600)

    async def scenario() -> None:
        writer.start()
        try:
            await writer.store(_row("evt_1"))  # due at once: written with this batch
            await writer.store(_row("evt_2"))  # not due for an hour
            assert _stats(engine) == {("accepted", "", "customer.updated"): 1}
        finally:
            writer.stop()

    asyncio.run(scenario())
    assert _stats(engine) == {("accepted", "", "customer.updated"): 2}
