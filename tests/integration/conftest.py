"""Integration helpers: deliver events into the inbox, run the worker, read back the state.

Tests that only apply events share one migrated database per backend for the whole session
and start from empty tables (``clean_engine``): creating and migrating a PostgreSQL database
costs ~0.5 s, deleting a few rows a few milliseconds. Tests that change the schema itself
(migrations, a renamed table) keep using the fresh database of the ``engine`` fixture.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import orjson
import pytest
from sqlalchemy import Engine, RowMapping, select

from kamiyo.config import Settings
from kamiyo.db.engine import make_engine
from kamiyo.db.migrate import upgrade
from kamiyo.db.models import Base, customers_table, events_table, subscriptions_table, users_table
from kamiyo.processing.worker import Worker
from kamiyo.webhooks.envelope import read_envelope
from kamiyo.webhooks.inbox import inbox_row, insert_new_events
from support import make_settings, throwaway_postgres


@dataclass
class Harness:
    """One migrated database, the settings the worker uses, and the reads the tests assert on."""

    engine: Engine
    settings: Settings

    def reset(self) -> None:
        """Empty every table, as if the database had just been migrated."""
        delete_all_rows(self.engine)

    def deliver(self, *events: dict[str, Any]) -> list[bool]:
        """Store each event as the endpoint does (one transaction each); True where it was new."""
        outcomes = []
        for event in events:
            body = orjson.dumps(event)
            envelope, _ = read_envelope(body)
            with self.engine.begin() as connection:
                new = insert_new_events(connection, [inbox_row(envelope, body, status="pending")])
            outcomes.append(envelope.event_id in new)
        return outcomes

    def drain(self, settings: Settings | None = None, *, now: float | None = None, rounds: int = 100) -> int:
        """Run the worker until it finds nothing to do; return how many events it handled."""
        worker = Worker(self.engine, settings or self.settings)
        total = 0
        for _ in range(rounds):
            handled = worker.run_once(now)
            if handled == 0:
                return total
            total += handled
        raise AssertionError(f"worker still busy after {rounds} rounds")

    def apply(self, *events: dict[str, Any]) -> None:
        """Deliver then apply, one event after another, in the given order."""
        for event in events:
            self.deliver(event)
            self.drain()

    def event(self, event_id: str) -> RowMapping:
        with self.engine.connect() as connection:
            return (
                connection.execute(select(events_table).where(events_table.c.stripe_event_id == event_id))
                .mappings()
                .one()
            )

    def user(self, email: str) -> RowMapping | None:
        with self.engine.connect() as connection:
            return connection.execute(select(users_table).where(users_table.c.email == email)).mappings().first()

    def tier_status(self, email: str) -> tuple[str, str | None] | None:
        user = self.user(email)
        return None if user is None else (user["subscription_tier"], user["subscription_status"])

    def subscription(self, sub_id: str) -> RowMapping | None:
        with self.engine.connect() as connection:
            return (
                connection.execute(select(subscriptions_table).where(subscriptions_table.c.id == sub_id))
                .mappings()
                .first()
            )

    def customer(self, customer_id: str) -> RowMapping | None:
        with self.engine.connect() as connection:
            return (
                connection.execute(select(customers_table).where(customers_table.c.id == customer_id))
                .mappings()
                .first()
            )

    def count_users(self) -> int:
        with self.engine.connect() as connection:
            return len(connection.execute(select(users_table.c.id)).all())

    def add_user(self, email: str, tier: str = "free", status: str | None = None) -> int:
        with self.engine.begin() as connection:
            result = connection.execute(
                users_table.insert()
                .values(email=email, subscription_tier=tier, subscription_status=status)
                .returning(users_table.c.id)
            )
            return int(result.scalar_one())

    def statuses(self, event_ids: Iterable[str]) -> list[str]:
        return [self.event(event_id)["status"] for event_id in event_ids]


@pytest.fixture(scope="session", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def shared_settings(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    """Settings for one migrated database per backend, shared by the session's apply tests."""
    if request.param == "sqlite":
        # NORMAL: no fsync per commit in WAL mode; what is tested here is logic, not durability.
        yield make_settings(f"sqlite:///{tmp_path_factory.mktemp('shared') / 'kamiyo.db'}", sqlite_synchronous="NORMAL")
    else:
        with throwaway_postgres() as url:
            yield make_settings(url)


@pytest.fixture(scope="session")
def shared_engine(shared_settings: Settings) -> Iterator[Engine]:
    engine = make_engine(shared_settings)
    upgrade(engine)
    yield engine
    engine.dispose()


def delete_all_rows(engine: Engine) -> None:
    """Empty every table of the models, children first (the schema and alembic_version stay).

    Append-only tables (``audit_log``) are left alone: the database rejects deleting from them,
    so tests that read them look only at their own entries.
    """
    with engine.begin() as connection:
        for table in reversed(Base.metadata.sorted_tables):
            if not table.info.get("append_only"):
                connection.execute(table.delete())


@pytest.fixture
def clean_engine(shared_engine: Engine) -> Engine:
    """The shared database of this backend, with every table empty."""
    delete_all_rows(shared_engine)
    return shared_engine


@pytest.fixture
def harness(clean_engine: Engine, shared_settings: Settings) -> Harness:
    return Harness(clean_engine, shared_settings)
