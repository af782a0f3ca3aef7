"""The worker with Stripe's API: customers looked up, and (STRIPE_VERIFY_EVENTS) subscriptions re-fetched."""

from __future__ import annotations

import random
import time
from dataclasses import replace

from kamiyo import synthetic
from kamiyo.processing.worker import Worker
from kamiyo.reconcile.gateway import StripeApiGateway
from kamiyo.telemetry.metrics import PROBE_EVENT_PREFIX
from reconcile.harness import TEST_RETRY, Db, paying_customer, webhook_for
from stripe_api import FakeStripe


def test_a_subscription_event_for_an_unknown_customer_looks_the_customer_up_and_applies_at_once(
    db: Db, account: FakeStripe, gateway: StripeApiGateway
) -> None:
    sub = paying_customer(account, 1)
    db.deliver(webhook_for(sub, "customer.subscription.created", created=int(time.time()) - 60))
    without_key = replace(db.settings, stripe_secret_key=None)

    db.drain(Worker(db.engine, without_key))
    assert db.state("user1@example.com") is None  # waits for an event that names the email
    assert account.requests == []

    other = paying_customer(account, 2)
    db.deliver(webhook_for(other, "customer.subscription.created", created=int(time.time()) - 60))
    db.drain(Worker(db.engine, db.settings, gateway=gateway))

    assert db.state("user2@example.com") == ("pro", "active")
    assert [path for path, _ in account.requests] == ["/v1/customers/cus_00002"]


def test_verified_events_apply_the_api_state_whatever_order_the_payloads_come_in(
    db: Db, account: FakeStripe, gateway: StripeApiGateway
) -> None:
    sub = paying_customer(account, 1, status="past_due")  # Stripe's state now
    now = int(time.time())
    # A burst of five events, each payload a state the subscription went through, shuffled.
    burst = [
        webhook_for({**sub, "status": status}, event_type, created=now - 50 + step)
        for step, (status, event_type) in enumerate(
            [
                ("incomplete", "customer.subscription.created"),
                ("trialing", "customer.subscription.updated"),
                ("active", "customer.subscription.updated"),
                ("past_due", "customer.subscription.updated"),
                ("active", "customer.subscription.updated"),  # a stale payload, delivered late
            ]
        )
    ]
    random.Random(7).shuffle(burst)
    db.deliver(*burst)
    settings = replace(db.settings, stripe_verify_events=True)

    db.drain(Worker(db.engine, settings, gateway=gateway))

    assert db.state("user1@example.com") == ("pro", "past_due")
    assert account.count_requests("/v1/subscriptions/sub_00001") == 1  # five events, one fetch
    stored = db.subscription("sub_00001")
    assert stored is not None
    assert stored["version_event_id"].startswith("verified:evt_")


def test_when_the_api_keeps_failing_the_worker_applies_the_events_as_delivered(
    db: Db, account: FakeStripe, gateway: StripeApiGateway
) -> None:
    sub = paying_customer(account, 1)
    db.deliver(synthetic.event("customer.created", account.customer("cus_00001"), created=int(time.time()) - 60))
    db.deliver(webhook_for(sub, "customer.subscription.created", created=int(time.time()) - 30))
    account.fail_next(500, 50)
    settings = replace(db.settings, stripe_verify_events=True)

    db.drain(Worker(db.engine, settings, gateway=gateway))

    assert db.state("user1@example.com") == ("pro", "active")
    assert len(account.requests) == TEST_RETRY.attempts  # one request retried, then the payload was used


def test_doctors_probe_event_never_reaches_stripes_api(db: Db, account: FakeStripe, gateway: StripeApiGateway) -> None:
    probe = synthetic.trigger_event(
        "customer.subscription.created",
        email="",
        price_obj=synthetic.price("price_pro_monthly"),
        customer_id="cus_kamiyo_probe_1",
        sub_id="sub_kamiyo_probe_1",
    )
    probe["id"] = PROBE_EVENT_PREFIX + "1"
    db.deliver(probe)

    db.drain(Worker(db.engine, replace(db.settings, stripe_verify_events=True), gateway=gateway))

    assert account.requests == []
