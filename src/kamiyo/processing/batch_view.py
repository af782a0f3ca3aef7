"""What one worker batch has read of customers, users and subscriptions, on SQLite.

A write transaction on SQLite takes the database's only write lock with its ``BEGIN IMMEDIATE``
and holds it until it ends: no one else can change a row in between, so a row read once stays
as read until this transaction writes it. The Store reads each customer, user and user's
subscriptions once per batch, answers the batch's later reads of them from here, and updates
the copy with every write it makes. (On PostgreSQL other workers commit between a batch's
statements: the Store reads every time.)

The batch's rows are not read up front: that needs every payload parsed before the first event
is applied, and 200 parsed payloads kept alive at once cost more in garbage collection than the
statements they would save.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from kamiyo.domain.entitlement import SubscriptionState


@dataclass(slots=True)
class CustomerRow:
    """The columns of a ``stripe_customers`` row that applying reads."""

    user_id: int | None
    email: str | None
    email_seen_at: int


@dataclass(slots=True)
class UserRow:
    """A ``users`` row as ``recompute_user`` reads it, with the user's override (if any)."""

    email: str
    tier: str
    status: str | None
    override_tier: str | None
    override_expires: datetime | None


class BatchView:
    """Rows as this transaction has read or written them; a row not here is read from the database."""

    def __init__(self) -> None:
        self.customers: dict[str, CustomerRow] = {}
        self.users: dict[int, UserRow] = {}
        # Complete per user: every subscription of a user's linked customers, or the user is absent.
        self._subscriptions: dict[int, dict[str, SubscriptionState]] = {}
        self._owner: dict[str, int] = {}  # subscription id -> the user whose list above holds it

    def subscriptions(self, user_id: int) -> list[SubscriptionState] | None:
        """The user's subscriptions; None when they are not known here."""
        known = self._subscriptions.get(user_id)
        return None if known is None else list(known.values())

    def set_subscriptions(self, user_id: int, states: list[SubscriptionState]) -> None:
        self._subscriptions[user_id] = {state.id: state for state in states}
        for state in states:
            self._owner[state.id] = user_id

    def subscription_stored(self, state: SubscriptionState, user_id: int | None) -> None:
        """A subscription was written, its customer linked to ``user_id`` (None: not linked)."""
        owner = self._owner.pop(state.id, None)
        if owner is not None:
            self._subscriptions[owner].pop(state.id, None)
        if user_id is not None and user_id in self._subscriptions:
            self._subscriptions[user_id][state.id] = state
            self._owner[state.id] = user_id

    def subscriptions_moved(self, *user_ids: int | None) -> None:
        """A customer changed hands between these users: their subscriptions are read again."""
        for user_id in user_ids:
            for sub_id in self._subscriptions.pop(user_id, {}) if user_id is not None else ():
                del self._owner[sub_id]

    def user_state_written(self, user_id: int, tier: str, status: str | None) -> None:
        user = self.users.get(user_id)
        if user is not None:
            user.tier, user.status = tier, status
