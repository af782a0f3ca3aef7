"""Sync every subscription from Stripe's API: the runbook's ``sync_all_subscriptions``, ``kamiyo sync``.

Stripe's list (``status=all``, pages of 100, customers expanded) is streamed: a reader
(``reader.py``: a thread, or for a full sync from the CLI a child process) reads the next pages
while the current one is applied, and at most two pages wait, so memory stays flat however many
subscriptions there are. Each subscription becomes a snapshot exactly as a webhook's payload
does (``read_subscription``), versioned as state verified at the time of the read, and each
page is applied in one transaction (``engine.apply_sync_page``) that also moves the run's cursor, so
``--resume`` continues after the last page that took effect.

A user whose subscriptions fall on different pages is recomputed on each of those pages; in
between, their state reflects only the pages applied so far. ``--dry-run`` rolls each page back,
so it judges every page against the stored state, not against the earlier pages of the run.

A sync that writes (not ``--dry-run``) appends one entry to the audit log when it ends, however
it ends (done, failed, interrupted): who ran it and why, its counts, and the users whose tier or
status it changed, from what to what (the first ``AUDIT_USERS``; the count covers all of them).
Its pages commit one by one, so the entry is written after them, in a transaction of its own.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Engine, select
from sqlalchemy.exc import OperationalError

from kamiyo.config import DEFAULT_MAINTENANCE_TIMEOUT
from kamiyo.db.engine import REPLAYABLE_OPTION, allow_long_statements
from kamiyo.db.errors import describe
from kamiyo.db.models import customers_table, users_table
from kamiyo.domain.links import normalize_email
from kamiyo.domain.tiers import TierMap
from kamiyo.errors import KamiyoError
from kamiyo.operations.audit import default_actor, record_action
from kamiyo.processing.engine import LostRace, PageResult, UserDrift, apply_sync_page
from kamiyo.reconcile import runs
from kamiyo.reconcile.gateway import Page, StripeApiGateway, StripeGateway
from kamiyo.reconcile.reader import ProcessReader, ReadPage, ThreadReader, list_pages

log = logging.getLogger("kamiyo.reconcile")
_KEPT = 1000  # drift entries and problems a summary keeps in memory (all of them are streamed)
_PAGE_ATTEMPTS = 3  # a page's transaction is retried after a deadlock or a lock timeout
AUDIT_USERS = 100  # users a sync's audit entry names, from what to what (its counts cover every one)
SYNC_ACTION = "sync"


@dataclass(frozen=True)
class SyncScope:
    """All subscriptions, or those of one customer, or of the customers with one email."""

    customer: str | None = None
    email: str | None = None

    def label(self) -> str | None:
        if self.customer:
            return f"customer={self.customer}"
        if self.email:
            return f"email={self.email}"
        return None


@dataclass
class SyncSummary:
    run_id: int
    dry_run: bool
    scope: str | None
    resumed_after: str | None = None
    status: str = runs.RUNNING
    seen: int = 0  # subscriptions read from the API
    stored: int = 0  # snapshots written
    kept: int = 0  # snapshots older than what was stored (a newer webhook won)
    linked: int = 0  # customers linked to users by email
    changed: int = 0  # users whose tier or status changed
    skipped: int = 0  # subscriptions that could not be applied (see problems)
    drift: list[UserDrift] = field(default_factory=list)  # the first _KEPT
    problems: list[str] = field(default_factory=list)  # the first _KEPT
    seconds: float = 0.0
    error: str | None = None
    actor: str | None = None  # who ran it, for the audit log
    claimed_by: str | None = None  # the name it was run under, unproven (--by), beside the actor
    reason: str | None = None


class SyncListener:
    """What a sync reports while it runs; the CLI draws progress and prints drift from it."""

    def on_page(self, summary: SyncSummary) -> None:
        """A page was applied (or, in a dry run, judged)."""

    def on_drift(self, drift: UserDrift) -> None:
        """A user's tier or status changed (or, in a dry run, would)."""

    def on_problem(self, problem: str) -> None:
        """A subscription was skipped."""


def sync_subscriptions(
    engine: Engine,
    gateway: StripeGateway,
    tiers: TierMap,
    *,
    scope: SyncScope | None = None,
    dry_run: bool = False,
    resume: bool = False,
    listener: SyncListener | None = None,
    parallel: bool = False,
    actor: str | None = None,
    reason: str | None = None,
    statement_timeout: float = DEFAULT_MAINTENANCE_TIMEOUT,
    claimed_by: str | None = None,
) -> SyncSummary:
    """List subscriptions from the API and converge the database on them; return what changed.

    Unless ``dry_run``, the run is recorded in the audit log as done by ``actor`` (default: the
    OS user) for ``reason``, with ``claimed_by`` (a name given without proof) beside it. On
    PostgreSQL its pages may run statements for ``statement_timeout`` seconds
    (``DATABASE_MAINTENANCE_TIMEOUT_SECONDS``; 0: no limit), not the service's limit.

    ``resume`` continues the latest full sync that did not finish, after its last committed
    page. ``parallel`` reads a full sync's pages in a child process (``reader.ProcessReader``),
    when the gateway allows it. Raises ``KamiyoError`` when the API or the database fails for
    good; the run is then recorded as failed, and a full sync can be resumed.
    """
    scope = scope or SyncScope()
    listener = listener or SyncListener()
    if resume and (scope.label() is not None or dry_run):
        raise KamiyoError("--resume continues a full sync: it cannot be combined with --customer, --email or --dry-run")
    run, cursor = _open_run(engine, scope, dry_run=dry_run, resume=resume)
    summary = SyncSummary(run_id=run.id, dry_run=dry_run, scope=scope.label(), resumed_after=cursor)
    summary.actor = (actor or "").strip() or default_actor()
    summary.reason = (reason or "").strip() or None
    summary.claimed_by = claimed_by
    if resume:
        summary.seen, summary.changed = run.seen, run.changed
    label = f"sync:{run.id}"
    log.info("sync started run=%d scope=%s dry_run=%s resume_after=%s", run.id, summary.scope or "all", dry_run, cursor)
    started = time.monotonic()
    if parallel and scope.label() is None and isinstance(gateway, StripeApiGateway):
        pages: ThreadReader | ProcessReader = ProcessReader(gateway, tiers, label, cursor)
    else:
        pages = ThreadReader(_subscription_pages(engine, gateway, scope, cursor), tiers, label)
    pages_applied = 0
    try:
        for page in pages:
            for problem in page.problems:
                summary.skipped += 1
                if len(summary.problems) < _KEPT:
                    summary.problems.append(problem)
                listener.on_problem(problem)
            result = _apply(engine, tiers, run.id, page, dry_run=dry_run, statement_timeout=statement_timeout)
            pages_applied += 1
            if not dry_run and _refresh_statistics_after(pages_applied):
                _analyze(engine, statement_timeout)
            summary.seen += page.listed
            summary.stored += result.stored
            summary.kept += result.kept
            summary.linked += result.linked
            summary.changed += len(result.drift)
            for drift in result.drift:
                if len(summary.drift) < _KEPT:
                    summary.drift.append(drift)
                listener.on_drift(drift)
            summary.seconds = time.monotonic() - started
            listener.on_page(summary)
    except KeyboardInterrupt:
        _finish(engine, summary, runs.INTERRUPTED, started, "interrupted")
        raise
    except Exception as exc:
        # Told without SQL or its parameters (customers' emails), and scrubbed: it is stored,
        # logged and printed.
        error = describe(exc)
        _finish(engine, summary, runs.FAILED, started, error)
        if isinstance(exc, KamiyoError):
            raise
        raise KamiyoError(f"sync failed: {error}") from exc
    finally:
        pages.close()
    _finish(engine, summary, runs.DONE, started, None)
    return summary


def _open_run(engine: Engine, scope: SyncScope, *, dry_run: bool, resume: bool) -> tuple[runs.Run, str | None]:
    if not resume:
        return runs.start_run(engine, "sync", dry_run=dry_run, scope=scope.label()), None
    run = runs.resumable_sync(engine)
    if run is None:
        raise KamiyoError("nothing to resume: the latest full sync finished (run `kamiyo sync` for a new one)")
    runs.reopen_run(engine, run.id)
    return run, run.cursor


def _finish(engine: Engine, summary: SyncSummary, status: str, started: float, error: str | None) -> None:
    summary.status, summary.error = status, error
    summary.seconds = time.monotonic() - started
    # A dry run's counts are recorded at the end only: its pages are rolled back.
    seen, changed = (summary.seen, summary.changed) if summary.dry_run else (None, None)
    try:
        runs.finish_run(engine, summary.run_id, status, error=error, seen=seen, changed=changed)
    except Exception as exc:  # noqa: BLE001 - the database may be what failed; the run stays "running"
        log.error("sync run=%d could not be recorded as %s: %s", summary.run_id, status, describe(exc))
    if not summary.dry_run:
        _audit(engine, summary)
    log.info(
        "sync %s run=%d seen=%d stored=%d kept=%d linked=%d changed=%d skipped=%d seconds=%.1f",
        status,
        summary.run_id,
        summary.seen,
        summary.stored,
        summary.kept,
        summary.linked,
        summary.changed,
        summary.skipped,
        summary.seconds,
    )


def _audit(engine: Engine, summary: SyncSummary) -> None:
    """The run's audit entry: who, why, its counts and (the first ``AUDIT_USERS``) users' changes."""
    before: dict[str, dict[str, str | None]] = {}
    after: dict[str, dict[str, Any]] = {}
    for drift in summary.drift:
        if drift.email not in before and len(before) >= AUDIT_USERS:
            continue
        # A user recomputed on several pages: from the state before the first to after the last.
        before.setdefault(drift.email, {"tier": drift.before.tier, "status": drift.before.status})
        after[drift.email] = {"tier": drift.after.tier, "status": drift.after.status, "why": list(drift.reasons)}
    counts = {
        "subscriptions_read": summary.seen,
        "applied": summary.stored,
        "kept": summary.kept,
        "customers_linked": summary.linked,
        "users_changed": summary.changed,
        "skipped": summary.skipped,
    }
    try:
        with engine.begin() as connection:
            record_action(
                connection,
                action=SYNC_ACTION,
                actor=summary.actor or default_actor(),
                reason=summary.reason,
                claimed_by=summary.claimed_by,
                target=summary.scope or "all subscriptions",
                before={"run": summary.run_id, "resumed_after": summary.resumed_after, "users": before},
                after={
                    "run": summary.run_id,
                    "status": summary.status,
                    "error": summary.error,
                    **counts,
                    "users": after,
                    "users_not_listed": max(0, summary.changed - len(after)),
                },
            )
    except Exception as exc:  # noqa: BLE001 - the database may be what failed; the run row says what happened
        log.error("sync run=%d could not be recorded in the audit log: %s", summary.run_id, describe(exc))


def _apply(
    engine: Engine, tiers: TierMap, run_id: int, page: ReadPage, *, dry_run: bool, statement_timeout: float
) -> PageResult:
    """Apply one page in one transaction (rolled back in a dry run); retry after a deadlock."""
    for attempt in range(1, _PAGE_ATTEMPTS + 1):
        try:
            if dry_run:
                with engine.connect() as connection:
                    transaction = connection.begin()
                    try:
                        allow_long_statements(connection, statement_timeout)
                        return apply_sync_page(connection, tiers, page.items, seen_at=page.read_at)
                    finally:
                        transaction.rollback()
            with engine.connect().execution_options(**{REPLAYABLE_OPTION: True}) as connection, connection.begin():
                allow_long_statements(connection, statement_timeout)
                result = apply_sync_page(connection, tiers, page.items, seen_at=page.read_at)
                runs.record_progress(
                    connection, run_id, cursor=page.last_id, seen=page.listed, changed=len(result.drift)
                )
            return result
        except (OperationalError, LostRace) as exc:
            if attempt == _PAGE_ATTEMPTS:
                raise
            log.warning("sync page rolled back (%s); retrying", describe(exc))
            time.sleep(0.1 * attempt)
    raise AssertionError("unreachable")


def _refresh_statistics_after(pages: int) -> bool:
    """After pages 1, 4, 16, 64, ...: as often as the tables can have grown fourfold."""
    return pages & (pages - 1) == 0 and pages.bit_length() % 2 == 1


def _analyze(engine: Engine, statement_timeout: float) -> None:
    """PostgreSQL: refresh the planner's statistics of the tables a sync fills.

    A first sync into an empty database grows them from nothing to the whole account within
    minutes, faster than autovacuum analyzes them; the plans chosen while they were empty
    (prepared statements keep theirs) then scan whole tables for every page, and the sync slows
    down quadratically (100,000 subscriptions: 88/s instead of thousands). ANALYZE samples a
    bounded number of rows, takes no lock that blocks reads or writes, and invalidates those plans.
    """
    if engine.dialect.name != "postgresql":
        return
    with engine.begin() as connection:
        allow_long_statements(connection, statement_timeout)
        connection.exec_driver_sql("ANALYZE stripe_customers, stripe_subscriptions, users")


def _subscription_pages(engine: Engine, gateway: StripeGateway, scope: SyncScope, cursor: str | None) -> Iterator[Page]:
    if scope.customer:
        yield from list_pages(gateway, customer=scope.customer, starting_after=None)
        return
    if scope.email:
        for customer in _customers_with_email(engine, gateway, scope.email):
            yield from list_pages(gateway, customer=customer, starting_after=None)
        return
    yield from list_pages(gateway, customer=None, starting_after=cursor)


def _customers_with_email(engine: Engine, gateway: StripeGateway, email: str) -> list[str]:
    """Stripe's customers with this email (its filter is exact), and those linked here to its user."""
    wanted = normalize_email(email)
    if wanted is None:
        raise KamiyoError(f"--email {email!r} is not an email address")
    found: dict[str, None] = {}
    for variant in dict.fromkeys((email.strip(), wanted)):
        starting_after: str | None = None
        while True:
            page = gateway.list_customers(email=variant, starting_after=starting_after)
            found.update((str(c["id"]), None) for c in page.data)
            if not page.has_more or not page.data:
                break
            starting_after = str(page.data[-1]["id"])
    with engine.connect().execution_options(readonly=True) as connection:
        linked = connection.execute(
            select(customers_table.c.id)
            .join(users_table, users_table.c.id == customers_table.c.user_id)
            .where(users_table.c.email == wanted)
            .order_by(customers_table.c.id)
        ).scalars()
        found.update((str(c), None) for c in linked)
    if not found:
        raise KamiyoError(f"no Stripe customer has the email {wanted}, and no user here with it is linked to one")
    return list(found)
