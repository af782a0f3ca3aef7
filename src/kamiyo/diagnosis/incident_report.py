"""``kamiyo incident-report``: the runbook's "Document Failed Webhooks", from the database.

How many deliveries failed, over what time range, by reason and by event type; which events
arrived late because Stripe had to retry them; events parked, replayed and backfilled; users
whose state changed; manual overrides. Sources, all shared by every process:
``webhook_delivery_stats`` (per-minute counts: times are whole minutes), the inbox
(``webhook_events``), ``users.updated_at`` and the audit log's ``override.*`` entries.

How a user's tier and status moved comes from the ``outcome`` each applied event stored
(``domain/outcomes.py``). Events applied before that column existed have only their one-line
``detail``: they are counted apart and listed with that text as it is, never parsed.

A delivery rejected before its body was read (a bad signature) has no event type; the types
that failed show up instead as late arrivals, once Stripe's retry got through.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson
from sqlalchemy import Engine, func, select

from kamiyo.db.models import audit_log_table, events_table, users_table
from kamiyo.domain.outcomes import InboxStatus, Outcome
from kamiyo.errors import KamiyoError
from kamiyo.operations.inputs import parse_time as parse_time  # the CLI and tests import it from here
from kamiyo.scrub import clean
from kamiyo.telemetry.delivery_stats import delivery_rows, utc_seconds
from kamiyo.telemetry.metrics import PROBE_EVENT_PREFIX

# An event counts as late when Stripe created it this long before we stored it.
LATE_SECONDS = 60
# At most this many events applied before outcomes were recorded are listed (all are counted).
BEFORE_OUTCOMES_SHOWN = 100
_events = events_table
_users = users_table


def _iso(moment: datetime | float | None) -> str | None:
    if moment is None:
        return None
    if not isinstance(moment, datetime):
        moment = datetime.fromtimestamp(moment, UTC)
    if moment.tzinfo is None:  # SQLite returns naive datetimes; they were stored as UTC
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class Deliveries:
    attempts: int = 0
    accepted: int = 0
    duplicate: int = 0
    failed: int = 0
    failures_by_reason: dict[str, int] = field(default_factory=dict)
    failures_by_type: dict[str, int] = field(default_factory=dict)
    accepted_by_type: dict[str, int] = field(default_factory=dict)
    first_failure: str | None = None
    last_failure: str | None = None  # the end of the last minute with a failure
    failures_by_minute: list[tuple[str, int]] = field(default_factory=list)


@dataclass
class Transition:
    """One event's change of one user, from its stored outcome."""

    event_id: str
    type: str
    at: str | None  # when the event was applied
    tier_from: str
    status_from: str | None
    tier_to: str
    status_to: str | None
    why: str
    subscription: str | None  # the subscription the event carried, if any

    def text(self) -> str:
        return f"{self.tier_from}/{self.status_from} -> {self.tier_to}/{self.status_to}"


@dataclass
class UserChange:
    email: str
    tier: str  # now
    status: str | None
    changed_at: str | None  # users.updated_at: the last change, which may be after the range
    transitions: list[str]  # "tier/status -> tier/status", one per entry of ``changes``
    changes: list[Transition]  # the events of the range that changed this user, in order


@dataclass
class BeforeOutcome:
    """An event applied before outcomes were recorded: its detail text, as stored."""

    event_id: str
    type: str
    at: str | None
    detail: str | None


@dataclass
class IncidentReport:
    since: str
    until: str
    deliveries: Deliveries
    late_by_type: dict[str, int]
    parked: int
    parked_by_type: dict[str, int]
    parked_by_reason: dict[str, int]
    still_parked: int
    replayed: int
    replayed_by_type: dict[str, int]
    backfilled: int
    backfilled_by_source: dict[str, int]
    users_changed: list[UserChange]
    # Applied in the range before outcomes were recorded: how many, and the first of them.
    applied_before_outcomes: int
    before_outcomes: list[BeforeOutcome]
    manual_overrides: list[dict[str, str | None]]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def build_report(engine: Engine, since: datetime, until: datetime) -> IncidentReport:
    """Everything the post-mortem needs about [since, until), read in one go."""
    if until <= since:
        raise KamiyoError("--until must be after --since")
    # SQLite stores datetimes without their zone: compare in UTC, as they were written.
    since, until = since.astimezone(UTC), until.astimezone(UTC)
    start, end = since.timestamp(), until.timestamp()
    deliveries = _deliveries(engine, start, end)
    not_probe = ~_events.c.stripe_event_id.startswith(PROBE_EVENT_PREFIX)
    with engine.connect().execution_options(readonly=True) as connection:

        def grouped(column: Any, *where: Any) -> dict[str, int]:
            rows = connection.execute(select(column, func.count()).where(not_probe, *where).group_by(column)).all()
            return {str(key) if key is not None else "": int(n) for key, n in rows}

        # "late": received well after Stripe created it. Compared in Python: portable across databases.
        late_rows = connection.execute(
            select(_events.c.type, _events.c.created, _events.c.received_at).where(
                not_probe, _events.c.created >= int(start), _events.c.created < int(end), _events.c.source == "webhook"
            )
        ).all()
        late_by_type: dict[str, int] = {}
        for event_type, created, received in late_rows:
            if utc_seconds(received) - created > LATE_SECONDS:
                late_by_type[event_type] = late_by_type.get(event_type, 0) + 1

        in_window = (_events.c.processed_at >= since, _events.c.processed_at < until)
        parked_by_type = grouped(_events.c.type, _events.c.status == InboxStatus.FAILED, *in_window)
        parked_errors = connection.execute(
            select(_events.c.last_error, func.count())
            .where(not_probe, _events.c.status == InboxStatus.FAILED, *in_window)
            .group_by(_events.c.last_error)
        ).all()
        parked_by_reason: dict[str, int] = {}
        for error, n in parked_errors:
            reason = (error or "unknown").split(":", 1)[0]
            parked_by_reason[reason] = parked_by_reason.get(reason, 0) + int(n)
        still_parked = int(
            connection.execute(
                select(func.count()).select_from(_events).where(_events.c.status == InboxStatus.FAILED)
            ).scalar_one()
        )
        replayed_by_type = grouped(_events.c.type, _events.c.replayed_at >= since, _events.c.replayed_at < until)
        backfilled_by_source = grouped(
            _events.c.source,
            _events.c.source != "webhook",
            _events.c.received_at >= since,
            _events.c.received_at < until,
        )
        changes, before = _applied_in(connection, not_probe, *in_window)
        user_columns = select(
            _users.c.id, _users.c.email, _users.c.subscription_tier, _users.c.subscription_status, _users.c.updated_at
        )
        users = list(
            connection.execute(
                user_columns.where(_users.c.updated_at >= since, _users.c.updated_at < until).order_by(
                    _users.c.updated_at, _users.c.id
                )
            )
        )
        # A user the range's events changed, and who changed again after it, belongs to the range's story too.
        missing = sorted(set(changes) - {user.id for user in users})
        for chunk in range(0, len(missing), 500):
            users += connection.execute(user_columns.where(_users.c.id.in_(missing[chunk : chunk + 500])))

        audit = audit_log_table
        overrides = connection.execute(
            select(audit.c.at, audit.c.action, audit.c.actor, audit.c.target, audit.c.reason)
            .where(audit.c.action.like("override.%"), audit.c.at >= since, audit.c.at < until)
            .order_by(audit.c.at, audit.c.id)
        ).all()

    return IncidentReport(
        since=_iso(since) or "",
        until=_iso(until) or "",
        deliveries=deliveries,
        late_by_type=dict(sorted(late_by_type.items(), key=lambda kv: -kv[1])),
        parked=sum(parked_by_type.values()),
        parked_by_type=parked_by_type,
        parked_by_reason=parked_by_reason,
        still_parked=still_parked,
        replayed=sum(replayed_by_type.values()),
        replayed_by_type=replayed_by_type,
        backfilled=sum(backfilled_by_source.values()),
        backfilled_by_source=backfilled_by_source,
        users_changed=[
            UserChange(
                user.email,
                user.subscription_tier,
                user.subscription_status,
                _iso(user.updated_at),
                [change.text() for change in changes.get(user.id, [])],
                changes.get(user.id, []),
            )
            for user in users
        ],
        applied_before_outcomes=before[0],
        before_outcomes=before[1],
        manual_overrides=[
            {"at": _iso(at), "action": action, "by": actor, "user": target, "reason": reason}
            for at, action, actor, target, reason in overrides
        ],
    )


def _applied_in(connection: Any, *where: Any) -> tuple[dict[int, list[Transition]], tuple[int, list[BeforeOutcome]]]:
    """The user changes of the events applied in the range, by user id, in the order applied;
    and the events applied before outcomes were recorded: how many, and the first of them."""
    changes: dict[int, list[Transition]] = {}
    before: list[BeforeOutcome] = []
    before_count = 0
    rows = connection.execute(
        select(_events.c.stripe_event_id, _events.c.type, _events.c.processed_at, _events.c.outcome, _events.c.detail)
        .where(_events.c.status == InboxStatus.APPLIED, *where)
        .order_by(_events.c.processed_at, _events.c.id)
        .execution_options(yield_per=1000)  # a long range holds many events: read them a page at a time
    )
    for event_id, event_type, processed_at, stored, detail in rows:
        if stored is None:
            before_count += 1
            if len(before) < BEFORE_OUTCOMES_SHOWN:
                before.append(BeforeOutcome(event_id, event_type, _iso(processed_at), detail))
            continue
        outcome = Outcome.from_json(stored)
        subscription = outcome.subscription.id if outcome.subscription is not None else None
        for user in outcome.users:
            if user.user_id is None:  # only a dry run's outcome names a user not created yet; none is stored
                continue
            changes.setdefault(user.user_id, []).append(
                Transition(
                    event_id,
                    event_type,
                    _iso(processed_at),
                    user.tier_from,
                    user.status_from,
                    user.tier_to,
                    user.status_to,
                    user.why,
                    subscription,
                )
            )
    return changes, (before_count, before)


def _deliveries(engine: Engine, start: float, end: float) -> Deliveries:
    result = Deliveries()
    per_minute: dict[int, int] = {}
    for row in delivery_rows(engine, start, end):
        if row.minute < start - 59:  # a minute that began before --since only partly belongs to it
            continue
        result.attempts += row.count
        if row.outcome == "accepted":
            result.accepted += row.count
            result.accepted_by_type[row.event_type] = result.accepted_by_type.get(row.event_type, 0) + row.count
        elif row.outcome == "duplicate":
            result.duplicate += row.count
        else:
            result.failed += row.count
            result.failures_by_reason[row.reason] = result.failures_by_reason.get(row.reason, 0) + row.count
            key = row.event_type or "unknown (rejected before the body was read)"
            result.failures_by_type[key] = result.failures_by_type.get(key, 0) + row.count
            per_minute[row.minute] = per_minute.get(row.minute, 0) + row.count
    if per_minute:
        result.first_failure = _iso(float(min(per_minute)))
        result.last_failure = _iso(float(max(per_minute) + 60))
        result.failures_by_minute = [(_iso(float(m)) or "", n) for m, n in sorted(per_minute.items())]
    return result


def _table(counts: dict[str, int], header: str) -> list[str]:
    if not counts:
        return ["_none_", ""]
    lines = [f"| {header} | count |", "|---|---:|"]
    lines += [f"| {key or '-'} | {n} |" for key, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]
    return [*lines, ""]


def _cell(text: str) -> str:
    """``text`` as one Markdown table cell: scrubbed, control characters escaped, no column separator."""
    return clean(text).replace("|", "\\|")


def to_markdown(report: IncidentReport) -> str:
    d = report.deliveries
    ratio = f"{(d.accepted + d.duplicate) / d.attempts:.1%}" if d.attempts else "n/a"
    lines = [
        f"# Stripe webhook incident: {report.since} to {report.until}",
        "",
        "## Deliveries",
        "",
        f"- Attempts: {d.attempts} (accepted {d.accepted}, duplicate {d.duplicate}, failed {d.failed}); "
        f"success {ratio}",
    ]
    if d.first_failure:
        lines.append(f"- Failures from {d.first_failure} to {d.last_failure} (UTC, whole minutes)")
    else:
        lines.append("- No failed delivery in this range")
    lines += ["", "### Failures by reason", "", *_table(d.failures_by_reason, "reason")]
    lines += ["### Failures by event type", "", *_table(d.failures_by_type, "event type")]
    lines += [
        "### Events that arrived late (Stripe retried them after failures)",
        "",
        f"Created in the range and stored more than {LATE_SECONDS} s later.",
        "",
        *_table(report.late_by_type, "event type"),
    ]
    lines += ["### Accepted by event type", "", *_table(d.accepted_by_type, "event type")]
    lines += [
        "## Recovery",
        "",
        f"- Events parked as failed in the range: {report.parked} (still parked now: {report.still_parked})",
        f"- Events replayed in the range: {report.replayed}",
        f"- Events backfilled in the range: {report.backfilled}",
        "",
        "### Parked by reason",
        "",
        *_table(report.parked_by_reason, "reason"),
        "### Replayed by event type",
        "",
        *_table(report.replayed_by_type, "event type"),
        "### Backfilled by source",
        "",
        *_table(report.backfilled_by_source, "source"),
        "## Users whose state changed",
        "",
    ]
    if report.users_changed:
        lines += ["| user | now | changed at | changes in the range |", "|---|---|---|---|"]
        for user in report.users_changed:
            changes = "; ".join(f"{c.text()} by {c.event_id} ({c.why})" for c in user.changes) or "-"
            lines.append(f"| {_cell(user.email)} | {user.tier}/{user.status} | {user.changed_at} | {_cell(changes)} |")
        lines.append("")
    else:
        lines += ["_none_", ""]
    if report.applied_before_outcomes:
        shown = len(report.before_outcomes)
        lines += [
            f"{report.applied_before_outcomes} events applied before outcomes were recorded: their changes are "
            "not in the table above; their detail text as stored"
            + (f" (the first {shown})" if shown < report.applied_before_outcomes else "")
            + ":",
            "",
            "| applied at | event | type | detail |",
            "|---|---|---|---|",
        ]
        for event in report.before_outcomes:
            lines.append(f"| {event.at} | {_cell(event.event_id)} | {event.type} | {_cell(event.detail or '-')} |")
        lines.append("")
    lines += ["## Manual overrides", ""]
    if report.manual_overrides:
        lines += ["| at | action | user | by | reason |", "|---|---|---|---|---|"]
        for entry in report.manual_overrides:
            lines.append(f"| {entry['at']} | {entry['action']} | {entry['user']} | {entry['by']} | {entry['reason']} |")
    else:
        lines.append("_none recorded (`kamiyo users set-tier` records them; a direct `UPDATE users` is not recorded)_")
    lines.append("")
    return "\n".join(lines)


def to_json(report: IncidentReport) -> str:
    return orjson.dumps(report.to_json(), option=orjson.OPT_INDENT_2).decode()
