"""PostgreSQL's limits on the service's connections (DATABASE_*_TIMEOUT_SECONDS), and the work that
raises the statement limit for itself: migrations, sync, backfill.

PostgreSQL only (SQLite has none of these settings; its busy timeout is tested with the engine).
Each test runs on a throwaway database with limits short enough to be crossed on purpose.
"""

from __future__ import annotations

import dataclasses
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.exc import OperationalError

from kamiyo import synthetic
from kamiyo.config import Settings, load_settings
from kamiyo.db import migrate
from kamiyo.db.engine import allow_long_statements, make_engine, postgresql_connect_args
from kamiyo.db.errors import is_database_fault
from kamiyo.domain.tiers import parse_price_tiers
from kamiyo.errors import ConfigError
from kamiyo.reconcile import backfill as backfill_module
from kamiyo.reconcile import sync as sync_module
from kamiyo.reconcile.backfill import backfill_events
from kamiyo.reconcile.gateway import StripeApiGateway
from kamiyo.reconcile.sync import sync_subscriptions
from reconcile.harness import paying_customer
from stripe_api import FakeStripe
from support import PRICE_TIERS, make_settings, throwaway_postgres

pytestmark = [pytest.mark.postgres, pytest.mark.timeout(120)]

SHORT = 0.3  # the service's limit in these tests, in seconds
LONGER = 1.0  # a statement that outlasts it


@pytest.fixture
def pg_settings() -> Iterator[Settings]:
    with throwaway_postgres() as url:
        yield make_settings(
            url, database_statement_timeout_seconds=SHORT, database_lock_timeout_seconds=SHORT, metrics_enabled=False
        )


@pytest.fixture
def pg_engine(pg_settings: Settings) -> Iterator[Engine]:
    engine = make_engine(pg_settings)
    migrate.upgrade(engine)
    yield engine
    engine.dispose()


def test_a_statement_longer_than_the_statement_timeout_is_cancelled_as_a_database_fault(pg_engine: Engine) -> None:
    started = time.monotonic()
    with pytest.raises(OperationalError) as caught, pg_engine.connect() as connection:
        connection.execute(text(f"SELECT pg_sleep({LONGER * 5})"))
    assert time.monotonic() - started < LONGER * 4
    assert getattr(caught.value.orig, "sqlstate", None) == "57014"  # query_canceled
    assert is_database_fault(caught.value)


def test_a_write_waiting_for_a_lock_held_by_another_connection_fails_after_lock_timeout(
    pg_engine: Engine, pg_settings: Settings
) -> None:
    with pg_engine.begin() as connection:
        connection.execute(text("INSERT INTO users (email, subscription_tier) VALUES ('held@example.com', 'free')"))
    # The statement limit above the lock limit, so that it is the lock limit that ends the wait.
    waiting = make_engine(dataclasses.replace(pg_settings, database_statement_timeout_seconds=LONGER * 5))
    try:
        with pg_engine.connect() as holder:
            holder.execute(text("UPDATE users SET subscription_tier = 'pro' WHERE email = 'held@example.com'"))
            started = time.monotonic()
            with pytest.raises(OperationalError) as caught, waiting.begin() as connection:
                connection.execute(
                    text("UPDATE users SET subscription_tier = 'basic' WHERE email = 'held@example.com'")
                )
            waited = time.monotonic() - started
            holder.rollback()
    finally:
        waiting.dispose()
    assert SHORT * 0.8 <= waited < LONGER * 3
    assert getattr(caught.value.orig, "sqlstate", None) == "55P03"  # lock_not_available
    assert is_database_fault(caught.value)


def test_a_server_that_accepts_but_never_answers_fails_the_connection_after_connect_timeout(
    pg_settings: Settings,
) -> None:
    """A TCP listener that never speaks PostgreSQL (a hung server, a black-holing proxy)."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        settings = dataclasses.replace(
            pg_settings,
            database_url=f"postgresql+psycopg://nobody@127.0.0.1:{port}/none",
            database_connect_timeout_seconds=1,
        )
        engine = make_engine(settings)
        started = time.monotonic()
        try:
            with pytest.raises(OperationalError) as caught:
                engine.connect()
        finally:
            engine.dispose()
    assert time.monotonic() - started < 10
    assert is_database_fault(caught.value)


def test_the_limits_are_sent_at_connection_start_after_the_urls_own_options(pg_settings: Settings) -> None:
    args = postgresql_connect_args(pg_settings, "-c search_path=public")
    assert args["connect_timeout"] == 10
    assert args["options"] == "-c search_path=public -c statement_timeout=300 -c lock_timeout=300"
    # Options in the URL (here a search_path) still reach the server beside the limits.
    url = pg_settings.database_url + "?options=-c%20search_path%3Dkamiyo_elsewhere"
    engine = make_engine(dataclasses.replace(pg_settings, database_url=url))
    try:
        with engine.connect() as connection:
            names = ("statement_timeout", "lock_timeout", "search_path")
            shown = [connection.execute(text(f"SHOW {name}")).scalar() for name in names]
    finally:
        engine.dispose()
    assert shown == ["300ms", "300ms", "kamiyo_elsewhere"]


def test_zero_turns_a_limit_off_and_a_tiny_one_never_rounds_down_to_none(pg_settings: Settings) -> None:
    off = postgresql_connect_args(dataclasses.replace(pg_settings, database_statement_timeout_seconds=0))
    assert "statement_timeout=0 " in off["options"] + " "
    tiny = postgresql_connect_args(dataclasses.replace(pg_settings, database_lock_timeout_seconds=0.0001))
    assert "lock_timeout=1" in tiny["options"]


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("DATABASE_CONNECT_TIMEOUT_SECONDS", "0"),
        ("DATABASE_STATEMENT_TIMEOUT_SECONDS", "-1"),
        ("DATABASE_LOCK_TIMEOUT_SECONDS", "soon"),
        ("DATABASE_MAINTENANCE_TIMEOUT_SECONDS", "1e9"),
    ],
)
def test_a_malformed_limit_stops_the_start_naming_its_variable(name: str, value: str) -> None:
    with pytest.raises(ConfigError, match=name):
        load_settings({name: value}, env_file=None)


def test_the_limits_default_to_bounded_values() -> None:
    settings = load_settings({}, env_file=None)
    assert (
        settings.database_connect_timeout_seconds,
        settings.database_statement_timeout_seconds,
        settings.database_lock_timeout_seconds,
        settings.database_maintenance_timeout_seconds,
    ) == (10, 30.0, 10.0, 3600.0)


def test_allow_long_statements_lifts_the_limit_for_its_transaction_only(pg_engine: Engine) -> None:
    with pg_engine.begin() as connection:
        allow_long_statements(connection, LONGER * 5)
        connection.execute(text(f"SELECT pg_sleep({LONGER})"))
    with pytest.raises(OperationalError), pg_engine.begin() as connection:
        connection.execute(text(f"SELECT pg_sleep({LONGER})"))


def _slow_first(connection: Any) -> None:
    """A statement that outlasts the service's limit, as a large table's index build or page would."""
    connection.exec_driver_sql(f"SELECT pg_sleep({LONGER})")


def test_a_migration_runs_longer_statements_than_the_service_allows(
    pg_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = make_engine(pg_settings)
    real = migrate.command.upgrade

    def slow_upgrade(config: Any, revision: str) -> None:
        _slow_first(config.attributes["connection"])
        real(config, revision)

    monkeypatch.setattr(migrate.command, "upgrade", slow_upgrade)
    try:
        migrate.upgrade(engine, statement_timeout=LONGER * 10)
        with engine.connect() as connection:
            assert connection.execute(text("SELECT count(*) FROM alembic_version")).scalar() == 1
        with pytest.raises(OperationalError):  # and a limit it is given still holds
            migrate.upgrade(engine, statement_timeout=SHORT)
    finally:
        engine.dispose()


def test_a_sync_page_runs_longer_statements_than_the_service_allows(
    pg_engine: Engine, account: FakeStripe, gateway: StripeApiGateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = sync_module.apply_sync_page

    def slow_page(connection: Any, *args: Any, **kwargs: Any) -> Any:
        _slow_first(connection)
        return real(connection, *args, **kwargs)

    monkeypatch.setattr(sync_module, "apply_sync_page", slow_page)
    paying_customer(account, 1)
    summary = sync_subscriptions(pg_engine, gateway, parse_price_tiers(PRICE_TIERS), statement_timeout=LONGER * 10)
    assert (summary.status, summary.stored) == ("done", 1)


def test_a_backfill_page_runs_longer_statements_than_the_service_allows(
    pg_engine: Engine, account: FakeStripe, gateway: StripeApiGateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = backfill_module.insert_new_events

    def slow_insert(connection: Any, rows: Any) -> Any:
        _slow_first(connection)
        return real(connection, rows)

    monkeypatch.setattr(backfill_module, "insert_new_events", slow_insert)
    customer = account.add_customer("cus_00001", "user1@example.com")
    now = int(time.time())
    account.add_event(synthetic.event("customer.updated", customer, created=now - 60), delivered=False)
    summary = backfill_events(pg_engine, gateway, now=now, statement_timeout=LONGER * 10)
    assert summary.new == 1


def test_a_sync_that_fails_stores_and_reports_its_error_without_sql_or_parameters(
    pg_engine: Engine, account: FakeStripe, gateway: StripeApiGateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A page the database refuses: the run's stored error and the raised message are one line,
    without the statement or the email it carried."""
    from kamiyo.errors import KamiyoError
    from kamiyo.reconcile import runs

    def refused(connection: Any, *_args: Any, **_kwargs: Any) -> Any:
        connection.execute(
            text("INSERT INTO users (email, subscription_tier) VALUES (:e, 'free'), (:e, 'free')"),
            {"e": "private.person@example.com"},
        )

    monkeypatch.setattr(sync_module, "apply_sync_page", refused)
    paying_customer(account, 1)
    with pytest.raises(KamiyoError) as caught:
        sync_subscriptions(pg_engine, gateway, parse_price_tiers(PRICE_TIERS))
    latest = runs.latest_run(pg_engine, "sync")
    assert latest is not None
    for told in (str(caught.value), latest.error or ""):
        assert "IntegrityError" in told
        assert "private.person" not in told
        assert "INSERT" not in told


def test_other_connections_keep_working_while_one_waits_on_a_lock(pg_engine: Engine) -> None:
    """The lock limit ends the waiter, not the holder: the holder's transaction commits afterwards."""
    with pg_engine.begin() as connection:
        connection.execute(text("INSERT INTO users (email, subscription_tier) VALUES ('h@example.com', 'free')"))
    done = threading.Event()
    with pg_engine.connect() as holder:
        holder.execute(text("UPDATE users SET subscription_tier = 'pro' WHERE email = 'h@example.com'"))

        def waiter() -> None:
            try:
                with pg_engine.begin() as connection:
                    connection.execute(text("UPDATE users SET subscription_tier = 'x' WHERE email = 'h@example.com'"))
            except OperationalError:
                done.set()

        thread = threading.Thread(target=waiter)
        thread.start()
        thread.join(timeout=10)
        holder.commit()
    assert done.is_set()
    with pg_engine.connect() as connection:
        assert connection.execute(text("SELECT subscription_tier FROM users")).scalar() == "pro"
