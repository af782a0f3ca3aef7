"""Pruning: inbox events past their retention, parked failures by hand, old delivery stats.

- Applied and ignored events received more than ``INBOX_RETENTION_DAYS`` ago go (the worker's
  schedule, processing/retention.py; ``kamiyo prune`` by hand). Pending and failed events stay:
  a parked failure goes only when it is replayed or pruned by hand
  (``kamiyo prune --failed --older-than 30d``), which is audited. The audit log is never pruned.
- ``webhook_delivery_stats`` keeps 35 days (telemetry/delivery_stats.py,
  ``prune_delivery_stats_batch``).
- SQLite gives the freed pages back to the file system (``PRAGMA incremental_vacuum``, in
  ``auto_vacuum=INCREMENTAL`` mode: db/migrate.py).

Each batch is one short transaction of at most ``BATCH`` rows, so that a delivery never waits
long for SQLite's write lock, nor a worker for PostgreSQL's row locks (``SKIP LOCKED``).

Finding old events without an index on ``received_at`` (every delivery would pay for it): ids
grow with every insert and ``received_at`` is the time of the insert, so the events received
before a moment are those below one id, found by a binary search on the primary key
(``_boundary``). Each batch then walks the primary key up to that id.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Connection, Engine, delete, func, select

from kamiyo.db.models import events_table
from kamiyo.domain.outcomes import InboxStatus
from kamiyo.errors import KamiyoError
from kamiyo.operations.audit import record_action
from kamiyo.telemetry.delivery_stats import utc_seconds

log = logging.getLogger("kamiyo.prune")
_events = events_table
BATCH = 500  # rows per transaction
RETAINED = (InboxStatus.APPLIED, InboxStatus.IGNORED)  # what the retention prunes; pending and failed events stay
FAILED = (InboxStatus.FAILED,)
MIN_FAILED_AGE = timedelta(days=1)  # a parked failure younger than this is still being looked at
VACUUM_PAGES = 500  # pages (2 MiB at SQLite's default page size) given back per transaction
PRUNE_ACTION = "prune"


@dataclass(frozen=True)
class PruneScope:
    """Events of ``statuses`` received before ``before``."""

    statuses: tuple[str, ...]
    before: datetime

    def label(self) -> str:
        what = "parked failures" if self.statuses == FAILED else " and ".join(self.statuses) + " events"
        return f"{what} received before {_iso(self.before)}"


@dataclass(frozen=True)
class Prunable:
    """What a scope holds now: how many events, of which statuses, received from ``oldest`` to ``newest``."""

    count: int
    by_status: dict[str, int]
    oldest: datetime | None
    newest: datetime | None


@dataclass
class PruneSummary:
    scope: PruneScope
    dry_run: bool
    found: Prunable
    pruned: int = 0
    status: str = "done"  # done | failed | interrupted
    error: str | None = None
    by_status: dict[str, int] = field(default_factory=dict)


def retention_scope(retention_days: int, *, now: float | None = None) -> PruneScope:
    """Applied and ignored events older than the retention."""
    now = time.time() if now is None else now
    return PruneScope(RETAINED, datetime.fromtimestamp(now, UTC) - timedelta(days=retention_days))


def prunable(engine: Engine, scope: PruneScope) -> Prunable:
    """Count what ``scope`` would prune (a read; nothing is locked)."""
    with engine.connect().execution_options(readonly=True) as connection:
        limit = _boundary(connection, scope.before)
        conditions = [_events.c.id < limit, _events.c.received_at < scope.before]
        if _by_status(scope):
            conditions.append(_events.c.status.in_(scope.statuses))
        rows = connection.execute(
            select(_events.c.status, func.count(), func.min(_events.c.received_at), func.max(_events.c.received_at))
            .where(*conditions)
            .group_by(_events.c.status)
        ).all()
    rows = [row for row in rows if row[0] in scope.statuses]
    by_status = {str(status): int(n) for status, n, _oldest, _newest in rows}
    oldest = [_utc(row[2]) for row in rows if row[2] is not None]
    newest = [_utc(row[3]) for row in rows if row[3] is not None]
    return Prunable(sum(by_status.values()), by_status, min(oldest, default=None), max(newest, default=None))


def prune_batch(
    engine: Engine,
    scope: PruneScope,
    boundary: int,
    *,
    after: int = 0,
    limit: int = BATCH,
) -> tuple[dict[str, int], int | None]:
    """Delete the events of ``scope`` among the next ``limit`` with ids between ``after`` and
    ``boundary``, in one transaction. Returns how many of each status, and the id to continue
    after (None: nothing is left below the boundary)."""
    query = (
        select(_events.c.id, _events.c.status, _events.c.received_at)
        .where(_events.c.id > after, _events.c.id < boundary)
        .order_by(_events.c.id)
        .limit(limit)
    )
    if _by_status(scope):
        query = query.where(_events.c.status.in_(scope.statuses))
    if engine.dialect.name == "postgresql":
        query = query.with_for_update(skip_locked=True)  # a replay holding one of them keeps it
    cutoff = scope.before.timestamp()
    with engine.begin() as connection:
        rows = connection.execute(query).all()
        doomed = [row for row in rows if row.status in scope.statuses and utc_seconds(row.received_at) < cutoff]
        if doomed:
            connection.execute(delete(_events).where(_events.c.id.in_([row.id for row in doomed])))
    counts: dict[str, int] = {}
    for row in doomed:
        counts[row.status] = counts.get(row.status, 0) + 1
    return counts, (int(rows[-1].id) if len(rows) == limit else None)


def boundary(engine: Engine, before: datetime) -> int:
    """The id below which every event was received before ``before`` (a read of a few dozen rows)."""
    with engine.connect().execution_options(readonly=True) as connection:
        return _boundary(connection, before)


def reclaim_space(engine: Engine, *, pages: int = VACUUM_PAGES) -> int:
    """SQLite in incremental vacuum mode: give at most ``pages`` free pages back to the file system,
    in one transaction; how many it gave back (0 on PostgreSQL, whose autovacuum does this)."""
    if engine.dialect.name != "sqlite":
        return 0
    with engine.begin() as connection:
        driver: Any = connection.connection.driver_connection
        if driver.execute("PRAGMA auto_vacuum").fetchone()[0] != 2:
            return 0
        free = int(driver.execute("PRAGMA freelist_count").fetchone()[0])
        given = min(free, pages)
        # Python's sqlite3 steps a statement once, and this pragma frees one page per step.
        for _ in range(given):
            driver.execute("PRAGMA incremental_vacuum(1)")
    return given


def prune_by_hand(
    engine: Engine,
    scope: PruneScope,
    *,
    dry_run: bool,
    actor: str,
    reason: str | None,
    found: Prunable | None = None,
    progress: Callable[[int], None] | None = None,
    claimed_by: str | None = None,
) -> PruneSummary:
    """``kamiyo prune``: delete ``scope`` in batches (or, with ``dry_run``, only count it).

    A prune that deletes appends one audit entry when it ends, however it ends (done, failed,
    interrupted), in a transaction of its own after its batches, with what it deleted.
    ``claimed_by``: a name the actor gave without proving it, recorded beside the actor.
    """
    if not actor.strip():
        raise KamiyoError("who prunes is required (--by)")
    summary = PruneSummary(scope, dry_run, found if found is not None else prunable(engine, scope))
    if dry_run:
        return summary
    below = boundary(engine, scope.before)
    after: int | None = 0
    try:
        while after is not None:
            counts, after = prune_batch(engine, scope, below, after=after)
            for status, n in counts.items():
                summary.by_status[status] = summary.by_status.get(status, 0) + n
            summary.pruned += sum(counts.values())
            if progress is not None and counts:
                progress(summary.pruned)
        while reclaim_space(engine):
            pass
    except KeyboardInterrupt:
        summary.status = "interrupted"
        raise
    except Exception as exc:
        from kamiyo.db.errors import describe

        summary.status, summary.error = "failed", describe(exc)
        raise
    finally:
        _audit(engine, summary, actor=actor.strip(), reason=(reason or "").strip() or None, claimed_by=claimed_by)
        log.info("prune %s by=%s scope=%s pruned=%d", summary.status, actor.strip(), scope.label(), summary.pruned)
    return summary


def _audit(engine: Engine, summary: PruneSummary, *, actor: str, reason: str | None, claimed_by: str | None) -> None:
    found = summary.found
    try:
        with engine.begin() as connection:
            record_action(
                connection,
                action=PRUNE_ACTION,
                actor=actor,
                reason=reason,
                target=summary.scope.label()[:400],
                before={
                    "statuses": list(summary.scope.statuses),
                    "received_before": _iso(summary.scope.before),
                    "found": found.count,
                    "found_by_status": found.by_status,
                    "oldest": _iso(found.oldest) if found.oldest else None,
                    "newest": _iso(found.newest) if found.newest else None,
                },
                after={
                    "status": summary.status,
                    "error": summary.error,
                    "pruned": summary.pruned,
                    "pruned_by_status": summary.by_status,
                },
                claimed_by=claimed_by,
            )
    except Exception as exc:  # noqa: BLE001 - the database may be what failed; the log line says what happened
        log.error("prune could not be recorded in the audit log: %s", exc.__class__.__name__)


def _by_status(scope: PruneScope) -> bool:
    """Parked failures are few: found through the claim index (status, available_at). Applied and
    ignored events are most of the inbox: the primary key is walked below the boundary instead
    (through the claim index, SQLite would read and sort every applied event for each batch)."""
    return not set(scope.statuses) & set(RETAINED)


def _boundary(connection: Connection, before: datetime) -> int:
    """The smallest id such that the first event at or after it was received at or after ``before``
    (ids grow with the time of insert): a binary search of point reads on the primary key."""
    low, high = connection.execute(select(func.min(_events.c.id), func.max(_events.c.id))).one()
    if low is None:
        return 0
    cutoff = before.timestamp()
    low, high = int(low), int(high) + 1
    first = select(_events.c.id, _events.c.received_at).order_by(_events.c.id).limit(1)
    while low < high:
        middle = (low + high) // 2
        row = connection.execute(first.where(_events.c.id >= middle)).first()
        if row is None or utc_seconds(row.received_at) >= cutoff:
            high = middle
        else:
            low = int(row.id) + 1
    return low


def _utc(moment: datetime) -> datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
