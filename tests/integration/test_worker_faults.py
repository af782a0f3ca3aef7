"""The worker under database faults: a fault of the database is never an event's attempt; an error
of the event's own data is, and still parks a poison event. Errors are kept without SQL or data.

On SQLite and on PostgreSQL. Faults are real where the database can produce them on demand (a
connection terminated, a lock held by another connection, a locked SQLite file) and otherwise
raised as the driver raises them, at the statement where they happen.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import psycopg
import pytest
from sqlalchemy import Engine, event, insert
from sqlalchemy.exc import DBAPIError, OperationalError

from integration.conftest import Harness
from integration.test_worker import BASIC, customer_event, sub_event
from kamiyo.db.driver import as_sqlalchemy_error
from kamiyo.db.engine import make_engine
from kamiyo.db.errors import is_database_fault
from kamiyo.db.migrate import upgrade
from kamiyo.db.models import users_table
from kamiyo.domain import rules
from kamiyo.processing import engine
from kamiyo.processing.worker import FAULT_BACKOFF_MAX, Worker, fault_backoff
from support import make_settings, sqlite_write_locked

pytestmark = pytest.mark.timeout(120)
# The shared database of PostgreSQL only, for the faults only PostgreSQL produces.
on_postgresql = pytest.mark.parametrize(
    "shared_settings", [pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True
)

EMAIL = "private.person@example.com"


def _events() -> list[dict[str, Any]]:
    """A customer naming its email, then three changes of its subscription."""
    return [
        customer_event("ann@example.com"),
        sub_event("active", at=1_700_001_001),
        sub_event("past_due", at=1_700_001_002),
        sub_event("active", price=BASIC, at=1_700_001_003),
    ]


def _attempts(harness: Harness, events: list[dict[str, Any]]) -> list[tuple[str, int, str | None]]:
    rows = [harness.event(e["id"]) for e in events]
    return [(row["status"], row["attempts"], row["last_error"]) for row in rows]


def _faulty_handler(monkeypatch: pytest.MonkeyPatch, event_type: str, fault: Callable[[Any], None]) -> list[str]:
    """Make a batch holding an event of ``event_type`` call ``fault(store)`` (``store.connection``:
    the batch's connection) as it flushes, before its writes; returns the ids the rule saw."""
    real = rules.RULES[event_type]
    seen: list[str] = []
    due: list[str] = []

    def rule(state: Any, stored: Any) -> Any:
        seen.append(stored.event_id)
        due.append(stored.event_id)
        return real(state, stored)

    real_flush = engine.flush

    def flush(connection: Any, state: Any) -> Any:
        if due:
            due.clear()
            fault(SimpleNamespace(connection=connection))
        return real_flush(connection, state)

    monkeypatch.setitem(rules.RULES, event_type, rule)
    monkeypatch.setattr(engine, "flush", flush)
    return seen


def _driver_fault(store: Any, message: str = "server closed the connection unexpectedly") -> None:
    """Raise what the driver raises when the database goes away in the middle of a statement."""
    dialect = store.connection.dialect
    raise as_sqlalchemy_error(
        dialect, "UPDATE stripe_subscriptions ...", {}, dialect.loaded_dbapi.OperationalError(message)
    )


def _run_failing(worker: Worker, times: int) -> None:
    for _ in range(times):
        with pytest.raises(DBAPIError) as caught:
            worker.run_once()
        assert is_database_fault(caught.value)


def test_a_database_that_fails_batch_after_batch_leaves_every_event_pending_then_applies_them_all(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The database fails in the middle of three batches in a row (and works in between, as a
    flapping database does): no event's attempt is counted, none is parked, and once it holds
    every event is applied in one batch."""
    failures = {"left": 3}

    def flapping(store: Any) -> None:
        if failures["left"]:
            failures["left"] -= 1
            _driver_fault(store)

    _faulty_handler(monkeypatch, "customer.subscription.updated", flapping)
    events = _events()
    harness.deliver(*events)
    worker = Worker(harness.engine, dataclasses.replace(harness.settings, worker_max_attempts=2))

    for _ in range(3):
        _run_failing(worker, 1)
        assert _attempts(harness, events) == [("pending", 0, None)] * 4

    assert worker.run_once() == 4
    assert [status for status, _n, _e in _attempts(harness, events)] == ["applied"] * 4
    assert harness.tier_status("ann@example.com") == ("basic", "active")


@on_postgresql
def test_a_postgresql_connection_terminated_mid_batch_is_no_events_attempt(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real connection loss (the server ends the worker's backend, as a restart or a failover
    does), three batches in a row: every event stays pending with no attempt, then all apply."""
    failures = {"left": 3}

    def terminated(store: Any) -> None:
        if failures["left"]:
            failures["left"] -= 1
            store.connection.exec_driver_sql("SELECT pg_terminate_backend(pg_backend_pid())")

    _faulty_handler(monkeypatch, "customer.subscription.updated", terminated)
    events = _events()
    harness.deliver(*events)
    worker = Worker(harness.engine, dataclasses.replace(harness.settings, worker_max_attempts=2))
    for _ in range(3):
        _run_failing(worker, 1)
        assert _attempts(harness, events) == [("pending", 0, None)] * 4
    assert worker.run_once() == 4
    assert [status for status, _n, _e in _attempts(harness, events)] == ["applied"] * 4


@pytest.fixture
def pg_engine_with_short_lock_timeout(harness: Harness) -> Iterator[Engine]:
    engine = make_engine(dataclasses.replace(harness.settings, database_lock_timeout_seconds=0.3))
    yield engine
    engine.dispose()


@on_postgresql
def test_a_lock_held_by_another_connection_is_a_fault_after_lock_timeout_and_no_events_attempt(
    harness: Harness, pg_engine_with_short_lock_timeout: Engine
) -> None:
    """Another connection holds the users table (a migration, an operator's transaction): the
    worker's write waits ``DATABASE_LOCK_TIMEOUT_SECONDS``, fails as a database fault, and the
    events stay pending with no attempt however often it tries; released, they all apply."""
    events = _events()
    harness.deliver(*events)
    worker = Worker(pg_engine_with_short_lock_timeout, dataclasses.replace(harness.settings, worker_max_attempts=2))
    with harness.engine.connect() as holder:
        holder.exec_driver_sql("LOCK TABLE users IN ACCESS EXCLUSIVE MODE")
        for _ in range(3):
            with pytest.raises(OperationalError) as caught:
                worker.run_once()
            assert is_database_fault(caught.value)
            assert getattr(caught.value.orig, "sqlstate", None) == "55P03"  # lock_not_available
        holder.rollback()
        assert _attempts(harness, events) == [("pending", 0, None)] * 4
    assert worker.run_once() == 4
    assert [status for status, _n, _e in _attempts(harness, events)] == ["applied"] * 4


def test_a_locked_sqlite_database_is_no_events_attempt(tmp_path: Path) -> None:
    """Another process holds SQLite's write lock past the busy timeout, three polls in a row:
    every event stays pending with no attempt; released, they all apply."""
    path = tmp_path / "kamiyo.db"
    settings = make_settings(f"sqlite:///{path}", worker_max_attempts=2)
    engine = make_engine(settings)
    upgrade(engine)

    @event.listens_for(engine, "connect")
    def short_busy_timeout(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.execute("PRAGMA busy_timeout=100")

    engine.dispose()  # connections from now on wait 100 ms, not 30 s
    harness = Harness(engine, settings)
    events = _events()
    harness.deliver(*events)
    worker = Worker(engine, settings)
    with sqlite_write_locked(path):
        for _ in range(3):
            with pytest.raises(OperationalError) as caught:
                worker.run_once()
            assert is_database_fault(caught.value)
    assert _attempts(harness, events) == [("pending", 0, None)] * 4
    assert worker.run_once() == 4
    assert [status for status, _n, _e in _attempts(harness, events)] == ["applied"] * 4
    engine.dispose()


def test_the_worker_loop_backs_off_from_a_database_fault_and_applies_once_it_holds(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``Worker.run``: failed batches are retried after a growing pause, the worker never ends,
    and the events are applied with one attempt each once the database holds."""
    failures = {"left": 2}
    pauses: list[float] = []

    def flapping(store: Any) -> None:
        if failures["left"]:
            failures["left"] -= 1
            _driver_fault(store)

    _faulty_handler(monkeypatch, "customer.subscription.updated", flapping)
    monkeypatch.setattr("kamiyo.processing.worker.fault_backoff", lambda n: pauses.append(n) or 0.01)
    events = _events()
    harness.deliver(*events)
    stop = threading.Event()
    worker = Worker(harness.engine, harness.settings)
    thread = threading.Thread(target=worker.run, args=(stop,), daemon=True)
    thread.start()
    try:
        deadline = 200
        while deadline and any(status != "applied" for status, _n, _e in _attempts(harness, events)):
            stop.wait(0.05)
            deadline -= 1
    finally:
        stop.set()
        thread.join(timeout=10)
    assert not thread.is_alive()
    assert pauses == [1, 2]
    assert _attempts(harness, events) == [("applied", 1, None)] * 4


def test_the_pause_after_failed_batches_doubles_up_to_a_bound_with_jitter() -> None:
    for failures in (1, 2, 3, 10, 1000):
        ceiling = min(0.5 * 2 ** (failures - 1), FAULT_BACKOFF_MAX)
        pauses = [fault_backoff(failures) for _ in range(50)]
        assert all(ceiling / 2 <= p <= ceiling for p in pauses)
        assert len(set(pauses)) > 1
    assert fault_backoff(1000) <= FAULT_BACKOFF_MAX


# -- an error of the event's own data is its attempt, and parks it in the end ---------------


def _duplicate_user(store: Any) -> None:
    """A statement the database refuses for its data: a second user with an existing email."""
    store.connection.execute(insert(users_table).values(email=EMAIL, subscription_tier="free"))


def test_a_poison_event_whose_data_the_database_refuses_is_retried_then_parked_and_its_neighbours_apply(
    harness: Harness, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """An IntegrityError of one event is that event's failed attempt: retried, then parked after
    the last attempt, while the events around it apply. Its stored error and the worker's log
    lines name the error without the SQL or the email the statement carried."""
    harness.add_user(EMAIL)
    poison = sub_event("paused", sub_id="sub_poison", event_type="customer.subscription.paused", at=1_700_001_001)
    _faulty_handler(monkeypatch, "customer.subscription.paused", _duplicate_user)
    events = [*_events(), poison]
    harness.deliver(*events)
    worker = Worker(harness.engine, dataclasses.replace(harness.settings, worker_max_attempts=2))

    with caplog.at_level(logging.INFO):
        assert worker.run_once(1_000_000.0) == 5
        status, attempts, error = _attempts(harness, [poison])[0]
        assert (status, attempts) == ("pending", 1)
        assert worker.run_once(2_000_000.0) == 1
    status, attempts, error = _attempts(harness, [poison])[0]
    assert (status, attempts) == ("failed", 2)
    assert error is not None
    assert error.startswith("IntegrityError: ")
    assert EMAIL not in error
    assert "INSERT" not in error
    assert [s for s, _n, _e in _attempts(harness, events[:4])] == ["applied"] * 4
    logged = [r.getMessage() for r in caplog.records]
    assert any(poison["id"] in line and "parked" in line for line in logged)
    assert not any(EMAIL in line or "INSERT INTO" in line for line in logged)


def test_a_data_error_of_a_batch_is_isolated_to_its_event_and_parks_it(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A data error raised as the batch records its outcomes: the batch runs again with each event
    in a savepoint, and only the culprit's attempts grow, up to its parking; a database fault met
    while isolating it rolls back the whole batch and counts for no event."""
    harness.add_user(EMAIL)
    events = _events()
    harness.deliver(*events)
    poison = harness.event(events[2]["id"])["id"]
    worker = Worker(harness.engine, dataclasses.replace(harness.settings, worker_max_attempts=2))
    real_record = Worker._record
    faults = {"left": 1}
    runs: list[tuple[str, int, int]] = []  # what each run raised, the culprit's attempts before and after it

    def refusing(self: Worker, connection: Any, outcomes: list[Any]) -> None:
        if any(o.id == poison and o.status == "applied" for o in outcomes):
            if faults["left"] and len(outcomes) == 1:  # the culprit alone, in its savepoint
                faults["left"] -= 1
                dbapi = connection.dialect.loaded_dbapi
                raise as_sqlalchemy_error(connection.dialect, "UPDATE ...", {}, dbapi.OperationalError("gone"))
            _duplicate_user_on(connection)
        real_record(self, connection, outcomes)

    monkeypatch.setattr(Worker, "_record", refusing)
    for _ in range(20):
        before = harness.event(events[2]["id"])["attempts"]
        try:
            worker.run_once(3_000_000.0)
            raised = ""
        except DBAPIError as exc:
            raised = exc.__class__.__name__
        runs.append((raised, before, harness.event(events[2]["id"])["attempts"]))
        if all(status != "pending" for status, _n, _e in _attempts(harness, events)):
            break
    faulted = [(before, after) for raised, before, after in runs if raised == "OperationalError"]
    assert len(faulted) == 1
    assert faulted[0][0] == faulted[0][1]  # the fault counted for no event
    states = _attempts(harness, events)
    assert states[2][:2] == ("failed", 2)
    assert states[2][2] is not None
    assert states[2][2].startswith("IntegrityError: ")
    assert EMAIL not in states[2][2]
    assert "INSERT" not in states[2][2]
    assert [(s, n) for s, n, _e in states[:2] + states[3:]] == [("applied", 1)] * 3


def _duplicate_user_on(connection: Any) -> None:
    connection.execute(insert(users_table).values(email=EMAIL, subscription_tier="free"))


@on_postgresql
def test_a_data_error_on_the_driver_path_is_stored_without_the_value(
    harness: Harness, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """PostgreSQL refuses a value too long for its column in one of the store's own statements
    (sent on the driver's cursor; SQLite does not enforce a length): the stored error and the log
    name neither the email nor the SQL."""

    def too_long(store: Any) -> None:
        store.connection.execute(insert(users_table).values(email=EMAIL, subscription_tier="x" * 100))

    _faulty_handler(monkeypatch, "customer.subscription.updated", too_long)
    event_ = sub_event("active", at=1_700_001_001)
    harness.deliver(event_)
    with caplog.at_level(logging.INFO):
        assert Worker(harness.engine, harness.settings).run_once() == 1
    status, attempts, error = _attempts(harness, [event_])[0]
    assert (status, attempts) == ("pending", 1)
    assert error is not None
    assert error.startswith("DataError: ")
    assert EMAIL not in error
    assert "INSERT" not in error
    assert not any(EMAIL in r.getMessage() or "INSERT INTO" in r.getMessage() for r in caplog.records)


def test_the_service_engines_hide_sql_parameters_from_their_errors(harness: Harness) -> None:
    harness.add_user(EMAIL)
    with pytest.raises(DBAPIError) as caught, harness.engine.begin() as connection:
        connection.execute(insert(users_table).values(email=EMAIL, subscription_tier="free"))
    assert EMAIL not in str(caught.value).replace(f"Key (email)=({EMAIL})", "")
    assert "hidden" in str(caught.value)


def test_a_rule_error_quoting_a_secret_is_stored_scrubbed(harness: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    def leaky(_state: Any, _event: Any) -> Any:
        raise RuntimeError("cannot use key sk_live_0123456789abcdefghij")

    monkeypatch.setitem(rules.RULES, "customer.subscription.updated", leaky)
    event_ = sub_event("active", at=1_700_001_001)
    harness.deliver(event_)
    Worker(harness.engine, harness.settings).run_once()
    error = harness.event(event_["id"])["last_error"]
    assert error == "RuntimeError: cannot use key [redacted]"


def test_unreachable_postgresql_is_a_fault_and_not_an_attempt(tmp_path: Path) -> None:
    """A PostgreSQL nobody answers at: the worker's poll fails as a database fault."""
    settings = make_settings("postgresql+psycopg://nobody@127.0.0.1:1/none", database_connect_timeout_seconds=2)
    engine = make_engine(settings)
    try:
        with pytest.raises(OperationalError) as caught:
            Worker(engine, settings).run_once()
        assert is_database_fault(caught.value)
        assert isinstance(caught.value.orig, psycopg.OperationalError)
    finally:
        engine.dispose()
