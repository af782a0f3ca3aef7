"""The rules that apply Stripe's events to users, written once. Pure: a ``BatchState`` in, an
``Outcome`` out, no I/O.

Every path that changes a user's tier goes through these functions: the worker's batches, replay
and its dry run, sync's pages, backfill (through the inbox), the verified look-ups of
``STRIPE_VERIFY_EVENTS`` and the recomputes of a manual override. The engine
(processing/engine.py) loads the rows, calls them, and writes what they changed.

- A subscription snapshot is stored unless the stored one has a greater version
  (domain/subscriptions.py: a last-writer-wins register, insensitive to order and repetition).
- A customer is linked to a user by the first email an event names for it (the user is matched
  by email, or created); ``client_reference_id`` (our own user) moves it. A user whose customer
  moved away is recomputed, and goes back to free when nothing is left.
- A user's tier and status follow all the subscriptions of all their customers
  (domain/entitlement.py), unless a manual override is in force.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from kamiyo.domain.entitlement import SubscriptionState, UserState, user_state
from kamiyo.domain.links import invoice_subscription_id, link_hint, normalize_email
from kamiyo.domain.outcomes import CustomerOutcome, InvoiceOutcome, LinkResult, Outcome, SubscriptionOutcome, UserChange
from kamiyo.domain.overrides import override_in_force, override_state
from kamiyo.domain.state import BatchState, CustomerRow, Needs, UserRow
from kamiyo.domain.subscriptions import SubscriptionSnapshot, object_id, read_subscription
from kamiyo.domain.tiers import FREE


@dataclass(frozen=True, slots=True)
class StoredEvent:
    """An inbox row with its payload parsed."""

    inbox_id: int
    event_id: str
    type: str
    created: int
    obj: Mapping[str, Any]


Rule = Callable[[BatchState, StoredEvent], Outcome]


# -- the building blocks ------------------------------------------------------------------------


def customer_row(state: BatchState, customer_id: str) -> CustomerRow:
    """The customer, created (unlinked) when the database has none."""
    found = state.customers.get(customer_id)
    return found if found is not None else state.new_customer(customer_id)


def store_snapshot(state: BatchState, snap: SubscriptionSnapshot) -> bool:
    """Keep ``snap`` unless the stored snapshot is newer; True when kept."""
    customer_row(state, snap.customer_id)
    stored = state.subscriptions.get(snap.id)
    if stored is not None and stored.version >= snap.version:
        return False
    state.put_snapshot(snap)
    return True


def recompute_user(state: BatchState, user_id: int, *, why: str, reset_when_none: bool = False) -> UserChange | None:
    """Derive the user's tier and status; change it when it differs. A manual override in force
    wins. A user with no subscriptions is left as is (nothing known contradicts it), unless
    ``reset_when_none``: their subscriptions just went to another user, or their override ended."""
    user = state.users[user_id]
    after: UserState | None
    if user.override_tier is not None and override_in_force(user.override_expires, state.now):
        after = override_state(user.override_tier)
        why = "manual override"
    else:
        subscriptions = state.subscriptions_of_user(user_id)
        after = user_state(
            (SubscriptionState(s.id, s.status, s.tier, s.stripe_created) for s in subscriptions), state.tiers
        )
        if after is None and reset_when_none:
            after = UserState(tier=FREE, status=None)
    if after is None or (after.tier, after.status) == (user.tier, user.status):
        return None
    changed = UserRow(
        user.id,
        user.email,
        after.tier,
        after.status,
        user.stripe_customer_id,
        user.override_tier,
        user.override_expires,
    )
    state.put_user(changed, state_changed=True)
    return UserChange(user_id, user.email, user.tier, after.tier, user.status, after.status, why)


def link_customer(
    state: BatchState, customer_id: str, email: str | None, user_ref: str | None, seen_at: int
) -> tuple[CustomerOutcome, tuple[UserChange, ...]]:
    """Record what an event says of a customer, and link it to a user: the first email seen for
    an unlinked customer links it (matching or creating the user); a linked customer stays
    linked, except that ``user_ref`` (``client_reference_id``: our own user) moves it."""
    customer = customer_row(state, customer_id)
    if email and seen_at >= customer.email_seen_at and email != customer.email:
        customer = CustomerRow(customer.id, customer.user_id, email, seen_at, customer.linked_by)
        state.put_customer(customer)
    linked = customer.user_id
    target: int | None = None
    how = ""
    if user_ref is not None:
        target = _user_by_ref(state, user_ref)
        how = "client_reference_id"
    if target is None and linked is None and email:
        target = _user_for_email(state, email)
        how = "email"
    if target is None or target == linked:
        link = LinkResult.ALREADY_LINKED if linked is not None else LinkResult.NOT_LINKED
        return CustomerOutcome(customer_id, link, user_id=linked), ()

    state.put_customer(CustomerRow(customer.id, target, customer.email, customer.email_seen_at, how))
    user = state.users[target]
    if user.stripe_customer_id != customer_id:
        state.put_user(_with_customer(user, customer_id))
    changes: list[UserChange] = []
    if linked is not None:
        previous = state.users[linked]
        if previous.stripe_customer_id == customer_id:
            state.put_user(_with_customer(previous, None))
        moved = recompute_user(
            state, linked, why=f"customer {customer_id} linked to another user", reset_when_none=True
        )
        changes.extend([moved] if moved is not None else [])
    change = recompute_user(state, target, why=f"customer {customer_id} linked by {how}")
    changes.extend([change] if change is not None else [])
    return CustomerOutcome(customer_id, LinkResult.LINKED, user_id=target, linked_by=how), tuple(changes)


def _with_customer(user: UserRow, customer_id: str | None) -> UserRow:
    """``user`` pointing at ``customer_id`` (a NamedTuple's ``_replace`` costs several times as much)."""
    return UserRow(user.id, user.email, user.tier, user.status, customer_id, user.override_tier, user.override_expires)


def _ref_id(ref: str) -> int | None:
    """A ``client_reference_id`` read as our user's id, when it is one."""
    return int(ref) if ref.isdigit() and len(ref) < 19 else None


def _user_by_ref(state: BatchState, ref: str) -> int | None:
    user_id = _ref_id(ref)
    if user_id is not None and user_id in state.users:
        return user_id
    email = normalize_email(ref)
    return state.user_by_email.get(email) if email is not None else None


def _user_for_email(state: BatchState, email: str) -> int:
    """The user with ``email``, created (tier free) if there is none."""
    found = state.user_by_email.get(email)
    return found if found is not None else state.new_user(email, FREE).id


# -- events ---------------------------------------------------------------------------------------


def apply_snapshot(state: BatchState, snap: SubscriptionSnapshot) -> Outcome:
    """Converge the stored subscription on ``snap``, then its user's tier and status."""
    subscription = SubscriptionOutcome(snap.id, snap.status, snap.tier, stored=store_snapshot(state, snap))
    if not subscription.stored:
        return Outcome(subscription=subscription)
    user_id = state.customers[snap.customer_id].user_id
    if user_id is None:
        return Outcome(subscription=subscription, customer=CustomerOutcome(snap.customer_id, LinkResult.NOT_LINKED))
    change = recompute_user(state, user_id, why=f"{snap.id} {snap.status} {snap.tier}")
    return Outcome(
        subscription=subscription,
        customer=CustomerOutcome(snap.customer_id, LinkResult.ALREADY_LINKED, user_id=user_id),
        users=(change,) if change is not None else (),
    )


def subscription_event(state: BatchState, event: StoredEvent) -> Outcome:
    snap = read_subscription(
        event.obj, state.tiers, created=event.created, event_type=event.type, event_id=event.event_id
    )
    return apply_snapshot(state, snap)


def link_event(state: BatchState, event: StoredEvent) -> Outcome:
    hint = link_hint(event.type, event.obj)
    if hint.customer_id is None:
        return Outcome(note="no customer on the object, nothing to link")
    customer, users = link_customer(state, hint.customer_id, hint.email, hint.user_ref, event.created)
    return Outcome(customer=customer, users=users)


def invoice_event(state: BatchState, event: StoredEvent) -> Outcome:
    obj = event.obj
    invoice = InvoiceOutcome(
        id=object_id(obj.get("id")),
        status=_text(obj.get("status")),
        billing_reason=_text(obj.get("billing_reason")),
        attempt_count=_number(obj.get("attempt_count")),
        subscription=invoice_subscription_id(obj),
    )
    linked = link_event(state, event)
    return Outcome(invoice=invoice, customer=linked.customer, users=linked.users, note=linked.note)


def _text(value: Any) -> str | None:
    return value[:255] if isinstance(value, str) else None


def _number(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


RULES: Mapping[str, Rule] = {
    # subscriptions
    "customer.subscription.created": subscription_event,
    "customer.subscription.updated": subscription_event,
    "customer.subscription.deleted": subscription_event,
    "customer.subscription.paused": subscription_event,
    "customer.subscription.resumed": subscription_event,
    "customer.subscription.trial_will_end": subscription_event,
    "customer.subscription.pending_update_applied": subscription_event,
    "customer.subscription.pending_update_expired": subscription_event,
    # invoices
    "invoice.payment_succeeded": invoice_event,
    "invoice.paid": invoice_event,
    "invoice.payment_failed": invoice_event,
    # payment intents
    "payment_intent.succeeded": link_event,
    "payment_intent.payment_failed": link_event,
    # checkout
    "checkout.session.completed": link_event,
    # customers
    "customer.created": link_event,
    "customer.updated": link_event,
}

HANDLED_TYPES = frozenset(RULES)
SUBSCRIPTION_TYPES = frozenset(t for t, rule in RULES.items() if rule is subscription_event)


def add_needs(needs: Needs, event: StoredEvent) -> None:
    """Add to ``needs`` the rows ``event``'s rule can read, as the rule reads the payload."""
    obj = event.obj
    if event.type in SUBSCRIPTION_TYPES:
        customer_id, sub_id = object_id(obj.get("customer")), object_id(obj.get("id"))
        if customer_id is not None:
            needs.customers.add(customer_id)
        if sub_id is not None:
            needs.subscriptions.add(sub_id)
        return
    hint = link_hint(event.type, obj)
    if hint.customer_id is not None:
        needs.customers.add(hint.customer_id)
    if hint.email is not None:
        needs.emails.add(hint.email)
    ref = hint.user_ref
    if ref is not None:
        user_id = _ref_id(ref)
        if user_id is not None:
            needs.user_ids.add(user_id)
        email = normalize_email(ref)
        if email is not None:
            needs.emails.add(email)
