"""``kamiyo prune``: delete old events now (applied and ignored ones past the retention, or --failed parked ones)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

import click

from kamiyo.cli.confirm import confirm
from kamiyo.cli.invocation import OK, ArgumentProblem, argument, reason_option, with_settings, yes_option
from kamiyo.cli.output import Progress

if TYPE_CHECKING:
    from kamiyo.config import Settings
    from kamiyo.operations.prune import Prunable, PruneScope


@click.command(
    short_help="delete old events now: applied and ignored ones past INBOX_RETENTION_DAYS, or --failed parked ones",
    help=(
        "The workers prune applied and ignored events older than INBOX_RETENTION_DAYS every hour; this does "
        "it now, or, with --failed, deletes parked failures (kept until replayed or pruned by hand). "
        "Audited; the audit log itself is never pruned."
    ),
)
@click.option("--failed", is_flag=True, help="parked failures instead of applied and ignored events")
@click.option(
    "--older-than",
    metavar="AGE",
    help="received more than AGE ago: 30d, 12w, 36h (default INBOX_RETENTION_DAYS; at least 31d for applied "
    "and ignored events, 1d for parked failures; required with --failed)",
)
@click.option("--dry-run", is_flag=True, help="count what would be deleted; delete nothing")
@yes_option
@click.option("--by", help="who prunes, for the audit log (default: the OS user)")
@reason_option
@with_settings
def prune(
    settings: Settings,
    failed: bool,
    older_than: str | None,
    dry_run: bool,
    yes: bool,
    by: str | None,
    reason: str | None,
) -> int:
    from kamiyo.config import MIN_INBOX_RETENTION_DAYS
    from kamiyo.db.engine import make_engine
    from kamiyo.operations.audit import cli_actor
    from kamiyo.operations.prune import FAILED, MIN_FAILED_AGE, RETAINED, PruneScope, prunable, prune_by_hand

    now = datetime.now(UTC)
    if failed:
        if not older_than:
            raise ArgumentProblem("--failed needs --older-than (e.g. --older-than 30d): parked failures are evidence")
        scope = PruneScope(FAILED, now - _age(older_than, least=MIN_FAILED_AGE))
    else:
        least = timedelta(days=MIN_INBOX_RETENTION_DAYS)
        age = _age(older_than, least=least) if older_than else timedelta(days=settings.inbox_retention_days)
        scope = PruneScope(RETAINED, now - age)
    actor, claimed = cli_actor(by)
    engine = make_engine(settings)
    try:
        found = prunable(engine, scope)
        print(_prunable_line(found, scope, dry_run=dry_run))
        if dry_run or not found.count:
            return OK
        confirm(f"delete {found.count:,} {scope.label()}", yes=yes)
        with Progress("prune", found.count, unit="events deleted") as progress:
            summary = prune_by_hand(
                engine,
                scope,
                dry_run=False,
                actor=actor,
                reason=reason,
                found=found,
                claimed_by=claimed,
                progress=progress.update,
            )
    finally:
        engine.dispose()
    kinds = ", ".join(f"{n:,} {status}" for status, n in sorted(summary.by_status.items()))
    print(f"deleted {summary.pruned:,} event(s){': ' + kinds if kinds else ''}; recorded in the audit log")
    return OK


def _age(text: str, *, least: timedelta) -> timedelta:
    """``--older-than``: 36h, 30d, 12w (operations/inputs.py's durations), at least ``least``."""
    from kamiyo.operations.inputs import parse_duration
    from kamiyo.scrub import clean

    age: timedelta = argument(parse_duration, text)
    if age < least:
        raise ArgumentProblem(
            f"--older-than {clean(text.strip())} is less than the {least.days} day(s) this prune allows"
        )
    return age


def _prunable_line(found: Prunable, scope: PruneScope, *, dry_run: bool) -> str:
    from kamiyo.cli.audit import time_text

    if not found.count:
        return f"nothing to prune: no {scope.label()}"
    kinds = ", ".join(f"{n:,} {status}" for status, n in sorted(found.by_status.items()))
    span = f", received {time_text(found.oldest)} .. {time_text(found.newest)}"
    verb = "would delete" if dry_run else "found"
    return f"{verb} {found.count:,} {scope.label()} ({kinds}{span})" + ("; nothing changed" if dry_run else "")
