"""The rules that apply events (domain/rules.py) on a BatchState (domain/state.py): pure, no database."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from kamiyo import synthetic
from kamiyo.domain.outcomes import LinkResult
from kamiyo.domain.rules import RULES, StoredEvent, link_customer, recompute_user
from kamiyo.domain.state import BatchState, CustomerRow, UserRow
from kamiyo.domain.tiers import parse_price_tiers
from kamiyo.errors import UnmappedPrice

TIERS = parse_price_tiers("price_basic=basic,price_pro_monthly=pro")
NOW = datetime(2026, 12, 1, tzinfo=UTC)
T = 1_760_000_000


def _state() -> BatchState:
    return BatchState(TIERS, NOW)


def _sub_event(status: str, *, at: int, price: str = "price_pro_monthly", sub_id: str = "sub_1") -> StoredEvent:
    obj = synthetic.subscription(sub_id=sub_id, customer_id="cus_1", status=status, price_obj=synthetic.price(price))
    return StoredEvent(1, f"evt_{status}_{at}", "customer.subscription.updated", at, obj)


def _apply(state: BatchState, event: StoredEvent) -> Any:
    state.begin_item()
    outcome = RULES[event.type](state, event)
    state.end_item()
    return outcome


def _linked_state(*, override: str | None = None, expires: datetime | None = None) -> BatchState:
    state = _state()
    state.loaded_customer(CustomerRow("cus_1", 7, "ann@example.com", T - 10, "email"))
    state.loaded_user(UserRow(7, "ann@example.com", "free", None, "cus_1", override, expires), ["cus_1"])
    return state


def test_a_newer_snapshot_replaces_an_older_one_and_an_older_one_is_left_aside() -> None:
    state = _linked_state()
    assert _apply(state, _sub_event("active", at=T)).users[0].tier_to == "pro"
    stale = _apply(state, _sub_event("past_due", at=T - 5))
    assert stale.subscription.stored is False
    assert state.subscriptions["sub_1"].status == "active"
    newer = _apply(state, _sub_event("canceled", at=T + 5))
    assert newer.subscription.stored is True
    assert (state.users[7].tier, state.users[7].status) == ("free", "canceled")


def test_a_snapshot_of_an_unlinked_customer_waits_and_applies_once_an_email_links_it() -> None:
    state = _state()
    outcome = _apply(state, _sub_event("active", at=T))
    assert outcome.customer.link is LinkResult.NOT_LINKED
    assert outcome.users == ()
    customer, changes = link_customer(state, "cus_1", "ann@example.com", None, T + 1)
    assert customer.link is LinkResult.LINKED
    assert customer.linked_by == "email"
    user_id = customer.user_id
    assert user_id is not None
    assert user_id < 0
    assert state.new_users == {user_id: None}
    assert [(c.tier_from, c.tier_to, c.status_to) for c in changes] == [("free", "pro", "active")]


def test_a_second_customer_with_the_same_email_links_to_the_same_new_user() -> None:
    state = _state()
    first, _ = link_customer(state, "cus_1", "ann@example.com", None, T)
    second, _ = link_customer(state, "cus_2", "ann@example.com", None, T)
    assert first.user_id == second.user_id
    assert len(state.new_users) == 1


def test_a_linked_customer_stays_linked_whatever_email_comes_later() -> None:
    state = _linked_state()
    customer, changes = link_customer(state, "cus_1", "bob@example.com", None, T)
    assert (customer.link, customer.user_id, changes) == (LinkResult.ALREADY_LINKED, 7, ())
    assert state.customers["cus_1"].email == "bob@example.com"  # the newest email is recorded
    assert "bob@example.com" not in state.user_by_email


def test_client_reference_id_moves_the_customer_and_the_previous_user_returns_to_free() -> None:
    state = _linked_state()
    _apply(state, _sub_event("active", at=T))
    state.loaded_user(UserRow(9, "our.user@example.com", "free", None, None), [])
    customer, changes = link_customer(state, "cus_1", None, "9", T + 1)
    assert (customer.user_id, customer.linked_by) == (9, "client_reference_id")
    assert {(c.user_id, c.tier_to, c.status_to) for c in changes} == {(7, "free", None), (9, "pro", "active")}
    assert state.users[7].stripe_customer_id is None
    assert state.users[9].stripe_customer_id == "cus_1"


def test_an_override_in_force_wins_and_an_expired_one_does_not() -> None:
    state = _linked_state(override="basic")
    outcome = _apply(state, _sub_event("active", at=T))
    assert [(c.tier_to, c.why) for c in outcome.users] == [("basic", "manual override")]
    expired = _linked_state(override="basic", expires=NOW - timedelta(seconds=1))
    assert _apply(expired, _sub_event("active", at=T)).users[0].tier_to == "pro"


def test_a_user_without_subscriptions_is_left_as_is_unless_asked_to_reset() -> None:
    state = _state()
    state.loaded_user(UserRow(7, "ann@example.com", "pro", "active", None), [])
    assert recompute_user(state, 7, why="t") is None
    change = recompute_user(state, 7, why="t", reset_when_none=True)
    assert change is not None
    assert (change.tier_to, change.status_to) == ("free", None)


def test_undoing_an_item_reverts_every_change_it_made() -> None:
    state = _state()
    _apply(state, _sub_event("active", at=T))
    before = _contents(state)
    state.begin_item()
    link_customer(state, "cus_1", "ann@example.com", None, T + 1)  # creates a user, links, recomputes
    state.put_snapshot(_snapshot_of(_sub_event("past_due", at=T + 2)))
    assert _contents(state) != before
    state.undo_item()
    assert _contents(state) == before


def test_a_failing_rule_raises_for_its_event_alone() -> None:
    state = _linked_state()
    with pytest.raises(UnmappedPrice):
        _apply(state, _sub_event("active", at=T, price="price_unknown"))
    state.undo_item()
    assert state.snapshots == {}
    assert state.users[7].tier == "free"


def _snapshot_of(event: StoredEvent) -> Any:
    from kamiyo.domain.subscriptions import read_subscription

    return read_subscription(event.obj, TIERS, created=event.created, event_type=event.type, event_id=event.event_id)


def _contents(state: BatchState) -> tuple[Any, ...]:
    return (
        dict(state.subscriptions),
        dict(state.subscriptions_of),
        dict(state.customers),
        dict(state.users),
        dict(state.user_by_email),
        dict(state.customers_of),
        dict(state.snapshots),
        dict(state.new_customers),
        dict(state.changed_customers),
        dict(state.new_users),
        dict(state.changed_users),
        dict(state.state_changed),
    )
