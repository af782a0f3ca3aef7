"""The worker applies stored events to users and subscriptions, on SQLite and on PostgreSQL."""

from __future__ import annotations

import dataclasses
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from integration.conftest import Harness
from kamiyo import synthetic
from kamiyo.config import Settings
from kamiyo.db.engine import make_engine
from kamiyo.db.migrate import upgrade
from kamiyo.db.models import customers_table
from kamiyo.domain import rules
from kamiyo.domain.tiers import parse_price_tiers
from kamiyo.errors import ApplyError
from kamiyo.processing.worker import Worker, replay
from support import PRICE_TIERS, make_settings

PRO = synthetic.price("price_pro_monthly")
BASIC = synthetic.price("price_basic")
ENTERPRISE = synthetic.price("price_ent_2024", lookup_key="ent_yearly")
MONTH = 30 * 24 * 3600
SUB_CREATED = 1_700_000_000
T = SUB_CREATED + 1000  # event times below are T + n

_TYPE_FOR_STATUS = {"canceled": "customer.subscription.deleted", "paused": "customer.subscription.paused"}


def sub_event(
    status: str = "active",
    *,
    at: int = T,
    event_type: str | None = None,
    sub_id: str = "sub_1",
    customer_id: str = "cus_1",
    price: dict[str, Any] = PRO,
    api_version: str = synthetic.LATEST_API_VERSION,
    sub_created: int = SUB_CREATED,
) -> dict[str, Any]:
    obj = synthetic.subscription(
        sub_id=sub_id,
        customer_id=customer_id,
        status=status,
        price_obj=price,
        created=sub_created,
        api_version=api_version,
    )
    event_type = event_type or _TYPE_FOR_STATUS.get(status, "customer.subscription.updated")
    return synthetic.event(event_type, obj, created=at, api_version=api_version)


def customer_event(
    email: str | None, *, customer_id: str = "cus_1", at: int = T, event_type: str = "customer.created"
) -> dict[str, Any]:
    return synthetic.event(event_type, synthetic.customer(customer_id=customer_id, email=email, created=at), created=at)


def invoice_event(
    email: str | None,
    *,
    event_type: str = "invoice.paid",
    customer_id: str = "cus_1",
    sub_id: str = "sub_1",
    at: int = T,
    api_version: str = synthetic.LATEST_API_VERSION,
) -> dict[str, Any]:
    obj = synthetic.invoice(
        customer_id=customer_id,
        sub_id=sub_id,
        email=email,
        paid=event_type != "invoice.payment_failed",
        api_version=api_version,
        created=at,
    )
    return synthetic.event(event_type, obj, created=at, api_version=api_version)


def checkout_event(
    email: str, *, customer_id: str = "cus_1", ref: str | None = None, at: int = T, sub_id: str = "sub_1"
) -> dict[str, Any]:
    obj = synthetic.checkout_session(customer_id=customer_id, sub_id=sub_id, email=email, client_reference_id=ref)
    return synthetic.event("checkout.session.completed", obj, created=at)


def payment_intent_event(
    email: str, *, event_type: str = "payment_intent.succeeded", customer_id: str = "cus_1", at: int = T
) -> dict[str, Any]:
    obj = synthetic.payment_intent(
        customer_id=customer_id, email=email, succeeded=event_type == "payment_intent.succeeded"
    )
    return synthetic.event(event_type, obj, created=at)


def link_event(kind: str, email: str, *, customer_id: str = "cus_1", at: int = T) -> dict[str, Any]:
    """An event of ``kind`` that names ``email`` for ``customer_id``."""
    if kind == "invoice":
        return invoice_event(email, customer_id=customer_id, at=at)
    if kind == "checkout":
        return checkout_event(email, customer_id=customer_id, at=at)
    if kind == "payment_intent":
        return payment_intent_event(email, customer_id=customer_id, at=at)
    return customer_event(email, customer_id=customer_id, at=at)


def with_tiers(settings: Settings, raw: str, **overrides: Any) -> Settings:
    return dataclasses.replace(settings, price_tiers=parse_price_tiers(raw), **overrides)


# -- each handled event type ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("event_type", "status", "expected"),
    [
        ("customer.subscription.created", "active", ("pro", "active")),
        ("customer.subscription.created", "incomplete", ("free", "incomplete")),
        ("customer.subscription.updated", "past_due", ("pro", "past_due")),
        ("customer.subscription.updated", "unpaid", ("free", "unpaid")),
        ("customer.subscription.deleted", "canceled", ("free", "canceled")),
        ("customer.subscription.paused", "paused", ("free", "paused")),
        ("customer.subscription.resumed", "active", ("pro", "active")),
        ("customer.subscription.trial_will_end", "trialing", ("pro", "trialing")),
    ],
)
def test_subscription_event_sets_linked_users_tier_and_status(
    harness: Any, event_type: str, status: str, expected: tuple[str, str]
) -> None:
    """Each subscription event type stores the snapshot and derives the user's tier and status from it."""
    harness.apply(customer_event("ann@example.com", at=T - 10))
    event = sub_event(status, event_type=event_type)
    harness.apply(event)
    assert harness.event(event["id"])["status"] == "applied"
    assert harness.event(event["id"])["attempts"] == 1
    sub = harness.subscription("sub_1")
    assert (sub["status"], sub["tier"], sub["customer_id"]) == (status, "pro", "cus_1")
    assert harness.tier_status("ann@example.com") == expected


def test_lifecycle_paused_then_resumed_then_deleted_moves_the_user_through_each_state(harness: Any) -> None:
    """created → paused revokes, resumed restores, deleted revokes for good."""
    harness.apply(customer_event("ann@example.com", at=T - 10))
    seen = []
    for status, event_type, at in [
        ("trialing", "customer.subscription.created", T),
        ("trialing", "customer.subscription.trial_will_end", T + 1),
        ("paused", "customer.subscription.paused", T + 2),
        ("active", "customer.subscription.resumed", T + 3),
        ("past_due", "customer.subscription.updated", T + 4),
        ("canceled", "customer.subscription.deleted", T + 5),
    ]:
        harness.apply(sub_event(status, event_type=event_type, at=at))
        seen.append(harness.tier_status("ann@example.com"))
    assert seen == [
        ("pro", "trialing"),
        ("pro", "trialing"),
        ("free", "paused"),
        ("pro", "active"),
        ("pro", "past_due"),
        ("free", "canceled"),
    ]


@pytest.mark.parametrize("event_type", ["invoice.payment_succeeded", "invoice.paid", "invoice.payment_failed"])
@pytest.mark.parametrize("api_version", [synthetic.LEGACY_API_VERSION, synthetic.LATEST_API_VERSION])
def test_invoice_event_links_customer_by_customer_email_and_names_its_subscription(
    harness: Any, event_type: str, api_version: str
) -> None:
    """Invoices link by ``customer_email`` and read the subscription from either payload shape."""
    harness.apply(sub_event("active", api_version=api_version))
    invoice = invoice_event("Ann@Example.com", event_type=event_type, api_version=api_version)
    harness.apply(invoice)
    row = harness.event(invoice["id"])
    assert row["status"] == "applied"
    assert "subscription=sub_1" in row["detail"]
    assert harness.customer("cus_1")["user_id"] == harness.user("ann@example.com")["id"]
    # An invoice only links; the tier comes from the subscription, even when the payment failed.
    assert harness.tier_status("ann@example.com") == ("pro", "active")


@pytest.mark.parametrize("event_type", ["payment_intent.succeeded", "payment_intent.payment_failed"])
def test_payment_intent_event_links_customer_by_receipt_email(harness: Any, event_type: str) -> None:
    """A payment intent's ``receipt_email`` links its customer; the waiting subscription then applies."""
    harness.apply(sub_event("active"))
    event = payment_intent_event("Bob@Example.com", event_type=event_type)
    harness.apply(event)
    assert harness.event(event["id"])["status"] == "applied"
    assert harness.tier_status("bob@example.com") == ("pro", "active")
    assert harness.user("bob@example.com")["stripe_customer_id"] == "cus_1"


def test_checkout_session_links_customer_by_customer_details_email(harness: Any) -> None:
    """checkout.session.completed creates the user from ``customer_details.email`` and links the customer."""
    event = checkout_event("Carol@Example.com")
    harness.apply(event)
    assert harness.event(event["id"])["status"] == "applied"
    user = harness.user("carol@example.com")
    assert (user["subscription_tier"], user["subscription_status"], user["stripe_customer_id"]) == (
        "free",
        None,
        "cus_1",
    )
    harness.apply(sub_event("active"))
    assert harness.tier_status("carol@example.com") == ("pro", "active")


def test_checkout_client_reference_id_links_to_our_existing_user_not_the_email(harness: Any) -> None:
    """``client_reference_id`` naming a user id wins over the checkout email; no user is created for that email."""
    owner = harness.add_user("owner@example.com")
    harness.apply(sub_event("active"))
    harness.apply(checkout_event("someone.else@example.com", ref=str(owner)))
    assert harness.user("someone.else@example.com") is None
    assert harness.customer("cus_1")["user_id"] == owner
    assert harness.customer("cus_1")["linked_by"] == "client_reference_id"
    assert harness.tier_status("owner@example.com") == ("pro", "active")


def test_checkout_client_reference_id_moves_a_customer_linked_by_email_and_resets_the_previous_user(
    harness: Any,
) -> None:
    """A later checkout naming our user takes the customer from the email-matched user, who returns to free."""
    harness.apply(customer_event("first@example.com", at=T - 20), sub_event("active"))
    assert harness.tier_status("first@example.com") == ("pro", "active")
    owner = harness.add_user("owner@example.com")
    harness.apply(checkout_event("first@example.com", ref=str(owner), at=T + 5))
    assert harness.tier_status("owner@example.com") == ("pro", "active")
    assert harness.tier_status("first@example.com") == ("free", None)
    assert harness.user("first@example.com")["stripe_customer_id"] is None


def test_checkout_client_reference_id_naming_no_user_falls_back_to_the_email(harness: Any) -> None:
    """An unknown ``client_reference_id`` does not block linking: the email still links the customer."""
    harness.apply(checkout_event("dana@example.com", ref="424242"), sub_event("active"))
    assert harness.tier_status("dana@example.com") == ("pro", "active")


@pytest.mark.parametrize("event_type", ["customer.created", "customer.updated"])
def test_customer_event_links_by_email(harness: Any, event_type: str) -> None:
    """customer.created / customer.updated name the email that links the customer."""
    harness.apply(sub_event("trialing"))
    event = customer_event("Erin@Example.com", event_type=event_type, at=T + 1)
    harness.apply(event)
    assert harness.event(event["id"])["status"] == "applied"
    assert harness.tier_status("erin@example.com") == ("pro", "trialing")


def test_customer_event_without_email_leaves_customer_unlinked(harness: Any) -> None:
    """A customer with no email links no one; the subscription waits."""
    harness.apply(customer_event(None), sub_event("active"))
    assert harness.customer("cus_1")["user_id"] is None
    assert harness.count_users() == 0


@pytest.mark.parametrize("event_type", ["charge.refunded", "customer.deleted", "invoice.created", "product.updated"])
def test_unknown_event_type_is_stored_as_ignored_without_side_effects(harness: Any, event_type: str) -> None:
    """Types with no handler end as 'ignored' after one attempt, with no error and no user or customer rows."""
    event = synthetic.event(event_type, {"id": "obj_1", "object": "thing", "customer": "cus_1", "email": "x@y.z"})
    harness.apply(event)
    row = harness.event(event["id"])
    assert (row["status"], row["attempts"], row["last_error"]) == ("ignored", 1, None)
    assert harness.count_users() == 0
    assert harness.customer("cus_1") is None


# -- linking ----------------------------------------------------------------------------------


def test_linking_matches_an_existing_user_by_case_insensitive_email(harness: Any) -> None:
    """An email differing only in case and surrounding spaces finds the existing user; none is created."""
    existing = harness.add_user("ann@example.com")
    harness.apply(sub_event("active"), customer_event("  ANN@Example.COM "))
    assert harness.count_users() == 1
    assert harness.customer("cus_1")["user_id"] == existing
    assert harness.tier_status("ann@example.com") == ("pro", "active")


def test_linking_creates_a_missing_user_with_the_lower_cased_email(harness: Any) -> None:
    """No matching user: one is created, lower-cased, free until a subscription says otherwise."""
    harness.apply(customer_event("New.Person@Example.COM"))
    assert harness.tier_status("new.person@example.com") == ("free", None)
    assert harness.count_users() == 1


@pytest.mark.parametrize("kind", ["invoice", "checkout", "customer", "payment_intent"])
def test_subscription_of_unlinked_customer_applies_by_itself_once_an_event_names_the_email(
    harness: Any, kind: str
) -> None:
    """The subscription event is stored first with nobody to apply to; the later email-bearing event
    links the customer and the user gets the tier without any replay."""
    sub = sub_event("active")
    harness.apply(sub)
    assert "not linked yet" in harness.event(sub["id"])["detail"]
    assert harness.count_users() == 0
    harness.apply(link_event(kind, "Fay@Example.com", at=T + 5))
    assert harness.tier_status("fay@example.com") == ("pro", "active")
    assert harness.event(sub["id"])["attempts"] == 1


def test_a_linked_customer_stays_with_its_user_when_a_later_event_names_another_email(harness: Any) -> None:
    """Once linked by email, a different email on a later event does not move the customer."""
    harness.apply(customer_event("first@example.com"), sub_event("active"))
    harness.apply(customer_event("second@example.com", event_type="customer.updated", at=T + 10))
    assert harness.tier_status("first@example.com") == ("pro", "active")
    assert harness.user("second@example.com") is None


# -- tiers ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("price", "tier"),
    [
        (synthetic.price("price_basic"), "basic"),
        (synthetic.price("price_pro_monthly"), "pro"),
        (synthetic.price("price_ent_2024", lookup_key="ent_yearly"), "enterprise"),
        (synthetic.price("price_gold", tier="Gold"), "gold"),
        (synthetic.price("price_basic", tier="gold"), "basic"),  # STRIPE_PRICE_TIERS wins over metadata
    ],
    ids=["price-id", "price-id-pro", "lookup-key", "metadata-tier", "config-over-metadata"],
)
def test_tier_comes_from_price_id_lookup_key_or_metadata(harness: Any, price: dict[str, Any], tier: str) -> None:
    """STRIPE_PRICE_TIERS by price id or lookup_key; otherwise the price's ``metadata.tier``."""
    harness.apply(customer_event("ann@example.com"), sub_event("active", price=price))
    assert harness.subscription("sub_1")["tier"] == tier
    assert harness.tier_status("ann@example.com") == (tier, "active")


def test_subscription_with_several_items_grants_the_best_items_tier(harness: Any) -> None:
    """A subscription with a basic and an enterprise item grants enterprise."""
    event = sub_event("active", price=BASIC)
    items = event["data"]["object"]["items"]["data"]
    items.append({**items[0], "id": "si_second", "price": ENTERPRISE})
    harness.apply(customer_event("ann@example.com"), event)
    assert harness.tier_status("ann@example.com") == ("enterprise", "active")
    assert harness.subscription("sub_1")["price_ids"] == "price_basic,price_ent_2024"


def test_unmapped_price_parks_the_event_naming_the_price_then_applies_after_config_fix_and_replay(
    harness: Any,
) -> None:
    """No tier for the price: parked as failed at once, error names the price; new tier config + replay applies it."""
    unknown = synthetic.price("price_mystery", lookup_key="mystery_monthly")
    event = sub_event("active", price=unknown)
    harness.apply(customer_event("ann@example.com"), event)
    row = harness.event(event["id"])
    assert (row["status"], row["attempts"]) == ("failed", 1)
    assert "price_mystery" in row["last_error"]
    assert "mystery_monthly" in row["last_error"]
    assert harness.subscription("sub_1") is None
    assert harness.tier_status("ann@example.com") == ("free", None)

    fixed = with_tiers(harness.settings, PRICE_TIERS + ",mystery_monthly=enterprise")
    harness.drain(fixed)
    assert harness.event(event["id"])["status"] == "failed"  # fixing the config alone does not re-run it

    assert replay(harness.engine, event_id=event["id"]) == 1
    harness.drain(fixed)
    row = harness.event(event["id"])
    assert (row["status"], row["attempts"], row["last_error"]) == ("applied", 1, None)
    assert harness.tier_status("ann@example.com") == ("enterprise", "active")


def test_a_cancellation_whose_price_maps_to_no_tier_applies_and_ends_the_users_tier(harness: Any) -> None:
    """A price no longer in STRIPE_PRICE_TIERS does not hold back the end of its subscription: stored as free."""
    harness.apply(customer_event("ann@example.com"), sub_event("active"))
    assert harness.tier_status("ann@example.com") == ("pro", "active")
    ended = sub_event("canceled", at=T + 10)
    harness.deliver(ended)
    harness.drain(with_tiers(harness.settings, "price_basic=basic"))
    row = harness.event(ended["id"])
    assert (row["status"], row["last_error"]) == ("applied", None)
    assert (harness.subscription("sub_1")["status"], harness.subscription("sub_1")["tier"]) == ("canceled", "free")
    assert harness.tier_status("ann@example.com") == ("free", "canceled")


def test_replay_failed_requeues_every_parked_event_and_nothing_else(harness: Any) -> None:
    """``replay(failed=True)`` makes exactly the failed events pending; after the fix they all apply."""
    applied = customer_event("ann@example.com")
    parked = [
        sub_event("active", sub_id="sub_1", price=synthetic.price("price_x")),
        sub_event("active", sub_id="sub_2", price=synthetic.price("price_y"), at=T + 1),
    ]
    harness.apply(applied, *parked)
    assert harness.statuses(e["id"] for e in parked) == ["failed", "failed"]

    assert replay(harness.engine, failed=True) == 2
    assert harness.statuses(e["id"] for e in parked) == ["pending", "pending"]
    assert harness.event(applied["id"])["status"] == "applied"
    harness.drain(with_tiers(harness.settings, PRICE_TIERS + ",price_x=basic,price_y=pro"))
    assert harness.statuses(e["id"] for e in parked) == ["applied", "applied"]
    assert harness.tier_status("ann@example.com") == ("pro", "active")
    assert replay(harness.engine, failed=True) == 0


def test_replay_needs_exactly_one_of_event_id_or_failed(harness: Any) -> None:
    """Neither or both selectors is refused rather than guessing."""
    with pytest.raises(ApplyError):
        replay(harness.engine)
    with pytest.raises(ApplyError):
        replay(harness.engine, event_id="evt_x", failed=True)


def test_replaying_an_applied_event_leaves_the_state_unchanged(harness: Any) -> None:
    """Re-running the winning snapshot is a no-op: same subscription version, same user state."""
    sub = sub_event("active")
    harness.apply(customer_event("ann@example.com"), sub, sub_event("past_due", at=T + 5))
    before = dict(harness.subscription("sub_1"))
    assert replay(harness.engine, event_id=sub["id"]) == 1
    harness.drain()
    after = dict(harness.subscription("sub_1"))
    assert {k: v for k, v in after.items() if k != "updated_at"} == {
        k: v for k, v in before.items() if k != "updated_at"
    }
    assert harness.tier_status("ann@example.com") == ("pro", "past_due")
    assert "older than the stored snapshot" in harness.event(sub["id"])["detail"]


# -- failures and retries ---------------------------------------------------------------------


def _broken_subscription_event(at: int = T) -> dict[str, Any]:
    event = sub_event("active", at=at)
    del event["data"]["object"]["status"]  # every API version has one: the handler raises ValueError
    return event


def test_handler_exception_is_retried_with_backoff_then_parked_after_max_attempts(harness: Any) -> None:
    """attempts grows, available_at moves into the future by a growing delay, and the last attempt parks it."""
    settings = dataclasses.replace(harness.settings, retry_base_seconds=10.0, worker_max_attempts=3)
    worker = Worker(harness.engine, settings)
    event = _broken_subscription_event()
    harness.deliver(event)

    now = 1_000_000.0
    assert worker.run_once(now) == 1
    row = harness.event(event["id"])
    assert (row["status"], row["attempts"]) == ("pending", 1)
    assert now + 5 <= row["available_at"] <= now + 10
    assert "ValueError" in row["last_error"]

    assert worker.run_once(now + 4) == 0  # not due yet
    now = row["available_at"]
    assert worker.run_once(now) == 1
    row = harness.event(event["id"])
    assert (row["status"], row["attempts"]) == ("pending", 2)
    assert now + 10 <= row["available_at"] <= now + 20

    assert worker.run_once(row["available_at"]) == 1
    row = harness.event(event["id"])
    assert (row["status"], row["attempts"]) == ("failed", 3)
    assert "ValueError" in row["last_error"]
    assert worker.run_once(now + 10_000) == 0  # parked: never claimed again


def test_a_failing_event_does_not_undo_the_other_events_of_its_batch(harness: Any) -> None:
    """The bad event's savepoint rolls back alone; its batch neighbours commit."""
    good_link, bad, good_sub = customer_event("ann@example.com"), _broken_subscription_event(), sub_event("active")
    harness.deliver(good_link, bad, good_sub)
    assert Worker(harness.engine, harness.settings).run_once() == 3
    assert harness.statuses([good_link["id"], bad["id"], good_sub["id"]]) == ["applied", "pending", "applied"]
    assert harness.tier_status("ann@example.com") == ("pro", "active")


def test_transient_handler_failure_is_retried_and_then_applied(harness: Any, monkeypatch: Any) -> None:
    """A handler that fails once succeeds on the retry: applied after 2 attempts, error cleared."""
    calls = []

    def flaky(state: Any, event: Any) -> Any:
        calls.append(event.event_id)
        if len(calls) == 1:
            raise RuntimeError("temporary trouble")
        return rules.subscription_event(state, event)

    monkeypatch.setitem(rules.RULES, "customer.subscription.created", flaky)
    event = sub_event("active", event_type="customer.subscription.created")
    harness.apply(customer_event("ann@example.com"), event)
    row = harness.event(event["id"])
    assert (row["status"], row["attempts"], row["last_error"]) == ("applied", 2, None)
    assert len(calls) == 2
    assert harness.tier_status("ann@example.com") == ("pro", "active")


# -- entitlement across subscriptions -------------------------------------------------------


def test_best_entitled_subscription_decides_across_a_users_subscriptions(harness: Any) -> None:
    """Highest tier among entitled subs wins; with none entitled, free and the newest subscription's status."""
    harness.apply(customer_event("ann@example.com", at=T - 10))
    harness.apply(sub_event("active", sub_id="sub_basic", price=BASIC, sub_created=SUB_CREATED))
    assert harness.tier_status("ann@example.com") == ("basic", "active")
    harness.apply(sub_event("past_due", sub_id="sub_pro", price=PRO, sub_created=SUB_CREATED + 50))
    assert harness.tier_status("ann@example.com") == ("pro", "past_due")  # grace keeps the better tier
    harness.apply(sub_event("unpaid", sub_id="sub_pro", price=PRO, at=T + 1, sub_created=SUB_CREATED + 50))
    assert harness.tier_status("ann@example.com") == ("basic", "active")
    harness.apply(sub_event("canceled", sub_id="sub_basic", price=BASIC, at=T + 2))
    # none entitled: the newest subscription (sub_pro, unpaid) names the status
    assert harness.tier_status("ann@example.com") == ("free", "unpaid")


def test_subscriptions_of_two_customers_with_one_email_combine_on_the_one_user(harness: Any) -> None:
    """Two Stripe customers sharing an email are one user: the better subscription of either decides."""
    harness.apply(
        customer_event("ann@example.com", customer_id="cus_a"),
        customer_event("ANN@example.com", customer_id="cus_b"),
        sub_event("active", sub_id="sub_a", customer_id="cus_a", price=BASIC),
        sub_event("trialing", sub_id="sub_b", customer_id="cus_b", price=ENTERPRISE),
    )
    assert harness.count_users() == 1
    assert harness.tier_status("ann@example.com") == ("enterprise", "trialing")
    harness.apply(sub_event("canceled", sub_id="sub_b", customer_id="cus_b", price=ENTERPRISE, at=T + 1))
    assert harness.tier_status("ann@example.com") == ("basic", "active")


def test_equal_tiers_prefer_active_over_trialing_over_past_due(harness: Any) -> None:
    """Among entitled subscriptions of the same tier, the status follows active > trialing > past_due."""
    harness.apply(customer_event("ann@example.com"))
    harness.apply(sub_event("past_due", sub_id="sub_1", sub_created=SUB_CREATED + 20))
    harness.apply(sub_event("trialing", sub_id="sub_2", sub_created=SUB_CREATED + 10))
    assert harness.tier_status("ann@example.com") == ("pro", "trialing")
    harness.apply(sub_event("active", sub_id="sub_3", sub_created=SUB_CREATED))
    assert harness.tier_status("ann@example.com") == ("pro", "active")


# -- order, terminal states, payload shapes -----------------------------------------------------


@pytest.mark.parametrize(
    ("terminal", "terminal_type"),
    [("canceled", "customer.subscription.deleted"), ("incomplete_expired", "customer.subscription.updated")],
)
@pytest.mark.parametrize("later_at", [T - 100, T, T + 100], ids=["older", "same-second", "newer"])
def test_terminal_status_is_never_revived_by_any_non_terminal_snapshot(
    harness: Any, terminal: str, terminal_type: str, later_at: int
) -> None:
    """After canceled / incomplete_expired, an older, same-second or newer non-terminal snapshot changes nothing."""
    harness.apply(customer_event("ann@example.com", at=T - 500))
    harness.apply(sub_event(terminal, event_type=terminal_type, at=T))
    for revival in ("incomplete", "trialing", "active", "past_due", "paused"):
        late = sub_event(revival, at=later_at, event_type="customer.subscription.updated")
        harness.apply(late)
        assert harness.event(late["id"])["status"] == "applied"
        assert harness.subscription("sub_1")["status"] == terminal, revival
        assert harness.tier_status("ann@example.com") == ("free", terminal)


@pytest.mark.parametrize("order", ["in-order", "reversed"])
def test_older_snapshot_never_overwrites_a_newer_one(harness: Any, order: str) -> None:
    """Whatever the arrival order, the snapshot of the later event (by ``created``) is the one kept."""
    harness.apply(customer_event("ann@example.com", at=T - 500))
    events = [sub_event("past_due", at=T, price=BASIC), sub_event("active", at=T + 1, price=PRO)]
    if order == "reversed":
        events.reverse()
    harness.apply(*events)
    sub = harness.subscription("sub_1")
    assert (sub["status"], sub["tier"], sub["version_created"]) == ("active", "pro", T + 1)
    assert harness.tier_status("ann@example.com") == ("pro", "active")


@pytest.mark.parametrize(
    ("first", "second", "expected"),
    [
        # within one second the lifecycle rank decides: incomplete < trialing < active < past_due < ...
        (("incomplete", "customer.subscription.created", PRO), ("active", None, PRO), ("active", "pro")),
        (("trialing", None, PRO), ("active", None, PRO), ("active", "pro")),
        (("active", None, PRO), ("past_due", None, PRO), ("past_due", "pro")),
        # same status: created < updated
        (("active", "customer.subscription.created", BASIC), ("active", None, PRO), ("active", "pro")),
    ],
    ids=["incomplete-then-active", "trialing-then-active", "active-then-past-due", "created-then-updated"],
)
@pytest.mark.parametrize("order", ["in-order", "reversed"])
def test_same_second_events_follow_the_documented_tie_rule_in_any_arrival_order(
    harness: Any, first: tuple[Any, ...], second: tuple[Any, ...], expected: tuple[str, str], order: str
) -> None:
    """Two snapshots with equal ``created`` converge on the later one in the lifecycle, whichever arrives first."""
    harness.apply(customer_event("ann@example.com", at=T - 500))
    events = [sub_event(status, event_type=kind, price=price, at=T) for status, kind, price in (first, second)]
    if order == "reversed":
        events.reverse()
    harness.apply(*events)
    sub = harness.subscription("sub_1")
    assert (sub["status"], sub["tier"]) == expected


@pytest.mark.parametrize("api_version", [synthetic.LEGACY_API_VERSION, synthetic.LATEST_API_VERSION])
def test_both_payload_shapes_apply_and_read_the_period_end(harness: Any, api_version: str) -> None:
    """Before basil the period sits on the subscription, after it on the items: both are read."""
    sub = sub_event("active", api_version=api_version)
    if api_version == synthetic.LATEST_API_VERSION:
        assert "current_period_end" not in sub["data"]["object"]
    else:
        assert "current_period_end" not in sub["data"]["object"]["items"]["data"][0]
    invoice = invoice_event("ann@example.com", api_version=api_version, at=T + 1)
    harness.apply(sub, invoice)
    assert harness.subscription("sub_1")["current_period_end"] == SUB_CREATED + MONTH
    assert "subscription=sub_1" in harness.event(invoice["id"])["detail"]
    assert harness.tier_status("ann@example.com") == ("pro", "active")
    assert harness.event(sub["id"])["api_version"] == api_version


def test_duplicate_delivery_is_stored_once_and_applied_once(harness: Any) -> None:
    """A redelivered event id is not new, and the worker handles it a single time."""
    event = sub_event("active")
    assert harness.deliver(customer_event("ann@example.com"), event, event) == [True, True, False]
    assert harness.drain() == 2
    assert harness.event(event["id"])["attempts"] == 1
    assert harness.deliver(event) == [False]
    assert harness.drain() == 0


def test_customer_rows_record_how_they_were_linked(harness: Any) -> None:
    """A customer linked by email records ``linked_by='email'`` and the email it was seen with."""
    harness.apply(customer_event("Ann@Example.com"))
    with harness.engine.connect() as connection:
        row = connection.execute(select(customers_table).where(customers_table.c.id == "cus_1")).mappings().one()
    assert (row["linked_by"], row["email"], row["email_seen_at"]) == ("email", "ann@example.com", T)


def test_an_idle_worker_on_sqlite_leaves_the_write_lock_to_others(tmp_path: Path) -> None:
    """With nothing due, a poll only reads: another process may hold SQLite's write lock (the runbook's
    `sqlite3 ... UPDATE users`) and the worker neither waits for it nor takes it; once an event is
    due and the lock is free, the worker applies it. (SQLite only: PostgreSQL has no such lock.)"""
    path = tmp_path / "kamiyo.db"
    settings = make_settings(f"sqlite:///{path}")
    engine = make_engine(settings)
    upgrade(engine)
    harness = Harness(engine, settings)
    other = sqlite3.connect(path, isolation_level=None, timeout=0)
    try:
        other.execute("BEGIN IMMEDIATE")  # the other process' write transaction, open
        done: list[int] = []
        poll = threading.Thread(target=lambda: done.append(Worker(harness.engine, harness.settings).run_once()))
        poll.start()
        poll.join(timeout=10)  # a poll that took the write lock would wait out the 30 s busy timeout
        assert done == [0]
        other.execute("COMMIT")
    finally:
        other.close()
    event = sub_event("active")
    harness.deliver(event)
    assert harness.drain() == 1
    engine.dispose()


def test_a_worker_woken_by_new_events_claims_them_without_looking_first(tmp_path: Path) -> None:
    """On SQLite an idle worker looks before it takes the write lock (above); woken by the inbox
    writer's commit of new events, it claims at once: the look would only cost a read."""
    settings = dataclasses.replace(make_settings(f"sqlite:///{tmp_path / 'kamiyo.db'}"), worker_poll_seconds=30.0)
    engine = make_engine(settings)
    upgrade(engine)
    harness = Harness(engine, settings)
    worker = Worker(engine, settings)
    looks: list[float] = []
    look = worker._anything_due

    def counted_look(now: float) -> bool:
        looks.append(now)
        return look(now)

    worker._anything_due = counted_look  # type: ignore[method-assign]
    stop, wake = threading.Event(), threading.Event()
    thread = threading.Thread(target=worker.run, args=(stop, wake))
    thread.start()
    try:
        assert _within(10, lambda: len(looks) == 1)  # idle: it looked, found nothing, and waits for a wake
        event = sub_event("active")
        harness.deliver(event)
        wake.set()  # what the inbox writer does after its commit
        assert _within(10, lambda: harness.event(event["id"])["status"] == "applied")
        assert len(looks) == 1  # claimed without a second look
    finally:
        stop.set()
        wake.set()
        thread.join(timeout=10)
        engine.dispose()
    assert not thread.is_alive()


def _within(seconds: float, condition: Any) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return bool(condition())
