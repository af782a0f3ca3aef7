"""``kamiyo serve`` and ``kamiyo worker``: the long-running processes."""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import click

from kamiyo.cli.invocation import OK, with_settings

if TYPE_CHECKING:
    from kamiyo.config import Settings


@click.command(
    short_help="serve the webhook endpoint (and, unless WORKER_IN_PROCESS=false, apply events)",
    help="Serve the webhook endpoint and, unless WORKER_IN_PROCESS=false or --no-worker, apply the events.",
)
@click.option("--host", help="address to bind (default: HOST or 0.0.0.0)")
@click.option("--port", type=int, help="port (default: PORT or 8000)")
@click.option("--no-worker", is_flag=True, help="only receive; leave applying to `kamiyo worker` processes")
@with_settings
def serve(settings: Settings, host: str | None, port: int | None, no_worker: bool) -> int:
    import uvicorn

    from kamiyo.cli.db import require_current_schema
    from kamiyo.db.engine import make_engine
    from kamiyo.logs import configure_logging
    from kamiyo.web.app import create_app
    from kamiyo.web.server import HttpLimits, bounded_protocol, raise_open_file_limit
    from kamiyo.webhooks.inbox_process import DRAIN_SECONDS

    engine = make_engine(settings)
    try:
        require_current_schema(engine)
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
    return OK


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


@click.command(
    short_help="apply stored events until interrupted (run several on PostgreSQL)",
    help="Apply stored events until interrupted (run several on PostgreSQL).",
)
@with_settings
def worker(settings: Settings) -> int:
    from kamiyo.cli.db import require_current_schema
    from kamiyo.db.engine import make_engine
    from kamiyo.heap import settle
    from kamiyo.logs import configure_logging
    from kamiyo.processing import worker as worker_module
    from kamiyo.processing.restarts import RestartingWorker
    from kamiyo.telemetry.metrics import process_metrics

    # A line per event applied: written by a thread of its own, a burst per write (as serve does).
    configure_logging(settings.log_level, background=True, log_format=settings.log_format)
    engine = make_engine(settings)
    require_current_schema(engine)
    stop = threading.Event()

    def _stop(_signum: int, _frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    # A worker that dies is started again (after a growing pause), counted for the alert.
    metrics = process_metrics() if settings.metrics_enabled else None
    settle(batches=True)
    RestartingWorker(lambda: worker_module.Worker(engine, settings, metrics=metrics), metrics=metrics).run(stop)
    engine.dispose()
    return OK
