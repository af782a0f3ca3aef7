"""The one scrubber (kamiyo.scrub): credentials out of every output, non-printables escaped."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from kamiyo.logs import configure_logging
from kamiyo.scrub import MAX_DEPTH, REDACTED, TOO_DEEP, clean, escape, is_secret_key, redact, scrub


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ({"client_secret": "pi_1_secret_2"}, {"client_secret": REDACTED}),
        (
            {"webhook_secret": "x", "password": "y", "api_key": "z"},
            dict.fromkeys(("webhook_secret", "password", "api_key"), REDACTED),
        ),
        ({"client_secret": None}, {"client_secret": None}),
        ({"items": [{"token": "tok_1"}, {"id": "si_1"}]}, {"items": [{"token": REDACTED}, {"id": "si_1"}]}),
        ({"description": "whsec_abc123 leaked"}, {"description": f"{REDACTED} leaked"}),
        ({"id": "cus_1", "email": "a@b.c", "amount": 2900}, {"id": "cus_1", "email": "a@b.c", "amount": 2900}),
    ],
)
def test_redact_replaces_values_under_secret_keys_and_strings_shaped_like_stripe_secrets(
    value: dict[str, Any], expected: dict[str, Any]
) -> None:
    assert redact(value) == expected


@pytest.mark.parametrize(
    "key",
    [
        "secret_key",
        "private_key",
        "session_token",
        "apiKey",
        "APIKey",
        "api-key",
        "clientSecret",
        "Authorization",
        "X-Auth-Token",
        "refresh_token",
        "PASSWORD",
        "db_passwd",
        "cookie",
        "access_key",
    ],
)
def test_keys_naming_a_credential_in_any_case_or_style_are_secret(key: str) -> None:
    assert is_secret_key(key)
    assert redact({key: "value"}) == {key: REDACTED}


@pytest.mark.parametrize(
    "key",
    ["lookup_key", "idempotency_key", "publishable_key", "tokenization_method", "three_d_secure", "id", "keys"],
)
def test_stripe_fields_that_hold_no_credential_are_kept(key: str) -> None:
    assert not is_secret_key(key)
    assert redact({key: "value"}) == {key: "value"}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Stripe said: bad key rk_test_51Hx for pi_9_secret_abc", f"Stripe said: bad key {REDACTED} for {REDACTED}"),
        ("evt_whsec_abc123", f"evt_{REDACTED}"),  # inside an id: no word boundary needed
        ("evt_1sk_live_XYZ", f"evt_1{REDACTED}"),
        ("ek_live_abc and ek_test_def", f"{REDACTED} and {REDACTED}"),
        ("sk_test_51Hx/rk_live_9", f"{REDACTED}/{REDACTED}"),
        ("seti_1_secret_x cs_test_a1_secret_b2", f"{REDACTED} {REDACTED}"),
        ("sent Bearer abc.def.ghi-jkl", f"sent Bearer {REDACTED}"),
        ("Authorization: Basic dXNlcjpwYXNz", f"Authorization: Basic {REDACTED}"),
        ('{"authorization": "tok_12345"}', f'{{"authorization": "{REDACTED}"}}'),
    ],
)
def test_scrub_replaces_credential_shaped_values_anywhere_in_a_string(text: str, expected: str) -> None:
    assert scrub(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "user state changed tier free->basic status=active",
        "a basic subscription for pk_live_abc",
        "webhook accepted event=evt_1Pabc type=customer.subscription.updated",
        "STRIPE_WEBHOOK_SECRET: secret #1 must look like whsec... (letters and digits)",
    ],
)
def test_ordinary_text_is_left_alone(text: str) -> None:
    assert scrub(text) == text


def test_deeply_nested_data_is_cut_instead_of_overflowing_the_stack() -> None:
    value: Any = "leaf"
    for _ in range(990):
        value = {"a": [value]}
    redacted = redact(value)
    depth = 0
    while isinstance(redacted, dict | list):
        redacted = redacted["a"] if isinstance(redacted, dict) else redacted[0]
        depth += 1
    assert redacted == TOO_DEEP
    assert depth == MAX_DEPTH


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("line\nforged", "line\\nforged"),
        ("\x1b[31mred", "\\x1b[31mred"),
        ("nel\x85here", "nel\\x85here"),
        ("ls\u2028ps\u2029", "ls\\u2028ps\\u2029"),
        ("tab\tcr\r", "tab\\tcr\\r"),
        ("nul\x00del\x7f", "nul\\x00del\\x7f"),
        ("café ✓ 日本", "café ✓ 日本"),
    ],
)
def test_escape_makes_every_non_printable_character_visible(text: str, expected: str) -> None:
    assert escape(text) == expected
    assert clean(text) == expected


def test_a_log_line_can_neither_be_forged_nor_carry_a_secret(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("INFO")
    log = logging.getLogger("kamiyo.test")
    log.warning("admin unauthorized path=%s", "/admin\n2026-01-01T00:00:00+0000 INFO kamiyo.webhook forged whsec_abc")
    try:
        raise ValueError("bad\n2026-01-01T00:00:00+0000 INFO kamiyo.webhook forged sk_live_abc")
    except ValueError:
        log.exception("failed for \x1b]0;title\x07 %s", "\u2028")
    lines = capsys.readouterr().err.splitlines()
    records = [line for line in lines if not line.startswith(" ")]
    assert len(records) == 2
    assert records[0].endswith(f"path=/admin\\n2026-01-01T00:00:00+0000 INFO kamiyo.webhook forged {REDACTED}")
    assert records[1].endswith("failed for \\x1b]0;title\\x07 \\u2028")
    assert lines[-2:] == [
        "    ValueError: bad",
        f"    2026-01-01T00:00:00+0000 INFO kamiyo.webhook forged {REDACTED}",
    ]
    written = "\n".join(lines)
    assert "whsec_abc" not in written
    assert "sk_live_abc" not in written
