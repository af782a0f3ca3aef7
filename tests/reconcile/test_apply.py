"""A page applied as a set ends exactly where the webhook path's per-row ``Store`` calls end.

``apply_page`` re-states, for 100 rows at a time, the rules of ``Store.upsert_subscription``,
``Store.link_customer`` and ``Store.recompute_user``. For any stored state (users, links,
emails and when they were seen, snapshots and their versions, manual overrides) and any page,
the database after ``apply_page`` must equal the database after the per-row calls.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Connection, Engine, select

from kamiyo import synthetic
from kamiyo.db.models import Base, customers_table, subscriptions_table, user_overrides_table, users_table
from kamiyo.domain.subscriptions import read_subscription, version_for
from kamiyo.domain.tiers import parse_price_tiers
from kamiyo.processing.store import Store, subscription_row
from kamiyo.reconcile.apply import SyncItem, apply_page
from support import PRICE_TIERS

TIERS = parse_price_tiers(PRICE_TIERS)
EMAILS = ("ann@example.com", "bob@example.com", "cy@example.com", "dee@example.com")
CUSTOMERS = ("cus_a", "cus_b", "cus_c", "cus_d", "cus_e")
SUBSCRIPTIONS = ("sub_1", "sub_2", "sub_3", "sub_4", "sub_5", "sub_6")
STATUSES = ("active", "trialing", "past_due", "unpaid", "paused", "incomplete", "canceled", "incomplete_expired")
PRICES = ("price_basic", "price_pro_monthly", "ent_yearly")
USER_STATES = (("free", None), ("pro", "active"), ("basic", "canceled"), ("enterprise", "past_due"))
EVENT_IDS = ("evt_a", "evt_b", "sync:1", "sync:9", "verified:evt_a")


@st.composite
def scenarios(draw: st.DrawFn) -> dict[str, Any]:
    users = draw(st.lists(st.sampled_from(EMAILS), unique=True, max_size=4))
    customers = {}
    for customer_id in draw(st.lists(st.sampled_from(CUSTOMERS), unique=True, max_size=5)):
        customers[customer_id] = (
            draw(st.none() | st.sampled_from(users)) if users else None,
            draw(st.none() | st.sampled_from(EMAILS)),
            draw(st.integers(0, 20)),
        )
    # A subscription's customer never changes in Stripe: one owner per subscription, stored or listed.
    owner = {sub_id: draw(st.sampled_from(CUSTOMERS)) for sub_id in SUBSCRIPTIONS}
    stored = [
        _subscription(draw, sub_id, owner[sub_id])
        for sub_id in draw(st.lists(st.sampled_from(SUBSCRIPTIONS), unique=True, max_size=6))
        if owner[sub_id] in customers
    ]
    page_customers = {c: draw(st.none() | st.sampled_from(EMAILS)) for c in CUSTOMERS}
    page = [
        (_subscription(draw, sub_id, owner[sub_id]), page_customers[owner[sub_id]])
        for sub_id in draw(st.lists(st.sampled_from(SUBSCRIPTIONS), unique=True, min_size=1, max_size=6))
    ]
    return {
        "users": {email: draw(st.sampled_from(USER_STATES)) for email in users},
        "customers": customers,
        "stored": stored,
        "overrides": {e: (draw(st.sampled_from(("free", "enterprise"))), draw(st.booleans())) for e in users[:1]}
        if draw(st.booleans())
        else {},
        "page": page,
        "seen_at": draw(st.integers(0, 20)),
    }


def _subscription(draw: st.DrawFn, sub_id: str, customer_id: str) -> Any:
    obj = synthetic.subscription(
        sub_id=sub_id,
        customer_id=customer_id,
        status=draw(st.sampled_from(STATUSES)),
        price_obj=synthetic.price(draw(st.sampled_from(PRICES))),
        created=draw(st.integers(0, 3)),
    )
    snap = read_subscription(obj, TIERS, created=0, event_type="sync", event_id="")
    event_type = draw(st.sampled_from(("sync", "customer.subscription.deleted")))
    version = version_for(snap.status, draw(st.integers(0, 20)), event_type, draw(st.sampled_from(EVENT_IDS)))
    return replace(snap, version=version)


def _seed(connection: Connection, scenario: dict[str, Any]) -> None:
    ids = {}
    for email, (tier, status) in scenario["users"].items():
        ids[email] = connection.execute(
            users_table.insert()
            .values(email=email, subscription_tier=tier, subscription_status=status)
            .returning(users_table.c.id)
        ).scalar_one()
    for customer_id, (user, email, seen) in scenario["customers"].items():
        connection.execute(
            customers_table.insert().values(
                id=customer_id, user_id=ids.get(user) if user else None, email=email, email_seen_at=seen
            )
        )
        if user:
            connection.execute(
                users_table.update().where(users_table.c.id == ids[user]).values(stripe_customer_id=customer_id)
            )
    for snap in scenario["stored"]:
        connection.execute(subscriptions_table.insert().values(subscription_row(snap)))
    now = datetime.now(UTC)
    for email, (tier, expired) in scenario["overrides"].items():
        connection.execute(
            user_overrides_table.insert().values(
                user_id=ids[email],
                tier=tier,
                reason="test",
                set_by="test",
                set_at=now,
                expires_at=now - timedelta(hours=1) if expired else None,
            )
        )


def _per_row(connection: Connection, items: list[SyncItem], seen_at: int) -> None:
    """The webhook path, one subscription at a time, in the page's lock order."""
    store = Store(connection, TIERS)
    for item in sorted(items, key=lambda i: (i.snapshot.customer_id, i.snapshot.id)):
        store.upsert_subscription(item.snapshot)
        if item.email:
            store.link_customer(item.snapshot.customer_id, item.email, None, seen_at)
        user_id = store.customer_user(item.snapshot.customer_id)
        if user_id is not None:
            store.recompute_user(user_id)


def _dump(connection: Connection) -> dict[str, Any]:
    """The state, with user ids replaced by emails (ids differ between the runs) and timestamps left out."""
    emails = dict(connection.execute(select(users_table.c.id, users_table.c.email)).all())
    users = sorted(
        (
            row.email,
            emails.get(row.stripe_customer_id) or row.stripe_customer_id,
            row.subscription_tier,
            row.subscription_status,
        )
        for row in connection.execute(select(users_table))
    )
    customers = sorted(
        (row.id, emails.get(row.user_id), row.email, row.email_seen_at, row.linked_by)
        for row in connection.execute(select(customers_table))
    )
    columns = [c for c in subscriptions_table.columns if c.name != "updated_at"]
    subscriptions = sorted(tuple(row) for row in connection.execute(select(*columns)))
    return {"users": users, "customers": customers, "subscriptions": subscriptions}


@pytest.fixture
def clean(reconcile_engine: Engine) -> Engine:
    with reconcile_engine.begin() as connection:
        for table in reversed(Base.metadata.sorted_tables):
            if not table.info.get("append_only"):
                connection.execute(table.delete())
    return reconcile_engine


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(scenario=scenarios())
def test_a_page_applied_as_a_set_ends_where_the_per_row_store_calls_end(
    clean: Engine, scenario: dict[str, Any]
) -> None:
    items = [SyncItem(snap, email) for snap, email in scenario["page"]]
    with clean.connect() as connection, connection.begin() as outer:
        _seed(connection, scenario)
        results = []
        for apply in (
            lambda: apply_page(connection, TIERS, items, seen_at=scenario["seen_at"]),
            lambda: _per_row(connection, items, scenario["seen_at"]),
        ):
            savepoint = connection.begin_nested()
            apply()
            results.append(_dump(connection))
            savepoint.rollback()
        outer.rollback()
    as_set, per_row = results
    assert as_set == per_row
