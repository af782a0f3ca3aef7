"""The HTTP edge. Thin: read the raw bytes, verify, store, commit, answer.

Everything heavy is built in the lifespan (engine, inbox writer, in-process worker); nothing
at import time. Error classes become status codes here and nowhere else.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson
from sqlalchemy import Engine, text
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from kamiyo.config import Settings
from kamiyo.db.engine import make_engine
from kamiyo.errors import PayloadTooLarge, WebhookRejected
from kamiyo.processing.handlers import HANDLED_TYPES
from kamiyo.processing.worker import Worker
from kamiyo.telemetry.metrics import (
    CONTENT_TYPE,
    PROBE_EVENT_PREFIX,
    PROBE_USER_AGENT,
    StateCollector,
    WebhookMetrics,
    process_metrics,
    render,
    scrape_source,
)
from kamiyo.telemetry.webhook_health import StripeProbe, cached_probe, run_checks
from kamiyo.web.admin import admin_routes
from kamiyo.webhooks.envelope import read_envelope
from kamiyo.webhooks.inbox import InboxWriter, inbox_row
from kamiyo.webhooks.signature import verify_signature

log = logging.getLogger("kamiyo.webhook")
WEBHOOK_PATH = "/api/v1/payments/webhook"


def _json(status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json", headers=headers)


def create_app(
    settings: Settings,
    *,
    engine: Engine | None = None,
    run_worker: bool | None = None,
    metrics: WebhookMetrics | None = None,
) -> Starlette:
    """Build the ASGI app. ``engine`` and ``metrics`` may be given by tests; otherwise made from settings."""
    state: dict[str, Any] = {}
    started_at = time.time()
    metrics = (metrics or process_metrics()) if settings.metrics_enabled else None
    secrets = settings.webhook_secrets
    tolerance = settings.signature_tolerance
    max_body = settings.max_body_bytes
    with_worker = settings.worker_in_process if run_worker is None else run_worker

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        db = engine or make_engine(settings)
        wake = threading.Event()
        writer = InboxWriter(db, on_commit=wake.set, count_deliveries=metrics is not None)
        writer.start()
        stop = threading.Event()
        worker_thread = None
        if with_worker:
            worker_thread = threading.Thread(
                target=Worker(db, settings, metrics=metrics).run, args=(stop, wake), name="kamiyo-worker", daemon=True
            )
            worker_thread.start()
        state.update(engine=db, writer=writer, worker_thread=worker_thread, stripe_probe=_stripe_probe(settings))
        if metrics is not None:
            state["scrape"] = scrape_source(metrics, StateCollector(db, settings))
        if not secrets:
            log.error(
                "webhook secret not configured: STRIPE_WEBHOOK_SECRET is empty; deliveries get 503 until it is set"
            )
        # Everything built at start lives as long as the process: keep it out of the cyclic
        # collector's scans, which otherwise run on the request path (measured in bench/).
        gc.freeze()
        try:
            yield
        finally:
            writer.stop()
            stop.set()
            wake.set()
            if worker_thread is not None:
                worker_thread.join(timeout=30)
            if engine is None:
                db.dispose()

    def count_rejection(reason: str, started: float, event_type: str = "") -> None:
        if metrics is not None:
            metrics.delivery_rejected(reason, time.perf_counter() - started)
            state["writer"].count_rejection(reason, event_type)

    async def webhook(request: Request) -> Response:
        if request.method != "POST":
            return _json(405, {"error": "method not allowed: POST required"}, {"Allow": "POST"})
        started = time.perf_counter()
        if not secrets:
            log.error("webhook rejected reason=not_configured: STRIPE_WEBHOOK_SECRET is not set (Stripe will retry)")
            count_rejection("not_configured", started)
            return _json(503, {"error": "webhook secret not configured", "reason": "not_configured"})
        try:
            body = await _read_body(request, max_body)
            verify_signature(
                request.headers.get("stripe-signature"), body, secrets, tolerance=tolerance, now=time.time()
            )
            envelope, _event = read_envelope(body)
        except WebhookRejected as exc:
            if exc.reason == "invalid_signature":
                log.warning("webhook rejected reason=invalid_signature: Webhook validation failed: %s", exc)
            else:
                log.warning("webhook rejected reason=%s: %s", exc.reason, exc)
            # doctor's unsigned ping is not a delivery: it stays out of the failure counts.
            if exc.reason != "missing_signature" or not _is_probe(request):
                count_rejection(exc.reason, started)
            return _json(exc.status_code, {"error": str(exc), "reason": exc.reason})

        status = "pending" if envelope.type in HANDLED_TYPES else "ignored"
        counted = not envelope.event_id.startswith(PROBE_EVENT_PREFIX)
        try:
            new = await state["writer"].store(inbox_row(envelope, body, status=status), counted=counted)
        except Exception as exc:  # noqa: BLE001 - storage down: Stripe must retry, so not 2xx
            log.error(
                "webhook not stored event=%s type=%s: %s", envelope.event_id, envelope.type, exc.__class__.__name__
            )
            count_rejection("internal", started, envelope.type)
            return _json(503, {"error": "event could not be stored; retry later", "reason": "internal"})
        if metrics is not None and counted:
            metrics.delivery_received(envelope.type, time.perf_counter() - started, ignored=new and status == "ignored")
        outcome = "accepted" if new else "duplicate"
        log.info("webhook %s event=%s type=%s", outcome, envelope.event_id, envelope.type)
        return _json(200, {"received": True, "id": envelope.event_id, "duplicate": not new})

    async def health(_request: Request) -> Response:
        try:
            await run_in_threadpool(_ping, state["engine"])
        except Exception as exc:  # noqa: BLE001 - any failure means "not healthy"
            return _json(503, {"status": "unavailable", "database": exc.__class__.__name__})
        return _json(200, {"status": "ok", "database": "ok"})

    async def webhook_health(_request: Request) -> Response:
        worker_thread = state.get("worker_thread")
        report = await run_in_threadpool(
            run_checks,
            state["engine"],
            settings,
            in_process_worker=None if worker_thread is None else worker_thread.is_alive(),
            stripe_probe=state.get("stripe_probe"),
            started_at=started_at,
        )
        return _json(200 if report.healthy else 503, report.to_json())

    async def metrics_endpoint(_request: Request) -> Response:
        if "scrape" not in state:
            return _json(404, {"error": "metrics disabled (METRICS_ENABLED=false)"})
        body = await run_in_threadpool(render, state["scrape"])
        return Response(body, media_type=CONTENT_TYPE)

    return Starlette(
        routes=[
            Route(WEBHOOK_PATH, webhook, methods=["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]),
            Route(WEBHOOK_PATH + "/health", webhook_health, methods=["GET", "HEAD"]),
            Route("/health", health, methods=["GET", "HEAD"]),
            Route("/metrics", metrics_endpoint, methods=["GET"]),
            # The operator console and admin API (web/admin.py): only with KAMIYO_ADMIN_TOKEN.
            *(admin_routes(settings, state) if settings.admin_token else []),
        ],
        lifespan=lifespan,
    )


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"body of {declared} bytes is over the {limit}-byte limit")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"body is over the {limit}-byte limit")
        chunks.append(chunk)
    return b"".join(chunks)


def _stripe_probe(settings: Settings) -> StripeProbe | None:
    """With an API key: the health check's "Stripe reachable", asked at most once a minute."""
    from kamiyo.diagnosis.stripe_view import stripe_view

    view = stripe_view(settings)
    if view is None:
        return None
    return cached_probe(lambda: f"Stripe API reachable ({len(view.webhook_endpoints())} webhook endpoint(s))")


def _is_probe(request: Request) -> bool:
    return request.headers.get("user-agent", "").startswith(PROBE_USER_AGENT)


def _ping(engine: Engine) -> None:
    with engine.connect().execution_options(readonly=True) as connection:
        connection.execute(text("SELECT 1"))
