"""Writes that apply events, all inside the caller's transaction.

Lock order, kept by every path so that concurrent workers on PostgreSQL cannot deadlock one
another within one event: subscription row → customer row → user row. Locking the customer row
before reading whether it is linked, and the user row before reading the user's subscriptions,
closes the write-skew gaps between two workers applying events of one customer at once.
(SQLite has a single writer, so ``FOR UPDATE`` is simply not rendered there.)
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, bindparam, select, tuple_, update
from sqlalchemy.dialects import postgresql, sqlite

from kamiyo.db.models import customers_table, subscriptions_table, user_overrides_table, users_table
from kamiyo.domain.entitlement import SubscriptionState, UserState, user_state
from kamiyo.domain.overrides import override_in_force, override_state
from kamiyo.domain.subscriptions import SubscriptionSnapshot
from kamiyo.domain.tiers import FREE, TierMap

log = logging.getLogger("kamiyo.state")
_users = users_table
_customers = customers_table
_subs = subscriptions_table
_overrides = user_overrides_table


def subscription_row(snap: SubscriptionSnapshot) -> dict[str, Any]:
    """The ``stripe_subscriptions`` row of a snapshot."""
    return {
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


@functools.cache
def subscription_upsert(dialect: Any) -> Any:
    """INSERT ... ON CONFLICT DO UPDATE with the stale-write guard: a row is only replaced by a
    greater version. Built once per dialect; executed with one row, or with a page of rows
    (``reconcile/apply.py``), it is the same statement either way."""
    stmt = dialect.insert(_subs)
    stored = tuple_(_subs.c.version_terminal, _subs.c.version_created, _subs.c.version_rank, _subs.c.version_event_id)
    incoming = tuple_(
        stmt.excluded.version_terminal,
        stmt.excluded.version_created,
        stmt.excluded.version_rank,
        stmt.excluded.version_event_id,
    )
    columns = [column.name for column in _subs.columns if column.name != "id"]
    return stmt.on_conflict_do_update(
        index_elements=["id"],
        set_={name: getattr(stmt.excluded, name) for name in columns},
        where=stored < incoming,
    )


class _Statements:
    """Every statement of the apply path, built once per dialect and run with bound parameters.

    Building a Core statement and computing its cache key costs several times more than
    running it; on the worker's hot path that was most of the time an event took.
    """

    def __init__(self, dialect: Any) -> None:
        self.upsert_subscription = subscription_upsert(dialect).returning(_subs.c.id)
        self.ensure_customer = dialect.insert(_customers).on_conflict_do_nothing(index_elements=["id"])
        self.customer_user = select(_customers.c.user_id).where(_customers.c.id == bindparam("cid")).with_for_update()
        self.customer_row = (
            select(_customers.c.user_id, _customers.c.email, _customers.c.email_seen_at)
            .where(_customers.c.id == bindparam("cid"))
            .with_for_update()
        )
        self.set_customer_email = (
            update(_customers)
            .where(_customers.c.id == bindparam("cid"))
            .values(email=bindparam("new_email"), email_seen_at=bindparam("seen_at"))
        )
        self.link_customer = (
            update(_customers)
            .where(_customers.c.id == bindparam("cid"))
            .values(user_id=bindparam("uid"), linked_by=bindparam("how"))
        )
        self.set_user_customer = (
            update(_users).where(_users.c.id == bindparam("uid")).values(stripe_customer_id=bindparam("cid"))
        )
        self.unset_user_customer = (
            update(_users)
            .where(_users.c.id == bindparam("uid"), _users.c.stripe_customer_id == bindparam("cid"))
            .values(stripe_customer_id=None)
        )
        self.user_by_id = select(_users.c.id).where(_users.c.id == bindparam("uid"))
        self.user_by_email = select(_users.c.id).where(_users.c.email == bindparam("address"))
        self.insert_user = dialect.insert(_users).on_conflict_do_nothing(index_elements=["email"])
        self.user_state = (
            select(_users.c.email, _users.c.subscription_tier, _users.c.subscription_status)
            .where(_users.c.id == bindparam("uid"))
            .with_for_update()
        )
        self.set_user_state = (
            update(_users)
            .where(_users.c.id == bindparam("uid"))
            .values(
                subscription_tier=bindparam("tier"),
                subscription_status=bindparam("status"),
                updated_at=bindparam("now"),
            )
        )
        self.user_subscriptions = (
            select(_subs.c.id, _subs.c.status, _subs.c.tier, _subs.c.stripe_created)
            .join(_customers, _customers.c.id == _subs.c.customer_id)
            .where(_customers.c.user_id == bindparam("uid"))
        )
        self.user_override = select(_overrides.c.tier, _overrides.c.expires_at).where(
            _overrides.c.user_id == bindparam("uid")
        )


_STATEMENTS = {"postgresql": _Statements(postgresql), "sqlite": _Statements(sqlite)}


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
        self._sql = _STATEMENTS["postgresql" if connection.dialect.name == "postgresql" else "sqlite"]

    # -- subscriptions ---------------------------------------------------------------------

    def upsert_subscription(self, snap: SubscriptionSnapshot) -> bool:
        """Store ``snap`` unless the stored snapshot is newer; True when it was stored.

        The stale-write guard lives in the upsert's WHERE, so it holds under any concurrency.
        """
        self.ensure_customer(snap.customer_id)
        # RETURNING, not rowcount: psycopg reports rowcount -1 for this upsert, which is truthy.
        return self.connection.execute(self._sql.upsert_subscription, subscription_row(snap)).first() is not None

    # -- customers and users ---------------------------------------------------------------

    def ensure_customer(self, customer_id: str) -> None:
        self.connection.execute(self._sql.ensure_customer, {"id": customer_id})

    def customer_user(self, customer_id: str) -> int | None:
        """The user a customer is linked to, locking the customer row."""
        row = self.connection.execute(self._sql.customer_user, {"cid": customer_id}).first()
        return row.user_id if row is not None else None

    def link_customer(self, customer_id: str, email: str | None, user_ref: str | None, seen_at: int) -> str:
        """Record what an event says of a customer; link it to a user. Returns what happened.

        The first email seen for an unlinked customer links it (matching or creating the user);
        a linked customer stays linked, except that ``client_reference_id`` (our own user)
        moves it. Users whose subscriptions change hands are recomputed.
        """
        self.ensure_customer(customer_id)
        row = self.connection.execute(self._sql.customer_row, {"cid": customer_id}).one()
        if email and seen_at >= row.email_seen_at and email != row.email:
            self.connection.execute(
                self._sql.set_customer_email, {"cid": customer_id, "new_email": email, "seen_at": seen_at}
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

        self.connection.execute(self._sql.link_customer, {"cid": customer_id, "uid": target, "how": how})
        self.connection.execute(self._sql.set_user_customer, {"uid": target, "cid": customer_id})
        log.info("customer linked customer=%s user_id=%s by=%s", customer_id, target, how)
        if row.user_id is not None:
            # The previous user loses this customer's subscriptions: with none left, back to free.
            self.connection.execute(self._sql.unset_user_customer, {"uid": row.user_id, "cid": customer_id})
            self.recompute_user(row.user_id, reset_when_none=True)
        self.recompute_user(target)
        return f"customer {customer_id} linked to user {target} by {how}"

    def _user_by_ref(self, ref: str) -> int | None:
        from kamiyo.domain.links import normalize_email

        if ref.isdigit() and len(ref) < 19:
            found = self.connection.execute(self._sql.user_by_id, {"uid": int(ref)}).scalar()
            if found is not None:
                return int(found)
        email = normalize_email(ref)
        if email is not None:
            found = self.connection.execute(self._sql.user_by_email, {"address": email}).scalar()
            return int(found) if found is not None else None
        return None

    def _user_for_email(self, email: str) -> int:
        """The user with ``email``, created (tier free) if there is none."""
        self.connection.execute(self._sql.insert_user, {"email": email, "subscription_tier": FREE})
        return int(self.connection.execute(self._sql.user_by_email, {"address": email}).scalar_one())

    def recompute_user(self, user_id: int, *, reset_when_none: bool = False) -> UserChange | None:
        """Derive the user's tier and status from all of their subscriptions; write if changed.

        A manual override in force (``kamiyo users set-tier``) wins over the subscriptions, and
        since every path that applies a change ends here (webhooks, replay, sync), over all of
        them. A user with no subscriptions at all is left as is (nothing we know contradicts
        it), unless ``reset_when_none``: their subscriptions just moved to another user, or
        their override ended.
        """
        user = self.connection.execute(self._sql.user_state, {"uid": user_id}).one()
        after = self.derived_state(user_id, reset_when_none=reset_when_none)
        before = UserState(tier=user.subscription_tier, status=user.subscription_status)
        if after is None or after == before:
            return None
        self.connection.execute(
            self._sql.set_user_state,
            {"uid": user_id, "tier": after.tier, "status": after.status, "now": datetime.now(UTC)},
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

    def derived_state(self, user_id: int, *, reset_when_none: bool = False) -> UserState | None:
        """What the user's tier and status should be: an override in force, else Stripe's state."""
        override_tier = self.override_tier(user_id)
        if override_tier is not None:
            return override_state(override_tier)
        state = self.stripe_state(user_id)
        if state is None and reset_when_none:
            return UserState(tier=FREE, status=None)
        return state

    def stripe_state(self, user_id: int) -> UserState | None:
        """The tier and status the user's subscriptions give; None when they have none."""
        rows = self.connection.execute(self._sql.user_subscriptions, {"uid": user_id}).all()
        return user_state((SubscriptionState(r.id, r.status, r.tier, r.stripe_created) for r in rows), self.tiers)

    def override_tier(self, user_id: int) -> str | None:
        """The tier of the user's manual override if one is in force now (an expired one is ignored
        even before the worker's sweep deletes it)."""
        row = self.connection.execute(self._sql.user_override, {"uid": user_id}).first()
        if row is None or not override_in_force(row.expires_at, datetime.now(UTC)):
            return None
        return str(row.tier)
