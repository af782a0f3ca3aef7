"""What the operator console reads (web/admin_queries.py), on SQLite and on PostgreSQL."""

from __future__ import annotations

import time
from typing import Any

import orjson

from kamiyo import synthetic
from kamiyo.domain.outcomes import CustomerOutcome, LinkResult, Outcome, SubscriptionOutcome, UserChange
from kamiyo.scrub import REDACTED
from kamiyo.telemetry.delivery_stats import add_delivery_counts, minute_of
from kamiyo.web.admin_queries import (
    count_by,
    delivery,
    delivery_chart,
    event_types,
    recent_deliveries,
)
from support import record_outcome


def _customer(email: str, customer_id: str) -> dict[str, Any]:
    return synthetic.event("customer.created", synthetic.customer(customer_id=customer_id, email=email))


def _subscription(customer_id: str, price_id: str = "price_pro_monthly") -> dict[str, Any]:
    sub = synthetic.subscription(
        sub_id=synthetic.new_id("sub"), customer_id=customer_id, price_obj=synthetic.price(price_id)
    )
    return synthetic.event("customer.subscription.updated", sub)


def _event_ids(entries: list[dict[str, Any]]) -> list[str]:
    return [e["event_id"] for e in entries if e["kind"] == "event"]


def test_recent_deliveries_are_newest_first_and_filter_by_status_and_type(harness: Any) -> None:
    ann, sub, bad = _customer("ann@example.com", "cus_a"), _subscription("cus_a"), _subscription("cus_a", "price_x")
    harness.apply(ann, sub, bad)
    assert _event_ids(recent_deliveries(harness.engine)) == [bad["id"], sub["id"], ann["id"]]
    assert _event_ids(recent_deliveries(harness.engine, status="failed")) == [bad["id"]]
    assert _event_ids(recent_deliveries(harness.engine, event_type="customer.created")) == [ann["id"]]
    assert _event_ids(recent_deliveries(harness.engine, limit=1)) == [bad["id"]]
    assert event_types(harness.engine) == ["customer.created", "customer.subscription.updated"]


def test_the_type_filter_lists_the_types_of_pending_events_too(harness: Any) -> None:
    """The type index leaves out pending events; the list of types must not."""
    harness.apply(_customer("pat@example.com", "cus_p"))
    harness.deliver(_subscription("cus_p"))  # stored, not applied yet
    assert event_types(harness.engine) == ["customer.created", "customer.subscription.updated"]


def test_the_customer_filter_takes_a_customer_id_or_an_email_and_matches_the_customer_the_event_names(
    harness: Any,
) -> None:
    ann, bob = _customer("ann@example.com", "cus_a"), _customer("bob@example.com", "cus_ab")
    ann_sub, bob_sub = _subscription("cus_a"), _subscription("cus_ab")
    harness.apply(ann, bob, ann_sub, bob_sub)
    assert _event_ids(recent_deliveries(harness.engine, customer="cus_a")) == [ann_sub["id"], ann["id"]]
    assert _event_ids(recent_deliveries(harness.engine, customer="Bob@Example.com")) == [bob_sub["id"], bob["id"]]
    assert recent_deliveries(harness.engine, customer="cus_") == []  # no substring matches
    assert recent_deliveries(harness.engine, customer="cus_%") == []  # no LIKE wildcards
    assert recent_deliveries(harness.engine, customer="nobody@example.com") == []
    assert recent_deliveries(harness.engine, customer="cus_a")[0]["customer"] == "cus_a"


def test_duplicate_and_rejected_deliveries_come_from_the_per_minute_counts(harness: Any) -> None:
    harness.apply(_customer("ann@example.com", "cus_a"))
    now = time.time()
    with harness.engine.begin() as connection:
        add_delivery_counts(
            connection,
            {
                (minute_of(now), "duplicate", "", "customer.created"): 3,
                (minute_of(now), "rejected", "invalid_signature", ""): 2,
                (minute_of(now), "accepted", "", "customer.created"): 1,
                (minute_of(now - 2 * 86400), "duplicate", "", "customer.created"): 5,  # too old to list
            },
        )
    entries = recent_deliveries(harness.engine, now=now)
    assert count_by(entries) == {
        "applied": 1,
        "pending": 0,
        "failed": 0,
        "ignored": 0,
        "duplicate": 3,
        "rejected": 2,
    }
    [rejected] = recent_deliveries(harness.engine, status="rejected", now=now)
    assert (rejected["reason"], rejected["count"], rejected["type"]) == ("invalid_signature", 2, None)
    assert recent_deliveries(harness.engine, status="duplicate", event_type="invoice.paid", now=now) == []
    assert all(e["kind"] == "event" for e in recent_deliveries(harness.engine, customer="cus_a", now=now))


def test_one_delivery_has_its_error_and_a_redacted_indented_payload(harness: Any) -> None:
    intent = synthetic.payment_intent(customer_id="cus_a", email="ann@example.com")
    intent["client_secret"] = "pi_123_secret_456"
    intent["metadata"] = {"note": "key sk_live_abcdef123 pasted by mistake"}
    event = synthetic.event("payment_intent.succeeded", intent)
    bad = _subscription("cus_a", "price_nope")
    harness.apply(event, bad)

    shown = delivery(harness.engine, event["id"])
    assert shown is not None
    payload = orjson.loads(shown["payload"])
    assert payload["data"]["object"]["client_secret"] == REDACTED
    assert payload["data"]["object"]["metadata"]["note"] == f"key {REDACTED} pasted by mistake"
    assert payload["data"]["object"]["receipt_email"] == "ann@example.com"
    assert "\n  " in shown["payload"]
    failed = delivery(harness.engine, bad["id"])
    assert failed is not None
    assert failed["mark"] == "failed"
    assert "price_nope" in failed["error"]
    assert delivery(harness.engine, "evt_missing") is None


def test_one_delivery_has_its_outcome_as_data_scrubbed_or_none_before_outcomes_were_recorded(harness: Any) -> None:
    ann, sub = _customer("ann@example.com", "cus_a"), _subscription("cus_a")
    harness.apply(ann, sub)
    outcome = Outcome(
        subscription=SubscriptionOutcome(sub["data"]["object"]["id"], "active", "pro", stored=True),
        customer=CustomerOutcome("cus_a", LinkResult.ALREADY_LINKED, user_id=7),
        users=(UserChange(7, "ann@example.com", "free", "pro", None, "active", "subscription active"),),
        note="support pasted sk_live_abcdef123 here",
    )
    record_outcome(harness.engine, sub["id"], outcome, outcome.describe())
    record_outcome(harness.engine, ann["id"], None, "customer cus_a linked to user 7 by email")

    shown = delivery(harness.engine, sub["id"])
    assert shown is not None
    expected = outcome.to_json()
    expected["note"] = f"support pasted {REDACTED} here"
    assert shown["outcome"] == expected
    assert shown["outcome"]["users"][0]["status_from"] is None
    assert REDACTED in shown["detail"]
    before = delivery(harness.engine, ann["id"])
    assert before is not None
    assert (before["outcome"], before["detail"]) == (None, "customer cus_a linked to user 7 by email")


def test_the_chart_buckets_deliveries_and_failures_of_the_last_24_hours(harness: Any) -> None:
    harness.apply(_customer("ann@example.com", "cus_a"), _subscription("cus_a", "price_nope"))
    now = time.time()
    with harness.engine.begin() as connection:
        add_delivery_counts(
            connection,
            {
                (minute_of(now), "rejected", "invalid_signature", ""): 4,
                (minute_of(now - 3 * 3600), "duplicate", "", "customer.created"): 2,
                (minute_of(now - 25 * 3600), "rejected", "invalid_signature", ""): 9,  # outside
            },
        )
    chart = delivery_chart(harness.engine, now=now)
    assert len(chart["buckets"]) == 96
    assert chart["totals"] == {"received": 2, "duplicate": 2, "rejected": 4, "failed": 1}
    assert chart["series"]["received"][-1] == 2
    assert chart["series"]["rejected"][-1] == 4
    assert chart["series"]["duplicate"][-1 - 12] == 2  # three hours of 15-minute buckets back
