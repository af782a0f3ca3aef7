"""A small in-memory reference model of what a set of Stripe events must leave in the database.

Written from the documented rules (STRIPE.md, the docstrings of ``kamiyo.domain``), not from the
engine's code, so that the property tests compare the engine with the rules rather than with a
second copy of itself. It reads nothing but event payloads and imports nothing from ``kamiyo``.

The model is a function of the *set* of events (by event id), never of their order: it describes
the state every order of delivery and application must converge on. Its inputs are therefore
kept to histories whose outcome the rules make order-independent (see ``expected_state``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

FREE = "free"
# support.PRICE_TIERS ("price_basic=basic,price_pro_monthly=pro,ent_yearly=enterprise"): each key is
# a price id or a lookup key; tiers rank by first appearance, later is higher.
PRICE_TIERS = {"price_basic": "basic", "price_pro_monthly": "pro", "ent_yearly": "enterprise"}
LISTED_TIERS = ["basic", "pro", "enterprise"]

SUBSCRIPTION_TYPES = {
    "customer.subscription.created",
    "customer.subscription.updated",
    "customer.subscription.deleted",
    "customer.subscription.paused",
    "customer.subscription.resumed",
    "customer.subscription.trial_will_end",
}
# Event type -> where its object names the customer's email.
LINK_TYPES = {
    "customer.created": ("email",),
    "customer.updated": ("email",),
    "checkout.session.completed": ("customer_details.email", "customer_email"),
    "invoice.paid": ("customer_email",),
    "invoice.payment_succeeded": ("customer_email",),
    "invoice.payment_failed": ("customer_email",),
    "payment_intent.succeeded": ("receipt_email",),
    "payment_intent.payment_failed": ("receipt_email",),
}

TERMINAL = {"canceled", "incomplete_expired"}
LIFECYCLE = ["incomplete", "trialing", "active", "past_due", "unpaid", "paused"]  # then terminal
ENTITLED = ["past_due", "trialing", "active"]  # worst to best


def tier_rank(tier: str) -> int:
    """free lowest; a tier only a price's metadata names next; listed tiers above, in list order."""
    if tier == FREE:
        return 0
    return LISTED_TIERS.index(tier) + 2 if tier in LISTED_TIERS else 1


def tier_of_price(price: Mapping[str, Any]) -> str | None:
    for key in (price.get("id"), price.get("lookup_key")):
        if key in PRICE_TIERS:
            return PRICE_TIERS[key]
    tier = (price.get("metadata") or {}).get("tier")
    return tier.strip().lower() if isinstance(tier, str) and tier.strip() else None


def version_key(event: Mapping[str, Any]) -> tuple[bool, int, int, int, str]:
    """Greater is newer: terminal first, then the event's second, the status's place in the
    lifecycle, the event type (created < the rest < deleted), and the event id."""
    status = event["data"]["object"]["status"]
    place = len(LIFECYCLE) if status in TERMINAL else LIFECYCLE.index(status)
    kind = {"customer.subscription.created": 0, "customer.subscription.deleted": 2}.get(event["type"], 1)
    return (status in TERMINAL, event["created"], place, kind, event["id"])


@dataclass(frozen=True)
class Read:
    """A subscription as a sync read it from Stripe's API at ``read_at`` (Stripe's clock), its
    ``customer`` expanded (the Customer object, with its email), the sync's ``label`` its version's id.

    A read is a version like an event's: a read at second T ranks as the end of second T-1 (newer
    than every event of an earlier second, never newer than one of its own), among the types
    between created and deleted. It links its customer by email as a ``customer.*`` event would."""

    subscription: Mapping[str, Any]
    read_at: int
    label: str

    def as_version(self) -> dict[str, Any]:
        """The read as the event that would carry the same version (the customer as a bare id)."""
        obj = {**self.subscription, "customer": self.subscription["customer"]["id"]}
        return {"id": self.label, "type": "sync", "created": self.read_at - 1, "data": {"object": obj}}


def _path(obj: Mapping[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        obj = obj.get(part) if isinstance(obj, Mapping) else None
    return obj


def _email(value: Any) -> str | None:
    return value.strip().lower() if isinstance(value, str) and "@" in value else None


@dataclass(frozen=True)
class SeededUser:
    """A user that exists before the events: its id, email, tier/status as last written (by hand,
    say) and an operator's override in force (a tier) or None."""

    id: int
    email: str
    tier: str = FREE
    status: str | None = None
    override: str | None = None


@dataclass(frozen=True)
class Subscription:
    customer_id: str
    status: str
    tier: str
    version_event_id: str


@dataclass(frozen=True)
class Customer:
    user_email: str | None  # the linked user, by their (unique) email
    email: str | None


@dataclass(frozen=True)
class State:
    users: dict[str, tuple[str, str | None]]  # email -> (tier, status)
    customers: dict[str, Customer]
    subscriptions: dict[str, Subscription]
    outcomes: dict[str, str]  # event id -> applied | ignored


def expected_state(
    seeded: Iterable[SeededUser], events: Iterable[Mapping[str, Any]], reads: Iterable[Read] = ()
) -> State:
    """What the database must hold once every event and every sync's read has been applied, in any order.

    Order-independent only for histories where the rules are: each customer names one address
    (in any letter case), and a customer whose checkout's ``client_reference_id`` names an
    existing user has no address or the address of an existing user whose stored tier is free
    (otherwise whether that address's user is created, and what it keeps, depends on whether the
    checkout came first).
    """
    users = {u.email: u for u in seeded}
    by_ref = {str(u.id): u.email for u in users.values()} | {email: email for email in users}
    unique = {event["id"]: event for event in events}

    outcomes: dict[str, str] = {}
    newest: dict[str, Mapping[str, Any]] = {}  # subscription id -> its newest event
    emails: dict[str, str] = {}  # customer -> its address
    moved_to: dict[str, str] = {}  # customer -> the user its client_reference_id names
    customer_ids: set[str] = set()
    for event in unique.values():
        obj, kind = event["data"]["object"], event["type"]
        if kind in SUBSCRIPTION_TYPES:
            outcomes[event["id"]] = "applied"
            customer_ids.add(obj["customer"])
            if obj["id"] not in newest or version_key(event) > version_key(newest[obj["id"]]):
                newest[obj["id"]] = event
        elif kind in LINK_TYPES:
            outcomes[event["id"]] = "applied"
            customer = obj["id"] if kind.startswith("customer.") else obj.get("customer")
            if not customer:
                continue
            customer_ids.add(customer)
            address = next(filter(None, (_email(_path(obj, p)) for p in LINK_TYPES[kind])), None)
            if address:
                emails[customer] = address
            ref = obj.get("client_reference_id")
            target = by_ref.get(ref.strip().lower()) if isinstance(ref, str) else None
            if target:
                moved_to[customer] = target
        else:
            outcomes[event["id"]] = "ignored"
    for read in reads:
        # A read has no outcome (it is no event), and several reads share one label.
        version = read.as_version()
        sub_id, customer = read.subscription["id"], read.subscription["customer"]
        customer_ids.add(customer["id"])
        if sub_id not in newest or version_key(version) > version_key(newest[sub_id]):
            newest[sub_id] = version
        address = _email(customer.get("email"))
        if address:
            emails[customer["id"]] = address

    links = {c: moved_to.get(c) or emails.get(c) for c in customer_ids}
    created = {email for email in links.values() if email and email not in users}
    lost_a_customer = {emails[c] for c in moved_to if c in emails and emails[c] != moved_to[c]}

    subscriptions = {}
    for sub_id, event in newest.items():
        obj = event["data"]["object"]
        tiers = [tier_of_price(item["price"]) for item in obj["items"]["data"]]
        tier = max((t for t in tiers if t), key=tier_rank)
        subscriptions[sub_id] = Subscription(obj["customer"], obj["status"], tier, event["id"])

    states: dict[str, tuple[str, str | None]] = {}
    for email in users.keys() | created:
        seed = users.get(email)
        subs = [(sub_id, s) for sub_id, s in subscriptions.items() if links.get(s.customer_id) == email]
        if seed is not None and seed.override is not None:
            states[email] = (seed.override, None if seed.override == FREE else "active")
        elif subs:
            states[email] = _entitlement(subs, {sub_id: newest[sub_id]["data"]["object"] for sub_id, _ in subs})
        elif seed is not None and email not in lost_a_customer:
            states[email] = (seed.tier, seed.status)  # nothing known contradicts it
        else:
            states[email] = (FREE, None)
    return State(
        users=states,
        customers={c: Customer(links[c], emails.get(c)) for c in customer_ids},
        subscriptions=subscriptions,
        outcomes=outcomes,
    )


def _entitlement(subs: list[tuple[str, Subscription]], objects: Mapping[str, Mapping[str, Any]]) -> tuple[str, str]:
    """The best entitled subscription (tier, then active > trialing > past_due, then the newest
    by the subscription's own ``created`` and id); none entitled: free and the latest one's status."""
    entitled = [(sub_id, s) for sub_id, s in subs if s.status in ENTITLED]
    if entitled:
        _, best = max(
            entitled,
            key=lambda e: (tier_rank(e[1].tier), ENTITLED.index(e[1].status), objects[e[0]]["created"], e[0]),
        )
        return best.tier, best.status
    _, latest = max(subs, key=lambda e: (objects[e[0]]["created"], e[0]))
    return FREE, latest.status
