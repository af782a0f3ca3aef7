"""The worker, with one or several workers on either database, leaves exactly the state the reference
model (tests/model.py) derives from the events, whatever their order and duplication."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select

import model
from integration.test_convergence import (
    NEXT,  # where a subscription can go next, and the event Stripe sends for it
    shuffled_with_copies,
)
from kamiyo import synthetic
from kamiyo.config import Settings
from kamiyo.db.models import customers_table, events_table, subscriptions_table, users_table
from kamiyo.operations.overrides import set_override
from kamiyo.processing.worker import Worker

START = 1_700_000_000
ADDRESSES = ["ann@example.com", "bob@example.com", "cy@example.com"]
# A client_reference_id that names no user: an id nobody has, an address nobody uses, neither.
UNKNOWN_REFS = ["999999999", "nobody@example.com", "order-77"]
PRICES = [
    synthetic.price("price_basic"),
    synthetic.price("price_pro_monthly"),
    synthetic.price("price_ent_2024", lookup_key="ent_yearly"),
    synthetic.price("price_gold", tier="gold"),  # a tier only the price's metadata names
]
SEATS = synthetic.price("price_seats")  # an add-on that maps to no tier
LATE = [("active", "updated"), ("past_due", "updated"), ("canceled", "deleted")]
OTHER_EVENTS = [
    "customer.created",
    "customer.updated",
    "checkout.session.completed",
    "invoice.paid",
    "invoice.payment_succeeded",
    "invoice.payment_failed",
    "payment_intent.succeeded",
    "charge.refunded",  # not handled: stored as ignored
]
# Placeholders for a seeded user's id (known once the user is inserted) and address (spelt any way).
_REF_ID = "ref-id:"
_REF_EMAIL = "ref-email:"


@dataclass
class Scenario:
    """The users that exist before the events, and the events in the order they happened."""

    users: list[model.SeededUser]  # ids are positions until seeded
    events: list[dict[str, Any]] = field(default_factory=list)


def _spelling(draw: st.DrawFn, address: str | None) -> str | None:
    if address is None:
        return None
    return draw(st.sampled_from([address, address.upper(), address.capitalize(), f" {address.title()} "]))


@st.composite
def scenarios(draw: st.DrawFn, *, one_address: bool = False) -> Scenario:
    """Up to three users that exist beforehand (some with an override or a tier set by hand), two to
    three customers (up to five when ``one_address``: all of them then name the same address) each
    naming one address or none and at most one checkout ``client_reference_id``, up to two
    subscriptions per customer walking a realistic lifecycle (now and then a late snapshot after
    the end), and events of other types that name a customer; ``created`` never decreases."""
    seeded_emails = draw(st.lists(st.sampled_from(ADDRESSES), unique=True, max_size=3))
    customers = [f"cus_{c}" for c in "ABCDE"[: draw(st.integers(2, 5 if one_address else 3))]]
    # Mostly the same address: the customers of one user are where the rules interact.
    addresses = [ADDRESSES[0]] if one_address else [ADDRESSES[0], ADDRESSES[0], ADDRESSES[1], None]
    email_of = {cus: draw(st.sampled_from(addresses)) for cus in customers}
    ref_of: dict[str, str | None] = {}
    moved_from: set[str] = set()
    for cus in customers:
        ref = draw(st.sampled_from([None, None, *UNKNOWN_REFS]))
        # A reference to an existing user only where the rules make the outcome order-independent
        # (tests/model.py, expected_state): the customer's own address, if any, belongs to a seeded user.
        if seeded_emails and (email_of[cus] is None or email_of[cus] in seeded_emails) and draw(st.booleans()):
            target = draw(st.sampled_from(seeded_emails))
            ref = draw(st.sampled_from([f"{_REF_ID}{target}", f"{_REF_EMAIL}{target}"]))
            if email_of[cus] is not None and email_of[cus] != target:
                moved_from.add(email_of[cus])
        ref_of[cus] = ref
    users = []
    for n, email in enumerate(seeded_emails):
        # An override decides its user alone: one user in four has one.
        override = draw(st.sampled_from(["free", "basic", "enterprise"])) if draw(st.integers(0, 3)) == 0 else None
        tier, status = draw(st.sampled_from([("free", None), ("free", None), ("pro", "active")]))
        if email in moved_from:
            tier, status = "free", None
        users.append(model.SeededUser(n, email, tier, status, override))

    subs = [
        {"id": f"sub_{cus[-1]}{n}", "customer": cus, "created": START + n, "status": None}
        for cus in customers
        for n in range(draw(st.sampled_from([0, 1, 1, 2])))
    ]
    api_version = {
        s["id"]: draw(st.sampled_from([synthetic.LEGACY_API_VERSION, synthetic.LATEST_API_VERSION])) for s in subs
    }
    scenario = Scenario(users)
    seed = draw(st.integers(0, 2**32))
    clock = START + 100
    for position in range(draw(st.integers(4, 32))):
        clock += draw(st.sampled_from([0, 0, 1, 2, 30]))
        # Stripe's ids carry no order: a hash prefix, unique by position.
        event_id = f"evt_{hashlib.sha256(f'{seed}/{position}'.encode()).hexdigest()[:8]}{position:03d}"
        if subs and draw(st.booleans()):
            sub = draw(st.sampled_from(subs))
            if sub["status"] is None:
                status, kind = draw(st.sampled_from(["incomplete", "trialing", "active"])), "created"
            elif sub["status"] in model.TERMINAL:
                # A snapshot sent after the end (a late update): the end must still win.
                status, kind = draw(st.sampled_from(LATE))
            else:
                # Twice as likely to stay open as to end: the user's other subscriptions matter longer.
                ongoing = [step for step in NEXT[sub["status"]] if step[0] not in model.TERMINAL]
                status, kind = draw(st.sampled_from(NEXT[sub["status"]] + ongoing))
            if sub["status"] not in model.TERMINAL:
                sub["status"] = status
            extra = draw(st.sampled_from([(), (), (SEATS,), (SEATS, *PRICES[:1]), tuple(PRICES[2:3])]))
            obj = synthetic.subscription(
                sub_id=sub["id"],
                customer_id=sub["customer"],
                status=status,
                # Mostly the pro price (tier ties between a user's subscriptions), now and then another.
                price_obj=PRICES[1] if draw(st.booleans()) else draw(st.sampled_from(PRICES)),
                extra_prices=extra,
                created=sub["created"],
                api_version=api_version[sub["id"]],
            )
            event = synthetic.event(
                f"customer.subscription.{kind}",
                obj,
                created=clock,
                event_id=event_id,
                api_version=api_version[sub["id"]],
            )
        else:
            cus = draw(st.sampled_from(customers))
            event = synthetic.event(draw(st.sampled_from(OTHER_EVENTS)), {}, created=clock, event_id=event_id)
            event["data"]["object"] = _object_naming(draw, event["type"], cus, email_of[cus], ref_of[cus], clock)
        scenario.events.append(event)
    return scenario


def _object_naming(
    draw: st.DrawFn, event_type: str, cus: str, email: str | None, ref: str | None, clock: int
) -> dict[str, Any]:
    """The object of a non-subscription event about customer ``cus``, spelling its address any way."""
    address = _spelling(draw, email)
    if event_type.startswith("customer."):
        return synthetic.customer(customer_id=cus, email=address, created=clock)
    if event_type == "checkout.session.completed":
        obj = synthetic.checkout_session(customer_id=cus, sub_id=f"sub_{cus[-1]}0", email=address)
        if ref is not None and ref.startswith(_REF_EMAIL):
            ref = _spelling(draw, ref.removeprefix(_REF_EMAIL))
        obj["client_reference_id"] = ref
        obj["id"] = f"cs_{clock}_{cus}"
        return obj
    if event_type.startswith("invoice."):
        obj = synthetic.invoice(
            customer_id=cus,
            sub_id=f"sub_{cus[-1]}0",
            email=address,
            paid=event_type != "invoice.payment_failed",
            created=clock,
        )
        obj["id"] = f"in_{clock}_{cus}"
        return obj
    if event_type.startswith("payment_intent."):
        obj = synthetic.payment_intent(customer_id=cus, email=address)
        obj["id"] = f"pi_{clock}_{cus}"
        return obj
    return {"id": f"ch_{clock}", "object": "charge", "customer": cus}


@st.composite
def deliveries(draw: st.DrawFn, events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Any permutation of the events with any duplication: the same event again (Stripe retrying) or
    a distinct Event object for the same change (a new id, same ``created`` and object)."""
    return shuffled_with_copies(draw, events)


def _seed(harness: Any, users: list[model.SeededUser]) -> list[model.SeededUser]:
    """Insert the users (and set their overrides as an operator does); the same users with their ids."""
    seeded = []
    for user in users:
        user_id = harness.add_user(user.email, user.tier, user.status)
        if user.override is not None:
            # Until cleared, or until tomorrow: either is in force while the test runs.
            expires = None if user.id % 2 else datetime.now(UTC) + timedelta(days=1)
            set_override(
                harness.engine,
                email=user.email,
                tier=user.override,
                reason="property test",
                expires_at=expires,
                actor="hypothesis",
                tiers=harness.settings.price_tiers,
            )
        seeded.append(dataclasses.replace(user, id=user_id))
    return seeded


def _with_ids(events: list[dict[str, Any]], seeded: list[model.SeededUser]) -> list[dict[str, Any]]:
    """The events with each placeholder ``client_reference_id`` replaced by the seeded user's id."""
    ids = {u.email: str(u.id) for u in seeded}
    out = []
    for event in events:
        ref = event["data"]["object"].get("client_reference_id")
        if isinstance(ref, str) and ref.startswith(_REF_ID):
            event = copy.deepcopy(event)
            event["data"]["object"]["client_reference_id"] = ids[ref.removeprefix(_REF_ID)]
        out.append(event)
    return out


def _pending(harness: Any) -> int:
    with harness.engine.connect() as connection:
        query = select(func.count()).select_from(events_table).where(events_table.c.status == "pending")
        return int(connection.execute(query).scalar_one())


def _drain_concurrently(harness: Any, settings: Settings, workers: int) -> None:
    """``workers`` Worker objects on threads, each calling run_once until the backlog is empty."""
    errors: list[BaseException] = []
    start = threading.Barrier(workers)

    def loop() -> None:
        worker = Worker(harness.engine, settings)
        try:
            start.wait()
            for _ in range(5000):
                if worker.run_once() == 0:
                    if _pending(harness) == 0:
                        return
                    time.sleep(0.002)  # the others hold the rest: let them run
            errors.append(AssertionError("worker still busy after 5000 rounds"))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=loop, name=f"model-worker-{n}") for n in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]


def _stored(harness: Any) -> model.State:
    with harness.engine.connect() as connection:
        users = connection.execute(
            select(users_table.c.email, users_table.c.subscription_tier, users_table.c.subscription_status)
        ).all()
        customers = connection.execute(
            select(customers_table.c.id, users_table.c.email, customers_table.c.email).join_from(
                customers_table, users_table, customers_table.c.user_id == users_table.c.id, isouter=True
            )
        ).all()
        subs = connection.execute(
            select(
                subscriptions_table.c.id,
                subscriptions_table.c.customer_id,
                subscriptions_table.c.status,
                subscriptions_table.c.tier,
                subscriptions_table.c.version_event_id,
            )
        ).all()
        outcomes = connection.execute(select(events_table.c.stripe_event_id, events_table.c.status)).all()
    return model.State(
        users={email: (tier, status) for email, tier, status in users},
        customers={cid: model.Customer(user_email, email) for cid, user_email, email in customers},
        subscriptions={sid: model.Subscription(*rest) for sid, *rest in subs},
        outcomes=dict(outcomes),
    )


def _check(harness: Any, data: st.DataObject, workers: int) -> None:
    # Half of the time every customer names the same address: one user's subscriptions spread
    # over several customers, applied by batches that may run at once.
    scenario = data.draw(scenarios(one_address=data.draw(st.booleans(), label="one address")), label="scenario")
    schedule = data.draw(deliveries(scenario.events), label="deliveries")
    batch_size = data.draw(st.integers(1, 5), label="WORKER_BATCH_SIZE")
    settings = dataclasses.replace(harness.settings, worker_batch_size=batch_size)
    harness.reset()
    seeded = _seed(harness, scenario.users)
    schedule = _with_ids(schedule, seeded)
    if workers == 1:
        # One worker, running now and then while the deliveries arrive, then until the backlog is empty.
        worker = Worker(harness.engine, settings)
        runs = data.draw(st.lists(st.booleans(), min_size=len(schedule), max_size=len(schedule)), label="runs")
        for event, run in zip(schedule, runs, strict=True):
            harness.deliver(event)
            if run:
                worker.run_once()
        harness.drain(settings)
    else:
        harness.deliver(*schedule)
        _drain_concurrently(harness, settings, workers)
    assert _stored(harness) == model.expected_state(seeded, schedule)


_SETTINGS = settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)


def test_one_worker_leaves_the_models_state(harness: Any) -> None:
    """Users' tier/status, customer links and addresses, stored subscriptions (with the winning event)
    and every event's outcome equal the model's, for any order and duplication of deliveries and
    any batch size, the worker running at any points in between."""

    @_SETTINGS
    @given(data=st.data())
    def check(data: st.DataObject) -> None:
        _check(harness, data, workers=1)

    check()


def test_several_workers_leave_the_models_state(harness: Any) -> None:
    """Two or three workers draining the same shuffled, duplicated backlog at once (concurrently with
    SKIP LOCKED on PostgreSQL, taking turns at SQLite's write lock) leave the model's state."""

    @_SETTINGS
    @given(data=st.data())
    def check(data: st.DataObject) -> None:
        _check(harness, data, workers=data.draw(st.integers(2, 3), label="workers"))

    check()
