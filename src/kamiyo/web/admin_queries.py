"""What the operator console reads: recent deliveries, one delivery, the 24-hour chart.

Read-only SQL over the inbox (``webhook_events``: one row per event) and the per-minute
delivery counts (``webhook_delivery_stats``: the only place duplicates and rejected deliveries
are counted, by minute and event type, not by event). Results are plain JSON-ready dicts.
Payloads, errors, details and outcomes are shown through the one scrubber (``kamiyo.scrub``).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

import orjson
from sqlalchemy import Engine, func, or_, select, union

from kamiyo.db.models import NOT_PENDING, customers_table, delivery_stats_table, events_table, users_table
from kamiyo.domain.links import link_hint
from kamiyo.domain.outcomes import InboxStatus, Outcome
from kamiyo.scrub import redact, scrub
from kamiyo.telemetry.delivery_stats import minute_of, utc_seconds

_events = events_table
_stats = delivery_stats_table

EVENT_STATUSES = (InboxStatus.APPLIED, InboxStatus.PENDING, InboxStatus.FAILED, InboxStatus.IGNORED)
STATS_MARKS = ("duplicate", "rejected")  # counted per minute in webhook_delivery_stats
MARKS = (*EVENT_STATUSES, *STATS_MARKS)
MAX_LIMIT = 500
MAX_TYPES = 500
# A customer filter searches the payloads of at most this many of the newest events.
CUSTOMER_SCAN_WINDOW = 50_000


def _iso(moment: datetime | float | None) -> str | None:
    if moment is None:
        return None
    seconds = utc_seconds(moment) if isinstance(moment, datetime) else moment
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _payload_object(payload: str) -> dict[str, Any]:
    try:
        obj = orjson.loads(payload)["data"]["object"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return {}
    return obj if isinstance(obj, dict) else {}


def _customer_of(event_type: str, payload: str) -> str | None:
    return link_hint(event_type, _payload_object(payload)).customer_id


def _customer_ids(connection: Any, wanted: str) -> list[str]:
    """The Stripe customer ids a filter names: itself, or those of an email (linked or not)."""
    if "@" not in wanted:
        return [wanted]
    email = wanted.strip().lower()
    users = users_table
    customers = customers_table
    user_ids = select(users.c.id).where(users.c.email == email)
    found = connection.execute(
        select(customers.c.id).where(or_(customers.c.email == email, customers.c.user_id.in_(user_ids)))
    ).scalars()
    direct = connection.execute(
        select(users.c.stripe_customer_id).where(users.c.email == email, users.c.stripe_customer_id.is_not(None))
    ).scalars()
    return sorted({*found, *direct})[:20]


def _like_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def event_types(engine: Engine, *, limit: int = MAX_TYPES) -> list[str]:
    """The event types in the inbox (at most ``limit``, alphabetically), for the console's type filter."""
    # The type index holds the events taken up by the worker; pending ones come from the claim index.
    types = (
        union(
            select(_events.c.type).where(NOT_PENDING),
            select(_events.c.type).where(_events.c.status == InboxStatus.PENDING),
        )
        .order_by("type")
        .limit(max(1, limit))
    )
    with engine.connect().execution_options(readonly=True) as connection:
        return list(connection.execute(types).scalars())


def recent_deliveries(
    engine: Engine,
    *,
    status: str | None = None,
    event_type: str | None = None,
    customer: str | None = None,
    limit: int = 100,
    now: float | None = None,
) -> list[dict[str, Any]]:
    """Stored events and counted duplicate/rejected deliveries of the last 24 hours, newest first.

    ``status`` is one of ``MARKS``; ``customer`` a customer id, an object id or an email.
    Duplicate and rejected deliveries have no row of their own (the inbox keeps one row per
    event), so they appear as per-minute counts, and never under a customer filter.
    """
    now = time.time() if now is None else now
    limit = max(1, min(limit, MAX_LIMIT))
    entries: list[dict[str, Any]] = []
    with engine.connect().execution_options(readonly=True) as connection:
        if status is None or status in EVENT_STATUSES:
            entries += _events_page(connection, status, event_type, customer, limit)
        if customer is None and (status is None or status in STATS_MARKS):
            entries += _counted_deliveries(connection, status, event_type, since=now - 86400, limit=limit)
    entries.sort(key=lambda e: (e["at"], e.get("id", 0)), reverse=True)
    return entries[:limit]


def _events_page(
    connection: Any, status: str | None, event_type: str | None, customer: str | None, limit: int
) -> list[dict[str, Any]]:
    query = select(
        _events.c.id,
        _events.c.stripe_event_id,
        _events.c.type,
        _events.c.status,
        _events.c.attempts,
        _events.c.object_id,
        _events.c.received_at,
        _events.c.processed_at,
        _events.c.replayed_at,
        _events.c.last_error,
        _events.c.payload,
    ).order_by(_events.c.id.desc())
    if status:
        query = query.where(_events.c.status == status)
    if event_type:
        query = query.where(_events.c.type == event_type)
    wanted: set[str] = set()
    if customer:
        wanted = set(_customer_ids(connection, customer))
        if not wanted:
            return []
        newest = connection.execute(select(func.max(_events.c.id))).scalar() or 0
        matches = [_events.c.object_id.in_(sorted(wanted))]
        matches += [_events.c.payload.like(f'%"{_like_escape(c)}"%', escape="\\") for c in sorted(wanted)]
        query = query.where(_events.c.id > newest - CUSTOMER_SCAN_WINDOW, or_(*matches))
    entries = []
    # The SQL match on the payload is a prefilter; the customer the event really names decides.
    for row in connection.execute(query.limit(limit * 4 if customer else limit)):
        found = _customer_of(row.type, row.payload)
        if wanted and found not in wanted and row.object_id not in wanted:
            continue
        entries.append(
            {
                "kind": "event",
                "id": row.id,
                "event_id": row.stripe_event_id,
                "type": row.type,
                "mark": row.status,
                "attempts": row.attempts,
                "object_id": row.object_id,
                "customer": found,
                "at": utc_seconds(row.received_at),
                "received_at": _iso(row.received_at),
                "processed_at": _iso(row.processed_at),
                "replayed_at": _iso(row.replayed_at),
                "error": scrub(row.last_error[:300]) if row.last_error else None,
            }
        )
        if len(entries) == limit:
            break
    return entries


def _counted_deliveries(
    connection: Any, status: str | None, event_type: str | None, *, since: float, limit: int
) -> list[dict[str, Any]]:
    query = (
        select(_stats.c.minute, _stats.c.outcome, _stats.c.reason, _stats.c.event_type, _stats.c.count)
        .where(_stats.c.minute >= minute_of(since), _stats.c.outcome.in_([status] if status else STATS_MARKS))
        .order_by(_stats.c.minute.desc())
        .limit(limit)
    )
    if event_type:
        query = query.where(_stats.c.event_type == event_type)
    return [
        {
            "kind": "count",
            "mark": outcome,
            "type": kind or None,
            "reason": reason or None,
            "count": int(count),
            "at": float(minute),
            "minute": _iso(float(minute)),
        }
        # By position: a Row's ``count`` is the tuple method, not the column.
        for minute, outcome, reason, kind, count in connection.execute(query).all()
    ]


def is_stored(engine: Engine, event_id: str) -> bool:
    """Whether the inbox holds an event of this id."""
    with engine.connect().execution_options(readonly=True) as connection:
        found = connection.execute(select(_events.c.id).where(_events.c.stripe_event_id == event_id)).first()
    return found is not None


def delivery(engine: Engine, event_id: str) -> dict[str, Any] | None:
    """One stored event: its status, error, what applying it did, and its payload pretty-printed
    without secrets. ``outcome`` is what applying it did as data (``Outcome.to_json``), None when
    it was not applied or was applied before outcomes were recorded (``detail`` is then all there is)."""
    with engine.connect().execution_options(readonly=True) as connection:
        row = connection.execute(select(_events).where(_events.c.stripe_event_id == event_id)).first()
    if row is None:
        return None
    try:
        payload: Any = redact(orjson.loads(row.payload))
        pretty = orjson.dumps(payload, option=orjson.OPT_INDENT_2).decode()
    except orjson.JSONDecodeError:
        pretty = scrub(row.payload)
    return {
        "event_id": row.stripe_event_id,
        "type": row.type,
        "mark": row.status,
        "attempts": row.attempts,
        "api_version": row.api_version,
        "livemode": bool(row.livemode),
        "source": row.source,
        "object_id": row.object_id,
        "customer": _customer_of(row.type, row.payload),
        "created": _iso(float(row.created)),
        "received_at": _iso(row.received_at),
        "processed_at": _iso(row.processed_at),
        "replayed_at": _iso(row.replayed_at),
        "error": scrub(row.last_error) if row.last_error else None,
        "detail": scrub(row.detail) if row.detail else None,
        "outcome": redact(Outcome.from_json(row.outcome).to_json()) if row.outcome is not None else None,
        "payload": pretty,
    }


def delivery_chart(
    engine: Engine, *, now: float | None = None, hours: int = 24, bucket_minutes: int = 15
) -> dict[str, Any]:
    """Deliveries and failures per bucket over the last ``hours``, oldest bucket first.

    ``received``: events stored (the inbox, by arrival); ``duplicate`` and ``rejected``:
    deliveries answered without storing (the per-minute counts); ``failed``: stored events
    that are parked as failed now, by arrival.
    """
    now = time.time() if now is None else now
    width = bucket_minutes * 60
    end = (int(now) // width + 1) * width
    start = end - hours * 3600
    count = (end - start) // width
    series = {name: [0] * count for name in ("received", "duplicate", "rejected", "failed")}

    def add(name: str, at: float, n: int) -> None:
        index = int((at - start) // width)
        if 0 <= index < count:
            series[name][index] += n

    since = datetime.fromtimestamp(start, UTC)
    with engine.connect().execution_options(readonly=True) as connection:
        for received_at, status in connection.execute(
            select(_events.c.received_at, _events.c.status).where(
                _events.c.received_at >= since, _events.c.source == "webhook"
            )
        ):
            at = utc_seconds(received_at)
            add("received", at, 1)
            if status == InboxStatus.FAILED:
                add("failed", at, 1)
        for minute, outcome, n in connection.execute(
            select(_stats.c.minute, _stats.c.outcome, func.sum(_stats.c.count))
            .where(_stats.c.minute >= start, _stats.c.outcome.in_(STATS_MARKS))
            .group_by(_stats.c.minute, _stats.c.outcome)
        ).all():
            add(outcome, float(minute), int(n))
    return {
        "start": _iso(float(start)),
        "end": _iso(float(end)),
        "bucket_seconds": width,
        "buckets": [_iso(float(start + i * width)) for i in range(count)],
        "series": series,
        "totals": {name: sum(values) for name, values in series.items()},
    }


def count_by(entries: Iterable[dict[str, Any]]) -> dict[str, int]:
    """How many deliveries each mark has among ``entries`` (a count row stands for ``count``)."""
    totals = dict.fromkeys(MARKS, 0)
    for entry in entries:
        totals[entry["mark"]] = totals.get(entry["mark"], 0) + int(entry.get("count", 1))
    return totals
