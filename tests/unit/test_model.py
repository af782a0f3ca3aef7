"""The reference model (tests/model.py) says what the documented rules say, on small hand-made histories."""

from __future__ import annotations

from typing import Any

import model
from kamiyo import synthetic

PRO, BASIC = synthetic.price("price_pro_monthly"), synthetic.price("price_basic")


def _sub(kind: str, status: str, *, at: int, event_id: str, sub_id: str = "sub_1", price: Any = PRO) -> dict[str, Any]:
    obj = synthetic.subscription(sub_id=sub_id, customer_id="cus_1", status=status, price_obj=price, created=100)
    return synthetic.event(f"customer.subscription.{kind}", obj, created=at, event_id=event_id)


def _customer(email: str | None, *, event_id: str = "evt_c") -> dict[str, Any]:
    return synthetic.event("customer.created", synthetic.customer(customer_id="cus_1", email=email), event_id=event_id)


def test_a_terminal_snapshot_beats_a_later_one_and_ties_go_to_the_greater_event_id() -> None:
    events = [
        _sub("deleted", "canceled", at=10, event_id="evt_a"),
        _sub("updated", "active", at=20, event_id="evt_b"),
        _sub("updated", "past_due", at=5, event_id="evt_y"),
        _sub("updated", "past_due", at=5, event_id="evt_z", sub_id="sub_2"),
        _sub("updated", "past_due", at=5, event_id="evt_x", sub_id="sub_2"),
    ]
    state = model.expected_state([], events)
    assert state.subscriptions["sub_1"] == model.Subscription("cus_1", "canceled", "pro", "evt_a")
    assert state.subscriptions["sub_2"].version_event_id == "evt_z"


def test_within_one_second_the_lifecycle_then_the_event_type_orders_snapshots() -> None:
    events = [
        _sub("updated", "past_due", at=10, event_id="evt_b"),
        _sub("updated", "active", at=10, event_id="evt_c"),
        _sub("created", "trialing", at=20, event_id="evt_z", sub_id="sub_2"),
        _sub("trial_will_end", "trialing", at=20, event_id="evt_a", sub_id="sub_2"),
    ]
    state = model.expected_state([], events)
    assert state.subscriptions["sub_1"].status == "past_due"
    assert state.subscriptions["sub_2"].version_event_id == "evt_a"


def test_a_user_is_created_by_the_lower_cased_address_and_gets_the_best_entitled_subscription() -> None:
    events = [
        _customer(" Ann@Example.COM"),
        _sub("created", "trialing", at=10, event_id="evt_1", sub_id="sub_1", price=PRO),
        _sub("created", "active", at=10, event_id="evt_2", sub_id="sub_2", price=PRO),
        _sub("created", "active", at=10, event_id="evt_3", sub_id="sub_3", price=BASIC),
        synthetic.event("charge.refunded", {"id": "ch_1", "customer": "cus_1"}, event_id="evt_r"),
    ]
    state = model.expected_state([], events)
    assert state.users == {"ann@example.com": ("pro", "active")}
    assert state.customers["cus_1"] == model.Customer("ann@example.com", "ann@example.com")
    assert state.outcomes["evt_r"] == "ignored"


def test_with_nothing_entitled_a_user_is_free_with_the_newest_subscriptions_status() -> None:
    events = [_customer("ann@example.com"), _sub("deleted", "canceled", at=10, event_id="evt_1")]
    assert model.expected_state([], events).users == {"ann@example.com": ("free", "canceled")}


def test_a_checkout_reference_moves_the_customer_and_the_user_left_without_subscriptions_is_free() -> None:
    ann = model.SeededUser(7, "ann@example.com")
    bob = model.SeededUser(8, "bob@example.com", tier="pro", status="active")
    checkout = synthetic.checkout_session(
        customer_id="cus_1", sub_id="sub_1", email="ann@example.com", client_reference_id="8"
    )
    events = [
        _customer("ann@example.com"),
        _sub("created", "trialing", at=10, event_id="evt_1"),
        synthetic.event("checkout.session.completed", checkout, event_id="evt_co"),
    ]
    state = model.expected_state([ann, bob], events)
    assert state.customers["cus_1"].user_email == "bob@example.com"
    assert state.users == {"ann@example.com": ("free", None), "bob@example.com": ("pro", "trialing")}


def test_an_override_wins_and_a_user_without_subscriptions_keeps_its_stored_tier() -> None:
    ann = model.SeededUser(1, "ann@example.com", override="basic")
    bob = model.SeededUser(2, "bob@example.com", tier="pro", status="active")
    events = [_customer("ann@example.com"), _sub("created", "active", at=10, event_id="evt_1")]
    state = model.expected_state([ann, bob], events)
    assert state.users == {"ann@example.com": ("basic", "active"), "bob@example.com": ("pro", "active")}


def _read(status: str, *, at: int, email: str | None = "Ann@Example.com", label: str = "sync:1") -> model.Read:
    obj = synthetic.subscription(sub_id="sub_1", customer_id="cus_1", status=status, price_obj=PRO, created=100)
    return model.Read({**obj, "customer": synthetic.customer(customer_id="cus_1", email=email)}, at, label)


def test_a_read_ranks_as_the_end_of_the_second_before_it_and_links_its_customer_by_email() -> None:
    # Read at 11: newer than the events of second 10 (the status ties; the label beats "evt_").
    state = model.expected_state([], [_sub("updated", "past_due", at=10, event_id="evt_1")], [_read("past_due", at=11)])
    assert state.subscriptions["sub_1"] == model.Subscription("cus_1", "past_due", "pro", "sync:1")
    assert state.customers["cus_1"] == model.Customer("ann@example.com", "ann@example.com")
    assert state.users == {"ann@example.com": ("pro", "past_due")}
    assert state.outcomes == {"evt_1": "applied"}
    # An event of the read's own second is newer; so is a terminal one of any second.
    state = model.expected_state([], [_sub("updated", "active", at=11, event_id="evt_2")], [_read("past_due", at=11)])
    assert state.subscriptions["sub_1"].version_event_id == "evt_2"
    state = model.expected_state([], [_sub("deleted", "canceled", at=5, event_id="evt_3")], [_read("active", at=20)])
    assert state.subscriptions["sub_1"].status == "canceled"


def test_a_read_without_an_email_links_nothing() -> None:
    state = model.expected_state([], [], [_read("active", at=11, email=None)])
    assert state.customers == {"cus_1": model.Customer(None, None)}
    assert state.users == {}
