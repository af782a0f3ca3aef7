"""Replay stored events: one by id, or those parked as failed, of a type, or received since.

Each event is applied exactly as the worker applies it (``Worker.apply_rows``: the apply engine,
the outcome recorded on the inbox row), in the order the inbox received them. Applying commits
every ``_CHUNK`` events and appends one audit entry per event, in the transaction that applied it.

A selection replays at most ``limit`` events (``REPLAY_DEFAULT_LIMIT`` unless told, never more
than ``REPLAY_MAX_LIMIT``), oldest first; ``after`` (an event id) continues where an earlier
replay of the same selection stopped.

``dry_run`` runs that very code without its writes: the engine loads what the events reach, in a
read-only transaction without row locks, and decides; its state carries from one chunk to the
next, so each event sees what the ones before it would have done, nothing is written, and no
delivery or worker waits for it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import ColumnElement, Connection, Engine, func, select, update

from kamiyo.config import Settings
from kamiyo.db.models import events_table
from kamiyo.domain.outcomes import InboxStatus, UserChange
from kamiyo.domain.overrides import as_utc
from kamiyo.domain.state import BatchState
from kamiyo.errors import KamiyoError
from kamiyo.operations.audit import record_action
from kamiyo.operations.users import StateView
from kamiyo.processing.worker import ClaimedEvent, Worker

log = logging.getLogger("kamiyo.operations")
_events = events_table
_CHUNK = 200


@dataclass(frozen=True)
class UserStateChange:
    email: str
    before: StateView
    after: StateView


@dataclass(frozen=True)
class ReplayResult:
    """What replaying one event did (or, in a dry run, would do)."""

    event_id: str
    type: str
    status_before: str
    status_after: str  # applied | ignored | failed (parked) | pending (failed, the worker retries it)
    detail: str | None
    error: str | None
    changes: list[UserStateChange]
    dry_run: bool
    outcome: dict[str, Any] | None = None  # what applying did (domain/outcomes.py), as JSON


@dataclass
class _Run:
    worker: Worker
    settings: Settings
    dry_run: bool
    actor: str
    reason: str | None
    claimed_by: str | None = None
    results: list[ReplayResult] = field(default_factory=list)
    state: BatchState | None = None  # a dry run's view, carried from chunk to chunk


def replay_events(
    engine: Engine,
    *,
    event_id: str | None = None,
    failed: bool = False,
    event_type: str | None = None,
    since: datetime | None = None,
    after: str | None = None,
    dry_run: bool = False,
    actor: str,
    reason: str | None,
    settings: Settings | None = None,
    limit: int | None = None,
    claimed_by: str | None = None,
    progress: Callable[[int], None] | None = None,
) -> list[ReplayResult]:
    """Apply the selected events again (oldest first); with ``dry_run``, only show what would change.

    Select by ``event_id`` alone, or by any combination of ``failed``, ``event_type`` and
    ``since`` (received at or after), at most ``limit`` events (default and maximum: the
    settings' replay limits) received after the event ``after``. ``settings`` (default: from the
    environment) supplies the tier configuration, as the worker's does. ``claimed_by``: a name
    the actor gave without proving it, recorded beside the actor in each audit entry.
    ``progress``, if given, is called with the number of events replayed so far after each chunk.
    """
    conditions = _selection(event_id, failed, event_type, since)
    if event_id is not None and after is not None:
        raise KamiyoError("replay an event id on its own, or select with --failed, --type and --since")
    if not actor.strip():
        raise KamiyoError("who replays is required (--by)")
    if settings is None:
        from kamiyo.config import load_settings

        settings = load_settings()
    size = replay_limit(settings, limit)

    def selected(connection: Connection) -> list[int]:
        return _selected_ids(connection, conditions, after, size)

    run = _Run(Worker(engine, settings), settings, dry_run, actor.strip(), (reason or "").strip() or None, claimed_by)
    if dry_run:
        run.state = BatchState(settings.price_tiers, datetime.now(UTC))
        with _read_only(engine) as connection:
            ids = selected(connection)
            _require(event_id, ids)
            for chunk in _chunks(ids):
                _replay_chunk(connection, run, chunk)
                if progress is not None:
                    progress(len(run.results))
        return run.results
    with engine.connect().execution_options(readonly=True) as connection:
        ids = selected(connection)
    _require(event_id, ids)
    with engine.connect() as connection:
        for chunk in _chunks(ids):
            with connection.begin():
                _replay_chunk(connection, run, chunk)
            if progress is not None:
                progress(len(run.results))
    return run.results


def replay_limit(settings: Settings, limit: int | None) -> int:
    """How many events a replay takes: ``limit``, else the default; never more than the maximum."""
    if limit is None:
        return settings.replay_default_limit
    if not 1 <= limit <= settings.replay_max_limit:
        raise KamiyoError(f"limit must be from 1 to {settings.replay_max_limit} (REPLAY_MAX_LIMIT), got {limit}")
    return limit


def count_selected(
    engine: Engine,
    *,
    failed: bool = False,
    event_type: str | None = None,
    since: datetime | None = None,
    after: str | None = None,
) -> int:
    """How many events a selection holds (before any limit): what a confirmation shows."""
    conditions = _selection(None, failed, event_type, since)
    with engine.connect().execution_options(readonly=True) as connection:
        conditions += _after(connection, after)
        return int(connection.execute(select(func.count()).select_from(_events).where(*conditions)).scalar_one())


def _selected_ids(
    connection: Connection, conditions: list[ColumnElement[bool]], after: str | None, limit: int
) -> list[int]:
    query = select(_events.c.id).where(*conditions, *_after(connection, after)).order_by(_events.c.id).limit(limit)
    return list(connection.execute(query).scalars())


def _after(connection: Connection, after: str | None) -> list[ColumnElement[bool]]:
    if after is None:
        return []
    found = connection.execute(select(_events.c.id).where(_events.c.stripe_event_id == after)).scalar()
    if found is None:
        raise KamiyoError(f"no event {after} in the inbox (--after)")
    return [_events.c.id > found]


def _require(event_id: str | None, ids: Sequence[int]) -> None:
    if event_id is not None and not ids:
        raise KamiyoError(f"no event {event_id} in the inbox")


def _chunks(ids: Sequence[int]) -> list[Sequence[int]]:
    return [ids[i : i + _CHUNK] for i in range(0, len(ids), _CHUNK)]


def _selection(
    event_id: str | None, failed: bool, event_type: str | None, since: datetime | None
) -> list[ColumnElement[bool]]:
    if event_id is not None:
        if failed or event_type or since:
            raise KamiyoError("replay an event id on its own, or select with --failed, --type and --since")
        return [_events.c.stripe_event_id == event_id]
    conditions: list[ColumnElement[bool]] = []
    if failed:
        conditions.append(_events.c.status == InboxStatus.FAILED.value)
    if event_type:
        conditions.append(_events.c.type == event_type)
    if since is not None:
        conditions.append(_events.c.received_at >= as_utc(since))
    if not conditions:
        raise KamiyoError("replay needs an event id, --failed, --type or --since")
    return conditions


def _replay_chunk(connection: Connection, run: _Run, ids: Sequence[int]) -> None:
    query = select(
        _events.c.id,
        _events.c.stripe_event_id,
        _events.c.type,
        _events.c.created,
        _events.c.payload,
        _events.c.status,
        _events.c.attempts,
        _events.c.last_error,
        _events.c.livemode,
    ).where(_events.c.id.in_(ids))
    if connection.dialect.name == "postgresql" and not run.dry_run:
        query = query.with_for_update()  # a worker applying one of them finishes first
    rows = connection.execute(query.order_by(_events.c.id)).all()
    # Attempts counted afresh: a replayed event starts again from its first.
    claimed = [ClaimedEvent(r.id, r.stripe_event_id, r.type, r.created, r.payload, 0, bool(r.livemode)) for r in rows]
    logs: list[Any] = []
    outcomes = run.worker.apply_rows(
        connection, claimed, time.time(), logs=logs, state=run.state, write=not run.dry_run
    )
    if not run.dry_run:
        run.worker.record(connection, outcomes)
        connection.execute(
            update(_events).where(_events.c.id.in_([r.id for r in rows])).values(replayed_at=datetime.now(UTC))
        )
    for row, outcome in zip(rows, outcomes, strict=True):
        changes = [_change(c) for c in outcome.outcome.users] if outcome.outcome is not None else []
        result = ReplayResult(
            event_id=row.stripe_event_id,
            type=row.type,
            status_before=row.status,
            status_after=outcome.status.value,
            detail=outcome.detail,
            error=outcome.last_error,
            changes=changes,
            dry_run=run.dry_run,
            outcome=outcome.outcome.to_json() if outcome.outcome is not None else None,
        )
        run.results.append(result)
        if run.dry_run:
            continue
        record_action(
            connection,
            action="replay",
            actor=run.actor,
            reason=run.reason,
            target=row.stripe_event_id,
            before={"status": row.status, "attempts": row.attempts, "error": row.last_error},
            after={
                "status": outcome.status.value,
                "detail": outcome.detail,
                "error": outcome.last_error,
                "users": [asdict(c) for c in changes],
            },
            claimed_by=run.claimed_by,
        )
        log.info(
            "event replayed event=%s type=%s status=%s->%s by=%s",
            row.stripe_event_id,
            row.type,
            row.status,
            outcome.status.value,
            run.actor,
        )
    if not run.dry_run:
        # Written once the chunk's statements are done; the chunk commits right after.
        for logger, level, message, args in logs:
            logger.log(level, message, *args)


def _change(change: UserChange) -> UserStateChange:
    return UserStateChange(
        email=change.email,
        before=StateView(change.tier_from, change.status_from),
        after=StateView(change.tier_to, change.status_to),
    )


@contextmanager
def _read_only(engine: Engine) -> Iterator[Connection]:
    """A connection in a read-only transaction, rolled back at the end (a dry run's): SQLite's
    deferred BEGIN takes no write lock; PostgreSQL's REPEATABLE READ READ ONLY sees one snapshot
    and refuses any write."""
    with engine.connect() as connection:
        if connection.dialect.name == "postgresql":
            connection = connection.execution_options(isolation_level="REPEATABLE READ", postgresql_readonly=True)
        else:
            connection = connection.execution_options(readonly=True)  # db/engine.py: a deferred BEGIN
        transaction = connection.begin()
        try:
            yield connection
        finally:
            transaction.rollback()
