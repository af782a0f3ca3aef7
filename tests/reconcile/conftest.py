"""Fixtures for the reconcile tests: a Stripe-compatible API on 127.0.0.1, and databases.

Every database test runs on SQLite and on PostgreSQL. The databases are migrated once per
session and emptied before each test (creating a PostgreSQL database costs ~0.5 s; emptying
it a few milliseconds).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy import Engine

from kamiyo.db.engine import make_engine
from kamiyo.db.migrate import upgrade
from kamiyo.db.models import Base
from kamiyo.reconcile.gateway import StripeApiGateway
from kamiyo.reconcile.ratelimit import RateBudget
from reconcile.harness import TEST_RETRY, Db
from stripe_api import API_KEY, FakeStripe, StripeApiServer
from support import make_settings, throwaway_postgres


@pytest.fixture
def account() -> FakeStripe:
    return FakeStripe()


@pytest.fixture
def stripe_api(account: FakeStripe) -> Iterator[StripeApiServer]:
    server = StripeApiServer(account).start()
    yield server
    server.stop()


@pytest.fixture
def gateway(stripe_api: StripeApiServer) -> StripeApiGateway:
    """The real gateway (official ``stripe`` library) pointed at the local API."""
    return StripeApiGateway(API_KEY, stripe_api.url, budget=RateBudget(10_000), retry=TEST_RETRY)


@pytest.fixture(scope="session", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def reconcile_database(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path_factory.mktemp('reconcile') / 'kamiyo.db'}"
    else:
        with throwaway_postgres() as url:
            yield url


@pytest.fixture(scope="session")
def reconcile_engine(reconcile_database: str) -> Iterator[Engine]:
    engine = make_engine(make_settings(reconcile_database, sqlite_synchronous="NORMAL"))
    upgrade(engine)
    yield engine
    engine.dispose()


@pytest.fixture
def db(reconcile_engine: Engine, reconcile_database: str, stripe_api: StripeApiServer) -> Db:
    """An empty migrated database (SQLite, then PostgreSQL), with settings pointing at the local API."""
    with reconcile_engine.begin() as connection:
        for table in reversed(Base.metadata.sorted_tables):
            if not table.info.get("append_only"):
                connection.execute(table.delete())
    settings = make_settings(
        reconcile_database,
        sqlite_synchronous="NORMAL",
        stripe_secret_key=API_KEY,
        stripe_api_base=stripe_api.url,
        metrics_enabled=False,
    )
    return Db(reconcile_engine, settings)
