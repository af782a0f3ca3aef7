"""Manual overrides (``kamiyo users set-tier``): when one is in force and what it grants. Pure."""

from __future__ import annotations

from datetime import UTC, datetime

from kamiyo.domain.entitlement import UserState
from kamiyo.domain.tiers import FREE


def override_state(tier: str) -> UserState:
    """What an override grants: its tier, ``active`` for a paid tier as the runbook's manual fix
    sets it, and no status for ``free`` (an override to free revokes access)."""
    return UserState(tier=tier, status=None if tier == FREE else "active")


def override_in_force(expires_at: datetime | None, now: datetime) -> bool:
    """An override without an expiry lasts until cleared; one with an expiry ends at that moment."""
    return expires_at is None or as_utc(expires_at) > now


def as_utc(moment: datetime) -> datetime:
    """SQLite hands back naive datetimes; everything kamiyo stores is UTC."""
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
