"""Backfill of missed events: ``kamiyo backfill [--since TIME]``, and the worker's schedule.

Stripe's recipe (docs.stripe.com/webhooks/process-undelivered-events): list the events with
``delivery_success=false`` (still pending, or failed to some endpoint) of the types we handle,
``ending_before`` the last event received before the gap, which pages oldest first. Each one
goes into the inbox exactly as if it had been delivered (``source = "backfill"``; an id already
there is skipped), and the worker applies it.

Where the gap starts, in order of preference:

1. ``--since TIME``;
2. the start of the last completed backfill, less ``OVERLAP`` (a scheduled backfill every few
   minutes keeps this recent, so an outage of the endpoint is covered however it ended);
3. for the very first backfill, nothing tells where a gap began: it reads all of Stripe's 30
   days of undelivered events. (Stripe's recipe starts after the last event handled, i.e. the
   newest one in the inbox; but once the endpoint works again, that event is newer than the
   gap, and the gap would never be read. Reading further back costs requests, not
   correctness: events already in the inbox are skipped, and older snapshots never overwrite
   newer ones.)

A time is turned into Stripe's cursor with one more request: the newest event created before
it (any type, any delivery state: a cursor is a position in the list). Stripe keeps events for
30 days; a gap reaching toward that is warned about, and past it only ``kamiyo sync`` can
recover what is lost.

Each backfill is recorded in the audit log (who, why, where it started, what it stored); the
scheduled one, whose actor is ``SCHEDULE_ACTOR``, only when it stored something.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson
from sqlalchemy import Engine

from kamiyo.config import DEFAULT_MAINTENANCE_TIMEOUT
from kamiyo.db.engine import allow_long_statements
from kamiyo.db.errors import describe
from kamiyo.domain.modes import other_mode_detail
from kamiyo.domain.outcomes import InboxStatus
from kamiyo.domain.rules import HANDLED_TYPES
from kamiyo.errors import PayloadError
from kamiyo.operations.audit import default_actor, record_action
from kamiyo.reconcile import runs
from kamiyo.reconcile.gateway import EventQuery, Page, StripeGateway
from kamiyo.webhooks.envelope import is_event_id, read_envelope
from kamiyo.webhooks.inbox import inbox_row, insert_new_events

log = logging.getLogger("kamiyo.reconcile")
RETENTION_SECONDS = 30 * 86400  # Stripe lists events of the last 30 days only
WARN_AFTER_SECONDS = 25 * 86400  # a gap this old is close to losing events for good
OVERLAP_SECONDS = 600  # a backfill re-reads this much before the previous one began
BACKFILL_SOURCE = "backfill"
BACKFILL_ACTION = "backfill"
SCHEDULE_ACTOR = "kamiyo (scheduled backfill)"
AUDIT_EVENTS = 100  # event ids a backfill's audit entry names (its counts cover every one)
FIRST_BACKFILL = "the first backfill: all of Stripe's 30 days"
# The types we handle (Stripe accepts at most 20 in `types`).
BACKFILL_TYPES = tuple(sorted(HANDLED_TYPES))


@dataclass(frozen=True)
class GapStart:
    """Where a backfill begins."""

    at: int  # Unix seconds: the start of the gap
    source: str  # "--since", "the last backfill" or FIRST_BACKFILL


@dataclass
class BackfillSummary:
    run_id: int
    start: GapStart | None
    listed: int = 0  # undelivered events the API returned
    new: int = 0  # of them, not yet in the inbox: stored
    warnings: list[str] = field(default_factory=list)
    newest: str | None = None  # the newest event id listed
    stored: list[str] = field(default_factory=list)  # the first AUDIT_EVENTS new event ids, as listed


def backfill_events(
    engine: Engine,
    gateway: StripeGateway,
    *,
    since: int | None = None,
    now: float | None = None,
    warn: Callable[[str], None] | None = None,
    actor: str | None = None,
    reason: str | None = None,
    audit_when_nothing_new: bool = True,
    statement_timeout: float = DEFAULT_MAINTENANCE_TIMEOUT,
    mode: str | None = None,
    claimed_by: str | None = None,
) -> BackfillSummary:
    """List undelivered events from the gap's start and store the new ones in the inbox.

    The run is recorded in the audit log as done by ``actor`` (default: the OS user) for
    ``reason``, with ``claimed_by`` (a name given without proof) beside it; with
    ``audit_when_nothing_new=False`` (the schedule) only if it stored an event. On PostgreSQL its
    pages may run statements for ``statement_timeout`` seconds
    (``DATABASE_MAINTENANCE_TIMEOUT_SECONDS``; 0: no limit), not the service's limit. An event of
    the Stripe mode the service does not take (``mode``, ``Settings.stripe_mode``) is stored as
    ignored, as the webhook endpoint stores it.
    """
    now = time.time() if now is None else now
    start = gap_start(engine, since=since, now=now)
    run = runs.start_run(engine, "backfill", scope=f"since={_iso(start.at)}")
    summary = BackfillSummary(run_id=run.id, start=start)
    who = (actor or "").strip() or default_actor()

    def say(message: str) -> None:
        summary.warnings.append(message)
        log.warning("backfill: %s", message)
        if warn is not None:
            warn(message)

    warning = retention_warning(start.at, now) if start.source != FIRST_BACKFILL else None
    if warning:
        say(warning)
    log.info("backfill started run=%d from=%s (%s)", run.id, _iso(start.at), start.source)
    status, error = runs.DONE, None
    try:
        for page in _undelivered_pages(gateway, start, now):
            summary.listed += len(page.data)
            new = _store(engine, page, statement_timeout, mode)
            summary.new += len(new)
            summary.stored.extend(new[: max(0, AUDIT_EVENTS - len(summary.stored))])
            newest = _first_id(page.data)
            if newest is not None:
                summary.newest = newest
    except KeyboardInterrupt:
        status = runs.INTERRUPTED
        raise
    except Exception as exc:
        # Told without SQL or its parameters, and scrubbed: it is stored in the run and the audit log.
        status, error = runs.FAILED, describe(exc)
        raise
    finally:
        cursor = summary.newest if status == runs.DONE else None
        runs.finish_run(engine, run.id, status, seen=summary.listed, changed=summary.new, cursor=cursor, error=error)
        if audit_when_nothing_new or summary.new:
            _audit(engine, summary, status=status, error=error, actor=who, reason=reason, claimed_by=claimed_by)
    log.info("backfill done run=%d listed=%d new=%d", run.id, summary.listed, summary.new)
    return summary


def gap_start(engine: Engine, *, since: int | None, now: float) -> GapStart:
    """Where the uncovered span begins (see the module docstring)."""
    if since is not None:
        return GapStart(at=since, source="--since")
    last = runs.latest_run(engine, "backfill", status=runs.DONE)
    if last is not None:
        return GapStart(at=int(last.started_at.timestamp()) - OVERLAP_SECONDS, source="the last backfill")
    return GapStart(at=int(now) - RETENTION_SECONDS, source=FIRST_BACKFILL)


def retention_warning(gap_at: int, now: float) -> str | None:
    """A warning when the gap reaches toward (or past) Stripe's 30 days of events."""
    age = now - gap_at
    if age < WARN_AFTER_SECONDS:
        return None
    days = age / 86400
    if age >= RETENTION_SECONDS:
        lost_before = _iso(int(now) - RETENTION_SECONDS)
        return (
            f"the gap began {days:.0f} days ago ({_iso(gap_at)}), beyond Stripe's 30 days of events: events "
            f"before {lost_before} are gone for good. Run `kamiyo sync` to converge every subscription on the API"
        )
    return (
        f"the gap began {days:.0f} days ago ({_iso(gap_at)}); Stripe keeps events for 30 days, so the oldest "
        "are about to be lost. Run `kamiyo sync` as well to converge every subscription on the API"
    )


def _undelivered_pages(gateway: StripeGateway, start: GapStart, now: float) -> Iterator[Page]:
    """Pages of undelivered events, oldest first, from the gap's start."""
    query = EventQuery(types=BACKFILL_TYPES, delivery_success=False)
    oldest_listed = int(now) - RETENTION_SECONDS
    cursor = _cursor_before(gateway, start.at) if start.at > oldest_listed else None
    if cursor is None:
        # No event precedes the gap within the 30 days: everything Stripe has is in it. The pages
        # come newest first then; the order does not matter to the result (version keys).
        yield from _newest_first(gateway, query)
        return
    yield from _oldest_first(gateway, query, cursor)


def _cursor_before(gateway: StripeGateway, moment: int) -> str | None:
    """The newest event created before ``moment``: the cursor that starts the list at ``moment``."""
    page = gateway.list_events(EventQuery(created_lt=moment), limit=1)
    return _first_id(page.data)


def _oldest_first(gateway: StripeGateway, query: EventQuery, cursor: str) -> Iterator[Page]:
    """``ending_before`` pages walk toward the newest; each page is newest first, so reverse it."""
    while True:
        page = gateway.list_events(query, ending_before=cursor)
        if not page.data:
            return
        yield Page(list(reversed(page.data)), page.has_more, page.read_at)
        newest = _first_id(page.data)
        if not page.has_more or newest is None:
            return
        cursor = newest


def _newest_first(gateway: StripeGateway, query: EventQuery) -> Iterator[Page]:
    cursor: str | None = None
    while True:
        page = gateway.list_events(query, starting_after=cursor)
        if page.data:
            yield page
        oldest = _first_id(reversed(page.data))
        if not page.has_more or oldest is None:
            return
        cursor = oldest


def _first_id(events: Iterable[Any]) -> str | None:
    """The id of the first of ``events`` whose id looks like Stripe's. A page is walked from the
    event at its edge, so a cursor skips an event with a malformed id (it was never stored: the
    events beside it are read again and skipped as duplicates) instead of failing the run."""
    for event in events:
        event_id = event.get("id") if isinstance(event, dict) else None
        if is_event_id(event_id):
            return str(event_id)
    return None


def _store(engine: Engine, page: Page, statement_timeout: float, mode: str | None) -> list[str]:
    """Put a page of events into the inbox (one transaction); return the new ones' ids, in page order."""
    rows = []
    for event in page.data:
        body = orjson.dumps(event)
        try:
            envelope, _ = read_envelope(body)
        except PayloadError as exc:
            event_id = event.get("id") if isinstance(event, dict) else None
            log.warning("backfill skipped an event the API returned id=%.80r: %s", event_id, exc)
            continue
        status = InboxStatus.PENDING if envelope.type in HANDLED_TYPES else InboxStatus.IGNORED
        other_mode = other_mode_detail(envelope.livemode, mode)
        if other_mode is not None:
            status = InboxStatus.IGNORED
        rows.append(inbox_row(envelope, body, status=status, source=BACKFILL_SOURCE, detail=other_mode))
    if not rows:
        return []
    with engine.begin() as connection:
        allow_long_statements(connection, statement_timeout)
        new = insert_new_events(connection, rows)
    return [row["stripe_event_id"] for row in rows if row["stripe_event_id"] in new]


def _audit(
    engine: Engine,
    summary: BackfillSummary,
    *,
    status: str,
    error: str | None,
    actor: str,
    reason: str | None,
    claimed_by: str | None,
) -> None:
    start = summary.start
    try:
        with engine.begin() as connection:
            record_action(
                connection,
                action=BACKFILL_ACTION,
                actor=actor,
                reason=reason,
                claimed_by=claimed_by,
                target="undelivered events",
                before={
                    "run": summary.run_id,
                    "from": _iso(start.at) if start else None,
                    "start": start.source if start else None,
                },
                after={
                    "run": summary.run_id,
                    "status": status,
                    "error": error,
                    "listed": summary.listed,
                    "stored": summary.new,
                    "events": summary.stored,
                    "events_not_listed": max(0, summary.new - len(summary.stored)),
                    "warnings": summary.warnings,
                },
            )
    except Exception as exc:  # noqa: BLE001 - the database may be what failed; the run row says what happened
        log.error("backfill run=%d could not be recorded in the audit log: %s", summary.run_id, describe(exc))


def _iso(moment: int) -> str:
    return datetime.fromtimestamp(moment, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
