"""The worker: claims pending events from the inbox and applies them.

Transaction boundary: one transaction claims a batch, applies each event, records every
outcome, and commits. Claim, effect and outcome therefore commit together or not at all: a crash
mid-batch leaves the events pending for the next worker, and no event is ever applied twice.

A batch first runs without savepoints (they cost as much as the events themselves). Should an
event's handler fail, that transaction is rolled back and the batch is run again, this time each
event in its own SAVEPOINT, with the events that failed recorded as failed attempts without
being run again: a failing event rolls back alone and never undoes its batch neighbours. The
log lines of a batch are written once it has committed, so a rolled-back attempt logs nothing.

On PostgreSQL, ``FOR UPDATE SKIP LOCKED`` gives concurrent workers disjoint batches; on SQLite
the write lock serialises them.

Only an error of the event itself is one of its attempts: its handler raising, or a statement
the database refuses for the data it carries (``IntegrityError``, ``DataError``). A fault of the
database (``kamiyo.db.errors.is_database_fault``: connection lost, locked, full, a timeout)
would fail any event the same way: it rolls the whole batch back, the worker backs off
(exponentially, with jitter, up to ``FAULT_BACKOFF_MAX``) and tries again, and no event's
attempts grow, so a flapping database never parks a healthy event.

Errors are stored and logged as ``kamiyo.db.errors.describe`` tells them, without SQL or its
parameters (customers' emails), and scrubbed of credentials.
"""

from __future__ import annotations

import functools
import logging
import random
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, NamedTuple

import orjson
from sqlalchemy import Engine, and_, bindparam, select, union_all, update
from sqlalchemy.exc import DBAPIError, SQLAlchemyError

from kamiyo.config import Settings
from kamiyo.db.driver import driver_execute
from kamiyo.db.errors import describe, is_database_fault
from kamiyo.db.models import events_table
from kamiyo.domain.links import link_hint
from kamiyo.domain.modes import other_mode_detail
from kamiyo.errors import ApplyError, UnmappedPrice
from kamiyo.operations.overrides import expire_overrides
from kamiyo.processing.handlers import HANDLERS, StoredEvent
from kamiyo.processing.retention import Retention
from kamiyo.processing.store import Store, compiled_for
from kamiyo.reconcile.gateway import StripeGateway
from kamiyo.reconcile.schedule import BackfillSchedule
from kamiyo.reconcile.verify import event_verifier
from kamiyo.scrub import scrub
from kamiyo.telemetry.heartbeat import Heartbeat
from kamiyo.telemetry.metrics import PROBE_EVENT_PREFIX, ProcessedCounter, process_metrics

log = logging.getLogger("kamiyo.worker")
_events = events_table
_MAX_BACKOFF = 3600.0
# PostgreSQL's deadlock_detected and serialization_failure: the transaction was chosen as a victim.
_CONFLICT_SQLSTATES = frozenset({"40P01", "40001"})
_CONFLICT_RETRIES = 5
_OVERRIDE_SWEEP_SECONDS = 1.0  # how soon an expired manual override gives way to Stripe's state
# After a failed batch the worker waits FAULT_BACKOFF_BASE * 2^(n-1) seconds for the n-th failure
# in a row, at most FAULT_BACKOFF_MAX, times a random factor in [0.5, 1): several workers that
# lost the database together do not all come back at the same instant.
FAULT_BACKOFF_BASE = 0.5
FAULT_BACKOFF_MAX = 30.0
_MAX_ERROR = 2000  # characters of an error kept in last_error
_RECORD = (
    update(_events)
    .where(_events.c.id == bindparam("_id"))
    .values(
        status=bindparam("status"),
        attempts=bindparam("attempts"),
        available_at=bindparam("available_at"),
        last_error=bindparam("last_error"),
        detail=bindparam("detail"),
        processed_at=bindparam("processed_at"),
    )
)


_LogLine = tuple[logging.Logger, int, str, tuple[Any, ...]]


class _EventFailed(Exception):
    """An event's handler failed in a batch run without savepoints: the batch must run again."""

    def __init__(self, inbox_id: int, error: str, *, parked: bool) -> None:
        super().__init__(error)
        self.inbox_id = inbox_id
        self.error = error
        self.parked = parked


@dataclass
class _Outcome:
    _id: int
    status: str
    attempts: int
    available_at: float
    last_error: str | None
    detail: str | None
    processed_at: datetime | None


class Worker:
    """Applies pending inbox events, in batches, until told to stop."""

    def __init__(
        self,
        engine: Engine,
        settings: Settings,
        *,
        metrics: ProcessedCounter | None = None,
        gateway: StripeGateway | None = None,
    ) -> None:
        self.engine = engine
        self.settings = settings
        # Stripe's API (issue 3): customer look-ups, STRIPE_VERIFY_EVENTS, the scheduled backfill.
        self.gateway = gateway
        self.verifier = event_verifier(settings, gateway)
        self.metrics: ProcessedCounter | None = (metrics or process_metrics()) if settings.metrics_enabled else None
        self.heartbeat = Heartbeat(engine)
        # The inbox's retention: a short transaction at a time between batches, one worker at a time.
        self.retention = Retention(engine, settings, self.heartbeat.worker_id)
        self._pg = engine.dialect.name == "postgresql"
        self._limit = settings.worker_batch_size
        self._claimed: list[Any] = []
        self._draining = False  # the last batch was full (SQLite: claim without looking first)
        self._next_override_sweep = 0.0

    def run_once(self, now: float | None = None) -> int:
        """Claim and apply one batch; return how many events it handled.

        A database fault (``is_database_fault``) is raised as it is, for the caller to back off:
        the batch rolled back and no event's attempt is counted. An error of the data that a
        savepoint could not contain (a statement of the batch's own, or its commit, refused)
        also rolls back the whole batch: the worker then applies one event per batch until the
        culprit is found, and records the failed attempt of that one event in a transaction of
        its own, so that a poison event is retried with backoff and parked like any other, and
        never blocks the queue.
        """
        now = time.time() if now is None else now
        if self.verifier is not None:
            self.verifier.prepare(self.engine, self._limit, now)  # API calls: before any lock is taken
        try:
            handled = self._run_batch_retrying_conflicts(now)
        except DBAPIError as exc:
            if is_database_fault(exc):
                raise
            if self._limit > 1:
                self._limit = 1
                log.warning("worker batch rolled back (%s); isolating events one at a time", describe(exc))
                raise
            if not self._claimed:
                raise
            row = self._claimed[0]
            outcome = self._failure(row, describe(exc), now, parked=False)
            with self.engine.begin() as connection:
                self._record(connection, [outcome])
            self._count([row], [outcome], [0.0])
            return 1
        self._limit = self.settings.worker_batch_size
        return handled

    def _run_batch_retrying_conflicts(self, now: float) -> int:
        """Run a batch; when PostgreSQL aborts it as a deadlock or serialization victim, run it again.

        Such an abort is ordinary contention between concurrent workers (e.g. two customers of one
        user in two batches), not a fault of any event: the whole batch rolled back, so it is
        retried at once, without counting an attempt against its events.
        """
        for retry in range(_CONFLICT_RETRIES):
            try:
                return self._run_batch(now)
            except DBAPIError as exc:
                if getattr(exc.orig, "sqlstate", None) not in _CONFLICT_SQLSTATES or retry == _CONFLICT_RETRIES - 1:
                    raise
                log.info("worker batch lost a lock conflict (%s); running it again", exc.orig.__class__.__name__)
                time.sleep(random.uniform(0.0, 0.02 * (retry + 1)))
        raise AssertionError("unreachable")

    def _run_batch(self, now: float) -> int:
        """Run the batch without savepoints; if an event fails, run it again with them."""
        failed: dict[int, _EventFailed] = {}
        try:
            return self._run_claimed_batch(now, failed=None)
        except _EventFailed as first:
            failed[first.inbox_id] = first
        log.info("an event of the batch failed; applying the batch again with one savepoint per event")
        return self._run_claimed_batch(now, failed=failed)

    def _run_claimed_batch(self, now: float, *, failed: dict[int, _EventFailed] | None) -> int:
        """Claim and apply one batch. ``failed`` None: no savepoints, and a handler's failure raises
        ``_EventFailed`` (the transaction rolls back). Otherwise each event runs in a savepoint, and
        the events of ``failed`` are recorded as failed attempts without being run again."""
        self._claimed = []
        claim = _claim(self._limit, pg=self._pg, negative_now=now < 0)
        draining, self._draining = self._draining, False
        if not self._pg and not draining and not self._anything_due(now):
            # SQLite has one write lock; an idle worker that took it on every poll would make the
            # runbook's `sqlite3 ... UPDATE users` (no busy timeout by default) fail as "locked".
            # Right after a full batch there is most likely more: no need to look first.
            return 0
        with self.engine.begin() as connection:
            rows = _claimed_rows(connection, claim, now)
            if not rows:
                return 0
            self._claimed = list(rows)
            if self._pg:
                # Concurrent workers take their row locks customer by customer in one global order,
                # so that two batches touching the same customers queue instead of deadlocking.
                rows = sorted(rows, key=_lock_order)
            store = Store(connection, self.settings.price_tiers)
            logs: list[_LogLine] = []
            store.deferred_logs = logs
            store.remember_batch()
            outcomes, seconds = [], []
            for row in rows:
                started = time.perf_counter()
                if failed is not None and row.id in failed:
                    known = failed[row.id]
                    outcomes.append(self._failure(row, known.error, now, parked=known.parked, logs=logs))
                else:
                    outcomes.append(self._apply(connection, store, row, now, isolate=failed is not None, logs=logs))
                seconds.append(time.perf_counter() - started)
            self._record(connection, outcomes)
        for logger, level, message, args in logs:
            logger.log(level, message, *args)
        self._count(rows, outcomes, seconds)
        self._draining = len(rows) == self._limit
        return len(rows)

    def _anything_due(self, now: float) -> bool:
        """One indexed read, without the write lock: is any event ready to apply?"""
        probe = select(_events.c.id).where(_events.c.status == "pending", _events.c.available_at <= now).limit(1)
        with self.engine.connect().execution_options(readonly=True) as connection:
            return connection.execute(probe).first() is not None

    def _count(self, rows: Sequence[Any], outcomes: list[_Outcome], seconds: list[float]) -> None:
        """Metrics of a committed batch (doctor's probe event left out)."""
        if self.metrics is not None:
            self.metrics.events_processed(
                (
                    (outcome.status, row.type, row.created, took)
                    for row, outcome, took in zip(rows, outcomes, seconds, strict=True)
                    if not row.stripe_event_id.startswith(PROBE_EVENT_PREFIX)
                ),
                time.time(),
            )

    def _record(self, connection: Any, outcomes: list[_Outcome]) -> None:
        compiled = compiled_for(_RECORD, connection.dialect)
        driver_execute(connection, compiled.sql, compiled.many([o.__dict__ for o in outcomes]), many=True)

    def _apply(
        self,
        connection: Any,
        store: Store,
        row: Any,
        now: float,
        *,
        isolate: bool = True,
        logs: list[_LogLine] | None = None,
    ) -> _Outcome:
        """Apply one event. ``isolate``: in a savepoint, and a failure is this event's outcome;
        otherwise a failure raises ``_EventFailed`` for the caller to roll back the transaction.
        ``logs``: where the log lines go until the transaction commits (else written at once)."""
        attempts = row.attempts + 1
        handler = HANDLERS.get(row.type)
        if handler is None:
            return _Outcome(row.id, "ignored", attempts, 0.0, None, "event type not handled", datetime.now(UTC))
        # Stripe's other mode (stored before STRIPE_MODE was set, say): ignored, whatever the path.
        other_mode = other_mode_detail(bool(row.livemode), self.settings.stripe_mode)
        if other_mode is not None:
            return _Outcome(row.id, "ignored", attempts, 0.0, None, other_mode, datetime.now(UTC))
        mark = len(logs) if logs is not None else 0
        try:
            obj = orjson.loads(row.payload)["data"]["object"]
            event = StoredEvent(row.id, row.stripe_event_id, row.type, row.created, obj)
            if self.verifier is not None:
                event = self.verifier.verified(event)
            if isolate:
                with connection.begin_nested():
                    detail = handler(store, event)
            else:
                detail = handler(store, event)
        except Exception as exc:  # any handler failure is recorded, never lost
            if is_database_fault(exc):
                raise  # the database itself failed (lock, disconnect, timeout): the whole batch is retried
            error = _error_text(exc)
            if not isolate:
                raise _EventFailed(row.id, error, parked=isinstance(exc, UnmappedPrice)) from exc
            if logs is not None:
                del logs[mark:]  # what the handler logged was rolled back with its savepoint
            store.forget_batch()  # rows it wrote or locked may be gone with the savepoint
            return self._failure(row, error, now, parked=isinstance(exc, UnmappedPrice), logs=logs)
        applied = "webhook event applied event=%s type=%s %s"
        _log(logs, log, logging.INFO, applied, row.stripe_event_id, row.type, detail)
        return _Outcome(row.id, "applied", attempts, 0.0, None, detail[:2000], datetime.now(UTC))

    def _failure(
        self, row: Any, error: str, now: float, *, parked: bool, logs: list[_LogLine] | None = None
    ) -> _Outcome:
        """The outcome of a failed attempt: retry later with backoff, or park after the last."""
        attempts = row.attempts + 1
        if parked or attempts >= self.settings.worker_max_attempts:
            _log(
                logs,
                log,
                logging.ERROR,
                "webhook event failed, parked event=%s type=%s attempts=%d error=%s",
                row.stripe_event_id,
                row.type,
                attempts,
                error,
            )
            return _Outcome(row.id, "failed", attempts, 0.0, error[:_MAX_ERROR], None, datetime.now(UTC))
        delay = self._backoff(attempts)
        _log(
            logs,
            log,
            logging.WARNING,
            "webhook event failed, retry in %.0fs event=%s type=%s attempts=%d error=%s",
            delay,
            row.stripe_event_id,
            row.type,
            attempts,
            error,
        )
        return _Outcome(row.id, "pending", attempts, now + delay, error[:_MAX_ERROR], None, None)

    def _backoff(self, attempts: int) -> float:
        base = self.settings.retry_base_seconds * (2 ** (attempts - 1))
        return float(min(base, _MAX_BACKOFF) * random.uniform(0.5, 1.0))

    def apply_again(self, connection: Any, store: Store, row: Any, now: float) -> _Outcome:
        """Apply one inbox row in its own savepoint and record its outcome, in the caller's
        transaction: the path ``kamiyo replay`` shares with the worker (operations/replay.py)."""
        outcome = self._apply(connection, store, row, now)
        self._record(connection, [outcome])
        return outcome

    def sweep_expired_overrides(self, now: float | None = None) -> None:
        """At most every second: users whose manual override expired return to Stripe's state."""
        now = time.time() if now is None else now
        if now < self._next_override_sweep:
            return
        self._next_override_sweep = now + _OVERRIDE_SWEEP_SECONDS
        try:
            expire_overrides(self.engine, self.settings.price_tiers, now=datetime.fromtimestamp(now, UTC))
        except Exception as exc:  # noqa: BLE001 - retried at the next sweep; never ends the worker
            log.error("override expiry failed: %s", describe(exc))

    def run(self, stop: threading.Event, wake: threading.Event | None = None) -> None:
        """Apply events until ``stop`` is set; ``wake`` cuts the idle wait short.

        A failed batch never ends the loop: the worker backs off (``fault_backoff``) and tries
        again. Should the loop itself end by an error, the scheduled backfill ends with it and
        the heartbeat row is removed, so that whoever restarts the worker starts afresh.
        """
        wake = wake or threading.Event()
        failures = 0
        log.info("worker started database=%s", self.engine.dialect.name)
        schedule_stop = threading.Event()
        backfill = BackfillSchedule.start(self.engine, self.settings, schedule_stop, wake, gateway=self.gateway)
        try:
            while not stop.is_set():
                self.heartbeat.beat()
                self.sweep_expired_overrides()
                self.retention.step()
                try:
                    handled = self.run_once()
                    failures = 0
                except Exception as exc:  # noqa: BLE001 - a database outage must not end the worker
                    failures += 1
                    pause = fault_backoff(failures)
                    kind = "database fault" if is_database_fault(exc) else "error"
                    log.error("worker batch failed (%s), retry in %.1fs: %s", kind, pause, describe(exc))
                    stop.wait(pause)
                    continue
                if handled < self.settings.worker_batch_size:
                    wake.wait(self.settings.worker_poll_seconds)
                    wake.clear()
        finally:
            schedule_stop.set()
            self.heartbeat.stop()
            if backfill is not None:
                backfill.join()
        log.info("worker stopped")


def fault_backoff(failures: int) -> float:
    """Seconds to wait after the ``failures``-th failed batch in a row: bounded, with jitter."""
    ceiling = min(FAULT_BACKOFF_BASE * 2 ** min(failures - 1, 32), FAULT_BACKOFF_MAX)
    return float(ceiling * random.uniform(0.5, 1.0))


def _error_text(exc: BaseException) -> str:
    """An event's error as stored and logged: a database error as ``describe`` tells it (no SQL,
    no parameters), anything else as ``Class: message``; credentials scrubbed either way."""
    if isinstance(exc, SQLAlchemyError):
        return describe(exc)
    return scrub(f"{exc.__class__.__name__}: {exc}")[:_MAX_ERROR]


class _ClaimedRow(NamedTuple):
    """An inbox row as a batch claims it: ``_CLAIMED_COLUMNS``, in that order."""

    id: int
    stripe_event_id: str
    type: str
    created: int
    payload: str
    attempts: int
    livemode: bool


def _claimed_rows(connection: Any, claim: Any, now: float) -> list[_ClaimedRow]:
    """Run the claim on the driver's cursor: SQLAlchemy's execute and rows took longer than the
    claim itself (SQLite: 720 against 270 µs for a batch of 200)."""
    compiled = compiled_for(claim, connection.dialect)
    cursor = driver_execute(connection, compiled.sql, compiled.parameters({"now": now}))
    return [_ClaimedRow(*row) for row in compiled.rows(cursor.fetchall())]


_CLAIMED_COLUMNS = (
    _events.c.id,
    _events.c.stripe_event_id,
    _events.c.type,
    _events.c.created,
    _events.c.payload,
    _events.c.attempts,
    _events.c.livemode,
)


@functools.lru_cache(maxsize=16)
def _claim(limit: int, *, pg: bool, negative_now: bool = False) -> Any:
    """The oldest ``limit`` pending events due at ``now``, in inbox order.

    PostgreSQL: one query, locking the rows it returns and skipping those another worker holds.
    SQLite (one writer, nothing to skip): the ids first, from the claim index alone, then the
    rows. ``ORDER BY id`` over the range ``available_at <= now`` sorts every pending event of the
    backlog, payloads included, for each batch; within one ``available_at`` the index is in id
    order, so new and replayed events (``available_at`` 0) are read in order without a sort, and
    only those in backoff (any other value, due) are sorted.
    """
    now: Any = bindparam("now")
    due = (_events.c.status == "pending", _events.c.available_at <= now)
    if pg:
        query = select(*_CLAIMED_COLUMNS).where(*due).order_by(_events.c.id).limit(limit)
        return query.with_for_update(skip_locked=True)
    if negative_now:
        return select(*_CLAIMED_COLUMNS).where(*due).order_by(_events.c.id).limit(limit)
    available = _events.c.available_at
    parts = []
    for condition in (available == 0.0, available < 0.0, and_(available > 0.0, available <= now)):
        part = (
            select(_events.c.id)
            .where(_events.c.status == "pending", condition)
            .order_by(_events.c.id)
            .limit(limit)
            .subquery()
        )
        parts.append(select(part.c.id))
    ids = union_all(*parts).subquery()
    first = select(ids.c.id).order_by(ids.c.id).limit(limit)
    return select(*_CLAIMED_COLUMNS).where(_events.c.id.in_(first)).order_by(_events.c.id)


def _log(logs: list[_LogLine] | None, logger: logging.Logger, level: int, message: str, *args: Any) -> None:
    """Write a log line now, or keep it in ``logs`` for when the transaction has committed."""
    if logs is None:
        logger.log(level, message, *args)
    elif logger.isEnabledFor(level):
        logs.append((logger, level, message, args))


def _lock_order(row: Any) -> tuple[str, int]:
    """The customer an event touches (its rows are locked in this order), then the inbox order."""
    try:
        obj = orjson.loads(row.payload)["data"]["object"]
        customer = link_hint(row.type, obj).customer_id if isinstance(obj, dict) else None
    except (orjson.JSONDecodeError, KeyError, TypeError):
        customer = None
    return customer or "", row.id


def replay(engine: Engine, *, event_id: str | None = None, failed: bool = False) -> int:
    """Make events pending again (one by id, or every parked failure); return how many."""
    if (event_id is None) == (not failed):
        raise ApplyError("replay needs exactly one of an event id or --failed")
    stmt = update(_events).values(
        status="pending", available_at=0.0, attempts=0, last_error=None, replayed_at=datetime.now(UTC)
    )
    stmt = stmt.where(_events.c.stripe_event_id == event_id) if event_id else stmt.where(_events.c.status == "failed")
    with engine.begin() as connection:
        return int(connection.execute(stmt).rowcount)
