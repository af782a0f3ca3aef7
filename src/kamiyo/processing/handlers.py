"""One table from event type to handler, grouped by the Stripe object the event is about.

A handler takes the Store (bound to the open transaction) and the stored event, applies it and
returns a one-line description of what it did. Types not in the table are stored as "ignored".
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from kamiyo.domain.links import invoice_subscription_id, link_hint
from kamiyo.domain.subscriptions import object_id, read_subscription
from kamiyo.processing.store import Store


@dataclass(frozen=True)
class StoredEvent:
    """An inbox row with its payload parsed."""

    inbox_id: int
    event_id: str
    type: str
    created: int
    obj: Mapping[str, Any]


Handler = Callable[[Store, StoredEvent], str]


# -- subscriptions ---------------------------------------------------------------------------


def sync_subscription(store: Store, event: StoredEvent) -> str:
    """Converge the stored subscription on this snapshot, then its user's tier and status."""
    snap = read_subscription(
        event.obj, store.tiers, created=event.created, event_type=event.type, event_id=event.event_id
    )
    if not store.upsert_subscription(snap):
        return f"{snap.id}: older than the stored snapshot, left as is"
    user_id = store.customer_user(snap.customer_id)
    summary = f"{snap.id}: {snap.status} {snap.tier}"
    if user_id is None:
        return f"{summary}; customer {snap.customer_id} not linked yet, applies once an event names its email"
    change = store.recompute_user(user_id)
    if change is None:
        return f"{summary}; user {user_id} unchanged"
    before, after = change.before, change.after
    return f"{summary}; user {change.email} {before.tier}/{before.status} -> {after.tier}/{after.status}"


# -- customers, checkout, invoices, payment intents: they link customers to users --------------


def link_customer(store: Store, event: StoredEvent) -> str:
    hint = link_hint(event.type, event.obj)
    if hint.customer_id is None:
        return "no customer on the object, nothing to link"
    return store.link_customer(hint.customer_id, hint.email, hint.user_ref, event.created)


def record_invoice(store: Store, event: StoredEvent) -> str:
    outcome = link_customer(store, event)
    obj = event.obj
    subscription = invoice_subscription_id(obj) or "none"
    return (
        f"invoice {object_id(obj.get('id'))} status={obj.get('status')} reason={obj.get('billing_reason')} "
        f"attempt={obj.get('attempt_count')} subscription={subscription}; {outcome}"
    )


HANDLERS: Mapping[str, Handler] = {
    # subscriptions
    "customer.subscription.created": sync_subscription,
    "customer.subscription.updated": sync_subscription,
    "customer.subscription.deleted": sync_subscription,
    "customer.subscription.paused": sync_subscription,
    "customer.subscription.resumed": sync_subscription,
    "customer.subscription.trial_will_end": sync_subscription,
    # invoices
    "invoice.payment_succeeded": record_invoice,
    "invoice.paid": record_invoice,
    "invoice.payment_failed": record_invoice,
    # payment intents
    "payment_intent.succeeded": link_customer,
    "payment_intent.payment_failed": link_customer,
    # checkout
    "checkout.session.completed": link_customer,
    # customers
    "customer.created": link_customer,
    "customer.updated": link_customer,
}

HANDLED_TYPES = frozenset(HANDLERS)
