"""Manual overrides win over webhooks and replays until they expire or are cleared (SQLite and PostgreSQL)."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select, text, update

from integration.conftest import Harness
from kamiyo import synthetic
from kamiyo.db.models import user_overrides_table
from kamiyo.domain.subscriptions import read_subscription
from kamiyo.domain.tiers import TierMap
from kamiyo.errors import KamiyoError
from kamiyo.operations.overrides import (
    EXPIRY_ACTOR,
    active_overrides,
    clear_override,
    expire_overrides,
    set_override,
)
from kamiyo.operations.replay import replay_events
from kamiyo.processing.engine import apply_sync_page
from kamiyo.processing.worker import Worker
from kamiyo.reconcile.gateway import read_version_created
from kamiyo.reconcile.reader import SyncItem
from operations.conftest import BASIC, CREATED, Customer, audit_about

IN_A_DAY = timedelta(days=1)


def _subscribed(ops: Harness, name: str, price: dict[str, object] = BASIC) -> Customer:
    """A user whose Stripe state is an active subscription at ``price``."""
    customer = Customer(name)
    ops.apply(customer.created(), customer.subscription("active", price=price))
    return customer


def _set(
    ops: Harness, email: str, tier: str, *, expires_in: timedelta | None = IN_A_DAY, reason: str = "INC-7"
) -> None:
    expires = datetime.now(UTC) + expires_in if expires_in is not None else None
    set_override(
        ops.engine,
        email=email,
        tier=tier,
        reason=reason,
        expires_at=expires,
        actor="alice",
        tiers=ops.settings.price_tiers,
    )


def _expire_now(ops: Harness, email: str) -> None:
    """Move the override's expiry into the past, as the clock would."""
    user_id = ops.user(email)["id"]  # type: ignore[index]
    with ops.engine.begin() as connection:
        connection.execute(
            update(user_overrides_table)
            .where(user_overrides_table.c.user_id == user_id)
            .values(expires_at=datetime.now(UTC) - timedelta(seconds=1))
        )


def test_override_wins_over_a_subscription_webhook_that_arrives_after_it(ops: Harness) -> None:
    """basic from Stripe, pro by override; a later subscription update (to basic again) keeps pro."""
    customer = _subscribed(ops, "webhook")
    assert ops.tier_status(customer.email) == ("basic", "active")

    _set(ops, customer.email, "pro")
    assert ops.tier_status(customer.email) == ("pro", "active")

    later = customer.subscription("active", price=BASIC, at=CREATED + 1000)
    ops.apply(later)
    assert ops.event(later["id"])["status"] == "applied"
    assert ops.subscription(customer.sub_id)["version_event_id"] == later["id"]  # type: ignore[index]
    assert ops.tier_status(customer.email) == ("pro", "active")


def test_override_to_free_revokes_a_paid_subscription_and_outlasts_its_updates(ops: Harness) -> None:
    customer = _subscribed(ops, "revoke")
    _set(ops, customer.email, "free")
    assert ops.tier_status(customer.email) == ("free", None)
    ops.apply(customer.subscription("active", price=BASIC, at=CREATED + 500))
    assert ops.tier_status(customer.email) == ("free", None)


def test_override_wins_over_replaying_the_subscription_event(ops: Harness) -> None:
    customer = _subscribed(ops, "replay")
    _set(ops, customer.email, "pro")
    results = replay_events(
        ops.engine, event_type="customer.subscription.updated", actor="bob", reason="recheck", settings=ops.settings
    )
    assert [r.status_after for r in results] == ["applied"]
    assert results[0].changes == []
    assert ops.tier_status(customer.email) == ("pro", "active")


def test_override_wins_over_a_sync_from_stripes_api_that_comes_after_it(ops: Harness) -> None:
    """A sync applies what the API says (here: canceled); the override still decides, and
    once cleared the user gets exactly what the sync stored."""
    customer = _subscribed(ops, "synced")
    _set(ops, customer.email, "pro")
    canceled = synthetic.subscription(
        sub_id=customer.sub_id, customer_id=customer.customer_id, status="canceled", price_obj=BASIC, created=CREATED
    )
    read_at = int(time.time())
    snapshot = read_subscription(
        canceled, ops.settings.price_tiers, created=read_version_created(read_at), event_type="sync", event_id="sync:1"
    )
    with ops.engine.begin() as connection:
        apply_sync_page(connection, ops.settings.price_tiers, [SyncItem(snapshot, customer.email)], seen_at=read_at)
    assert ops.subscription(customer.sub_id)["status"] == "canceled"  # type: ignore[index]
    assert ops.tier_status(customer.email) == ("pro", "active")

    clear_override(ops.engine, email=customer.email, actor="bob", tiers=ops.settings.price_tiers)
    assert ops.tier_status(customer.email) == ("free", "canceled")


def test_clearing_an_override_returns_the_user_to_the_tier_their_subscriptions_give(ops: Harness) -> None:
    customer = _subscribed(ops, "clear")
    _set(ops, customer.email, "pro", expires_in=None)
    report = clear_override(
        ops.engine, email=customer.email, actor="bob", reason="webhooks fixed", tiers=ops.settings.price_tiers
    )
    assert (report.tier, report.status, report.override) == ("basic", "active", None)
    assert ops.tier_status(customer.email) == ("basic", "active")


def test_clearing_the_override_of_a_user_without_subscriptions_leaves_them_free(ops: Harness) -> None:
    """Stripe knows nothing of them: what Stripe's state gives is free, whatever the tier was before."""
    ops.add_user("nosubs@example.com", tier="basic", status="active")
    _set(ops, "nosubs@example.com", "enterprise")
    assert ops.tier_status("nosubs@example.com") == ("enterprise", "active")
    clear_override(ops.engine, email="nosubs@example.com", actor="bob")
    assert ops.tier_status("nosubs@example.com") == ("free", None)


def test_an_expired_override_no_longer_wins_even_before_the_worker_deletes_it(ops: Harness) -> None:
    customer = _subscribed(ops, "lapsed")
    _set(ops, customer.email, "pro")
    _expire_now(ops, customer.email)
    ops.apply(customer.subscription("active", price=BASIC, at=CREATED + 800))
    assert ops.tier_status(customer.email) == ("basic", "active")


def test_the_worker_loop_ends_an_expired_override_by_itself_and_audits_it(ops: Harness) -> None:
    """No webhook, no operator: the running worker's sweep returns the user to Stripe's state."""
    customer = _subscribed(ops, "sweep")
    _set(ops, customer.email, "pro")
    _expire_now(ops, customer.email)
    assert ops.tier_status(customer.email) == ("pro", "active")  # stored until the sweep runs

    stop = threading.Event()
    worker = threading.Thread(target=Worker(ops.engine, ops.settings).run, args=(stop,), daemon=True)
    worker.start()
    try:
        deadline = datetime.now(UTC) + timedelta(seconds=10)
        while ops.tier_status(customer.email) != ("basic", "active") and datetime.now(UTC) < deadline:
            stop.wait(0.05)
    finally:
        stop.set()
        worker.join(10)
    assert ops.tier_status(customer.email) == ("basic", "active")
    with ops.engine.connect() as connection:
        assert connection.execute(select(user_overrides_table)).all() == []
    expired = audit_about(ops.engine, customer.email)[-1]
    assert (expired.action, expired.actor) == ("override.expired", EXPIRY_ACTOR)
    assert (expired.before or {})["tier"] == "pro"
    assert ((expired.after or {})["tier"], (expired.after or {})["override"]) == ("basic", None)


def test_expiry_sweep_removes_an_override_only_once_its_expiry_has_passed(ops: Harness) -> None:
    lasting = _subscribed(ops, "lasting")
    _set(ops, lasting.email, "pro")
    assert expire_overrides(ops.engine, ops.settings.price_tiers) == []
    assert expire_overrides(ops.engine, ops.settings.price_tiers, now=datetime.now(UTC) + 2 * IN_A_DAY) == [
        lasting.email
    ]
    assert ops.tier_status(lasting.email) == ("basic", "active")


def test_setting_an_override_again_replaces_the_previous_one(ops: Harness) -> None:
    customer = _subscribed(ops, "again")
    _set(ops, customer.email, "pro")
    _set(ops, customer.email, "enterprise", expires_in=None, reason="upgrade for the demo")
    with ops.engine.connect() as connection:
        [view] = [o for o in active_overrides(connection) if o.email == customer.email]
    assert (view.tier, view.expires_at, view.reason, view.set_by) == (
        "enterprise",
        None,
        "upgrade for the demo",
        "alice",
    )
    assert ops.tier_status(customer.email) == ("enterprise", "active")
    assert [e.action for e in audit_about(ops.engine, customer.email)] == ["override.set", "override.set"]


def test_active_overrides_lists_those_in_force_soonest_expiry_first(ops: Harness) -> None:
    for email in ("late@example.com", "soon@example.com", "forever@example.com", "gone@example.com"):
        ops.add_user(email)
    _set(ops, "late@example.com", "pro", expires_in=timedelta(hours=5))
    _set(ops, "soon@example.com", "basic", expires_in=timedelta(hours=1))
    _set(ops, "forever@example.com", "pro", expires_in=None)
    _set(ops, "gone@example.com", "pro")
    _expire_now(ops, "gone@example.com")
    with ops.engine.connect() as connection:
        views = active_overrides(connection)
    assert [v.email for v in views] == ["soon@example.com", "late@example.com", "forever@example.com"]
    assert all(v.set_at <= datetime.now(UTC) for v in views)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"reason": "  "}, "a reason is required"),
        ({"tier": "gold"}, "unknown tier 'gold'"),
        ({"tier": "Pro!"}, "must be lowercase letters"),
        ({"email": "nobody@example.com"}, "no user nobody@example.com"),
        ({"email": "not-an-email"}, "is not an email address"),
        ({"expires_at": datetime.now(UTC) - timedelta(minutes=1)}, "--expires must be in the future"),
        ({"actor": " "}, "--by"),
    ],
)
def test_a_refused_override_changes_nothing_and_records_nothing(
    ops: Harness, changes: dict[str, object], message: str
) -> None:
    customer = _subscribed(ops, "refused")
    arguments: dict[str, object] = {
        "email": customer.email,
        "tier": "pro",
        "reason": "INC-7",
        "expires_at": None,
        "actor": "alice",
        "tiers": ops.settings.price_tiers,
    }
    arguments.update(changes)
    with pytest.raises(KamiyoError, match=message):
        set_override(ops.engine, **arguments)  # type: ignore[arg-type]
    assert ops.tier_status(customer.email) == ("basic", "active")
    assert audit_about(ops.engine, customer.email) == []
    with ops.engine.connect() as connection:
        assert connection.execute(text("SELECT count(*) FROM user_overrides")).scalar() == 0


def test_clearing_when_there_is_nothing_to_clear_is_refused_and_records_nothing(ops: Harness) -> None:
    customer = _subscribed(ops, "noop")
    with pytest.raises(KamiyoError, match="has no override"):
        clear_override(ops.engine, email=customer.email, actor="bob")
    assert audit_about(ops.engine, customer.email) == []


def test_clearing_undoes_a_direct_update_of_the_users_table(ops: Harness) -> None:
    """The runbook's Option 5 by hand, then the documented way back to Stripe's state."""
    customer = _subscribed(ops, "manual")
    with ops.engine.begin() as connection:
        connection.execute(
            text("UPDATE users SET subscription_tier = 'pro', subscription_status = 'active' WHERE email = :e"),
            {"e": customer.email},
        )
    report = clear_override(ops.engine, email=customer.email, actor="bob", reason="undo manual fix")
    assert (report.tier, report.status) == ("basic", "active")
    [entry] = audit_about(ops.engine, customer.email)
    assert (entry.action, (entry.before or {})["tier"], (entry.after or {})["tier"]) == (
        "override.clear",
        "pro",
        "basic",
    )


def test_without_configured_tiers_any_well_formed_tier_is_accepted(ops: Harness) -> None:
    """With no STRIPE_PRICE_TIERS, tiers come from price metadata: kamiyo cannot know every real one."""
    ops.add_user("metadata@example.com")
    set_override(
        ops.engine,
        email="metadata@example.com",
        tier="gold",
        reason="INC-7",
        expires_at=None,
        actor="alice",
        tiers=TierMap(),
    )
    assert ops.tier_status("metadata@example.com") == ("gold", "active")
