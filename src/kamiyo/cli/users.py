"""``kamiyo users set-tier | clear-override | show | drift``: a user's tier, overrides and drift."""

from __future__ import annotations

import sys
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import click

from kamiyo.cli.audit import audit_line, time_text
from kamiyo.cli.invocation import OK, PROBLEM, argument, bounded, json_option, with_settings
from kamiyo.cli.output import drawn, print_json, table
from kamiyo.domain.outcomes import InboxStatus
from kamiyo.errors import KamiyoError

if TYPE_CHECKING:
    from kamiyo.config import Settings
    from kamiyo.operations.users import DriftView, StateView, UserReport

MAX_EVENTS = 1000


@click.group(
    short_help="a user's tier, subscriptions and events; manual overrides; drift",
    help="A user's tier, subscriptions and events; manual overrides; drift.",
)
def users() -> None:
    pass


@users.command(
    name="set-tier",
    short_help="override a user's tier; wins over webhooks and syncs until it expires or is cleared",
    help="override a user's tier; wins over webhooks and syncs until it expires or is cleared",
)
@click.argument("email")
@click.argument("tier")
@click.option("--reason", required=True, help="why (required; kept in the audit log)")
@click.option("--expires", help="24h, 30m, 7d from now, or a time (UTC); default: until cleared")
@click.option("--by", help="who (default: the OS user)")
@json_option
@with_settings
def set_tier(
    settings: Settings, email: str, tier: str, reason: str, expires: str | None, by: str | None, as_json: bool
) -> int:
    from kamiyo.db.engine import make_engine
    from kamiyo.operations.audit import cli_actor
    from kamiyo.operations.inputs import expiry_time
    from kamiyo.operations.overrides import set_override

    until = argument(expiry_time, expires, now=datetime.now(UTC)) if expires else None
    actor, claimed = cli_actor(by)
    engine = make_engine(settings)
    try:
        report = set_override(
            engine,
            email=email,
            tier=tier,
            reason=reason,
            expires_at=until,
            actor=actor,
            tiers=settings.price_tiers,
            claimed_by=claimed,
        )
    finally:
        engine.dispose()
    return _print_user(report, as_json)


@users.command(
    name="clear-override",
    short_help="remove a user's override: back to the tier Stripe's state gives",
    help="remove a user's override: back to the tier Stripe's state gives",
)
@click.argument("email")
@click.option("--reason", help="why, for the audit log")
@click.option("--by", help="who (default: the OS user)")
@json_option
@with_settings
def clear_override(settings: Settings, email: str, reason: str | None, by: str | None, as_json: bool) -> int:
    from kamiyo.db.engine import make_engine
    from kamiyo.operations.audit import cli_actor
    from kamiyo.operations.overrides import clear_override as clear

    actor, claimed = cli_actor(by)
    engine = make_engine(settings)
    try:
        report = clear(engine, email=email, actor=actor, reason=reason, tiers=settings.price_tiers, claimed_by=claimed)
    finally:
        engine.dispose()
    return _print_user(report, as_json)


@users.command(
    short_help="tier, status, subscriptions, recent events, override, drift",
    help="tier, status, subscriptions, recent events, override, drift",
)
@click.argument("email")
@click.option("--events", type=int, default=20, show_default=True, help="how many recent events")
@json_option
@with_settings
def show(settings: Settings, email: str, events: int, as_json: bool) -> int:
    from kamiyo.db.engine import make_engine
    from kamiyo.operations.users import show_user
    from kamiyo.scrub import clean

    bounded(events, "--events", MAX_EVENTS)
    engine = make_engine(settings)
    try:
        with engine.connect().execution_options(readonly=True) as connection:
            report = show_user(connection, email, tiers=settings.price_tiers, events=events)
    finally:
        engine.dispose()
    if report is None:
        raise KamiyoError(f"no user {clean(email.strip().lower())}")
    return _print_user(report, as_json)


@users.command(
    short_help="users whose stored tier no subscription, override or audit entry explains (exit 1 if any)",
    help="users whose stored tier no subscription, override or audit entry explains (exit 1 if any)",
)
@click.option("--all", "show_all", is_flag=True, help="also list drift an audit entry explains")
@json_option
@with_settings
def drift(settings: Settings, show_all: bool, as_json: bool) -> int:
    """Exit 1 when some user's stored tier is unexplained, so that it can run from cron or CI."""
    from kamiyo.db.engine import make_engine
    from kamiyo.operations.users import drift as find_drift
    from kamiyo.scrub import clean

    engine = make_engine(settings)
    try:
        with engine.connect().execution_options(readonly=True) as connection:
            found = find_drift(connection, tiers=settings.price_tiers)
    finally:
        engine.dispose()
    unexplained = [d for d in found if d.explained_by is None]
    shown = found if show_all else unexplained
    if as_json:
        print_json(shown)
        return PROBLEM if unexplained else OK
    if not shown:
        print("no unexplained drift: every user's stored tier is what subscriptions and overrides give")
    elif drawn(sys.stdout):
        table(
            ("user", "stored", "subscriptions and override give", "explained by"),
            [
                (
                    clean(d.email),
                    state_text(d.stored),
                    state_text(d.expected),
                    f"audit entry #{d.explained_by}" if d.explained_by else "nothing",
                )
                for d in shown
            ],
        )
    else:
        for item in shown:
            print(drift_line(item))
    if unexplained:
        print(
            f"{len(unexplained)} user(s) with unexplained drift (a direct UPDATE users?): make it an audited "
            "override with `kamiyo users set-tier`, or return them to Stripe's state with "
            "`kamiyo users clear-override`"
        )
    return PROBLEM if unexplained else OK


def _print_user(report: UserReport, as_json: bool) -> int:
    from kamiyo.operations.users import StateView
    from kamiyo.scrub import clean

    if as_json:
        print_json(report)
        return OK
    print(f"user {clean(report.email)} (id {report.user_id})")
    print(f"  stored    {state_text(StateView(report.tier, report.status)):<24} what the application reads")
    print(f"  expected  {state_text(report.expected):<24} what subscriptions and override give")
    stripe = state_text(report.stripe_state) if report.stripe_state else "no subscriptions"
    print(f"  stripe    {stripe:<24} what the subscriptions alone give")
    if report.override:
        o = report.override
        until = f"until {time_text(o.expires_at)}" if o.expires_at else "until cleared"
        print(
            f"  override  {clean(o.tier)} {until}, set by {clean(o.set_by)} at {time_text(o.set_at)}: {clean(o.reason)}"
        )
    else:
        print("  override  none")
    if report.drift:
        print(f"  drift     {drift_line(report.drift)}")
    print(f"  customers {clean(', '.join(report.customer_ids)) or 'none'}")
    print("subscriptions:" if report.subscriptions else "subscriptions: none")
    for sub in report.subscriptions:
        flags = " cancel_at_period_end" if sub.cancel_at_period_end else ""
        print(
            f"  {clean(sub.id)}  {clean(sub.status):<18} {clean(sub.tier):<10} "
            f"prices={clean(','.join(sub.price_ids)) or '-'} "
            f"created={_unix(sub.created)} period_end={_unix(sub.current_period_end)}{flags} "
            f"customer={clean(sub.customer_id)} from={clean(sub.last_event_id or '-')}"
        )
    print("recent events, newest first:" if report.recent_events else "recent events: none")
    for event in report.recent_events:
        if event.status in (InboxStatus.FAILED, InboxStatus.PENDING) and event.error:
            outcome = event.error
        elif event.changes:
            outcome = "; ".join(
                f"{c.tier_from}/{c.status_from} -> {c.tier_to}/{c.status_to} ({c.why})" for c in event.changes
            )
        else:  # no change of this user, or applied before outcomes were recorded: the sentence as stored
            outcome = event.detail or ""
        print(
            f"  {time_text(event.received_at)}  {clean(event.status):<8} {clean(event.type):<36} "
            f"{clean(event.event_id)}  {clean(outcome[:160])}"
        )
    print("manual actions, newest first:" if report.audit else "manual actions: none")
    for entry in report.audit:
        print(f"  {audit_line(entry)}")
    return OK


def state_text(state: StateView) -> str:
    from kamiyo.scrub import clean

    return clean(f"{state.tier}/{state.status or '-'}")


def drift_line(item: DriftView) -> str:
    from kamiyo.scrub import clean

    why = f"explained by audit entry #{item.explained_by}" if item.explained_by else "no audit entry explains it"
    return (
        f"{clean(item.email)}: stored {state_text(item.stored)}, subscriptions and override give "
        f"{state_text(item.expected)}; {why}"
    )


def _unix(seconds: int | None) -> str:
    return time_text(datetime.fromtimestamp(seconds, UTC)) if seconds else "-"
