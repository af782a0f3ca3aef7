"""Several workers draining one PostgreSQL inbox at once apply every event exactly once."""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from sqlalchemy import Engine, func, select

from kamiyo import synthetic
from kamiyo.config import Settings
from kamiyo.db.engine import make_engine
from kamiyo.db.migrate import upgrade
from kamiyo.db.models import events_table, subscriptions_table, users_table
from kamiyo.processing.worker import Worker
from kamiyo.webhooks.envelope import read_envelope
from kamiyo.webhooks.inbox import inbox_row, insert_new_events
from support import make_settings, throwaway_postgres

pytestmark = pytest.mark.postgres

CUSTOMERS = 160
WORKERS = 4
BASIC, PRO, ENTERPRISE = (
    synthetic.price("price_basic"),
    synthetic.price("price_pro_monthly"),
    synthetic.price("price_ent_2024", lookup_key="ent_yearly"),
)
START = 1_700_000_000


@pytest.fixture
def pg() -> Iterator[tuple[Engine, Settings]]:
    """A fresh migrated PostgreSQL database (this module is PostgreSQL only: SQLite has one writer)."""
    with throwaway_postgres() as url:
        settings = make_settings(url, worker_batch_size=40, worker_poll_seconds=0.02)
        engine = make_engine(settings)
        upgrade(engine)
        yield engine, settings
        engine.dispose()


def _sub(event_type: str, sub_id: str, cus: str, status: str, price: dict[str, Any], at: int) -> dict[str, Any]:
    obj = synthetic.subscription(sub_id=sub_id, customer_id=cus, status=status, price_obj=price, created=START)
    return synthetic.event(f"customer.subscription.{event_type}", obj, created=at)


def _customer_history(i: int) -> tuple[list[dict[str, Any]], str, tuple[str, str]]:
    """A customer's events in the order they happened, its email, and the tier/status they must leave."""
    cus, email, sub, t = f"cus_{i:04d}", f"user{i:04d}@example.com", f"sub_{i:04d}", START + 100
    invoice = synthetic.invoice(customer_id=cus, sub_id=sub, email=email.upper(), created=t + 2)
    failed = synthetic.invoice(customer_id=cus, sub_id=sub, email=email, paid=False, created=t + 6)
    events = [
        synthetic.event("customer.created", synthetic.customer(customer_id=cus, email=email, created=t), created=t),
        _sub("created", sub, cus, "trialing", PRO, t),
        _sub("trial_will_end", sub, cus, "trialing", PRO, t + 1),
        _sub("updated", sub, cus, "active", PRO, t + 2),
        synthetic.event("invoice.paid", invoice, created=t + 2),
        _sub("updated", sub, cus, "past_due", PRO, t + 6),
        synthetic.event("invoice.payment_failed", failed, created=t + 6),
    ]
    kind = i % 4
    if kind == 0:
        events.append(_sub("updated", sub, cus, "active", PRO, t + 9))
        expected = ("pro", "active")
    elif kind == 1:
        events.append(_sub("deleted", sub, cus, "canceled", PRO, t + 9))
        expected = ("free", "canceled")
    elif kind == 2:
        events.append(_sub("updated", sub, cus, "past_due", BASIC, t + 9))
        expected = ("basic", "past_due")
    else:
        second = f"sub_{i:04d}_b"
        events += [
            _sub("updated", sub, cus, "unpaid", PRO, t + 9),
            _sub("created", second, cus, "incomplete", ENTERPRISE, t + 10),
            _sub("updated", second, cus, "trialing", ENTERPRISE, t + 10),
        ]
        expected = ("enterprise", "trialing")
    events.append(synthetic.event("charge.refunded", {"id": f"ch_{i}", "object": "charge", "customer": cus}))
    return events, email, expected


class _CountingWorker(Worker):
    handled = 0

    def run_once(self, now: float | None = None) -> int:
        count = super().run_once(now)
        self.handled += count
        return count


def _count(engine: Engine, *where: Any) -> int:
    with engine.connect() as connection:
        return int(connection.execute(select(func.count()).select_from(events_table).where(*where)).scalar_one())


def test_concurrent_workers_apply_a_shuffled_backlog_exactly_once_with_correct_final_tiers(
    pg: tuple[Engine, Settings], caplog: pytest.LogCaptureFixture
) -> None:
    """Four workers drain ~2,000 shuffled events: each applied (or ignored) once at the first attempt,
    no batch deadlocks or rolls back, every subscription holds its last snapshot and every user the
    right tier/status."""
    engine, settings = pg
    caplog.set_level(logging.WARNING, logger="kamiyo.worker")
    rng = random.Random(20261127)
    histories = [_customer_history(i) for i in range(CUSTOMERS)]
    events = [event for history, _, _ in histories for event in history]
    deliveries = events + rng.sample(events, len(events) // 10)  # Stripe retries: 10% duplicates
    rng.shuffle(deliveries)
    rows: dict[str, dict[str, Any]] = {}
    for event in deliveries:
        body = orjson.dumps(event)
        envelope, _ = read_envelope(body)
        rows.setdefault(envelope.event_id, inbox_row(envelope, body, status="pending"))
    with engine.begin() as connection:
        assert len(insert_new_events(connection, list(rows.values()))) == len(events)

    workers = [_CountingWorker(engine, settings) for _ in range(WORKERS)]
    stop = threading.Event()
    threads = [threading.Thread(target=w.run, args=(stop,), name=f"worker-{n}") for n, w in enumerate(workers)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 60
    try:
        while _count(engine, events_table.c.status == "pending") and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=30)

    assert _count(engine, events_table.c.status == "pending") == 0, "backlog not drained in 60 s"
    troubles = [r.getMessage()[:300] for r in caplog.records if r.name == "kamiyo.worker"]
    assert troubles == [], "workers' batches failed (deadlock?)"
    assert _count(engine, events_table.c.status == "failed") == 0
    assert _count(engine, events_table.c.status == "ignored") == CUSTOMERS
    assert _count(engine, events_table.c.status == "applied") == len(events) - CUSTOMERS
    assert _count(engine, events_table.c.attempts != 1) == 0, "an event was attempted more than once"
    assert sum(w.handled for w in workers) == len(events)
    assert sum(1 for w in workers if w.handled) >= 2, [w.handled for w in workers]

    last_event_of_sub: dict[str, str] = {}
    for event in events:
        if event["type"].startswith("customer.subscription."):
            last_event_of_sub[event["data"]["object"]["id"]] = event["id"]
    with engine.connect() as connection:
        stored = dict(
            connection.execute(select(subscriptions_table.c.id, subscriptions_table.c.version_event_id)).all()
        )
        users = {
            row.email: (row.subscription_tier, row.subscription_status)
            for row in connection.execute(select(users_table))
        }
    assert stored == last_event_of_sub
    assert users == {email: expected for _, email, expected in histories}
