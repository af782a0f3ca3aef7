"""``backfill_events``: undelivered events from the Events API into the inbox, on both databases."""

from __future__ import annotations

import threading
import time
from dataclasses import replace
from typing import Any

import pytest
from sqlalchemy import select

from kamiyo import synthetic
from kamiyo.db.models import events_table
from kamiyo.errors import KamiyoError
from kamiyo.processing.worker import Worker
from kamiyo.reconcile import runs
from kamiyo.reconcile.backfill import OVERLAP_SECONDS, backfill_events
from kamiyo.reconcile.gateway import StripeApiGateway
from kamiyo.reconcile.schedule import BackfillSchedule
from reconcile.harness import Db, paying_customer, webhook_for
from stripe_api import FakeStripe

DAY = 86400


def inbox(db: Db) -> list[tuple[str, str]]:
    """(event id, source) in the order the worker applies them."""
    with db.engine.connect() as connection:
        rows = connection.execute(
            select(events_table.c.stripe_event_id, events_table.c.source).order_by(events_table.c.id)
        ).all()
    return [(row[0], row[1]) for row in rows]


def stripe_event(account: FakeStripe, event: dict[str, Any], *, delivered: bool) -> dict[str, Any]:
    account.add_event(event, delivered=delivered)
    return event


def outage(db: Db, account: FakeStripe, now: int) -> list[dict[str, Any]]:
    """One event delivered an hour ago, then three the endpoint never got (the runbook's incident)."""
    sub = paying_customer(account, 1)
    customer = account.customer("cus_00001")
    before = stripe_event(account, synthetic.event("customer.created", customer, created=now - 3600), delivered=True)
    db.deliver(before)
    missed = [
        synthetic.event("customer.updated", customer, created=now - 1800),
        webhook_for(sub, "customer.subscription.created", created=now - 1700),
        webhook_for({**sub, "status": "past_due"}, "customer.subscription.updated", created=now - 600),
    ]
    for event in missed:
        stripe_event(account, event, delivered=False)
    stripe_event(account, synthetic.event("charge.refunded", {"id": "ch_1"}, created=now - 500), delivered=False)
    return missed


def test_a_backfill_stores_the_missed_events_oldest_first_and_the_worker_applies_them(
    db: Db, account: FakeStripe, gateway: StripeApiGateway
) -> None:
    now = int(time.time())
    missed = outage(db, account, now)

    summary = backfill_events(db.engine, gateway)
    db.drain()

    assert (summary.listed, summary.new) == (3, 3)  # charge.refunded is not a type we handle
    assert summary.start is not None
    assert summary.start.source == "the newest event in the inbox"
    assert inbox(db)[1:] == [(event["id"], "backfill") for event in missed]
    assert db.state("user1@example.com") == ("pro", "past_due")
    events_query = next(query for path, query in account.requests if path == "/v1/events")
    assert "delivery_success=false" in events_query
    assert f"ending_before={inbox(db)[0][0]}" in events_query
    run = runs.latest_run(db.engine, "backfill")
    assert run is not None
    assert (run.status, run.seen, run.changed) == (runs.DONE, 3, 3)


def test_events_already_in_the_inbox_are_listed_but_stored_once(
    db: Db, account: FakeStripe, gateway: StripeApiGateway
) -> None:
    now = int(time.time())
    missed = outage(db, account, now)
    db.deliver(missed[0])  # Stripe's own retry got through meanwhile

    summary = backfill_events(db.engine, gateway, since=now - 7200)
    again = backfill_events(db.engine, gateway, since=now - 7200)

    assert (summary.listed, summary.new) == (3, 2)
    assert (again.listed, again.new) == (3, 0)
    assert len(inbox(db)) == 4


def test_after_the_first_backfill_the_gap_starts_where_the_last_one_began(
    db: Db, account: FakeStripe, gateway: StripeApiGateway
) -> None:
    """Events delivered after an outage must not hide the outage from the next backfill."""
    now = int(time.time())
    outage(db, account, now)
    backfill_events(db.engine, gateway, now=now)
    customer = account.customer("cus_00001")
    lost = stripe_event(account, synthetic.event("customer.updated", customer, created=now + 60), delivered=False)
    later = stripe_event(account, synthetic.event("customer.updated", customer, created=now + 120), delivered=True)
    db.deliver(later)  # the endpoint works again: the newest event in the inbox is after the gap

    summary = backfill_events(db.engine, gateway, now=now + 180)

    assert summary.start is not None
    assert summary.start.source == "the last backfill"
    assert summary.start.at < now - OVERLAP_SECONDS + 60  # not the newest event in the inbox (now + 120)
    assert lost["id"] in {event_id for event_id, _ in inbox(db)}


def test_since_starts_the_list_at_that_time_with_a_cursor_from_before_it(
    db: Db, account: FakeStripe, gateway: StripeApiGateway
) -> None:
    now = int(time.time())
    missed = outage(db, account, now)

    summary = backfill_events(db.engine, gateway, since=now - 1750)

    assert summary.new == 2
    assert [event_id for event_id, _ in inbox(db)[1:]] == [missed[1]["id"], missed[2]["id"]]
    cursor_query = next(query for path, query in account.requests if path == "/v1/events")
    assert f"created%5Blt%5D={now - 1750}" in cursor_query


def test_a_gap_reaching_toward_30_days_is_warned_about_and_names_kamiyo_sync(
    db: Db, account: FakeStripe, gateway: StripeApiGateway
) -> None:
    now = int(time.time())
    missed = outage(db, account, now)
    warnings: list[str] = []

    near = backfill_events(db.engine, gateway, since=now - 26 * DAY, warn=warnings.append)
    past = backfill_events(db.engine, gateway, since=now - 45 * DAY, warn=warnings.append)
    recent = backfill_events(db.engine, gateway, since=now - 2 * DAY, warn=warnings.append)

    assert len(near.warnings) == 1
    assert "26 days ago" in near.warnings[0]
    assert "about to be lost" in near.warnings[0]
    assert "kamiyo sync" in near.warnings[0]
    assert len(past.warnings) == 1
    assert "beyond Stripe's 30 days" in past.warnings[0]
    assert "gone for good" in past.warnings[0]
    assert "kamiyo sync" in past.warnings[0]
    assert recent.warnings == []
    assert warnings == near.warnings + past.warnings
    assert near.new == len(missed)  # what Stripe still has is backfilled all the same


def test_a_starting_event_stripe_does_not_know_falls_back_to_its_time(
    db: Db, account: FakeStripe, gateway: StripeApiGateway
) -> None:
    now = int(time.time())
    missed = outage(db, account, now)
    trigger = synthetic.event("customer.created", synthetic.customer(customer_id="cus_t", email="t@example.com"))
    trigger["created"] = now - 1750  # sent by `kamiyo trigger`: Stripe never saw it
    db.deliver(trigger)

    summary = backfill_events(db.engine, gateway)

    assert summary.start is not None
    assert summary.start.after_event == trigger["id"]
    assert any("does not list the event" in warning for warning in summary.warnings)
    assert summary.new == 2
    assert {missed[1]["id"], missed[2]["id"]} <= {event_id for event_id, _ in inbox(db)}


def test_with_nothing_to_start_from_the_command_asks_for_since(db: Db, gateway: StripeApiGateway) -> None:
    with pytest.raises(KamiyoError, match="pass --since"):
        backfill_events(db.engine, gateway)


def test_the_scheduled_backfill_stores_missed_events_and_takes_turns(
    db: Db, account: FakeStripe, gateway: StripeApiGateway
) -> None:
    now = int(time.time())
    outage(db, account, now)
    wake = threading.Event()
    schedule = BackfillSchedule(db.engine, gateway, 600, threading.Event(), wake)

    first = schedule.run_once(now=now)
    second = schedule.run_once(now=now + 10)  # another worker's backfill began 10 s ago: skip

    assert first is not None
    assert first.new == 3
    assert wake.is_set()
    assert second is None


def test_the_worker_runs_the_backfill_on_its_schedule_and_applies_what_it_finds(
    db: Db, account: FakeStripe, gateway: StripeApiGateway
) -> None:
    now = int(time.time())
    outage(db, account, now)
    settings = replace(db.settings, backfill_interval_seconds=1)
    stop = threading.Event()
    thread = threading.Thread(target=Worker(db.engine, settings, gateway=gateway).run, args=(stop,), daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 15
        while db.state("user1@example.com") != ("pro", "past_due") and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        stop.set()
        thread.join(timeout=10)
    assert db.state("user1@example.com") == ("pro", "past_due")
    assert not thread.is_alive()
    assert {source for _, source in inbox(db)} == {"webhook", "backfill"}
