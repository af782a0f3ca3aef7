"""What the reconcile tests do to a database and to the fake Stripe account, and read back."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson
from sqlalchemy import Engine, func, select

from kamiyo import synthetic
from kamiyo.config import Settings
from kamiyo.db.models import Base, audit_log_table, customers_table, events_table, subscriptions_table, users_table
from kamiyo.operations.audit import AuditEntry, list_audit
from kamiyo.processing.worker import Worker
from kamiyo.reconcile.retry import RetryPolicy
from kamiyo.webhooks.envelope import read_envelope
from kamiyo.webhooks.inbox import inbox_row, insert_new_events
from stripe_api import FakeStripe

# Fast retries: the tests prove that retries happen and end, not how long Stripe would wait.
TEST_RETRY = RetryPolicy(attempts=4, base_seconds=0.01, cap_seconds=0.05)


@dataclass
class Db:
    """The database under test, and what the tests do to it and read from it."""

    engine: Engine
    settings: Settings

    def deliver(self, *events: dict[str, Any]) -> None:
        """Store events in the inbox as the webhook endpoint does."""
        for event in events:
            body = orjson.dumps(event)
            envelope, _ = read_envelope(body)
            with self.engine.begin() as connection:
                insert_new_events(connection, [inbox_row(envelope, body, status="pending")])

    def drain(self, worker: Worker | None = None) -> int:
        worker = worker or Worker(self.engine, self.settings)
        total = 0
        for _ in range(200):
            handled = worker.run_once()
            if not handled:
                return total
            total += handled
        raise AssertionError("the worker is still busy after 200 batches")

    def pending_events(self) -> int:
        with self.engine.connect() as connection:
            return len(connection.execute(select(events_table.c.id).where(events_table.c.status == "pending")).all())

    def add_user(self, email: str, tier: str = "free", status: str | None = None) -> int:
        with self.engine.begin() as connection:
            return int(
                connection.execute(
                    users_table.insert()
                    .values(email=email, subscription_tier=tier, subscription_status=status)
                    .returning(users_table.c.id)
                ).scalar_one()
            )

    def set_user_state(self, email: str, tier: str, status: str | None) -> None:
        """What the runbook's Option 5 does by hand: UPDATE users SET subscription_tier = ..."""
        with self.engine.begin() as connection:
            connection.execute(
                users_table.update()
                .where(users_table.c.email == email)
                .values(subscription_tier=tier, subscription_status=status)
            )

    def state(self, email: str) -> tuple[str, str | None] | None:
        with self.engine.connect() as connection:
            row = connection.execute(
                select(users_table.c.subscription_tier, users_table.c.subscription_status).where(
                    users_table.c.email == email
                )
            ).first()
        return None if row is None else (row[0], row[1])

    def states(self) -> dict[str, tuple[str, str | None]]:
        with self.engine.connect() as connection:
            rows = connection.execute(
                select(users_table.c.email, users_table.c.subscription_tier, users_table.c.subscription_status)
            ).all()
        return {row[0]: (row[1], row[2]) for row in rows}

    def subscription(self, sub_id: str) -> dict[str, Any] | None:
        with self.engine.connect() as connection:
            row = (
                connection.execute(select(subscriptions_table).where(subscriptions_table.c.id == sub_id))
                .mappings()
                .first()
            )
        return dict(row) if row is not None else None

    def customer_user(self, customer_id: str) -> int | None:
        with self.engine.connect() as connection:
            return connection.execute(
                select(customers_table.c.user_id).where(customers_table.c.id == customer_id)
            ).scalar()

    def audit_mark(self) -> int:
        """The newest audit entry's id: the log is never emptied, so a test reads only what follows it."""
        with self.engine.connect() as connection:
            return int(connection.execute(select(func.coalesce(func.max(audit_log_table.c.id), 0))).scalar_one())

    def audit_since(self, mark: int) -> list[AuditEntry]:
        """The audit entries written after ``mark``, oldest first."""
        with self.engine.connect() as connection:
            return [e for e in reversed(list_audit(connection, limit=100_000)) if e.id > mark]

    def dump(self) -> dict[str, list[tuple[Any, ...]]]:
        """Every row of every table but ``reconcile_runs``, for before/after comparisons."""
        tables: dict[str, list[tuple[Any, ...]]] = {}
        with self.engine.connect() as connection:
            for table in Base.metadata.sorted_tables:
                if table.name != "reconcile_runs":
                    tables[table.name] = sorted(tuple(map(repr, row)) for row in connection.execute(select(table)))
        return tables


def paying_customer(
    account: FakeStripe,
    n: int,
    *,
    status: str = "active",
    price: str = "price_pro_monthly",
    created: int | None = None,
    email: str | None = None,
) -> dict[str, Any]:
    """Customer ``cus_n`` (``user{n}@example.com``) with subscription ``sub_n``, in the fake account."""
    customer_id = f"cus_{n:05d}"
    account.add_customer(customer_id, email if email is not None else f"user{n}@example.com")
    sub = synthetic.subscription(
        sub_id=f"sub_{n:05d}",
        customer_id=customer_id,
        status=status,
        price_obj=synthetic.price(price),
        created=created if created is not None else 1_700_000_000 + n,
    )
    account.put_subscription(sub)
    return sub


def webhook_for(sub: dict[str, Any], event_type: str, *, created: int) -> dict[str, Any]:
    """The event Stripe would send for ``sub`` (its customer as an id, as in a webhook)."""
    obj = {**sub, "customer": sub["customer"]["id"] if isinstance(sub["customer"], dict) else sub["customer"]}
    return synthetic.event(event_type, obj, created=created)
