"""Any arrival order and any duplication of a customer's event history converge on the in-order result."""

from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass, field
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import select

from kamiyo import synthetic
from kamiyo.db.models import customers_table, subscriptions_table, users_table
from kamiyo.domain.subscriptions import TERMINAL_STATUSES, version_for
from kamiyo.processing.worker import Worker

START = 1_700_000_000
# Each price with the tier that support.PRICE_TIERS (or the price's metadata) gives it.
PRICES = [
    (synthetic.price("price_basic"), "basic"),
    (synthetic.price("price_pro_monthly"), "pro"),
    (synthetic.price("price_ent_2024", lookup_key="ent_yearly"), "enterprise"),
    (synthetic.price("price_gold", tier="gold"), "gold"),
]
# Where a subscription can go next, and the event Stripe sends for it.
NEXT: dict[str, list[tuple[str, str]]] = {
    "incomplete": [("active", "updated"), ("incomplete_expired", "updated")],
    "trialing": [
        ("trialing", "trial_will_end"),
        ("active", "updated"),
        ("past_due", "updated"),
        ("paused", "paused"),
        ("canceled", "deleted"),
    ],
    "active": [("active", "updated"), ("past_due", "updated"), ("canceled", "deleted")],
    "past_due": [("active", "updated"), ("unpaid", "updated"), ("canceled", "deleted")],
    "unpaid": [("active", "updated"), ("canceled", "deleted")],
    "paused": [("active", "resumed"), ("canceled", "deleted")],
}
_EMAIL_EVENTS = [
    "customer.created",
    "customer.updated",
    "invoice.paid",
    "invoice.payment_succeeded",
    "invoice.payment_failed",
]


@dataclass
class _Sub:
    id: str
    customer_id: str
    created: int
    api_version: str
    status: str | None = None
    last_key: Any = None  # version key of its latest event, to keep same-second ties in rule order


@dataclass
class History:
    events: list[dict[str, Any]] = field(default_factory=list)
    # The last snapshot of each subscription in history order: what applying it in order must leave.
    last: dict[str, tuple[str, str, str]] = field(default_factory=dict)

    def __repr__(self) -> str:  # what hypothesis prints for a failing example
        lines = [
            f"{e['created']} {e['id']} {e['type']} "
            f"{e['data']['object'].get('status') or e['data']['object'].get('email') or ''}"
            for e in self.events
        ]
        return "History(\n  " + "\n  ".join(lines) + "\n)"


@st.composite
def histories(draw: st.DrawFn) -> History:
    """One or two customers, each with one or two subscriptions walking a realistic lifecycle,
    and email-bearing customer / invoice events; ``created`` never decreases, and two events of
    one subscription share a second only when the documented tie rule orders them as they happened."""
    n_customers = draw(st.integers(1, 2))
    shared_email = n_customers == 2 and draw(st.booleans())
    customers = [f"cus_{c}" for c in "AB"[:n_customers]]
    emails = {
        cus: draw(st.sampled_from(["ann@example.com", "Ann@Example.com", "ANN@EXAMPLE.COM"]))
        if shared_email or cus == "cus_A"
        else draw(st.sampled_from(["bob@example.com", "Bob@Example.com"]))
        for cus in customers
    }
    subs = [
        _Sub(
            f"sub_{cus[-1]}{n}",
            cus,
            START + n,
            draw(st.sampled_from([synthetic.LEGACY_API_VERSION, synthetic.LATEST_API_VERSION])),
        )
        for cus in customers
        for n in range(draw(st.integers(1, 2)))
    ]

    history = History()
    seed = draw(st.integers(0, 2**32))
    clock = START + 100
    for _ in range(draw(st.integers(2, 14))):
        clock += draw(st.sampled_from([0, 0, 1, 2, 30]))
        # Stripe's ids carry no order: a hash prefix (pseudo-random even for seed 0), unique by position.
        position = len(history.events)
        event_id = f"evt_{hashlib.sha256(f'{seed}/{position}'.encode()).hexdigest()[:8]}{position:03d}"
        open_subs = [s for s in subs if s.status not in TERMINAL_STATUSES]
        if open_subs and draw(st.integers(0, 3)) > 0:
            sub = draw(st.sampled_from(open_subs))
            if sub.status is None:
                status, kind = draw(st.sampled_from(["incomplete", "trialing", "active"])), "created"
            else:
                status, kind = draw(st.sampled_from(NEXT[sub.status]))
            event_type = f"customer.subscription.{kind}"
            key = version_for(status, clock, event_type, event_id)
            if sub.last_key is not None and key <= sub.last_key:
                clock += 1  # this tie would be ordered against history by the rule: not a real history
                key = version_for(status, clock, event_type, event_id)
            sub.status, sub.last_key = status, key
            price, tier = draw(st.sampled_from(PRICES))
            history.last[sub.id] = (sub.id, status, tier)
            obj = synthetic.subscription(
                sub_id=sub.id,
                customer_id=sub.customer_id,
                status=status,
                price_obj=price,
                created=sub.created,
                api_version=sub.api_version,
            )
            event = synthetic.event(event_type, obj, created=clock, event_id=event_id, api_version=sub.api_version)
        else:
            cus = draw(st.sampled_from(customers))
            event_type = draw(st.sampled_from(_EMAIL_EVENTS))
            if event_type.startswith("customer."):
                obj = synthetic.customer(customer_id=cus, email=emails[cus], created=clock)
            else:
                sub = draw(st.sampled_from([s for s in subs if s.customer_id == cus]))
                obj = synthetic.invoice(
                    customer_id=cus,
                    sub_id=sub.id,
                    email=emails[cus],
                    paid=event_type != "invoice.payment_failed",
                    api_version=sub.api_version,
                    created=clock,
                )
            event = synthetic.event(event_type, obj, created=clock, event_id=event_id)
        history.events.append(event)
    return history


@st.composite
def deliveries(draw: st.DrawFn, history: History) -> list[tuple[dict[str, Any], bool]]:
    """Any permutation of the history with any duplication: the same event again (Stripe retrying)
    or a distinct Event object for the same change (a new id, same ``created`` and object).
    Each delivery says whether the worker runs right after it."""
    order = shuffled_with_copies(draw, history.events)
    return [(event, draw(st.booleans())) for event in order]


def shuffled_with_copies(draw: st.DrawFn, events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``events`` in any order, each up to twice more: the same event again (Stripe retrying) or a
    twin under a new id (a distinct Event object for the same change)."""
    pool = []
    for event in events:
        pool.append(event)
        for copy_number in range(draw(st.integers(0, 2))):
            if draw(st.booleans()):
                pool.append(event)
            else:
                twin = copy.deepcopy(event)
                twin["id"] = f"{event['id']}_twin{copy_number}"
                pool.append(twin)
    return draw(st.permutations(pool))


def _apply(harness: Any, schedule: list[tuple[dict[str, Any], bool]]) -> dict[str, Any]:
    """Empty the database, deliver in ``schedule`` order (running the worker where it says), drain, read back."""
    harness.reset()
    engine = harness.engine
    worker = Worker(engine, harness.settings)
    for event, run_worker in schedule:
        harness.deliver(event)
        if run_worker:
            worker.run_once()
    harness.drain()
    with engine.connect() as connection:
        users = connection.execute(
            select(users_table.c.email, users_table.c.subscription_tier, users_table.c.subscription_status)
        ).all()
        subs = connection.execute(
            select(subscriptions_table.c.id, subscriptions_table.c.status, subscriptions_table.c.tier)
        ).all()
        links = connection.execute(
            select(customers_table.c.id, users_table.c.email).join_from(
                customers_table, users_table, customers_table.c.user_id == users_table.c.id, isouter=True
            )
        ).all()
    return {
        "users": sorted(tuple(r) for r in users),
        "subscriptions": sorted(tuple(r) for r in subs),
        "links": sorted((r[0], r[1] or "") for r in links),
    }


def test_any_order_and_duplication_of_deliveries_converges_to_the_in_order_state(harness: Any) -> None:
    """users.subscription_tier/status, customer links and each subscription's status/tier end the same
    as when the history is applied in order, for any permutation and duplication of its deliveries."""
    examples = 70 if harness.engine.dialect.name == "sqlite" else 25

    @settings(
        max_examples=examples,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @given(data=st.data())
    def check(data: st.DataObject) -> None:
        history = data.draw(histories(), label="history")
        schedule = data.draw(deliveries(history), label="deliveries")
        expected = _apply(harness, [(event, True) for event in history.events])
        # In order, every snapshot is newer than the stored one (the tie rule agrees with history).
        assert expected["subscriptions"] == sorted(history.last.values())
        assert _apply(harness, schedule) == expected

    check()
