"""Reading subscription objects of every API version into snapshots, and how snapshots order."""

from __future__ import annotations

import itertools
import random
from enum import IntEnum
from types import MappingProxyType
from typing import Any

import pytest

from kamiyo import synthetic
from kamiyo.domain.entitlement import ENTITLED_STATUSES
from kamiyo.domain.subscriptions import object_id, read_subscription, version_for
from kamiyo.domain.tiers import parse_price_tiers
from kamiyo.errors import UnmappedPrice

TIERS = parse_price_tiers("price_basic=basic,price_pro_monthly=pro,ent_yearly=enterprise")
CREATED = 1_760_000_000
MONTH = 30 * 24 * 3600
UPDATED = "customer.subscription.updated"
SHAPES = [
    pytest.param(synthetic.LEGACY_API_VERSION, id="pre-basil"),
    pytest.param(synthetic.BASIL, id="basil"),
    pytest.param(synthetic.LATEST_API_VERSION, id="endive"),
]


def sub_event(event_type: str = UPDATED, *, api_version: str = synthetic.LATEST_API_VERSION, **fields: Any) -> dict:
    fields.setdefault("sub_id", "sub_test1")
    fields.setdefault("customer_id", "cus_test1")
    fields.setdefault("created", CREATED)
    obj = synthetic.subscription(api_version=api_version, **fields)
    return synthetic.event(event_type, obj, created=CREATED + 5, event_id="evt_test1", api_version=api_version)


def read(event: dict) -> Any:
    return read_subscription(
        event["data"]["object"], TIERS, created=event["created"], event_type=event["type"], event_id=event["id"]
    )


# -- reading both payload shapes ---------------------------------------------------------------


@pytest.mark.parametrize("api_version", SHAPES)
def test_a_subscription_reads_the_same_in_every_api_version(api_version: str) -> None:
    snap = read(sub_event(api_version=api_version))
    assert (snap.id, snap.customer_id, snap.status, snap.tier) == ("sub_test1", "cus_test1", "active", "pro")
    assert snap.price_ids == ("price_pro_monthly",)
    assert snap.livemode is False
    assert snap.stripe_created == CREATED
    assert snap.current_period_end == CREATED + MONTH
    assert (snap.cancel_at_period_end, snap.cancel_at, snap.canceled_at, snap.ended_at) == (False, None, None, None)


def test_pre_basil_period_end_is_read_from_the_subscription_itself() -> None:
    obj = sub_event(api_version=synthetic.LEGACY_API_VERSION)["data"]["object"]
    assert "current_period_end" not in obj["items"]["data"][0]
    obj["current_period_end"] = CREATED + 123
    assert read(synthetic.event(UPDATED, obj, created=CREATED)).current_period_end == CREATED + 123


def test_basil_period_end_is_read_from_the_items_taking_the_latest() -> None:
    event = sub_event(api_version=synthetic.BASIL, extra_prices=(synthetic.price("price_basic"),))
    obj = event["data"]["object"]
    assert "current_period_end" not in obj
    obj["items"]["data"][1]["current_period_end"] = CREATED + 2 * MONTH
    assert read(event).current_period_end == CREATED + 2 * MONTH


def test_a_subscription_without_any_period_has_no_period_end() -> None:
    event = sub_event(api_version=synthetic.BASIL)
    del event["data"]["object"]["items"]["data"][0]["current_period_end"]
    assert read(event).current_period_end is None


@pytest.mark.parametrize("api_version", SHAPES)
def test_a_cancellation_scheduled_at_period_end_is_read(api_version: str) -> None:
    snap = read(sub_event(api_version=api_version, cancel_at_period_end=True))
    assert snap.cancel_at_period_end is True
    assert snap.cancel_at == CREATED + MONTH


def test_a_portal_cancellation_with_only_cancel_at_set_is_read() -> None:
    """Dahlia's Customer Portal cancels with cancel_at_period_end false and cancel_at at the period end."""
    event = sub_event()
    event["data"]["object"]["cancel_at"] = CREATED + MONTH
    snap = read(event)
    assert (snap.cancel_at_period_end, snap.cancel_at) == (False, CREATED + MONTH)


def test_a_canceled_subscription_reads_its_end_times() -> None:
    snap = read(sub_event("customer.subscription.deleted", status="canceled"))
    assert (snap.status, snap.canceled_at, snap.ended_at) == ("canceled", CREATED, CREATED)


def test_a_trialing_subscription_reads_its_trial_end() -> None:
    snap = read(sub_event(status="trialing"))
    assert snap.trial_end == CREATED + 14 * 24 * 3600


def test_an_expanded_customer_object_is_read_as_its_id() -> None:
    event = sub_event()
    event["data"]["object"]["customer"] = synthetic.customer(customer_id="cus_expanded", email="ada@example.com")
    assert read(event).customer_id == "cus_expanded"


def test_a_price_given_only_by_lookup_key_maps_its_tier() -> None:
    tiers = parse_price_tiers("pro_monthly=pro")
    obj = synthetic.subscription(
        sub_id="sub_1", customer_id="cus_1", price_obj=synthetic.price("price_1Abc", lookup_key="pro_monthly")
    )
    assert read_subscription(obj, tiers, created=CREATED, event_type=UPDATED, event_id="evt_1").tier == "pro"


def test_a_price_tagged_with_metadata_tier_maps_to_that_tier() -> None:
    snap = read(sub_event(price_obj=synthetic.price("price_team", tier="team")))
    assert snap.tier == "team"


def test_a_very_old_subscription_with_only_a_plan_is_read_through_the_plan() -> None:
    obj = sub_event()["data"]["object"]
    del obj["items"]
    obj["plan"] = {"id": "ent_yearly", "object": "plan"}
    snap = read(synthetic.event(UPDATED, obj, created=CREATED))
    assert (snap.tier, snap.price_ids) == ("enterprise", ("ent_yearly",))


@pytest.mark.parametrize("api_version", SHAPES)
def test_a_multi_item_subscription_takes_the_best_tier_of_its_items(api_version: str) -> None:
    event = sub_event(
        api_version=api_version,
        price_obj=synthetic.price("price_basic"),
        extra_prices=(synthetic.price("ent_yearly"), synthetic.price("price_pro_monthly")),
    )
    snap = read(event)
    assert snap.tier == "enterprise"
    assert snap.price_ids == ("price_basic", "ent_yearly", "price_pro_monthly")


def test_an_unmapped_price_raises_unmapped_price_naming_the_price() -> None:
    event = sub_event(price_obj=synthetic.price("price_mystery"))
    with pytest.raises(UnmappedPrice, match="price_mystery") as caught:
        read(event)
    assert "sub_test1" in str(caught.value)
    assert "STRIPE_PRICE_TIERS" in str(caught.value)


def test_an_unmapped_price_with_a_lookup_key_is_named_by_id_and_lookup_key() -> None:
    event = sub_event(price_obj=synthetic.price("price_1Xyz", lookup_key="mystery_monthly"))
    with pytest.raises(UnmappedPrice, match="price_1Xyz") as caught:
        read(event)
    assert "mystery_monthly" in str(caught.value)


def test_an_unmapped_add_on_item_grants_nothing_and_the_mapped_item_decides() -> None:
    event = sub_event(extra_prices=(synthetic.price("price_addon_seats"),))
    assert read(event).tier == "pro"


def test_every_unmapped_price_is_named_when_no_item_maps() -> None:
    event = sub_event(price_obj=synthetic.price("price_mystery"), extra_prices=(synthetic.price("price_addon_seats"),))
    with pytest.raises(UnmappedPrice, match="price_mystery, price_addon_seats"):
        read(event)


def test_a_subscription_without_items_raises_unmapped_price() -> None:
    event = sub_event()
    event["data"]["object"]["items"]["data"] = []
    with pytest.raises(UnmappedPrice, match="no priced items"):
        read(event)


# Every status Stripe documents for a subscription, less those that entitle.
STRIPE_STATUSES = {"incomplete", "incomplete_expired", "trialing", "active", "past_due", "canceled", "unpaid", "paused"}
NON_ENTITLING = sorted(STRIPE_STATUSES - ENTITLED_STATUSES)


@pytest.mark.parametrize("status", NON_ENTITLING)
def test_a_non_entitling_subscription_with_an_unmapped_price_reads_as_free(status: str) -> None:
    """Its tier grants nothing, so an unknown price must not park it."""
    snap = read(sub_event("customer.subscription.deleted", status=status, price_obj=synthetic.price("price_mystery")))
    assert (snap.status, snap.tier, snap.price_ids) == (status, "free", ("price_mystery",))


@pytest.mark.parametrize("status", NON_ENTITLING)
def test_a_non_entitling_subscription_without_items_reads_as_free(status: str) -> None:
    event = sub_event("customer.subscription.deleted", status=status)
    del event["data"]["object"]["items"]
    snap = read(event)
    assert (snap.status, snap.tier, snap.price_ids) == (status, "free", ())


def test_a_non_entitling_subscription_with_a_mapped_price_keeps_its_tier() -> None:
    snap = read(sub_event("customer.subscription.deleted", status="canceled"))
    assert (snap.status, snap.tier) == ("canceled", "pro")


@pytest.mark.parametrize("status", sorted(ENTITLED_STATUSES))
def test_an_entitling_subscription_with_an_unmapped_price_still_raises_unmapped_price(status: str) -> None:
    with pytest.raises(UnmappedPrice, match="price_mystery"):
        read(sub_event(status=status, price_obj=synthetic.price("price_mystery")))


@pytest.mark.parametrize("status", sorted(ENTITLED_STATUSES))
def test_an_entitling_subscription_without_items_still_raises_unmapped_price(status: str) -> None:
    event = sub_event(status=status)
    del event["data"]["object"]["items"]
    with pytest.raises(UnmappedPrice, match="no priced items"):
        read(event)


@pytest.mark.parametrize("field", ["id", "customer", "status"])
def test_a_subscription_missing_what_every_version_has_raises_value_error(field: str) -> None:
    event = sub_event()
    event["data"]["object"][field] = None
    with pytest.raises(ValueError, match="without id, customer or status"):
        read(event)


def _variants() -> list[Any]:
    """Subscription objects along every branch of the reading: both period shapes, expanded or
    bare customer and price, plan-only, non-mapping items, unmapped and missing prices."""
    variants: list[Any] = [sub_event(api_version=shape.values[0])["data"]["object"] for shape in SHAPES]
    basil = sub_event(api_version=synthetic.BASIL, extra_prices=(synthetic.price("ent_yearly"),))["data"]["object"]
    basil["items"]["data"][1]["current_period_end"] = CREATED + 2 * MONTH
    basil["customer"] = synthetic.customer(customer_id="cus_expanded", email="ada@example.com")
    variants.append(basil)
    bare = sub_event()["data"]["object"]
    bare["items"]["data"][0]["price"] = "price_basic"
    bare["items"]["data"].append("si_not_an_object")
    variants.append(bare)
    plan_only = sub_event(api_version=synthetic.LEGACY_API_VERSION)["data"]["object"]
    del plan_only["items"]
    plan_only["plan"] = {"id": "ent_yearly", "object": "plan"}
    variants.append(plan_only)
    odd_numbers = sub_event(status="trialing")["data"]["object"]
    odd_numbers.update(created=True, cancel_at=1.5, canceled_at="1760000000", livemode=1)
    variants.append(odd_numbers)
    unmapped = sub_event(price_obj=synthetic.price("price_1Xyz", lookup_key="mystery"))["data"]["object"]
    variants.append(unmapped)
    no_prices = sub_event()["data"]["object"]
    no_prices["items"]["data"] = [{"id": "si_1"}, 7]
    variants.append(no_prices)
    variants.append({**sub_event()["data"]["object"], "customer": {"object": "customer"}})
    return variants


def _frozen(value: Any) -> Any:
    """``value`` with every dict made a read-only Mapping that is not a dict (lists stay lists)."""
    if isinstance(value, dict):
        return MappingProxyType({key: _frozen(inner) for key, inner in value.items()})
    if isinstance(value, list):
        return [_frozen(inner) for inner in value]
    return value


def _outcome(obj: Any) -> Any:
    try:
        return read_subscription(obj, TIERS, created=CREATED, event_type=UPDATED, event_id="evt_1")
    except (UnmappedPrice, ValueError) as exc:
        return type(exc), str(exc)


@pytest.mark.parametrize("obj", _variants())
def test_any_mapping_reads_as_the_same_json_dicts_do(obj: Any) -> None:
    """JSON-decoded dicts take a quicker type check than other Mappings: the same snapshot, or the same error."""
    assert _outcome(_frozen(obj)) == _outcome(obj)


def test_integer_fields_take_int_subclasses_but_not_bools() -> None:
    obj = sub_event()["data"]["object"]
    obj.update(created=True, cancel_at=_Seconds(CREATED + 7), trial_end=False)
    snap = read_subscription(obj, TIERS, created=CREATED, event_type=UPDATED, event_id="evt_1")
    assert (snap.stripe_created, snap.cancel_at, snap.trial_end) == (0, CREATED + 7, None)


class _Seconds(IntEnum):
    """An ``int`` that is not exactly an int."""

    LATER = CREATED + 7


def test_object_id_reads_an_id_string_or_an_expanded_object() -> None:
    assert object_id("cus_1") == "cus_1"
    assert object_id({"id": "cus_1", "object": "customer"}) == "cus_1"
    assert [object_id(v) for v in ("", None, 7, {"id": ""}, {"object": "customer"})] == [None] * 5


def test_the_snapshot_version_comes_from_the_event_not_the_object() -> None:
    snap = read(sub_event("customer.subscription.created"))
    assert snap.version == version_for("active", CREATED + 5, "customer.subscription.created", "evt_test1")


# -- version ordering (the module docstring's rules) -------------------------------------------


def test_a_terminal_snapshot_beats_a_non_terminal_one_even_when_older() -> None:
    for terminal in ("canceled", "incomplete_expired"):
        old_end = version_for(terminal, CREATED, "customer.subscription.deleted", "evt_a")
        newer = version_for("active", CREATED + 3600, UPDATED, "evt_z")
        assert old_end > newer


def test_among_non_terminal_snapshots_the_newer_created_wins_whatever_the_status() -> None:
    assert version_for("incomplete", CREATED + 1, "customer.subscription.created", "evt_a") > version_for(
        "paused", CREATED, UPDATED, "evt_z"
    )


def test_among_terminal_snapshots_the_newer_created_wins() -> None:
    assert version_for("canceled", CREATED + 1, UPDATED, "evt_a") > version_for(
        "incomplete_expired", CREATED, "customer.subscription.deleted", "evt_z"
    )


def test_within_one_second_the_status_lifecycle_decides() -> None:
    lifecycle = ["incomplete", "trialing", "active", "past_due", "unpaid", "paused"]
    # Event ids run against the lifecycle, so only the status can put them in this order.
    versions = [version_for(s, CREATED, UPDATED, f"evt_{9 - i}") for i, s in enumerate(lifecycle)]
    shuffled = random.Random(7).sample(versions, len(versions))
    assert sorted(shuffled) == versions


def test_within_one_second_and_one_status_the_event_type_decides() -> None:
    kinds = ["customer.subscription.created", UPDATED, "customer.subscription.deleted"]
    versions = [version_for("active", CREATED, kind, f"evt_{9 - i}") for i, kind in enumerate(kinds)]
    assert sorted(reversed(versions)) == versions


def test_other_subscription_event_types_rank_with_updated() -> None:
    for kind in (
        "customer.subscription.paused",
        "customer.subscription.resumed",
        "customer.subscription.trial_will_end",
    ):
        assert (
            version_for("active", CREATED, kind, "evt_x").rank == version_for("active", CREATED, UPDATED, "evt_x").rank
        )


def test_the_event_id_breaks_an_otherwise_exact_tie() -> None:
    a = version_for("active", CREATED, UPDATED, "evt_a")
    b = version_for("active", CREATED, UPDATED, "evt_b")
    assert a != b
    assert max(a, b) == max(b, a) == b


def test_the_greatest_version_is_the_same_for_any_delivery_order() -> None:
    versions = [
        version_for("incomplete", CREATED, "customer.subscription.created", "evt_1"),
        version_for("active", CREATED, UPDATED, "evt_2"),
        version_for("past_due", CREATED + 40, UPDATED, "evt_3"),
        version_for("active", CREATED + 80, UPDATED, "evt_4"),
        version_for("canceled", CREATED + 80, "customer.subscription.deleted", "evt_5"),
    ]
    winners = {max(order) for order in itertools.permutations(versions)}
    assert winners == {versions[-1]}
