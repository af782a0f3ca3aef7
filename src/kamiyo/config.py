"""Typed settings, read once from the environment (and an optional ``.env`` file).

Every value is parsed and checked here, so a malformed setting stops the process at start
with a message naming the variable, never at the first webhook.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from dotenv import dotenv_values
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

from kamiyo.domain.tiers import TierMap, parse_price_tiers
from kamiyo.errors import ConfigError

DEFAULT_DATABASE_URL = "sqlite:///data/kamiyo.db"
DEFAULT_STRIPE_API_BASE = "https://api.stripe.com"
_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
_SECRET_RE = re.compile(r"whsec_[A-Za-z0-9+/=_-]+")
_STRIPE_KEY_RE = re.compile(r"(sk|rk)_[A-Za-z0-9_]+")
DEFAULT_STRIPE_RATE_LIMIT = 20.0
DEFAULT_BACKFILL_INTERVAL = 600  # with an API key; without one the scheduled backfill is off
ADMIN_TOKEN_MIN_LENGTH = 16


@dataclass(frozen=True)
class Settings:
    """Everything the service reads from its environment."""

    webhook_secrets: tuple[str, ...] = ()
    price_tiers: TierMap = field(default_factory=TierMap)
    database_url: str = DEFAULT_DATABASE_URL
    host: str = "0.0.0.0"
    port: int = 8000
    log_level: str = "INFO"
    max_body_bytes: int = 1024 * 1024
    signature_tolerance: int = 300
    worker_in_process: bool = True
    worker_batch_size: int = 200
    worker_max_attempts: int = 8
    worker_poll_seconds: float = 0.25
    retry_base_seconds: float = 2.0
    sqlite_synchronous: str = "FULL"
    # Delivery telemetry: Prometheus counters and the per-minute delivery stats (issue 4).
    metrics_enabled: bool = True
    # Stripe's API (a restricted or secret key); None turns every API feature off.
    stripe_secret_key: str | None = None
    stripe_api_base: str = DEFAULT_STRIPE_API_BASE
    # Reconcile (issue 3): requests/s to Stripe's API, API-verified events, scheduled backfill (0 = off).
    stripe_rate_limit: float = DEFAULT_STRIPE_RATE_LIMIT
    stripe_verify_events: bool = False
    backfill_interval_seconds: int = 0
    # Webhook health (GET /api/v1/payments/webhook/health): when a check turns from ok to fail.
    # 0 silence seconds turns the "no webhook accepted lately" check off (an account with few events).
    health_silence_seconds: float = 1800.0
    health_min_success_ratio: float = 0.95
    health_backlog_max_age_seconds: float = 600.0
    # The operator console and admin API (issue 5); None turns both off (their routes are 404).
    admin_token: str | None = field(default=None, repr=False)
    # kamiyo serve's connections (web/server.py): how long a request's head and body may take to
    # arrive, how long a kept-alive connection may wait for its next request, how many may be
    # open at once, and how large a request's head may be.
    http_header_timeout: float = 10.0
    http_body_timeout: float = 20.0
    http_keepalive_seconds: int = 5
    http_max_connections: int = 500
    http_max_header_bytes: int = 32 * 1024

    def __repr__(self) -> str:  # never print secrets, even by accident
        url = _redact_url(self.database_url)
        return f"Settings(database_url={url!r}, port={self.port}, secrets={len(self.webhook_secrets)})"


def load_settings(environ: Mapping[str, str] | None = None, env_file: Path | None = Path(".env")) -> Settings:
    """Read settings from ``environ`` (default: the process environment) over ``env_file``.

    Real environment variables win over the file, as in Docker and most process managers.
    """
    values: dict[str, str] = {}
    if env_file is not None and env_file.is_file():
        values.update({k: v for k, v in dotenv_values(env_file).items() if v is not None})
    values.update(os.environ if environ is None else environ)

    stripe_key = _stripe_key(values.get("STRIPE_SECRET_KEY", ""))
    return Settings(
        webhook_secrets=_secrets(values.get("STRIPE_WEBHOOK_SECRET", "")),
        price_tiers=_tiers(values.get("STRIPE_PRICE_TIERS", "")),
        database_url=_database_url(values.get("DATABASE_URL", "") or DEFAULT_DATABASE_URL),
        host=values.get("HOST", "0.0.0.0") or "0.0.0.0",
        port=_int(values, "PORT", 8000, low=1, high=65535),
        log_level=_choice(values, "LOG_LEVEL", "INFO", _LOG_LEVELS),
        max_body_bytes=_int(values, "WEBHOOK_MAX_BODY_BYTES", 1024 * 1024, low=1024, high=64 * 1024 * 1024),
        signature_tolerance=_int(values, "WEBHOOK_TOLERANCE_SECONDS", 300, low=1, high=86400),
        worker_in_process=_bool(values, "WORKER_IN_PROCESS", True),
        worker_batch_size=_int(values, "WORKER_BATCH_SIZE", 200, low=1, high=5000),
        worker_max_attempts=_int(values, "WORKER_MAX_ATTEMPTS", 8, low=1, high=100),
        worker_poll_seconds=_float(values, "WORKER_POLL_SECONDS", 0.25, low=0.01, high=60),
        retry_base_seconds=_float(values, "WORKER_RETRY_BASE_SECONDS", 2.0, low=0.0, high=3600),
        sqlite_synchronous=_choice(values, "SQLITE_SYNCHRONOUS", "FULL", ("FULL", "NORMAL", "EXTRA")),
        metrics_enabled=_bool(values, "METRICS_ENABLED", True),
        stripe_secret_key=stripe_key,
        stripe_api_base=_api_base(values.get("STRIPE_API_BASE", "")),
        stripe_rate_limit=_float(values, "STRIPE_RATE_LIMIT", DEFAULT_STRIPE_RATE_LIMIT, low=0.1, high=100_000),
        stripe_verify_events=_bool(values, "STRIPE_VERIFY_EVENTS", False),
        backfill_interval_seconds=_int(
            values, "BACKFILL_INTERVAL_SECONDS", DEFAULT_BACKFILL_INTERVAL if stripe_key else 0, low=0, high=30 * 86400
        ),
        admin_token=_admin_token(values.get("KAMIYO_ADMIN_TOKEN", "")),
        health_silence_seconds=_float(values, "HEALTH_SILENCE_SECONDS", 1800.0, low=0, high=30 * 86400),
        health_min_success_ratio=_float(values, "HEALTH_MIN_SUCCESS_RATIO", 0.95, low=0, high=1),
        health_backlog_max_age_seconds=_float(values, "HEALTH_BACKLOG_MAX_AGE_SECONDS", 600.0, low=1, high=30 * 86400),
        http_header_timeout=_float(values, "HTTP_HEADER_TIMEOUT_SECONDS", 10.0, low=0.1, high=300),
        http_body_timeout=_float(values, "HTTP_BODY_TIMEOUT_SECONDS", 20.0, low=0.1, high=3600),
        http_keepalive_seconds=_int(values, "HTTP_KEEPALIVE_SECONDS", 5, low=1, high=3600),
        http_max_connections=_int(values, "HTTP_MAX_CONNECTIONS", 500, low=1, high=100_000),
        http_max_header_bytes=_int(values, "HTTP_MAX_HEADER_BYTES", 32 * 1024, low=1024, high=1024 * 1024),
    )


def _secrets(raw: str) -> tuple[str, ...]:
    secrets = []
    for position, secret in enumerate((s for s in raw.split(",") if s.strip()), start=1):
        if secret != secret.strip() or any(q in secret for q in "\"'"):
            raise ConfigError(
                f"STRIPE_WEBHOOK_SECRET: secret #{position} has surrounding whitespace or quotes "
                "(a paste error?); it must be exactly the whsec_... value from the Stripe Dashboard"
            )
        if not _SECRET_RE.fullmatch(secret):
            raise ConfigError(
                f"STRIPE_WEBHOOK_SECRET: secret #{position} must look like whsec_... (letters and digits)"
            )
        secrets.append(secret)
    return tuple(secrets)


def _tiers(raw: str) -> TierMap:
    try:
        return parse_price_tiers(raw)
    except ValueError as exc:
        raise ConfigError(f"STRIPE_PRICE_TIERS: {exc}") from None


def _database_url(raw: str) -> str:
    try:
        url: URL = make_url(raw)
    except (ArgumentError, ValueError):  # ValueError: a non-numeric port
        # The raw value is not echoed: it may hold the database password.
        raise ConfigError("DATABASE_URL: not a database URL (expected sqlite:///path or postgresql://...)") from None
    if url.drivername in ("postgres", "postgresql", "postgresql+psycopg"):
        url = url.set(drivername="postgresql+psycopg")
    elif url.drivername not in ("sqlite", "sqlite+pysqlite"):
        raise ConfigError(f"DATABASE_URL: unsupported database {url.drivername!r} (use sqlite:/// or postgresql://)")
    return url.render_as_string(hide_password=False)


def _stripe_key(raw: str) -> str | None:
    """A secret (``sk_``) or restricted (``rk_``) API key, or None. Never echoed: it is a credential."""
    key = raw.strip()
    if not key:
        return None
    if not _STRIPE_KEY_RE.fullmatch(key):
        raise ConfigError(
            "STRIPE_SECRET_KEY: expected a secret key (sk_live_... / sk_test_...) or a restricted key "
            "(rk_live_... / rk_test_...) from the Stripe Dashboard; a publishable key (pk_...) cannot read the API"
        )
    return key


def _api_base(raw: str) -> str:
    base = raw.strip().rstrip("/") or DEFAULT_STRIPE_API_BASE
    if not base.startswith(("https://", "http://")) or not urlsplit(base).hostname:
        raise ConfigError(f"STRIPE_API_BASE: expected an http(s):// URL, got {base!r}")
    return base


def _admin_token(raw: str) -> str | None:
    """The console's bearer token: empty turns the console off; a weak one stops the start."""
    if not raw:
        return None
    # Never echoed (it is a credential). It travels in an HTTP header: printable ASCII only.
    if not (raw.isascii() and raw.isprintable()) or any(c.isspace() or c in "\"'" for c in raw):
        raise ConfigError("KAMIYO_ADMIN_TOKEN: contains whitespace, quotes or non-ASCII characters (a paste error?)")
    if len(raw) < ADMIN_TOKEN_MIN_LENGTH:
        raise ConfigError(
            f"KAMIYO_ADMIN_TOKEN: {len(raw)} characters is too short; use at least {ADMIN_TOKEN_MIN_LENGTH} "
            "(e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`)"
        )
    return raw


def _int(values: Mapping[str, str], name: str, default: int, *, low: int, high: int) -> int:
    raw = values.get(name, "").strip()
    if not raw:
        return default
    try:
        number = int(raw)
    except ValueError:
        raise ConfigError(f"{name}: expected a whole number, got {raw!r}") from None
    if not low <= number <= high:
        raise ConfigError(f"{name}: {number} is outside {low}..{high}")
    return number


def _float(values: Mapping[str, str], name: str, default: float, *, low: float, high: float) -> float:
    raw = values.get(name, "").strip()
    if not raw:
        return default
    try:
        number = float(raw)
    except ValueError:
        raise ConfigError(f"{name}: expected a number, got {raw!r}") from None
    if not low <= number <= high:
        raise ConfigError(f"{name}: {number} is outside {low}..{high}")
    return number


def _bool(values: Mapping[str, str], name: str, default: bool) -> bool:
    raw = values.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name}: expected true or false, got {raw!r}")


def _choice(values: Mapping[str, str], name: str, default: str, choices: tuple[str, ...]) -> str:
    raw = values.get(name, "").strip().upper()
    if not raw:
        return default
    if raw not in choices:
        raise ConfigError(f"{name}: expected one of {', '.join(choices)}, got {raw!r}")
    return raw


def _redact_url(url: str) -> str:
    return make_url(url).render_as_string(hide_password=True)
