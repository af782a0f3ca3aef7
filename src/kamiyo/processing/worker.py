"""The worker: claims pending events from the inbox and applies them.

Transaction boundary: one transaction claims a batch, applies each event, records every
outcome, and commits. Claim, effect and outcome therefore commit together or not at all: a crash
mid-batch leaves the events pending for the next worker, and no event is ever applied twice.

A batch is applied by the engine (processing/engine.py: load, decide, flush): an event whose
rule fails has its changes undone in memory and is recorded as a failed attempt, its batch
neighbours keep theirs. Should the database refuse one of the batch's writes for the data it
carries, the batch rolls back and runs again with each event in a SAVEPOINT of its own (the
slow path, taken only then). The log lines of a batch are written once it has committed, so a
rolled-back attempt logs nothing.

On PostgreSQL, ``FOR UPDATE SKIP LOCKED`` gives concurrent workers disjoint batches; on SQLite
the write lock serialises them.

Only an error of the event itself is one of its attempts: its rule raising, or a statement
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
from sqlalchemy import Connection, Engine, and_, bindparam, select, union_all, update
from sqlalchemy.exc import DBAPIError

from kamiyo.config import Settings
from kamiyo.db.engine import REPLAYABLE_OPTION
from kamiyo.db.errors import describe, is_database_fault
from kamiyo.db.models import events_table
from kamiyo.domain.modes import other_mode_detail
from kamiyo.domain.outcomes import InboxStatus, Outcome
from kamiyo.domain.rules import RULES, StoredEvent
from kamiyo.domain.state import BatchState
from kamiyo.errors import ApplyError
from kamiyo.operations.overrides import expire_overrides
from kamiyo.processing.engine import Failed, LostRace, apply_events, error_text, state_log_lines
from kamiyo.processing.retention import Retention
from kamiyo.processing.statements import update_by_id
from kamiyo.reconcile.gateway import StripeGateway
from kamiyo.reconcile.schedule import BackfillSchedule
from kamiyo.reconcile.verify import event_verifier
from kamiyo.telemetry.heartbeat import Heartbeat
from kamiyo.telemetry.metrics import PROBE_EVENT_PREFIX, ProcessedCounter, process_metrics

log = logging.getLogger("kamiyo.worker")
state_log = logging.getLogger("kamiyo.state")
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
_RECORD = update_by_id(
    _events,
    status="status",
    attempts="attempts",
    available_at="available_at",
    last_error="last_error",
    detail="detail",
    processed_at="processed_at",
    outcome="outcome",
)


_LogLine = tuple[logging.Logger, int, str, tuple[Any, ...]]


class ClaimedEvent(NamedTuple):
    """An inbox row as ``apply_rows`` reads it: the claim's columns, in this order."""

    id: int
    stripe_event_id: str
    type: str
    created: int
    payload: str
    attempts: int
    livemode: bool


@dataclass
class _Outcome:
    """What an inbox row becomes: its new status and attempt count, and what applying it did."""

    id: int
    status: InboxStatus
    attempts: int
    available_at: float
    last_error: str | None
    detail: str | None
    processed_at: datetime | None
    outcome: Outcome | None = None

    def parameters(self) -> dict[str, Any]:
        return {
            "b_id": self.id,
            "b_status": self.status.value,
            "b_attempts": self.attempts,
            "b_available_at": self.available_at,
            "b_last_error": self.last_error,
            "b_detail": self.detail,
            "b_processed_at": self.processed_at,
            # The engine's JSON serializer (orjson) writes the dataclass: its fields, None as null.
            "b_outcome": self.outcome,
        }


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
        # A batch's transaction: its events stay pending until it commits, so it can always be
        # applied again (on SQLite it does not wait for the disk; db/engine.py REPLAYABLE_OPTION).
        self._batches = engine.execution_options(**{REPLAYABLE_OPTION: True})
        self.settings = settings
        # Stripe's API: customer look-ups, STRIPE_VERIFY_EVENTS, the scheduled backfill.
        self.gateway = gateway
        self.verifier = event_verifier(settings, gateway)
        self.metrics: ProcessedCounter | None = (metrics or process_metrics()) if settings.metrics_enabled else None
        self.heartbeat = Heartbeat(engine)
        # The inbox's retention: a short transaction at a time between batches, one worker at a time.
        self.retention = Retention(engine, settings, self.heartbeat.worker_id)
        self._pg = engine.dialect.name == "postgresql"
        self._limit = settings.worker_batch_size
        self._claimed: list[ClaimedEvent] = []
        # Events are most likely due: the last batch was full, or the inbox writer woke the worker
        # after committing new ones (SQLite: claim without looking first).
        self._expect_due = False
        self._next_override_sweep = 0.0

    def run_once(self, now: float | None = None) -> int:
        """Claim and apply one batch; return how many events it handled.

        A database fault (``is_database_fault``) is raised as it is, for the caller to back off:
        the batch rolled back and no event's attempt is counted. An error of the data the
        database refuses (a statement of the batch's flush, or its commit) also rolls back the
        whole batch: the worker then applies one event per batch until the
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
        """Run a batch; when PostgreSQL aborts it as a deadlock or serialization victim, or another
        transaction inserted a row the batch was inserting (``LostRace``), run it again.

        That is ordinary contention between concurrent workers (e.g. two customers of one user in
        two batches), not a fault of any event: the whole batch rolled back, so it is retried at
        once, without counting an attempt against its events.
        """
        for retry in range(_CONFLICT_RETRIES):
            try:
                return self._run_batch(now)
            except (DBAPIError, LostRace) as exc:
                lost = isinstance(exc, LostRace)
                if not (lost or _is_conflict(exc)) or retry == _CONFLICT_RETRIES - 1:
                    raise
                name = "LostRace" if lost else getattr(exc, "orig", exc).__class__.__name__
                log.info("worker batch lost a lock conflict (%s); running it again", name)
                time.sleep(random.uniform(0.0, 0.02 * (retry + 1)))
        raise AssertionError("unreachable")

    def _run_batch(self, now: float) -> int:
        """Claim and apply one batch in one transaction: its claim, effects and outcomes commit
        together. Should the database refuse one of its writes for the data it carries (a NUL in a
        text, a value too long for its column), the batch rolls back and runs again, each event
        in a savepoint of its own: the refused event's attempt is recorded, its neighbours apply."""
        try:
            return self._run_claimed_batch(now, isolate=False)
        except DBAPIError as exc:
            if is_database_fault(exc) or _is_conflict(exc):
                raise
            log.warning("worker batch rolled back (%s); applying its events one savepoint each", describe(exc))
        return self._run_claimed_batch(now, isolate=True)

    def _run_claimed_batch(self, now: float, *, isolate: bool) -> int:
        self._claimed = []
        claim = _claim(self._limit, pg=self._pg, negative_now=now < 0)
        expected, self._expect_due = self._expect_due, False
        if not self._pg and not expected and not isolate and not self._anything_due(now):
            # SQLite has one write lock; an idle worker that took it on every poll would make the
            # runbook's `sqlite3 ... UPDATE users` (no busy timeout by default) fail as "locked".
            # Right after a full batch, or a wake by a commit of new events, there is most likely
            # more: no need to look first.
            return 0
        logs: list[_LogLine] = []
        with self._batches.begin() as connection:
            started = time.perf_counter()
            # Tuples, named once: a SQLAlchemy Row's attribute is a look-up by name at each read.
            rows = list(map(ClaimedEvent._make, connection.execute(claim, {"now": now})))
            if not rows:
                return 0
            self._claimed = rows
            if isolate:
                results = [self._apply_in_savepoint(connection, row, now, logs) for row in rows]
            else:
                results = self.apply_rows(connection, rows, now, logs=logs)
                self._record(connection, results)
            took = (time.perf_counter() - started) / len(rows)
        for logger, level, message, args in logs:
            logger.log(level, message, *args)
        self._count(rows, results, [took] * len(rows))
        self._expect_due = len(rows) == self._limit
        return len(rows)

    def _apply_in_savepoint(
        self, connection: Connection, row: ClaimedEvent, now: float, logs: list[_LogLine]
    ) -> _Outcome:
        """Apply and record one event in a savepoint; a write the database refuses for its data
        rolls back that event alone and is recorded as its failed attempt."""
        own: list[_LogLine] = []
        try:
            with connection.begin_nested():
                [result] = self.apply_rows(connection, [row], now, logs=own)
                self._record(connection, [result])
        except DBAPIError as exc:
            if is_database_fault(exc) or _is_conflict(exc):
                raise
            result = self._failure(row, describe(exc), now, parked=False, logs=logs)
            self._record(connection, [result])
            return result
        logs.extend(own)
        return result

    def _anything_due(self, now: float) -> bool:
        """One indexed read, without the write lock: is any event ready to apply?"""
        probe = select(_events.c.id).where(_events.c.status == InboxStatus.PENDING.value, _events.c.available_at <= now)
        with self.engine.connect().execution_options(readonly=True) as connection:
            return connection.execute(probe.limit(1)).first() is not None

    def _count(self, rows: Sequence[ClaimedEvent], outcomes: list[_Outcome], seconds: list[float]) -> None:
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

    def _record(self, connection: Any, outcomes: Sequence[_Outcome]) -> None:
        _RECORD.execute(connection, [outcome.parameters() for outcome in outcomes])

    def apply_rows(
        self,
        connection: Connection,
        rows: Sequence[ClaimedEvent],
        now: float,
        *,
        logs: list[_LogLine],
        state: BatchState | None = None,
        write: bool = True,
    ) -> list[_Outcome]:
        """Apply inbox rows through the engine, in the caller's transaction, and return each one's
        outcome (not yet recorded). The log lines go to ``logs``, for the caller to write once it
        has committed.
        ``write`` False: a dry run (nothing locked or written; ``state`` carries on to the next rows).
        """
        results: list[_Outcome | None] = [None] * len(rows)
        events: list[StoredEvent] = []
        positions: list[int] = []
        applied_at = datetime.now(UTC)  # the batch commits as one: one time for all its rows
        for position, row in enumerate(rows):
            attempts = row.attempts + 1
            if row.type not in RULES:
                results[position] = _Outcome(
                    row.id, InboxStatus.IGNORED, attempts, 0.0, None, "event type not handled", applied_at
                )
                continue
            # Stripe's other mode (stored before STRIPE_MODE was set, say): ignored, whatever the path.
            other_mode = other_mode_detail(bool(row.livemode), self.settings.stripe_mode)
            if other_mode is not None:
                results[position] = _Outcome(row.id, InboxStatus.IGNORED, attempts, 0.0, None, other_mode, applied_at)
                continue
            try:
                obj = orjson.loads(row.payload)["data"]["object"]
                if not isinstance(obj, dict):
                    raise TypeError("data.object is not an object")
                event = StoredEvent(row.id, row.stripe_event_id, row.type, row.created, obj)
                if self.verifier is not None:
                    event = self.verifier.verified(event)
            except Exception as exc:  # noqa: BLE001 - a payload that cannot be read fails its event alone
                results[position] = self._failure(row, error_text(exc), now, parked=False, logs=logs)
                continue
            events.append(event)
            positions.append(position)
        if events:
            state = state if state is not None else BatchState(self.settings.price_tiers, applied_at)
            decisions = apply_events(connection, state, events, lock=self._pg and write, write=write)
            for position, decision in zip(positions, decisions, strict=True):
                row = rows[position]
                if isinstance(decision, Failed):
                    results[position] = self._failure(row, decision.error, now, parked=decision.parked, logs=logs)
                    continue
                outcome = decision.outcome
                for line in state_log_lines(outcome):
                    _log(logs, state_log, logging.INFO, *line)
                detail = outcome.describe()
                _log(
                    logs,
                    log,
                    logging.INFO,
                    "webhook event applied event=%(event)s type=%(type)s %(detail)s",
                    {"event": row.stripe_event_id, "type": row.type, "detail": detail},
                )
                results[position] = _Outcome(
                    row.id, InboxStatus.APPLIED, row.attempts + 1, 0.0, None, detail[:_MAX_ERROR], applied_at, outcome
                )
        return [result for result in results if result is not None]

    def _failure(
        self, row: ClaimedEvent, error: str, now: float, *, parked: bool, logs: list[_LogLine] | None = None
    ) -> _Outcome:
        """The outcome of a failed attempt: retry later with backoff, or park after the last."""
        attempts = row.attempts + 1
        if parked or attempts >= self.settings.worker_max_attempts:
            _log(
                logs,
                log,
                logging.ERROR,
                "webhook event failed, parked event=%(event)s type=%(type)s attempts=%(attempts)d error=%(error)s",
                {"event": row.stripe_event_id, "type": row.type, "attempts": attempts, "error": error},
            )
            return _Outcome(row.id, InboxStatus.FAILED, attempts, 0.0, error[:_MAX_ERROR], None, datetime.now(UTC))
        delay = self._backoff(attempts)
        _log(
            logs,
            log,
            logging.WARNING,
            "webhook event failed, retry in %(retry_in).0fs event=%(event)s type=%(type)s attempts=%(attempts)d"
            " error=%(error)s",
            {"retry_in": delay, "event": row.stripe_event_id, "type": row.type, "attempts": attempts, "error": error},
        )
        return _Outcome(row.id, InboxStatus.PENDING, attempts, now + delay, error[:_MAX_ERROR], None, None)

    def _backoff(self, attempts: int) -> float:
        base = self.settings.retry_base_seconds * (2 ** (attempts - 1))
        return float(min(base, _MAX_BACKOFF) * random.uniform(0.5, 1.0))

    def record(self, connection: Any, outcomes: Sequence[_Outcome]) -> None:
        """Record outcomes on their inbox rows, in the caller's transaction (``kamiyo replay``)."""
        self._record(connection, outcomes)

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
                    # Woken (not timed out): the inbox writer committed new events meanwhile.
                    self._expect_due = wake.wait(self.settings.worker_poll_seconds)
                    wake.clear()
        finally:
            schedule_stop.set()
            self.heartbeat.stop()
            if backfill is not None:
                backfill.join()
        log.info("worker stopped")


def _is_conflict(exc: BaseException) -> bool:
    """PostgreSQL chose this transaction as a deadlock's or a serialization failure's victim."""
    return getattr(getattr(exc, "orig", None), "sqlstate", None) in _CONFLICT_SQLSTATES


def fault_backoff(failures: int) -> float:
    """Seconds to wait after the ``failures``-th failed batch in a row: bounded, with jitter."""
    ceiling = min(FAULT_BACKOFF_BASE * 2 ** min(failures - 1, 32), FAULT_BACKOFF_MAX)
    return float(ceiling * random.uniform(0.5, 1.0))


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
    due = (_events.c.status == InboxStatus.PENDING.value, _events.c.available_at <= now)
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
            .where(_events.c.status == InboxStatus.PENDING.value, condition)
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


def replay(engine: Engine, *, event_id: str | None = None, failed: bool = False) -> int:
    """Make events pending again (one by id, or every parked failure); return how many."""
    if (event_id is None) == (not failed):
        raise ApplyError("replay needs exactly one of an event id or --failed")
    stmt = update(_events).values(
        status=InboxStatus.PENDING.value, available_at=0.0, attempts=0, last_error=None, replayed_at=datetime.now(UTC)
    )
    if event_id:
        stmt = stmt.where(_events.c.stripe_event_id == event_id)
    else:
        stmt = stmt.where(_events.c.status == InboxStatus.FAILED.value)
    with engine.begin() as connection:
        return int(connection.execute(stmt).rowcount)
