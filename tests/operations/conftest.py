"""Operator tools on a real database: one migrated SQLite and one PostgreSQL database per session.

Each test starts from empty tables, except ``audit_log``, which the database refuses to empty:
tests read only the audit entries about their own users and events (``audit_about``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import Engine

from integration.conftest import Harness, delete_all_rows
from kamiyo import synthetic
from kamiyo.config import Settings
from kamiyo.db.engine import make_engine
from kamiyo.db.migrate import upgrade
from kamiyo.operations.audit import AuditEntry, list_audit
from support import make_settings, throwaway_postgres

PRO = synthetic.price("price_pro_monthly")
BASIC = synthetic.price("price_basic")
CREATED = 1_700_000_000


@pytest.fixture(scope="session", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def ops_settings(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    if request.param == "sqlite":
        yield make_settings(f"sqlite:///{tmp_path_factory.mktemp('ops') / 'kamiyo.db'}", sqlite_synchronous="NORMAL")
    else:
        with throwaway_postgres() as url:
            yield make_settings(url)


@pytest.fixture(scope="session")
def ops_engine(ops_settings: Settings) -> Iterator[Engine]:
    engine = make_engine(ops_settings)
    upgrade(engine)
    yield engine
    engine.dispose()


@pytest.fixture
def ops(ops_engine: Engine, ops_settings: Settings) -> Harness:
    """The shared database of this backend, every table but the audit log empty."""
    delete_all_rows(ops_engine)
    return Harness(ops_engine, ops_settings)


class Customer:
    """One Stripe customer of a unique email (audit entries of earlier tests never match it)."""

    def __init__(self, name: str) -> None:
        self.customer_id = synthetic.new_id("cus")
        self.sub_id = synthetic.new_id("sub")
        self.email = f"{name}.{self.customer_id[-8:]}@example.com"

    def created(self, at: int = CREATED) -> dict[str, Any]:
        return synthetic.event(
            "customer.created", synthetic.customer(customer_id=self.customer_id, email=self.email), created=at
        )

    def subscription(
        self,
        status: str = "active",
        *,
        price: dict[str, Any] = PRO,
        at: int = CREATED + 10,
        event_type: str | None = None,
    ) -> dict[str, Any]:
        obj = synthetic.subscription(
            sub_id=self.sub_id, customer_id=self.customer_id, status=status, price_obj=price, created=CREATED
        )
        kind = event_type or (
            "customer.subscription.deleted" if status == "canceled" else "customer.subscription.updated"
        )
        return synthetic.event(kind, obj, created=at)

    def invoice(self, at: int = CREATED + 20) -> dict[str, Any]:
        obj = synthetic.invoice(customer_id=self.customer_id, sub_id=self.sub_id, email=None, created=at)
        return synthetic.event("invoice.paid", obj, created=at)


def audit_about(engine: Engine, target: str) -> list[AuditEntry]:
    """The audit entries about ``target``, oldest first."""
    with engine.connect() as connection:
        return list(reversed(list_audit(connection, target=target, limit=1000)))
