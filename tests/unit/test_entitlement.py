"""A user's tier and status, from all of their subscriptions."""

from __future__ import annotations

import itertools

import pytest

from kamiyo.domain.entitlement import SubscriptionState, UserState, user_state
from kamiyo.domain.tiers import FREE, parse_price_tiers

TIERS = parse_price_tiers("price_basic=basic,price_pro=pro,price_ent=enterprise")
T0 = 1_760_000_000


def sub(status: str, tier: str = "pro", created: int = T0, sub_id: str = "sub_1") -> SubscriptionState:
    return SubscriptionState(id=sub_id, status=status, tier=tier, stripe_created=created)


@pytest.mark.parametrize("status", ["active", "trialing"])
def test_an_active_or_trialing_subscription_grants_its_tier(status: str) -> None:
    assert user_state([sub(status)], TIERS) == UserState(tier="pro", status=status)


def test_a_past_due_subscription_keeps_its_tier_during_grace() -> None:
    assert user_state([sub("past_due")], TIERS) == UserState(tier="pro", status="past_due")


@pytest.mark.parametrize("status", ["incomplete", "incomplete_expired", "unpaid", "canceled", "paused"])
def test_a_subscription_without_entitlement_gives_free_and_its_status(status: str) -> None:
    assert user_state([sub(status, tier="enterprise")], TIERS) == UserState(tier=FREE, status=status)


def test_no_subscriptions_give_no_state() -> None:
    assert user_state([], TIERS) is None
    assert user_state(iter(()), TIERS) is None


def test_the_highest_entitled_tier_decides_even_against_a_better_status() -> None:
    subs = [sub("active", "pro", sub_id="sub_a"), sub("past_due", "enterprise", sub_id="sub_b")]
    assert user_state(subs, TIERS) == UserState(tier="enterprise", status="past_due")


def test_within_one_tier_active_beats_trialing_beats_past_due_whatever_their_age() -> None:
    subs = [
        sub("past_due", created=T0 + 20, sub_id="sub_a"),
        sub("trialing", created=T0 + 10, sub_id="sub_b"),
        sub("active", created=T0, sub_id="sub_c"),
    ]
    assert user_state(subs, TIERS) == UserState(tier="pro", status="active")
    assert user_state(subs[:2], TIERS) == UserState(tier="pro", status="trialing")


def test_an_entitled_subscription_beats_a_newer_unentitled_one_of_a_higher_tier() -> None:
    subs = [sub("active", "basic", created=T0, sub_id="sub_a"), sub("canceled", "enterprise", T0 + 99, "sub_b")]
    assert user_state(subs, TIERS) == UserState(tier="basic", status="active")


def test_a_listed_tier_beats_a_metadata_only_tier() -> None:
    subs = [sub("active", "team", sub_id="sub_a"), sub("active", "basic", sub_id="sub_b")]
    assert user_state(subs, TIERS) == UserState(tier="basic", status="active")


def test_with_none_entitled_the_latest_subscription_gives_the_status_and_the_tier_is_free() -> None:
    subs = [
        sub("canceled", "enterprise", created=T0, sub_id="sub_z"),
        sub("unpaid", "basic", created=T0 + 50, sub_id="sub_a"),
        sub("incomplete_expired", "pro", created=T0 + 10, sub_id="sub_m"),
    ]
    for order in itertools.permutations(subs):
        assert user_state(order, TIERS) == UserState(tier=FREE, status="unpaid")


def test_the_decision_does_not_depend_on_the_order_of_the_subscriptions() -> None:
    subs = [
        sub("trialing", "enterprise", created=T0 + 5, sub_id="sub_a"),
        sub("active", "enterprise", created=T0, sub_id="sub_b"),
        sub("active", "pro", created=T0 + 9, sub_id="sub_c"),
        sub("canceled", "enterprise", created=T0 + 99, sub_id="sub_d"),
    ]
    results = {user_state(order, TIERS) for order in itertools.permutations(subs)}
    assert results == {UserState(tier="enterprise", status="active")}
