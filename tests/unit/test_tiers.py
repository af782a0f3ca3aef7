"""STRIPE_PRICE_TIERS parsing, the tier a price grants, and how tiers rank."""

from __future__ import annotations

import re

import pytest

from kamiyo import synthetic
from kamiyo.domain.tiers import FREE, TierMap, parse_price_tiers

TIERS = parse_price_tiers("price_basic=basic,pro_monthly=pro,price_ent=enterprise")


def test_a_price_id_in_the_list_grants_its_tier() -> None:
    assert TIERS.tier_for_price(synthetic.price("price_basic")) == "basic"


def test_a_lookup_key_in_the_list_grants_its_tier() -> None:
    assert TIERS.tier_for_price(synthetic.price("price_1Q2w3E", lookup_key="pro_monthly")) == "pro"


def test_the_price_id_wins_when_both_id_and_lookup_key_are_listed() -> None:
    assert TIERS.tier_for_price(synthetic.price("price_basic", lookup_key="pro_monthly")) == "basic"


def test_a_price_neither_listed_nor_tagged_grants_nothing() -> None:
    assert TIERS.tier_for_price(synthetic.price("price_unknown", lookup_key="nope")) is None
    assert TIERS.tier_for_price({}) is None


def test_tiers_rank_by_first_appearance_later_is_higher() -> None:
    assert TIERS.rank("basic") < TIERS.rank("pro") < TIERS.rank("enterprise")


def test_a_tier_listed_again_keeps_the_rank_of_its_first_appearance() -> None:
    tiers = parse_price_tiers("a=basic,b=pro,c=basic,d=enterprise")
    assert tiers.rank("basic") < tiers.rank("pro") < tiers.rank("enterprise")
    assert tiers.tier_for_price({"id": "c"}) == "basic"


def test_free_ranks_lowest_even_when_listed_after_other_tiers() -> None:
    tiers = parse_price_tiers("price_pro=pro,price_zero=free")
    assert tiers.rank(FREE) == 0
    assert tiers.rank(FREE) < tiers.rank("pro")
    assert tiers.tier_for_price({"id": "price_zero"}) == FREE


def test_an_empty_setting_maps_nothing_and_knows_only_free() -> None:
    for raw in ("", " , ,"):
        tiers = parse_price_tiers(raw)
        assert tiers.by_key == {}
        assert dict(tiers.ranks) == {FREE: 0}


def test_the_default_tier_map_maps_nothing() -> None:
    assert TierMap().tier_for_price(synthetic.price("price_basic")) is None
    assert TierMap().rank(FREE) == 0


def test_whitespace_and_empty_entries_in_the_setting_are_ignored() -> None:
    tiers = parse_price_tiers("  price_basic = basic , ,pro_monthly=pro,")
    assert dict(tiers.by_key) == {"price_basic": "basic", "pro_monthly": "pro"}


def test_the_same_key_mapped_twice_to_the_same_tier_is_accepted() -> None:
    assert dict(parse_price_tiers("p=pro,p=pro").by_key) == {"p": "pro"}


def test_metadata_tier_is_the_fallback_for_an_unlisted_price() -> None:
    assert TIERS.tier_for_price(synthetic.price("price_team", tier="team")) == "team"


def test_metadata_tier_is_trimmed_and_lower_cased() -> None:
    assert TIERS.tier_for_price(synthetic.price("price_team", tier="  Team ")) == "team"


def test_the_list_wins_over_metadata_tier() -> None:
    assert TIERS.tier_for_price(synthetic.price("price_basic", tier="enterprise")) == "basic"


@pytest.mark.parametrize("metadata", [{"tier": "not a tier!"}, {"tier": ""}, {"tier": 3}, "tier=pro", None])
def test_an_unusable_metadata_tier_grants_nothing(metadata: object) -> None:
    price = synthetic.price("price_odd")
    price["metadata"] = metadata
    assert TIERS.tier_for_price(price) is None


def test_a_metadata_only_tier_ranks_above_free_and_below_every_listed_tier() -> None:
    team = TIERS.rank("team")
    assert TIERS.rank(FREE) < team < TIERS.rank("basic")


def test_a_metadata_tier_that_the_list_names_keeps_its_listed_rank() -> None:
    tier = TIERS.tier_for_price(synthetic.price("price_other", tier="Enterprise"))
    assert tier == "enterprise"
    assert TIERS.rank(tier) > TIERS.rank("pro")


@pytest.mark.parametrize(
    ("raw", "entry"),
    [
        pytest.param("price_basic=basic,price_x", "price_x", id="no-equals"),
        pytest.param("=pro", "=pro", id="no-key"),
        pytest.param("price_x=", "price_x=", id="no-tier"),
        pytest.param("price_x=Pro", "price_x=Pro", id="uppercase-tier"),
        pytest.param("price_x=pro tier", "price_x=pro tier", id="tier-with-space"),
        pytest.param("price_x=a=b", "price_x=a=b", id="two-equals"),
        pytest.param("price_x=" + "t" * 33, "price_x=" + "t" * 33, id="tier-too-long"),
    ],
)
def test_a_bad_entry_raises_value_error_naming_the_entry(raw: str, entry: str) -> None:
    with pytest.raises(ValueError, match=re.escape(repr(entry))):
        parse_price_tiers(raw)


def test_a_key_mapped_to_two_tiers_raises_value_error_naming_the_key_and_both_tiers() -> None:
    with pytest.raises(ValueError, match="mapped twice") as caught:
        parse_price_tiers("price_x=basic,price_x=pro")
    assert all(name in str(caught.value) for name in ("'price_x'", "'basic'", "'pro'"))
