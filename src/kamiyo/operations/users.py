"""One user as an operator needs to see them, and the users whose stored tier nobody can explain.

``show_user`` gathers the stored tier and status, each subscription, the override, the recent
events that shaped them (with how each changed this user, read from the event's stored outcome)
and the manual actions taken. ``drift`` compares every user's stored
tier and status with what their subscriptions and override derive: a direct ``UPDATE users``
(the runbook's Option 5) still takes effect, because the application reads that column, and is
reported here until someone explains or undoes it.

Every time is an aware UTC ``datetime``; Stripe's own timestamps stay Unix seconds, as stored.
The dataclasses hold plain values only, so ``orjson.dumps`` serialises them as they are.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import Connection, func, or_, select

from kamiyo.db.models import (
    NOT_PENDING,
    customers_table,
    events_table,
    subscriptions_table,
    user_overrides_table,
    users_table,
)
from kamiyo.domain.entitlement import SubscriptionState, UserState, user_state
from kamiyo.domain.links import normalize_email
from kamiyo.domain.outcomes import InboxStatus, Outcome
from kamiyo.domain.overrides import as_utc, override_in_force, override_state
from kamiyo.domain.tiers import FREE, TierMap
from kamiyo.errors import ConfigError
from kamiyo.operations.audit import AuditEntry, list_audit

_users = users_table
_customers = customers_table
_subs = subscriptions_table
_events = events_table
_overrides = user_overrides_table

# Events name a customer or an email only inside their payload; that text is searched in the
# newest rows of the inbox only, so that `users show` stays fast on a large inbox.
PAYLOAD_SEARCH_WINDOW = 20_000


@dataclass(frozen=True)
class StateView:
    tier: str
    status: str | None


@dataclass(frozen=True)
class OverrideView:
    email: str
    tier: str
    reason: str
    expires_at: datetime | None  # None: until cleared
    set_by: str
    set_at: datetime


@dataclass(frozen=True)
class SubscriptionView:
    id: str
    customer_id: str
    status: str
    tier: str
    price_ids: list[str]
    livemode: bool
    created: int  # Unix seconds, Stripe's
    current_period_end: int | None
    cancel_at_period_end: bool
    cancel_at: int | None
    ended_at: int | None
    last_event_id: str  # the event whose snapshot is stored
    updated_at: datetime


@dataclass(frozen=True)
class ChangeView:
    """How an event changed this user's tier and status, from its outcome."""

    tier_from: str
    status_from: str | None
    tier_to: str
    status_to: str | None
    why: str


@dataclass(frozen=True)
class EventView:
    event_id: str
    type: str
    status: str
    created: int  # Unix seconds, Stripe's
    received_at: datetime
    attempts: int
    detail: str | None  # the sentence; all there is of an event applied before outcomes were recorded
    error: str | None
    # This user's changes by the event, from its outcome ([] when it changed nothing of theirs);
    # None when it has no outcome (not applied, or applied before outcomes were recorded).
    changes: list[ChangeView] | None


@dataclass(frozen=True)
class DriftView:
    """A user whose stored tier/status differs from what subscriptions and override derive."""

    email: str
    stored: StateView
    expected: StateView
    explained_by: int | None  # the audit entry whose "after" is the stored state, if any


@dataclass(frozen=True)
class UserReport:
    email: str
    user_id: int
    tier: str  # stored: what the application reads
    status: str | None
    expected: StateView  # what subscriptions and override derive
    stripe_state: StateView | None  # what the subscriptions alone give; None without any
    override: OverrideView | None
    customer_ids: list[str]
    subscriptions: list[SubscriptionView]
    recent_events: list[EventView]
    drift: DriftView | None
    audit: list[AuditEntry]  # recent manual actions on this user, newest first


def show_user(
    connection: Connection, email: str, *, tiers: TierMap | None = None, events: int = 20
) -> UserReport | None:
    """Everything about one user, or None when no user has that email."""
    address = normalize_email(email) or email.strip().lower()
    user = connection.execute(
        select(_users.c.id, _users.c.email, _users.c.subscription_tier, _users.c.subscription_status).where(
            _users.c.email == address
        )
    ).first()
    if user is None:
        return None
    tiers = tiers if tiers is not None else default_tiers()
    customer_ids = list(
        connection.execute(select(_customers.c.id).where(_customers.c.user_id == user.id).order_by(_customers.c.id))
        .scalars()
        .all()
    )
    subs = [
        SubscriptionView(
            id=row.id,
            customer_id=row.customer_id,
            status=row.status,
            tier=row.tier,
            price_ids=[p for p in row.price_ids.split(",") if p],
            livemode=bool(row.livemode),
            created=row.stripe_created,
            current_period_end=row.current_period_end,
            cancel_at_period_end=bool(row.cancel_at_period_end),
            cancel_at=row.cancel_at,
            ended_at=row.ended_at,
            last_event_id=row.version_event_id,
            updated_at=as_utc(row.updated_at),
        )
        for row in connection.execute(
            select(_subs).where(_subs.c.customer_id.in_(customer_ids)).order_by(_subs.c.stripe_created.desc())
        )
    ]
    override = _override_of(connection, user.id, user.email)
    stripe = user_state((SubscriptionState(s.id, s.status, s.tier, s.created) for s in subs), tiers)
    stored = StateView(user.subscription_tier, user.subscription_status)
    expected = _expected(stripe, override.tier if override else None)
    drift = None
    if expected != stored:
        drift = DriftView(user.email, stored, expected, _explanation(connection, user.email, stored))
    return UserReport(
        email=user.email,
        user_id=user.id,
        tier=user.subscription_tier,
        status=user.subscription_status,
        expected=expected,
        stripe_state=StateView(stripe.tier, stripe.status) if stripe else None,
        override=override,
        customer_ids=customer_ids,
        subscriptions=subs,
        recent_events=_recent_events(connection, user.id, user.email, customer_ids, [s.id for s in subs], events),
        drift=drift,
        audit=list_audit(connection, target=user.email, limit=10),
    )


def drift(connection: Connection, *, tiers: TierMap | None = None) -> list[DriftView]:
    """Every user whose stored tier/status differs from what subscriptions and override derive.

    A user with neither subscriptions nor an override is expected to be ``free`` with no status.
    Each difference carries the audit entry that explains it, if there is one.
    """
    tiers = tiers if tiers is not None else default_tiers()
    now = datetime.now(UTC)
    by_user: dict[int, list[SubscriptionState]] = defaultdict(list)
    for row in connection.execute(
        select(_customers.c.user_id, _subs.c.id, _subs.c.status, _subs.c.tier, _subs.c.stripe_created)
        .join(_customers, _customers.c.id == _subs.c.customer_id)
        .where(_customers.c.user_id.is_not(None))
    ):
        by_user[row.user_id].append(SubscriptionState(row.id, row.status, row.tier, row.stripe_created))
    overrides = {
        row.user_id: row.tier
        for row in connection.execute(select(_overrides.c.user_id, _overrides.c.tier, _overrides.c.expires_at))
        if override_in_force(row.expires_at, now)
    }
    found = []
    for user in connection.execute(
        select(_users.c.id, _users.c.email, _users.c.subscription_tier, _users.c.subscription_status).order_by(
            _users.c.id
        )
    ):
        expected = _expected(user_state(by_user.get(user.id, ()), tiers), overrides.get(user.id))
        stored = StateView(user.subscription_tier, user.subscription_status)
        if stored != expected:
            found.append(DriftView(user.email, stored, expected, _explanation(connection, user.email, stored)))
    return found


def unexplained_drift(connection: Connection, *, tiers: TierMap | None = None) -> list[DriftView]:
    """The users whose stored tier/status no subscription, override or audit entry explains:
    a direct ``UPDATE users`` nobody documented, as ``kamiyo users drift`` reports them."""
    return [d for d in drift(connection, tiers=tiers) if d.explained_by is None]


def default_tiers() -> TierMap:
    """``STRIPE_PRICE_TIERS`` from the environment; it only ranks tiers when several subscriptions compete."""
    from kamiyo.config import load_settings

    try:
        return load_settings().price_tiers
    except ConfigError:
        return TierMap()


def _expected(stripe: UserState | None, override_tier: str | None) -> StateView:
    state = override_state(override_tier) if override_tier is not None else stripe
    return StateView(state.tier, state.status) if state is not None else StateView(FREE, None)


def _override_of(connection: Connection, user_id: int, email: str) -> OverrideView | None:
    row = connection.execute(select(_overrides).where(_overrides.c.user_id == user_id)).first()
    if row is None or not override_in_force(row.expires_at, datetime.now(UTC)):
        return None
    return OverrideView(
        email=email,
        tier=row.tier,
        reason=row.reason,
        expires_at=as_utc(row.expires_at) if row.expires_at else None,
        set_by=row.set_by,
        set_at=as_utc(row.set_at),
    )


def _explanation(connection: Connection, email: str, stored: StateView) -> int | None:
    """The newest audit entry about this user, if the state it left is the stored one."""
    for entry in list_audit(connection, target=email, limit=1):
        after = entry.after or {}
        if after.get("tier") == stored.tier and after.get("status") == stored.status:
            return entry.id
    return None


def _recent_events(
    connection: Connection, user_id: int, email: str, customer_ids: list[str], sub_ids: list[str], limit: int
) -> list[EventView]:
    """Events about the user's subscriptions or customers (by object id), or naming a customer or
    the email in their payload (invoices, checkout sessions, payment intents), newest first."""
    matches = []
    if customer_ids or sub_ids:
        by_object = _events.c.object_id.in_([*customer_ids, *sub_ids])
        # The object index holds the events taken up by the worker; pending ones come from the
        # claim index (models.NOT_PENDING).
        matches += [by_object & NOT_PENDING, by_object & (_events.c.status == InboxStatus.PENDING)]
    newest = connection.execute(select(func.max(_events.c.id))).scalar()
    if newest is not None:
        text = [_events.c.payload.contains(c, autoescape=True) for c in customer_ids]
        text.append(func.lower(_events.c.payload).contains(email, autoescape=True))
        matches.append(or_(*text) & (_events.c.id > newest - PAYLOAD_SEARCH_WINDOW))
    if not matches:
        return []
    rows = connection.execute(
        select(
            _events.c.stripe_event_id,
            _events.c.type,
            _events.c.status,
            _events.c.created,
            _events.c.received_at,
            _events.c.attempts,
            _events.c.detail,
            _events.c.last_error,
            _events.c.outcome,
        )
        .where(or_(*matches))
        .order_by(_events.c.id.desc())
        .limit(max(1, limit))
    )
    return [
        EventView(
            event_id=row.stripe_event_id,
            type=row.type,
            status=row.status,
            created=row.created,
            received_at=as_utc(row.received_at),
            attempts=row.attempts,
            detail=row.detail,
            error=row.last_error,
            changes=_changes_of(row.outcome, user_id),
        )
        for row in rows
    ]


def _changes_of(stored: dict[str, object] | None, user_id: int) -> list[ChangeView] | None:
    if stored is None:
        return None
    return [
        ChangeView(change.tier_from, change.status_from, change.tier_to, change.status_to, change.why)
        for change in Outcome.from_json(stored).users
        if change.user_id == user_id
    ]
