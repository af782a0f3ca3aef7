"""A batch is applied as a whole (load, decide, flush); an event whose rule fails is undone alone.

The outcome of every event, the final state and the log lines are those of applying each event
on its own: a failing event is retried with backoff and never undoes its neighbours, and nothing
an undone attempt did is logged.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import re
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import select

from integration.test_worker import BASIC, ENTERPRISE, PRO, T, customer_event, invoice_event, sub_event
from kamiyo import synthetic
from kamiyo.db.models import customers_table, events_table, subscriptions_table, user_overrides_table, users_table
from kamiyo.domain import rules
from kamiyo.processing.worker import Worker


def _counting(monkeypatch: Any, calls: list[str], event_type: str, fail_ids: set[str] | None = None) -> None:
    """Wrap the handler of ``event_type``: note each call; raise for the event ids in ``fail_ids``."""
    real = rules.RULES[event_type]

    def rule(state: Any, event: Any) -> Any:
        calls.append(event.event_id)
        outcome = real(state, event)
        if fail_ids and event.event_id in fail_ids:
            raise RuntimeError("broken after writing")
        return outcome

    monkeypatch.setitem(rules.RULES, event_type, rule)


def _state(harness: Any) -> dict[str, Any]:
    with harness.engine.connect() as connection:
        users = connection.execute(
            select(users_table.c.email, users_table.c.subscription_tier, users_table.c.subscription_status)
        ).all()
        subs = connection.execute(
            select(
                subscriptions_table.c.id,
                subscriptions_table.c.customer_id,
                subscriptions_table.c.status,
                subscriptions_table.c.tier,
                subscriptions_table.c.version_created,
                subscriptions_table.c.version_rank,
                subscriptions_table.c.version_event_id,
            )
        ).all()
        links = connection.execute(
            select(customers_table.c.id, customers_table.c.email, customers_table.c.linked_by, users_table.c.email)
            .join_from(customers_table, users_table, customers_table.c.user_id == users_table.c.id, isouter=True)
            .order_by(customers_table.c.id)
        ).all()
    return {
        "users": sorted(tuple(r) for r in users),
        "subscriptions": sorted(tuple(r) for r in subs),
        "links": [tuple(r) for r in links],
    }


def test_a_failing_event_is_undone_alone_and_nothing_is_applied_or_logged_twice(
    harness: Any, monkeypatch: Any, caplog: Any
) -> None:
    """An event whose rule raises after changing the batch's state has its changes undone; the
    others apply, each rule runs once, the failed attempt is recorded and each change logged once."""
    calls: list[str] = []
    good_link = customer_event("ann@example.com")
    good_sub = sub_event("active")
    bad = sub_event("past_due", sub_id="sub_bad", at=T + 5, event_type="customer.subscription.paused")
    later = sub_event("active", sub_id="sub_2", price=ENTERPRISE, at=T + 6)
    _counting(monkeypatch, calls, "customer.subscription.updated")
    _counting(monkeypatch, calls, "customer.subscription.paused", fail_ids={bad["id"]})
    harness.deliver(good_link, good_sub, bad, later)

    with caplog.at_level(logging.INFO):
        assert Worker(harness.engine, harness.settings).run_once() == 4

    statuses = harness.statuses([good_link["id"], good_sub["id"], bad["id"], later["id"]])
    assert statuses == ["applied", "applied", "pending", "applied"]
    failed = harness.event(bad["id"])
    assert (failed["attempts"], failed["last_error"]) == (1, "RuntimeError: broken after writing")
    # Its snapshot was kept in the batch's state before it raised: undone, never written.
    assert harness.subscription("sub_bad") is None
    assert harness.tier_status("ann@example.com") == ("enterprise", "active")
    assert calls == [good_sub["id"], bad["id"], later["id"]]

    messages = [r.getMessage() for r in caplog.records]
    for event in (good_link, good_sub, later):
        assert sum(f"event applied event={event['id']} " in m for m in messages) == 1, event["id"]
    assert sum("customer linked customer=cus_1 " in m for m in messages) == 1
    assert sum(m.startswith("user state changed") for m in messages) == 2  # free -> pro, pro -> enterprise
    assert sum("failed, retry in" in m and bad["id"] in m for m in messages) == 1
    assert not any(f"event applied event={bad['id']} " in m for m in messages)


def test_two_failing_events_of_one_batch_are_both_retried_and_the_rest_applied(harness: Any, monkeypatch: Any) -> None:
    """The second failure only shows in the run with savepoints: it is contained there."""
    calls: list[str] = []
    first_bad = sub_event("active", sub_id="sub_x", event_type="customer.subscription.paused", at=T + 1)
    second_bad = sub_event("active", sub_id="sub_y", event_type="customer.subscription.paused", at=T + 2)
    _counting(monkeypatch, calls, "customer.subscription.paused", fail_ids={first_bad["id"], second_bad["id"]})
    link, good = customer_event("ann@example.com"), sub_event("trialing", at=T + 3)
    harness.deliver(link, first_bad, second_bad, good)
    assert Worker(harness.engine, harness.settings).run_once() == 4
    assert harness.statuses([link["id"], first_bad["id"], second_bad["id"], good["id"]]) == [
        "applied",
        "pending",
        "pending",
        "applied",
    ]
    assert calls == [first_bad["id"], second_bad["id"]]
    assert harness.subscription("sub_x") is None
    assert harness.subscription("sub_y") is None
    assert harness.tier_status("ann@example.com") == ("pro", "trialing")


def _history() -> list[dict[str, Any]]:
    """Two customers of one person (one email) with a subscription each, through their lifecycle,
    same-second ties included, invoices naming the email, an event type not handled."""
    return [
        sub_event("incomplete", event_type="customer.subscription.created", at=T, price=BASIC),
        sub_event("active", at=T, price=BASIC),
        invoice_event("Ann@Example.com", at=T + 1),
        sub_event("active", at=T + 10, price=PRO),
        sub_event("past_due", at=T + 20, price=PRO),
        invoice_event("ann@example.com", event_type="invoice.payment_failed", at=T + 20),
        sub_event("trialing", sub_id="sub_b", customer_id="cus_2", at=T + 21, price=ENTERPRISE),
        customer_event("ann@example.com", customer_id="cus_2", at=T + 22),
        sub_event("active", at=T + 30, price=PRO),
        sub_event("canceled", sub_id="sub_b", customer_id="cus_2", at=T + 40, price=ENTERPRISE),
        sub_event("active", sub_id="sub_b", customer_id="cus_2", at=T + 41, price=ENTERPRISE),  # never revives
        sub_event("unpaid", at=T + 60, price=PRO),
        synthetic.event("charge.refunded", {"id": "ch_1", "customer": "cus_1"}, created=T + 61),
    ]


@pytest.mark.parametrize("seed", range(6))
def test_one_shuffled_batch_of_a_users_history_ends_as_applying_it_in_order(harness: Any, seed: int) -> None:
    """Several events of one subscription and of one user, in any order in a single batch, give the
    state that applying them one at a time in order gives."""
    history = _history()
    harness.reset()
    for event in history:
        harness.apply(event)
    expected = _state(harness)
    assert expected["users"] == [("ann@example.com", "free", "canceled")]

    shuffled = list(history)
    random.Random(seed).shuffle(shuffled)
    shuffled.insert(random.Random(seed + 100).randrange(len(shuffled)), shuffled[0])  # a redelivery
    harness.reset()
    harness.deliver(*shuffled)
    assert Worker(harness.engine, harness.settings).run_once() == len(history)
    assert _state(harness) == expected
    statuses = harness.statuses(event["id"] for event in history)
    assert statuses == ["applied"] * (len(history) - 1) + ["ignored"]


@pytest.mark.parametrize("seed", range(4))
def test_one_batch_gives_what_one_event_per_batch_gives_in_the_same_order(harness: Any, seed: int) -> None:
    """Order-dependent rules too (the first email seen links a customer; a newer email replaces an
    older one): a whole shuffled history in one batch ends exactly as the same order one at a time."""
    history = [
        *_history(),
        customer_event("ann.new@example.com", customer_id="cus_1", at=T + 50, event_type="customer.updated"),
        customer_event("bob@example.com", customer_id="cus_3", at=T + 51),
        sub_event("active", sub_id="sub_c", customer_id="cus_3", at=T + 52, price=BASIC),
        invoice_event("carol@example.com", customer_id="cus_3", at=T + 53),
    ]
    random.Random(seed).shuffle(history)
    harness.reset()
    for event in history:
        harness.apply(event)
    expected = _state(harness)

    harness.reset()
    harness.deliver(*history)
    assert Worker(harness.engine, harness.settings).run_once() == len(history)
    assert _state(harness) == expected


def test_a_failure_in_a_shuffled_batch_still_converges_once_retried(harness: Any, monkeypatch: Any) -> None:
    """One event failing once in the middle of the batch: after its retry the state is the in-order one."""
    history = _history()
    harness.reset()
    for event in history:
        harness.apply(event)
    expected = _state(harness)

    shuffled = list(history)
    random.Random(7).shuffle(shuffled)
    victim = next(e for e in shuffled[3:] if e["type"] == "customer.subscription.updated")
    failures: list[str] = []
    real = rules.RULES["customer.subscription.updated"]

    def once(state: Any, event: Any) -> Any:
        outcome = real(state, event)
        if event.event_id == victim["id"] and not failures:
            failures.append(event.event_id)
            raise RuntimeError("temporary trouble")
        return outcome

    monkeypatch.setitem(rules.RULES, "customer.subscription.updated", once)
    harness.reset()
    harness.deliver(*shuffled)
    worker = Worker(harness.engine, harness.settings)
    assert worker.run_once() == len(history)
    assert harness.event(victim["id"])["status"] == "pending"
    assert worker.run_once(now=harness.event(victim["id"])["available_at"]) == 1
    assert harness.event(victim["id"])["attempts"] == 2
    assert _state(harness) == expected


def test_the_claim_takes_the_oldest_due_events_whatever_their_backoff(harness: Any) -> None:
    """New (available_at 0), replayed, and due-after-backoff events are claimed in inbox order, a
    batch at a time; events not due yet and parked ones are left alone."""
    events = [customer_event(f"user{n}@example.com", customer_id=f"cus_{n}") for n in range(8)]
    harness.deliver(*events)
    available = [0.0, 500.0, -5.0, 50.0, 0.0, 100.0, 0.0, 100.5]
    parked = {4}
    with harness.engine.begin() as connection:
        for n, event in enumerate(events):
            connection.execute(
                events_table.update()
                .where(events_table.c.stripe_event_id == event["id"])
                .values(available_at=available[n], status="failed" if n in parked else "pending")
            )
    worker = Worker(harness.engine, dataclasses.replace(harness.settings, worker_batch_size=3))
    order: list[list[str]] = []
    for _ in range(4):
        before = set(_applied(harness, events))
        worker.run_once(now=100.0)
        order.append(sorted(set(_applied(harness, events)) - before))
    ids = [event["id"] for event in events]
    assert order == [sorted([ids[0], ids[2], ids[3]]), sorted([ids[5], ids[6]]), [], []]
    assert harness.statuses(ids) == [
        "applied",
        "pending",
        "applied",
        "applied",
        "failed",
        "applied",
        "applied",
        "pending",
    ]


def _applied(harness: Any, events: list[dict[str, Any]]) -> list[str]:
    return [event["id"] for event in events if harness.event(event["id"])["status"] == "applied"]


# -- a batch applies each event exactly as a batch of its own would ---------------------------

_EMAILS = ["ann@example.com", "Bob@Example.com", "carol@example.com", "dave@example.com"]
_CUSTOMERS = ["cus_1", "cus_2", "cus_3"]
_SUB_TYPES = [name for name in synthetic.SUPPORTED_TRIGGERS if name.startswith("customer.subscription.")]
_STATUSES = ["incomplete", "trialing", "active", "past_due", "unpaid", "paused", "canceled"]


@st.composite
def _mixed_histories(draw: st.DrawFn) -> tuple[list[dict[str, Any]], set[str]]:
    """Events of three customers and four people in any order: subscriptions (one may change
    customer), invoices and customer events naming emails, checkouts that move a customer to a
    named user; and the ids of the events whose handler fails after writing."""
    events: list[dict[str, Any]] = []
    failing: set[str] = set()
    for n in range(draw(st.integers(1, 24))):
        at = T + draw(st.integers(0, 40))
        customer_id = draw(st.sampled_from(_CUSTOMERS))
        email = draw(st.sampled_from([*_EMAILS, None]))
        kind = draw(st.sampled_from(["subscription", "subscription", "invoice", "customer", "checkout"]))
        event_id = f"evt_mixed{n:03d}"
        if kind == "subscription":
            obj = synthetic.subscription(
                sub_id=draw(st.sampled_from(["sub_1", "sub_2", "sub_3"])),
                customer_id=customer_id,
                status=draw(st.sampled_from(_STATUSES)),
                price_obj=draw(st.sampled_from([BASIC, PRO, ENTERPRISE])),
                created=T - 100,
                api_version=synthetic.LATEST_API_VERSION,
            )
            event = synthetic.event(draw(st.sampled_from(_SUB_TYPES)), obj, created=at, event_id=event_id)
            if draw(st.integers(0, 9)) == 0:
                failing.add(event_id)
        elif kind == "invoice":
            obj = synthetic.invoice(
                customer_id=customer_id,
                sub_id="sub_1",
                email=email,
                paid=True,
                api_version=synthetic.LATEST_API_VERSION,
                created=at,
            )
            event = synthetic.event("invoice.paid", obj, created=at, event_id=event_id)
        elif kind == "customer":
            obj = synthetic.customer(customer_id=customer_id, email=email, created=at)
            event = synthetic.event(
                draw(st.sampled_from(["customer.created", "customer.updated"])), obj, created=at, event_id=event_id
            )
        else:
            obj = synthetic.checkout_session(
                customer_id=customer_id,
                sub_id="sub_1",
                email=email or _EMAILS[0],
                client_reference_id=draw(st.sampled_from([*_EMAILS, None])),
            )
            event = synthetic.event("checkout.session.completed", obj, created=at, event_id=event_id)
        events.append(event)
    return events, failing


def _customer_of(event: dict[str, Any]) -> str:
    obj = event["data"]["object"]
    return str(obj["id"] if event["type"].startswith("customer.") and obj["object"] == "customer" else obj["customer"])


def _people_with_overrides(harness: Any) -> None:
    """Carol has an override in force, Dave one that has expired (not yet swept)."""
    now = datetime.now(UTC)
    for email, expires in (
        ("carol@example.com", now + timedelta(days=1)),
        ("dave@example.com", now - timedelta(days=1)),
    ):
        user_id = harness.add_user(email, tier="basic", status="active")
        with harness.engine.begin() as connection:
            connection.execute(
                user_overrides_table.insert().values(
                    user_id=user_id, tier="enterprise", reason="test", set_by="test", set_at=now, expires_at=expires
                )
            )


def _outcome(harness: Any, events: list[dict[str, Any]], records: list[logging.LogRecord]) -> dict[str, Any]:
    """The state, each event's stored outcome and the log lines, user ids given as emails (PostgreSQL's
    ids go on counting across resets) and the retry delay (random) left out."""
    with harness.engine.connect() as connection:
        emails = {int(i): str(e) for i, e in connection.execute(select(users_table.c.id, users_table.c.email))}

    def named(text: str | None) -> str | None:
        if text is None:
            return None
        text = re.sub(r"(user_id=|user )(\d+)", lambda m: m.group(1) + emails.get(int(m.group(2)), "?"), text)
        return re.sub(r"retry in \d+s", "retry in ...", text)

    outcomes = []
    for event in events:
        row = harness.event(event["id"])
        outcomes.append((row["status"], row["attempts"], named(row["detail"]), named(row["last_error"])))
    lines = [
        named(r.getMessage())
        for r in records
        if r.name in ("kamiyo.state", "kamiyo.worker") and not r.getMessage().startswith("an event of the batch")
    ]
    return {**_state(harness), "events": outcomes, "log": lines}


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)
@given(history=_mixed_histories())
def test_a_batch_applies_each_event_as_a_batch_of_its_own_would(
    harness: Any, monkeypatch: Any, caplog: Any, history: tuple[list[dict[str, Any]], set[str]]
) -> None:
    """What a batch reads once and keeps (SQLite) gives every event the detail, log lines and effect
    that applying it alone gives, and the same final state: links that change hands, overrides in
    force and expired, a subscription that changes customer, failures after writing."""
    events, failing = history
    one_by_one, batch = _applied_one_by_one_and_in_one_batch(harness, monkeypatch, caplog, events, failing)
    assert batch == one_by_one


def test_a_subscription_that_changes_customer_within_a_batch_leaves_its_old_user(
    harness: Any, monkeypatch: Any, caplog: Any
) -> None:
    """Ann's subscriptions, kept by the batch, lose the one that moves to Bob's customer. (On
    PostgreSQL the batch runs Bob's customer first, the lock order: the result is the same.)"""
    events = [
        customer_event("ann@example.com", customer_id="cus_b"),
        customer_event("bob@example.com", customer_id="cus_a"),
        sub_event("active", sub_id="sub_1", customer_id="cus_b", price=ENTERPRISE, at=T + 1),
        sub_event("active", sub_id="sub_1", customer_id="cus_a", price=PRO, at=T + 2),
        sub_event("past_due", sub_id="sub_2", customer_id="cus_b", price=BASIC, at=T + 3),
    ]
    one_by_one, batch = _applied_one_by_one_and_in_one_batch(harness, monkeypatch, caplog, events, set())
    assert batch == one_by_one
    assert batch["users"][:2] == [("ann@example.com", "basic", "past_due"), ("bob@example.com", "pro", "active")]


def _applied_one_by_one_and_in_one_batch(
    harness: Any, monkeypatch: Any, caplog: Any, events: list[dict[str, Any]], failing: set[str]
) -> list[dict[str, Any]]:
    """``_outcome`` of applying ``events`` one per batch, then of applying them in a single batch,
    each time from the same start; the handlers of ``failing`` raise after writing."""
    if harness.engine.dialect.name == "postgresql":
        # A batch there applies its events customer by customer (the lock order): so do both runs.
        events = sorted(events, key=_customer_of)
    caplog.set_level(logging.INFO)
    results = []
    with monkeypatch.context() as patch:  # undone after each example: hypothesis runs many in one test
        for event_type in _SUB_TYPES:
            _counting(patch, [], event_type, fail_ids=failing)
        # A failed attempt is retried an hour later: each run applies every event once.
        for batch_size in (1, len(events)):
            harness.reset()
            _people_with_overrides(harness)
            harness.deliver(*events)
            caplog.clear()
            one_or_all = dataclasses.replace(harness.settings, worker_batch_size=batch_size, retry_base_seconds=3600.0)
            worker = Worker(harness.engine, one_or_all)
            assert sum(worker.run_once() for _ in range(len(events) // batch_size)) == len(events)
            results.append(_outcome(harness, events, caplog.records))
    return results
