"""The inbox's retention (the workers, one at a time) and ``kamiyo prune`` by hand, on SQLite and PostgreSQL."""

from __future__ import annotations

import dataclasses
import itertools
import sqlite3
import threading
import time
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path

import orjson
import pytest
from sqlalchemy import Engine, func, select, update

from integration.conftest import Harness
from kamiyo import synthetic
from kamiyo.db.engine import make_engine
from kamiyo.db.migrate import enable_incremental_vacuum, upgrade
from kamiyo.db.models import audit_log_table, delivery_stats_table, events_table
from kamiyo.errors import KamiyoError
from kamiyo.operations.prune import (
    FAILED,
    PruneScope,
    prunable,
    prune_by_hand,
    retention_scope,
)
from kamiyo.processing.retention import TASK, Retention, retention_status
from kamiyo.telemetry.delivery_stats import DELIVERY_STATS_DAYS, add_delivery_counts, minute_of
from kamiyo.webhooks.envelope import read_envelope
from kamiyo.webhooks.inbox import inbox_row, insert_new_events
from operations.conftest import audit_about
from support import make_settings

DAY = 86400.0
NOW = time.time()
_numbers = itertools.count()


def _store(engine: Engine, ages_and_statuses: Iterable[tuple[float, str]], *, payload_bytes: int = 0) -> list[str]:
    """Events received ``age`` days ago with the given status, in order of age (oldest first); their ids."""
    rows = []
    for age, status in sorted(ages_and_statuses, key=lambda pair: -pair[0]):
        n = next(_numbers)
        obj = synthetic.customer(customer_id=f"cus_{n}", email=None)
        if payload_bytes:
            obj["metadata"] = {"filler": "x" * payload_bytes}
        body = orjson.dumps(synthetic.event("customer.updated", obj, event_id=f"evt_prune_{n:06d}_{status}"))
        envelope, _ = read_envelope(body)
        received = datetime.fromtimestamp(NOW - age * DAY, UTC)
        rows.append(inbox_row(envelope, body, status=status, received_at=received))
    with engine.begin() as connection:
        insert_new_events(connection, rows)
    return [row["stripe_event_id"] for row in rows]


def _left(engine: Engine) -> list[str]:
    with engine.connect() as connection:
        return list(connection.execute(select(events_table.c.stripe_event_id).order_by(events_table.c.id)).scalars())


def _run_to_the_end(retention: Retention, now: float = NOW) -> int:
    steps = 0
    while retention.step(now):
        steps += 1
        assert steps < 1000, "the retention never finished"
    return steps


def _audit_count(engine: Engine) -> int:
    with engine.connect() as connection:
        return int(connection.execute(select(func.count()).select_from(audit_log_table)).scalar_one())


# -- the retention -------------------------------------------------------------------------------


def test_the_retention_prunes_applied_and_ignored_events_past_it_and_keeps_everything_else(ops: Harness) -> None:
    """90 days: older applied and ignored events go; pending, failed and recent ones stay; so does the audit log."""
    old = _store(ops.engine, [(120, "applied"), (100, "ignored"), (95, "failed"), (92, "pending")])
    recent = _store(ops.engine, [(89, "applied"), (10, "ignored"), (1, "applied")])
    audit_entries = _audit_count(ops.engine)

    assert _run_to_the_end(Retention(ops.engine, ops.settings, "worker-a")) >= 1

    assert _left(ops.engine) == [old[2], old[3], *recent]
    assert _audit_count(ops.engine) == audit_entries
    status = retention_status(ops.engine, now=NOW)
    assert status is not None
    assert (status.last_success_at, status.consecutive_failures, status.last_pruned, status.running) == (
        NOW,
        0,
        2,
        False,
    )


def test_a_shorter_retention_prunes_more_and_batches_stay_small(ops: Harness) -> None:
    _store(ops.engine, [(40 + n / 1000, "applied") for n in range(1200)] + [(1, "applied")])
    settings = dataclasses.replace(ops.settings, inbox_retention_days=31)
    retention = Retention(ops.engine, settings, "worker-a")
    steps = _run_to_the_end(retention)
    assert len(_left(ops.engine)) == 1
    assert steps >= 3  # 1,200 events in batches of at most 500, then the stats and the space


def test_delivery_stats_keep_35_days(ops: Harness) -> None:
    minutes = [minute_of(NOW - days * DAY) for days in (60, DELIVERY_STATS_DAYS + 1, DELIVERY_STATS_DAYS - 1, 0)]
    with ops.engine.begin() as connection:
        add_delivery_counts(connection, {(minute, "accepted", "", "invoice.paid"): 3 for minute in minutes})
    _run_to_the_end(Retention(ops.engine, ops.settings, "worker-a"))
    with ops.engine.connect() as connection:
        kept = sorted(connection.execute(select(delivery_stats_table.c.minute)).scalars())
    assert kept == sorted(minutes[2:])


def test_one_worker_at_a_time_and_once_per_interval(ops: Harness) -> None:
    """While worker a holds the task, b does nothing; after a's run, neither runs again until the interval is over."""
    _store(ops.engine, [(100 + n / 1000, "applied") for n in range(1100)])
    a = Retention(ops.engine, ops.settings, "worker-a", interval=3600)
    b = Retention(ops.engine, ops.settings, "worker-b", interval=3600)
    assert a.step(NOW)  # a takes the task and prunes its first batch
    assert not b.step(NOW + 1)
    status = retention_status(ops.engine, now=NOW + 1)
    assert status is not None
    assert status.running
    _run_to_the_end(a, NOW + 2)
    assert _left(ops.engine) == []
    _store(ops.engine, [(100, "applied")])
    assert not b.step(NOW + 60)  # a ran a minute ago
    assert not a.step(NOW + 60)
    assert b.step(NOW + 3603)  # due again (an hour after a's run ended): whoever comes first
    assert _left(ops.engine) == []


def test_a_worker_that_died_holding_the_task_loses_it_after_the_lease(ops: Harness) -> None:
    _store(ops.engine, [(100 + n / 1000, "applied") for n in range(600)])
    dead = Retention(ops.engine, ops.settings, "worker-dead", lease=120)
    assert dead.step(NOW)  # takes the task, then is never heard of again
    other = Retention(ops.engine, ops.settings, "worker-b", lease=120)
    assert not other.step(NOW + 60)
    _run_to_the_end(other, NOW + 121)
    assert _left(ops.engine) == []


def test_a_failing_run_is_recorded_retried_later_and_never_raises(
    ops: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    _store(ops.engine, [(100, "applied")])
    retention = Retention(ops.engine, ops.settings, "worker-a", retry=300)

    def broken(*_args: object, **_kwargs: object) -> object:
        raise RuntimeError("disk on fire")

    monkeypatch.setattr("kamiyo.processing.retention.prune_batch", broken)
    assert not retention.step(NOW)
    assert not retention.step(NOW + 10)  # the next try waits for the retry
    status = retention_status(ops.engine, now=NOW)
    assert status is not None
    assert (status.consecutive_failures, status.last_failure_at, status.last_error, status.running) == (
        1,
        NOW,
        "RuntimeError: disk on fire",
        False,
    )
    monkeypatch.undo()
    _run_to_the_end(retention, NOW + 301)
    status = retention_status(ops.engine, now=NOW + 301)
    assert status is not None
    assert (status.consecutive_failures, status.last_success_at, status.last_error) == (0, NOW + 301, None)
    assert _left(ops.engine) == []


def test_the_worker_runs_the_retention_between_its_batches(ops: Harness) -> None:
    """``Worker.run``: old applied events go while new events keep being applied."""
    from kamiyo.processing.worker import Worker

    _store(ops.engine, [(100, "applied"), (100, "ignored")])
    customer = synthetic.event("customer.created", synthetic.customer(customer_id="cus_new", email="new@example.com"))
    ops.deliver(customer)
    stop = threading.Event()
    worker = Worker(ops.engine, ops.settings)
    thread = threading.Thread(target=worker.run, args=(stop,), daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while _left(ops.engine) != [customer["id"]] or ops.event(customer["id"])["status"] != "applied":
            assert time.monotonic() < deadline, _left(ops.engine)
            time.sleep(0.05)
    finally:
        stop.set()
        thread.join(timeout=20)
    assert ops.tier_status("new@example.com") == ("free", None)


# -- SQLite gives the space back -------------------------------------------------------------------


def _pages(engine: Engine) -> tuple[int, int, int]:
    """SQLite's auto_vacuum mode, page count and free pages."""
    with engine.connect() as connection:
        driver = connection.connection.driver_connection
        assert driver is not None
        return tuple(
            driver.execute(f"PRAGMA {name}").fetchone()[0] for name in ("auto_vacuum", "page_count", "freelist_count")
        )  # type: ignore[return-value]


def test_sqlite_gives_the_pages_of_pruned_events_back(tmp_path: Path) -> None:
    settings = make_settings(f"sqlite:///{tmp_path / 'kamiyo.db'}", sqlite_synchronous="NORMAL")
    engine = make_engine(settings)
    try:
        upgrade(engine)
        _store(engine, [(100 + n / 1000, "applied") for n in range(600)], payload_bytes=6000)
        mode, before, _free = _pages(engine)
        assert mode == 2  # incremental, from the first upgrade on
        _run_to_the_end(Retention(engine, settings, "worker-a"))
        _mode, after, free = _pages(engine)
    finally:
        engine.dispose()
    assert free == 0
    assert after < before - 1200  # each event held at least two pages of payload


def test_db_upgrade_turns_incremental_vacuum_on_for_an_existing_sqlite_database(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as old:  # a database made before: auto_vacuum off, WAL, data in it
        old.execute("PRAGMA journal_mode=WAL")
        old.execute("CREATE TABLE kept (x TEXT)")
        old.execute("INSERT INTO kept VALUES ('still here')")
    assert sqlite3.connect(path).execute("PRAGMA auto_vacuum").fetchone()[0] == 0
    engine = make_engine(make_settings(f"sqlite:///{path}"))
    try:
        assert enable_incremental_vacuum(engine)
        assert enable_incremental_vacuum(engine)  # once is enough: nothing to do the second time
        mode, _pages_now, _free = _pages(engine)
        with engine.connect() as connection:
            assert connection.exec_driver_sql("SELECT x FROM kept").scalars().all() == ["still here"]
            assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    finally:
        engine.dispose()
    assert mode == 2


# -- by hand: kamiyo prune ------------------------------------------------------------------------------


def test_parked_failures_are_pruned_by_hand_with_a_dry_run_first_and_an_audit_entry(ops: Harness) -> None:
    ids = _store(ops.engine, [(45, "failed"), (40, "failed"), (20, "failed"), (40, "applied"), (40, "pending")])
    scope = PruneScope(FAILED, datetime.fromtimestamp(NOW - 30 * DAY, UTC))

    shown = prune_by_hand(ops.engine, scope, dry_run=True, actor="erin", reason=None)
    assert (shown.found.count, shown.found.by_status, shown.pruned) == (2, {"failed": 2}, 0)
    assert len(_left(ops.engine)) == 5
    assert audit_about(ops.engine, scope.label()) == []

    done = prune_by_hand(ops.engine, scope, dry_run=False, actor="erin", reason="INC-9 cleaned up")
    assert (done.pruned, done.by_status, done.status) == (2, {"failed": 2}, "done")
    assert _left(ops.engine) == ids[2:]
    [entry] = audit_about(ops.engine, scope.label())
    assert (entry.action, entry.actor, entry.reason) == ("prune", "erin", "INC-9 cleaned up")
    assert entry.before is not None
    assert entry.after is not None
    assert (entry.before["found"], entry.before["statuses"]) == (2, ["failed"])
    assert (entry.after["status"], entry.after["pruned"], entry.after["pruned_by_status"]) == ("done", 2, {"failed": 2})


def test_the_retention_by_hand_counts_then_prunes(ops: Harness) -> None:
    _store(ops.engine, [(100, "applied"), (95, "ignored"), (95, "failed"), (5, "applied")])
    scope = retention_scope(90, now=NOW)
    assert prunable(ops.engine, scope).by_status == {"applied": 1, "ignored": 1}
    assert prune_by_hand(ops.engine, scope, dry_run=False, actor="erin", reason=None).pruned == 2
    assert len(_left(ops.engine)) == 2


def test_a_prune_by_hand_needs_someone(ops: Harness) -> None:
    with pytest.raises(KamiyoError, match="--by"):
        prune_by_hand(ops.engine, retention_scope(90), dry_run=False, actor=" ", reason=None)


def test_events_inserted_out_of_order_near_the_boundary_are_judged_by_their_own_time(ops: Harness) -> None:
    """The boundary comes from ids; received_at settles each row (a writer may number rows out of order)."""
    ids = _store(ops.engine, [(100, "applied"), (95, "applied"), (80, "applied")])
    with ops.engine.begin() as connection:  # the middle one was in fact received recently
        connection.execute(
            update(events_table)
            .where(events_table.c.stripe_event_id == ids[1])
            .values(received_at=datetime.fromtimestamp(NOW - DAY, UTC))
        )
    prune_by_hand(ops.engine, retention_scope(90, now=NOW), dry_run=False, actor="erin", reason=None)
    assert _left(ops.engine) == ids[1:]


@pytest.mark.timeout(180)
def test_deliveries_are_not_held_up_by_a_retention_run(ops: Harness) -> None:
    """A run over 20,000 old events, step by step as a worker runs it, while deliveries are stored
    one after another: the run is many short transactions, and no delivery waits for more than one."""
    _store(ops.engine, [(100 + n / 100_000, "applied") for n in range(20_000)], payload_bytes=1000)
    retention = Retention(ops.engine, ops.settings, "worker-a")
    waits: list[float] = []
    finished = threading.Event()
    took: list[float] = []

    def run() -> None:
        started = time.perf_counter()
        _run_to_the_end(retention)
        took.append(time.perf_counter() - started)
        finished.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    n = 0
    while not finished.is_set():
        event = synthetic.event("customer.created", synthetic.customer(customer_id=f"cus_d{n}", email=None))
        started = time.perf_counter()
        ops.deliver(event)
        waits.append(time.perf_counter() - started)
        n += 1
    thread.join(timeout=60)
    assert len(_left(ops.engine)) == len(waits)  # every old event gone, every delivery kept
    assert len(waits) >= 5, (took, waits)
    assert max(waits) < 0.5, (took, sorted(waits)[-5:])


def test_the_task_row_is_what_the_metrics_and_health_read(ops: Harness) -> None:
    assert retention_status(ops.engine) is None  # no worker has looked at it yet
    Retention(ops.engine, ops.settings, "worker-a").step(NOW)
    with ops.engine.connect() as connection:
        from kamiyo.db.models import maintenance_tasks_table

        assert connection.execute(select(maintenance_tasks_table.c.name)).scalars().all() == [TASK]
