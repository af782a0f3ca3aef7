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
3. the newest event in the inbox (Stripe's recipe, for the very first backfill).

A time is turned into Stripe's cursor with one more request: the newest event created before
it (any type, any delivery state: a cursor is a position in the list). Stripe keeps events for
30 days; a gap reaching toward that is warned about, and past it only ``kamiyo sync`` can
recover what is lost.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime

import orjson
from sqlalchemy import Engine, select

from kamiyo.db.models import events_table
from kamiyo.errors import KamiyoError, PayloadError, StripeCursorGone
from kamiyo.processing.handlers import HANDLED_TYPES
from kamiyo.reconcile import runs
from kamiyo.reconcile.gateway import EventQuery, Page, StripeGateway
from kamiyo.telemetry.metrics import PROBE_EVENT_PREFIX
from kamiyo.webhooks.envelope import read_envelope
from kamiyo.webhooks.inbox import inbox_row, insert_new_events

log = logging.getLogger("kamiyo.reconcile")
RETENTION_SECONDS = 30 * 86400  # Stripe lists events of the last 30 days only
WARN_AFTER_SECONDS = 25 * 86400  # a gap this old is close to losing events for good
OVERLAP_SECONDS = 600  # a backfill re-reads this much before the previous one began
BACKFILL_SOURCE = "backfill"
# The types we handle (Stripe accepts at most 20 in `types`).
BACKFILL_TYPES = tuple(sorted(HANDLED_TYPES))


@dataclass(frozen=True)
class GapStart:
    """Where a backfill begins: after an event (Stripe's cursor), or at a time."""

    at: int  # Unix seconds: the start of the gap
    after_event: str | None  # an event id known to precede the gap
    source: str  # "--since", "the last backfill" or "the newest event in the inbox"


@dataclass
class BackfillSummary:
    run_id: int
    start: GapStart | None
    listed: int = 0  # undelivered events the API returned
    new: int = 0  # of them, not yet in the inbox: stored
    warnings: list[str] = field(default_factory=list)
    newest: str | None = None  # the newest event id listed


def backfill_events(
    engine: Engine,
    gateway: StripeGateway,
    *,
    since: int | None = None,
    now: float | None = None,
    warn: Callable[[str], None] | None = None,
    default_gap: int | None = None,
) -> BackfillSummary:
    """List undelivered events from the gap's start and store the new ones in the inbox.

    ``default_gap`` (seconds) is used when nothing says where the gap starts (the scheduled
    backfill's first run); without it that is an error asking for ``--since``.
    """
    now = time.time() if now is None else now
    start = gap_start(engine, since=since, now=now)
    if start is None:
        if default_gap is None:
            raise KamiyoError(
                "nothing tells where the gap starts (no earlier backfill, no event in the inbox): "
                "pass --since, e.g. --since 3d"
            )
        start = GapStart(at=int(now) - default_gap, after_event=None, source="the schedule's first run")
    run = runs.start_run(engine, "backfill", scope=f"since={_iso(start.at)}")
    summary = BackfillSummary(run_id=run.id, start=start)

    def say(message: str) -> None:
        summary.warnings.append(message)
        log.warning("backfill: %s", message)
        if warn is not None:
            warn(message)

    warning = retention_warning(start.at, now)
    if warning:
        say(warning)
    log.info("backfill started run=%d from=%s (%s)", run.id, _iso(start.at), start.source)
    try:
        for page in _undelivered_pages(gateway, start, now, say):
            summary.listed += len(page.data)
            summary.new += _store(engine, page)
            if page.data:
                summary.newest = str(page.data[0]["id"])
    except KeyboardInterrupt:
        runs.finish_run(engine, run.id, runs.INTERRUPTED, seen=summary.listed, changed=summary.new)
        raise
    except Exception as exc:
        runs.finish_run(
            engine,
            run.id,
            runs.FAILED,
            seen=summary.listed,
            changed=summary.new,
            error=f"{exc.__class__.__name__}: {exc}",
        )
        raise
    runs.finish_run(engine, run.id, runs.DONE, seen=summary.listed, changed=summary.new, cursor=summary.newest)
    log.info("backfill done run=%d listed=%d new=%d", run.id, summary.listed, summary.new)
    return summary


def gap_start(engine: Engine, *, since: int | None, now: float) -> GapStart | None:
    """Where the uncovered span begins (see the module docstring), or None when nothing says."""
    if since is not None:
        return GapStart(at=since, after_event=None, source="--since")
    last = runs.latest_run(engine, "backfill", status=runs.DONE)
    if last is not None:
        return GapStart(
            at=int(last.started_at.timestamp()) - OVERLAP_SECONDS, after_event=None, source="the last backfill"
        )
    with engine.connect().execution_options(readonly=True) as connection:
        newest = connection.execute(
            select(events_table.c.stripe_event_id, events_table.c.created)
            .where(
                events_table.c.source == "webhook",
                events_table.c.stripe_event_id.like("evt\\_%", escape="\\"),
                events_table.c.stripe_event_id.not_like(PROBE_EVENT_PREFIX + "%"),
            )
            .order_by(events_table.c.created.desc(), events_table.c.id.desc())
            .limit(1)
        ).first()
    if newest is None:
        return None
    return GapStart(at=int(newest.created), after_event=newest.stripe_event_id, source="the newest event in the inbox")


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


def _undelivered_pages(
    gateway: StripeGateway, start: GapStart, now: float, say: Callable[[str], None]
) -> Iterator[Page]:
    """Pages of undelivered events, oldest first, from the gap's start."""
    query = EventQuery(types=BACKFILL_TYPES, delivery_success=False)
    if start.after_event is not None:
        try:
            yield from _oldest_first(gateway, query, start.after_event)
            return
        except StripeCursorGone:
            say(
                f"Stripe does not list the event {start.after_event} (older than 30 days, or not a real Stripe "
                f"event, such as one sent by `kamiyo trigger`): backfilling from its time, {_iso(start.at)}, instead"
            )
    cursor = _cursor_before(gateway, max(start.at, int(now) - RETENTION_SECONDS))
    if cursor is None:
        # No event precedes the gap within the 30 days: everything Stripe has is in it. The pages
        # come newest first then; the order does not matter to the result (version keys).
        yield from _newest_first(gateway, query)
        return
    yield from _oldest_first(gateway, query, cursor)


def _cursor_before(gateway: StripeGateway, moment: int) -> str | None:
    """The newest event created before ``moment``: the cursor that starts the list at ``moment``."""
    page = gateway.list_events(EventQuery(created_lt=moment), limit=1)
    return str(page.data[0]["id"]) if page.data else None


def _oldest_first(gateway: StripeGateway, query: EventQuery, cursor: str) -> Iterator[Page]:
    """``ending_before`` pages walk toward the newest; each page is newest first, so reverse it."""
    while True:
        page = gateway.list_events(query, ending_before=cursor)
        if not page.data:
            return
        yield Page(list(reversed(page.data)), page.has_more, page.read_at)
        if not page.has_more:
            return
        cursor = str(page.data[0]["id"])


def _newest_first(gateway: StripeGateway, query: EventQuery) -> Iterator[Page]:
    cursor: str | None = None
    while True:
        page = gateway.list_events(query, starting_after=cursor)
        if page.data:
            yield page
        if not page.has_more or not page.data:
            return
        cursor = str(page.data[-1]["id"])


def _store(engine: Engine, page: Page) -> int:
    """Put a page of events into the inbox (one transaction); return how many were new."""
    rows = []
    for event in page.data:
        body = orjson.dumps(event)
        try:
            envelope, _ = read_envelope(body)
        except PayloadError as exc:
            log.warning("backfill skipped an event the API returned: %s", exc)
            continue
        status = "pending" if envelope.type in HANDLED_TYPES else "ignored"
        rows.append(inbox_row(envelope, body, status=status, source=BACKFILL_SOURCE))
    if not rows:
        return 0
    with engine.begin() as connection:
        return len(insert_new_events(connection, rows))


def _iso(moment: int) -> str:
    return datetime.fromtimestamp(moment, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
