"""What applying a batch of events knows of the database: the rows it loaded and its changes. Pure.

The apply engine (processing/engine.py) loads into a ``BatchState`` every row a batch can reach
(the customers it names, the users linked to them or named by email or reference, every
customer and subscription of those users), the rules of domain/rules.py decide on it one event
at a time, and the engine flushes what changed. Each event is an item: ``begin_item`` starts a
journal of its changes, ``undo_item`` reverts them when the event fails (its neighbours in the
batch keep theirs), ``end_item`` keeps them.

Users created by the batch have no id until they are inserted: they get a provisional negative
id here, which the engine maps to the real one when it flushes.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, NamedTuple

from kamiyo.domain.subscriptions import SubscriptionSnapshot, Version
from kamiyo.domain.tiers import TierMap


class StoredSubscription(NamedTuple):
    """What the rules read of a stored subscription: its customer, entitlement and version."""

    id: str
    customer_id: str
    status: str
    tier: str
    stripe_created: int
    version: Version


class CustomerRow(NamedTuple):
    id: str
    user_id: int | None
    email: str | None
    email_seen_at: int
    linked_by: str | None = None


class UserRow(NamedTuple):
    id: int
    email: str
    tier: str
    status: str | None
    stripe_customer_id: str | None
    override_tier: str | None = None
    override_expires: datetime | None = None


_MISSING: Any = object()


@dataclass
class Needs:
    """The keys a batch's events name, for the engine to load: what ``BatchState`` must hold."""

    customers: set[str] = field(default_factory=set)
    subscriptions: set[str] = field(default_factory=set)
    emails: set[str] = field(default_factory=set)
    user_ids: set[int] = field(default_factory=set)


class BatchState:
    """The loaded rows, as the batch's decisions so far leave them, and what to write back."""

    def __init__(self, tiers: TierMap, now: datetime) -> None:
        self.tiers = tiers
        self.now = now
        self.subscriptions: dict[str, StoredSubscription] = {}
        self.subscriptions_of: dict[str, tuple[str, ...]] = {}  # customer id -> subscription ids
        self.customers: dict[str, CustomerRow] = {}
        self.users: dict[int, UserRow] = {}
        self.user_by_email: dict[str, int] = {}
        self.customers_of: dict[int, tuple[str, ...]] = {}  # user id -> customer ids
        # What to write: snapshots to upsert, customers and users inserted or changed.
        self.snapshots: dict[str, SubscriptionSnapshot] = {}
        self.new_customers: dict[str, None] = {}
        self.changed_customers: dict[str, None] = {}
        self.new_users: dict[int, None] = {}
        self.changed_users: dict[int, None] = {}
        self.state_changed: dict[int, None] = {}  # users whose tier or status was written
        self._next_provisional = -1
        self._journal: list[tuple[dict[Any, Any], Any, Any]] | None = None

    # -- loading (outside any item) ---------------------------------------------------------

    def loaded_customer(self, row: CustomerRow) -> None:
        if row.id not in self.customers:
            self.customers[row.id] = row
            self.subscriptions_of.setdefault(row.id, ())

    def loaded_user(self, row: UserRow, customer_ids: Iterable[str]) -> None:
        if row.id not in self.users:
            self.users[row.id] = row
            self.user_by_email[row.email] = row.id
            self.customers_of[row.id] = tuple(sorted(customer_ids))

    def loaded_subscription(self, row: StoredSubscription) -> None:
        if row.id not in self.subscriptions:
            self.subscriptions[row.id] = row
            self.subscriptions_of[row.customer_id] = (*self.subscriptions_of.get(row.customer_id, ()), row.id)

    def missing(self, needs: Needs) -> Needs:
        """Of ``needs``, what this state does not hold yet (a dry run loads chunk after chunk)."""
        return Needs(
            customers=needs.customers - self.customers.keys(),
            subscriptions=needs.subscriptions - self.subscriptions.keys(),
            emails=needs.emails - self.user_by_email.keys(),
            user_ids=needs.user_ids - self.users.keys(),
        )

    # -- items ------------------------------------------------------------------------------

    def begin_item(self) -> None:
        self._journal = []

    def end_item(self) -> None:
        self._journal = None

    def undo_item(self) -> None:
        """Revert every change since ``begin_item``."""
        journal, self._journal = self._journal or [], None
        for mapping, key, old in reversed(journal):
            if old is _MISSING:
                mapping.pop(key, None)
            else:
                mapping[key] = old

    def _put(self, mapping: dict[Any, Any], key: Any, value: Any) -> None:
        if self._journal is not None:
            self._journal.append((mapping, key, mapping.get(key, _MISSING)))
        mapping[key] = value

    # -- changes ----------------------------------------------------------------------------

    def put_snapshot(self, snap: SubscriptionSnapshot) -> None:
        old = self.subscriptions.get(snap.id)
        if old is not None and old.customer_id != snap.customer_id:
            moved = tuple(sid for sid in self.subscriptions_of.get(old.customer_id, ()) if sid != snap.id)
            self._put(self.subscriptions_of, old.customer_id, moved)
        if old is None or old.customer_id != snap.customer_id:
            self._put(
                self.subscriptions_of, snap.customer_id, (*self.subscriptions_of.get(snap.customer_id, ()), snap.id)
            )
        stored = StoredSubscription(
            snap.id, snap.customer_id, snap.status, snap.tier, snap.stripe_created, snap.version
        )
        self._put(self.subscriptions, snap.id, stored)
        self._put(self.snapshots, snap.id, snap)

    def new_customer(self, customer_id: str) -> CustomerRow:
        row = CustomerRow(customer_id, None, None, 0)
        self._put(self.customers, customer_id, row)
        self._put(self.subscriptions_of, customer_id, self.subscriptions_of.get(customer_id, ()))
        self._put(self.new_customers, customer_id, None)
        return row

    def put_customer(self, row: CustomerRow) -> None:
        old = self.customers.get(row.id)
        if old is not None and old.user_id != row.user_id:
            if old.user_id is not None:
                kept = tuple(cid for cid in self.customers_of.get(old.user_id, ()) if cid != row.id)
                self._put(self.customers_of, old.user_id, kept)
            if row.user_id is not None:
                self._put(self.customers_of, row.user_id, (*self.customers_of.get(row.user_id, ()), row.id))
        self._put(self.customers, row.id, row)
        if row.id not in self.new_customers:
            self._put(self.changed_customers, row.id, None)

    def new_user(self, email: str, tier: str) -> UserRow:
        user_id = self._next_provisional
        self._next_provisional -= 1
        row = UserRow(user_id, email, tier, None, None)
        self._put(self.users, user_id, row)
        self._put(self.user_by_email, email, user_id)
        self._put(self.customers_of, user_id, ())
        self._put(self.new_users, user_id, None)
        return row

    def put_user(self, row: UserRow, *, state_changed: bool = False) -> None:
        self._put(self.users, row.id, row)
        if row.id not in self.new_users:
            self._put(self.changed_users, row.id, None)
            if state_changed:
                self._put(self.state_changed, row.id, None)

    def subscriptions_of_user(self, user_id: int) -> list[StoredSubscription]:
        return [
            self.subscriptions[sid]
            for cid in self.customers_of.get(user_id, ())
            for sid in self.subscriptions_of.get(cid, ())
        ]
