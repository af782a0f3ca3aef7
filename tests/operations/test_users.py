"""`users show` and drift: what an operator sees of one user, and tiers nobody can explain (SQLite and PostgreSQL)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import orjson
import pytest
from sqlalchemy import text, update

from integration.conftest import Harness
from kamiyo import synthetic
from kamiyo.cli.main import main
from kamiyo.db.models import user_overrides_table
from kamiyo.domain.outcomes import CustomerOutcome, LinkResult, Outcome, SubscriptionOutcome, UserChange
from kamiyo.operations import users
from kamiyo.operations.overrides import set_override
from kamiyo.operations.users import ChangeView, StateView, drift, show_user, unexplained_drift
from operations.conftest import BASIC, CREATED, PRO, Customer
from support import record_outcome


def _manual_update(ops: Harness, email: str, tier: str, status: str | None) -> None:
    """The runbook's Option 5, verbatim but for the values."""
    with ops.engine.begin() as connection:
        connection.execute(
            text("UPDATE users SET subscription_tier = :t, subscription_status = :s WHERE email = :e"),
            {"t": tier, "s": status, "e": email},
        )


def _override(ops: Harness, email: str, tier: str) -> None:
    set_override(
        ops.engine,
        email=email,
        tier=tier,
        reason="INC-3",
        expires_at=datetime.now(UTC) + timedelta(hours=1),
        actor="alice",
        tiers=ops.settings.price_tiers,
    )


def test_show_user_reports_state_subscriptions_events_override_and_manual_actions(ops: Harness) -> None:
    customer = Customer("shown")
    created, sub, invoice = customer.created(), customer.subscription("active", price=BASIC), customer.invoice()
    other = Customer("other")
    ops.apply(created, sub, invoice, other.created(), other.subscription("active"))
    _override(ops, customer.email, "pro")

    with ops.engine.connect() as connection:
        report = show_user(connection, customer.email.upper(), tiers=ops.settings.price_tiers)
    assert report is not None
    assert (report.email, report.tier, report.status) == (customer.email, "pro", "active")
    assert report.expected == StateView("pro", "active")
    assert report.stripe_state == StateView("basic", "active")
    assert report.override is not None
    assert (report.override.tier, report.override.reason, report.override.set_by) == ("pro", "INC-3", "alice")
    assert report.customer_ids == [customer.customer_id]
    [subscription] = report.subscriptions
    assert (subscription.id, subscription.status, subscription.tier) == (customer.sub_id, "active", "basic")
    assert (subscription.price_ids, subscription.last_event_id) == (["price_basic"], sub["id"])
    # Newest first; the invoice names the customer only inside its payload; the other user's events are not here.
    assert [e.event_id for e in report.recent_events] == [invoice["id"], sub["id"], created["id"]]
    assert all(e.status == "applied" for e in report.recent_events)
    assert report.drift is None
    assert [a.action for a in report.audit] == ["override.set"]
    # Plain values: orjson serialises the whole report as it is (the admin API's JSON).
    assert orjson.loads(orjson.dumps(report))["override"]["tier"] == "pro"


def test_show_user_lists_each_events_change_of_this_user_from_its_outcome_else_its_detail_text(
    ops: Harness, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The detail of an event with an outcome is not where the change is read from; an event applied
    before outcomes were recorded shows its detail as stored, even one that reads like a change."""
    customer = Customer("outcomes")
    created, sub, invoice = customer.created(), customer.subscription("active", price=BASIC), customer.invoice()
    ops.apply(created, sub, invoice)
    user = ops.user(customer.email)
    assert user is not None
    other = ops.add_user("someone.else@example.com")
    moved = Outcome(
        subscription=SubscriptionOutcome(customer.sub_id, "active", "basic", stored=True),
        customer=CustomerOutcome(customer.customer_id, LinkResult.ALREADY_LINKED, user_id=user["id"]),
        users=(
            UserChange(user["id"], customer.email, "free", "basic", None, "active", "best subscription"),
            UserChange(other, "someone.else@example.com", "pro", "free", "active", None, "not this user"),
        ),
    )
    record_outcome(ops.engine, sub["id"], moved, "a sentence nobody reads back")
    record_outcome(ops.engine, invoice["id"], Outcome(note="invoice noted"), "invoice noted")
    old_text = f"user {customer.email} pro/active -> enterprise/active"
    record_outcome(ops.engine, created["id"], None, old_text)

    with ops.engine.connect() as connection:
        report = show_user(connection, customer.email, tiers=ops.settings.price_tiers)
    assert report is not None
    assert [(e.event_id, e.changes, e.detail) for e in report.recent_events] == [
        (invoice["id"], [], "invoice noted"),
        (sub["id"], [ChangeView("free", None, "basic", "active", "best subscription")], "a sentence nobody reads back"),
        (created["id"], None, old_text),
    ]
    assert orjson.loads(orjson.dumps(report))["recent_events"][1]["changes"] == [
        {
            "tier_from": "free",
            "status_from": None,
            "tier_to": "basic",
            "status_to": "active",
            "why": "best subscription",
        }
    ]

    monkeypatch.setattr("kamiyo.cli.invocation.load", lambda: ops.settings)
    monkeypatch.setattr("kamiyo.logs.configure_logging", lambda *_a, **_k: None)  # keep pytest's log capture
    assert main(["users", "show", customer.email]) == 0
    lines = {line.split()[3]: line for line in capsys.readouterr().out.splitlines() if line.startswith("  20")}
    assert lines[sub["id"]].endswith("free/None -> basic/active (best subscription)")
    assert lines[invoice["id"]].endswith("invoice noted")
    assert lines[created["id"]].endswith(old_text)


def test_show_user_lists_the_change_the_worker_recorded_for_the_subscription_event(ops: Harness) -> None:
    customer = Customer("worker")
    created, sub = customer.created(), customer.subscription("active", price=BASIC)
    ops.apply(created, sub)
    with ops.engine.connect() as connection:
        report = show_user(connection, customer.email, tiers=ops.settings.price_tiers)
    assert report is not None
    [by_sub] = [e for e in report.recent_events if e.event_id == sub["id"]]
    assert by_sub.changes is not None
    [change] = by_sub.changes
    assert (change.tier_from, change.tier_to, change.status_to) == ("free", "basic", "active")
    assert all(e.changes is not None for e in report.recent_events)  # every applied event has its outcome


def test_show_user_finds_the_events_of_its_subscription_by_object_id_pending_or_taken_up(
    ops: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Beyond the payload search window only the object id finds an event: the applied ones through
    the object index, which leaves out pending events, and the pending ones through the claim index."""
    monkeypatch.setattr(users, "PAYLOAD_SEARCH_WINDOW", 0)
    customer = Customer("by-object")
    created, applied = customer.created(), customer.subscription("active", price=BASIC)
    ops.apply(created, applied)
    waiting = customer.subscription("past_due", price=BASIC, at=CREATED + 30)
    ops.deliver(waiting)  # stored, not applied yet
    with ops.engine.connect() as connection:
        report = show_user(connection, customer.email, tiers=ops.settings.price_tiers)
    assert report is not None
    assert [(e.event_id, e.status) for e in report.recent_events] == [
        (waiting["id"], "pending"),
        (applied["id"], "applied"),
        (created["id"], "applied"),
    ]


def test_show_user_finds_events_that_name_only_the_email_and_is_none_for_an_unknown_user(ops: Harness) -> None:
    """A payment naming the email (in another case) but no customer still belongs to that user's story."""
    ops.add_user("early@example.com")
    payment = synthetic.event(
        "payment_intent.succeeded", synthetic.payment_intent(customer_id=None, email="Early@Example.com")
    )
    ops.apply(payment)
    with ops.engine.connect() as connection:
        report = show_user(connection, "early@example.com", tiers=ops.settings.price_tiers)
        assert show_user(connection, "nobody@example.com") is None
    assert report is not None
    assert [e.event_id for e in report.recent_events] == [payment["id"]]
    assert (report.subscriptions, report.stripe_state, report.override) == ([], None, None)


def test_a_direct_update_takes_effect_and_is_reported_as_unexplained_drift(ops: Harness) -> None:
    customer, calm = Customer("drifted"), Customer("calm")
    ops.apply(customer.created(), customer.subscription("active", price=BASIC), calm.created(), calm.subscription())
    _manual_update(ops, customer.email, "pro", "active")

    assert ops.tier_status(customer.email) == ("pro", "active")  # what the application reads
    with ops.engine.connect() as connection:
        found = unexplained_drift(connection, tiers=ops.settings.price_tiers)
        report = show_user(connection, customer.email, tiers=ops.settings.price_tiers)
    assert [(d.email, d.stored, d.expected, d.explained_by) for d in found] == [
        (customer.email, StateView("pro", "active"), StateView("basic", "active"), None)
    ]
    assert report is not None
    assert report.drift == found[0]


def test_a_hand_set_tier_on_a_user_stripe_knows_nothing_of_is_drift(ops: Harness) -> None:
    """Webhooks were down, so no subscription arrived; the manual UPDATE is the only reason for pro."""
    ops.add_user("paid@example.com")
    ops.add_user("free@example.com")
    _manual_update(ops, "paid@example.com", "pro", "active")
    with ops.engine.connect() as connection:
        assert [(d.email, d.expected) for d in unexplained_drift(connection)] == [
            ("paid@example.com", StateView("free", None))
        ]


def test_an_override_is_not_drift_and_converting_a_manual_update_into_one_explains_it(ops: Harness) -> None:
    ops.add_user("fixed@example.com")
    _manual_update(ops, "fixed@example.com", "pro", "active")
    _override(ops, "fixed@example.com", "pro")
    with ops.engine.connect() as connection:
        assert drift(connection, tiers=ops.settings.price_tiers) == []


def test_an_expired_override_the_worker_has_not_swept_yet_is_drift_explained_by_its_audit_entry(ops: Harness) -> None:
    customer = Customer("expiring")
    ops.apply(customer.created(), customer.subscription("active", price=BASIC))
    _override(ops, customer.email, "pro")
    with ops.engine.begin() as connection:
        connection.execute(update(user_overrides_table).values(expires_at=datetime.now(UTC) - timedelta(seconds=1)))
        found = drift(connection, tiers=ops.settings.price_tiers)
        unexplained = unexplained_drift(connection, tiers=ops.settings.price_tiers)
    assert [(d.email, d.stored, d.expected) for d in found] == [
        (customer.email, StateView("pro", "active"), StateView("basic", "active"))
    ]
    assert found[0].explained_by is not None
    assert unexplained == []


def test_drift_follows_the_best_of_several_subscriptions(ops: Harness) -> None:
    """Expected state is derived exactly as the worker derives it: the best entitled subscription wins."""
    customer = Customer("several")
    second = synthetic.subscription(sub_id=synthetic.new_id("sub"), customer_id=customer.customer_id, price_obj=PRO)
    ops.apply(customer.created(), customer.subscription("active", price=BASIC))
    ops.apply(synthetic.event("customer.subscription.created", second))
    assert ops.tier_status(customer.email) == ("pro", "active")
    with ops.engine.connect() as connection:
        assert drift(connection, tiers=ops.settings.price_tiers) == []
    _manual_update(ops, customer.email, "basic", "active")
    with ops.engine.connect() as connection:
        assert [d.expected for d in drift(connection, tiers=ops.settings.price_tiers)] == [StateView("pro", "active")]
