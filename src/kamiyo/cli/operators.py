"""What ``kamiyo users``, ``kamiyo audit``, ``kamiyo replay`` and ``kamiyo prune`` do. Imported lazily by main.

Thin: parse times and numbers with bounds (a bad one is a usage error, exit 2), call
``kamiyo.operations``, print. Every string that comes from the database is printed through
``kamiyo.scrub.clean`` (credentials redacted, control characters shown as escapes: nothing
stored can drive the terminal); ``--json`` prints the same dataclasses the admin API serves,
scrubbed, with every non-printable character as a JSON escape.

The audit log's actor is the OS user running the command (shell access is the credential);
``--by``, when it names someone else, is recorded beside it as a claim.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson

from kamiyo.cli.confirm import confirm
from kamiyo.config import MIN_INBOX_RETENTION_DAYS, Settings
from kamiyo.db.engine import make_engine
from kamiyo.errors import KamiyoError
from kamiyo.operations.audit import AuditEntry, cli_actor, list_audit
from kamiyo.operations.inputs import expiry_time, parse_duration, parse_time
from kamiyo.operations.overrides import clear_override, set_override
from kamiyo.operations.prune import (
    FAILED,
    MIN_FAILED_AGE,
    RETAINED,
    Prunable,
    PruneScope,
    prunable,
    prune_by_hand,
)
from kamiyo.operations.replay import ReplayResult, count_selected, replay_events
from kamiyo.operations.users import DriftView, StateView, UserReport, drift, show_user
from kamiyo.scrub import clean, scrub

__all__ = ["dispatch", "expiry_time"]
MAX_AUDIT = 100_000
MAX_EVENTS = 1000


class _UsageError(KamiyoError):
    """An argument out of its bounds: exit 2, as argparse does for its own."""


def dispatch(args: argparse.Namespace, settings: Settings) -> int:
    try:
        return _dispatch(args, settings)
    except _UsageError as exc:
        print(f"kamiyo {args.command}: error: {exc}", file=sys.stderr)
        return 2


def _dispatch(args: argparse.Namespace, settings: Settings) -> int:
    if args.command == "replay":
        return replay(settings, args)
    if args.command == "prune":
        return prune(settings, args)
    if args.command == "audit":
        return audit(settings, since=args.since, target=args.target, limit=args.limit, as_json=args.json)
    if args.users_command == "set-tier":
        return users_set_tier(settings, args)
    if args.users_command == "clear-override":
        return users_clear_override(settings, args)
    if args.users_command == "show":
        return users_show(settings, args.email, events=args.events, as_json=args.json)
    return users_drift(settings, show_all=args.all, as_json=args.json)


def _argument(read: Any, *args: Any, **kwargs: Any) -> Any:
    """``read(*args)``, its refusal a usage error."""
    try:
        return read(*args, **kwargs)
    except KamiyoError as exc:
        raise _UsageError(str(exc)) from None


def _bounded(value: int | None, name: str, high: int) -> int | None:
    if value is not None and not 1 <= value <= high:
        raise _UsageError(f"{name} must be a whole number from 1 to {high}")
    return value


# -- users ---------------------------------------------------------------------------------------


def users_set_tier(settings: Settings, args: argparse.Namespace) -> int:
    expires = _argument(expiry_time, args.expires, now=datetime.now(UTC)) if args.expires else None
    actor, claimed = cli_actor(args.by)
    engine = make_engine(settings)
    try:
        report = set_override(
            engine,
            email=args.email,
            tier=args.tier,
            reason=args.reason,
            expires_at=expires,
            actor=actor,
            tiers=settings.price_tiers,
            claimed_by=claimed,
        )
    finally:
        engine.dispose()
    return _print_user(report, args.json)


def users_clear_override(settings: Settings, args: argparse.Namespace) -> int:
    actor, claimed = cli_actor(args.by)
    engine = make_engine(settings)
    try:
        report = clear_override(
            engine,
            email=args.email,
            actor=actor,
            reason=args.reason,
            tiers=settings.price_tiers,
            claimed_by=claimed,
        )
    finally:
        engine.dispose()
    return _print_user(report, args.json)


def users_show(settings: Settings, email: str, *, events: int, as_json: bool) -> int:
    _bounded(events, "--events", MAX_EVENTS)
    engine = make_engine(settings)
    try:
        with engine.connect().execution_options(readonly=True) as connection:
            report = show_user(connection, email, tiers=settings.price_tiers, events=events)
    finally:
        engine.dispose()
    if report is None:
        raise KamiyoError(f"no user {clean(email.strip().lower())}")
    return _print_user(report, as_json)


def users_drift(settings: Settings, *, show_all: bool, as_json: bool) -> int:
    """Exit 1 when some user's stored tier is unexplained, so that it can run from cron or CI."""
    engine = make_engine(settings)
    try:
        with engine.connect().execution_options(readonly=True) as connection:
            found = drift(connection, tiers=settings.price_tiers)
    finally:
        engine.dispose()
    unexplained = [d for d in found if d.explained_by is None]
    shown = found if show_all else unexplained
    if as_json:
        _print_json(shown)
    else:
        if not shown:
            print("no unexplained drift: every user's stored tier is what subscriptions and overrides give")
        for item in shown:
            print(_drift_line(item))
        if unexplained:
            print(
                f"{len(unexplained)} user(s) with unexplained drift (a direct UPDATE users?): make it an audited "
                "override with `kamiyo users set-tier`, or return them to Stripe's state with "
                "`kamiyo users clear-override`"
            )
    return 1 if unexplained else 0


def _print_user(report: UserReport, as_json: bool) -> int:
    if as_json:
        _print_json(report)
        return 0
    print(f"user {clean(report.email)} (id {report.user_id})")
    print(f"  stored    {_state(StateView(report.tier, report.status)):<24} what the application reads")
    print(f"  expected  {_state(report.expected):<24} what subscriptions and override give")
    stripe = _state(report.stripe_state) if report.stripe_state else "no subscriptions"
    print(f"  stripe    {stripe:<24} what the subscriptions alone give")
    if report.override:
        o = report.override
        until = f"until {_time(o.expires_at)}" if o.expires_at else "until cleared"
        print(f"  override  {clean(o.tier)} {until}, set by {clean(o.set_by)} at {_time(o.set_at)}: {clean(o.reason)}")
    else:
        print("  override  none")
    if report.drift:
        print(f"  drift     {_drift_line(report.drift)}")
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
        outcome = event.error if event.status in ("failed", "pending") and event.error else event.detail or ""
        print(
            f"  {_time(event.received_at)}  {clean(event.status):<8} {clean(event.type):<36} "
            f"{clean(event.event_id)}  {clean(outcome[:160])}"
        )
    print("manual actions, newest first:" if report.audit else "manual actions: none")
    for entry in report.audit:
        print(f"  {_audit_line(entry)}")
    return 0


# -- audit ---------------------------------------------------------------------------------------


def audit(settings: Settings, *, since: str | None, target: str | None, limit: int, as_json: bool) -> int:
    moment = _argument(parse_time, since, now=datetime.now(UTC)) if since else None
    _bounded(limit, "--limit", MAX_AUDIT)
    engine = make_engine(settings)
    try:
        with engine.connect().execution_options(readonly=True) as connection:
            entries = list_audit(connection, since=moment, limit=limit, target=target)
    finally:
        engine.dispose()
    if as_json:
        _print_json(entries)
        return 0
    if not entries:
        print("no manual actions recorded" + (f" since {_time(moment)}" if moment else ""))
    for entry in entries:
        print(_audit_line(entry))
        print(f"    before: {clean(_compact(entry.before))}")
        print(f"    after:  {clean(_compact(entry.after))}")
    return 0


# -- replay --------------------------------------------------------------------------------------


def replay(settings: Settings, args: argparse.Namespace) -> int:
    """Exit 1 when an applied replay leaves an event failing (a dry run always exits 0).

    A replay of a selection (not one event by id) that applies asks first (cli/confirm.py)."""
    since = _argument(parse_time, args.since, now=datetime.now(UTC)) if args.since else None
    _bounded(args.limit, "--limit", settings.replay_max_limit)
    actor, claimed = cli_actor(args.by)
    selection = {"failed": args.failed, "event_type": args.event_type, "since": since, "after": args.after}
    limit = 1 if args.event_id else (args.limit or settings.replay_default_limit)
    engine = make_engine(settings)
    try:
        if args.event_id is None and not args.dry_run:
            total = count_selected(engine, **selection)
            if total:
                more = f" (the oldest {limit:,} of {total:,})" if total > limit else ""
                confirm(
                    f"replay {min(total, limit):,} event(s){more} selected by {_selection(args)}, applying them now "
                    "with this process's configuration",
                    yes=args.yes,
                )
        results = replay_events(
            engine,
            event_id=args.event_id,
            dry_run=args.dry_run,
            actor=actor,
            reason=args.reason,
            settings=settings,
            limit=None if args.event_id else limit,
            claimed_by=claimed,
            **selection,
        )
        left = 0
        if args.event_id is None and results and len(results) == limit:
            left = count_selected(engine, **{**selection, "after": results[-1].event_id})
    finally:
        engine.dispose()
    if args.json:
        _print_json(results)
    else:
        for result in results:
            print(_replay_line(result))
        print(_replay_summary(results, dry_run=args.dry_run))
        if left:
            print(f"{left:,} more event(s) selected: continue with --after {clean(results[-1].event_id)}")
    failing = [r for r in results if r.status_after in ("failed", "pending")]
    return 1 if failing and not args.dry_run else 0


def _selection(args: argparse.Namespace) -> str:
    parts = ["--failed"] if args.failed else []
    parts += [f"--type {args.event_type}"] if args.event_type else []
    parts += [f"--since {args.since}"] if args.since else []
    parts += [f"--after {args.after}"] if args.after else []
    return clean(" ".join(parts)) or "nothing"


def _replay_line(result: ReplayResult) -> str:
    line = clean(f"{result.event_id}  {result.type}  {result.status_before} -> {result.status_after}")
    if result.error:
        line += f"  error: {clean(result.error[:200])}"
    elif result.detail:
        line += f"  {clean(result.detail[:200])}"
    for change in result.changes:
        line += f"\n    user {clean(change.email)}: {_state(change.before)} -> {_state(change.after)}"
    return line


def _replay_summary(results: Sequence[ReplayResult], *, dry_run: bool) -> str:
    counts: dict[str, int] = {}
    for result in results:
        counts[result.status_after] = counts.get(result.status_after, 0) + 1
    names = {"pending": "failed (the worker retries)"}
    detail = ", ".join(f"{n} {names.get(status, status)}" for status, n in sorted(counts.items()))
    if dry_run:
        return f"dry run: {len(results)} event(s) would be replayed{': ' + detail if detail else ''}; nothing changed"
    return f"{len(results)} event(s) replayed{': ' + detail if detail else ''}"


# -- prune ---------------------------------------------------------------------------------------


def prune(settings: Settings, args: argparse.Namespace) -> int:
    """``kamiyo prune``: applied and ignored events past the retention, or ``--failed`` parked ones."""
    now = datetime.now(UTC)
    if args.failed:
        if not args.older_than:
            raise _UsageError("--failed needs --older-than (e.g. --older-than 30d): parked failures are evidence")
        scope = PruneScope(FAILED, now - _age(args.older_than, least=MIN_FAILED_AGE))
    else:
        least = timedelta(days=MIN_INBOX_RETENTION_DAYS)
        age = _age(args.older_than, least=least) if args.older_than else timedelta(days=settings.inbox_retention_days)
        scope = PruneScope(RETAINED, now - age)
    actor, claimed = cli_actor(args.by)
    engine = make_engine(settings)
    try:
        found = prunable(engine, scope)
        print(_prunable_line(found, scope, dry_run=args.dry_run))
        if args.dry_run or not found.count:
            return 0
        confirm(f"delete {found.count:,} {scope.label()}", yes=args.yes)
        summary = prune_by_hand(
            engine, scope, dry_run=False, actor=actor, reason=args.reason, found=found, claimed_by=claimed
        )
    finally:
        engine.dispose()
    kinds = ", ".join(f"{n:,} {status}" for status, n in sorted(summary.by_status.items()))
    print(f"deleted {summary.pruned:,} event(s){': ' + kinds if kinds else ''}; recorded in the audit log")
    return 0


def _age(text: str, *, least: timedelta) -> timedelta:
    """``--older-than``: 36h, 30d, 12w (operations/inputs.py's durations), at least ``least``."""
    age: timedelta = _argument(parse_duration, text)
    if age < least:
        raise _UsageError(f"--older-than {clean(text.strip())} is less than the {least.days} day(s) this prune allows")
    return age


def _prunable_line(found: Prunable, scope: PruneScope, *, dry_run: bool) -> str:
    if not found.count:
        return f"nothing to prune: no {scope.label()}"
    kinds = ", ".join(f"{n:,} {status}" for status, n in sorted(found.by_status.items()))
    span = f", received {_time(found.oldest)} .. {_time(found.newest)}"
    verb = "would delete" if dry_run else "found"
    return f"{verb} {found.count:,} {scope.label()} ({kinds}{span})" + ("; nothing changed" if dry_run else "")


# -- formatting ----------------------------------------------------------------------------------


def _print_json(value: Any) -> None:
    print(json_text(value))


def json_text(value: Any) -> str:
    """``value`` as indented JSON for a terminal: every string scrubbed, every non-printable escaped."""
    plain = orjson.loads(orjson.dumps(value, option=orjson.OPT_UTC_Z | orjson.OPT_NON_STR_KEYS))
    text = orjson.dumps(_scrubbed(plain), option=orjson.OPT_INDENT_2).decode()
    # orjson escapes C0 controls; DEL, C1, U+2028 and other non-printables become \uXXXX here (only
    # strings can hold them: the rest of the JSON text is ASCII).
    return "".join(c if c.isprintable() or c == "\n" else _json_escape(c) for c in text)


def _json_escape(char: str) -> str:
    code = ord(char)
    if code < 0x10000:
        return f"\\u{code:04x}"
    code -= 0x10000
    return f"\\u{0xD800 + (code >> 10):04x}\\u{0xDC00 + (code & 0x3FF):04x}"


def _scrubbed(value: Any) -> Any:
    if isinstance(value, str):
        return scrub(value)
    if isinstance(value, dict):
        return {scrub(str(k)): _scrubbed(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_scrubbed(v) for v in value]
    return value


def _state(state: StateView) -> str:
    return clean(f"{state.tier}/{state.status or '-'}")


def _time(moment: datetime | None) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ") if moment else "-"


def _unix(seconds: int | None) -> str:
    return _time(datetime.fromtimestamp(seconds, UTC)) if seconds else "-"


def _drift_line(item: DriftView) -> str:
    why = f"explained by audit entry #{item.explained_by}" if item.explained_by else "no audit entry explains it"
    return (
        f"{clean(item.email)}: stored {_state(item.stored)}, subscriptions and override give "
        f"{_state(item.expected)}; {why}"
    )


def _audit_line(entry: AuditEntry) -> str:
    reason = f": {entry.reason}" if entry.reason else ""
    claim = f" (claims to be {entry.claimed_by})" if entry.claimed_by else ""
    return clean(
        f"#{entry.id} {_time(entry.at)}  {entry.action:<16} by {entry.actor}{claim}  on {entry.target or '-'}{reason}"
    )


def _compact(value: dict[str, Any] | None) -> str:
    return orjson.dumps(value).decode() if value is not None else "-"
