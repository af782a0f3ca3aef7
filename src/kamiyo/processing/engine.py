"""The apply engine: load, decide, flush. Every path that applies Stripe's state to users runs here.

- **load** (``load``): in four set-based statements, every row the batch can reach: the
  customers its events name (locked, in id order, on PostgreSQL), the users linked to them or
  named by an email or ``client_reference_id`` (locked, in id order), every other customer of
  those users, and every subscription of all those customers or named by the batch.
- **decide**: the pure rules of domain/rules.py, one event at a time on the loaded
  ``BatchState``; an event that fails has its changes undone and its neighbours keep theirs.
- **flush** (``flush``): what changed, a statement per kind of row: new users and customers
  (inserted, their real ids read back), subscription snapshots (the upsert whose WHERE keeps a
  stored snapshot of a greater version), changed customers and users.

All of it runs in the caller's transaction: the caller decides what commits together (the
worker: the claim, the effects and every event's outcome; sync: a page and the run's cursor).
A dry run loads without locks and does not flush.

Concurrency (PostgreSQL). A batch holds the locks of its customers and users from the load to
its commit; a writer of a user's subscriptions holds that user's lock from its own load, so what
a batch reads after taking its locks stays true until it commits. Rows another transaction may
insert at the same moment (a customer seen for the first time, a user created for an email) are
inserted with ``ON CONFLICT DO NOTHING ... RETURNING``: when one was inserted by someone else
meanwhile, the batch's view of it is stale and ``LostRace`` rolls the batch back, for the caller
to run it again, as after a deadlock.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection

from kamiyo.domain.entitlement import UserState
from kamiyo.domain.outcomes import CustomerOutcome, LinkResult, Outcome, UserChange
from kamiyo.domain.rules import RULES, StoredEvent, add_needs, link_customer, recompute_user, store_snapshot
from kamiyo.domain.state import BatchState, CustomerRow, Needs, StoredSubscription, UserRow
from kamiyo.domain.subscriptions import SubscriptionSnapshot, Version
from kamiyo.domain.tiers import TierMap
from kamiyo.errors import KamiyoError, UnmappedPrice
from kamiyo.processing.statements import keys_parameter, statements
from kamiyo.reconcile.reader import SyncItem
from kamiyo.scrub import scrub

log = logging.getLogger("kamiyo.state")
_MAX_ERROR = 2000


class LostRace(KamiyoError):
    """Another transaction inserted a row this batch was about to insert: its view is stale.
    Nothing was committed; run the batch again."""


@dataclass(frozen=True, slots=True)
class Applied:
    outcome: Outcome


@dataclass(frozen=True, slots=True)
class Failed:
    error: str
    parked: bool  # no retry can help (a price that maps to no tier): park it at once


Decision = Applied | Failed


# -- load ---------------------------------------------------------------------------------------


def load(connection: Connection, state: BatchState, needs: Needs, *, lock: bool) -> None:
    """Read into ``state`` what ``needs`` names and it does not hold yet (see the module's docstring).

    ``lock``: the batch will write. Its customers are then recorded first (inserted unless there:
    a customer named by an event always has a row), so that they exist to be locked, and
    concurrent batches that name the same new customer queue on its row instead of racing to
    insert it. Without ``lock`` (a dry run) nothing is written or locked."""
    name = connection.dialect.name
    sql = statements(name, locked=lock)
    missing = state.missing(needs)
    new_customers: list[str] = []
    if lock and missing.customers:
        sql.record_customers.execute(
            connection, [{"id": customer_id, "deleted": False} for customer_id in sorted(missing.customers)]
        )
    # Rows are read as tuples, by position (the statements' column order is the NamedTuples'):
    # a SQLAlchemy Row's attribute costs a look-up by name each time it is read.
    if missing.customers:
        keys = {"customer_ids": keys_parameter(name, sorted(missing.customers))}
        for customer in map(CustomerRow._make, connection.execute(sql.customers, keys)):
            state.loaded_customer(customer)
            new_customers.append(customer.id)
    linked = {c.user_id for c in map(state.customers.get, needs.customers) if c is not None and c.user_id is not None}
    user_ids = (linked | missing.user_ids) - state.users.keys()
    if user_ids or missing.emails:
        users = connection.execute(
            sql.users,
            {
                "user_ids": keys_parameter(name, sorted(user_ids)),
                "emails": keys_parameter(name, sorted(missing.emails)),
            },
        )
        fresh = [user for user in map(UserRow._make, users) if user.id not in state.users]
        if fresh:
            params = {"user_ids": keys_parameter(name, [user.id for user in fresh])}
            owned: dict[int | None, list[str]] = defaultdict(list)
            for customer in map(CustomerRow._make, connection.execute(sql.customers_of_users, params)):
                if customer.id not in state.customers:
                    state.loaded_customer(customer)
                    new_customers.append(customer.id)
                if state.customers[customer.id].user_id == customer.user_id:
                    owned[customer.user_id].append(customer.id)
            for user in fresh:
                state.loaded_user(user, owned.get(user.id, ()))
    if new_customers or missing.subscriptions:
        params = {
            "subscription_ids": keys_parameter(name, sorted(missing.subscriptions)),
            "customer_ids": keys_parameter(name, new_customers),
        }
        for sub_id, customer, status, tier, created, *version in connection.execute(sql.subscriptions, params):
            state.loaded_subscription(StoredSubscription(sub_id, customer, status, tier, created, Version(*version)))


# -- flush --------------------------------------------------------------------------------------


def subscription_row(snap: SubscriptionSnapshot, now: datetime) -> dict[str, Any]:
    """The ``stripe_subscriptions`` row of a snapshot."""
    return {
        "id": snap.id,
        "customer_id": snap.customer_id,
        "status": snap.status,
        "tier": snap.tier,
        "price_ids": ",".join(snap.price_ids)[:2048],
        "livemode": snap.livemode,
        "stripe_created": snap.stripe_created,
        "current_period_end": snap.current_period_end,
        "cancel_at_period_end": snap.cancel_at_period_end,
        "cancel_at": snap.cancel_at,
        "canceled_at": snap.canceled_at,
        "ended_at": snap.ended_at,
        "trial_end": snap.trial_end,
        "version_terminal": snap.version.terminal,
        "version_created": snap.version.created,
        "version_rank": snap.version.rank,
        "version_event_id": snap.version.event_id,
        "updated_at": now,
    }


def flush(connection: Connection, state: BatchState) -> dict[int, int]:
    """Write what the batch changed; return the real id of each user it created (by provisional id)."""
    sql = statements(connection.dialect.name, locked=True)
    now = state.now
    created: dict[int, int] = {}
    rows: list[dict[str, Any]]
    if state.new_users:
        new = [state.users[user_id] for user_id in state.new_users]
        rows = [
            {
                "email": user.email,
                "subscription_tier": user.tier,
                "subscription_status": user.status,
                "stripe_customer_id": user.stripe_customer_id,
                "updated_at": now,
            }
            for user in new
        ]
        inserted = {email: user_id for user_id, email in sql.insert_users.execute(connection, rows)}
        if len(inserted) != len(rows):
            raise LostRace("a user this batch creates was created by another transaction meanwhile")
        created = {user.id: inserted[user.email] for user in new}

    def real(user_id: int | None) -> int | None:
        return created.get(user_id, user_id) if user_id is not None else None

    if state.new_customers:
        customers = [state.customers[customer_id] for customer_id in state.new_customers]
        rows = [
            {
                "id": c.id,
                "user_id": real(c.user_id),
                "email": c.email,
                "email_seen_at": c.email_seen_at,
                "linked_by": c.linked_by,
                "deleted": False,
            }
            for c in customers
        ]
        if len(sql.insert_customers.execute(connection, rows)) != len(rows):
            raise LostRace("a customer this batch records was recorded by another transaction meanwhile")
    if state.snapshots:
        sql.upsert_subscriptions.execute(connection, [subscription_row(s, now) for s in state.snapshots.values()])
    if state.changed_customers:
        changed = [state.customers[customer_id] for customer_id in state.changed_customers]
        sql.update_customers.execute(
            connection,
            [
                {
                    "b_id": c.id,
                    "b_user_id": real(c.user_id),
                    "b_email": c.email,
                    "b_email_seen_at": c.email_seen_at,
                    "b_linked_by": c.linked_by,
                }
                for c in changed
            ],
        )
    states = [state.users[user_id] for user_id in state.changed_users if user_id in state.state_changed]
    pointers = [state.users[user_id] for user_id in state.changed_users if user_id not in state.state_changed]
    if states:
        sql.update_user_states.execute(
            connection,
            [
                {"b_id": u.id, "b_tier": u.tier, "b_status": u.status, "b_customer": u.stripe_customer_id, "b_at": now}
                for u in states
            ],
        )
    if pointers:
        sql.update_user_customers.execute(
            connection, [{"b_id": u.id, "b_customer": u.stripe_customer_id} for u in pointers]
        )
    return created


def resolved(outcome: Outcome, created: dict[int, int]) -> Outcome:
    """``outcome`` with real user ids for the users the batch created; a dry run, which creates
    none, says "a new user" (None)."""
    customer = outcome.customer
    provisional_customer = customer is not None and customer.user_id is not None and customer.user_id < 0
    if not provisional_customer and all(c.user_id is None or c.user_id >= 0 for c in outcome.users):
        return outcome
    if customer is not None and provisional_customer:
        user_id = created.get(customer.user_id) if customer.user_id is not None else None
        customer = CustomerOutcome(customer.id, customer.link, user_id, customer.linked_by)
    users = tuple(
        UserChange(created.get(c.user_id), c.email, c.tier_from, c.tier_to, c.status_from, c.status_to, c.why)
        if c.user_id is not None and c.user_id < 0
        else c
        for c in outcome.users
    )
    return Outcome(outcome.subscription, outcome.invoice, customer, users, outcome.note)


# -- what callers run -----------------------------------------------------------------------------


def apply_events(
    connection: Connection,
    state: BatchState,
    events: Sequence[StoredEvent],
    *,
    lock: bool,
    write: bool = True,
) -> list[Decision]:
    """Apply ``events`` (of handled types) in order: load, decide each, flush (unless ``write`` is
    False: a dry run, whose ``state`` then carries on to the next events)."""
    needs = Needs()
    for event in events:
        add_needs(needs, event)
    load(connection, state, needs, lock=lock)
    decisions: list[Decision] = []
    for event in events:
        state.begin_item()
        try:
            outcome = RULES[event.type](state, event)
        except Exception as exc:  # noqa: BLE001 - a rule failing on an event's data fails that event alone
            state.undo_item()
            decisions.append(Failed(error_text(exc), parked=isinstance(exc, UnmappedPrice)))
        else:
            state.end_item()
            decisions.append(Applied(outcome))
    if not write:
        return [Applied(resolved(d.outcome, {})) if isinstance(d, Applied) else d for d in decisions]
    created = flush(connection, state)
    if not created:  # no user created: no provisional id to resolve
        return decisions
    return [Applied(resolved(d.outcome, created)) if isinstance(d, Applied) else d for d in decisions]


def error_text(exc: BaseException) -> str:
    """An event's error as stored and logged: ``Class: message``, credentials scrubbed."""
    return scrub(f"{exc.__class__.__name__}: {exc}")[:_MAX_ERROR]


def recompute_users(
    connection: Connection,
    tiers: TierMap,
    user_ids: Iterable[int],
    *,
    why: str,
    reset_when_none: bool = False,
) -> list[UserChange]:
    """Bring these users' tier and status in line with their subscriptions and override (after an
    override was set, cleared or expired), in the caller's transaction."""
    wanted = sorted(set(user_ids))
    state = BatchState(tiers, datetime.now(UTC))
    load(connection, state, Needs(user_ids=set(wanted)), lock=True)
    changes = [
        change
        for user_id in wanted
        if user_id in state.users
        for change in [recompute_user(state, user_id, why=why, reset_when_none=reset_when_none)]
        if change is not None
    ]
    flush(connection, state)
    for line in state_log_lines(Outcome(users=tuple(changes))):
        log.info(*line)
    return changes


def link_customer_now(
    connection: Connection, tiers: TierMap, customer_id: str, email: str, seen_at: int
) -> CustomerOutcome:
    """Link a customer by an email read from Stripe's API (``STRIPE_VERIFY_EVENTS``), in the
    caller's transaction, as an event naming that email would."""
    state = BatchState(tiers, datetime.now(UTC))
    load(connection, state, Needs(customers={customer_id}, emails={email}), lock=True)
    customer, users = link_customer(state, customer_id, email, None, seen_at)
    outcome = resolved(Outcome(customer=customer, users=users), flush(connection, state))
    for line in state_log_lines(outcome):
        log.info(*line)
    assert outcome.customer is not None
    return outcome.customer


def state_log_lines(outcome: Outcome) -> list[tuple[str, dict[str, Any]]]:
    """The log lines of what an outcome changed (a customer linked, each user's state changed),
    each a format and its fields (``LOG_FORMAT=json`` writes the fields as keys)."""
    lines: list[tuple[str, dict[str, Any]]] = []
    customer = outcome.customer
    if customer is not None and customer.link is LinkResult.LINKED:
        lines.append(
            (
                "customer linked customer=%(customer)s user_id=%(user_id)s by=%(by)s",
                {"customer": customer.id, "user_id": customer.user_id, "by": customer.linked_by},
            )
        )
    for change in outcome.users:
        lines.append(
            (
                "user state changed user_id=%(user_id)s email=%(email)s"
                " tier=%(tier_from)s->%(tier_to)s status=%(status_from)s->%(status_to)s",
                {
                    "user_id": change.user_id,
                    "email": change.email,
                    "from": f"{change.tier_from}/{change.status_from}",
                    "to": f"{change.tier_to}/{change.status_to}",
                    "tier_from": change.tier_from,
                    "tier_to": change.tier_to,
                    "status_from": change.status_from,
                    "status_to": change.status_to,
                    "reason": change.why,
                },
            )
        )
    return lines


# -- sync's pages ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class UserDrift:
    """A user whose tier or status a page changed, and why."""

    user_id: int
    email: str
    before: UserState
    after: UserState
    reasons: tuple[str, ...]


@dataclass
class PageResult:
    stored: int = 0  # snapshots written (new, or newer than the stored one)
    kept: int = 0  # snapshots older than the stored one: left as is
    linked: int = 0  # customers linked to a user by email
    drift: list[UserDrift] = field(default_factory=list)


UNEXPLAINED = "the users row disagreed with the subscriptions stored for it (a manual edit, or a missed event)"


def apply_sync_page(connection: Connection, tiers: TierMap, items: Sequence[SyncItem], *, seen_at: int) -> PageResult:
    """Apply a page of subscriptions read from Stripe's API (``seen_at``: when, by Stripe's clock)
    in the open transaction: each snapshot stored by the rules of the webhook path, each customer
    seen with an email linked as an event naming it would be, and every user of the page's
    customers brought in line with their subscriptions; the users that changed are its drift."""
    result = PageResult()
    if not items:
        return result
    state = BatchState(tiers, datetime.now(UTC))
    # One snapshot per subscription id (a list page never repeats one; a caller's list might).
    unique = sorted({item.snapshot.id: item for item in reversed(items)}.values(), key=_page_order)
    emails = {item.snapshot.customer_id: item.email for item in unique if item.email}
    needs = Needs(
        customers={item.snapshot.customer_id for item in unique},
        subscriptions={item.snapshot.id for item in unique},
        emails=set(emails.values()),
    )
    load(connection, state, needs, lock=True)
    before = {user.id: UserState(user.tier, user.status) for user in state.users.values()}
    reasons: dict[str, list[str]] = defaultdict(list)
    for item in unique:
        snap = item.snapshot
        old = state.subscriptions.get(snap.id)
        if not store_snapshot(state, snap):
            result.kept += 1
            continue
        result.stored += 1
        if old is None:
            reasons[snap.customer_id].append(f"{snap.id} was missing here; Stripe has it {snap.status} ({snap.tier})")
        elif (old.status, old.tier) != (snap.status, snap.tier):
            reasons[snap.customer_id].append(
                f"{snap.id} was {old.status} ({old.tier}) here; Stripe has it {snap.status} ({snap.tier})"
            )
    for customer_id, email in sorted(emails.items()):
        customer, _ = link_customer(state, customer_id, email, None, seen_at)
        if customer.link is LinkResult.LINKED:
            result.linked += 1
            reasons[customer_id].append(f"customer {customer_id} linked by email")
    customers_of: dict[int, list[str]] = defaultdict(list)
    for customer_id in sorted(needs.customers):
        user_id = state.customers[customer_id].user_id
        if user_id is not None:
            customers_of[user_id].append(customer_id)
    for user_id, customer_ids in customers_of.items():
        recompute_user(
            state, user_id, why="; ".join(r for c in customer_ids for r in reasons.get(c, ())) or UNEXPLAINED
        )
    created = flush(connection, state)
    for user_id, customer_ids in sorted(customers_of.items(), key=lambda pair: created.get(pair[0], pair[0])):
        user = state.users[user_id]
        after = UserState(user.tier, user.status)
        was = before.get(user_id, UserState("free", None))
        if after == was:
            continue
        why = tuple(reason for customer_id in customer_ids for reason in reasons.get(customer_id, ()))
        overridden = user.override_tier is not None
        if overridden:
            why = (*why, "manual override")
        real_id = created.get(user_id, user_id)
        result.drift.append(UserDrift(real_id, user.email, was, after, why or (UNEXPLAINED,)))
        log.debug(
            "user state changed user_id=%s email=%s tier=%s->%s status=%s->%s",
            real_id,
            user.email,
            was.tier,
            after.tier,
            was.status,
            after.status,
        )
    return result


def _page_order(item: SyncItem) -> tuple[str, str]:
    return item.snapshot.customer_id, item.snapshot.id
