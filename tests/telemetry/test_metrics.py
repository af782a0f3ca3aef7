"""GET /metrics: the value of every metric after a known sequence of deliveries and applies."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest
from sqlalchemy import Engine, select

from appclient import AppClient
from kamiyo import synthetic
from kamiyo.config import Settings
from kamiyo.db.models import delivery_stats_table
from kamiyo.processing.worker import Worker
from kamiyo.telemetry.metrics import FAILURE_REASONS, PROBE_EVENT_PREFIX, WebhookMetrics
from kamiyo.web.app import WEBHOOK_PATH, create_app
from kamiyo.webhooks.signature import PROBE_HEADER, probe_header, signature_header
from support import SECRET, signed
from telemetry.scrape import samples, value


def _sub_event(price_id: str = "price_pro_monthly", **kwargs: Any) -> dict[str, Any]:
    sub = synthetic.subscription(
        sub_id=synthetic.new_id("sub"), customer_id="cus_metrics", price_obj=synthetic.price(price_id)
    )
    return synthetic.event("customer.subscription.created", sub, **kwargs)


def _customer_event() -> dict[str, Any]:
    return synthetic.event("customer.created", synthetic.customer(customer_id="cus_metrics", email="m@example.com"))


@pytest.fixture
def client(engine: Engine, settings: Settings) -> Iterator[tuple[AppClient, WebhookMetrics]]:
    metrics = WebhookMetrics()
    app = create_app(settings, engine=engine, run_worker=False, metrics=metrics)
    with AppClient(app) as test_client:
        yield test_client, metrics


def _post(client: AppClient, event: dict[str, Any], secret: str = SECRET, **kwargs: Any) -> int:
    body, headers = signed(event, secret, **kwargs)
    return client.post(WEBHOOK_PATH, content=body, headers=headers).status_code


def test_every_delivery_metric_counts_a_known_sequence_exactly(
    client: tuple[AppClient, WebhookMetrics], engine: Engine, settings: Settings
) -> None:
    """3 new events (2 types), 1 duplicate, 1 ignored type and one rejection of each kind, counted exactly."""
    http, metrics = client
    sub, customer = _sub_event(), _customer_event()
    assert _post(http, sub) == 200
    assert _post(http, sub) == 200  # duplicate
    assert _post(http, customer) == 200
    assert _post(http, _sub_event()) == 200
    assert _post(http, synthetic.event("charge.refunded", {"id": "ch_1", "object": "charge"})) == 200  # ignored type
    assert http.post(WEBHOOK_PATH, content=b"{}").status_code == 400  # missing_signature
    assert _post(http, _sub_event(), "whsec_someone_else") == 400  # invalid_signature
    assert _post(http, _sub_event(), "whsec_someone_else") == 400
    assert _post(http, _sub_event(), timestamp=int(time.time()) - 3600) == 400  # timestamp
    assert http.post(WEBHOOK_PATH, content=b"{}", headers={"Stripe-Signature": "t=1"}).status_code == 400  # malformed
    not_json = b"not json"
    bad_payload = {"Stripe-Signature": signature_header(not_json, SECRET, int(time.time()))}
    assert http.post(WEBHOOK_PATH, content=not_json, headers=bad_payload).status_code == 400  # payload
    too_large = b"x" * (settings.max_body_bytes + 1)
    assert http.post(WEBHOOK_PATH, content=too_large).status_code == 413  # too_large
    assert http.get(WEBHOOK_PATH).status_code == 405  # not a delivery: not counted

    # The worker applies the three handled events and leaves nothing else.
    worker = Worker(engine, settings, metrics=metrics)
    assert worker.run_once() == 3

    found = samples(http.get("/metrics").text)
    assert value(found, "webhook_attempts_total") == 12
    failures = {reason: value(found, "webhook_failures_total", reason=reason) for reason in FAILURE_REASONS}
    assert failures == {
        "missing_signature": 1,
        "invalid_signature": 2,
        "timestamp": 1,
        "malformed": 1,
        "payload": 1,
        "too_large": 1,
        "not_configured": 0,
        "internal": 0,
    }
    assert value(found, "stripe_webhooks_received_total", type="customer.subscription.created") == 3
    assert value(found, "stripe_webhooks_received_total", type="customer.created") == 1
    assert value(found, "stripe_webhooks_received_total", type="charge.refunded") == 1
    assert value(found, "webhook_events_ignored_total", type="charge.refunded") == 1
    assert value(found, "webhook_events_applied_total", type="customer.subscription.created") == 2
    assert value(found, "webhook_events_applied_total", type="customer.created") == 1
    assert value(found, "webhook_request_duration_seconds_count") == 12
    assert value(found, "webhook_event_apply_duration_seconds_count") == 3
    assert value(found, "webhook_event_apply_lag_seconds_count") == 3
    # Lag from `created` (just now) to applied: under a minute, so every observation is in that bucket.
    assert value(found, "webhook_event_apply_lag_seconds_bucket", le="60.0") == 3
    assert value(found, "webhook_events_backlog") == 0
    assert value(found, "webhook_events_parked") == 0
    assert value(found, "webhook_oldest_pending_age_seconds") == 0
    assert 0 <= value(found, "webhook_seconds_since_last_accepted") < 60
    assert value(found, "webhook_secret_configured") == 1
    assert value(found, "webhook_database_up") == 1
    assert value(found, "webhook_workers_alive") == 0  # run_once does not beat; only a running worker does
    assert value(found, "kamiyo_users_manual_override") == 0


def test_failed_attempts_parked_events_and_backlog_are_counted(
    client: tuple[AppClient, WebhookMetrics], engine: Engine, settings: Settings
) -> None:
    """An unmapped price fails (parked at once); a pending event is backlog until applied."""
    http, metrics = client
    assert _post(http, _sub_event("price_nobody_knows")) == 200
    assert _post(http, _customer_event()) == 200
    before = samples(http.get("/metrics").text)
    assert value(before, "webhook_events_backlog") == 2
    assert value(before, "webhook_oldest_pending_age_seconds") >= 0

    Worker(engine, settings, metrics=metrics).run_once()
    found = samples(http.get("/metrics").text)
    assert value(found, "webhook_events_failed_total", type="customer.subscription.created") == 1
    assert value(found, "webhook_events_applied_total", type="customer.created") == 1
    assert value(found, "webhook_events_parked") == 1
    assert value(found, "webhook_events_backlog") == 0


def test_doctor_probes_are_left_out_of_every_delivery_count(engine: Engine, settings: Settings) -> None:
    """doctor's unsigned ping and its signed probe event are neither attempts nor stats rows."""
    metrics = WebhookMetrics()
    with AppClient(create_app(settings, engine=engine, run_worker=False, metrics=metrics)) as http:
        mark = probe_header(settings.webhook_secrets[0], int(time.time()))
        ping = http.post(WEBHOOK_PATH, content=b'{"type":"ping"}', headers={PROBE_HEADER: mark})
        assert ping.status_code == 400
        assert _post(http, _sub_event(event_id=PROBE_EVENT_PREFIX + "abc")) == 200
        Worker(engine, settings, metrics=metrics).run_once()
        found = samples(http.get("/metrics").text)
    assert value(found, "webhook_attempts_total") == 0
    assert value(found, "webhook_failures_total", reason="missing_signature") == 0
    assert ("webhook_events_applied_total", (("type", "customer.subscription.created"),)) not in found
    # The app has stopped, so its writer has committed everything queued.
    with engine.connect() as connection:
        assert connection.execute(select(delivery_stats_table)).all() == []


def test_a_request_that_only_claims_to_be_doctor_is_counted(engine: Engine, settings: Settings) -> None:
    """doctor's User-Agent proves nothing: an unsigned request carrying it is a failed delivery."""
    metrics = WebhookMetrics()
    with AppClient(create_app(settings, engine=engine, run_worker=False, metrics=metrics)) as http:
        ping = http.post(WEBHOOK_PATH, content=b'{"type":"ping"}', headers={"User-Agent": "kamiyo-doctor/1"})
        assert ping.status_code == 400
        found = samples(http.get("/metrics").text)
    assert value(found, "webhook_attempts_total") == 1
    assert value(found, "webhook_failures_total", reason="missing_signature") == 1
    with engine.connect() as connection:
        rows = connection.execute(select(delivery_stats_table.c.reason, delivery_stats_table.c.count)).all()
    assert sum(count for reason, count in rows if reason == "missing_signature") == 1


def test_delivery_stats_rows_match_the_deliveries_once_the_writer_has_drained(
    engine: Engine, settings: Settings
) -> None:
    """Accepted, duplicate and rejected deliveries land in webhook_delivery_stats by minute, reason and type."""
    app = create_app(settings, engine=engine, run_worker=False, metrics=WebhookMetrics())
    event = _sub_event()
    with AppClient(app) as http:
        assert _post(http, event) == 200
        assert _post(http, event) == 200
        assert _post(http, _customer_event()) == 200
        assert _post(http, _sub_event(), "whsec_someone_else") == 400
        assert http.post(WEBHOOK_PATH, content=b"{}").status_code == 400
    with engine.connect() as connection:
        rows = connection.execute(
            select(
                delivery_stats_table.c.outcome,
                delivery_stats_table.c.reason,
                delivery_stats_table.c.event_type,
                delivery_stats_table.c.count,
            )
        ).all()
    totals: dict[tuple[str, str, str], int] = {}
    for outcome, reason, event_type, count in rows:
        totals[(outcome, reason, event_type)] = totals.get((outcome, reason, event_type), 0) + count
    assert totals == {
        ("accepted", "", "customer.subscription.created"): 1,
        ("duplicate", "", "customer.subscription.created"): 1,
        ("accepted", "", "customer.created"): 1,
        ("rejected", "invalid_signature", ""): 1,
        ("rejected", "missing_signature", ""): 1,
    }


def test_a_service_without_a_secret_counts_not_configured_and_says_so_in_a_gauge(
    engine: Engine, settings: Settings
) -> None:
    """Every 503 for a missing secret is a failure with reason not_configured; the gauge reads 0."""
    app = create_app(replace(settings, webhook_secrets=()), engine=engine, run_worker=False, metrics=WebhookMetrics())
    with AppClient(app) as http:
        assert _post(http, _sub_event()) == 503
        found = samples(http.get("/metrics").text)
    assert value(found, "webhook_failures_total", reason="not_configured") == 1
    assert value(found, "webhook_attempts_total") == 1
    assert value(found, "webhook_secret_configured") == 0


def test_metrics_disabled_answers_404_and_counts_nothing(engine: Engine, settings: Settings) -> None:
    """METRICS_ENABLED=false turns off /metrics and the delivery stats; deliveries still work."""
    app = create_app(replace(settings, metrics_enabled=False), engine=engine, run_worker=False)
    with AppClient(app) as http:
        assert _post(http, _sub_event()) == 200
        assert http.post(WEBHOOK_PATH, content=b"{}").status_code == 400
        assert http.get("/metrics").status_code == 404
    with engine.connect() as connection:
        assert connection.execute(select(delivery_stats_table)).all() == []


def test_a_scrape_while_the_database_is_down_still_answers_with_database_up_zero(settings: Settings) -> None:
    """The state gauges need the database; without it the page still renders, saying so."""
    from kamiyo.db.engine import make_engine
    from kamiyo.telemetry.metrics import StateCollector, render, scrape_source

    broken = make_engine(replace(settings, database_url="postgresql://nobody@127.0.0.1:9/none"))
    page = render(scrape_source(WebhookMetrics(), StateCollector(broken, settings))).decode()
    broken.dispose()
    found = samples(page)
    assert value(found, "webhook_database_up") == 0
    assert ("webhook_events_backlog", ()) not in found


def test_deliveries_counted_in_bulk_read_exactly_as_counted_one_by_one() -> None:
    """``flush`` gives the counters and every histogram bucket (edges included) and sum the values
    ``Counter.inc`` and ``Histogram.observe`` one delivery at a time would have given."""
    from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

    from kamiyo.telemetry.metrics import _LATENCY_BUCKETS

    deliveries = [("invoice.paid", 0.0004, False), ("invoice.paid", 0.001, False), ("charge.refunded", 0.0025, True)]
    deliveries += [("customer.created", bound, False) for bound in _LATENCY_BUCKETS]  # exactly on each edge
    deliveries += [("customer.created", 0.0031 * n, n % 7 == 0) for n in range(500)] + [("invoice.paid", 42.0, False)]

    bulk = WebhookMetrics()
    for event_type, seconds, ignored in deliveries:
        bulk.delivery_received(event_type, seconds, ignored=ignored)
    bulk.flush()

    registry = CollectorRegistry()
    attempts = Counter("webhook_attempts", "POST deliveries to the webhook endpoint.", registry=registry)
    received = Counter("stripe_webhooks_received", "by type", ["type"], registry=registry)
    ignored_counter = Counter("webhook_events_ignored", "by type", ["type"], registry=registry)
    latency = Histogram("webhook_request_duration_seconds", "latency", buckets=_LATENCY_BUCKETS, registry=registry)
    for event_type, seconds, ignored in deliveries:
        attempts.inc()
        received.labels(event_type).inc()
        if ignored:
            ignored_counter.labels(event_type).inc()
        latency.observe(seconds)

    def lines(exposition: bytes, *names: str) -> list[str]:
        return sorted(line for line in exposition.decode().splitlines() if line.startswith(names))

    names = ("webhook_attempts_total", "stripe_webhooks_received_total", "webhook_events_ignored_total")
    names += ("webhook_request_duration_seconds_",)
    assert lines(generate_latest(bulk.registry), *names) == lines(generate_latest(registry), *names)
    assert lines(generate_latest(bulk.registry), "webhook_request_duration_seconds_count") == [
        f"webhook_request_duration_seconds_count {float(len(deliveries))}"
    ]


def test_worker_batches_counted_by_tally_read_exactly_as_counted_one_by_one() -> None:
    """A batch's ``ProcessedTally``, pickled as the inbox process sends it to the server, gives
    every counter, bucket (edges included) and sum that one increment and one ``observe`` per
    event would have given."""
    import pickle

    from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

    from kamiyo.telemetry.metrics import _LAG_BUCKETS, _LATENCY_BUCKETS, ProcessedTally

    committed_at = 1_800_000_000.0
    outcomes = [("applied", "invoice.paid", int(committed_at) - 3, 0.0004), ("ignored", "charge.refunded", 1, 0.0)]
    outcomes += [
        ("applied", "customer.created", int(committed_at - lag), bound)
        for bound, lag in zip(_LATENCY_BUCKETS, _LAG_BUCKETS, strict=False)
    ]  # on each edge of the apply histogram and each whole-second edge of the lag histogram
    outcomes += [("applied", "customer.created", int(committed_at - _LAG_BUCKETS[-1]), 0.0)]  # the last lag edge
    outcomes += [("pending", "invoice.paid", 5, 0.01), ("failed", "invoice.paid", 5, 0.02)]
    outcomes += [("applied", "customer.updated", int(committed_at) + 2, 12.5)]  # Stripe's clock ahead: lag 0
    batches = [outcomes[:5], outcomes[5:]]

    tallied = WebhookMetrics()
    for batch in batches:
        tallied.count_processed(pickle.loads(pickle.dumps(ProcessedTally.of(iter(batch), committed_at))))

    registry = CollectorRegistry()
    counters = {
        status: Counter(f"webhook_events_{status}", "by type", ["type"], registry=registry)
        for status in ("applied", "failed", "ignored")
    }
    apply = Histogram("webhook_event_apply_duration_seconds", "s", buckets=_LATENCY_BUCKETS, registry=registry)
    lag = Histogram("webhook_event_apply_lag_seconds", "s", buckets=_LAG_BUCKETS, registry=registry)
    for status, event_type, created, seconds in outcomes:
        counters["failed" if status == "pending" else status].labels(event_type).inc()
        if status == "applied":
            apply.observe(seconds)
            lag.observe(max(0.0, committed_at - created))

    def lines(exposition: bytes) -> list[str]:
        names = ("webhook_events_applied_", "webhook_events_failed_", "webhook_events_ignored_")
        names += ("webhook_event_apply_duration_seconds_", "webhook_event_apply_lag_seconds_")
        return sorted(line for line in exposition.decode().splitlines() if line.startswith(names))

    got, expected = lines(generate_latest(tallied.registry)), lines(generate_latest(registry))
    assert [line for line in got if "_sum " not in line] == [line for line in expected if "_sum " not in line]
    sums = [(dict(line.split() for line in lines_ if "_sum " in line)) for lines_ in (got, expected)]
    assert sums[0].keys() == sums[1].keys()
    assert len(sums[0]) == 2
    for name, total in sums[0].items():  # added in another order: equal up to rounding
        assert float(total) == pytest.approx(float(sums[1][name]), rel=1e-12)
    assert "webhook_event_apply_lag_seconds_count 16.0" in got


def test_queued_deliveries_are_counted_within_seconds_without_a_scrape() -> None:
    """Another process may answer the scrape (multiprocess mode): the counts reach the registry by
    themselves, at least once a second."""
    metrics = WebhookMetrics()
    metrics.delivery_received("invoice.paid", 0.002, ignored=False)
    deadline = time.monotonic() + 10
    while metrics.registry.get_sample_value("webhook_attempts_total") != 1.0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert metrics.registry.get_sample_value("webhook_attempts_total") == 1.0
    assert metrics.registry.get_sample_value("stripe_webhooks_received_total", {"type": "invoice.paid"}) == 1.0


def test_an_event_type_becomes_a_label_cleaned_like_every_other_output() -> None:
    """A type comes from a payload: a secret inside it is redacted, a control character escaped."""
    from prometheus_client import generate_latest

    from kamiyo.telemetry.metrics import ProcessedTally

    metrics = WebhookMetrics()
    hostile = "invoice.whsec_leaked123\x1b[2J"
    metrics.delivery_received(hostile, 0.001, ignored=True)
    metrics.flush()
    metrics.count_processed(ProcessedTally.of([("applied", hostile, int(time.time()), 0.001)], time.time()))
    exposition = generate_latest(metrics.registry).decode()
    assert "whsec_leaked123" not in exposition
    assert "\x1b" not in exposition
    found = samples(exposition)
    cleaned = "invoice.[redacted]\\x1b[2J"
    assert value(found, "stripe_webhooks_received_total", type=cleaned) == 1
    assert value(found, "webhook_events_ignored_total", type=cleaned) == 1
    assert value(found, "webhook_events_applied_total", type=cleaned) == 1


def test_the_retention_and_the_stripe_modes_are_gauges_read_from_the_database(
    client: tuple[AppClient, WebhookMetrics], engine: Engine, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kamiyo.processing.retention import Retention

    http, _metrics = client
    found = samples(http.get("/metrics").text)
    assert value(found, "kamiyo_inbox_prune_consecutive_failures") == 0
    assert ("kamiyo_inbox_prune_last_success_timestamp_seconds", ()) not in found  # no prune has finished yet
    assert value(found, "kamiyo_stripe_modes_mixed") == 0

    assert _post(http, _customer_event()) == 200
    assert (
        _post(
            http,
            synthetic.event("customer.created", synthetic.customer(customer_id="cus_l", email=None), livemode=True),
        )
        == 200
    )
    assert value(samples(http.get("/metrics").text), "kamiyo_stripe_modes_mixed") == 1

    retention = Retention(engine, settings, "worker-a")
    while retention.step(1_800_000_000.0):
        pass
    found = samples(http.get("/metrics").text)
    assert value(found, "kamiyo_inbox_prune_last_success_timestamp_seconds") == 1_800_000_000.0

    def broken(*_args: object, **_kwargs: object) -> object:
        raise RuntimeError("no")

    monkeypatch.setattr("kamiyo.processing.retention.prune_batch", broken)
    for attempt in range(3):
        Retention(engine, settings, "worker-a", interval=1, retry=1).step(1_800_000_100.0 + 10 * attempt)
    assert value(samples(http.get("/metrics").text), "kamiyo_inbox_prune_consecutive_failures") == 3
