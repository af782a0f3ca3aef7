"""``kamiyo sync`` and ``kamiyo backfill``: what they print, and their exit codes.

The drift report goes to stdout, one line per user as it happens, then a summary. Progress goes
to stderr: a bar redrawn in place on a terminal, a plain line after the first page and then every
few seconds in a pipe.
"""

from __future__ import annotations

import gc
import sys
import time
from typing import IO

from sqlalchemy import Engine

from kamiyo.cli.commands import _require_current_schema
from kamiyo.cli.confirm import confirm
from kamiyo.config import Settings
from kamiyo.db.engine import make_engine
from kamiyo.errors import KamiyoError
from kamiyo.operations.audit import cli_actor
from kamiyo.processing.worker import Worker
from kamiyo.reconcile.apply import UserDrift
from kamiyo.reconcile.backfill import FIRST_BACKFILL, BackfillSummary, backfill_events
from kamiyo.reconcile.gateway import StripeGateway, gateway_from_settings
from kamiyo.reconcile.sync import SyncListener, SyncScope, SyncSummary, sync_subscriptions

_PLAIN_EVERY_SECONDS = 5.0
_BAR_WIDTH = 24


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
    )
    return 1 if summary.skipped else 0


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
) -> SyncSummary:
    """Run a sync with its report and progress printed; return its summary (also the runbook's path).

    A sync that writes is recorded in the audit log as run by the OS user, with ``by`` beside it
    as a claim when it names someone else, for ``reason``; a dry run writes nothing, not even
    that entry.
    """
    out = out or sys.stdout
    err = err or sys.stderr
    actor, claimed = cli_actor(by)
    gateway = gateway or _gateway(settings)
    engine = make_engine(settings)
    # What is loaded by now lives as long as the command: the collector need not walk it again on
    # every collection while the pages' objects come and go.
    gc.freeze()
    try:
        _require_current_schema(engine)
        listener = _SyncPrinter(out, err, dry_run=dry_run)
        try:
            summary = sync_subscriptions(
                engine,
                gateway,
                settings.price_tiers,
                scope=SyncScope(customer=customer, email=email),
                dry_run=dry_run,
                resume=resume,
                listener=listener,
                parallel=True,  # a full sync reads in a second process: two cores
                actor=actor,
                claimed_by=claimed,
                reason=reason,
                statement_timeout=settings.database_maintenance_timeout_seconds,
            )
        finally:
            listener.clear()
    finally:
        engine.dispose()
    _print_summary(summary, out)
    return summary


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

    from kamiyo.diagnosis.incident_report import parse_time

    out = out or sys.stdout
    err = err or sys.stderr
    start = int(parse_time(since, now=datetime.now(UTC)).timestamp()) if since else None
    actor, claimed = cli_actor(by)
    gateway = gateway or _gateway(settings)
    engine = make_engine(settings)
    try:
        _require_current_schema(engine)
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
            applied = _drain(engine, settings, gateway)
            print(f"applied: the worker handled {applied} event(s); see `kamiyo events list`", file=out)
    finally:
        engine.dispose()
    return 0


def _scope(customer: str | None, email: str | None, resume: bool) -> str:
    if customer:
        return f"the subscriptions of customer {customer}"
    if email:
        return f"the subscriptions of the customers with email {email}"
    return "the rest of the last full sync (--resume)" if resume else "every subscription"


def _gateway(settings: Settings) -> StripeGateway:
    gateway = gateway_from_settings(settings)
    if gateway is None:
        raise KamiyoError("STRIPE_SECRET_KEY is not set: reconciling needs read access to Stripe's API")
    return gateway


def _drain(engine: Engine, settings: Settings, gateway: StripeGateway) -> int:
    worker = Worker(engine, settings, gateway=gateway)
    total = 0
    while handled := worker.run_once():
        total += handled
    return total


class _SyncPrinter(SyncListener):
    def __init__(self, out: IO[str], err: IO[str], *, dry_run: bool) -> None:
        self.out, self.err = out, err
        self.dry_run = dry_run
        self.tty = err.isatty()
        self._drawn = False
        self._last_plain: float | None = None
        self._frame = 0

    def on_drift(self, drift: UserDrift) -> None:
        self.clear()
        print(format_drift(drift, dry_run=self.dry_run), file=self.out, flush=True)

    def on_problem(self, problem: str) -> None:
        self.clear()
        print(f"skipped  {problem}", file=self.out, flush=True)

    def on_page(self, summary: SyncSummary) -> None:
        rate = summary.seen / summary.seconds if summary.seconds else 0.0
        counts = (
            f"{summary.seen:,} subscriptions, {summary.changed:,} users {'to change' if self.dry_run else 'changed'}, "
            f"{rate:,.0f}/s"
        )
        if self.tty:
            self._frame += 1
            position = self._frame % (2 * _BAR_WIDTH - 2)
            position = position if position < _BAR_WIDTH else 2 * _BAR_WIDTH - 2 - position
            bar = "".join("=" if abs(i - position) < 3 else " " for i in range(_BAR_WIDTH))
            self.err.write(f"\r\x1b[2Ksync [{bar}] {counts}")
            self.err.flush()
            self._drawn = True
        elif self._last_plain is None or time.monotonic() - self._last_plain >= _PLAIN_EVERY_SECONDS:
            self._last_plain = time.monotonic()
            print(f"sync: {counts}", file=self.err, flush=True)

    def clear(self) -> None:
        if self._drawn:
            self.err.write("\r\x1b[2K")
            self.err.flush()
            self._drawn = False


def format_drift(drift: UserDrift, *, dry_run: bool = False) -> str:
    """One line: who, from what to what, why."""
    verb = "would change" if dry_run else "changed"
    before = f"{drift.before.tier}/{drift.before.status or '-'}"
    after = f"{drift.after.tier}/{drift.after.status or '-'}"
    return f"{verb}  {drift.email}  {before} -> {after}  because {'; '.join(drift.reasons)}"


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


def _print_backfill(summary: BackfillSummary, out: IO[str]) -> None:
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
