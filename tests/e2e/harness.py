"""A real ``kamiyo serve`` process for end-to-end tests, and the ways tests talk to it.

Every process runs in its own working directory (so no stray ``.env`` is read), with an
environment built from scratch for the settings kamiyo knows, its stdout and stderr appended
to ``kamiyo.log`` there, bound to 127.0.0.1 on a free port.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import httpx
from sqlalchemy import Engine, create_engine, text

from support import PRICE_TIERS, SECRET, signed

T = TypeVar("T")

# Every variable kamiyo reads: none of them leaks in from the developer's shell.
KAMIYO_ENV_KEYS = (
    "STRIPE_WEBHOOK_SECRET",
    "STRIPE_PRICE_TIERS",
    "DATABASE_URL",
    "PORT",
    "HOST",
    "LOG_LEVEL",
    "LOG_FORMAT",
    "WEBHOOK_MAX_BODY_BYTES",
    "WEBHOOK_TOLERANCE_SECONDS",
    "WORKER_IN_PROCESS",
    "WORKER_BATCH_SIZE",
    "WORKER_MAX_ATTEMPTS",
    "WORKER_POLL_SECONDS",
    "WORKER_RETRY_BASE_SECONDS",
    "SQLITE_SYNCHRONOUS",
    "KAMIYO_ADMIN_TOKEN",
    # The console's operator tokens and limits, and the proxies uvicorn trusts.
    "KAMIYO_ADMIN_TOKENS",
    "ADMIN_SIGNIN_MAX_FAILURES",
    "ADMIN_SIGNIN_WINDOW_SECONDS",
    "ADMIN_SESSION_SECONDS",
    "ADMIN_MAX_FORM_BYTES",
    "ADMIN_MAX_JSON_BYTES",
    "FORWARDED_ALLOW_IPS",
    # Stripe's API: a key in the developer's shell must never reach a test server.
    "STRIPE_SECRET_KEY",
    "STRIPE_API_BASE",
    "STRIPE_RATE_LIMIT",
    "STRIPE_VERIFY_EVENTS",
    "BACKFILL_INTERVAL_SECONDS",
    # PostgreSQL's limits on the service's connections.
    "DATABASE_CONNECT_TIMEOUT_SECONDS",
    "DATABASE_STATEMENT_TIMEOUT_SECONDS",
    "DATABASE_LOCK_TIMEOUT_SECONDS",
    "DATABASE_MAINTENANCE_TIMEOUT_SECONDS",
    # Stripe's mode, retention and replay bounds.
    "STRIPE_MODE",
    "INBOX_RETENTION_DAYS",
    "REPLAY_DEFAULT_LIMIT",
    "REPLAY_MAX_LIMIT",
    # The inbox writer's bounds.
    "WEBHOOK_STORE_TIMEOUT_SECONDS",
    "WEBHOOK_STORE_MAX_WAITING",
    # kamiyo serve's connection limits.
    "HTTP_HEADER_TIMEOUT_SECONDS",
    "HTTP_BODY_TIMEOUT_SECONDS",
    "HTTP_KEEPALIVE_SECONDS",
    "HTTP_MAX_CONNECTIONS",
    "HTTP_MAX_HEADER_BYTES",
)
WEBHOOK_PATH = "/api/v1/payments/webhook"
START_TIMEOUT = 30.0
APPLY_TIMEOUT = 20.0


ServerFactory = Callable[..., "KamiyoServer"]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def kamiyo_command() -> list[str]:
    """The installed console script next to this interpreter (``python -m kamiyo`` if absent)."""
    script = Path(sys.executable).with_name("kamiyo")
    return [str(script)] if script.exists() else [sys.executable, "-m", "kamiyo"]


def wait_until(probe: Callable[[], T], *, timeout: float = APPLY_TIMEOUT, interval: float = 0.05, what: str = "") -> T:
    """Call ``probe`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what or probe}; last value {value!r}")
        time.sleep(interval)


class KamiyoServer:
    """One ``kamiyo serve`` process (restartable) on its own database and port."""

    def __init__(self, workdir: Path, database_url: str, **settings: str) -> None:
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.database_url = database_url
        self.port = free_port()
        self.settings: dict[str, str] = {
            "STRIPE_WEBHOOK_SECRET": SECRET,
            "STRIPE_PRICE_TIERS": PRICE_TIERS,
            "DATABASE_URL": database_url,
            "PORT": str(self.port),
            "HOST": "127.0.0.1",
            "WORKER_POLL_SECONDS": "0.05",
            "WORKER_RETRY_BASE_SECONDS": "0",
            "LOG_LEVEL": "INFO",
        }
        self.settings.update(settings)
        self.log_path = workdir / "kamiyo.log"
        self.process: subprocess.Popen[bytes] | None = None
        self._engine: Engine | None = None
        self._http: httpx.Client | None = None

    # -- processes -------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def webhook_url(self) -> str:
        return self.url + WEBHOOK_PATH

    def env(self, **overrides: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in KAMIYO_ENV_KEYS}
        env.update(self.settings)
        env.update(overrides)
        return env

    def cli(self, *args: str, timeout: float = 60, **overrides: str) -> subprocess.CompletedProcess[str]:
        """Run ``kamiyo ARGS`` with this server's settings (plus ``overrides``), like an operator would."""
        return subprocess.run(
            [*kamiyo_command(), *args],
            cwd=self.workdir,
            env=self.env(**overrides),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            stdin=subprocess.DEVNULL,
        )

    def upgrade(self) -> None:
        result = self.cli("db", "upgrade")
        assert result.returncode == 0, f"kamiyo db upgrade failed:\n{result.stdout}\n{result.stderr}"

    def start(self, **settings: str) -> None:
        """Start ``kamiyo serve`` (with ``settings`` changed from now on) and wait for /health."""
        assert self.process is None or self.process.poll() is not None, "already running"
        self.settings.update(settings)
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [*kamiyo_command(), "serve"],
                cwd=self.workdir,
                env=self.env(),
                stdout=log,
                stderr=log,
                stdin=subprocess.DEVNULL,
            )
        self._reset_http()
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            code = self.process.poll()
            if code is not None:
                raise AssertionError(f"kamiyo serve exited with {code} at start:\n{self.log()[-4000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"kamiyo serve not healthy after {START_TIMEOUT} s:\n{self.log()[-4000:]}")
            time.sleep(0.05)

    def stop(self) -> None:
        """Graceful stop (SIGTERM), as ``docker compose restart`` does."""
        self._reset_http()
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs, exactly like a crash or an OOM kill."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def restart(self, **settings: str) -> None:
        self.stop()
        self.start(**settings)

    def close(self) -> None:
        self.stop()
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None

    # -- HTTP ------------------------------------------------------------------------------

    @property
    def http(self) -> httpx.Client:
        if self._http is None:
            self._http = httpx.Client(base_url=self.url, timeout=15)
        return self._http

    def _reset_http(self) -> None:
        if self._http is not None:
            self._http.close()
            self._http = None

    def post(self, body: bytes, headers: dict[str, Any] | None = None) -> httpx.Response:
        return self.http.post(WEBHOOK_PATH, content=body, headers=headers or {})

    def deliver(self, event: dict[str, Any], secret: str = SECRET, *, timestamp: int | None = None) -> httpx.Response:
        """POST ``event`` signed as Stripe signs it."""
        body, headers = signed(event, secret, timestamp=timestamp)
        return self.post(body, headers)

    # -- the log ---------------------------------------------------------------------------

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace") if self.log_path.exists() else ""

    def log_lines(self, *needles: str) -> list[str]:
        """Lines of the captured log that contain every one of ``needles``."""
        return [line for line in self.log().splitlines() if all(n in line for n in needles)]

    def wait_for_log(self, *needles: str, count: int = 1, timeout: float = 10.0) -> list[str]:
        """The lines containing every one of ``needles``, once there are ``count`` of them: the
        server writes its log on a thread of its own, a moment after it answers."""

        def enough() -> list[str]:
            lines = self.log_lines(*needles)
            return lines if len(lines) >= count else []

        return wait_until(enough, timeout=timeout, what=f"{count} log line(s) with {needles}")

    # -- the database ----------------------------------------------------------------------

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            self._engine = create_engine(self.database_url)
        return self._engine

    def rows(self, sql: str, **params: Any) -> list[tuple[Any, ...]]:
        with self.engine.connect() as connection:
            return [tuple(row) for row in connection.execute(text(sql), params)]

    def user(self, email: str) -> tuple[str, str | None] | None:
        """``(subscription_tier, subscription_status)`` of the user, by the runbook's query."""
        found = self.rows(
            "SELECT subscription_tier, subscription_status FROM users WHERE email = :email", email=email.lower()
        )
        return (found[0][0], found[0][1]) if found else None

    def wait_for_user(self, email: str, expected: tuple[str, str | None], timeout: float = APPLY_TIMEOUT) -> None:
        try:
            wait_until(lambda: self.user(email) == expected, timeout=timeout, what=f"user {email} to be {expected}")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; user is {self.user(email)!r}\n{self.log()[-3000:]}") from None

    def event_status(self, event_id: str) -> str | None:
        found = self.rows("SELECT status FROM webhook_events WHERE stripe_event_id = :id", id=event_id)
        return found[0][0] if found else None

    def stored_count(self, event_id: str) -> int:
        return int(self.rows("SELECT count(*) FROM webhook_events WHERE stripe_event_id = :id", id=event_id)[0][0])
