"""Which customer, email and user reference an event names. Pure functions.

A user is matched (by case-insensitive email) or created from whichever event names a
customer's email first; ``client_reference_id`` on a Checkout Session names our own user.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kamiyo.domain.subscriptions import object_id

_EMAIL_RE = re.compile(r"[^@\s]+@[^@\s]+")


@dataclass(frozen=True)
class LinkHint:
    customer_id: str | None
    email: str | None
    user_ref: str | None = None  # client_reference_id: our user id or email


def normalize_email(value: Any) -> str | None:
    """Lower-cased, trimmed email, or None when it does not look like one."""
    if not isinstance(value, str):
        return None
    email = value.strip().lower()
    return email if 3 <= len(email) <= 320 and _EMAIL_RE.fullmatch(email) else None


def link_hint(event_type: str, obj: Mapping[str, Any]) -> LinkHint:
    """The customer and email that an event's object names, if any."""
    kind = event_type.split(".", 1)[0]
    if event_type in ("customer.created", "customer.updated", "customer.deleted"):
        return LinkHint(customer_id=object_id(obj.get("id")), email=normalize_email(obj.get("email")))
    if kind == "checkout":
        details = obj.get("customer_details")
        email = details.get("email") if isinstance(details, Mapping) else None
        ref = obj.get("client_reference_id")
        return LinkHint(
            customer_id=object_id(obj.get("customer")),
            email=normalize_email(email) or normalize_email(obj.get("customer_email")),
            user_ref=ref.strip() if isinstance(ref, str) and ref.strip() else None,
        )
    if kind == "invoice":
        return LinkHint(customer_id=object_id(obj.get("customer")), email=normalize_email(obj.get("customer_email")))
    if kind == "payment_intent":
        return LinkHint(customer_id=object_id(obj.get("customer")), email=normalize_email(obj.get("receipt_email")))
    return LinkHint(customer_id=object_id(obj.get("customer")), email=None)


def invoice_subscription_id(invoice: Mapping[str, Any]) -> str | None:
    """The invoice's subscription: ``invoice.subscription`` before basil, ``parent.subscription_details`` after."""
    legacy = object_id(invoice.get("subscription"))
    if legacy:
        return legacy
    parent = invoice.get("parent")
    if isinstance(parent, Mapping) and parent.get("type") == "subscription_details":
        details = parent.get("subscription_details")
        if isinstance(details, Mapping):
            return object_id(details.get("subscription"))
    return None
