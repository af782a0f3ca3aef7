"""The backfill on a timer, inside the worker: after an outage the service catches up by itself.

Every ``BACKFILL_INTERVAL_SECONDS`` (on by default when ``STRIPE_SECRET_KEY`` is set) a thread
of the worker runs ``backfill_events`` and wakes the worker when new events were stored. With
several workers (PostgreSQL), a worker skips its turn when another started a backfill less than
half an interval ago, so they take turns rather than all listing the same events.

A scheduled backfill that stored events is recorded in the audit log as done by
``SCHEDULE_ACTOR``; one that found nothing new writes no entry (every few minutes, they would
bury the manual actions). Its first run, with no earlier backfill, reads Stripe's whole 30 days.
"""

from __future__ import annotations

import logging
import threading
import time

from sqlalchemy import Engine

from kamiyo.config import DEFAULT_MAINTENANCE_TIMEOUT, Settings
from kamiyo.db.errors import describe
from kamiyo.reconcile import runs
from kamiyo.reconcile.backfill import SCHEDULE_ACTOR, BackfillSummary, backfill_events
from kamiyo.reconcile.gateway import StripeGateway, gateway_from_settings

log = logging.getLogger("kamiyo.reconcile")
_FIRST_RUN_SECONDS = 30.0  # soon after a start, which is often the end of an outage


class BackfillSchedule:
    """A thread that runs a backfill every ``interval`` seconds until ``stop`` is set."""

    def __init__(
        self,
        engine: Engine,
        gateway: StripeGateway,
        interval: float,
        stop: threading.Event,
        wake: threading.Event,
        *,
        mode: str | None = None,
    ) -> None:
        self.engine = engine
        self.gateway = gateway
        self.interval = interval
        self.statement_timeout = DEFAULT_MAINTENANCE_TIMEOUT
        self.mode = mode  # Stripe's mode the service takes (events of the other are stored as ignored)
        self._stop = stop
        self._wake = wake
        self._thread = threading.Thread(target=self._run, name="kamiyo-backfill", daemon=True)

    @classmethod
    def start(
        cls,
        engine: Engine,
        settings: Settings,
        stop: threading.Event,
        wake: threading.Event,
        *,
        gateway: StripeGateway | None = None,
    ) -> BackfillSchedule | None:
        """Start the schedule, or return None when it is off (no interval, or no API key)."""
        if settings.backfill_interval_seconds <= 0:
            return None
        gateway = gateway or gateway_from_settings(settings)
        if gateway is None:
            return None
        schedule = cls(engine, gateway, settings.backfill_interval_seconds, stop, wake, mode=settings.stripe_mode)
        schedule.statement_timeout = settings.database_maintenance_timeout_seconds
        schedule._thread.start()
        log.info("scheduled backfill every %ss", settings.backfill_interval_seconds)
        return schedule

    def join(self, timeout: float = 30.0) -> None:
        self._thread.join(timeout)

    def _run(self) -> None:
        delay = min(_FIRST_RUN_SECONDS, self.interval)
        while not self._stop.wait(delay):
            started = time.monotonic()
            try:
                self.run_once()
            except Exception as exc:  # noqa: BLE001 - an API or database outage must not end the schedule
                log.error("scheduled backfill failed: %s", describe(exc))
            delay = max(0.0, self.interval - (time.monotonic() - started))

    def run_once(self, now: float | None = None) -> BackfillSummary | None:
        """One backfill, unless another process began one less than half an interval ago."""
        now = time.time() if now is None else now
        latest = runs.latest_run(self.engine, "backfill")
        if latest is not None and now - latest.started_at.timestamp() < self.interval / 2:
            log.debug("scheduled backfill skipped: run %d began %s", latest.id, latest.started_at.isoformat())
            return None
        summary = backfill_events(
            self.engine,
            self.gateway,
            now=now,
            actor=SCHEDULE_ACTOR,
            reason=f"scheduled every {self.interval:g} s (BACKFILL_INTERVAL_SECONDS)",
            audit_when_nothing_new=False,
            statement_timeout=self.statement_timeout,
            mode=self.mode,
        )
        if summary.new:
            self._wake.set()
        return summary
