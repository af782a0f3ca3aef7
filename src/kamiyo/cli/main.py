"""The ``kamiyo`` command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from kamiyo import __version__
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

    replay = commands.add_parser("replay", help="apply an event again (by id), or every parked failure")
    target = replay.add_mutually_exclusive_group(required=True)
    target.add_argument("event_id", nargs="?", help="the evt_... id")
    target.add_argument("--failed", action="store_true", help="every event parked as failed")

    trigger = commands.add_parser("trigger", help="sign and post a realistic test event, like `stripe trigger`")
    trigger.add_argument("event_type", help="e.g. payment_intent.succeeded, customer.subscription.created")
    trigger.add_argument("--url", help="endpoint (default: http://127.0.0.1:PORT/api/v1/payments/webhook)")
    trigger.add_argument("--secret", help="signing secret (default: the first in STRIPE_WEBHOOK_SECRET)")
    trigger.add_argument("--email", default="trigger@example.com", help="customer email in the event")
    trigger.add_argument("--customer", help="customer id to use (default: a new cus_test...)")
    trigger.add_argument("--api-version", default=None, help="payload shape, e.g. 2024-06-20 or 2026-10-28.endive")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from kamiyo.config import load_settings  # after parsing: `--help` needs no database libraries

    try:
        settings = load_settings()
    except KamiyoError as exc:
        print(f"kamiyo: configuration error: {exc}", file=sys.stderr)
        return 2
    from kamiyo.logs import configure_logging

    configure_logging(settings.log_level)
    try:
        return _dispatch(args, settings)
    except KamiyoError as exc:
        print(f"kamiyo: {exc}", file=sys.stderr)
        return 1
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
    if args.command == "replay":
        return commands.replay(settings, event_id=args.event_id, failed=args.failed)
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
    raise AssertionError(args.command)
