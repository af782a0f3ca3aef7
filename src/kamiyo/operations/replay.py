"""Replay stored events: one by id, or those parked as failed, of a type, or received since.

Each event is applied exactly as the worker applies it (``Worker.apply_again``: the handler in
its own savepoint, the outcome recorded on the inbox row), in the order the inbox received
them. Applying commits every ``_CHUNK`` events and appends one audit entry per event, in the
transaction that applied it.

A selection replays at most ``limit`` events (``REPLAY_DEFAULT_LIMIT`` unless told, never more
than ``REPLAY_MAX_LIMIT``), oldest first; ``after`` (an event id) continues where an earlier
replay of the same selection stopped.

``dry_run`` runs that very code on a snapshot (operations/snapshot.py: TEMP copies of what the
events can reach, in a read-only transaction thrown away at the end), so what it shows is what
applying would do at that moment, each event seeing what the ones before it would have done,
and no delivery or worker waits for it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import ColumnElement, Connection, Engine, func, select, update

from kamiyo.config import Settings
from kamiyo.db.models import events_table
from kamiyo.domain.overrides import as_utc
from kamiyo.errors import KamiyoError
from kamiyo.operations.audit import record_action
from kamiyo.operations.snapshot import snapshot
from kamiyo.operations.users import StateView
from kamiyo.processing.store import Store, UserChange
from kamiyo.processing.worker import Worker

log = logging.getLogger("kamiyo.operations")
_events = events_table
_CHUNK = 200
# What applying logs as it goes; a dry run silences them (in its own thread only).
_APPLY_LOGGERS = ("kamiyo.state", "kamiyo.worker")


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


@dataclass
class _Claimed:
    """An inbox row as the worker's apply path reads it, with its attempts counted afresh."""

    id: int
    stripe_event_id: str
    type: str
    created: int
    payload: str
    livemode: bool
    attempts: int = 0


class _RecordingStore(Store):
    """The worker's Store, noting every user state it changes."""

    changes: list[UserChange]

    def __init__(self, connection: Connection, settings: Settings) -> None:
        super().__init__(connection, settings.price_tiers)
        self.changes = []

    def recompute_user(self, user_id: int, *, reset_when_none: bool = False) -> UserChange | None:
        change = super().recompute_user(user_id, reset_when_none=reset_when_none)
        if change is not None:
            self.changes.append(change)
        return change


@dataclass
class _Run:
    worker: Worker
    settings: Settings
    dry_run: bool
    actor: str
    reason: str | None
    claimed_by: str | None = None
    results: list[ReplayResult] = field(default_factory=list)


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
        with snapshot(engine, selected) as (connection, ids), _silenced_in_this_thread():
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
        conditions.append(_events.c.status == "failed")
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
    if connection.dialect.name == "postgresql":
        query = query.with_for_update()  # a worker applying one of them finishes first
    for row in connection.execute(query.order_by(_events.c.id)).all():
        store = _RecordingStore(connection, run.settings)
        claimed = _Claimed(row.id, row.stripe_event_id, row.type, row.created, row.payload, bool(row.livemode))
        outcome = run.worker.apply_again(connection, store, claimed, time.time())
        connection.execute(update(_events).where(_events.c.id == row.id).values(replayed_at=datetime.now(UTC)))
        # A failed handler's savepoint was rolled back: the changes it noted never happened.
        changes = [_change(c) for c in store.changes] if outcome.status == "applied" else []
        result = ReplayResult(
            event_id=row.stripe_event_id,
            type=row.type,
            status_before=row.status,
            status_after=outcome.status,
            detail=outcome.detail,
            error=outcome.last_error,
            changes=changes,
            dry_run=run.dry_run,
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
                "status": outcome.status,
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
            outcome.status,
            run.actor,
        )


def _change(change: UserChange) -> UserStateChange:
    return UserStateChange(
        email=change.email,
        before=StateView(change.before.tier, change.before.status),
        after=StateView(change.after.tier, change.after.status),
    )


class _OtherThreads(logging.Filter):
    def __init__(self) -> None:
        super().__init__()
        self.thread = threading.get_ident()

    def filter(self, record: logging.LogRecord) -> bool:
        # A logger's filters run in the thread that logs (records carry no thread id: logs.py).
        return threading.get_ident() != self.thread


@contextmanager
def _silenced_in_this_thread() -> Iterator[None]:
    """A dry run must not log "applied" or "user state changed" for what it rolls back; the
    worker thread of the same process keeps logging."""
    only_others = _OtherThreads()
    loggers: list[Any] = [logging.getLogger(name) for name in _APPLY_LOGGERS]
    for logger in loggers:
        logger.addFilter(only_others)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(only_others)
