"""Settings from the environment and an optional .env file; a malformed value fails loudly, by name."""

from __future__ import annotations

from pathlib import Path

import pytest

from kamiyo.config import DEFAULT_DATABASE_URL, Settings, load_settings
from kamiyo.domain.tiers import FREE
from kamiyo.errors import ConfigError

SECRET = "whsec_test_primary_0123456789abcdef"
OLD_SECRET = "whsec_test_rolled_fedcba9876543210"


def load(environ: dict[str, str], env_file: Path | None = None) -> Settings:
    return load_settings(environ=environ, env_file=env_file)


def test_an_empty_environment_gives_the_defaults() -> None:
    settings = load({})
    assert settings.webhook_secrets == ()
    assert settings.database_url == DEFAULT_DATABASE_URL
    assert (settings.host, settings.port, settings.log_level) == ("0.0.0.0", 8000, "INFO")
    assert settings.log_format == "text"
    assert settings.max_body_bytes == 1024 * 1024
    assert settings.signature_tolerance == 300
    assert settings.worker_in_process is True
    assert dict(settings.price_tiers.ranks) == {FREE: 0}
    assert dict(settings.price_tiers.by_key) == {}


@pytest.mark.parametrize(("raw", "expected"), [("json", "json"), (" JSON ", "json"), ("text", "text"), ("", "text")])
def test_log_format_is_text_or_json(raw: str, expected: str) -> None:
    assert load({"LOG_FORMAT": raw}).log_format == expected


def test_a_missing_env_file_is_not_an_error(tmp_path: Path) -> None:
    assert load({}, env_file=tmp_path / "absent.env").port == 8000


def test_values_are_read_from_the_env_file(tmp_path: Path) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text(
        f"STRIPE_WEBHOOK_SECRET={SECRET}\nSTRIPE_PRICE_TIERS=price_pro=pro\nPORT=9000\nLOG_LEVEL=debug\n"
    )
    settings = load({}, env_file=env_file)
    assert settings.webhook_secrets == (SECRET,)
    assert settings.price_tiers.tier_for_price({"id": "price_pro"}) == "pro"
    assert (settings.port, settings.log_level) == (9000, "DEBUG")


def test_a_real_environment_variable_wins_over_the_env_file(tmp_path: Path) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text(f"PORT=9000\nSTRIPE_WEBHOOK_SECRET={OLD_SECRET}\n")
    settings = load({"PORT": "9100"}, env_file=env_file)
    assert settings.port == 9100
    assert settings.webhook_secrets == (OLD_SECRET,)


def test_quotes_in_the_env_file_are_dotenv_syntax_not_part_of_the_secret(tmp_path: Path) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text(f'STRIPE_WEBHOOK_SECRET="{SECRET}"\n')
    assert load({}, env_file=env_file).webhook_secrets == (SECRET,)


def test_comma_separated_secrets_are_all_kept_in_order() -> None:
    settings = load({"STRIPE_WEBHOOK_SECRET": f"{SECRET},{OLD_SECRET}"})
    assert settings.webhook_secrets == (SECRET, OLD_SECRET)


def test_empty_entries_between_commas_are_ignored() -> None:
    assert load({"STRIPE_WEBHOOK_SECRET": f",{SECRET},,"}).webhook_secrets == (SECRET,)


@pytest.mark.parametrize(
    "url",
    [
        "postgres://kamiyo:pw@db.internal:5432/kamiyo",
        "postgresql://kamiyo:pw@db.internal:5432/kamiyo",
        "postgresql+psycopg://kamiyo:pw@db.internal:5432/kamiyo",
    ],
)
def test_a_postgres_url_is_normalised_to_psycopg_3(url: str) -> None:
    assert load({"DATABASE_URL": url}).database_url == "postgresql+psycopg://kamiyo:pw@db.internal:5432/kamiyo"


def test_a_sqlite_url_is_kept() -> None:
    assert load({"DATABASE_URL": "sqlite:////var/lib/kamiyo.db"}).database_url == "sqlite:////var/lib/kamiyo.db"


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("PORT", "abc"),
        ("PORT", "0"),
        ("PORT", "65536"),
        ("PORT", "80.5"),
        ("STRIPE_WEBHOOK_SECRET", "sk_test_51HnotAWebhookSecret"),
        ("STRIPE_WEBHOOK_SECRET", "whsec_"),
        ("STRIPE_WEBHOOK_SECRET", f'"{SECRET}"'),
        ("STRIPE_WEBHOOK_SECRET", f"'{SECRET}'"),
        ("STRIPE_WEBHOOK_SECRET", f" {SECRET}"),
        ("STRIPE_WEBHOOK_SECRET", f"{SECRET}\n"),
        ("STRIPE_WEBHOOK_SECRET", f"{SECRET},whsec_bad secret"),
        ("STRIPE_PRICE_TIERS", "price_pro"),
        ("STRIPE_PRICE_TIERS", "price_pro=Pro"),
        ("STRIPE_PRICE_TIERS", "price_pro=pro,price_pro=basic"),
        ("DATABASE_URL", "mysql://kamiyo@db/kamiyo"),
        ("DATABASE_URL", "postgresql+asyncpg://kamiyo@db/kamiyo"),
        ("DATABASE_URL", "not a url"),
        ("DATABASE_URL", "postgresql://kamiyo:pw@db:notaport/kamiyo"),
        ("LOG_LEVEL", "verbose"),
        ("LOG_FORMAT", "yaml"),
        ("LOG_FORMAT", "TEXT,json"),
        ("WEBHOOK_MAX_BODY_BYTES", "1"),
        ("WEBHOOK_TOLERANCE_SECONDS", "-5"),
        ("WORKER_IN_PROCESS", "maybe"),
        ("WORKER_POLL_SECONDS", "soon"),
        ("WORKER_POLL_SECONDS", "nan"),
        ("SQLITE_SYNCHRONOUS", "OFF"),
        ("HEALTH_SILENCE_SECONDS", "-1"),
        ("HEALTH_MIN_SUCCESS_RATIO", "95%"),
        ("HEALTH_MIN_SUCCESS_RATIO", "1.5"),
        ("HEALTH_BACKLOG_MAX_AGE_SECONDS", "0"),
    ],
)
def test_a_malformed_value_raises_config_error_naming_the_variable(name: str, value: str) -> None:
    with pytest.raises(ConfigError, match=f"^{name}: "):
        load({name: value})


def test_a_malformed_value_in_the_env_file_also_names_the_variable(tmp_path: Path) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text("PORT=eighty\n")
    with pytest.raises(ConfigError, match=r"^PORT: "):
        load({}, env_file=env_file)


@pytest.mark.parametrize(
    ("name", "value", "secret"),
    [
        ("STRIPE_WEBHOOK_SECRET", f" {SECRET}", SECRET),
        ("STRIPE_WEBHOOK_SECRET", "sk_live_51HrealApiKeyPastedHere", "sk_live_51HrealApiKeyPastedHere"),
        ("DATABASE_URL", "postgresql://kamiyo:hunter2@db:notaport/kamiyo", "hunter2"),
        ("DATABASE_URL", "not a url hunter2", "hunter2"),
    ],
)
def test_a_config_error_never_echoes_a_secret(name: str, value: str, secret: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load({name: value})
    assert secret not in str(caught.value)


def test_repr_never_shows_a_webhook_secret_or_the_database_password() -> None:
    settings = load(
        {
            "STRIPE_WEBHOOK_SECRET": f"{SECRET},{OLD_SECRET}",
            "DATABASE_URL": "postgresql://kamiyo:hunter2@db.internal:5432/kamiyo",
        }
    )
    for text in (repr(settings), str(settings), f"{settings}", f"{settings!r}"):
        assert SECRET not in text
        assert OLD_SECRET not in text
        assert "hunter2" not in text
    assert "secrets=2" in repr(settings)
    assert "db.internal" in repr(settings)


def test_webhook_health_limits_are_read_from_the_environment() -> None:
    settings = load(
        {"HEALTH_SILENCE_SECONDS": "0", "HEALTH_MIN_SUCCESS_RATIO": "0.99", "HEALTH_BACKLOG_MAX_AGE_SECONDS": "120"}
    )
    assert (
        settings.health_silence_seconds,
        settings.health_min_success_ratio,
        settings.health_backlog_max_age_seconds,
    ) == (0, 0.99, 120)


def test_the_in_process_worker_takes_smaller_batches_than_a_worker_process() -> None:
    """(The rule moved with the in-process worker from web/app.py to processing/in_process.py.)"""
    from kamiyo.processing.in_process import IN_PROCESS_BATCH, in_process_settings

    assert in_process_settings(load({})).worker_batch_size == IN_PROCESS_BATCH < load({}).worker_batch_size
    assert in_process_settings(load({"WORKER_BATCH_SIZE": "10"})).worker_batch_size == 10


# -- Stripe's mode, retention and replay bounds --------------------------------------------------


@pytest.mark.parametrize(
    ("environ", "mode"),
    [
        ({}, None),
        ({"STRIPE_SECRET_KEY": "sk_live_abc123"}, "live"),
        ({"STRIPE_SECRET_KEY": "rk_live_abc123"}, "live"),
        ({"STRIPE_SECRET_KEY": "sk_test_abc123"}, "test"),
        ({"STRIPE_SECRET_KEY": "rk_test_abc123"}, "test"),
        ({"STRIPE_SECRET_KEY": "sk_abc123"}, None),  # a key whose prefix names no mode
        ({"STRIPE_MODE": "live"}, "live"),
        ({"STRIPE_MODE": " TEST "}, "test"),
        ({"STRIPE_MODE": "live", "STRIPE_SECRET_KEY": "rk_live_abc123"}, "live"),
        ({"STRIPE_MODE": "test", "STRIPE_SECRET_KEY": "sk_abc123"}, "test"),
    ],
)
def test_the_service_mode_is_stripe_mode_else_the_keys_else_both(environ: dict[str, str], mode: str | None) -> None:
    assert load(environ).stripe_mode == mode


@pytest.mark.parametrize(
    ("mode", "key"), [("live", "sk_test_abc123"), ("test", "rk_live_abc123"), ("test", "sk_live_abc123")]
)
def test_stripe_mode_contradicting_the_keys_mode_stops_the_start_without_echoing_the_key(mode: str, key: str) -> None:
    with pytest.raises(ConfigError, match=f"^STRIPE_MODE: {mode} contradicts STRIPE_SECRET_KEY") as caught:
        load({"STRIPE_MODE": mode, "STRIPE_SECRET_KEY": key})
    assert key not in str(caught.value)


@pytest.mark.parametrize(
    "base",
    [
        "http://api.stripe.com",
        "http://evil.example:8080",
        "HTTP://api.stripe.com",
        "http://10.0.0.5",
        "http://127.0.0.1@evil.example",  # user info: the host is evil.example
        "http://localhost.evil.example",
        "http://[::ffff:8.8.8.8]",
        "ftp://127.0.0.1",
        "http://[::1",
    ],
)
def test_stripe_api_base_over_plain_http_to_another_machine_stops_the_start(base: str) -> None:
    with pytest.raises(ConfigError, match=r"^STRIPE_API_BASE: "):
        load({"STRIPE_API_BASE": base})


@pytest.mark.parametrize(
    "base",
    [
        "https://api.stripe.com",
        "https://stripe-proxy.internal:8443/",
        "http://127.0.0.1:12111",
        "http://127.8.9.10",
        "http://localhost:12111",
        "http://LOCALHOST",
        "http://[::1]:12111",
    ],
)
def test_stripe_api_base_is_https_or_plain_http_on_loopback(base: str) -> None:
    assert load({"STRIPE_API_BASE": base}).stripe_api_base == base.rstrip("/")


def test_an_env_file_cannot_point_the_api_key_at_plain_http(tmp_path: Path) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text("STRIPE_SECRET_KEY=sk_live_abc123\nSTRIPE_API_BASE=http://collector.example\n")
    with pytest.raises(ConfigError, match=r"^STRIPE_API_BASE: ") as caught:
        load({}, env_file=env_file)
    assert "sk_live_abc123" not in str(caught.value)


def test_retention_and_replay_limits_have_defaults_and_bounds() -> None:
    settings = load({})
    assert (settings.inbox_retention_days, settings.replay_default_limit, settings.replay_max_limit) == (
        90,
        1000,
        10_000,
    )
    custom = load({"INBOX_RETENTION_DAYS": "31", "REPLAY_DEFAULT_LIMIT": "50", "REPLAY_MAX_LIMIT": "200"})
    assert (custom.inbox_retention_days, custom.replay_default_limit, custom.replay_max_limit) == (31, 50, 200)
    assert load({"REPLAY_MAX_LIMIT": "500"}).replay_default_limit == 500  # the default never exceeds the maximum


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("STRIPE_MODE", "production"),
        ("INBOX_RETENTION_DAYS", "30"),  # a backfill rereads 30 days: a pruned event would apply again
        ("INBOX_RETENTION_DAYS", "0"),
        ("INBOX_RETENTION_DAYS", "ninety"),
        ("REPLAY_MAX_LIMIT", "0"),
        ("REPLAY_DEFAULT_LIMIT", "20000"),  # over the maximum
        ("REPLAY_DEFAULT_LIMIT", "0"),
    ],
)
def test_a_malformed_mode_retention_or_replay_limit_names_the_variable(name: str, value: str) -> None:
    with pytest.raises(ConfigError, match=f"^{name}: "):
        load({name: value})
