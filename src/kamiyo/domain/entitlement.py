"""What a user is entitled to, from all of their subscriptions. Pure functions."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from kamiyo.domain.tiers import FREE, TierMap

# Stripe: provision on active/trialing; past_due keeps access while Stripe retries (grace).
ENTITLED_STATUSES = frozenset({"active", "trialing", "past_due"})
_PREFERENCE = {"active": 2, "trialing": 1, "past_due": 0}


@dataclass(frozen=True)
class SubscriptionState:
    """What entitlement needs of a stored subscription."""

    id: str
    status: str
    tier: str
    stripe_created: int


@dataclass(frozen=True)
class UserState:
    tier: str
    status: str | None


def user_state(subscriptions: Iterable[SubscriptionState], tiers: TierMap) -> UserState | None:
    """The tier and status a user's subscriptions give; None when they have none.

    The best entitled subscription decides (highest tier, then active over trialing over
    past_due, then the newest). With none entitled: ``free`` and the latest subscription's status.
    """
    subs = list(subscriptions)
    if not subs:
        return None
    entitled = [s for s in subs if s.status in ENTITLED_STATUSES]
    if entitled:
        best = max(entitled, key=lambda s: (tiers.rank(s.tier), _PREFERENCE[s.status], s.stripe_created, s.id))
        return UserState(tier=best.tier, status=best.status)
    latest = max(subs, key=lambda s: (s.stripe_created, s.id))
    return UserState(tier=FREE, status=latest.status)
