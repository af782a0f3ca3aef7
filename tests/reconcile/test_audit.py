"""Syncs that write and backfills are manual actions: each run is one entry of the audit log."""

from __future__ import annotations

import io
import threading
import time

import pytest

from kamiyo import synthetic
from kamiyo.cli import sync as reconcile_cli
from kamiyo.cli.audit import print_audit
from kamiyo.errors import StripeApiError
from kamiyo.operations.audit import default_actor
from kamiyo.reconcile import backfill as backfill_module
from kamiyo.reconcile import sync as sync_module
from kamiyo.reconcile.backfill import SCHEDULE_ACTOR, backfill_events
from kamiyo.reconcile.gateway import StripeApiGateway
from kamiyo.reconcile.ratelimit import RateBudget
from kamiyo.reconcile.schedule import BackfillSchedule
from kamiyo.reconcile.sync import SyncScope, SyncSummary, sync_subscriptions
from reconcile.harness import TEST_RETRY, Db, paying_customer, webhook_for
from stripe_api import FakeStripe, InMemoryGateway, StripeApiServer


def sync(db: Db, gateway: StripeApiGateway | InMemoryGateway, **options: object) -> SyncSummary:
    return sync_subscriptions(db.engine, gateway, db.settings.price_tiers, **options)  # type: ignore[arg-type]


def drifted_account(db: Db, account: FakeStripe) -> None:
    """user1: canceled in Stripe, active here; user2: paid in Stripe, free here; user3: in sync."""
    canceled = paying_customer(account, 1)
    paying_customer(account, 2)
    paying_customer(account, 3)
    db.deliver(synthetic.event("customer.created", account.customer("cus_00001"), created=1_700_000_100))
    db.deliver(webhook_for(canceled, "customer.subscription.created", created=1_700_000_100))
    db.deliver(synthetic.event("customer.created", account.customer("cus_00003"), created=1_700_000_100))
    db.deliver(webhook_for(account.subscription("sub_00003"), "customer.subscription.created", created=1_700_000_100))
    db.drain()
    account.put_subscription({**canceled, "status": "canceled", "ended_at": 1_700_000_200})
    db.add_user("user2@example.com")


# -- sync ----------------------------------------------------------------------------------------


def test_a_sync_that_writes_records_who_why_its_counts_and_each_users_change(
    db: Db, account: FakeStripe, gateway: StripeApiGateway
) -> None:
    drifted_account(db, account)
    mark = db.audit_mark()

    summary = sync(db, gateway, actor="alice", reason="INC-42 webhooks were down")

    [entry] = db.audit_since(mark)
    assert (entry.action, entry.actor, entry.reason, entry.target) == (
        "sync",
        "alice",
        "INC-42 webhooks were down",
        "all subscriptions",
    )
    assert entry.before is not None
    assert entry.after is not None
    assert entry.before["run"] == entry.after["run"] == summary.run_id
    assert entry.before["users"] == {
        "user1@example.com": {"tier": "pro", "status": "active"},
        "user2@example.com": {"tier": "free", "status": None},
    }
    after_users = entry.after["users"]
    assert set(after_users) == {"user1@example.com", "user2@example.com"}
    assert (after_users["user1@example.com"]["tier"], after_users["user1@example.com"]["status"]) == (
        "free",
        "canceled",
    )
    assert any("Stripe has it canceled" in why for why in after_users["user1@example.com"]["why"])
    assert (after_users["user2@example.com"]["tier"], after_users["user2@example.com"]["status"]) == (
        "pro",
        "active",
    )
    assert {k: entry.after[k] for k in ("status", "subscriptions_read", "users_changed", "skipped")} == {
        "status": "done",
        "subscriptions_read": 3,
        "users_changed": 2,
        "skipped": 0,
    }
    assert entry.after["users_not_listed"] == 0


def test_a_dry_run_writes_no_audit_entry(db: Db, account: FakeStripe, gateway: StripeApiGateway) -> None:
    drifted_account(db, account)
    mark = db.audit_mark()

    dry = sync(db, gateway, dry_run=True, actor="alice", reason="just looking")

    assert dry.changed == 2
    assert db.audit_since(mark) == []


def test_without_an_actor_the_os_user_is_recorded_and_a_scoped_sync_names_its_scope(
    db: Db, account: FakeStripe, gateway: StripeApiGateway
) -> None:
    paying_customer(account, 1)
    paying_customer(account, 2)
    mark = db.audit_mark()

    sync(db, gateway, scope=SyncScope(customer="cus_00002"))

    [entry] = db.audit_since(mark)
    assert (entry.actor, entry.reason, entry.target) == (default_actor(), None, "customer=cus_00002")
    assert entry.after is not None
    assert list(entry.after["users"]) == ["user2@example.com"]


def test_a_huge_sync_names_a_bounded_number_of_users_and_counts_the_rest(
    db: Db, account: FakeStripe, gateway: StripeApiGateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sync_module, "AUDIT_USERS", 3)
    for n in range(1, 11):
        paying_customer(account, n)
    mark = db.audit_mark()

    sync(db, gateway, actor="bob")

    [entry] = db.audit_since(mark)
    assert entry.before is not None
    assert entry.after is not None
    assert len(entry.before["users"]) == len(entry.after["users"]) == 3
    assert (entry.after["users_changed"], entry.after["users_not_listed"]) == (10, 7)


def test_a_sync_that_fails_is_recorded_with_what_it_did_and_without_the_key(
    db: Db, account: FakeStripe, stripe_api: StripeApiServer
) -> None:
    for n in range(1, 151):  # two pages: the first commits, the second fails through every retry
        paying_customer(account, n)
    account.fail_next(500, TEST_RETRY.attempts, path_prefix="/v1/subscriptions", after=1)
    wrong = "sk_test_not_the_right_key_987654321"
    gateway = StripeApiGateway(wrong, stripe_api.url, budget=RateBudget(10_000), retry=TEST_RETRY)
    mark = db.audit_mark()

    with pytest.raises(StripeApiError):
        sync(db, gateway, actor="carol")

    [entry] = db.audit_since(mark)
    assert entry.after is not None
    assert entry.after["status"] == "failed"
    assert "401" in entry.after["error"]
    assert wrong not in str(entry.after)


def test_kamiyo_sync_records_the_os_user_with_by_as_a_claim_and_kamiyo_audit_lists_the_entry(
    db: Db, account: FakeStripe, capsys: pytest.CaptureFixture[str]
) -> None:
    """Shell access is what the CLI proves: the OS user is the actor, ``--by`` a claim beside it."""
    drifted_account(db, account)
    out, err = io.StringIO(), io.StringIO()

    code = reconcile_cli.sync(
        db.settings, by="dave", reason="INC-7", gateway=InMemoryGateway(account), out=out, err=err, yes=True
    )
    print_audit(db.settings, since="1h", target="all subscriptions", limit=1, as_json=False)

    assert code == 0
    listed = capsys.readouterr().out
    assert "sync" in listed
    assert f"by {default_actor()} (claims to be dave)  on all subscriptions: INC-7" in listed
    assert '"user1@example.com":{"tier":"pro","status":"active"}' in listed
    assert '"users_changed":2' in listed


# -- backfill ------------------------------------------------------------------------------------


def missed_events(db: Db, account: FakeStripe, now: int) -> list[str]:
    """Two events the endpoint never got, and one that it did."""
    sub = paying_customer(account, 1)
    customer = account.customer("cus_00001")
    delivered = synthetic.event("customer.created", customer, created=now - 3600)
    account.add_event(delivered, delivered=True)
    db.deliver(delivered)
    missed = [
        webhook_for(sub, "customer.subscription.created", created=now - 1700),
        webhook_for({**sub, "status": "past_due"}, "customer.subscription.updated", created=now - 600),
    ]
    for event in missed:
        account.add_event(event, delivered=False)
    return [event["id"] for event in missed]


def test_a_backfill_records_who_why_where_it_started_and_what_it_stored(
    db: Db, account: FakeStripe, gateway: StripeApiGateway
) -> None:
    now = int(time.time())
    missed = missed_events(db, account, now)
    mark = db.audit_mark()

    summary = backfill_events(db.engine, gateway, since=now - 7200, actor="erin", reason="INC-8 endpoint disabled")

    [entry] = db.audit_since(mark)
    assert (entry.action, entry.actor, entry.reason, entry.target) == (
        "backfill",
        "erin",
        "INC-8 endpoint disabled",
        "undelivered events",
    )
    assert entry.before is not None
    assert entry.after is not None
    assert entry.before["start"] == "--since"
    assert entry.before["from"] == time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now - 7200))
    assert {k: entry.after[k] for k in ("run", "status", "listed", "stored", "events_not_listed")} == {
        "run": summary.run_id,
        "status": "done",
        "listed": 2,
        "stored": 2,
        "events_not_listed": 0,
    }
    assert sorted(entry.after["events"]) == sorted(missed)


def test_a_manual_backfill_that_finds_nothing_new_is_recorded_too_and_the_ids_are_bounded(
    db: Db, account: FakeStripe, gateway: StripeApiGateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    now = int(time.time())
    missed = missed_events(db, account, now)
    monkeypatch.setattr(backfill_module, "AUDIT_EVENTS", 1)
    mark = db.audit_mark()

    backfill_events(db.engine, gateway, since=now - 7200, actor="erin")
    backfill_events(db.engine, gateway, since=now - 7200, actor="erin")

    first, second = db.audit_since(mark)
    assert first.after is not None
    assert second.after is not None
    assert (first.after["stored"], len(first.after["events"]), first.after["events_not_listed"]) == (2, 1, 1)
    assert set(first.after["events"]) < set(missed)
    assert (second.after["listed"], second.after["stored"], second.after["events"]) == (2, 0, [])


def test_the_scheduled_backfill_is_recorded_by_a_system_actor_only_when_it_stored_events(
    db: Db, account: FakeStripe, gateway: StripeApiGateway
) -> None:
    now = int(time.time())
    missed = missed_events(db, account, now)
    schedule = BackfillSchedule(db.engine, gateway, 600, threading.Event(), threading.Event())
    mark = db.audit_mark()

    first = schedule.run_once(now=now)
    nothing_new = schedule.run_once(now=now + 600)

    assert first is not None

    assert nothing_new is not None
    assert (first.new, nothing_new.new) == (2, 0)
    [entry] = db.audit_since(mark)
    assert (entry.action, entry.actor) == ("backfill", SCHEDULE_ACTOR)
    assert "600" in (entry.reason or "")
    assert entry.after is not None
    assert sorted(entry.after["events"]) == sorted(missed)


def test_kamiyo_backfill_records_the_os_user_with_by_as_a_claim_and_kamiyo_audit_lists_the_entry(
    db: Db, account: FakeStripe, capsys: pytest.CaptureFixture[str]
) -> None:
    """Shell access is what the CLI proves: the OS user is the actor, ``--by`` a claim beside it."""
    now = int(time.time())
    missed_events(db, account, now)
    out, err = io.StringIO(), io.StringIO()

    code = reconcile_cli.backfill(
        db.settings, since="2h", by="frank", reason="INC-9", gateway=InMemoryGateway(account), out=out, err=err
    )
    print_audit(db.settings, since="1h", target="undelivered events", limit=1, as_json=False)

    assert code == 0
    assert "applied: the worker handled 3 event(s)" in out.getvalue()  # with the delivered one, pending
    listed = capsys.readouterr().out
    assert "backfill" in listed
    assert f"by {default_actor()} (claims to be frank)  on undelivered events: INC-9" in listed
    assert '"stored":2' in listed
