"""Replay by id, --failed, --type, --since; --dry-run shows what applying would do (SQLite and PostgreSQL)."""

from __future__ import annotations

import dataclasses
import logging
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import update

from integration.conftest import Harness
from kamiyo import synthetic
from kamiyo.db.models import events_table
from kamiyo.domain.tiers import parse_price_tiers
from kamiyo.errors import KamiyoError
from kamiyo.operations.replay import ReplayResult, UserStateChange, replay_events
from kamiyo.operations.users import StateView
from operations.conftest import Customer, audit_about
from support import PRICE_TIERS

GOLD = synthetic.price("price_legacy_gold")  # no tier until the configuration learns it


def _parked(ops: Harness, name: str) -> tuple[Customer, dict[str, object]]:
    """A linked customer whose subscription event is parked: its price maps to no tier."""
    customer = Customer(name)
    parked = customer.subscription("active", price=GOLD)
    ops.apply(customer.created(), parked)
    assert ops.event(str(parked["id"]))["status"] == "failed"
    return customer, parked


def _fixed(ops: Harness):  # type: ignore[no-untyped-def]
    """The settings after the operator maps the legacy price to a tier."""
    return dataclasses.replace(
        ops.settings, price_tiers=parse_price_tiers(PRICE_TIERS + ",price_legacy_gold=enterprise")
    )


def test_dry_run_shows_what_each_event_would_change_and_changes_nothing(ops: Harness) -> None:
    customer, parked = _parked(ops, "dry")
    before = dict(ops.event(str(parked["id"])))

    [result] = replay_events(ops.engine, failed=True, dry_run=True, actor="erin", reason=None, settings=_fixed(ops))

    assert result == ReplayResult(
        event_id=str(parked["id"]),
        type="customer.subscription.updated",
        status_before="failed",
        status_after="applied",
        detail=result.detail,
        error=None,
        changes=[UserStateChange(customer.email, StateView("free", None), StateView("enterprise", "active"))],
        dry_run=True,
        outcome=result.outcome,
    )
    assert "enterprise" in (result.detail or "")
    assert result.outcome is not None
    subscription = {"id": customer.sub_id, "status": "active", "tier": "enterprise", "stored": True}
    assert result.outcome["subscription"] == subscription
    assert [(u["email"], u["tier_to"]) for u in result.outcome["users"]] == [(customer.email, "enterprise")]
    assert dict(ops.event(str(parked["id"]))) == before
    assert ops.tier_status(customer.email) == ("free", None)
    assert ops.subscription(customer.sub_id) is None
    assert audit_about(ops.engine, str(parked["id"])) == []


def test_applying_does_exactly_what_the_dry_run_showed(ops: Harness) -> None:
    """Same code path: the results differ only in the dry-run flag, and the state now is what was shown."""
    customer, parked = _parked(ops, "same")
    settings = _fixed(ops)
    shown = replay_events(ops.engine, failed=True, dry_run=True, actor="erin", reason=None, settings=settings)
    done = replay_events(ops.engine, failed=True, actor="erin", reason="price mapped", settings=settings)

    assert [dataclasses.replace(r, dry_run=False) for r in shown] == done
    assert ops.tier_status(customer.email) == ("enterprise", "active")
    event = ops.event(str(parked["id"]))
    assert (event["status"], event["attempts"], event["last_error"]) == ("applied", 1, None)
    assert event["replayed_at"] is not None
    assert replay_events(ops.engine, failed=True, actor="erin", reason=None, settings=settings) == []


def test_a_replay_that_still_fails_records_the_error_and_stays_parked(ops: Harness) -> None:
    _customer, parked = _parked(ops, "still")
    [result] = replay_events(ops.engine, event_id=str(parked["id"]), actor="erin", reason=None, settings=ops.settings)
    assert (result.status_after, result.changes) == ("failed", [])
    assert "price_legacy_gold" in (result.error or "")
    assert ops.event(str(parked["id"]))["status"] == "failed"
    [entry] = audit_about(ops.engine, str(parked["id"]))
    assert (entry.after or {})["status"] == "failed"


def test_each_event_in_a_dry_run_sees_what_the_ones_before_it_would_do(ops: Harness) -> None:
    """Two parked events of one customer: the second's "before" is the first's "after", not the stored state."""
    customer, first = _parked(ops, "chain")
    # past_due still entitles, so its unmapped price parks it too (a canceled one would apply as free).
    second = customer.subscription("past_due", price=GOLD, at=int(str(first["created"])) + 50)
    ops.apply(second)
    assert ops.event(str(second["id"]))["status"] == "failed"
    results = replay_events(ops.engine, failed=True, dry_run=True, actor="erin", reason=None, settings=_fixed(ops))
    assert [(r.event_id, [(c.before, c.after) for c in r.changes]) for r in results] == [
        (first["id"], [(StateView("free", None), StateView("enterprise", "active"))]),
        (second["id"], [(StateView("enterprise", "active"), StateView("enterprise", "past_due"))]),
    ]
    assert ops.tier_status(customer.email) == ("free", None)


def test_select_by_type_and_since_combine_and_go_oldest_first(ops: Harness) -> None:
    old, new = Customer("old"), Customer("new")
    old_events = [old.created(), old.subscription("active")]
    new_events = [new.created(), new.subscription("active")]
    ops.apply(*old_events)
    cutoff = datetime.now(UTC) + timedelta(seconds=1)
    ops.apply(*new_events)
    with ops.engine.begin() as connection:  # received after the cutoff, as if an hour had passed
        connection.execute(
            update(events_table)
            .where(events_table.c.stripe_event_id.in_([e["id"] for e in new_events]))
            .values(received_at=cutoff + timedelta(hours=1))
        )

    def replayed(**selection: object) -> list[str]:
        results = replay_events(ops.engine, dry_run=True, actor="erin", reason=None, settings=ops.settings, **selection)  # type: ignore[arg-type]
        return [r.event_id for r in results]

    assert replayed(event_type="customer.subscription.updated") == [old_events[1]["id"], new_events[1]["id"]]
    assert replayed(since=cutoff) == [e["id"] for e in new_events]
    assert replayed(since=cutoff, event_type="customer.created") == [new_events[0]["id"]]
    assert replayed(event_type="customer.subscription.updated", limit=1) == [old_events[1]["id"]]


@pytest.mark.parametrize(
    ("selection", "message"),
    [
        ({}, "needs an event id, --failed, --type or --since"),
        ({"event_id": "evt_1", "failed": True}, "on its own"),
        ({"event_id": "evt_never_received"}, "no event evt_never_received"),
        ({"failed": True, "actor": " "}, "--by"),
    ],
)
def test_replay_refuses_a_selection_it_cannot_honour(ops: Harness, selection: dict[str, object], message: str) -> None:
    arguments: dict[str, object] = {"actor": "erin", "reason": None, "settings": ops.settings, **selection}
    with pytest.raises(KamiyoError, match=message):
        replay_events(ops.engine, **arguments)  # type: ignore[arg-type]


def test_a_dry_run_logs_nothing_as_applied(ops: Harness, caplog: pytest.LogCaptureFixture) -> None:
    _customer, parked = _parked(ops, "quiet")
    caplog.set_level(logging.INFO)
    caplog.clear()
    replay_events(ops.engine, failed=True, dry_run=True, actor="erin", reason=None, settings=_fixed(ops))
    assert not [r for r in caplog.records if r.name in ("kamiyo.state", "kamiyo.worker")]
    replay_events(ops.engine, failed=True, actor="erin", reason=None, settings=_fixed(ops))
    assert [r for r in caplog.records if r.name == "kamiyo.state" and "user state changed" in r.getMessage()]
    assert [r for r in caplog.records if "event replayed event=" + str(parked["id"]) in r.getMessage()]
