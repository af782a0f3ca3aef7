"""kamiyo incident-report: its counts for a known incident, and what falls outside the range."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest
from sqlalchemy import Engine, insert, select, update

from integration.conftest import Harness
from kamiyo import synthetic
from kamiyo.config import Settings
from kamiyo.db.models import audit_log_table, events_table, users_table
from kamiyo.diagnosis.incident_report import build_report, parse_time, to_json, to_markdown
from kamiyo.domain.outcomes import CustomerOutcome, LinkResult, Outcome, SubscriptionOutcome, UserChange
from kamiyo.errors import KamiyoError
from kamiyo.processing.worker import replay
from kamiyo.telemetry.delivery_stats import add_delivery_counts
from kamiyo.webhooks.envelope import read_envelope
from kamiyo.webhooks.inbox import inbox_row

START = datetime(2025, 6, 2, 10, 0, tzinfo=UTC)
END = START + timedelta(hours=1)


def _minute(offset_minutes: int) -> int:
    return int((START + timedelta(minutes=offset_minutes)).timestamp())


def _row(event_id: str, event_type: str, *, created: datetime, received: datetime, **values: Any) -> dict[str, Any]:
    obj = synthetic.customer(customer_id="cus_incident", email="i@example.com")
    body = orjson.dumps(synthetic.event(event_type, obj, event_id=event_id, created=int(created.timestamp())))
    envelope, _ = read_envelope(body)
    row = inbox_row(envelope, body, status="applied")
    # Every row has the same keys: an executemany insert takes its columns from the first row.
    row.update(received_at=received, processed_at=None, last_error=None, detail=None, outcome=None)
    row.update(values)
    return row


def _upgrade(user_id: int, email: str, tier_from: str, tier_to: str, status_to: str) -> Outcome:
    """What the worker records for a subscription event that moves one user from ``tier_from``."""
    return Outcome(
        subscription=SubscriptionOutcome("sub_1", status_to, tier_to, stored=True),
        customer=CustomerOutcome("cus_incident", LinkResult.ALREADY_LINKED, user_id=user_id),
        users=(UserChange(user_id, email, tier_from, tier_to, None, status_to, "subscription sub_1"),),
    )


def _incident(engine: Engine) -> None:
    """Twenty minutes of a wrong secret, then recovery: retries, a parked event, a replay, a backfill."""
    with engine.begin() as connection:
        connection.execute(
            insert(users_table),
            [
                {"email": "ann@example.com", "subscription_tier": "pro", "subscription_status": "active"},
                {"email": "bob@example.com", "subscription_tier": "free", "subscription_status": None},
            ],
        )
        ann_id = connection.execute(select(users_table.c.id).where(users_table.c.email == "ann@example.com")).scalar()
        assert ann_id is not None
        upgrade = _upgrade(ann_id, "ann@example.com", "free", "pro", "active")
        add_delivery_counts(
            connection,
            {
                (_minute(-30), "rejected", "invalid_signature", ""): 99,  # before the range
                (_minute(5), "accepted", "", "invoice.paid"): 4,
                (_minute(10), "rejected", "invalid_signature", ""): 30,
                (_minute(29), "rejected", "invalid_signature", ""): 12,
                (_minute(29), "rejected", "timestamp", ""): 1,
                (_minute(31), "accepted", "", "customer.subscription.updated"): 6,
                (_minute(31), "duplicate", "", "customer.subscription.updated"): 2,
                (_minute(75), "rejected", "malformed", ""): 7,  # after the range
            },
        )
        late = START + timedelta(minutes=31)
        connection.execute(
            insert(events_table),
            [
                # created during the outage, stored once Stripe's retry got through
                _row(
                    "evt_late1", "customer.subscription.updated", created=START + timedelta(minutes=10), received=late
                ),
                _row(
                    "evt_late2", "customer.subscription.updated", created=START + timedelta(minutes=12), received=late
                ),
                _row("evt_late3", "invoice.paid", created=START + timedelta(minutes=15), received=late),
                # on time
                _row(
                    "evt_ok",
                    "invoice.paid",
                    created=START + timedelta(minutes=5),
                    received=START + timedelta(minutes=5),
                ),
                # parked during the range
                _row(
                    "evt_parked",
                    "customer.subscription.updated",
                    created=late,
                    received=late,
                    status="failed",
                    last_error="UnmappedPrice: price price_new maps to no tier",
                    processed_at=late,
                ),
                # applied during the range, changing a user
                _row(
                    "evt_change",
                    "customer.subscription.updated",
                    created=late,
                    received=late,
                    processed_at=late,
                    detail=upgrade.describe(),
                    outcome=upgrade.to_json(),
                ),
                # backfilled by `kamiyo backfill`
                _row("evt_bf", "invoice.paid", created=late, received=late, source="backfill"),
            ],
        )
        connection.execute(update(users_table).where(users_table.c.email == "ann@example.com").values(updated_at=late))
        connection.execute(
            insert(audit_log_table),
            [
                {
                    "at": late,
                    "action": "override.set",
                    "actor": "oncall",
                    "reason": "paid, webhook lost",
                    "target": "bob@example.com",
                    "before": None,
                    "after": None,
                },
                {
                    "at": late,
                    "action": "replay",
                    "actor": "oncall",
                    "reason": None,
                    "target": "evt_parked",
                    "before": None,
                    "after": None,
                },
                {
                    "at": END + timedelta(hours=2),
                    "action": "override.clear",
                    "actor": "oncall",
                    "reason": None,
                    "target": "bob@example.com",
                    "before": None,
                    "after": None,
                },
            ],
        )
        connection.execute(
            update(users_table)
            .where(users_table.c.email == "bob@example.com")
            .values(updated_at=END + timedelta(days=1))
        )


def test_the_report_counts_a_known_incident_exactly(engine: Engine) -> None:
    _incident(engine)
    report = build_report(engine, START, END)
    d = report.deliveries
    assert (d.attempts, d.accepted, d.duplicate, d.failed) == (55, 10, 2, 43)
    assert d.failures_by_reason == {"invalid_signature": 42, "timestamp": 1}
    assert d.failures_by_type == {"unknown (rejected before the body was read)": 43}
    assert d.accepted_by_type == {"invoice.paid": 4, "customer.subscription.updated": 6}
    assert (d.first_failure, d.last_failure) == ("2025-06-02T10:10:00Z", "2025-06-02T10:30:00Z")
    assert report.late_by_type == {"customer.subscription.updated": 2, "invoice.paid": 1}
    assert (report.parked, report.parked_by_reason, report.still_parked) == (1, {"UnmappedPrice": 1}, 1)
    assert (report.backfilled, report.backfilled_by_source) == (1, {"backfill": 1})
    assert report.replayed == 0
    assert [(u.email, u.tier, u.transitions) for u in report.users_changed] == [
        ("ann@example.com", "pro", ["free/None -> pro/active"])
    ]
    [change] = report.users_changed[0].changes
    assert (change.event_id, change.subscription, change.why) == ("evt_change", "sub_1", "subscription sub_1")
    assert (report.applied_before_outcomes, report.before_outcomes) == (0, [])
    assert report.manual_overrides == [
        {
            "at": "2025-06-02T10:31:00Z",
            "action": "override.set",
            "by": "oncall",
            "user": "bob@example.com",
            "reason": "paid, webhook lost",
        }
    ]


def test_replaying_the_parked_event_shows_as_replayed_in_the_range_it_happened(engine: Engine) -> None:
    _incident(engine)
    assert replay(engine, failed=True) == 1
    now = datetime.now(UTC)
    report = build_report(engine, now - timedelta(minutes=5), now + timedelta(minutes=5))
    assert (report.replayed, report.replayed_by_type) == (1, {"customer.subscription.updated": 1})
    assert build_report(engine, START, END).replayed == 0


def test_markdown_and_json_carry_the_same_numbers(engine: Engine) -> None:
    _incident(engine)
    report = build_report(engine, START, END)
    markdown = to_markdown(report)
    assert "# Stripe webhook incident: 2025-06-02T10:00:00Z to 2025-06-02T11:00:00Z" in markdown
    assert "- Attempts: 55 (accepted 10, duplicate 2, failed 43); success 21.8%" in markdown
    assert "| invalid_signature | 42 |" in markdown
    assert "| ann@example.com | pro/active |" in markdown
    assert "free/None -> pro/active by evt_change (subscription sub_1)" in markdown
    data = json.loads(to_json(report))
    assert data["deliveries"]["failures_by_reason"] == {"invalid_signature": 42, "timestamp": 1}
    assert data["late_by_type"] == {"customer.subscription.updated": 2, "invoice.paid": 1}
    [ann] = data["users_changed"]
    assert ann["transitions"] == ["free/None -> pro/active"]
    assert ann["changes"] == [
        {
            "event_id": "evt_change",
            "type": "customer.subscription.updated",
            "at": "2025-06-02T10:31:00Z",
            "tier_from": "free",
            "status_from": None,
            "tier_to": "pro",
            "status_to": "active",
            "why": "subscription sub_1",
            "subscription": "sub_1",
        }
    ]
    assert (data["applied_before_outcomes"], data["before_outcomes"]) == (0, [])


def test_an_event_applied_before_outcomes_were_recorded_is_shown_by_its_text_and_counted_apart(
    engine: Engine,
) -> None:
    """Its detail reads like a user change, but nothing parses it: no user gains a transition from it."""
    _incident(engine)
    at = START + timedelta(minutes=40)
    old_text = "sub_0: active pro; user ann@example.com pro/active -> basic/active"
    odd_text = "customer cus_1 | linked\n\x1b[31m"
    with engine.begin() as connection:
        connection.execute(
            insert(events_table),
            [
                _row(
                    "evt_old1",
                    "customer.subscription.updated",
                    created=at,
                    received=at,
                    processed_at=at,
                    detail=old_text,
                ),
                _row(
                    "evt_old2",
                    "invoice.paid",
                    created=at,
                    received=at,
                    processed_at=at,
                    detail=odd_text,
                ),
            ],
        )
    report = build_report(engine, START, END)
    assert report.applied_before_outcomes == 2
    assert [(e.event_id, e.detail) for e in report.before_outcomes] == [
        ("evt_old1", old_text),
        ("evt_old2", odd_text),
    ]
    assert [(u.email, u.transitions) for u in report.users_changed] == [
        ("ann@example.com", ["free/None -> pro/active"])
    ]
    markdown = to_markdown(report)
    assert "2 events applied before outcomes were recorded" in markdown
    assert f"| evt_old1 | customer.subscription.updated | {old_text} |" in markdown
    assert "| evt_old2 | invoice.paid | customer cus_1 \\| linked\\n\\x1b[31m |" in markdown  # one cell, escaped
    data = json.loads(to_json(report))
    assert data["applied_before_outcomes"] == 2
    assert data["before_outcomes"][0] == {
        "event_id": "evt_old1",
        "type": "customer.subscription.updated",
        "at": "2025-06-02T10:40:00Z",
        "detail": old_text,
    }


def test_a_user_changed_in_the_range_and_again_after_it_is_listed_with_the_ranges_change(engine: Engine) -> None:
    _incident(engine)
    with engine.begin() as connection:
        connection.execute(
            update(users_table)
            .where(users_table.c.email == "ann@example.com")
            .values(updated_at=END + timedelta(hours=1))
        )
    report = build_report(engine, START, END)
    assert [(u.email, u.transitions, u.changed_at) for u in report.users_changed] == [
        ("ann@example.com", ["free/None -> pro/active"], "2025-06-02T12:00:00Z")
    ]


def test_the_users_changes_are_those_the_worker_recorded_as_it_applied_the_events(
    engine: Engine, settings: Settings
) -> None:
    customer = synthetic.customer(customer_id="cus_worker", email="wes@example.com")
    sub = synthetic.subscription(sub_id="sub_worker", customer_id="cus_worker", price_obj=synthetic.price())
    applied = synthetic.event("customer.subscription.created", sub)
    Harness(engine, settings).apply(synthetic.event("customer.created", customer), applied)
    now = datetime.now(UTC)
    report = build_report(engine, now - timedelta(minutes=5), now + timedelta(minutes=5))
    [wes] = report.users_changed
    last = wes.changes[-1]
    assert (wes.email, last.event_id, last.subscription) == ("wes@example.com", applied["id"], "sub_worker")
    assert (last.tier_from, last.tier_to, last.status_to) == ("free", "pro", "active")
    assert wes.transitions[-1] == f"free/{last.status_from} -> pro/active"
    assert report.applied_before_outcomes == 0


def test_the_cli_prints_the_report_for_a_relative_range(engine: Engine, settings: Settings, capsys: Any) -> None:
    from kamiyo.cli import doctor as operate

    with engine.begin() as connection:
        add_delivery_counts(
            connection, {(int(datetime.now(UTC).timestamp()) // 60 * 60, "rejected", "timestamp", ""): 3}
        )
    assert operate.incident_report(settings, since="2h", until="now", fmt="json") == 0
    data = json.loads(capsys.readouterr().out)
    assert data["deliveries"]["failures_by_reason"] == {"timestamp": 3}


def test_the_cli_refuses_a_missing_sqlite_database_instead_of_creating_one(settings: Settings, tmp_path: Any) -> None:
    from kamiyo.cli import doctor as operate

    missing = replace(settings, database_url=f"sqlite:///{tmp_path / 'nope.db'}")
    with pytest.raises(KamiyoError, match="does not exist"):
        operate.incident_report(missing, since="1h", until="now", fmt="md")
    assert not (tmp_path / "nope.db").exists()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2h", START - timedelta(hours=2)),
        ("30m", START - timedelta(minutes=30)),
        ("1d", START - timedelta(days=1)),
        ("now", START),
        ("2026-11-27T08:15", datetime(2026, 11, 27, 8, 15, tzinfo=UTC)),
        ("2026-11-27T10:15:00+02:00", datetime(2026, 11, 27, 8, 15, tzinfo=UTC)),
        (str(int(START.timestamp())), START),
    ],
)
def test_times_read_relative_iso_and_unix_forms(text: str, expected: datetime) -> None:
    assert parse_time(text, now=START) == expected


def test_an_unreadable_time_or_an_empty_range_is_refused(engine: Engine) -> None:
    with pytest.raises(KamiyoError, match="cannot read"):
        parse_time("yesterday-ish", now=START)
    with pytest.raises(KamiyoError, match="after --since"):
        build_report(engine, END, START)
