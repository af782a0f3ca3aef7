"""``kamiyo replay``: apply stored events again (by id, or a selection); ``--dry-run`` shows what would change."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import click

from kamiyo.cli.confirm import confirm
from kamiyo.cli.invocation import OK, PROBLEM, argument, bounded, json_option, reason_option, with_settings, yes_option
from kamiyo.cli.output import Progress, print_json
from kamiyo.domain.outcomes import InboxStatus

if TYPE_CHECKING:
    from kamiyo.config import Settings
    from kamiyo.operations.replay import ReplayResult


@click.command(
    short_help="apply stored events again (by id, --failed, --type, --since); --dry-run shows what would change",
    help="Apply stored events again, as the worker does, with this process's configuration: one event by id, "
    "or a selection (--failed, --type, --since), oldest first. Exit 1 when an applied replay leaves an event "
    "failing (a dry run exits 0).",
)
@click.argument("event_id", required=False)
@click.option("--failed", is_flag=True, help="every event parked as failed")
@click.option("--type", "event_type", help="events of this type, e.g. customer.subscription.updated")
@click.option("--since", help="events received since: 2h, 1d (ago), 2026-11-27T10:00 (UTC), Unix seconds")
@click.option("--dry-run", is_flag=True, help="show what applying would do, on a snapshot; change nothing")
@click.option(
    "--limit",
    type=int,
    help="at most this many events, oldest first (default REPLAY_DEFAULT_LIMIT, 1000; at most REPLAY_MAX_LIMIT)",
)
@click.option("--after", metavar="EVENT_ID", help="only events received after this one (to continue)")
@yes_option
@click.option("--by", help="who replays, for the audit log (default: the OS user)")
@reason_option
@json_option
@with_settings
def replay(
    settings: Settings,
    event_id: str | None,
    failed: bool,
    event_type: str | None,
    since: str | None,
    dry_run: bool,
    limit: int | None,
    after: str | None,
    yes: bool,
    by: str | None,
    reason: str | None,
    as_json: bool,
) -> int:
    """A replay of a selection (not one event by id) that applies asks first (cli/confirm.py)."""
    from kamiyo.db.engine import make_engine
    from kamiyo.operations.audit import cli_actor
    from kamiyo.operations.inputs import parse_time
    from kamiyo.operations.replay import count_selected, replay_events
    from kamiyo.scrub import clean

    moment = argument(parse_time, since, now=datetime.now(UTC)) if since else None
    bounded(limit, "--limit", settings.replay_max_limit)
    actor, claimed = cli_actor(by)
    selection: dict[str, Any] = {"failed": failed, "event_type": event_type, "since": moment, "after": after}
    chosen = " ".join(
        ["--failed"] * failed
        + ([f"--type {event_type}"] if event_type else [])
        + ([f"--since {since}"] if since else [])
        + ([f"--after {after}"] if after else [])
    )
    size = 1 if event_id else (limit or settings.replay_default_limit)
    engine = make_engine(settings)
    try:
        total = count_selected(engine, **selection) if event_id is None else 1
        if event_id is None and not dry_run and total:
            more = f" (the oldest {size:,} of {total:,})" if total > size else ""
            confirm(
                f"replay {min(total, size):,} event(s){more} selected by {clean(chosen) or 'nothing'}, applying "
                "them now with this process's configuration",
                yes=yes,
            )
        with Progress("replay", min(total, size), unit="events (dry run)" if dry_run else "events") as progress:
            results = replay_events(
                engine,
                event_id=event_id,
                dry_run=dry_run,
                actor=actor,
                reason=reason,
                settings=settings,
                limit=None if event_id else size,
                claimed_by=claimed,
                progress=None if event_id else progress.update,
                **selection,
            )
        left = 0
        if event_id is None and results and len(results) == size:
            left = count_selected(engine, **{**selection, "after": results[-1].event_id})
    finally:
        engine.dispose()
    if as_json:
        print_json(results)
    else:
        for result in results:
            print(_replay_line(result))
        print(_replay_summary(results, dry_run=dry_run))
        if left:
            print(f"{left:,} more event(s) selected: continue with --after {clean(results[-1].event_id)}")
    failing = [r for r in results if r.status_after in (InboxStatus.FAILED, InboxStatus.PENDING)]
    return PROBLEM if failing and not dry_run else OK


def _replay_line(result: ReplayResult) -> str:
    from kamiyo.cli.users import state_text
    from kamiyo.scrub import clean

    line = clean(f"{result.event_id}  {result.type}  {result.status_before} -> {result.status_after}")
    if result.error:
        line += f"  error: {clean(result.error[:200])}"
    elif result.detail:
        line += f"  {clean(result.detail[:200])}"
    for change in result.changes:
        line += f"\n    user {clean(change.email)}: {state_text(change.before)} -> {state_text(change.after)}"
    return line


def _replay_summary(results: Sequence[ReplayResult], *, dry_run: bool) -> str:
    counts: dict[str, int] = {}
    for result in results:
        counts[result.status_after] = counts.get(result.status_after, 0) + 1
    names: dict[str, str] = {InboxStatus.PENDING: "failed (the worker retries)"}
    detail = ", ".join(f"{n} {names.get(status, status)}" for status, n in sorted(counts.items()))
    if dry_run:
        return f"dry run: {len(results)} event(s) would be replayed{': ' + detail if detail else ''}; nothing changed"
    return f"{len(results)} event(s) replayed{': ' + detail if detail else ''}"
