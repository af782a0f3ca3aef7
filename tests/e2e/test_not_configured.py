"""A server started without a webhook secret: 503 (Stripe retries), and nothing is lost once it is set."""

from __future__ import annotations

import time

import pytest

from e2e.harness import ServerFactory
from kamiyo import synthetic

pytestmark = pytest.mark.slow


def test_without_secret_deliveries_get_503_then_redelivery_after_the_fix_applies(servers: ServerFactory) -> None:
    """Empty STRIPE_WEBHOOK_SECRET: error logged, 503 stored nothing; restart with it: retries land the tier."""
    server = servers("sqlite", STRIPE_WEBHOOK_SECRET="")
    assert server.wait_for_log("ERROR", "webhook secret not configured", "STRIPE_WEBHOOK_SECRET")

    customer, sub_id = synthetic.new_id("cus"), synthetic.new_id("sub")
    email = f"waiting.{customer}@example.com"
    now = int(time.time())
    sub = synthetic.subscription(sub_id=sub_id, customer_id=customer, price_obj=synthetic.price("price_pro_monthly"))
    inv = synthetic.invoice(customer_id=customer, sub_id=sub_id, email=email)
    events = [
        synthetic.event("customer.subscription.created", sub, created=now - 1),
        synthetic.event("invoice.payment_succeeded", inv, created=now),
    ]
    for event in events:
        response = server.deliver(event)
        assert response.status_code == 503, response.text
        assert response.json()["reason"] == "not_configured"
        assert server.stored_count(event["id"]) == 0
    assert len(server.wait_for_log("ERROR", "webhook rejected reason=not_configured", count=len(events))) == len(events)
    assert server.post(b'{"type":"ping"}').status_code == 503  # not 400: no secret, nothing can be verified

    server.restart(STRIPE_WEBHOOK_SECRET="whsec_test_primary_0123456789abcdef")
    for event in events:  # Stripe's retries: same events, fresh signatures
        response = server.deliver(event)
        assert (response.status_code, response.json()["duplicate"]) == (200, False)
    server.wait_for_user(email, ("pro", "active"))
