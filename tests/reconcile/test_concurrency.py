"""A sync running while Stripe keeps changing subscriptions and webhooks keep arriving.

Every change made in the (fake) Stripe account is delivered as a webhook, some at once, some
late and out of order, while the worker applies them and syncs list the account page by page.
At the end every user must have exactly the state Stripe's final subscriptions give: no
webhook's update lost, none reverted by a sync that read an older state.
"""

from __future__ import annotations

import random
import threading
import time
from typing import Any

from kamiyo import synthetic
from kamiyo.domain.entitlement import ENTITLED_STATUSES
from kamiyo.processing.worker import Worker
from kamiyo.reconcile.gateway import StripeApiGateway
from kamiyo.reconcile.sync import sync_subscriptions
from reconcile.harness import Db, paying_customer, webhook_for
from stripe_api import FakeStripe

SUBSCRIPTIONS = 250
ROUNDS = 3
# Not terminal: a canceled subscription never comes back in Stripe, and a terminal snapshot wins.
STATUSES = ("active", "past_due", "unpaid", "trialing", "paused")
PRICES = {"price_basic": "basic", "price_pro_monthly": "pro", "ent_yearly": "enterprise"}


def test_a_sync_during_a_stream_of_webhooks_loses_and_reverts_no_update(
    db: Db, account: FakeStripe, gateway: StripeApiGateway
) -> None:
    for n in range(SUBSCRIPTIONS):
        paying_customer(account, n)
        db.deliver(synthetic.event("customer.created", account.customer(f"cus_{n:05d}"), created=1_700_000_000))
    db.drain()
    account.latency = 0.15  # each API answer takes a while: the syncs overlap the changes
    late: list[dict[str, Any]] = []
    rng = random.Random(3)
    stop = threading.Event()
    worker = threading.Thread(target=Worker(db.engine, db.settings).run, args=(stop,), daemon=True)
    worker.start()

    def change_subscriptions() -> None:
        for _ in range(ROUNDS):
            # At most one change per subscription per second (`created` has one-second resolution).
            time.sleep(1.1 - time.time() % 1)
            for n in rng.sample(range(SUBSCRIPTIONS), 60):
                with account.lock:
                    sub = account.subscription(f"sub_{n:05d}")
                    price = rng.choice(sorted(PRICES))
                    sub.update(status=rng.choice(STATUSES))
                    sub["items"]["data"][0]["price"] = synthetic.price(price)
                    account.put_subscription(sub)
                    event = webhook_for(sub, "customer.subscription.updated", created=int(time.time()))
                if rng.random() < 0.3:
                    late.append(event)  # delivered after everything else, out of order
                else:
                    db.deliver(event)

    mutator = threading.Thread(target=change_subscriptions, daemon=True)
    mutator.start()
    syncs = 0
    try:
        while mutator.is_alive() or syncs == 0:
            sync_subscriptions(db.engine, gateway, db.settings.price_tiers)
            syncs += 1
        mutator.join()
        rng.shuffle(late)
        db.deliver(*late)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and db.pending_events():
            time.sleep(0.05)
    finally:
        stop.set()
        worker.join(timeout=10)

    assert syncs >= 2
    assert db.pending_events() == 0
    expected = {
        f"user{n}@example.com": _entitlement(account.subscription(f"sub_{n:05d}")) for n in range(SUBSCRIPTIONS)
    }
    actual = db.states()
    wrong = {email: (actual.get(email), state) for email, state in expected.items() if actual.get(email) != state}
    assert wrong == {}


def _entitlement(sub: dict[str, Any]) -> tuple[str, str | None]:
    tier = PRICES[sub["items"]["data"][0]["price"]["id"]]
    return (tier, sub["status"]) if sub["status"] in ENTITLED_STATUSES else ("free", sub["status"])
