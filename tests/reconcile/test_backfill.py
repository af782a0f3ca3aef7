"""``backfill_events``: undelivered events from the Events API into the inbox, on both databases."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import replace
from typing import Any

import pytest
from sqlalchemy import select

from kamiyo import synthetic
from kamiyo.db.models import events_table
from kamiyo.processing.worker import Worker
from kamiyo.reconcile import runs
from kamiyo.reconcile.backfill import FIRST_BACKFILL, OVERLAP_SECONDS, SCHEDULE_ACTOR, backfill_events
from kamiyo.reconcile.gateway import EventQuery, Page, StripeApiGateway
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

    summary = backfill_events(db.engine, gateway, since=now - 2000)
    db.drain()

    assert (summary.listed, summary.new) == (3, 3)  # charge.refunded is not a type we handle
    assert summary.start is not None
    assert summary.start.source == "--since"
    assert inbox(db)[1:] == [(event["id"], "backfill") for event in missed]
    assert db.state("user1@example.com") == ("pro", "past_due")
    cursor_query, events_query = [query for path, query in account.requests if path == "/v1/events"][:2]
    assert f"created%5Blt%5D={now - 2000}" in cursor_query
    assert "delivery_success=false" in events_query
    assert f"ending_before={inbox(db)[0][0]}" in events_query  # the event before the gap
    run = runs.latest_run(db.engine, "backfill")
    assert run is not None
    assert (run.status, run.seen, run.changed) == (runs.DONE, 3, 3)


def test_the_first_backfill_reads_all_of_stripes_30_days_even_after_the_outage_ended(
    db: Db, account: FakeStripe, gateway: StripeApiGateway
) -> None:
    """Stripe's recipe (``ending_before`` the newest event handled) would start after the gap here."""
    now = int(time.time())
    missed = outage(db, account, now)
    customer = account.customer("cus_00001")
    month_old = stripe_event(
        account, synthetic.event("customer.updated", customer, created=now - 29 * DAY), delivered=False
    )
    stripe_event(account, synthetic.event("customer.updated", customer, created=now - 31 * DAY), delivered=False)
    later = stripe_event(account, synthetic.event("customer.updated", customer, created=now - 60), delivered=True)
    db.deliver(later)  # the endpoint works again: the newest event in the inbox is after the gap
    warnings: list[str] = []

    summary = backfill_events(db.engine, gateway, now=now, warn=warnings.append)
    db.drain()

    assert summary.start is not None
    assert summary.start.source == FIRST_BACKFILL
    assert summary.start.at == now - 30 * DAY
    assert (summary.listed, summary.new) == (4, 4)  # the 31-day-old one Stripe no longer lists
    assert {event_id for event_id, source in inbox(db) if source == "backfill"} == {
        month_old["id"],
        *(event["id"] for event in missed),
    }
    assert db.state("user1@example.com") == ("pro", "past_due")
    assert warnings == []  # no gap is known to be that old: nothing is said to be lost
    events_queries = [query for path, query in account.requests if path == "/v1/events"]
    assert len(events_queries) == 1  # no cursor request: nothing older than 30 days is listed
    assert "ending_before" not in events_queries[0]
    assert "delivery_success=false" in events_queries[0]


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


def test_with_nothing_in_the_inbox_the_first_backfill_needs_no_since(
    db: Db, account: FakeStripe, gateway: StripeApiGateway
) -> None:
    now = int(time.time())
    sub = paying_customer(account, 1)
    stripe_event(account, webhook_for(sub, "customer.subscription.created", created=now - 10 * DAY), delivered=False)

    summary = backfill_events(db.engine, gateway, now=now)
    again = backfill_events(db.engine, gateway, now=now + 60)

    assert summary.start is not None
    assert (summary.start.source, summary.new) == (FIRST_BACKFILL, 1)
    assert again.start is not None
    assert again.start.source == "the last backfill"  # only the first one looks back 30 days
    assert abs(again.start.at - (now - OVERLAP_SECONDS)) < 60


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
    mark = db.audit_mark()
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
    # Recorded in the audit log by the schedule, once: the runs after it found nothing new.
    assert [(e.action, e.actor) for e in db.audit_since(mark)] == [("backfill", SCHEDULE_ACTOR)]


def test_a_backfill_stores_an_event_of_the_mode_the_service_does_not_take_as_ignored(
    db: Db, account: FakeStripe, gateway: StripeApiGateway
) -> None:
    """A test-mode service (its key's mode): a live-mode event in the list is stored, ignored, and changes no user."""
    now = int(time.time())
    missed = outage(db, account, now)
    live = {**missed[2], "id": "evt_live_one", "livemode": True}
    live["data"] = {"object": {**live["data"]["object"], "status": "canceled"}}
    stripe_event(account, live, delivered=False)

    summary = backfill_events(db.engine, gateway, since=now - 2000, mode="test")
    db.drain(Worker(db.engine, replace(db.settings, stripe_mode="test")))

    assert summary.new == 4
    with db.engine.connect() as connection:
        row = connection.execute(
            select(events_table.c.status, events_table.c.detail, events_table.c.attempts).where(
                events_table.c.stripe_event_id == "evt_live_one"
            )
        ).one()
    assert tuple(row) == (
        "ignored",
        "live-mode event ignored: this service takes test-mode events only (STRIPE_MODE)",
        0,
    )
    assert db.state("user1@example.com") == ("pro", "past_due")  # not canceled by the live-mode event


class _SmallPages:
    """The gateway, listing events two to a page: malformed ids land on the edges of pages."""

    def __init__(self, inner: StripeApiGateway) -> None:
        self.inner = inner

    def list_events(
        self,
        query: EventQuery,
        *,
        starting_after: str | None = None,
        ending_before: str | None = None,
        limit: int = 100,
    ) -> Page:
        return self.inner.list_events(
            query, starting_after=starting_after, ending_before=ending_before, limit=min(limit, 2)
        )


@pytest.mark.parametrize("first", [False, True], ids=["since", "first-backfill"])
def test_an_event_whose_id_is_malformed_is_skipped_and_logged_and_the_others_are_stored(
    db: Db, account: FakeStripe, gateway: StripeApiGateway, caplog: pytest.LogCaptureFixture, first: bool
) -> None:
    """An id unlike Stripe's never reaches the inbox, even from Stripe's API; nor does it stop the run
    when it sits where the next page's cursor would come from (oldest first and newest first)."""
    now = int(time.time())
    paying_customer(account, 1)
    customer = account.customer("cus_00001")
    ids = ["evt_good_1", "evt_a/b/../c", "evt_good_2", "evt_x-y", "evt_good_3", "evt_z.z", "evt_good_4"]
    for offset, event_id in enumerate(ids):
        event = synthetic.event("customer.updated", customer, created=now - 1800 + offset, event_id=event_id)
        stripe_event(account, event, delivered=False)
    caplog.set_level(logging.WARNING, logger="kamiyo.reconcile")

    summary = backfill_events(db.engine, _SmallPages(gateway), since=None if first else now - 3600, now=now)

    stored = {event_id for event_id, source in inbox(db) if source == "backfill"}
    assert stored == {"evt_good_1", "evt_good_2", "evt_good_3", "evt_good_4"}
    assert summary.new == 4
    assert summary.newest is None or summary.newest.startswith("evt_good_")
    skipped = [r.getMessage() for r in caplog.records if "backfill skipped an event" in r.getMessage()]
    for bad in ("evt_a/b/../c", "evt_x-y", "evt_z.z"):
        assert any(bad in line and "invalid id" in line for line in skipped), (bad, skipped)
    run = runs.latest_run(db.engine, "backfill")
    assert run is not None
    assert run.status == runs.DONE


class _ScriptedPages:
    """A gateway answering the events list from a script: {cursor: page}."""

    def __init__(self, pages: dict[str | None, Page]) -> None:
        self.pages = pages
        self.cursors: list[str | None] = []

    def list_events(
        self,
        query: EventQuery,
        *,
        starting_after: str | None = None,
        ending_before: str | None = None,
        limit: int = 100,
    ) -> Page:
        cursor = starting_after or ending_before
        self.cursors.append(cursor)
        return self.pages[cursor]


def test_an_event_without_an_id_at_the_end_of_a_page_neither_stops_nor_breaks_the_listing(db: Db) -> None:
    """The next page starts after the last event that has a well-formed id."""
    now = int(time.time())
    customer = synthetic.customer(customer_id="cus_noid", email="noid@example.com")

    def event(event_id: str | None, offset: int) -> dict[str, Any]:
        made = synthetic.event("customer.updated", customer, created=now - 600 + offset, event_id=event_id or "x")
        if event_id is None:
            del made["id"]
        return made

    gateway = _ScriptedPages(
        {
            None: Page([event("evt_new_3", 3), event("evt_new_2", 2), event(None, 1)], True, now),
            "evt_new_2": Page([event(None, 1), event("evt_new_1", 0)], False, now),
        }
    )
    summary = backfill_events(db.engine, gateway, now=now)

    assert gateway.cursors == [None, "evt_new_2"]
    assert {event_id for event_id, _ in inbox(db)} == {"evt_new_1", "evt_new_2", "evt_new_3"}
    assert summary.new == 3
