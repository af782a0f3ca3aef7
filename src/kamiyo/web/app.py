"""The HTTP edge. Thin: read the raw bytes, verify, store, commit, answer.

Everything heavy is built in the lifespan (engine, inbox writer, in-process worker); nothing
at import time. Error classes become status codes here and nowhere else.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson
from sqlalchemy import Engine, text
from sqlalchemy.engine import make_url
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from kamiyo.config import Settings
from kamiyo.db.engine import make_engine
from kamiyo.heap import settle
from kamiyo.processing.in_process import WorkerThread
from kamiyo.processing.restarts import RestartRecord
from kamiyo.telemetry.metrics import (
    CONTENT_TYPE,
    StateCollector,
    WebhookMetrics,
    WriterCollector,
    process_metrics,
    render,
    scrape_source,
)
from kamiyo.telemetry.webhook_health import HealthReport, StripeProbe, cached_probe, run_checks
from kamiyo.web.admin import admin_routes
from kamiyo.web.cache import CachedAnswer
from kamiyo.web.webhook import WEBHOOK_PATH, Receive, Scope, Send, WebhookEndpoint
from kamiyo.webhooks.inbox import InboxWriter
from kamiyo.webhooks.inbox_process import WRITE_WAIT_SHARE, InboxProcess

log = logging.getLogger("kamiyo.webhook")
__all__ = ["WEBHOOK_PATH", "create_app"]


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
    with_worker = settings.worker_in_process if run_worker is None else run_worker

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        db = engine or make_engine(settings)
        writer: InboxWriter | InboxProcess
        worker: WorkerThread | None = None
        worker_alive: Callable[[], bool | None]
        if engine is None and not _in_memory(settings):
            # The service itself (kamiyo serve): the writer, and the worker beside it, in a process
            # of their own, off this GIL.
            writer = InboxProcess(settings, count_deliveries=metrics is not None, worker=with_worker, metrics=metrics)
            await writer.start()
            worker_alive = writer.worker_alive
            restarts = writer.worker_restarts
        else:  # an engine given by a test, or one in-memory SQLite database: the same process
            wake = threading.Event()
            writer = InboxWriter(
                db,
                on_commit=wake.set,
                count_deliveries=metrics is not None,
                write_wait=settings.webhook_store_timeout * WRITE_WAIT_SHARE,
                store_timeout=settings.webhook_store_timeout,
                max_waiting=settings.webhook_store_max_waiting,
            )
            writer.start()
            restarts = RestartRecord()
            if with_worker:
                worker = WorkerThread(db, settings, wake, metrics=metrics, on_death=restarts.add)
                worker_alive = worker.alive
            else:
                worker_alive = _no_worker
        state.update(
            engine=db,
            writer=writer,
            worker_alive=worker_alive,
            worker_restarts=restarts,
            stripe_probe=_stripe_probe(settings),
        )
        if metrics is not None:
            state["scrape"] = scrape_source(
                metrics, StateCollector(db, settings), WriterCollector(lambda: writer.health().ok)
            )
        if not secrets:
            log.error(
                "webhook secret not configured: STRIPE_WEBHOOK_SECRET is empty; deliveries get 503 until it is set"
            )
        # Everything built at start lives as long as the process: keep it out of the cyclic
        # collector's scans, which otherwise run on the request path.
        settle()
        try:
            yield
        finally:
            if isinstance(writer, InboxProcess):
                await writer.stop()
            else:
                writer.stop()
            if worker is not None:
                worker.stop(timeout=30)
            if metrics is not None:
                metrics.flush()  # the last deliveries' counts, for whoever reads the shared directory
            if engine is None:
                db.dispose()

    # The public endpoints below read the database for anybody who asks: each answer is
    # computed at most once per HEALTH_CACHE_SECONDS, whoever asks and however often.
    async def store_ready() -> tuple[int, dict[str, Any]]:
        """/health: 200 when this process can store a delivery: its inbox writer runs, answers and
        writes (kept current by the writer itself, no query for it here), and the database
        answers a query. ``writer`` names the writer's state (writer_health.STATES)."""
        writer = state["writer"].health()
        if not writer.ok:
            return 503, {"status": "unavailable", "database": "not checked", "writer": writer.state}
        try:
            await run_in_threadpool(_ping, state["engine"])
        except Exception:  # noqa: BLE001 - any failure means "not healthy"; the reason is not public
            return 503, {"status": "unavailable", "database": "unavailable", "writer": writer.state}
        return 200, {"status": "ok", "database": "ok", "writer": writer.state}

    def full_report() -> HealthReport:
        """Every check with its details (blocking): the public endpoint shows part of it, the admin API all."""
        return run_checks(
            state["engine"],
            settings,
            in_process_worker=state["worker_alive"](),
            worker_restarts=state["worker_restarts"],
            stripe_probe=state.get("stripe_probe"),
            started_at=started_at,
            writer=state["writer"].health(),
        )

    state["health_report"] = full_report

    async def webhook_report() -> tuple[int, dict[str, Any]]:
        report = await run_in_threadpool(full_report)
        return (200 if report.healthy else 503), report.public_json()

    async def scrape() -> bytes:
        return await run_in_threadpool(render, state["scrape"])

    ttl = settings.health_cache_seconds
    health_answer = CachedAnswer(store_ready, ttl=ttl)
    webhook_health_answer = CachedAnswer(webhook_report, ttl=ttl)
    metrics_answer = CachedAnswer(scrape, ttl=ttl)

    async def health(_request: Request) -> Response:
        return _json(*await health_answer.get())

    async def webhook_health(_request: Request) -> Response:
        return _json(*await webhook_health_answer.get())

    async def metrics_endpoint(_request: Request) -> Response:
        if "scrape" not in state:
            return _json(404, {"error": "metrics disabled (METRICS_ENABLED=false)"})
        return Response(await metrics_answer.get(), media_type=CONTENT_TYPE)

    webhook = WebhookEndpoint(settings, metrics, lambda: state["writer"])
    return _App(
        webhook,
        routes=[
            # Every method: the endpoint answers 405 itself to anything but POST.
            Route(WEBHOOK_PATH, webhook),
            Route(WEBHOOK_PATH + "/health", webhook_health, methods=["GET", "HEAD"]),
            Route("/health", health, methods=["GET", "HEAD"]),
            Route("/metrics", metrics_endpoint, methods=["GET"]),
            # The operator console and admin API (web/admin.py): only with an admin token.
            *(admin_routes(settings, state) if settings.admin_enabled else []),
        ],
        lifespan=lifespan,
    )


class _App(Starlette):
    """Starlette, except that a POST to the webhook path goes straight to its endpoint.

    Routing and the middleware stack cost the event loop more than the endpoint's own work, on
    the one path that takes the load; every other request, and any webhook request whose path
    differs (a trailing slash, a root path), goes through Starlette and reaches the same endpoint
    (or Starlette's own answer) that way.
    """

    def __init__(self, webhook: WebhookEndpoint, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._webhook = webhook

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == WEBHOOK_PATH and scope["method"] == "POST":
            await self._webhook(scope, receive, send)
            return
        await super().__call__(scope, receive, send)


def _stripe_probe(settings: Settings) -> StripeProbe | None:
    """With an API key: the health check's "Stripe reachable", asked at most once a minute."""
    from kamiyo.diagnosis.stripe_view import stripe_view

    view = stripe_view(settings)
    if view is None:
        return None
    return cached_probe(lambda: f"Stripe API reachable ({len(view.webhook_endpoints())} webhook endpoint(s))")


def _no_worker() -> None:
    return None


def _in_memory(settings: Settings) -> bool:
    url = make_url(settings.database_url)
    return url.get_backend_name() == "sqlite" and url.database in (None, "", ":memory:")


def _ping(engine: Engine) -> None:
    with engine.connect().execution_options(readonly=True) as connection:
        connection.execute(text("SELECT 1"))
