"""Who may use the console: the bearer token, the signed session cookie, its CSRF token; and the setting."""

from __future__ import annotations

import pytest

from kamiyo.config import load_settings
from kamiyo.errors import ConfigError
from kamiyo.web.admin_auth import AdminAuth, Operator, Refusal, clean_actor

TOKEN = "unit-admin-token-0123456789abcdef"
NOW = 1_800_000_000.0


@pytest.fixture
def auth() -> AdminAuth:
    return AdminAuth(TOKEN, session_seconds=3600)


def test_the_right_bearer_token_authenticates_with_the_actor_header_as_the_name(auth: AdminAuth) -> None:
    operator = auth.authenticate(f"Bearer {TOKEN}", None, NOW, actor_header="ops-bot")
    assert operator == Operator("bearer", "ops-bot")
    assert operator.audit_name == "api:ops-bot"
    assert auth.authenticate(f"bearer  {TOKEN} ", None, NOW) == Operator("bearer", "admin-api")


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        (f"Bearer {TOKEN}x", "bad_token"),
        (f"Bearer {TOKEN[:-1]}", "bad_token"),
        ("Bearer ", "bad_scheme"),
        (f"Basic {TOKEN}", "bad_scheme"),
        (TOKEN, "bad_scheme"),
        ("Bearer tökén-with-ünicode-0000", "bad_token"),
    ],
)
def test_a_wrong_or_malformed_authorization_header_is_refused(auth: AdminAuth, header: str, reason: str) -> None:
    assert auth.authenticate(header, None, NOW) == Refusal(reason)


def test_a_wrong_bearer_token_is_refused_even_with_a_valid_session_cookie(auth: AdminAuth) -> None:
    cookie = auth.new_session("ann", NOW)
    assert auth.authenticate("Bearer wrong-token-000000000", cookie, NOW) == Refusal("bad_token")


def test_no_credentials_at_all_is_refused_as_missing(auth: AdminAuth) -> None:
    assert auth.authenticate(None, None, NOW) == Refusal("missing")
    assert auth.authenticate(None, "", NOW) == Refusal("missing")


def test_a_session_cookie_carries_the_signed_in_name_and_never_the_token(auth: AdminAuth) -> None:
    cookie = auth.new_session("ann", NOW)
    assert TOKEN not in cookie
    operator = auth.authenticate(None, cookie, NOW + 10)
    assert isinstance(operator, Operator)
    assert (operator.via, operator.actor, operator.audit_name) == ("session", "ann", "console:ann")
    assert operator.csrf == auth.csrf_token(cookie)


def test_a_session_expires_after_its_lifetime_and_is_not_valid_before_it_was_issued(auth: AdminAuth) -> None:
    cookie = auth.new_session("ann", NOW)
    assert isinstance(auth.read_session(cookie, NOW + 3600), Operator)
    assert auth.read_session(cookie, NOW + 3601) == Refusal("expired_session")
    assert auth.read_session(cookie, NOW - 3600) == Refusal("expired_session")


def test_an_altered_session_cookie_is_refused(auth: AdminAuth) -> None:
    version, issued, actor, mac = auth.new_session("ann", NOW).split(".")
    for forged in (
        f"{version}.{int(issued) + 1}.{actor}.{mac}",
        f"{version}.{issued}.Ym9i.{mac}",
        f"{version}.{issued}.{actor}.{mac[:-1]}A",
        f"v2.{issued}.{actor}.{mac}",
        f"{version}.{issued}.{actor}",
        "garbage",
    ):
        assert auth.read_session(forged, NOW) == Refusal("bad_session"), forged


def test_a_session_signed_with_another_token_is_refused_so_rotating_the_token_signs_everyone_out() -> None:
    old = AdminAuth("the-previous-admin-token-000000").new_session("ann", NOW)
    assert AdminAuth(TOKEN).read_session(old, NOW) == Refusal("bad_session")


def test_the_csrf_token_matches_only_its_own_session(auth: AdminAuth) -> None:
    first, second = auth.new_session("ann", NOW), auth.new_session("bob", NOW)
    assert auth.csrf_matches(first, auth.csrf_token(first))
    assert not auth.csrf_matches(first, auth.csrf_token(second))
    assert not auth.csrf_matches(first, None)
    assert not auth.csrf_matches(first, "")


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("ann", "ann"),
        ("  Ann O'Neil ", "Ann ONeil"),
        ("evil\nadmin signed in actor=root", "eviladmin signed in actorroot"),
        ("", "console"),
        (None, "console"),
        ("<script>", "script"),
        ("x" * 100, "x" * 64),
    ],
)
def test_an_operators_name_is_made_safe_for_log_lines_and_the_audit_log(raw: str | None, expected: str) -> None:
    assert clean_actor(raw, "console") == expected


# -- the setting ----------------------------------------------------------------------------


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
