"""Stripe's live and test modes: of a key, of an event, and which events a service ignores."""

from __future__ import annotations

import pytest

from kamiyo.domain.modes import LIVE, TEST, event_mode, ignored_livemode, key_mode, other_mode_detail


@pytest.mark.parametrize(
    ("key", "mode"),
    [
        ("sk_live_abc", LIVE),
        ("rk_live_abc", LIVE),
        ("sk_test_abc", TEST),
        ("rk_test_abc", TEST),
        ("sk_abc", None),
        ("pk_live_abc", None),
        ("", None),
        (None, None),
    ],
)
def test_a_key_names_its_mode_in_its_prefix(key: str | None, mode: str | None) -> None:
    assert key_mode(key) == mode


def test_a_service_of_one_mode_ignores_the_other_modes_events_and_one_of_no_mode_ignores_none() -> None:
    assert (ignored_livemode(LIVE), ignored_livemode(TEST), ignored_livemode(None)) == (False, True, None)
    for livemode in (True, False):
        assert other_mode_detail(livemode, None) is None
        assert other_mode_detail(livemode, event_mode(livemode)) is None
    assert other_mode_detail(False, LIVE) == (
        "test-mode event ignored: this service takes live-mode events only (STRIPE_MODE)"
    )
    assert other_mode_detail(True, TEST) == (
        "live-mode event ignored: this service takes test-mode events only (STRIPE_MODE)"
    )
