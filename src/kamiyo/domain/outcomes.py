"""What applying an event did, as data: the inbox's statuses and an event's ``Outcome``. Pure.

The apply engine writes an ``Outcome`` on each event it applies (``webhook_events.outcome``, a
JSON column, as orjson writes the dataclass: a part the event did not have is null) and the
one-line ``detail`` made from it (``describe``); whoever needs to know which subscription,
customer and users an event touched, and how a user's tier and status moved (the incident
report, the console, ``kamiyo users show``, a replay's dry run), reads the ``Outcome``. The
sentence is for people and is never parsed. Rows applied before the column existed have only
their ``detail``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class InboxStatus(StrEnum):
    """Where an inbox row stands: ``pending`` until the worker takes it up, then ``applied``,
    ``ignored`` (a type nothing handles, or the other Stripe mode) or ``failed`` (parked after its
    last attempt). A failed attempt before the last leaves it ``pending``, with a backoff."""

    PENDING = "pending"
    APPLIED = "applied"
    IGNORED = "ignored"
    FAILED = "failed"


class LinkResult(StrEnum):
    """What an event naming a customer did to the customer's link to a user."""

    LINKED = "linked"  # linked to a user by this event (matched or created by email, or client_reference_id)
    ALREADY_LINKED = "already_linked"
    NOT_LINKED = "not_linked"  # no email (or user reference) to link it by yet


@dataclass(frozen=True)
class SubscriptionOutcome:
    """The subscription snapshot an event carried (or a sync read)."""

    id: str
    status: str
    tier: str
    stored: bool  # False: the stored snapshot was newer, this one was left aside


@dataclass(frozen=True)
class InvoiceOutcome:
    """The invoice an ``invoice.*`` event was about (the link to its customer is ``customer``)."""

    id: str | None
    status: str | None
    billing_reason: str | None
    attempt_count: int | None
    subscription: str | None


@dataclass(frozen=True)
class CustomerOutcome:
    """The customer an event named, and what became of its link to a user."""

    id: str
    link: LinkResult
    user_id: int | None = None  # the linked user, if any (after the event); None for a user a dry run would create
    linked_by: str | None = None  # "email" | "client_reference_id", when this event linked it


@dataclass(frozen=True)
class UserChange:
    """A user whose tier or status an event changed, from → to, and why."""

    user_id: int | None  # None: a user a dry run would create (it has no id yet)
    email: str
    tier_from: str
    tier_to: str
    status_from: str | None
    status_to: str | None
    why: str


@dataclass(frozen=True)
class Outcome:
    """Everything an applied event did. Empty fields: the event had nothing of that kind."""

    subscription: SubscriptionOutcome | None = None
    invoice: InvoiceOutcome | None = None
    customer: CustomerOutcome | None = None
    users: tuple[UserChange, ...] = field(default_factory=tuple)
    note: str | None = None  # a fact that fits no field above ("no customer on the object")

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {}
        if self.subscription is not None:
            data["subscription"] = _fields(self.subscription)
        if self.invoice is not None:
            data["invoice"] = _fields(self.invoice)
        if self.customer is not None:
            data["customer"] = {**_fields(self.customer), "link": self.customer.link.value}
        if self.users:
            data["users"] = [_fields(change) for change in self.users]
        if self.note is not None:
            data["note"] = self.note
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Outcome:
        customer = data.get("customer")
        return cls(
            subscription=SubscriptionOutcome(**data["subscription"]) if data.get("subscription") else None,
            invoice=InvoiceOutcome(**data["invoice"]) if data.get("invoice") else None,
            customer=CustomerOutcome(**{**customer, "link": LinkResult(customer["link"])}) if customer else None,
            users=tuple(UserChange(**change) for change in data.get("users", ())),
            note=data.get("note"),
        )

    def describe(self) -> str:
        """The one-line sentence of ``detail`` and of the "applied" log line."""
        parts: list[str] = []
        sub = self.subscription
        if sub is not None:
            parts.append(
                f"{sub.id}: {sub.status} {sub.tier}"
                if sub.stored
                else f"{sub.id}: older than the stored snapshot, left as is"
            )
        invoice = self.invoice
        if invoice is not None:
            parts.append(
                f"invoice {invoice.id} status={invoice.status} reason={invoice.billing_reason} "
                f"attempt={invoice.attempt_count} subscription={invoice.subscription or 'none'}"
            )
        customer = self.customer
        if customer is not None:
            if customer.link is LinkResult.LINKED:
                user = "a new user" if customer.user_id is None else f"user {customer.user_id}"
                parts.append(f"customer {customer.id} linked to {user} by {customer.linked_by}")
            elif customer.link is LinkResult.ALREADY_LINKED:
                parts.append(f"customer {customer.id} already linked")
            elif sub is not None and sub.stored:
                parts.append(f"customer {customer.id} not linked yet, applies once an event names its email")
            else:
                parts.append(f"customer {customer.id} not linked (no email yet)")
        for change in self.users:
            parts.append(
                f"user {change.email} {change.tier_from}/{change.status_from} -> {change.tier_to}/{change.status_to}"
            )
        if sub is not None and sub.stored and customer is not None and customer.user_id is not None and not self.users:
            parts.append(f"user {customer.user_id} unchanged")
        if self.note is not None:
            parts.append(self.note)
        return "; ".join(parts) or "nothing to apply"


def _fields(value: Any) -> dict[str, Any]:
    return {name: getattr(value, name) for name in value.__dataclass_fields__}
