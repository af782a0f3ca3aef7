"""Who may use the console: admin tokens by name, the Authorization header, session cookies, CSRF; the settings."""

from __future__ import annotations

import pytest

from kamiyo.config import load_settings
from kamiyo.errors import ConfigError
from kamiyo.web.admin_auth import (
    AdminTokens,
    Bearer,
    Operator,
    Refusal,
    clean_actor,
    csrf_matches,
    csrf_token,
    is_session_cookie,
    new_session_cookie,
    read_authorization,
    session_hash,
)

TOKEN = "unit-admin-token-0123456789abcdef"
ANN_TOKEN = "ann-own-token-0123456789abcdef00"


@pytest.fixture
def tokens() -> AdminTokens:
    return AdminTokens([("shared", TOKEN), ("ann", ANN_TOKEN)])


def test_a_token_is_known_by_its_name_and_nothing_else_matches(tokens: AdminTokens) -> None:
    assert tokens.match(TOKEN) == "shared"
    assert tokens.match(ANN_TOKEN) == "ann"
    for wrong in (TOKEN + "x", TOKEN[:-1], "", "tökén-with-ünicode-0000", "x" * 100_000):
        assert tokens.match(wrong) is None, wrong[:40]


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, None),
        (f"Bearer {TOKEN}", Bearer(TOKEN)),
        (f"bearer  {TOKEN} ", Bearer(TOKEN)),
        ("Bearer ", Refusal("bad_scheme")),
        ("Bearer", Refusal("bad_scheme")),
        # Another scheme is not ours: it neither proves nor refuses (a proxy's Basic beside a session).
        (f"Basic {TOKEN}", None),
        ("Basic dXNlcjpwYXNz", None),
        (TOKEN, None),
    ],
)
def test_only_a_bearer_authorization_header_decides(header: str | None, expected: Bearer | Refusal | None) -> None:
    assert read_authorization(header) == expected


def test_a_session_cookie_is_random_and_the_database_key_is_its_hash() -> None:
    first, second = new_session_cookie(), new_session_cookie()
    assert first != second
    assert is_session_cookie(first)
    assert session_hash(first) != first
    assert len(session_hash(first)) == 64
    for bad in ("v1.1700000000.YW5u.forged", first + "A", first[:-1], "garbage", ""):
        assert not is_session_cookie(bad), bad


def test_a_sessions_token_check_changes_with_the_operators_token_so_rotating_it_ends_the_session(
    tokens: AdminTokens,
) -> None:
    cookie = new_session_cookie()
    check = tokens.session_check("ann", cookie)
    assert check is not None
    assert ANN_TOKEN not in check
    rotated = AdminTokens([("shared", TOKEN), ("ann", "ann-rotated-token-0123456789abcd")])
    assert rotated.session_check("ann", cookie) != check
    assert AdminTokens([("shared", TOKEN)]).session_check("ann", cookie) is None  # the name was removed
    assert tokens.session_check("ann", new_session_cookie()) != check


def test_the_csrf_token_matches_only_its_own_session() -> None:
    first, second = new_session_cookie(), new_session_cookie()
    assert csrf_matches(first, csrf_token(first))
    assert not csrf_matches(first, csrf_token(second))
    assert not csrf_matches(first, None)
    assert not csrf_matches(first, "")
    assert not csrf_matches(first, "tökén")


def test_the_audit_name_is_the_tokens_name_whatever_was_claimed() -> None:
    assert Operator("bearer", "ann", "bob").audit_name == "api:ann"
    assert Operator("session", "shared", "Ann O").audit_name == "console:shared"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("ann", "ann"),
        ("  Ann O'Neil ", "Ann ONeil"),
        ("evil\nadmin signed in actor=root", "eviladmin signed in actorroot"),
        ("", None),
        (None, None),
        ("<script>", "script"),
        ("x" * 100, "x" * 64),
    ],
)
def test_a_claimed_name_is_made_safe_for_log_lines_and_the_audit_log(raw: str | None, expected: str | None) -> None:
    assert clean_actor(raw) == expected


# -- the settings ---------------------------------------------------------------------------


def test_without_kamiyo_admin_token_the_console_is_off() -> None:
    assert load_settings({}, env_file=None).admin_token is None
    assert load_settings({"KAMIYO_ADMIN_TOKEN": ""}, env_file=None).admin_token is None


def test_kamiyo_admin_token_is_read_and_never_shown_in_the_settings_repr() -> None:
    settings = load_settings({"KAMIYO_ADMIN_TOKEN": TOKEN}, env_file=None)
    assert settings.admin_token == TOKEN
    assert TOKEN not in repr(settings)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("short-token", "too short"),
        (" " + TOKEN, "whitespace"),
        (f'"{TOKEN}"', "quotes"),
        (TOKEN + "é", "non-ASCII"),
        (TOKEN[:8] + " " + TOKEN[8:], "whitespace"),
    ],
)
def test_a_weak_or_malformed_admin_token_stops_the_start_naming_the_setting_but_not_its_value(
    value: str, message: str
) -> None:
    with pytest.raises(ConfigError, match="KAMIYO_ADMIN_TOKEN") as caught:
        load_settings({"KAMIYO_ADMIN_TOKEN": value}, env_file=None)
    assert message in str(caught.value)
    assert value.strip(' "') not in str(caught.value)


def test_operators_tokens_are_read_by_name_beside_the_shared_one_and_never_shown() -> None:
    settings = load_settings(
        {"KAMIYO_ADMIN_TOKEN": TOKEN, "KAMIYO_ADMIN_TOKENS": f"ann:{ANN_TOKEN}, bob.b:bob-token-0123456789abcdef"},
        env_file=None,
    )
    assert settings.admin_tokens == (("ann", ANN_TOKEN), ("bob.b", "bob-token-0123456789abcdef"))
    assert settings.admin_enabled
    assert ANN_TOKEN not in repr(settings)
    alone = load_settings({"KAMIYO_ADMIN_TOKENS": f"ann:{ANN_TOKEN}"}, env_file=None)
    assert (alone.admin_token, alone.admin_enabled) == (None, True)
    assert not load_settings({}, env_file=None).admin_enabled


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (f"ann:{ANN_TOKEN},ann:other-token-0123456789abcdef", "appears twice"),
        (f"ann:{ANN_TOKEN},bob:{ANN_TOKEN}", "every token must be different"),
        (f"ann:{TOKEN}", "every token must be different"),  # the shared token's
        ("ann:short", "too short"),
        (f"ann {ANN_TOKEN}", "name:token"),
        (f"a/b:{ANN_TOKEN}", "name:token"),
        (f"shared:{ANN_TOKEN}", "shared"),
        (f"ann:{ANN_TOKEN[:8]} {ANN_TOKEN[8:]}", "whitespace"),
        ("ann:", "has no token"),
    ],
)
def test_a_malformed_operators_token_list_stops_the_start_naming_the_setting_but_no_token(
    value: str, message: str
) -> None:
    with pytest.raises(ConfigError, match="KAMIYO_ADMIN_TOKENS") as caught:
        load_settings({"KAMIYO_ADMIN_TOKEN": TOKEN, "KAMIYO_ADMIN_TOKENS": value}, env_file=None)
    assert message in str(caught.value)
    assert ANN_TOKEN not in str(caught.value)
    assert TOKEN not in str(caught.value)


def test_the_consoles_limits_are_settings_with_bounds() -> None:
    defaults = load_settings({}, env_file=None)
    assert (defaults.admin_signin_max_failures, defaults.admin_signin_window_seconds) == (10, 300)
    assert (defaults.admin_max_form_bytes, defaults.admin_max_json_bytes) == (4096, 16384)
    assert defaults.admin_session_seconds == 12 * 3600
    assert defaults.forwarded_allow_ips == "127.0.0.1,::1"
    for name, value in (
        ("ADMIN_SIGNIN_MAX_FAILURES", "0"),
        ("ADMIN_SIGNIN_WINDOW_SECONDS", "²"),
        ("ADMIN_MAX_JSON_BYTES", "9" * 5000),
        ("ADMIN_MAX_FORM_BYTES", "10"),
        ("ADMIN_SESSION_SECONDS", "-1"),
        ("FORWARDED_ALLOW_IPS", "10.0.0.1,proxy.example"),
    ):
        with pytest.raises(ConfigError, match=name):
            load_settings({name: value}, env_file=None)
    assert load_settings({"FORWARDED_ALLOW_IPS": "10.0.0.0/8, ::1"}, env_file=None).forwarded_allow_ips == (
        "10.0.0.0/8, ::1"
    )
