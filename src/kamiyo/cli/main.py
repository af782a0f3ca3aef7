"""The ``kamiyo`` command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from kamiyo import __version__
from kamiyo.cli.confirm import NotConfirmed
from kamiyo.errors import KamiyoError

if TYPE_CHECKING:
    from kamiyo.config import Settings


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kamiyo",
        description="Stripe webhooks in, subscription tiers out. Settings come from the environment and .env.",
    )
    parser.add_argument("--version", action="version", version=f"kamiyo {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser(
        "serve", help="serve the webhook endpoint (and, unless WORKER_IN_PROCESS=false, apply events)"
    )
    serve.add_argument("--host", help="address to bind (default: HOST or 0.0.0.0)")
    serve.add_argument("--port", type=int, help="port (default: PORT or 8000)")
    serve.add_argument(
        "--no-worker", action="store_true", help="only receive; leave applying to `kamiyo worker` processes"
    )

    commands.add_parser("worker", help="apply stored events until interrupted (run several on PostgreSQL)")

    db = commands.add_parser("db", help="database schema")
    db_commands = db.add_subparsers(dest="db_command", required=True, metavar="ACTION")
    db_commands.add_parser("upgrade", help="apply every pending migration")
    db_commands.add_parser("current", help="print the schema revision the database is at")

    events = commands.add_parser("events", help="inspect the inbox of received events")
    ev_commands = events.add_subparsers(dest="events_command", required=True, metavar="ACTION")
    ev_list = ev_commands.add_parser("list", help="recent events, newest first")
    ev_list.add_argument("--status", choices=("pending", "applied", "ignored", "failed"))
    ev_list.add_argument("--type", help="event type, e.g. customer.subscription.updated")
    ev_list.add_argument("--limit", type=int, default=20)
    ev_show = ev_commands.add_parser("show", help="one event: status, error, outcome and payload")
    ev_show.add_argument("event_id")

    replay = commands.add_parser(
        "replay", help="apply stored events again (by id, --failed, --type, --since); --dry-run shows what would change"
    )
    replay.add_argument("event_id", nargs="?", help="the evt_... id (on its own)")
    replay.add_argument("--failed", action="store_true", help="every event parked as failed")
    replay.add_argument("--type", dest="event_type", help="events of this type, e.g. customer.subscription.updated")
    replay.add_argument("--since", help="events received since: 2h, 1d (ago), 2026-11-27T10:00 (UTC), Unix seconds")
    replay.add_argument(
        "--dry-run", action="store_true", help="show what applying would do, on a snapshot; change nothing"
    )
    replay.add_argument(
        "--limit",
        type=int,
        help="at most this many events, oldest first (default REPLAY_DEFAULT_LIMIT, 1000; at most REPLAY_MAX_LIMIT)",
    )
    replay.add_argument("--after", metavar="EVENT_ID", help="only events received after this one (to continue)")
    replay.add_argument("--yes", action="store_true", help="do not ask for confirmation (required without a terminal)")
    replay.add_argument("--by", help="who replays, for the audit log (default: the OS user)")
    replay.add_argument("--reason", help="why, for the audit log")
    replay.add_argument("--json", action="store_true", help="machine-readable output")

    users = commands.add_parser("users", help="a user's tier, subscriptions and events; manual overrides; drift")
    users_commands = users.add_subparsers(dest="users_command", required=True, metavar="ACTION")
    set_tier = users_commands.add_parser(
        "set-tier", help="override a user's tier; wins over webhooks and syncs until it expires or is cleared"
    )
    set_tier.add_argument("email")
    set_tier.add_argument("tier")
    set_tier.add_argument("--reason", required=True, help="why (required; kept in the audit log)")
    set_tier.add_argument("--expires", help="24h, 30m, 7d from now, or a time (UTC); default: until cleared")
    set_tier.add_argument("--by", help="who (default: the OS user)")
    set_tier.add_argument("--json", action="store_true", help="machine-readable output")
    clear = users_commands.add_parser(
        "clear-override", help="remove a user's override: back to the tier Stripe's state gives"
    )
    clear.add_argument("email")
    clear.add_argument("--reason", help="why, for the audit log")
    clear.add_argument("--by", help="who (default: the OS user)")
    clear.add_argument("--json", action="store_true", help="machine-readable output")
    show = users_commands.add_parser("show", help="tier, status, subscriptions, recent events, override, drift")
    show.add_argument("email")
    show.add_argument("--events", type=int, default=20, help="how many recent events (default 20)")
    show.add_argument("--json", action="store_true", help="machine-readable output")
    drift = users_commands.add_parser(
        "drift", help="users whose stored tier no subscription, override or audit entry explains (exit 1 if any)"
    )
    drift.add_argument("--all", action="store_true", help="also list drift an audit entry explains")
    drift.add_argument("--json", action="store_true", help="machine-readable output")

    audit = commands.add_parser("audit", help="the append-only log of manual actions, newest first")
    audit.add_argument("--since", help="2h, 1d (ago), 2026-11-27T10:00 (UTC) or Unix seconds")
    audit.add_argument("--target", help="only entries about this email or event id")
    audit.add_argument("--limit", type=int, default=200, help="at most this many entries (default 200)")
    audit.add_argument("--json", action="store_true", help="machine-readable output")

    sync = commands.add_parser(
        "sync", help="converge every user's tier and status on Stripe's API (STRIPE_SECRET_KEY); print the drift"
    )
    sync.add_argument("--dry-run", action="store_true", help="report what would change; write nothing")
    sync_scope = sync.add_mutually_exclusive_group()
    sync_scope.add_argument("--customer", help="only this customer's subscriptions (cus_...)")
    sync_scope.add_argument("--email", help="only the subscriptions of the customers with this email")
    sync_scope.add_argument("--resume", action="store_true", help="continue the last full sync that did not finish")
    sync.add_argument("--by", help="who syncs, for the audit log (default: the OS user; a dry run records nothing)")
    sync.add_argument("--reason", help="why, for the audit log")
    sync.add_argument("--yes", action="store_true", help="do not ask for confirmation (required without a terminal)")

    prune = commands.add_parser(
        "prune",
        help="delete old events now: applied and ignored ones past INBOX_RETENTION_DAYS, or --failed parked ones",
        description=(
            "The workers prune applied and ignored events older than INBOX_RETENTION_DAYS every hour; this does "
            "it now, or, with --failed, deletes parked failures (kept until replayed or pruned by hand). "
            "Audited; the audit log itself is never pruned."
        ),
    )
    prune.add_argument("--failed", action="store_true", help="parked failures instead of applied and ignored events")
    prune.add_argument(
        "--older-than",
        metavar="AGE",
        help="received more than AGE ago: 30d, 12w, 36h (default INBOX_RETENTION_DAYS; at least 31d for applied "
        "and ignored events, 1d for parked failures; required with --failed)",
    )
    prune.add_argument("--dry-run", action="store_true", help="count what would be deleted; delete nothing")
    prune.add_argument("--yes", action="store_true", help="do not ask for confirmation (required without a terminal)")
    prune.add_argument("--by", help="who prunes, for the audit log (default: the OS user)")
    prune.add_argument("--reason", help="why, for the audit log")

    backfill = commands.add_parser(
        "backfill",
        help="fetch the events Stripe did not deliver (last 30 days) into the inbox and apply them",
        description=(
            "Stripe's recipe for missed events: list the undelivered ones (delivery_success=false) of the types "
            "kamiyo handles, store the new ones in the inbox and apply them. Without --since it starts where the "
            "last backfill began (less 10 minutes); the very first backfill, with no earlier one to start from, "
            "reads all of Stripe's 30 days of undelivered events (events already in the inbox are skipped). "
            "Stripe keeps events for 30 days: anything older only `kamiyo sync` recovers."
        ),
    )
    backfill.add_argument(
        "--since",
        help="start of the gap: 2h, 3d (ago), 2026-11-27T10:00 (UTC), Unix seconds (default: where the last "
        "backfill began; the first backfill reads Stripe's whole 30 days)",
    )
    backfill.add_argument("--by", help="who backfills, for the audit log (default: the OS user)")
    backfill.add_argument("--reason", help="why, for the audit log")

    trigger = commands.add_parser("trigger", help="sign and post a realistic test event, like `stripe trigger`")
    trigger.add_argument("event_type", help="e.g. payment_intent.succeeded, customer.subscription.created")
    trigger.add_argument(
        "--url",
        help="the endpoint, or the service's base URL (default: http://127.0.0.1:PORT/api/v1/payments/webhook)",
    )
    trigger.add_argument("--secret", help="signing secret (default: the first in STRIPE_WEBHOOK_SECRET)")
    trigger.add_argument("--email", default="trigger@example.com", help="customer email in the event")
    trigger.add_argument("--customer", help="customer id to use (default: a new cus_test...)")
    trigger.add_argument("--api-version", default=None, help="payload shape, e.g. 2024-06-20 or 2026-10-28.endive")

    doctor = commands.add_parser("doctor", help="diagnose the running service as the runbook does; name the option")
    doctor.add_argument("--url", help="the service's base URL (default: http://127.0.0.1:PORT)")
    doctor.add_argument("--json", action="store_true", help="machine-readable output")
    doctor.add_argument("--apply-timeout", type=float, default=15.0, help="seconds to wait for the test event")

    report = commands.add_parser(
        "incident-report", help="document failed webhooks and the recovery (from the database)"
    )
    report.add_argument("--since", required=True, help="2h, 1d (ago), 2026-11-27T10:00 (UTC) or Unix seconds")
    report.add_argument("--until", default="now", help="end of the range (default: now)")
    report.add_argument("--format", choices=("md", "json"), default="md", help="markdown (default) or JSON")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from kamiyo.config import load_settings  # after parsing: `--help` needs no database libraries

    try:
        settings = load_settings()
    except KamiyoError as exc:
        if args.command == "doctor":  # a malformed setting is exactly what doctor must report
            from kamiyo.cli import operate

            return operate.doctor_unconfigured(exc, url=args.url, as_json=args.json)
        print(f"kamiyo: configuration error: {exc}", file=sys.stderr)
        return 2
    from kamiyo.logs import configure_logging

    configure_logging(settings.log_level, log_format=settings.log_format)
    try:
        return _dispatch(args, settings)
    except KamiyoError as exc:
        print(f"kamiyo: {exc}", file=sys.stderr)
        return exc.exit_code if isinstance(exc, NotConfirmed) else 1
    except KeyboardInterrupt:
        return 130


def _dispatch(args: argparse.Namespace, settings: Settings) -> int:
    from kamiyo.cli import commands

    if args.command == "serve":
        return commands.serve(settings, host=args.host, port=args.port, no_worker=args.no_worker)
    if args.command == "worker":
        return commands.worker(settings)
    if args.command == "db":
        return commands.db_upgrade(settings) if args.db_command == "upgrade" else commands.db_current(settings)
    if args.command == "events":
        if args.events_command == "list":
            return commands.events_list(settings, status=args.status, event_type=args.type, limit=args.limit)
        return commands.events_show(settings, args.event_id)
    if args.command in ("replay", "users", "audit", "prune"):
        from kamiyo.cli import operators

        return operators.dispatch(args, settings)
    if args.command in ("sync", "backfill"):
        from kamiyo.cli import reconcile

        if args.command == "sync":
            return reconcile.sync(
                settings,
                dry_run=args.dry_run,
                customer=args.customer,
                email=args.email,
                resume=args.resume,
                by=args.by,
                reason=args.reason,
                yes=args.yes,
            )
        return reconcile.backfill(settings, since=args.since, by=args.by, reason=args.reason)
    if args.command == "trigger":
        return commands.trigger(
            settings,
            args.event_type,
            url=args.url,
            secret=args.secret,
            email=args.email,
            customer_id=args.customer,
            api_version=args.api_version,
        )
    if args.command in ("doctor", "incident-report"):
        from kamiyo.cli import operate

        if args.command == "doctor":
            return operate.doctor(settings, url=args.url, as_json=args.json, apply_timeout=args.apply_timeout)
        return operate.incident_report(settings, since=args.since, until=args.until, fmt=args.format)
    raise AssertionError(args.command)
