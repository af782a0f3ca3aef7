"""Reading a Stripe subscription into a snapshot, in every API version's shape.

Pure functions: dicts in, frozen dataclasses out. No HTTP, no database.

Ordering. Stripe does not deliver in order and ``created`` has one-second resolution, so each
snapshot carries a version key and the store keeps the greatest one (a last-writer-wins
register: taking a maximum is insensitive to order and repetition). The key is, compared in turn:

1. terminal: a ``canceled`` / ``incomplete_expired`` snapshot beats every non-terminal one;
2. the ``created`` of the event (or of the API read that produced the snapshot);
3. within one second, the status's place in the usual lifecycle
   (incomplete < trialing < active < past_due < unpaid < paused < terminal);
4. then the event type (created < updated and the rest < deleted);
5. then the event id, so that even identical keys have one winner.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeGuard

from kamiyo.domain.entitlement import ENTITLED_STATUSES
from kamiyo.domain.tiers import FREE, TierMap
from kamiyo.errors import UnmappedPrice

TERMINAL_STATUSES = frozenset({"canceled", "incomplete_expired"})
_STATUS_RANK = {
    "incomplete": 0,
    "trialing": 1,
    "active": 2,
    "past_due": 3,
    "unpaid": 4,
    "paused": 5,
    "canceled": 6,
    "incomplete_expired": 6,
}
_TYPE_RANK = {"customer.subscription.created": 0, "customer.subscription.deleted": 2}


@dataclass(frozen=True, order=True)
class Version:
    """The order key of a snapshot; a greater version is newer."""

    terminal: int
    created: int
    rank: int
    event_id: str


@dataclass(frozen=True)
class SubscriptionSnapshot:
    id: str
    customer_id: str
    status: str
    tier: str
    price_ids: tuple[str, ...]
    livemode: bool
    stripe_created: int
    current_period_end: int | None
    cancel_at_period_end: bool
    cancel_at: int | None
    canceled_at: int | None
    ended_at: int | None
    trial_end: int | None
    version: Version


def object_id(value: Any) -> str | None:
    """An expandable field's id: Stripe sends either ``"cus_..."`` or ``{"id": "cus_...", ...}``."""
    if isinstance(value, str) and value:
        return value
    if _is_mapping(value):
        inner = value.get("id")
        return inner if isinstance(inner, str) and inner else None
    return None


@functools.lru_cache(maxsize=256)
def version_for(status: str, created: int, event_type: str, event_id: str) -> Version:
    """The version of a snapshot; an immutable value, shared between snapshots with the same key
    (a sync's page gives every subscription of one status the same one: built once, pickled once)."""
    terminal = 1 if status in TERMINAL_STATUSES else 0
    rank = _STATUS_RANK.get(status, 3) * 10 + _TYPE_RANK.get(event_type, 1)
    return Version(terminal=terminal, created=created, rank=rank, event_id=event_id)


def read_subscription(
    obj: Mapping[str, Any], tiers: TierMap, *, created: int, event_type: str, event_id: str
) -> SubscriptionSnapshot:
    """Turn a subscription object (any API version) into a snapshot.

    A subscription whose status entitles (``ENTITLED_STATUSES``) takes the best tier of its items'
    prices, and raises UnmappedPrice, naming the prices, when it has no item or none maps to a
    tier. One that does not entitle (canceled, unpaid, ...) grants nothing whatever its prices, so
    without a mapped price (or without items, as a minimal ``customer.subscription.deleted`` may
    come) it reads as ``free`` instead. Raises ValueError when the object lacks what every version
    has (id, customer, status).
    """
    sub_id = object_id(obj.get("id"))
    customer_id = object_id(obj.get("customer"))
    status = obj.get("status")
    if not sub_id or not customer_id or not isinstance(status, str):
        raise ValueError("subscription object without id, customer or status")

    items = _items(obj)
    prices = [_price_of(item) for item in items]
    # An item whose price names no tier (seats, metered add-ons) grants nothing; the best
    # mapped item decides. Only when no item maps is the tier unknown, and only an entitling
    # subscription needs it: parking the others would hold back a cancellation for a tier that
    # entitlement never reads.
    mapped = [tier for tier in map(tiers.tier_for_price, prices) if tier is not None]
    if mapped:
        best_tier = max(mapped, key=tiers.rank)
    elif status not in ENTITLED_STATUSES:
        best_tier = FREE
    elif not prices:
        raise UnmappedPrice(f"subscription {sub_id} has no priced items to map to a tier")
    else:
        names = ", ".join(_price_label(price) for price in prices)
        raise UnmappedPrice(
            f"price {names} of {sub_id} maps to no tier: add it to STRIPE_PRICE_TIERS "
            "or set metadata.tier on the price, then replay this event"
        )

    return SubscriptionSnapshot(
        id=sub_id,
        customer_id=customer_id,
        status=status,
        tier=best_tier,
        price_ids=tuple([str(p.get("id")) for p in prices if p.get("id")]),
        livemode=bool(obj.get("livemode", False)),
        stripe_created=_int(obj.get("created")) or 0,
        current_period_end=_period_end(obj, items),
        cancel_at_period_end=bool(obj.get("cancel_at_period_end", False)),
        cancel_at=_int(obj.get("cancel_at")),
        canceled_at=_int(obj.get("canceled_at")),
        ended_at=_int(obj.get("ended_at")),
        trial_end=_int(obj.get("trial_end")),
        version=version_for(status, created, event_type, event_id),
    )


def _is_mapping(value: Any) -> TypeGuard[Mapping[str, Any]]:
    """``isinstance(value, Mapping)``; a JSON-decoded object, an exact dict, skips the ABC's check,
    which was most of the time a sync spent reading a subscription."""
    return type(value) is dict or isinstance(value, Mapping)


def _price_label(price: Mapping[str, Any]) -> str:
    price_id = price.get("id") or "<no price id>"
    lookup_key = price.get("lookup_key")
    return f"{price_id} (lookup_key {lookup_key})" if lookup_key else str(price_id)


def _items(obj: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    items = obj.get("items")
    data = items.get("data") if _is_mapping(items) else None
    if isinstance(data, list) and data:
        return [item for item in data if _is_mapping(item)]
    # Very old API versions put a single plan on the subscription itself.
    plan = obj.get("plan")
    return [{"plan": plan}] if _is_mapping(plan) else []


def _price_of(item: Mapping[str, Any]) -> Mapping[str, Any]:
    price = item.get("price")
    if _is_mapping(price):
        return price
    if isinstance(price, str):
        return {"id": price}
    plan = item.get("plan")  # before prices existed, a plan played the same part
    return plan if _is_mapping(plan) else {}


def _period_end(obj: Mapping[str, Any], items: list[Mapping[str, Any]]) -> int | None:
    """Before 2025-03-31.basil on the subscription; from basil on, only on each item."""
    top = _int(obj.get("current_period_end"))
    if top is not None:
        return top
    ends = [_int(item.get("current_period_end")) for item in items]
    known = [end for end in ends if end is not None]
    return max(known) if known else None


def _int(value: Any) -> int | None:
    if type(value) is int:  # the usual case, a JSON number: no second check for bool
        return value
    return value if isinstance(value, int) and not isinstance(value, bool) else None
