"""Stripe's two modes, live and test: which one an event or an API key belongs to.

Pure functions. An event says ``livemode: true`` in live mode; an API key names its mode in its
prefix (``sk_live_``/``rk_live_``, ``sk_test_``/``rk_test_``). The service takes events of one
mode (``STRIPE_MODE``, else its key's mode) or, with neither, of both. An event of the other mode
is stored as ignored, with the reason from ``other_mode_detail``, and changes no user.
"""

from __future__ import annotations

LIVE, TEST = "live", "test"
MODES = (LIVE, TEST)
_KEY_PREFIXES = {"sk_live_": LIVE, "rk_live_": LIVE, "sk_test_": TEST, "rk_test_": TEST}


def key_mode(key: str | None) -> str | None:
    """The mode of a secret or restricted API key, or None when its prefix names none."""
    for prefix, mode in _KEY_PREFIXES.items():
        if key and key.startswith(prefix):
            return mode
    return None


def event_mode(livemode: bool) -> str:
    return LIVE if livemode else TEST


def ignored_livemode(mode: str | None) -> bool | None:
    """The ``livemode`` of the events a service taking ``mode`` ignores; None when it takes both.

    The webhook endpoint compares each event's ``livemode`` with this one value."""
    return None if mode is None else mode == TEST


def other_mode_detail(livemode: bool, mode: str | None) -> str | None:
    """Why an event of ``livemode`` is ignored by a service taking ``mode``; None when it is taken."""
    if mode is None or event_mode(livemode) == mode:
        return None
    return f"{event_mode(livemode)}-mode event ignored: this service takes {mode}-mode events only (STRIPE_MODE)"
