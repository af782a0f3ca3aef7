"""A first end-to-end check of the apply path through the store, on both databases."""

from __future__ import annotations

from sqlalchemy import Engine, text

from kamiyo import synthetic
from kamiyo.config import Settings
from kamiyo.processing.worker import Worker
from kamiyo.webhooks.envelope import read_envelope
from kamiyo.webhooks.inbox import inbox_row, insert_new_events


def _store(engine: Engine, event: dict) -> None:
    import orjson

    body = orjson.dumps(event)
    envelope, _ = read_envelope(body)
    with engine.begin() as connection:
        insert_new_events(connection, [inbox_row(envelope, body, status="pending")])


def test_subscription_before_email_applies_once_invoice_links_customer(engine: Engine, settings: Settings) -> None:
    """A subscription for an unknown customer waits; the invoice's email links it and the tier lands."""
    sub = synthetic.subscription(sub_id="sub_1", customer_id="cus_1", price_obj=synthetic.price("price_pro_monthly"))
    _store(engine, synthetic.event("customer.subscription.created", sub, created=100))
    Worker(engine, settings).run_once()
    inv = synthetic.invoice(customer_id="cus_1", sub_id="sub_1", email="Ann@Example.com")
    _store(engine, synthetic.event("invoice.payment_succeeded", inv, created=101))
    Worker(engine, settings).run_once()
    with engine.connect() as connection:
        row = connection.execute(
            text("SELECT email, subscription_tier, subscription_status FROM users WHERE email = 'ann@example.com'")
        ).one()
    assert tuple(row) == ("ann@example.com", "pro", "active")
