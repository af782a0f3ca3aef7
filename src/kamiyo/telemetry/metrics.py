"""Prometheus metrics: counters and histograms counted in-process, state gauges read from the database.

Counters and histograms are counted where things happen (the webhook route, the worker). With
several processes (``kamiyo serve`` and ``kamiyo worker``, or several of each) set
``PROMETHEUS_MULTIPROC_DIR`` to one empty directory shared by all of them, created afresh when
the service is deployed: every process then writes its counts to a file there and any process
answers ``GET /metrics`` with the sum, so a restarted process neither resets nor doubles a
counter. Without it each process exports only its own counts.

The route's deliveries are queued and counted in bulk (``WebhookMetrics.flush``): before every
scrape, and at least once a second for the other processes' scrapes.

The state gauges (backlog, parked failures, ages, live workers) are not counted at all: the
``StateCollector`` reads them from the database at scrape time, so they are the same whichever
process is scraped.
"""

from __future__ import annotations

import bisect
import collections
import dataclasses
import functools
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector
from sqlalchemy import Engine

from kamiyo.config import Settings
from kamiyo.domain.outcomes import InboxStatus
from kamiyo.processing.retention import retention_status
from kamiyo.scrub import clean
from kamiyo.telemetry.delivery_stats import read_state
from kamiyo.telemetry.inbox_modes import recent_modes

if TYPE_CHECKING:
    from kamiyo.processing.restarts import WorkerDeath

log = logging.getLogger("kamiyo.metrics")
# The `_created` series double every counter's output and no alert or dashboard reads them.
disable_created_metrics()  # type: ignore[no-untyped-call]

# The rejection reasons the route can answer with (``WebhookRejected.reason`` and the two 503s).
FAILURE_REASONS = (
    "missing_signature",
    "invalid_signature",
    "timestamp",
    "malformed",
    "payload",
    "too_large",
    "not_configured",
    "internal",
)
# Why a verified delivery could not be stored (the inbox writer, webhooks/inbox_process.py).
STORE_FAILURE_REASONS = ("timeout", "overloaded", "writer_down", "database")
# `kamiyo doctor` probes the live endpoint. Its requests are not Stripe deliveries, so they are
# left out of every delivery count: its unsigned ping carries a header only a holder of the webhook
# secret can make (``webhooks.signature.probe_header``), its signed synthetic event this id prefix
# (a valid event id, and only a holder of the secret can sign one).
PROBE_EVENT_PREFIX = "evt_kamiyo_probe_"

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_LAG_BUCKETS = (0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0, 3600.0, 21600.0, 86400.0)
# Each histogram's bucket bounds as it keeps them (+Inf last), for counting observations in bulk.
_APPLY_BOUNDS = (*_LATENCY_BUCKETS, float("inf"))
_LAG_BOUNDS = (*_LAG_BUCKETS, float("inf"))
CONTENT_TYPE = CONTENT_TYPE_LATEST
FLUSH_SECONDS = 1.0  # queued deliveries are counted at least this often (and before every scrape)


def multiprocess_dir() -> str | None:
    """The shared directory of multiprocess mode, or None (prometheus_client reads the same variable)."""
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


class ProcessedCounter(Protocol):
    """What a ``Worker`` counts its committed batches with: the part of ``WorkerMetrics`` it calls."""

    def events_processed(self, outcomes: Iterable[tuple[str, str, int, float]], committed_at: float) -> None:
        """Count ``(status, type, created, apply seconds)`` of each event of a batch committed at ``committed_at``."""


class WorkerMetrics(ProcessedCounter, Protocol):
    """The worker's metrics, called where things happen: after a batch commits (``Worker``), when
    a worker dies (``RestartingWorker``). ``WebhookMetrics`` counts them in this process; in
    ``kamiyo serve``'s inbox process ``processing.in_process.WorkerRelay`` sends them to the
    server, which counts them. The caller never knows which."""

    def worker_restarted(self, death: WorkerDeath) -> None:
        """A worker ended by an error and is started again after ``death.restart_in`` seconds."""


class WebhookMetrics:
    """The in-process instruments. One per process in production (``process_metrics``)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        reg = self.registry
        self.attempts = Counter("webhook_attempts", "POST deliveries to the webhook endpoint.", registry=reg)
        self.failures = Counter(
            "webhook_failures", "Deliveries answered with an error, by reason.", ["reason"], registry=reg
        )
        self.received = Counter(
            "stripe_webhooks_received",
            "Verified Stripe events acknowledged with 2xx (new and duplicate), by event type.",
            ["type"],
            registry=reg,
        )
        self.applied = Counter("webhook_events_applied", "Events applied, by type.", ["type"], registry=reg)
        self.failed = Counter(
            "webhook_events_failed",
            "Failed attempts to apply an event (retried with backoff, or parked after the last), by type.",
            ["type"],
            registry=reg,
        )
        self.ignored = Counter(
            "webhook_events_ignored",
            "Events stored as ignored (a type nothing handles), by type.",
            ["type"],
            registry=reg,
        )
        self.request_seconds = Histogram(
            "webhook_request_duration_seconds",
            "Time to answer a POST to the webhook endpoint (including the commit of a new event).",
            buckets=_LATENCY_BUCKETS,
            registry=reg,
        )
        self.apply_seconds = Histogram(
            "webhook_event_apply_duration_seconds",
            "Time to apply one event (its handler, inside the worker's transaction).",
            buckets=_LATENCY_BUCKETS,
            registry=reg,
        )
        self.lag_seconds = Histogram(
            "webhook_event_apply_lag_seconds",
            "From the event's `created` (Stripe's clock, 1 s resolution) to its application being committed.",
            buckets=_LAG_BUCKETS,
            registry=reg,
        )
        self.worker_restarts = Counter(
            "webhook_worker_restarts",
            "Times a worker ended by an error and was started again (kamiyo serve's in-process worker, kamiyo worker).",
            registry=reg,
        )
        self.store_failures = Counter(
            "webhook_store_failures",
            "Verified deliveries answered 503 because they could not be stored, by why: timeout (no answer "
            "from the inbox writer in time), overloaded (too many waiting), writer_down, database.",
            ["reason"],
            registry=reg,
        )
        # Every reason exported from the start (at 0), so a failure ratio has a series to rate().
        self._failure_children = {reason: self.failures.labels(reason) for reason in FAILURE_REASONS}
        self._store_failure_children = {reason: self.store_failures.labels(reason) for reason in STORE_FAILURE_REASONS}
        self._received_children: dict[str, Counter] = {}
        self._ignored_children: dict[str, Counter] = {}
        # Deliveries answered 2xx, not yet counted: (type, seconds, ignored). See ``flush``.
        self._received_queue: collections.deque[tuple[str, float, bool]] = collections.deque()
        self._flush_lock = threading.Lock()
        self._flusher: threading.Thread | None = None

    # -- the webhook route (hot path: a few dictionary look-ups and locked additions) ---------

    def delivery_rejected(self, reason: str, seconds: float) -> None:
        self.attempts.inc()
        child = self._failure_children.get(reason)
        if child is None:
            child = self._failure_children[reason] = self.failures.labels(reason)
        child.inc()
        self.request_seconds.observe(seconds)

    def store_failed(self, reason: str) -> None:
        """A verified delivery not stored (one of ``STORE_FAILURE_REASONS``); it is answered 503."""
        child = self._store_failure_children.get(reason)
        if child is None:
            child = self._store_failure_children[reason] = self.store_failures.labels(reason)
        child.inc()

    def delivery_received(self, event_type: str, seconds: float, *, ignored: bool) -> None:
        """A verified event answered 2xx; ``ignored`` when it was new and of a type nothing handles.

        Queued here and counted by ``flush``, in bulk: within a second, and before every scrape.
        The event loop appends one tuple per delivery instead of three locked increments and a
        histogram search (docs/PERFORMANCE.md, "Metrics overhead")."""
        self._received_queue.append((event_type, seconds, ignored))
        if self._flusher is None:
            self._start_flusher()

    def flush(self) -> None:
        """Count the queued deliveries: one increment per counter child and per histogram bucket."""
        with self._flush_lock:
            queue = self._received_queue
            if not queue:
                return
            # ``Histogram.observe`` one value at a time, done in bulk: its own bounds (+Inf last),
            # buckets and sum.
            histogram: Any = self.request_seconds
            bounds = histogram._upper_bounds
            by_type: dict[str, int] = {}
            ignored_by_type: dict[str, int] = {}
            in_bucket = [0] * len(bounds)
            total_seconds = 0.0
            count = 0
            while queue:  # the deque's append and popleft are atomic: the loop keeps appending
                event_type, seconds, ignored = queue.popleft()
                count += 1
                by_type[event_type] = by_type.get(event_type, 0) + 1
                if ignored:
                    ignored_by_type[event_type] = ignored_by_type.get(event_type, 0) + 1
                in_bucket[bisect.bisect_left(bounds, seconds)] += 1  # the first bucket with seconds <= bound
                total_seconds += seconds
            self.attempts.inc(count)
            for event_type, n in by_type.items():
                self._received_child(event_type).inc(n)
            for event_type, n in ignored_by_type.items():
                self._ignored_child(event_type).inc(n)
            _observe_in_bulk(histogram, in_bucket, total_seconds)

    def _received_child(self, event_type: str) -> Counter:
        child = self._received_children.get(event_type)
        if child is None:
            child = self._received_children[event_type] = self.received.labels(_label(event_type))
        return child

    def _ignored_child(self, event_type: str) -> Counter:
        child = self._ignored_children.get(event_type)
        if child is None:
            child = self._ignored_children[event_type] = self.ignored.labels(_label(event_type))
        return child

    def _start_flusher(self) -> None:
        with self._flush_lock:
            if self._flusher is None:
                self._flusher = threading.Thread(target=self._flush_every_second, name="kamiyo-metrics", daemon=True)
                self._flusher.start()

    def _flush_every_second(self) -> None:
        # With several processes, another one may answer the scrape: it reads this process's
        # counts from the shared directory, at most a second behind.
        while True:
            time.sleep(FLUSH_SECONDS)
            self.flush()

    # -- the worker: called after a batch committed, so nothing rolled back is counted ---------

    def worker_restarted(self, death: WorkerDeath) -> None:
        """A worker died and is being restarted (its ``WorkerDeath``, processing/restarts.py)."""
        self.worker_restarts.inc()

    def events_processed(self, outcomes: Iterable[tuple[str, str, int, float]], committed_at: float) -> None:
        """Count ``(status, type, created, apply seconds)`` of each event of a committed batch.

        ``status`` is the stored outcome: applied, ignored, pending (a failed attempt that will
        be retried) or failed (parked).
        """
        self.count_processed(ProcessedTally.of(outcomes, committed_at))

    def count_processed(self, tally: ProcessedTally) -> None:
        """Add a batch's tally: made here, or by a worker in the inbox process (its ``Processed`` message)."""
        for counter, by_type in (
            (self.applied, tally.applied),
            (self.ignored, tally.ignored),
            (self.failed, tally.failed),
        ):
            for event_type, n in by_type.items():
                counter.labels(_label(event_type)).inc(n)
        _observe_in_bulk(self.apply_seconds, tally.apply_buckets, tally.apply_sum)
        _observe_in_bulk(self.lag_seconds, tally.lag_buckets, tally.lag_sum)


# The statuses a batch's events are tallied under (a pending one is a failed attempt).
_TALLIED = (InboxStatus.APPLIED, InboxStatus.IGNORED, InboxStatus.FAILED)


@dataclasses.dataclass(frozen=True)
class ProcessedTally:
    """The worker's metrics of one committed batch, summed: per-type counts and, for each of the
    two histograms, the count per bucket (``WebhookMetrics``' bounds) and the sum. A few numbers
    per batch, whatever its size, to add or to send to another process."""

    applied: dict[str, int]
    ignored: dict[str, int]
    failed: dict[str, int]
    apply_buckets: list[int]
    apply_sum: float
    lag_buckets: list[int]
    lag_sum: float

    @classmethod
    def of(cls, outcomes: Iterable[tuple[str, str, int, float]], committed_at: float) -> ProcessedTally:
        """Tally ``(status, type, created, apply seconds)`` of each event of a batch committed at ``committed_at``."""
        by_status: dict[str, dict[str, int]] = {status: {} for status in _TALLIED}
        apply_buckets = [0] * len(_APPLY_BOUNDS)
        lag_buckets = [0] * len(_LAG_BOUNDS)
        apply_sum = lag_sum = 0.0
        for status, event_type, created, seconds in outcomes:
            counts = by_status[InboxStatus.FAILED if status not in by_status else status]  # pending: a failed attempt
            counts[event_type] = counts.get(event_type, 0) + 1
            if status == InboxStatus.APPLIED:
                lag = max(0.0, committed_at - created)
                apply_buckets[bisect.bisect_left(_APPLY_BOUNDS, seconds)] += 1
                lag_buckets[bisect.bisect_left(_LAG_BOUNDS, lag)] += 1
                apply_sum += seconds
                lag_sum += lag
        return cls(
            applied=by_status[InboxStatus.APPLIED],
            ignored=by_status[InboxStatus.IGNORED],
            failed=by_status[InboxStatus.FAILED],
            apply_buckets=apply_buckets,
            apply_sum=apply_sum,
            lag_buckets=lag_buckets,
            lag_sum=lag_sum,
        )


def _observe_in_bulk(histogram: Histogram, in_bucket: Sequence[int], total: float) -> None:
    """``Histogram.observe`` of many values at once: ``in_bucket[i]`` values fell in the i-th
    bucket (the first whose bound is >= the value, +Inf last), and they add up to ``total``."""
    buckets: Any = histogram
    if len(in_bucket) != len(buckets._upper_bounds):
        raise ValueError(f"{len(in_bucket)} bucket counts for a histogram of {len(buckets._upper_bounds)} buckets")
    for index, n in enumerate(in_bucket):
        if n:
            buckets._buckets[index].inc(n)
    if any(in_bucket):
        buckets._sum.inc(total)


@functools.cache
def process_metrics() -> WebhookMetrics:
    """This process's instruments (created once; in multiprocess mode they write to the shared dir)."""
    return WebhookMetrics()


class StateCollector(Collector):
    """Gauges derived from the database (and this process's settings) at every scrape."""

    def __init__(self, engine: Engine, settings: Settings) -> None:
        self._engine = engine
        self._settings = settings

    def collect(self) -> Iterator[Metric]:
        yield _gauge(
            "webhook_secret_configured",
            "1 when STRIPE_WEBHOOK_SECRET is set in the scraped process, else 0.",
            1.0 if self._settings.webhook_secrets else 0.0,
        )
        try:
            state = read_state(self._engine, now=time.time())
        except Exception as exc:  # noqa: BLE001 - a scrape must answer even when the database does not
            log.warning("metrics: database unreachable for state gauges: %s", exc.__class__.__name__)
            yield _gauge("webhook_database_up", "1 when the database answered the scrape's queries.", 0.0)
            return
        yield _gauge("webhook_database_up", "1 when the database answered the scrape's queries.", 1.0)
        yield _gauge("webhook_events_backlog", "Events stored and not yet applied (status pending).", state.backlog)
        yield _gauge(
            "webhook_events_parked", "Events parked as failed after their last attempt (status failed).", state.parked
        )
        yield _gauge(
            "webhook_oldest_pending_age_seconds",
            "Age of the oldest pending event (0 when none is pending).",
            state.oldest_pending_age,
        )
        if state.last_accepted_age is not None:  # absent until the first webhook is accepted
            yield _gauge(
                "webhook_seconds_since_last_accepted",
                "Seconds since the newest event received through the webhook endpoint was stored.",
                state.last_accepted_age,
            )
        yield _gauge(
            "webhook_workers_alive", "Workers whose heartbeat is recent (see kamiyo worker).", state.workers_alive
        )
        yield _gauge(
            "kamiyo_users_manual_override",
            "Users whose tier is set by an active manual override (kamiyo users set-tier).",
            state.active_overrides,
        )
        yield from _housekeeping_gauges(self._engine, self._settings)


def _housekeeping_gauges(engine: Engine, settings: Settings) -> Iterator[Metric]:
    """The inbox's retention (processing/retention.py) and Stripe's modes (telemetry/inbox_modes.py)."""
    try:
        status = retention_status(engine)
        mixed = settings.stripe_mode is None and len(recent_modes(engine)) > 1
    except Exception as exc:  # noqa: BLE001 - a scrape must answer even when the database does not
        log.warning("metrics: retention and modes not read: %s", exc.__class__.__name__)
        return
    if status is not None and status.last_success_at is not None:  # absent until the first prune finished
        yield _gauge(
            "kamiyo_inbox_prune_last_success_timestamp_seconds",
            "When the inbox's retention last finished (Unix seconds), whichever worker ran it.",
            status.last_success_at,
        )
    yield _gauge(
        "kamiyo_inbox_prune_consecutive_failures",
        "Runs of the inbox's retention that failed in a row (0 after one that finished).",
        status.consecutive_failures if status is not None else 0,
    )
    yield _gauge(
        "kamiyo_stripe_modes_mixed",
        "1 when the service takes both Stripe modes (no STRIPE_MODE, no API key) and its newest events hold both.",
        1.0 if mixed else 0.0,
    )


class WriterCollector(Collector):
    """``webhook_writer_up``: whether the scraped process's inbox writer can store a delivery now."""

    def __init__(self, writer_ok: Callable[[], bool]) -> None:
        self._writer_ok = writer_ok

    def collect(self) -> Iterator[Metric]:
        yield _gauge(
            "webhook_writer_up",
            "1 when the scraped process's inbox writer can store a delivery (as GET /health says), else 0.",
            1.0 if self._writer_ok() else 0.0,
        )


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


class _Scrape(Collector):
    def __init__(self, metrics: WebhookMetrics, sources: Sequence[Collector]) -> None:
        self._metrics = metrics
        self._sources = sources

    def collect(self) -> Iterator[Metric]:
        self._metrics.flush()  # what this process has queued is counted before it is read
        for source in self._sources:
            yield from source.collect()


def scrape_source(metrics: WebhookMetrics, state: StateCollector, *own: Collector) -> Collector:
    """What ``GET /metrics`` renders: every process's counts (multiprocess) or this one's, plus the
    state, plus ``own``: gauges of the scraped process itself."""
    path = multiprocess_dir()
    if path is not None:
        shared = CollectorRegistry()
        MultiProcessCollector(shared, path=path)  # type: ignore[no-untyped-call]
        return _Scrape(metrics, [shared, state, *own])
    return _Scrape(metrics, [metrics.registry, state, *own])


def _label(event_type: str) -> str:
    """An event type as a label value: it comes from a payload, so it is cleaned like any output."""
    return clean(event_type)


def render(source: Collector) -> bytes:
    """The text exposition format of ``source`` (blocking: the state gauges query the database)."""
    return generate_latest(source)
