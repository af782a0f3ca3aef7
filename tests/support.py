"""Shared test support: throwaway databases, settings, and signing exactly as Stripe does."""

from __future__ import annotations

import os
import sqlite3
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import orjson
import psycopg
import pytest
from sqlalchemy.engine import make_url

from kamiyo.config import Settings
from kamiyo.domain.tiers import parse_price_tiers
from kamiyo.webhooks.signature import signature_header

SECRET = "whsec_test_primary_0123456789abcdef"
OLD_SECRET = "whsec_test_rolled_fedcba9876543210"
PRICE_TIERS = "price_basic=basic,price_pro_monthly=pro,ent_yearly=enterprise"
PG_ADMIN_URL = os.environ.get("KAMIYO_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require_postgres() -> None:
    """Skip when PostgreSQL is unreachable on a developer machine; fail in CI (CI=true)."""
    try:
        with psycopg.connect(PG_ADMIN_URL, connect_timeout=3):
            return
    except psycopg.OperationalError as exc:
        message = f"PostgreSQL unreachable at {PG_ADMIN_URL}: {exc}"
        if in_ci():
            pytest.fail(message)
        pytest.skip(message)


@contextmanager
def throwaway_postgres() -> Iterator[str]:
    """Create a fresh database, yield its SQLAlchemy URL, drop it afterwards."""
    require_postgres()
    name = f"kamiyo_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    url = make_url(PG_ADMIN_URL).set(drivername="postgresql+psycopg", database=name)
    try:
        yield url.render_as_string(hide_password=False)
    finally:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextmanager
def sqlite_write_locked(path: str | Path) -> Iterator[sqlite3.Connection]:
    """SQLite's write lock held by a connection of its own, as another process (an operator's open
    ``sqlite3``) holds it, until the block ends (rolled back). Taking it waits for the service's
    own writes of the moment (its idle probe, say) to end."""
    other = sqlite3.connect(path, isolation_level=None, timeout=10)
    try:
        other.execute("BEGIN IMMEDIATE")
        yield other
    finally:
        if other.in_transaction:
            other.execute("ROLLBACK")
        other.close()


def make_settings(database_url: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "database_url": database_url,
        "webhook_secrets": (SECRET,),
        "price_tiers": parse_price_tiers(PRICE_TIERS),
        "worker_poll_seconds": 0.05,
        "retry_base_seconds": 0.0,
        # Tests read health and metrics right after changing what they report.
        "health_cache_seconds": 0.0,
    }
    values.update(overrides)
    return Settings(**values)


def signed(
    event: dict[str, Any], secret: str = SECRET, *, timestamp: int | None = None
) -> tuple[bytes, dict[str, str]]:
    """The body and headers of a delivery of ``event``, signed as Stripe signs it."""
    body = orjson.dumps(event)
    return body, signed_headers(body, secret, timestamp=timestamp)


def signed_headers(body: bytes, secret: str = SECRET, *, timestamp: int | None = None) -> dict[str, str]:
    """The headers of a delivery of these exact bytes, signed as Stripe signs them."""
    header = signature_header(body, secret, int(time.time()) if timestamp is None else timestamp)
    return {"Stripe-Signature": header, "Content-Type": "application/json; charset=utf-8"}


def event_delivery(event_id: str, *, email: str = "ann@example.com") -> tuple[Any, bytes]:
    """The envelope and raw body of a ``customer.updated`` event with this id and email."""
    from kamiyo import synthetic
    from kamiyo.webhooks.envelope import read_envelope

    obj = synthetic.customer(customer_id="cus_inbox", email=email, created=100)
    body = orjson.dumps(synthetic.event("customer.updated", obj, created=100, event_id=event_id))
    envelope, _ = read_envelope(body)
    return envelope, body


def event_row(event_id: str, *, email: str = "ann@example.com") -> dict[str, Any]:
    """An inbox row (``inbox_row``) of a ``customer.updated`` event with this id and email."""
    from kamiyo.webhooks.inbox import inbox_row

    envelope, body = event_delivery(event_id, email=email)
    return inbox_row(envelope, body, status="pending")


def stored_emails(engine: Any) -> dict[str, str]:
    """Stored event id → the email in its stored payload."""
    from sqlalchemy import select

    from kamiyo.db.models import events_table

    with engine.connect() as connection:
        rows = connection.execute(select(events_table.c.stripe_event_id, events_table.c.payload)).all()
    return {row.stripe_event_id: orjson.loads(row.payload)["data"]["object"]["email"] for row in rows}


def record_outcome(engine: Any, event_id: str, outcome: Any, detail: str) -> None:
    """Store what applying an event did: its ``Outcome`` and the sentence, or (``outcome`` None)
    only the sentence, as an event applied before outcomes were recorded has."""
    from sqlalchemy import null, update

    from kamiyo.db.models import events_table

    with engine.begin() as connection:
        connection.execute(
            update(events_table)
            .where(events_table.c.stripe_event_id == event_id)
            .values(outcome=outcome.to_json() if outcome is not None else null(), detail=detail)
        )


def commit_levels(engine: Any) -> list[int]:
    """The list that, from now on, gets the ``PRAGMA synchronous`` of each transaction of a SQLite
    ``engine`` that commits (0 OFF, 1 NORMAL, 2 FULL, 3 EXTRA), read as it commits."""
    from sqlalchemy import event

    levels: list[int] = []

    def read(connection: Any) -> None:
        levels.append(int(connection.connection.driver_connection.execute("PRAGMA synchronous").fetchone()[0]))

    event.listen(engine, "commit", read, insert=True)
    return levels
