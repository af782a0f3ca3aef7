"""The SQL of delivery telemetry: per-minute delivery counts, and the service's state read back.

``webhook_delivery_stats`` holds one row per (minute, outcome, reason, event type) with a count.
The inbox writer adds to it in the same transaction as the events it stores (see
``webhooks/inbox.py``), so the counts are exact whichever process served the requests, and a
flood of deliveries costs one upsert per distinct key per batch rather than a write per request.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine, delete, func, or_, select

from kamiyo.db.models import delivery_stats_table, events_table, user_overrides_table, worker_heartbeats_table
from kamiyo.domain.outcomes import InboxStatus

_stats = delivery_stats_table
_events = events_table
_beats = worker_heartbeats_table
_overrides = user_overrides_table

# A worker beats every few seconds; one that has not for this long is taken as not running.
WORKER_STALE_SECONDS = 30.0
# How long the per-minute counts are kept: the incident report's and the health check's history.
DELIVERY_STATS_DAYS = 35

# (minute, outcome, reason, event type): outcome is accepted | duplicate | rejected.
DeliveryKey = tuple[int, str, str, str]

_UPSERT = (
    "INSERT INTO webhook_delivery_stats (minute, outcome, reason, event_type, count) VALUES ({marks}) "
    "ON CONFLICT (minute, outcome, reason, event_type) "
    "DO UPDATE SET count = webhook_delivery_stats.count + excluded.count"
)
_UPSERT_SQLITE = _UPSERT.format(marks="?, ?, ?, ?, ?")
_UPSERT_PG = _UPSERT.format(marks="%s, %s, %s, %s, %s")


def utc_seconds(moment: datetime) -> float:
    """Unix seconds of a stored datetime (SQLite hands them back without their zone: UTC)."""
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()


def minute_of(unix_seconds: float) -> int:
    """The start of the minute (Unix seconds) a moment falls in: the key of its count."""
    return int(unix_seconds) // 60 * 60


def add_delivery_counts(connection: Any, counts: Mapping[DeliveryKey, int]) -> None:
    """Add ``counts`` in the open transaction: one upsert row per key, summed on conflict."""
    if not counts:
        return
    # Sorted keys: two processes adding the same keys lock the rows in the same order (PostgreSQL).
    rows = [
        (minute, outcome, reason[:32], event_type[:255], n)
        for (minute, outcome, reason, event_type), n in sorted(counts.items())
    ]
    # Plain SQL, the same on SQLite (3.24+) and PostgreSQL: this runs in every batch of the inbox
    # writer, and building and compiling the SQLAlchemy construct each time cost more than the upsert.
    sql = _UPSERT_PG if connection.dialect.name == "postgresql" else _UPSERT_SQLITE
    connection.exec_driver_sql(sql, rows)


def prune_delivery_stats_batch(engine: Engine, *, now: float | None = None) -> int:
    """Delete the counts of at most one hour past ``DELIVERY_STATS_DAYS``, oldest first, in one short
    transaction; how many rows (the inbox's retention calls it until it returns 0)."""
    now = time.time() if now is None else now
    cutoff = minute_of(now - DELIVERY_STATS_DAYS * 86400)
    with engine.begin() as connection:
        oldest = connection.execute(select(func.min(_stats.c.minute))).scalar()
        if oldest is None or oldest >= cutoff:
            return 0
        result = connection.execute(delete(_stats).where(_stats.c.minute < min(cutoff, int(oldest) + 3600)))
        return int(result.rowcount or 0)


@dataclass(frozen=True)
class DeliveryRow:
    minute: int
    outcome: str
    reason: str
    event_type: str
    count: int


def delivery_rows(engine: Engine, since: float, until: float) -> list[DeliveryRow]:
    """Every count whose minute starts in [since, until), oldest first."""
    query = (
        select(_stats.c.minute, _stats.c.outcome, _stats.c.reason, _stats.c.event_type, _stats.c.count)
        .where(_stats.c.minute >= minute_of(since), _stats.c.minute < until)
        .order_by(_stats.c.minute, _stats.c.outcome, _stats.c.reason, _stats.c.event_type)
    )
    with engine.connect().execution_options(readonly=True) as connection:
        rows = connection.execute(query).all()
    # Unpacked by position: a Row's ``count`` is the tuple method, not the column.
    return [DeliveryRow(minute, outcome, reason, event_type, int(n)) for minute, outcome, reason, event_type, n in rows]


@dataclass(frozen=True)
class DeliveryTotals:
    accepted: int
    duplicate: int
    rejected: int
    by_reason: dict[str, int]

    @property
    def attempts(self) -> int:
        return self.accepted + self.duplicate + self.rejected

    @property
    def success_ratio(self) -> float | None:
        """Share of deliveries answered 2xx; None when there were none."""
        return (self.accepted + self.duplicate) / self.attempts if self.attempts else None


def delivery_totals(engine: Engine, since: float, until: float) -> DeliveryTotals:
    """Deliveries counted in the minutes from ``since`` up to ``until``."""
    counts = {"accepted": 0, "duplicate": 0, "rejected": 0}
    by_reason: dict[str, int] = {}
    for row in delivery_rows(engine, since, until):
        counts[row.outcome] = counts.get(row.outcome, 0) + row.count
        if row.outcome == "rejected":
            by_reason[row.reason] = by_reason.get(row.reason, 0) + row.count
    return DeliveryTotals(counts["accepted"], counts["duplicate"], counts["rejected"], by_reason)


@dataclass(frozen=True)
class ServiceState:
    """What the database says about the service right now."""

    backlog: int
    parked: int
    oldest_pending_age: float
    last_accepted_age: float | None
    workers_alive: int
    active_overrides: int


def read_state(engine: Engine, *, now: float | None = None) -> ServiceState:
    """Backlog, parked failures, ages and live workers, in one short read-only transaction."""
    now = time.time() if now is None else now
    with engine.connect().execution_options(readonly=True) as connection:
        counts: dict[str, int] = dict(
            connection.execute(
                select(_events.c.status, func.count())
                .where(_events.c.status.in_((InboxStatus.PENDING, InboxStatus.FAILED)))
                .group_by(_events.c.status)
            ).all()
        )
        oldest = connection.execute(
            select(func.min(_events.c.received_at)).where(_events.c.status == InboxStatus.PENDING)
        ).scalar()
        # The newest row by id that came through the endpoint: ids grow with every insert, so
        # this walks the primary key backwards and stops at the first webhook row.
        last = connection.execute(
            select(_events.c.received_at).where(_events.c.source == "webhook").order_by(_events.c.id.desc()).limit(1)
        ).scalar()
        alive = connection.execute(
            select(func.count()).select_from(_beats).where(_beats.c.seen_at >= now - WORKER_STALE_SECONDS)
        ).scalar_one()
        overrides = connection.execute(
            select(func.count())
            .select_from(_overrides)
            .where(or_(_overrides.c.expires_at.is_(None), _overrides.c.expires_at > datetime.fromtimestamp(now, UTC)))
        ).scalar_one()
    return ServiceState(
        backlog=int(counts.get(InboxStatus.PENDING, 0)),
        parked=int(counts.get(InboxStatus.FAILED, 0)),
        oldest_pending_age=max(0.0, now - utc_seconds(oldest)) if oldest is not None else 0.0,
        last_accepted_age=max(0.0, now - utc_seconds(last)) if last is not None else None,
        workers_alive=int(alive),
        active_overrides=int(overrides),
    )
