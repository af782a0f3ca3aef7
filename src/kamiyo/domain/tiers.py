"""Which tier a price grants, and how tiers rank.

``STRIPE_PRICE_TIERS="price_basic=basic,pro_monthly=pro,price_ent=enterprise"`` maps a price id or
a price ``lookup_key`` to a tier. Tiers rank by their first appearance in that list (later is
higher); ``free`` is always the lowest. A price not in the list may name its tier in
``metadata.tier``; such a tier, if the list never names it, ranks above ``free`` and below every
listed tier.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

FREE = "free"
_TIER_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")


@dataclass(frozen=True)
class TierMap:
    """Price id / lookup key → tier, with the tiers' ranks."""

    by_key: Mapping[str, str] = field(default_factory=dict)
    ranks: Mapping[str, int] = field(default_factory=lambda: {FREE: 0})

    def tier_for_price(self, price: Mapping[str, Any]) -> str | None:
        """The tier a Stripe price object grants, or None when nothing names one."""
        for key in (price.get("id"), price.get("lookup_key")):
            if isinstance(key, str) and key in self.by_key:
                return self.by_key[key]
        metadata = price.get("metadata")
        if isinstance(metadata, Mapping):
            tier = metadata.get("tier")
            if isinstance(tier, str) and _TIER_RE.fullmatch(tier.strip().lower()):
                return tier.strip().lower()
        return None

    def rank(self, tier: str) -> int:
        """Higher is better; ``free`` is 0; an unlisted (metadata-only) tier is 1."""
        if tier in self.ranks:
            return self.ranks[tier] + (1 if tier != FREE else 0)
        return 1


def parse_price_tiers(raw: str) -> TierMap:
    """Parse ``key=tier,key=tier``; raise ValueError naming the bad entry."""
    by_key: dict[str, str] = {}
    ranks: dict[str, int] = {FREE: 0}
    for entry in (part.strip() for part in raw.split(",")):
        if not entry:
            continue
        key, sep, tier = (s.strip() for s in entry.partition("="))
        if not sep or not key or not tier:
            raise ValueError(f"entry {entry!r} is not price_or_lookup_key=tier")
        if not _TIER_RE.fullmatch(tier):
            raise ValueError(f"tier {tier!r} in {entry!r} must be lowercase letters, digits, - or _")
        if key in by_key and by_key[key] != tier:
            raise ValueError(f"{key!r} is mapped twice ({by_key[key]!r} and {tier!r})")
        by_key[key] = tier
        ranks.setdefault(tier, len(ranks))
    return TierMap(by_key=by_key, ranks=ranks)
