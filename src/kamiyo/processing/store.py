"""Writes that apply events, all inside the caller's transaction.

Lock order, kept by every path so that concurrent workers on PostgreSQL cannot deadlock one
another within one event: subscription row → customer row → user row. Locking the customer row
before reading whether it is linked, and the user row before reading the user's subscriptions,
closes the write-skew gaps between two workers applying events of one customer at once.
(SQLite has a single writer, so ``FOR UPDATE`` is simply not rendered there.)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, select, tuple_, update
from sqlalchemy.dialects import postgresql, sqlite

from kamiyo.db.models import customers_table, subscriptions_table, users_table
from kamiyo.domain.entitlement import SubscriptionState, UserState, user_state
from kamiyo.domain.subscriptions import SubscriptionSnapshot
from kamiyo.domain.tiers import TierMap

log = logging.getLogger("kamiyo.state")
_users = users_table
_customers = customers_table
_subs = subscriptions_table


@dataclass(frozen=True)
class UserChange:
    user_id: int
    email: str
    before: UserState
    after: UserState


class Store:
    """The persistence operations event handlers need, bound to one open transaction."""

    def __init__(self, connection: Connection, tiers: TierMap) -> None:
        self.connection = connection
        self.tiers = tiers
        self._dialect: Any = postgresql if connection.dialect.name == "postgresql" else sqlite

    # -- subscriptions ---------------------------------------------------------------------

    def upsert_subscription(self, snap: SubscriptionSnapshot) -> bool:
        """Store ``snap`` unless the stored snapshot is newer; True when it was stored.

        The stale-write guard lives in the upsert's WHERE, so it holds under any concurrency.
        """
        self.ensure_customer(snap.customer_id)
        values = {
            "id": snap.id,
            "customer_id": snap.customer_id,
            "status": snap.status,
            "tier": snap.tier,
            "price_ids": ",".join(snap.price_ids)[:2048],
            "livemode": snap.livemode,
            "stripe_created": snap.stripe_created,
            "current_period_end": snap.current_period_end,
            "cancel_at_period_end": snap.cancel_at_period_end,
            "cancel_at": snap.cancel_at,
            "canceled_at": snap.canceled_at,
            "ended_at": snap.ended_at,
            "trial_end": snap.trial_end,
            "version_terminal": snap.version.terminal,
            "version_created": snap.version.created,
            "version_rank": snap.version.rank,
            "version_event_id": snap.version.event_id,
            "updated_at": datetime.now(UTC),
        }
        stmt = self._dialect.insert(_subs).values(values)
        stored = tuple_(
            _subs.c.version_terminal, _subs.c.version_created, _subs.c.version_rank, _subs.c.version_event_id
        )
        incoming = tuple_(
            stmt.excluded.version_terminal,
            stmt.excluded.version_created,
            stmt.excluded.version_rank,
            stmt.excluded.version_event_id,
        )
        stmt = stmt.on_conflict_do_update(
            index_elements=["id"],
            set_={k: getattr(stmt.excluded, k) for k in values if k != "id"},
            where=stored < incoming,
        )
        # RETURNING, not rowcount: psycopg reports rowcount -1 for this upsert, which is truthy.
        return self.connection.execute(stmt.returning(_subs.c.id)).first() is not None

    # -- customers and users ---------------------------------------------------------------

    def ensure_customer(self, customer_id: str) -> None:
        stmt = self._dialect.insert(_customers).values(id=customer_id).on_conflict_do_nothing(index_elements=["id"])
        self.connection.execute(stmt)

    def customer_user(self, customer_id: str) -> int | None:
        """The user a customer is linked to, locking the customer row."""
        row = self.connection.execute(
            select(_customers.c.user_id).where(_customers.c.id == customer_id).with_for_update()
        ).first()
        return row.user_id if row is not None else None

    def link_customer(self, customer_id: str, email: str | None, user_ref: str | None, seen_at: int) -> str:
        """Record what an event says of a customer; link it to a user. Returns what happened.

        The first email seen for an unlinked customer links it (matching or creating the user);
        a linked customer stays linked, except that ``client_reference_id`` (our own user)
        moves it. Users whose subscriptions change hands are recomputed.
        """
        self.ensure_customer(customer_id)
        row = self.connection.execute(
            select(_customers.c.user_id, _customers.c.email, _customers.c.email_seen_at)
            .where(_customers.c.id == customer_id)
            .with_for_update()
        ).one()
        if email and seen_at >= row.email_seen_at and email != row.email:
            self.connection.execute(
                update(_customers).where(_customers.c.id == customer_id).values(email=email, email_seen_at=seen_at)
            )

        target: int | None = None
        how = ""
        if user_ref is not None:
            target = self._user_by_ref(user_ref)
            how = "client_reference_id"
        if target is None and row.user_id is None and email:
            target = self._user_for_email(email)
            how = "email"
        if target is None or target == row.user_id:
            return (
                f"customer {customer_id} already linked"
                if row.user_id
                else f"customer {customer_id} not linked (no email yet)"
            )

        self.connection.execute(
            update(_customers).where(_customers.c.id == customer_id).values(user_id=target, linked_by=how)
        )
        self.connection.execute(update(_users).where(_users.c.id == target).values(stripe_customer_id=customer_id))
        log.info("customer linked customer=%s user_id=%s by=%s", customer_id, target, how)
        if row.user_id is not None:
            # The previous user loses this customer's subscriptions: with none left, back to free.
            self.connection.execute(
                update(_users)
                .where(_users.c.id == row.user_id, _users.c.stripe_customer_id == customer_id)
                .values(stripe_customer_id=None)
            )
            self.recompute_user(row.user_id, reset_when_none=True)
        self.recompute_user(target)
        return f"customer {customer_id} linked to user {target} by {how}"

    def _user_by_ref(self, ref: str) -> int | None:
        from kamiyo.domain.links import normalize_email

        if ref.isdigit() and len(ref) < 19:
            found = self.connection.execute(select(_users.c.id).where(_users.c.id == int(ref))).scalar()
            if found is not None:
                return int(found)
        email = normalize_email(ref)
        if email is not None:
            found = self.connection.execute(select(_users.c.id).where(_users.c.email == email)).scalar()
            return int(found) if found is not None else None
        return None

    def _user_for_email(self, email: str) -> int:
        """The user with ``email``, created (tier free) if there is none."""
        stmt = self._dialect.insert(_users).values(email=email, subscription_tier="free")
        self.connection.execute(stmt.on_conflict_do_nothing(index_elements=["email"]))
        return int(self.connection.execute(select(_users.c.id).where(_users.c.email == email)).scalar_one())

    def recompute_user(self, user_id: int, *, reset_when_none: bool = False) -> UserChange | None:
        """Derive the user's tier and status from all of their subscriptions; write if changed.

        A user with no subscriptions at all is left as is (nothing we know contradicts it),
        unless ``reset_when_none``: their subscriptions just moved to another user.
        """
        user = self.connection.execute(
            select(_users.c.email, _users.c.subscription_tier, _users.c.subscription_status)
            .where(_users.c.id == user_id)
            .with_for_update()
        ).one()
        rows = self.connection.execute(
            select(_subs.c.id, _subs.c.status, _subs.c.tier, _subs.c.stripe_created)
            .join(_customers, _customers.c.id == _subs.c.customer_id)
            .where(_customers.c.user_id == user_id)
        ).all()
        after = user_state((SubscriptionState(r.id, r.status, r.tier, r.stripe_created) for r in rows), self.tiers)
        before = UserState(tier=user.subscription_tier, status=user.subscription_status)
        if after is None and reset_when_none:
            after = UserState(tier="free", status=None)
        if after is None or after == before:
            return None
        self.connection.execute(
            update(_users)
            .where(_users.c.id == user_id)
            .values(subscription_tier=after.tier, subscription_status=after.status, updated_at=datetime.now(UTC))
        )
        log.info(
            "user state changed user_id=%s email=%s tier=%s->%s status=%s->%s",
            user_id,
            user.email,
            before.tier,
            after.tier,
            before.status,
            after.status,
        )
        return UserChange(user_id, user.email, before, after)
