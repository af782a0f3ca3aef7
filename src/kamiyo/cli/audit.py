"""``kamiyo audit``: the append-only log of manual actions, newest first.

The audit log's actor is the OS user running a command (shell access is the credential);
``--by``, when it names someone else, is recorded beside it as a claim.
"""

from __future__ import annotations

import sys
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import click

from kamiyo.cli.invocation import OK, argument, bounded, json_option, with_settings
from kamiyo.cli.output import drawn, print_json, table

if TYPE_CHECKING:
    from kamiyo.config import Settings
    from kamiyo.operations.audit import AuditEntry

MAX_AUDIT = 100_000


@click.command(help="the append-only log of manual actions, newest first")
@click.option("--since", help="2h, 1d (ago), 2026-11-27T10:00 (UTC) or Unix seconds")
@click.option("--target", help="only entries about this email or event id")
@click.option("--limit", type=int, default=200, show_default=True, help="at most this many entries")
@json_option
@with_settings
def audit(settings: Settings, since: str | None, target: str | None, limit: int, as_json: bool) -> int:
    return print_audit(settings, since=since, target=target, limit=limit, as_json=as_json)


def print_audit(settings: Settings, *, since: str | None, target: str | None, limit: int, as_json: bool) -> int:
    """The entries ``since`` (about ``target``), at most ``limit``, as lines, a table or JSON."""
    from kamiyo.db.engine import make_engine
    from kamiyo.operations.audit import list_audit
    from kamiyo.operations.inputs import parse_time
    from kamiyo.scrub import clean

    moment = argument(parse_time, since, now=datetime.now(UTC)) if since else None
    bounded(limit, "--limit", MAX_AUDIT)
    engine = make_engine(settings)
    try:
        with engine.connect().execution_options(readonly=True) as connection:
            entries = list_audit(connection, since=moment, limit=limit, target=target)
    finally:
        engine.dispose()
    if as_json:
        print_json(entries)
        return OK
    if not entries:
        print("no manual actions recorded" + (f" since {time_text(moment)}" if moment else ""))
        return OK
    if drawn(sys.stdout):
        table(
            ("#", "at", "action", "by", "on", "reason", "before", "after"),
            [
                (
                    str(e.id),
                    time_text(e.at),
                    clean(e.action),
                    clean(e.actor + (f" (claims to be {e.claimed_by})" if e.claimed_by else "")),
                    clean(e.target or "-"),
                    clean(e.reason or ""),
                    clean(_compact(e.before)),
                    clean(_compact(e.after)),
                )
                for e in entries
            ],
        )
        return OK
    for entry in entries:
        print(audit_line(entry))
        print(f"    before: {clean(_compact(entry.before))}")
        print(f"    after:  {clean(_compact(entry.after))}")
    return OK


def audit_line(entry: AuditEntry) -> str:
    from kamiyo.scrub import clean

    reason = f": {entry.reason}" if entry.reason else ""
    claim = f" (claims to be {entry.claimed_by})" if entry.claimed_by else ""
    on = entry.target or "-"
    return clean(f"#{entry.id} {time_text(entry.at)}  {entry.action:<16} by {entry.actor}{claim}  on {on}{reason}")


def time_text(moment: datetime | None) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ") if moment else "-"


def _compact(value: dict[str, Any] | None) -> str:
    import orjson

    return orjson.dumps(value).decode() if value is not None else "-"
