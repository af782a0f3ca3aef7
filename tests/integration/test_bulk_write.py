"""The engine's writes of many rows (processing/statements.py): ``BulkWrite`` (a Core statement
sent with the driver's executemany) must store exactly what ``Connection.execute`` would, and the
engine's inserts (arrays on PostgreSQL) count and return what they wrote, on both databases."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import Engine, select

from kamiyo.db.models import customers_table, events_table, subscriptions_table, users_table
from kamiyo.domain.outcomes import CustomerOutcome, LinkResult, Outcome, SubscriptionOutcome, UserChange
from kamiyo.domain.subscriptions import SubscriptionSnapshot, Version
from kamiyo.processing.engine import subscription_row
from kamiyo.processing.statements import BulkWrite, statements, update_by_id
from kamiyo.webhooks.envelope import read_envelope
from kamiyo.webhooks.inbox import inbox_row, insert_new_events
from support import event_row

_users = users_table
_customers = customers_table


def _users_rows(now: datetime) -> list[dict[str, object]]:
    return [
        {
            "email": f"user{i}@example.com",
            "subscription_tier": "pro" if i % 2 else "free",
            "subscription_status": "active" if i % 2 else None,
            "stripe_customer_id": f"cus_{i}",
            "updated_at": now,
        }
        for i in range(5)
    ]


def test_an_insert_stores_what_execute_stores(clean_engine: Engine) -> None:
    """The same rows, one table through ``Connection.execute``, the other through ``BulkWrite``:
    every column reads back the same (a datetime through SQLite's text, a None as NULL)."""
    now = datetime(2026, 12, 4, 23, 0, 0, 123456, tzinfo=UTC)
    plain = [{**row, "email": f"plain-{row['email']}"} for row in _users_rows(now)]
    with clean_engine.begin() as connection:
        connection.execute(_users.insert(), plain)
        assert BulkWrite(_users.insert()).execute(connection, _users_rows(now)) == 5
    columns = (_users.c.email, _users.c.subscription_tier, _users.c.subscription_status, _users.c.updated_at)
    with clean_engine.connect() as connection:
        rows = connection.execute(select(*columns).order_by(_users.c.email)).all()
    by_email = {row.email: tuple(row[1:]) for row in rows}
    assert len(by_email) == 10
    for row in _users_rows(now):
        assert by_email[str(row["email"])] == by_email[f"plain-{row['email']}"]
        stored = by_email[str(row["email"])]
        assert stored[:2] == (row["subscription_tier"], row["subscription_status"])
        assert stored[2].replace(tzinfo=stored[2].tzinfo or UTC) == now


def test_columns_left_out_take_their_default_and_a_conflict_changes_nothing(clean_engine: Engine) -> None:
    """The engine records customers by id alone: ``email_seen_at`` (a Python-side default) is
    filled in, and ON CONFLICT DO NOTHING counts only the rows it inserted."""
    record = statements(clean_engine.dialect.name, locked=True).record_customers
    with clean_engine.begin() as connection:
        assert record.execute(connection, [{"id": "cus_a", "deleted": False}, {"id": "cus_b", "deleted": False}]) == 2
        assert record.execute(connection, [{"id": "cus_a", "deleted": False}, {"id": "cus_c", "deleted": False}]) == 1
    with clean_engine.connect() as connection:
        rows = connection.execute(select(_customers.c.id, _customers.c.email_seen_at).order_by(_customers.c.id)).all()
    assert [tuple(row) for row in rows] == [("cus_a", 0), ("cus_b", 0), ("cus_c", 0)]


def test_a_row_without_a_column_that_has_no_default_is_refused(clean_engine: Engine) -> None:
    """Nothing is sent: the statement cannot be run with a value missing."""
    with clean_engine.begin() as connection, pytest.raises(ValueError, match="'b_tier'"):
        update_by_id(_users, subscription_tier="tier").execute(connection, [{"b_id": 1}])


def test_an_update_writes_json_and_times_per_row(clean_engine: Engine) -> None:
    """The worker's record of outcomes: each row its own JSON (the dataclass through the engine's
    serializer, read back by ``Outcome.from_json``) and its own time; no rows, no statement."""
    bodies = [
        f'{{"id": "evt_bulk_{i}", "type": "invoice.paid", "created": 1700000000, "livemode": false,'
        f' "data": {{"object": {{"id": "in_{i}", "customer": "cus_{i}"}}}}}}'.encode()
        for i in range(3)
    ]
    with clean_engine.begin() as connection:
        insert_new_events(connection, [inbox_row(read_envelope(body)[0], body, status="pending") for body in bodies])
        ids = [row.id for row in connection.execute(select(events_table.c.id).order_by(events_table.c.id))]
    outcomes = [
        Outcome(
            subscription=SubscriptionOutcome(f"sub_{i}", "active", "pro", True),
            customer=CustomerOutcome(f"cus_{i}", LinkResult.LINKED, i + 1, "email"),
            users=(UserChange(i + 1, f"u{i}@example.com", "free", "pro", None, "active", 'é ✓ "quoted"'),),
        )
        for i in range(3)
    ]
    start = datetime(2026, 12, 4, 23, 0, tzinfo=UTC)
    record = update_by_id(events_table, status="status", outcome="outcome", processed_at="at")
    with clean_engine.begin() as connection:
        assert record.execute(connection, []) == 0
        rows = [
            {"b_id": event_id, "b_status": "applied", "b_outcome": outcome, "b_at": start + timedelta(seconds=i)}
            for i, (event_id, outcome) in enumerate(zip(ids, outcomes, strict=True))
        ]
        assert record.execute(connection, rows) == 3
    columns = (events_table.c.status, events_table.c.outcome, events_table.c.processed_at)
    with clean_engine.connect() as connection:
        stored = connection.execute(select(*columns).order_by(events_table.c.id)).all()
    for i, row in enumerate(stored):
        assert row.status == "applied"
        assert Outcome.from_json(row.outcome) == outcomes[i]
        assert row.processed_at.replace(tzinfo=row.processed_at.tzinfo or UTC) == start + timedelta(seconds=i)


def test_an_update_sets_none_and_leaves_rows_it_does_not_name(clean_engine: Engine) -> None:
    """A failed attempt's record: None in a JSON, a time and a text column reads back None; an id
    no row has changes nothing and is not counted; rows not named keep their values."""
    with clean_engine.begin() as connection:
        insert_new_events(connection, [event_row(f"evt_none_{i}") for i in range(3)])
        ids = [row.id for row in connection.execute(select(events_table.c.id).order_by(events_table.c.id))]
    record = update_by_id(
        events_table, status="status", outcome="outcome", processed_at="at", last_error="error", attempts="attempts"
    )
    failed = {"b_status": "pending", "b_outcome": None, "b_at": None, "b_error": None, "b_attempts": 2}
    with clean_engine.begin() as connection:
        assert record.execute(connection, [{"b_id": ids[0], **failed}, {"b_id": max(ids) + 10, **failed}]) == 1
    columns = (events_table.c.attempts, events_table.c.outcome, events_table.c.processed_at, events_table.c.last_error)
    with clean_engine.connect() as connection:
        stored = [tuple(row) for row in connection.execute(select(*columns).order_by(events_table.c.id))]
    assert stored == [(2, None, None, None), (0, None, None, None), (0, None, None, None)]


def _subscription(sub_id: str, status: str, created: int, now: datetime) -> dict[str, object]:
    """The engine's row of a snapshot of ``sub_id`` with this status, at version ``created``."""
    snapshot = SubscriptionSnapshot(
        sub_id,
        "cus_up",
        status,
        "pro",
        ("price_pro",),
        False,
        1_700_000_000,
        None,
        False,
        None,
        None,
        None,
        None,
        Version(0, created, 1, f"evt_{created}"),
    )
    return subscription_row(snapshot, now)


def test_the_subscription_upsert_replaces_only_an_older_snapshot_and_counts_what_it_wrote(clean_engine: Engine) -> None:
    """Many rows in one call, on both databases: a new one is inserted, an older stored one
    replaced, a newer stored one kept (the version guard in the statement itself)."""
    sql = statements(clean_engine.dialect.name, locked=True)
    now = datetime(2026, 12, 5, 7, 0, tzinfo=UTC)
    with clean_engine.begin() as connection:
        sql.record_customers.execute(connection, [{"id": "cus_up", "deleted": False}])
        stored = [_subscription("sub_old", "active", 100, now), _subscription("sub_new", "active", 300, now)]
        assert sql.upsert_subscriptions.execute(connection, stored) == 2
        incoming = [
            _subscription("sub_old", "past_due", 200, now),  # newer than stored: replaces it
            _subscription("sub_new", "canceled", 200, now),  # older than stored: kept out
            _subscription("sub_added", "trialing", 200, now),
        ]
        assert sql.upsert_subscriptions.execute(connection, incoming) == 2
    subs = subscriptions_table
    with clean_engine.connect() as connection:
        rows = connection.execute(select(subs.c.id, subs.c.status, subs.c.version_created).order_by(subs.c.id)).all()
    assert [tuple(row) for row in rows] == [
        ("sub_added", "trialing", 200),
        ("sub_new", "active", 300),
        ("sub_old", "past_due", 200),
    ]


def test_new_users_come_back_with_their_ids_and_a_taken_email_does_not(clean_engine: Engine) -> None:
    sql = statements(clean_engine.dialect.name, locked=True)
    rows = _users_rows(datetime(2026, 12, 5, 7, 0, tzinfo=UTC))
    with clean_engine.begin() as connection:
        first = [tuple(row) for row in sql.insert_users.execute(connection, rows[:3])]
        again = [tuple(row) for row in sql.insert_users.execute(connection, rows[2:])]  # rows[2] is there
    assert sorted(email for _id, email in first) == [row["email"] for row in rows[:3]]
    assert sorted(email for _id, email in again) == [row["email"] for row in rows[3:]]
    with clean_engine.begin() as connection:
        assert list(sql.insert_users.execute(connection, [])) == []  # nothing to insert: nothing sent
    with clean_engine.connect() as connection:
        stored = {tuple(row) for row in connection.execute(select(_users.c.id, _users.c.email))}
    assert stored == {*first, *again}
