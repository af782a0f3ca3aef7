"""``kamiyo events list | show``: the inbox of received events."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import click

from kamiyo.cli.invocation import OK, json_option, with_settings
from kamiyo.cli.output import drawn, json_text, print_json, table
from kamiyo.domain.outcomes import InboxStatus
from kamiyo.errors import KamiyoError

if TYPE_CHECKING:
    from kamiyo.config import Settings

MAX_LIST = 10_000
_STATUSES = tuple(status.value for status in InboxStatus)  # plain strings: click matches an enum by its name


@click.group(short_help="inspect the inbox of received events", help="The inbox of received events.")
def events() -> None:
    pass


@events.command(name="list", short_help="recent events, newest first", help="recent events, newest first")
@click.option("--status", type=click.Choice(_STATUSES))
@click.option("--type", "event_type", help="event type, e.g. customer.subscription.updated")
@click.option("--limit", type=int, default=20, show_default=True, help=f"at most this many (up to {MAX_LIST:,})")
@json_option
@with_settings
def list_events(settings: Settings, status: str | None, event_type: str | None, limit: int, as_json: bool) -> int:
    import sys

    from sqlalchemy import select

    from kamiyo.db.engine import make_engine
    from kamiyo.db.models import events_table as table_
    from kamiyo.scrub import clean

    query = (
        select(
            table_.c.stripe_event_id,
            table_.c.type,
            table_.c.status,
            table_.c.attempts,
            table_.c.received_at,
            table_.c.last_error,
        )
        .order_by(table_.c.id.desc())
        .limit(max(1, min(limit, MAX_LIST)))
    )
    if status:
        query = query.where(table_.c.status == status)
    if event_type:
        query = query.where(table_.c.type == event_type)
    engine = make_engine(settings)
    try:
        with engine.connect().execution_options(readonly=True) as connection:
            rows = connection.execute(query).all()
    finally:
        engine.dispose()
    if as_json:
        print_json(
            [
                {
                    "event_id": row.stripe_event_id,
                    "type": row.type,
                    "status": row.status,
                    "attempts": row.attempts,
                    "received_at": row.received_at,
                    "last_error": row.last_error,
                }
                for row in rows
            ]
        )
        return OK
    received = [row.received_at.strftime("%Y-%m-%d %H:%M:%S") if row.received_at else "-" for row in rows]
    if drawn(sys.stdout):
        table(
            ("received", "status", "tries", "event", "type", "error"),
            [
                (at, row.status, str(row.attempts), clean(row.stripe_event_id), clean(row.type), clean(err[:120]))
                for at, row, err in zip(received, rows, (r.last_error or "" for r in rows), strict=True)
            ],
        )
        return OK
    print(f"{'received':<20} {'status':<8} {'tries':>5}  {'event':<34} type")
    for at, row in zip(received, rows, strict=True):
        line = f"{at:<20} {row.status:<8} {row.attempts:>5}  {row.stripe_event_id:<34} {row.type}"
        if row.last_error:
            line += f"  error: {row.last_error[:120]}"
        print(clean(line))
    return OK


@events.command(
    short_help="one event: status, error, outcome and payload (credentials redacted)",
    help="one event: status, error, outcome and payload (credentials redacted)",
)
@click.argument("event_id")
@json_option
@with_settings
def show(settings: Settings, event_id: str, as_json: bool) -> int:
    """Everything read from the database is printed through the scrubber: credentials redacted
    (by key name in the payload, by shape everywhere) and control characters escaped."""
    import orjson
    from sqlalchemy import select

    from kamiyo.db.engine import make_engine
    from kamiyo.db.models import events_table
    from kamiyo.scrub import clean, redact

    engine = make_engine(settings)
    try:
        with engine.connect().execution_options(readonly=True) as connection:
            row = connection.execute(select(events_table).where(events_table.c.stripe_event_id == event_id)).first()
    finally:
        engine.dispose()
    if row is None:
        raise KamiyoError(f"no event {clean(event_id)} in the inbox")
    info = {k: v for k, v in row._mapping.items() if k not in ("payload", "id")}
    payload: Any
    try:
        payload = redact(orjson.loads(row.payload))
    except orjson.JSONDecodeError:
        payload = None
    if as_json:
        print_json({**info, "payload": payload if payload is not None else row.payload})
        return OK
    for key, value in info.items():
        print(f"{key:>16}: {clean(str(value))}")
    print("         payload:")
    print(json_text(payload) if payload is not None else clean(row.payload))
    return OK
