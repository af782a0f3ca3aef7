"""``kamiyo sync`` and ``kamiyo backfill``: reconcile with Stripe's API; what they print, and their exit codes.

The drift report goes to stdout, one line per user as it happens, then a summary (or, with
``--json``, one document at the end). Progress goes to stderr (cli/output.py: rich's bar on a
terminal, plain lines in a pipe).
"""

from __future__ import annotations

import sys
import time
from typing import IO, TYPE_CHECKING, Any, cast

import click

from kamiyo.cli.confirm import confirm
from kamiyo.cli.invocation import OK, PROBLEM, json_option, reason_option, with_settings, yes_option
from kamiyo.cli.output import Progress
from kamiyo.errors import KamiyoError

if TYPE_CHECKING:
    from sqlalchemy import Engine

    from kamiyo.config import Settings
    from kamiyo.processing.engine import UserDrift
    from kamiyo.reconcile.backfill import BackfillSummary
    from kamiyo.reconcile.gateway import StripeGateway
    from kamiyo.reconcile.sync import SyncListener, SyncSummary


@click.command(
    name="sync",
    short_help="converge every user's tier and status on Stripe's API (STRIPE_SECRET_KEY); print the drift",
    help="Converge every user's tier and status on Stripe's API (STRIPE_SECRET_KEY) and print the drift: "
    "each user whose tier or status changed, from what to what, and why. Exit 1 when a subscription could "
    "not be applied (listed as skipped).",
)
@click.option("--dry-run", is_flag=True, help="report what would change; write nothing")
@click.option("--customer", help="only this customer's subscriptions (cus_...)")
@click.option("--email", help="only the subscriptions of the customers with this email")
@click.option("--resume", is_flag=True, help="continue the last full sync that did not finish")
@click.option("--by", help="who syncs, for the audit log (default: the OS user; a dry run records nothing)")
@reason_option
@yes_option
@json_option
@with_settings
def sync_command(
    settings: Settings,
    dry_run: bool,
    customer: str | None,
    email: str | None,
    resume: bool,
    by: str | None,
    reason: str | None,
    yes: bool,
    as_json: bool,
) -> int:
    given = [name for name, value in (("--customer", customer), ("--email", email), ("--resume", resume)) if value]
    if len(given) > 1:
        raise click.UsageError(f"argument {given[1]}: not allowed with argument {given[0]} (one scope at a time)")
    return sync(
        settings,
        dry_run=dry_run,
        customer=customer,
        email=email,
        resume=resume,
        by=by,
        reason=reason,
        yes=yes,
        as_json=as_json,
    )


def sync(
    settings: Settings,
    *,
    dry_run: bool = False,
    customer: str | None = None,
    email: str | None = None,
    resume: bool = False,
    by: str | None = None,
    reason: str | None = None,
    gateway: StripeGateway | None = None,
    out: IO[str] | None = None,
    err: IO[str] | None = None,
    yes: bool = False,
    as_json: bool = False,
) -> int:
    """``kamiyo sync``: 0 when every subscription was applied, 1 when some were skipped.

    A sync that writes asks first on a terminal and needs ``yes`` otherwise (cli/confirm.py);
    the runbook's ``sync_all_subscriptions()`` calls ``run_sync`` and never asks."""
    gateway = gateway or _gateway(settings)
    if not dry_run:
        confirm(f"sync {_scope(customer, email, resume)} from Stripe's API, writing users' tiers and statuses", yes=yes)
    summary = run_sync(
        settings,
        dry_run=dry_run,
        customer=customer,
        email=email,
        resume=resume,
        by=by,
        reason=reason,
        gateway=gateway,
        out=out,
        err=err,
        as_json=as_json,
    )
    return PROBLEM if summary.skipped else OK


def run_sync(
    settings: Settings,
    *,
    dry_run: bool = False,
    customer: str | None = None,
    email: str | None = None,
    resume: bool = False,
    by: str | None = None,
    reason: str | None = None,
    gateway: StripeGateway | None = None,
    out: IO[str] | None = None,
    err: IO[str] | None = None,
    as_json: bool = False,
) -> SyncSummary:
    """Run a sync with its report and progress printed; return its summary (also the runbook's path).

    A sync that writes is recorded in the audit log as run by the OS user, with ``by`` beside it
    as a claim when it names someone else, for ``reason``; a dry run writes nothing, not even
    that entry.
    """
    from kamiyo.cli.db import require_current_schema
    from kamiyo.db.engine import make_engine
    from kamiyo.heap import settle
    from kamiyo.operations.audit import cli_actor
    from kamiyo.reconcile.sync import SyncScope, sync_subscriptions

    out = out or sys.stdout
    err = err or sys.stderr
    actor, claimed = cli_actor(by)
    gateway = gateway or _gateway(settings)
    engine = make_engine(settings)
    # What is loaded by now lives as long as the command: the collector need not walk it again on
    # every collection while the pages' objects come and go.
    settle()
    try:
        require_current_schema(engine)
        with SyncPrinter(out, err, dry_run=dry_run, as_json=as_json) as printer:
            summary = sync_subscriptions(
                engine,
                gateway,
                settings.price_tiers,
                scope=SyncScope(customer=customer, email=email),
                dry_run=dry_run,
                resume=resume,
                listener=cast("SyncListener", printer),  # the listener's three methods, without its import
                parallel=True,  # a full sync reads in a second process: two cores
                actor=actor,
                claimed_by=claimed,
                reason=reason,
                statement_timeout=settings.database_maintenance_timeout_seconds,
            )
    finally:
        engine.dispose()
    if as_json:
        print(_sync_json(summary, printer), file=out)
    else:
        _print_summary(summary, out)
    return summary


class SyncPrinter:
    """A ``SyncListener``: drift and skipped lines on ``out`` as they come, progress on ``err``;
    with ``as_json`` it keeps them for the document printed at the end."""

    def __init__(self, out: IO[str], err: IO[str], *, dry_run: bool, as_json: bool = False) -> None:
        self.out = out
        self.dry_run = dry_run
        self.as_json = as_json
        self.changes: list[UserDrift] = []
        self.problems: list[str] = []
        self.progress = Progress("sync", unit="subscriptions", err=err)

    def __enter__(self) -> SyncPrinter:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.__exit__(*exc)

    def on_drift(self, drift: UserDrift) -> None:
        if self.as_json:
            self.changes.append(drift)
        else:
            self.progress.write(format_drift(drift, dry_run=self.dry_run), self.out)

    def on_problem(self, problem: str) -> None:
        if self.as_json:
            self.problems.append(problem)
        else:
            self.progress.write(f"skipped  {problem}", self.out)

    def on_page(self, summary: SyncSummary) -> None:
        rate = summary.seen / summary.seconds if summary.seconds else 0.0
        verb = "to change" if self.dry_run else "changed"
        self.progress.update(summary.seen, f"{summary.changed:,} users {verb}, {rate:,.0f}/s")


def format_drift(drift: UserDrift, *, dry_run: bool = False) -> str:
    """One line: who, from what to what, why."""
    verb = "would change" if dry_run else "changed"
    before = f"{drift.before.tier}/{drift.before.status or '-'}"
    after = f"{drift.after.tier}/{drift.after.status or '-'}"
    return f"{verb}  {drift.email}  {before} -> {after}  because {'; '.join(drift.reasons)}"


def _sync_json(summary: SyncSummary, printer: SyncPrinter) -> str:
    from kamiyo.cli.output import json_text

    fields = ("run_id", "dry_run", "scope", "status", "resumed_after", "seconds", "error")
    counts = ("seen", "stored", "kept", "linked", "changed", "skipped")
    document: dict[str, Any] = {name: getattr(summary, name) for name in fields}
    document["counts"] = {name: getattr(summary, name) for name in counts}
    document["changes"] = [
        {
            "email": d.email,
            "before": {"tier": d.before.tier, "status": d.before.status},
            "after": {"tier": d.after.tier, "status": d.after.status},
            "reasons": list(d.reasons),
        }
        for d in printer.changes
    ]
    document["skipped"] = printer.problems
    return json_text(document)


def _print_summary(summary: SyncSummary, out: IO[str]) -> None:
    what = "dry run" if summary.dry_run else "sync"
    resumed = f", resumed after {summary.resumed_after}" if summary.resumed_after else ""
    print(
        f"{what} run {summary.run_id} {summary.status} in {summary.seconds:.1f} s{resumed}: "
        f"{summary.seen:,} subscriptions read, {summary.stored:,} applied, {summary.kept:,} kept "
        f"(a newer webhook snapshot was stored), {summary.linked:,} customers linked, "
        f"{summary.changed:,} users {'would change' if summary.dry_run else 'changed'}, {summary.skipped:,} skipped",
        file=out,
    )
    if summary.dry_run:
        print("dry run: nothing was written (run without --dry-run to apply)", file=out)
    if summary.skipped:
        print(
            f"{summary.skipped} subscription(s) skipped (listed above): fix the cause (STRIPE_PRICE_TIERS?) "
            "and sync again",
            file=out,
        )


@click.command(
    name="backfill",
    short_help="fetch the events Stripe did not deliver (last 30 days) into the inbox and apply them",
    help=(
        "Stripe's recipe for missed events: list the undelivered ones (delivery_success=false) of the types "
        "kamiyo handles, store the new ones in the inbox and apply them. Without --since it starts where the "
        "last backfill began (less 10 minutes); the very first backfill, with no earlier one to start from, "
        "reads all of Stripe's 30 days of undelivered events (events already in the inbox are skipped). "
        "Stripe keeps events for 30 days: anything older only `kamiyo sync` recovers."
    ),
)
@click.option(
    "--since",
    help="start of the gap: 2h, 3d (ago), 2026-11-27T10:00 (UTC), Unix seconds (default: where the last "
    "backfill began; the first backfill reads Stripe's whole 30 days)",
)
@click.option("--by", help="who backfills, for the audit log (default: the OS user)")
@reason_option
@with_settings
def backfill_command(settings: Settings, since: str | None, by: str | None, reason: str | None) -> int:
    return backfill(settings, since=since, by=by, reason=reason)


def backfill(
    settings: Settings,
    *,
    since: str | None = None,
    apply: bool = True,
    by: str | None = None,
    reason: str | None = None,
    gateway: StripeGateway | None = None,
    out: IO[str] | None = None,
    err: IO[str] | None = None,
) -> int:
    """``kamiyo backfill``: list undelivered events into the inbox, then apply them.

    Without ``since``, it starts where the last backfill began; the very first one reads all of
    Stripe's 30 days of undelivered events. Recorded in the audit log as run by the OS user, with
    ``by`` beside it as a claim when it names someone else, for ``reason``.
    """
    from datetime import UTC, datetime

    from kamiyo.cli.db import require_current_schema
    from kamiyo.cli.invocation import argument
    from kamiyo.db.engine import make_engine
    from kamiyo.operations.audit import cli_actor
    from kamiyo.operations.inputs import parse_time
    from kamiyo.reconcile.backfill import backfill_events

    out = out or sys.stdout
    err = err or sys.stderr
    start = int(argument(parse_time, since, now=datetime.now(UTC)).timestamp()) if since else None
    actor, claimed = cli_actor(by)
    gateway = gateway or _gateway(settings)
    engine = make_engine(settings)
    try:
        require_current_schema(engine)
        summary = backfill_events(
            engine,
            gateway,
            since=start,
            warn=lambda m: print(f"WARNING: {m}", file=err),
            actor=actor,
            claimed_by=claimed,
            reason=reason,
            statement_timeout=settings.database_maintenance_timeout_seconds,
            mode=settings.stripe_mode,
        )
        _print_backfill(summary, out)
        if apply and summary.new:
            applied = _drain(engine, settings, gateway, total=summary.new, err=err)
            print(f"applied: the worker handled {applied} event(s); see `kamiyo events list`", file=out)
    finally:
        engine.dispose()
    return OK


def _scope(customer: str | None, email: str | None, resume: bool) -> str:
    if customer:
        return f"the subscriptions of customer {customer}"
    if email:
        return f"the subscriptions of the customers with email {email}"
    return "the rest of the last full sync (--resume)" if resume else "every subscription"


def _gateway(settings: Settings) -> StripeGateway:
    from kamiyo.reconcile.gateway import gateway_from_settings

    gateway = gateway_from_settings(settings)
    if gateway is None:
        raise KamiyoError("STRIPE_SECRET_KEY is not set: reconciling needs read access to Stripe's API")
    return gateway


def _drain(engine: Engine, settings: Settings, gateway: StripeGateway, *, total: int, err: IO[str]) -> int:
    """Apply what is pending, as the worker does, until nothing is left; return how many it handled.

    The total counts the backfilled events; other pending events are applied too, so the bar may
    end past it."""
    from kamiyo.processing.worker import Worker

    worker = Worker(engine, settings, gateway=gateway)
    handled = 0
    with Progress("backfill", total, unit="events applied", err=err) as progress:
        while step := worker.run_once():
            handled += step
            progress.update(handled)
    return handled


def _print_backfill(summary: BackfillSummary, out: IO[str]) -> None:
    from kamiyo.reconcile.backfill import FIRST_BACKFILL

    start = summary.start
    origin = f" from {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(start.at))} ({start.source})" if start else ""
    print(
        f"backfill run {summary.run_id}{origin}: {summary.listed} undelivered event(s) listed, "
        f"{summary.new} new stored in the inbox",
        file=out,
    )
    if start is not None and start.source == FIRST_BACKFILL:
        print(
            "first backfill: no earlier one to start from, so all of Stripe's 30 days of undelivered events were "
            "read; what is older than that only `kamiyo sync` recovers",
            file=out,
        )
