"""What each ``kamiyo`` command does. Imported lazily so ``kamiyo --help`` stays instant."""

from __future__ import annotations

import contextlib
import logging
import signal
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from typing import Any

import orjson
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, select

from kamiyo import synthetic
from kamiyo.config import Settings
from kamiyo.db.engine import make_engine
from kamiyo.db.migrate import alembic_config, upgrade
from kamiyo.db.models import events_table
from kamiyo.domain.modes import LIVE
from kamiyo.errors import KamiyoError
from kamiyo.logs import configure_logging
from kamiyo.processing import worker as worker_module
from kamiyo.processing.restarts import RestartingWorker
from kamiyo.scrub import clean, redact
from kamiyo.telemetry.metrics import process_metrics
from kamiyo.webhooks.signature import signature_header

_events = events_table


def _schema_revisions(engine: Engine) -> tuple[str | None, str | None]:
    script = ScriptDirectory.from_config(alembic_config(engine.url.render_as_string(hide_password=False)))
    with engine.connect().execution_options(readonly=True) as connection:
        current = MigrationContext.configure(connection).get_current_revision()
    return current, script.get_current_head()


def _require_current_schema(engine: Engine) -> None:
    current, head = _schema_revisions(engine)
    if current != head:
        raise KamiyoError(
            f"database schema is at {current or 'nothing'}, this version needs {head}: run `kamiyo db upgrade`"
        )


def serve(settings: Settings, *, host: str | None, port: int | None, no_worker: bool) -> int:
    import uvicorn

    from kamiyo.web.app import create_app
    from kamiyo.web.server import HttpLimits, bounded_protocol, raise_open_file_limit
    from kamiyo.webhooks.inbox_process import DRAIN_SECONDS

    engine = make_engine(settings)
    try:
        _require_current_schema(engine)
    finally:
        engine.dispose()
    app = create_app(settings, run_worker=False if no_worker else None)
    # A line per delivery, off the event loop.
    configure_logging(settings.log_level, background=True, log_format=settings.log_format)
    raise_open_file_limit(settings.http_max_connections)
    config = uvicorn.Config(
        app,
        host=host or settings.host,
        port=port or settings.port,
        access_log=False,  # our own line per delivery replaces it
        log_config=None,
        loop="uvloop",
        # httptools, with every wait and size of a connection bounded (web/server.py).
        http=bounded_protocol(HttpLimits.from_settings(settings)),
        ws="none",
        timeout_keep_alive=settings.http_keepalive_seconds,
        # On SIGTERM: stop accepting, let in-flight requests finish (each delivery is answered
        # within WEBHOOK_STORE_TIMEOUT_SECONDS, less than this), then stop the inbox writer.
        timeout_graceful_shutdown=int(DRAIN_SECONDS),
        # X-Forwarded-For names the client (the console's sign-in throttling counts per address)
        # only when the peer is one of these proxies; anyone else's header is ignored.
        proxy_headers=True,
        forwarded_allow_ips=settings.forwarded_allow_ips,
    )
    _server_class()(config).run()
    return 0


def _server_class() -> type:
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server, writing out every queued log line before it re-raises a SIGTERM or
        SIGINT it shut down for (which ends the process without running exit handlers)."""

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            with super().capture_signals():
                try:
                    yield
                finally:
                    for handler in logging.getLogger().handlers:
                        handler.flush()

    return Server


def worker(settings: Settings) -> int:
    # A line per event applied: written by a thread of its own, a burst per write (as serve does).
    configure_logging(settings.log_level, background=True, log_format=settings.log_format)
    engine = make_engine(settings)
    _require_current_schema(engine)
    stop = threading.Event()

    def _stop(_signum: int, _frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    # A worker that dies is started again (after a growing pause), counted for the alert.
    metrics = process_metrics() if settings.metrics_enabled else None
    RestartingWorker(lambda: worker_module.Worker(engine, settings, metrics=metrics), metrics=metrics).run(stop)
    engine.dispose()
    return 0


def db_upgrade(settings: Settings) -> int:
    engine = make_engine(settings)
    upgrade(engine, statement_timeout=settings.database_maintenance_timeout_seconds)
    current, _head = _schema_revisions(engine)
    engine.dispose()
    print(f"database at revision {current}")
    return 0


def db_current(settings: Settings) -> int:
    engine = make_engine(settings)
    current, head = _schema_revisions(engine)
    engine.dispose()
    print(f"current {current or 'none'}, head {head}")
    return 0 if current == head else 1


def events_list(settings: Settings, *, status: str | None, event_type: str | None, limit: int) -> int:
    engine = make_engine(settings)
    query = (
        select(
            _events.c.stripe_event_id,
            _events.c.type,
            _events.c.status,
            _events.c.attempts,
            _events.c.received_at,
            _events.c.last_error,
        )
        .order_by(_events.c.id.desc())
        .limit(max(1, min(limit, 10_000)))
    )
    if status:
        query = query.where(_events.c.status == status)
    if event_type:
        query = query.where(_events.c.type == event_type)
    with engine.connect().execution_options(readonly=True) as connection:
        rows = connection.execute(query).all()
    engine.dispose()
    print(f"{'received':<20} {'status':<8} {'tries':>5}  {'event':<34} type")
    for row in rows:
        received = row.received_at.strftime("%Y-%m-%d %H:%M:%S") if row.received_at else "-"
        line = f"{received:<20} {row.status:<8} {row.attempts:>5}  {row.stripe_event_id:<34} {row.type}"
        if row.last_error:
            line += f"  error: {row.last_error[:120]}"
        print(clean(line))
    return 0


def events_show(settings: Settings, event_id: str) -> int:
    """One event, everything read from the database printed through the scrubber: credentials
    redacted (by key name in the payload, by shape everywhere) and control characters escaped."""
    from kamiyo.cli.operators import json_text

    engine = make_engine(settings)
    with engine.connect().execution_options(readonly=True) as connection:
        row = connection.execute(select(_events).where(_events.c.stripe_event_id == event_id)).first()
    engine.dispose()
    if row is None:
        raise KamiyoError(f"no event {clean(event_id)} in the inbox")
    info = {k: v for k, v in row._mapping.items() if k not in ("payload", "id")}
    for key, value in info.items():
        print(f"{key:>16}: {clean(str(value))}")
    print("         payload:")
    try:
        payload = redact(orjson.loads(row.payload))
    except orjson.JSONDecodeError:
        print(clean(row.payload))
    else:
        print(json_text(payload))
    return 0


def trigger(
    settings: Settings,
    event_type: str,
    *,
    url: str | None,
    secret: str | None,
    email: str,
    customer_id: str | None,
    api_version: str | None,
) -> int:
    secret = secret or (settings.webhook_secrets[0] if settings.webhook_secrets else None)
    if not secret:
        raise KamiyoError("no signing secret: pass --secret or set STRIPE_WEBHOOK_SECRET")
    from kamiyo.web.webhook import WEBHOOK_PATH

    url = url or f"http://127.0.0.1:{settings.port}{WEBHOOK_PATH}"
    if not url.startswith(("http://", "https://")):
        raise KamiyoError(f"--url must be an http:// or https:// URL, got {url!r}")
    if urllib.parse.urlsplit(url).path in ("", "/"):
        url = url.rstrip("/") + WEBHOOK_PATH  # the service's base URL, as doctor --url takes it
    try:
        event = synthetic.trigger_event(
            event_type,
            email=email,
            price_obj=_trigger_price(settings),
            customer_id=customer_id,
            api_version=api_version or synthetic.LATEST_API_VERSION,
            livemode=settings.stripe_mode == LIVE,  # the service's mode: an event it applies
        )
    except ValueError as exc:
        raise KamiyoError(str(exc)) from None
    body = orjson.dumps(event)
    request = urllib.request.Request(  # noqa: S310 - scheme checked above
        url,
        data=body,
        method="POST",
        headers={
            "Content-Type": "application/json; charset=utf-8",
            "Stripe-Signature": signature_header(body, secret, int(time.time())),
            "User-Agent": "kamiyo-trigger (Stripe/1.0 compatible)",
        },
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310 - scheme checked above
            status, answer = response.status, response.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        status, answer = exc.code, exc.read().decode(errors="replace")
    except (urllib.error.URLError, OSError) as exc:
        print(f"trigger {event_type}: cannot reach {url}: {exc}", file=sys.stderr)
        return 1
    print(f"trigger {event_type} {event['id']} -> {status} {answer}")
    return 0 if 200 <= status < 300 else 1


def _trigger_price(settings: Settings) -> dict[str, Any]:
    for key, tier in settings.price_tiers.by_key.items():
        if key.startswith(("price_", "plan_")):
            return synthetic.price(key)
        return synthetic.price("price_trigger_" + tier, lookup_key=key)
    return synthetic.price("price_trigger_pro", tier="pro")
