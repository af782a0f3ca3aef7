"""The events the console tests deliver: a customer, a subscription (mapped or not), a payment."""

from __future__ import annotations

import time
from typing import Any

import orjson

from kamiyo import synthetic

UNMAPPED_PRICE = "price_team_2026"
PAYMENT_SECRET = "pi_3Qx9SecretValue_secret_Zk81Lq0pWm"


def customer_created(email: str, customer_id: str) -> dict[str, Any]:
    return synthetic.event("customer.created", synthetic.customer(customer_id=customer_id, email=email))


def subscription_created(customer_id: str, price_id: str = "price_pro_monthly") -> dict[str, Any]:
    sub = synthetic.subscription(
        sub_id=synthetic.new_id("sub"), customer_id=customer_id, price_obj=synthetic.price(price_id)
    )
    return synthetic.event("customer.subscription.created", sub, created=int(time.time()))


def payment_with_client_secret(customer_id: str) -> dict[str, Any]:
    """A payment_intent.succeeded whose object carries a client secret (never to be shown)."""
    intent = synthetic.payment_intent(customer_id=customer_id, email=None)
    intent["client_secret"] = PAYMENT_SECRET
    return synthetic.event("payment_intent.succeeded", intent)


def deep_event(depth: int = 990) -> tuple[str, bytes]:
    """A signed-to-be event whose object holds a value nested ``depth`` deep (JSON written by hand:
    the serializers stop far earlier)."""
    event_id = synthetic.new_id("evt")
    shell = synthetic.event("charge.refunded", {"id": "ch_deep", "object": "charge", "deep": "DEEP"}, event_id=event_id)
    nested = '{"n":' * depth + '"bottom"' + "}" * depth
    return event_id, orjson.dumps(shell).replace(b'"DEEP"', nested.encode())
