"""Typed settings, read once from the environment (and an optional ``.env`` file).

Every value is parsed and checked here, so a malformed setting stops the process at start
with a message naming the variable, never at the first webhook.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from dotenv import dotenv_values
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

from kamiyo.domain.modes import LIVE, MODES, key_mode
from kamiyo.domain.tiers import TierMap, parse_price_tiers
from kamiyo.errors import ConfigError
from kamiyo.logs import LOG_FORMATS

DEFAULT_DATABASE_URL = "sqlite:///data/kamiyo.db"
DEFAULT_STRIPE_API_BASE = "https://api.stripe.com"
_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
_SECRET_RE = re.compile(r"whsec_[A-Za-z0-9+/=_-]+")
_STRIPE_KEY_RE = re.compile(r"(sk|rk)_[A-Za-z0-9_]+")
DEFAULT_STRIPE_RATE_LIMIT = 20.0
DEFAULT_BACKFILL_INTERVAL = 600  # with an API key; without one the scheduled backfill is off
ADMIN_TOKEN_MIN_LENGTH = 16
DEFAULT_MAINTENANCE_TIMEOUT = 3600.0  # DATABASE_MAINTENANCE_TIMEOUT_SECONDS
ADMIN_NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
# Who the audit names for KAMIYO_ADMIN_TOKEN, the token operators share (a name, not a secret).
SHARED_TOKEN_NAME = "shared"  # noqa: S105
# Stripe's mode, retention and replay bounds.
DEFAULT_INBOX_RETENTION_DAYS = 90
# A backfill rereads Stripe's last 30 days and skips the event ids already in the inbox: an event
# pruned sooner than that would be stored and applied a second time.
MIN_INBOX_RETENTION_DAYS = 31
DEFAULT_REPLAY_LIMIT = 1000
DEFAULT_REPLAY_MAX_LIMIT = 10_000
# Well under the 30 s after which Stripe's CLI gives up on a delivery, and at most 15 s so that
# kamiyo serve's shutdown budgets (webhooks/inbox_process.py) hold.
DEFAULT_STORE_TIMEOUT = 10.0
MAX_STORE_TIMEOUT = 15.0
DEFAULT_STORE_MAX_WAITING = 1000


@dataclass(frozen=True)
class Settings:
    """Everything the service reads from its environment."""

    webhook_secrets: tuple[str, ...] = ()
    price_tiers: TierMap = field(default_factory=TierMap)
    database_url: str = DEFAULT_DATABASE_URL
    host: str = "0.0.0.0"
    port: int = 8000
    log_level: str = "INFO"
    log_format: str = "text"  # or "json": one object per line (kamiyo/logs.py)
    max_body_bytes: int = 1024 * 1024
    signature_tolerance: int = 300
    worker_in_process: bool = True
    worker_batch_size: int = 200
    worker_max_attempts: int = 8
    worker_poll_seconds: float = 0.25
    retry_base_seconds: float = 2.0
    sqlite_synchronous: str = "FULL"
    # Delivery telemetry: Prometheus counters and the per-minute delivery stats.
    metrics_enabled: bool = True
    # Stripe's API (a restricted or secret key); None turns every API feature off.
    stripe_secret_key: str | None = None
    stripe_api_base: str = DEFAULT_STRIPE_API_BASE
    # Reconcile: requests/s to Stripe's API, API-verified events, scheduled backfill (0 = off).
    stripe_rate_limit: float = DEFAULT_STRIPE_RATE_LIMIT
    stripe_verify_events: bool = False
    backfill_interval_seconds: int = 0
    # Webhook health (GET /api/v1/payments/webhook/health): when a check turns from ok to fail.
    # 0 silence seconds turns the "no webhook accepted lately" check off (an account with few events).
    health_silence_seconds: float = 1800.0
    health_min_success_ratio: float = 0.95
    health_backlog_max_age_seconds: float = 600.0
    # How long GET /health, the webhook health and /metrics reuse an answer (0: computed per request).
    health_cache_seconds: float = 1.0
    # PostgreSQL: limits on every connection of the service, in seconds (0 turns a limit off).
    # Migrations, sync and backfill raise the statement limit to the maintenance one.
    database_connect_timeout_seconds: int = 10
    database_statement_timeout_seconds: float = 30.0
    database_lock_timeout_seconds: float = 10.0
    database_maintenance_timeout_seconds: float = DEFAULT_MAINTENANCE_TIMEOUT
    # The operator console and admin API: a shared token and tokens of their own per operator
    # (name, token); with neither, both are off (their routes are 404). Then the console's limits:
    # sign-in failures per client address within a window, request body caps, and the proxies
    # whose X-Forwarded-For names the client (uvicorn's forwarded_allow_ips).
    admin_token: str | None = field(default=None, repr=False)
    admin_tokens: tuple[tuple[str, str], ...] = field(default=(), repr=False)
    admin_signin_max_failures: int = 10
    admin_signin_window_seconds: int = 300
    admin_session_seconds: int = 12 * 3600
    admin_max_form_bytes: int = 4096
    admin_max_json_bytes: int = 16 * 1024
    forwarded_allow_ips: str = "127.0.0.1,::1"
    # The inbox writer of kamiyo serve: every delivery is answered within the timeout (503 when
    # its row is not committed by then), and at most max_waiting deliveries wait on the writer.
    webhook_store_timeout: float = DEFAULT_STORE_TIMEOUT
    webhook_store_max_waiting: int = DEFAULT_STORE_MAX_WAITING

    @property
    def admin_enabled(self) -> bool:
        """Whether the console and admin API are on (some admin token is configured)."""
        return bool(self.admin_token or self.admin_tokens)

    # Stripe's mode, retention and replay bounds. ``stripe_mode``: "live" or "test" (STRIPE_MODE,
    # else the key's mode); None takes events of both modes.
    stripe_mode: str | None = None
    inbox_retention_days: int = DEFAULT_INBOX_RETENTION_DAYS
    replay_default_limit: int = DEFAULT_REPLAY_LIMIT
    replay_max_limit: int = DEFAULT_REPLAY_MAX_LIMIT
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
    replay_max = _int(values, "REPLAY_MAX_LIMIT", DEFAULT_REPLAY_MAX_LIMIT, low=1, high=1_000_000)
    return Settings(
        webhook_secrets=_secrets(values.get("STRIPE_WEBHOOK_SECRET", "")),
        price_tiers=_tiers(values.get("STRIPE_PRICE_TIERS", "")),
        database_url=_database_url(values.get("DATABASE_URL", "") or DEFAULT_DATABASE_URL),
        host=values.get("HOST", "0.0.0.0") or "0.0.0.0",
        port=_int(values, "PORT", 8000, low=1, high=65535),
        log_level=_choice(values, "LOG_LEVEL", "INFO", _LOG_LEVELS),
        log_format=_choice(values, "LOG_FORMAT", "text", LOG_FORMATS, upper=False),
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
        admin_tokens=_admin_tokens(values.get("KAMIYO_ADMIN_TOKENS", ""), values.get("KAMIYO_ADMIN_TOKEN", "")),
        admin_signin_max_failures=_int(values, "ADMIN_SIGNIN_MAX_FAILURES", 10, low=1, high=10_000),
        admin_signin_window_seconds=_int(values, "ADMIN_SIGNIN_WINDOW_SECONDS", 300, low=1, high=86400),
        admin_session_seconds=_int(values, "ADMIN_SESSION_SECONDS", 12 * 3600, low=60, high=7 * 86400),
        admin_max_form_bytes=_int(values, "ADMIN_MAX_FORM_BYTES", 4096, low=256, high=1024 * 1024),
        admin_max_json_bytes=_int(values, "ADMIN_MAX_JSON_BYTES", 16 * 1024, low=1024, high=1024 * 1024),
        forwarded_allow_ips=_forwarded_allow_ips(values.get("FORWARDED_ALLOW_IPS", "")),
        health_silence_seconds=_float(values, "HEALTH_SILENCE_SECONDS", 1800.0, low=0, high=30 * 86400),
        health_min_success_ratio=_float(values, "HEALTH_MIN_SUCCESS_RATIO", 0.95, low=0, high=1),
        health_backlog_max_age_seconds=_float(values, "HEALTH_BACKLOG_MAX_AGE_SECONDS", 600.0, low=1, high=30 * 86400),
        health_cache_seconds=_float(values, "HEALTH_CACHE_SECONDS", 1.0, low=0, high=60),
        database_connect_timeout_seconds=_int(values, "DATABASE_CONNECT_TIMEOUT_SECONDS", 10, low=1, high=600),
        database_statement_timeout_seconds=_float(
            values, "DATABASE_STATEMENT_TIMEOUT_SECONDS", 30.0, low=0, high=86400
        ),
        database_lock_timeout_seconds=_float(values, "DATABASE_LOCK_TIMEOUT_SECONDS", 10.0, low=0, high=86400),
        database_maintenance_timeout_seconds=_float(
            values, "DATABASE_MAINTENANCE_TIMEOUT_SECONDS", DEFAULT_MAINTENANCE_TIMEOUT, low=0, high=7 * 86400
        ),
        # Stripe's mode, retention and replay bounds.
        stripe_mode=_stripe_mode(values.get("STRIPE_MODE", ""), stripe_key),
        inbox_retention_days=_int(
            values, "INBOX_RETENTION_DAYS", DEFAULT_INBOX_RETENTION_DAYS, low=MIN_INBOX_RETENTION_DAYS, high=36_500
        ),
        replay_default_limit=_int(
            values, "REPLAY_DEFAULT_LIMIT", min(DEFAULT_REPLAY_LIMIT, replay_max), low=1, high=replay_max
        ),
        replay_max_limit=replay_max,
        webhook_store_timeout=_float(
            values, "WEBHOOK_STORE_TIMEOUT_SECONDS", DEFAULT_STORE_TIMEOUT, low=1, high=MAX_STORE_TIMEOUT
        ),
        webhook_store_max_waiting=_int(
            values, "WEBHOOK_STORE_MAX_WAITING", DEFAULT_STORE_MAX_WAITING, low=1, high=100_000
        ),
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
    """Where the API key is sent: HTTPS, or plain HTTP to this machine only (a test's fake Stripe).

    A ``.env`` in the working directory is read too, so a plain ``http://`` URL to another host
    would hand the key to anyone on the path; it stops the start instead."""
    base = raw.strip().rstrip("/") or DEFAULT_STRIPE_API_BASE
    try:
        host = urlsplit(base).hostname
    except ValueError:  # e.g. an unclosed [ of an IPv6 address
        host = None
    if not base.lower().startswith(("https://", "http://")) or not host:
        raise ConfigError(f"STRIPE_API_BASE: expected an https:// URL, got {base!r}")
    if base.lower().startswith("http://") and not _loopback(host):
        raise ConfigError(
            f"STRIPE_API_BASE: {base!r} would send STRIPE_SECRET_KEY unencrypted; use https:// "
            "(plain http:// is allowed only to this machine: localhost, 127.0.0.0/8, ::1)"
        )
    return base


def _loopback(host: str) -> bool:
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _stripe_mode(raw: str, stripe_key: str | None) -> str | None:
    """STRIPE_MODE, else the mode of STRIPE_SECRET_KEY, else None (events of both modes are taken)."""
    mode = raw.strip().lower() or None
    if mode is not None and mode not in MODES:
        raise ConfigError(f"STRIPE_MODE: expected live or test, got {raw.strip()!r}")
    keyed = key_mode(stripe_key)
    if mode is not None and keyed is not None and mode != keyed:
        kind = "a live" if keyed == LIVE else "a test"
        raise ConfigError(f"STRIPE_MODE: {mode} contradicts STRIPE_SECRET_KEY, which is {kind}-mode key")
    return mode or keyed


def _admin_token(raw: str, name: str = "KAMIYO_ADMIN_TOKEN") -> str | None:
    """The console's bearer token: empty turns the console off; a weak one stops the start."""
    if not raw:
        return None
    # Never echoed (it is a credential). It travels in an HTTP header: printable ASCII only.
    if not (raw.isascii() and raw.isprintable()) or any(c.isspace() or c in "\"'" for c in raw):
        raise ConfigError(f"{name}: contains whitespace, quotes or non-ASCII characters (a paste error?)")
    if len(raw) < ADMIN_TOKEN_MIN_LENGTH:
        raise ConfigError(
            f"{name}: {len(raw)} characters is too short; use at least {ADMIN_TOKEN_MIN_LENGTH} "
            "(e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`)"
        )
    return raw


def _admin_tokens(raw: str, shared: str) -> tuple[tuple[str, str], ...]:
    """``KAMIYO_ADMIN_TOKENS=name:token,...``: each operator's own token, so the audit names them.

    Names are unique and never the shared token's name; tokens are unique, and none is
    ``KAMIYO_ADMIN_TOKEN``. A token is never echoed, only its entry's position or name.
    """
    entries: list[tuple[str, str]] = []
    for position, entry in enumerate((e.strip() for e in raw.split(",") if e.strip()), start=1):
        name, colon, token = entry.partition(":")
        if not colon or not ADMIN_NAME_RE.fullmatch(name):
            raise ConfigError(
                f"KAMIYO_ADMIN_TOKENS: entry #{position} must be name:token, the name 1-64 letters, digits, "
                "'.', '_' or '-'"
            )
        if name == SHARED_TOKEN_NAME:
            raise ConfigError(f"KAMIYO_ADMIN_TOKENS: the name {name!r} is the shared KAMIYO_ADMIN_TOKEN's")
        checked = _admin_token(token, f"KAMIYO_ADMIN_TOKENS ({name})")
        if checked is None:
            raise ConfigError(f"KAMIYO_ADMIN_TOKENS: entry #{position} ({name}) has no token")
        if any(name == known for known, _ in entries):
            raise ConfigError(f"KAMIYO_ADMIN_TOKENS: the name {name!r} appears twice")
        if checked == shared or any(checked == known for _, known in entries):
            raise ConfigError(
                f"KAMIYO_ADMIN_TOKENS: the token of {name!r} is also another operator's or KAMIYO_ADMIN_TOKEN; "
                "every token must be different"
            )
        entries.append((name, checked))
    return tuple(entries)


def _forwarded_allow_ips(raw: str) -> str:
    """The proxies trusted to name the client in X-Forwarded-For: addresses or networks, or ``*``."""
    value = raw.strip() or "127.0.0.1,::1"
    if value == "*":
        return value
    for item in (i.strip() for i in value.split(",")):
        try:
            ipaddress.ip_network(item, strict=False)
        except ValueError:
            raise ConfigError(
                f"FORWARDED_ALLOW_IPS: {item!r} is not an IP address or network (comma-separated, or *)"
            ) from None
    return value


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


def _choice(values: Mapping[str, str], name: str, default: str, choices: tuple[str, ...], *, upper: bool = True) -> str:
    raw = values.get(name, "").strip()
    raw = raw.upper() if upper else raw.lower()
    if not raw:
        return default
    if raw not in choices:
        raise ConfigError(f"{name}: expected one of {', '.join(choices)}, got {raw!r}")
    return raw


def _redact_url(url: str) -> str:
    return make_url(url).render_as_string(hide_password=True)
