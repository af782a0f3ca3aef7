"""Realistic Stripe events built offline: the stand-in for ``stripe trigger``, and the tests' factory.

Shapes follow Stripe's API reference for both payload generations: before 2025-03-31.basil
(periods on the subscription, ``invoice.subscription``, ``payment_intent.invoice``) and from
basil on (periods on items, ``invoice.parent.subscription_details``).
"""

from __future__ import annotations

import secrets
import time
from typing import Any

BASIL = "2025-03-31.basil"
LATEST_API_VERSION = "2026-10-28.endive"
LEGACY_API_VERSION = "2024-06-20"
_MONTH = 30 * 24 * 3600

SUPPORTED_TRIGGERS = (
    "customer.created",
    "customer.updated",
    "checkout.session.completed",
    "customer.subscription.created",
    "customer.subscription.updated",
    "customer.subscription.deleted",
    "customer.subscription.paused",
    "customer.subscription.resumed",
    "customer.subscription.trial_will_end",
    "invoice.payment_succeeded",
    "invoice.paid",
    "invoice.payment_failed",
    "payment_intent.succeeded",
    "payment_intent.payment_failed",
)


def new_id(prefix: str) -> str:
    return f"{prefix}_test{secrets.token_hex(10)}"


def is_basil_or_later(api_version: str) -> bool:
    return api_version[:10] >= BASIL[:10]


def price(
    price_id: str = "price_pro_monthly", *, lookup_key: str | None = None, tier: str | None = None
) -> dict[str, Any]:
    return {
        "id": price_id,
        "object": "price",
        "active": True,
        "currency": "usd",
        "lookup_key": lookup_key,
        "metadata": {"tier": tier} if tier else {},
        "product": "prod_" + price_id.removeprefix("price_"),
        "recurring": {"interval": "month", "interval_count": 1},
        "type": "recurring",
        "unit_amount": 2900,
    }


def subscription(
    *,
    sub_id: str,
    customer_id: str,
    status: str = "active",
    price_obj: dict[str, Any] | None = None,
    created: int | None = None,
    api_version: str = LATEST_API_VERSION,
    cancel_at_period_end: bool = False,
    extra_prices: tuple[dict[str, Any], ...] = (),
) -> dict[str, Any]:
    """A subscription with one item per price: ``price_obj`` first, then ``extra_prices`` (add-ons)."""
    created = int(time.time()) if created is None else created
    period = {"current_period_start": created, "current_period_end": created + _MONTH}
    item: dict[str, Any] = {
        "id": "si_" + sub_id.removeprefix("sub_"),
        "object": "subscription_item",
        "price": price_obj or price(),
        "quantity": 1,
        "subscription": sub_id,
    }
    items = [item] + [{**item, "id": f"{item['id']}_{n}", "price": p} for n, p in enumerate(extra_prices, start=2)]
    sub: dict[str, Any] = {
        "id": sub_id,
        "object": "subscription",
        "customer": customer_id,
        "status": status,
        "created": created,
        "start_date": created,
        "livemode": False,
        "cancel_at_period_end": cancel_at_period_end,
        "cancel_at": created + _MONTH if cancel_at_period_end else None,
        "canceled_at": created if status == "canceled" else None,
        "ended_at": created if status in ("canceled", "incomplete_expired") else None,
        "trial_end": created + 14 * 24 * 3600 if status == "trialing" else None,
        "collection_method": "charge_automatically",
        "metadata": {},
        "items": {
            "object": "list",
            "data": items,
            "has_more": False,
            "url": f"/v1/subscription_items?subscription={sub_id}",
        },
    }
    if is_basil_or_later(api_version):
        for each in items:
            each.update(period)
    else:
        sub.update(period)
        sub["plan"] = {"id": item["price"]["id"], "object": "plan"}
    return sub


def customer(*, customer_id: str, email: str | None, created: int | None = None) -> dict[str, Any]:
    return {
        "id": customer_id,
        "object": "customer",
        "email": email,
        "created": int(time.time()) if created is None else created,
        "livemode": False,
        "metadata": {},
        "name": None,
    }


def invoice(
    *,
    customer_id: str,
    sub_id: str,
    email: str | None,
    paid: bool = True,
    api_version: str = LATEST_API_VERSION,
    created: int | None = None,
    price_id: str = "price_pro_monthly",
) -> dict[str, Any]:
    created = int(time.time()) if created is None else created
    inv_id = new_id("in")
    inv: dict[str, Any] = {
        "id": inv_id,
        "object": "invoice",
        "customer": customer_id,
        "customer_email": email,
        "status": "paid" if paid else "open",
        "billing_reason": "subscription_create",
        "attempt_count": 1,
        "attempted": True,
        "amount_due": 2900,
        "amount_paid": 2900 if paid else 0,
        "currency": "usd",
        "created": created,
        "livemode": False,
        "next_payment_attempt": None if paid else created + 3 * 24 * 3600,
    }
    line: dict[str, Any] = {"id": new_id("il"), "object": "line_item", "amount": 2900}
    if is_basil_or_later(api_version):
        inv["parent"] = {
            "type": "subscription_details",
            "quote_details": None,
            "subscription_details": {"subscription": sub_id, "metadata": {}},
        }
        line["pricing"] = {"type": "price_details", "price_details": {"price": price_id, "product": "prod_x"}}
    else:
        inv["subscription"] = sub_id
        inv["paid"] = paid
        inv["charge"] = new_id("ch") if paid else None
        inv["payment_intent"] = new_id("pi")
        line["price"] = {"id": price_id, "object": "price"}
    inv["lines"] = {"object": "list", "data": [line], "has_more": False}
    return inv


def payment_intent(*, customer_id: str | None, email: str | None, succeeded: bool = True) -> dict[str, Any]:
    return {
        "id": new_id("pi"),
        "object": "payment_intent",
        "amount": 2900,
        "currency": "usd",
        "customer": customer_id,
        "receipt_email": email,
        "status": "succeeded" if succeeded else "requires_payment_method",
        "created": int(time.time()),
        "livemode": False,
        "last_payment_error": None if succeeded else {"code": "card_declined", "message": "Your card was declined."},
    }


def checkout_session(
    *, customer_id: str, sub_id: str, email: str, client_reference_id: str | None = None
) -> dict[str, Any]:
    return {
        "id": new_id("cs"),
        "object": "checkout.session",
        "mode": "subscription",
        "status": "complete",
        "payment_status": "paid",
        "customer": customer_id,
        "customer_details": {"email": email, "name": None},
        "customer_email": None,
        "client_reference_id": client_reference_id,
        "subscription": sub_id,
        "livemode": False,
    }


def event(
    event_type: str,
    obj: dict[str, Any],
    *,
    created: int | None = None,
    event_id: str | None = None,
    api_version: str = LATEST_API_VERSION,
    previous_attributes: dict[str, Any] | None = None,
    livemode: bool = False,
) -> dict[str, Any]:
    """Wrap ``obj`` in an Event object as Stripe sends it (a test-mode event unless ``livemode``)."""
    data: dict[str, Any] = {"object": obj}
    if previous_attributes is not None:
        data["previous_attributes"] = previous_attributes
    return {
        "id": event_id or new_id("evt"),
        "object": "event",
        "api_version": api_version,
        "created": int(time.time()) if created is None else created,
        "data": data,
        "livemode": livemode,
        "pending_webhooks": 1,
        "request": {"id": new_id("req"), "idempotency_key": None},
        "type": event_type,
    }


def trigger_event(
    event_type: str,
    *,
    email: str,
    price_obj: dict[str, Any],
    customer_id: str | None = None,
    sub_id: str | None = None,
    api_version: str = LATEST_API_VERSION,
    livemode: bool = False,
) -> dict[str, Any]:
    """A realistic event of ``event_type``, as ``stripe trigger`` would produce, in live mode or test
    mode (``livemode``: the event and its object say so, as Stripe's do)."""
    customer_id = customer_id or new_id("cus")
    sub_id = sub_id or new_id("sub")
    kind = event_type.rsplit(".", 1)
    if event_type.startswith("customer.subscription."):
        status = {
            "customer.subscription.deleted": "canceled",
            "customer.subscription.paused": "paused",
            "customer.subscription.trial_will_end": "trialing",
        }.get(event_type, "active")
        obj = subscription(
            sub_id=sub_id, customer_id=customer_id, status=status, price_obj=price_obj, api_version=api_version
        )
    elif event_type in ("customer.created", "customer.updated"):
        obj = customer(customer_id=customer_id, email=email)
    elif event_type == "checkout.session.completed":
        obj = checkout_session(customer_id=customer_id, sub_id=sub_id, email=email)
    elif event_type.startswith("invoice."):
        obj = invoice(
            customer_id=customer_id,
            sub_id=sub_id,
            email=email,
            paid=kind[1] != "payment_failed",
            api_version=api_version,
            price_id=str(price_obj.get("id")),
        )
    elif event_type.startswith("payment_intent."):
        obj = payment_intent(customer_id=customer_id, email=email, succeeded=kind[1] == "succeeded")
    else:
        raise ValueError(f"cannot build {event_type!r}; supported: {', '.join(SUPPORTED_TRIGGERS)}")
    obj["livemode"] = livemode
    return event(event_type, obj, api_version=api_version, livemode=livemode)
