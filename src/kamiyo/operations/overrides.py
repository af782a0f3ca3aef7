"""Manual overrides: an operator's tier for one user that wins over webhooks and syncs.

The override itself is a row of ``user_overrides``; the winning happens in
``domain.rules.recompute_user``, which every path that applies a change goes through. Setting,
clearing and expiring each recompute the user and append an audit entry in the same transaction.

Lock order is the one the apply engine keeps (customers, then users): these functions lock
only the user row, before they read or write the override, so an override never changes under
a worker that is recomputing the same user.
"""

from __future__ import annotations

import logging
import re
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, Engine, delete, or_, select
from sqlalchemy.dialects import postgresql, sqlite

from kamiyo.db.models import subscriptions_table, user_overrides_table, users_table
from kamiyo.domain.links import normalize_email
from kamiyo.domain.overrides import as_utc, override_in_force
from kamiyo.domain.tiers import TierMap
from kamiyo.errors import KamiyoError
from kamiyo.operations.audit import record_action
from kamiyo.operations.users import OverrideView, UserReport, default_tiers, show_user
from kamiyo.processing.engine import recompute_users

log = logging.getLogger("kamiyo.operations")
_users = users_table
_overrides = user_overrides_table
_subs = subscriptions_table
_TIER_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")
EXPIRY_ACTOR = "kamiyo (override expiry)"


def set_override(
    engine: Engine,
    *,
    email: str,
    tier: str,
    reason: str,
    expires_at: datetime | None,
    actor: str,
    tiers: TierMap | None = None,
    claimed_by: str | None = None,
) -> UserReport:
    """Give ``email`` the ``tier`` until ``expires_at`` (None: until cleared), whatever Stripe says.

    Replaces any override the user has. The reason is required; when ``STRIPE_PRICE_TIERS`` names
    tiers, the tier must be one of them or a stored subscription's (a typo would hand out a tier
    nobody sells).
    """
    tiers = tiers if tiers is not None else default_tiers()
    reason = (reason or "").strip()
    if not reason:
        raise KamiyoError("a reason is required for a manual override (--reason)")
    if not actor.strip():
        raise KamiyoError("who sets the override is required (--by)")
    tier = tier.strip().lower()
    now = datetime.now(UTC)
    if expires_at is not None:
        expires_at = as_utc(expires_at)
        if expires_at <= now:
            raise KamiyoError(f"--expires must be in the future, got {expires_at:%Y-%m-%dT%H:%M:%SZ}")
    with engine.begin() as connection:
        _check_tier(connection, tier, tiers)
        user_id, address = _lock_user(connection, email)
        before = _state(connection, user_id)
        values = {
            "user_id": user_id,
            "tier": tier,
            "reason": reason,
            "set_by": actor.strip()[:255],
            "set_at": now,
            "expires_at": expires_at,
        }
        dialect: Any = postgresql if connection.dialect.name == "postgresql" else sqlite
        stmt = dialect.insert(_overrides).values(values)
        stmt = stmt.on_conflict_do_update(
            index_elements=["user_id"], set_={k: getattr(stmt.excluded, k) for k in values if k != "user_id"}
        )
        connection.execute(stmt)
        recompute_users(connection, tiers, [user_id], why="manual override set")
        after = _state(connection, user_id)
        record_action(
            connection,
            action="override.set",
            actor=actor,
            reason=reason,
            target=address,
            before=before,
            after=after,
            claimed_by=claimed_by,
        )
    log.info("override set email=%s tier=%s expires=%s by=%s", address, tier, expires_at, actor)
    return _report(engine, address, tiers)


def clear_override(
    engine: Engine,
    *,
    email: str,
    actor: str,
    reason: str | None = None,
    tiers: TierMap | None = None,
    claimed_by: str | None = None,
) -> UserReport:
    """Remove the user's override; they get the tier Stripe's state gives (free without subscriptions).

    Also the way back from a direct ``UPDATE users``: without an override, it simply returns the
    user to Stripe's state. Refused (nothing recorded) when there is nothing to clear or change.
    """
    tiers = tiers if tiers is not None else default_tiers()
    if not actor.strip():
        raise KamiyoError("who clears the override is required (--by)")
    with engine.begin() as connection:
        user_id, address = _lock_user(connection, email)
        before = _state(connection, user_id)
        connection.execute(delete(_overrides).where(_overrides.c.user_id == user_id))
        changes = recompute_users(connection, tiers, [user_id], why="manual override cleared", reset_when_none=True)
        if before["override"] is None and not changes:
            raise KamiyoError(f"{address} has no override and already has the tier Stripe's state gives")
        after = _state(connection, user_id)
        record_action(
            connection,
            action="override.clear",
            actor=actor,
            reason=reason,
            target=address,
            before=before,
            after=after,
            claimed_by=claimed_by,
        )
    log.info("override cleared email=%s by=%s", address, actor)
    return _report(engine, address, tiers)


def active_overrides(connection: Connection, *, limit: int | None = None) -> list[OverrideView]:
    """Every override in force (at most ``limit``), the soonest to expire first (those without expiry last)."""
    now = datetime.now(UTC)
    query = (
        select(_overrides, _users.c.email)
        .join(_users, _users.c.id == _overrides.c.user_id)
        .where(or_(_overrides.c.expires_at.is_(None), _overrides.c.expires_at > now))
        .order_by(_overrides.c.expires_at.is_(None), _overrides.c.expires_at, _users.c.email)
    )
    if limit is not None:
        query = query.limit(max(1, limit))
    return [
        OverrideView(
            email=row.email,
            tier=row.tier,
            reason=row.reason,
            expires_at=as_utc(row.expires_at) if row.expires_at else None,
            set_by=row.set_by,
            set_at=as_utc(row.set_at),
        )
        for row in connection.execute(query)
        if override_in_force(row.expires_at, now)
    ]


def expire_overrides(engine: Engine, tiers: TierMap, *, now: datetime | None = None) -> list[str]:
    """Delete overrides whose expiry has passed and return those users to Stripe's state.

    The worker runs this every second or so, so that an expiry takes effect by itself. Costs
    one indexed read when nothing is due. Returns the emails it changed.
    """
    now = as_utc(now) if now is not None else datetime.now(UTC)
    with engine.connect().execution_options(readonly=True) as connection:
        due = connection.execute(select(_overrides.c.user_id).where(_overrides.c.expires_at <= now)).scalars().all()
    if not due:
        return []
    expired = []
    with engine.begin() as connection:
        for user_id in due:
            email = connection.execute(select(_users.c.email).where(_users.c.id == user_id).with_for_update()).scalar()
            # Re-read under the user's lock: another worker may have expired it, or an operator
            # set a new override since the read above.
            row = connection.execute(
                select(_overrides.c.expires_at).where(_overrides.c.user_id == user_id, _overrides.c.expires_at <= now)
            ).first()
            if email is None or row is None:
                continue
            before = _state(connection, user_id)
            connection.execute(delete(_overrides).where(_overrides.c.user_id == user_id))
            recompute_users(connection, tiers, [user_id], why="manual override expired", reset_when_none=True)
            after = _state(connection, user_id)
            record_action(
                connection,
                action="override.expired",
                actor=EXPIRY_ACTOR,
                reason=f"expired at {as_utc(row.expires_at):%Y-%m-%dT%H:%M:%SZ}",
                target=email,
                before=before,
                after=after,
            )
            expired.append(email)
    for email in expired:
        log.info("override expired email=%s", email)
    return expired


def _lock_user(connection: Connection, email: str) -> tuple[int, str]:
    address = normalize_email(email)
    if address is None:
        raise KamiyoError(f"{email!r} is not an email address")
    user_id = connection.execute(select(_users.c.id).where(_users.c.email == address).with_for_update()).scalar()
    if user_id is None:
        raise KamiyoError(f"no user {address}")
    return int(user_id), address


def _check_tier(connection: Connection, tier: str, tiers: TierMap) -> None:
    if not _TIER_RE.fullmatch(tier):
        raise KamiyoError(f"tier {tier!r} must be lowercase letters, digits, - or _")
    if len(tiers.ranks) <= 1:
        return  # no STRIPE_PRICE_TIERS: tiers come from price metadata, any of them may be real
    known = set(tiers.ranks) | set(connection.execute(select(_subs.c.tier).distinct()).scalars())
    if tier not in known:
        raise KamiyoError(f"unknown tier {tier!r}; known tiers: {', '.join(sorted(known))}")


def _state(connection: Connection, user_id: int) -> dict[str, Any]:
    """The user's stored tier and status and their override, for an audit entry's before/after."""
    user = connection.execute(
        select(_users.c.subscription_tier, _users.c.subscription_status).where(_users.c.id == user_id)
    ).one()
    row = connection.execute(select(_overrides).where(_overrides.c.user_id == user_id)).first()
    override = None
    if row is not None:
        override = {
            "tier": row.tier,
            "reason": row.reason,
            "expires_at": as_utc(row.expires_at).isoformat() if row.expires_at else None,
            "set_by": row.set_by,
        }
    return {"tier": user.subscription_tier, "status": user.subscription_status, "override": override}


def _report(engine: Engine, email: str, tiers: TierMap) -> UserReport:
    with engine.connect().execution_options(readonly=True) as connection:
        report = show_user(connection, email, tiers=tiers)
    if report is None:  # pragma: no cover - the user was there a moment ago and users are never deleted
        raise KamiyoError(f"no user {email}")
    return report
