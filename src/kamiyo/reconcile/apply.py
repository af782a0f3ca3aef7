"""One page of subscriptions read from Stripe's API, applied as a set.

The rules are those of ``processing/store.py``, the webhook path, applied to up to 100
subscriptions with a handful of statements instead of a dozen per subscription:

- every snapshot goes through the very statement of ``Store.upsert_subscription`` (the
  stale-write guard in the upsert's WHERE), executed once with all the page's rows;
- a customer seen with an email is linked as ``Store.link_customer`` links it (the email is
  recorded if it is the newest seen; an unlinked customer is linked to the user with that email,
  who is created if there is none; a linked customer stays linked);
- every user of the page's customers gets the tier and status ``Store.recompute_user`` would
  give; a user with a manual override is handed to ``Store.recompute_user`` itself.

``tests/reconcile/test_apply.py`` checks, for any page and any stored state, that the result
is exactly that of ``Store``'s per-row calls.

Locks (PostgreSQL) follow the Store's order: subscription rows (the upsert), then customer rows,
then user rows (``FOR UPDATE`` before their subscriptions are read).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, bindparam, select, update
from sqlalchemy.dialects import postgresql, sqlite

from kamiyo.db.models import customers_table, subscriptions_table, user_overrides_table, users_table
from kamiyo.domain.entitlement import SubscriptionState, UserState, user_state
from kamiyo.domain.subscriptions import Version
from kamiyo.domain.tiers import TierMap
from kamiyo.processing.store import Store, subscription_row, subscription_upsert
from kamiyo.reconcile.reader import SyncItem

log = logging.getLogger("kamiyo.state")
_users = users_table
_customers = customers_table
_subs = subscriptions_table
_overrides = user_overrides_table


@dataclass(frozen=True)
class UserDrift:
    """A user whose tier or status a page changed, and why."""

    user_id: int
    email: str
    before: UserState
    after: UserState
    reasons: tuple[str, ...]


@dataclass
class PageResult:
    stored: int = 0  # snapshots written (new, or newer than the stored one)
    kept: int = 0  # snapshots older than the stored one: left as is
    linked: int = 0  # customers linked to a user by email
    drift: list[UserDrift] = field(default_factory=list)


class _PageStatements:
    """The page's statements, built once per dialect (building a statement costs more than running it)."""

    def __init__(self, dialect: Any) -> None:
        self.stored_versions = select(
            _subs.c.id,
            _subs.c.status,
            _subs.c.tier,
            _subs.c.version_terminal,
            _subs.c.version_created,
            _subs.c.version_rank,
            _subs.c.version_event_id,
        ).where(_subs.c.id.in_(_ids()))
        self.ensure_customers = dialect.insert(_customers).on_conflict_do_nothing(index_elements=["id"])
        # No RETURNING: SQLite's executemany is then a loop in C. The statement decides which
        # snapshots win; the counts and reasons are read off the versions read just before.
        self.upsert_subscriptions = subscription_upsert(dialect)
        self.customers = (
            select(_customers.c.id, _customers.c.user_id, _customers.c.email, _customers.c.email_seen_at)
            .where(_customers.c.id.in_(_ids()))
            .with_for_update()
        )
        self.set_customer_email = (
            update(_customers)
            .where(_customers.c.id == bindparam("_id"))
            .values(email=bindparam("email"), email_seen_at=bindparam("email_seen_at"))
        )
        self.insert_users = dialect.insert(_users).on_conflict_do_nothing(index_elements=["email"])
        self.users_by_email = select(_users.c.id, _users.c.email).where(
            _users.c.email.in_(bindparam("emails", expanding=True))
        )
        self.link_customer = (
            update(_customers)
            .where(_customers.c.id == bindparam("_id"))
            .values(user_id=bindparam("_user"), linked_by="email")
        )
        self.set_user_customer = (
            update(_users).where(_users.c.id == bindparam("_user")).values(stripe_customer_id=bindparam("_id"))
        )
        # Each user, locked, with whether an override exists (then the Store decides, in full).
        self.users = (
            select(
                _users.c.id,
                _users.c.email,
                _users.c.subscription_tier,
                _users.c.subscription_status,
                _overrides.c.user_id.label("override"),
            )
            .select_from(_users.outerjoin(_overrides, _overrides.c.user_id == _users.c.id))
            .where(_users.c.id.in_(_ids()))
            .order_by(_users.c.id)
            .with_for_update(of=_users)
        )
        self.subscriptions = (
            select(_customers.c.user_id, _subs.c.id, _subs.c.status, _subs.c.tier, _subs.c.stripe_created)
            .join(_customers, _customers.c.id == _subs.c.customer_id)
            .where(_customers.c.user_id.in_(_ids()))
        )
        self.set_user_state = (
            update(_users)
            .where(_users.c.id == bindparam("_user"))
            .values(
                subscription_tier=bindparam("tier"), subscription_status=bindparam("status"), updated_at=bindparam("at")
            )
        )


def _ids() -> Any:
    return bindparam("ids", expanding=True)


_STATEMENTS = {"postgresql": _PageStatements(postgresql), "sqlite": _PageStatements(sqlite)}


def apply_page(connection: Connection, tiers: TierMap, items: Sequence[SyncItem], *, seen_at: int) -> PageResult:
    """Apply ``items`` in the open transaction; ``seen_at`` is when the API was read (Stripe's clock)."""
    result = PageResult()
    if not items:
        return result
    sql = _STATEMENTS[connection.dialect.name]
    # One snapshot per subscription id (a list page never repeats one; a caller's list might).
    unique = sorted({item.snapshot.id: item for item in reversed(items)}.values(), key=_lock_order)
    customer_ids = sorted({item.snapshot.customer_id for item in unique})
    reasons: dict[str, list[str]] = defaultdict(list)  # customer id -> what changed for it

    # 1. Store.upsert_subscription: the customer row, then the snapshot through the stale-write guard.
    before = {row.id: row for row in connection.execute(sql.stored_versions, {"ids": [i.snapshot.id for i in unique]})}
    connection.execute(sql.ensure_customers, [{"id": c} for c in customer_ids])
    connection.execute(sql.upsert_subscriptions, [subscription_row(i.snapshot) for i in unique])
    for item in unique:
        snap = item.snapshot
        old = before.get(snap.id)
        if old is not None and _version(old) >= snap.version:
            result.kept += 1
            continue
        result.stored += 1
        if old is None:
            reasons[snap.customer_id].append(f"{snap.id} was missing here; Stripe has it {snap.status} ({snap.tier})")
        elif (old.status, old.tier) != (snap.status, snap.tier):
            reasons[snap.customer_id].append(
                f"{snap.id} was {old.status} ({old.tier}) here; Stripe has it {snap.status} ({snap.tier})"
            )

    # 2. Store.link_customer(customer, email, None, seen_at) for each customer seen with an email.
    emails = {item.snapshot.customer_id: item.email for item in unique if item.email}
    links = {row.id: row for row in connection.execute(sql.customers, {"ids": customer_ids})}
    newer_emails = [
        {"_id": cid, "email": email, "email_seen_at": seen_at}
        for cid, email in sorted(emails.items())
        if seen_at >= links[cid].email_seen_at and email != links[cid].email
    ]
    if newer_emails:
        connection.execute(sql.set_customer_email, newer_emails)
    user_of: dict[str, int | None] = {cid: row.user_id for cid, row in links.items()}
    unlinked = {cid: email for cid, email in sorted(emails.items()) if user_of.get(cid) is None}
    if unlinked:
        new_emails = sorted(set(unlinked.values()))
        connection.execute(sql.insert_users, [{"email": email, "subscription_tier": "free"} for email in new_emails])
        user_by_email = {
            row.email: int(row.id) for row in connection.execute(sql.users_by_email, {"emails": new_emails})
        }
        new_links = [{"_id": cid, "_user": user_by_email[email]} for cid, email in unlinked.items()]
        connection.execute(sql.link_customer, new_links)
        connection.execute(sql.set_user_customer, new_links)
        for cid, email in unlinked.items():
            user_of[cid] = user_by_email[email]
            reasons[cid].append(f"customer {cid} linked by email")
            log.debug("customer linked customer=%s user_id=%s by=email", cid, user_by_email[email])
        result.linked = len(new_links)

    # 3. Store.recompute_user for every user of these customers.
    customers_of: dict[int, list[str]] = defaultdict(list)
    for cid in customer_ids:
        user_id = user_of.get(cid)
        if user_id is not None:
            customers_of[int(user_id)].append(cid)
    if customers_of:
        result.drift = _recompute(connection, sql, tiers, customers_of, reasons)
    return result


def _recompute(
    connection: Connection,
    sql: _PageStatements,
    tiers: TierMap,
    customers_of: dict[int, list[str]],
    reasons: dict[str, list[str]],
) -> list[UserDrift]:
    user_ids = sorted(customers_of)
    users = {int(row.id): row for row in connection.execute(sql.users, {"ids": user_ids})}
    overridden = {user_id for user_id, row in users.items() if row.override is not None}
    subscriptions: dict[int, list[SubscriptionState]] = defaultdict(list)
    for row in connection.execute(sql.subscriptions, {"ids": [u for u in user_ids if u not in overridden]}):
        subscriptions[int(row.user_id)].append(SubscriptionState(row.id, row.status, row.tier, row.stripe_created))

    drift: list[UserDrift] = []
    writes: list[dict[str, Any]] = []
    now = datetime.now(UTC)
    store: Store | None = None
    for user_id in user_ids:
        user = users[user_id]
        current = UserState(tier=user.subscription_tier, status=user.subscription_status)
        why = tuple(reason for cid in customers_of[user_id] for reason in reasons.get(cid, ()))
        if user_id in overridden:
            # An override decides instead of the subscriptions: the Store's own rule, in full.
            store = store or Store(connection, tiers)
            change = store.recompute_user(user_id)
            if change is not None:
                drift.append(UserDrift(user_id, user.email, change.before, change.after, (*why, "manual override")))
            continue
        after = user_state(subscriptions[user_id], tiers)
        if after is None or after == current:
            continue
        writes.append({"_user": user_id, "tier": after.tier, "status": after.status, "at": now})
        drift.append(UserDrift(user_id, user.email, current, after, why or (_UNEXPLAINED,)))
        log.debug(
            "user state changed user_id=%s email=%s tier=%s->%s status=%s->%s",
            user_id,
            user.email,
            current.tier,
            after.tier,
            current.status,
            after.status,
        )
    if writes:
        connection.execute(sql.set_user_state, writes)
    return drift


_UNEXPLAINED = "the users row disagreed with the subscriptions stored for it (a manual edit, or a missed event)"


def _version(row: Any) -> Version:
    return Version(row.version_terminal, row.version_created, row.version_rank, row.version_event_id)


def _lock_order(item: SyncItem) -> tuple[str, str]:
    """The worker's order on PostgreSQL: customer by customer, so the two queue rather than deadlock."""
    return item.snapshot.customer_id, item.snapshot.id
