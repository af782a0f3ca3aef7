"""Webhook health: every check healthy, each degraded cause, and the route's status and privacy."""

from __future__ import annotations

import os
import time
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
from sqlalchemy import Engine, insert

from appclient import AppClient
from diagnosis.fake_stripe import FakeStripe, endpoint, fake_stripe
from e2e.harness import free_port
from kamiyo import synthetic
from kamiyo.config import Settings
from kamiyo.db.engine import make_engine
from kamiyo.db.models import events_table
from kamiyo.telemetry import webhook_health as webhook_health_module
from kamiyo.telemetry.delivery_stats import add_delivery_counts, minute_of
from kamiyo.telemetry.heartbeat import Heartbeat
from kamiyo.telemetry.metrics import WebhookMetrics
from kamiyo.telemetry.webhook_health import FAIL, OK, SKIPPED, WARN, cached_probe, check_secret, run_checks
from kamiyo.web.app import WEBHOOK_PATH, create_app
from kamiyo.webhooks.envelope import read_envelope
from kamiyo.webhooks.inbox import inbox_row
from support import SECRET

ADMIN_TOKEN = "health-admin-token-0123456789"

NOW = time.time()


def _event_row(event_id: str, *, age: float = 0.0, now: float = NOW, **overrides: Any) -> dict[str, Any]:
    obj = synthetic.customer(customer_id="cus_health", email="h@example.com")
    body = orjson.dumps(synthetic.event("customer.updated", obj, event_id=event_id))
    envelope, _ = read_envelope(body)
    row = inbox_row(envelope, body, status="applied")
    row["received_at"] = datetime.fromtimestamp(now - age, UTC)
    row.update(overrides)
    return row


def _healthy_database(engine: Engine, now: float = NOW) -> None:
    """A recent accepted webhook, a clean last hour and a live worker (as of ``now``)."""
    with engine.begin() as connection:
        connection.execute(insert(events_table), [_event_row("evt_recent", age=60, now=now)])
        add_delivery_counts(connection, {(minute_of(now - 60), "accepted", "", "customer.updated"): 40})
    Heartbeat(engine).beat(now=now)


def _statuses(engine: Engine, settings: Settings, **kwargs: Any) -> dict[str, str]:
    report = run_checks(engine, settings, now=NOW, **kwargs)
    return {check.name: check.status for check in report.checks}


def test_every_check_passes_on_a_healthy_service(engine: Engine, settings: Settings) -> None:
    _healthy_database(engine)
    report = run_checks(engine, settings, now=NOW, stripe_probe=lambda: "Stripe API reachable")
    assert {c.name: c.status for c in report.checks} == {
        "secret": OK,
        "database": OK,
        "last_accepted": OK,
        "success_ratio": OK,
        "backlog": OK,
        "parked": OK,
        "worker": OK,
        "stripe_mode": OK,
        "retention": OK,
        "stripe_api": OK,
    }
    assert report.healthy


@pytest.mark.parametrize(
    ("secrets", "problem"),
    [
        ((), "not set"),
        ((SECRET + "\n",), "whitespace"),
        (('"' + SECRET + '"',), "quotes"),
        (("sk_live_pasted_the_wrong_key",), "whsec_ prefix"),
        (("whsec_abc def",), "whitespace inside"),
    ],
)
def test_a_missing_or_mispasted_secret_degrades_and_says_what_is_wrong(secrets: tuple[str, ...], problem: str) -> None:
    check = check_secret(secrets)
    assert check.status == FAIL
    assert problem in check.detail
    assert all(s.strip() not in check.detail for s in secrets if s.strip())  # no secret material


def test_no_webhook_for_longer_than_the_silence_limit_degrades(engine: Engine, settings: Settings) -> None:
    _healthy_database(engine)
    with engine.begin() as connection:
        connection.execute(events_table.delete())
        connection.execute(insert(events_table), [_event_row("evt_old", age=3 * 3600)])
    assert _statuses(engine, settings)["last_accepted"] == FAIL


def test_the_limits_come_from_the_settings_and_a_zero_silence_limit_turns_that_check_off(
    engine: Engine, settings: Settings
) -> None:
    """An account with few events sets HEALTH_SILENCE_SECONDS=0; a busy one a shorter backlog age."""
    _healthy_database(engine)
    with engine.begin() as connection:
        connection.execute(events_table.delete())
        connection.execute(
            insert(events_table),
            [_event_row("evt_old", age=3 * 3600), _event_row("evt_waiting", age=200, status="pending")],
        )
    assert _statuses(engine, settings)["backlog"] == OK  # 200 s is within the default 600 s
    quiet = replace(settings, health_silence_seconds=0, health_backlog_max_age_seconds=120)
    statuses = _statuses(engine, quiet)
    assert statuses["last_accepted"] == OK
    assert statuses["backlog"] == FAIL


def test_a_new_install_without_any_webhook_yet_only_warns(engine: Engine, settings: Settings) -> None:
    Heartbeat(engine).beat(now=NOW)
    report = run_checks(engine, settings, now=NOW)
    assert report.check("last_accepted").status == WARN
    assert report.healthy


def test_a_success_ratio_below_95_percent_over_the_last_hour_degrades(engine: Engine, settings: Settings) -> None:
    _healthy_database(engine)
    with engine.begin() as connection:
        add_delivery_counts(connection, {(minute_of(NOW - 120), "rejected", "invalid_signature", ""): 5})
    report = run_checks(engine, settings, now=NOW)
    ratio = report.check("success_ratio")
    assert ratio.status == FAIL
    assert ratio.data["ratio"] == round(40 / 45, 4)
    assert ratio.data["failures_by_reason"] == {"invalid_signature": 5}


def test_a_few_failures_among_few_deliveries_warn_without_degrading(engine: Engine, settings: Settings) -> None:
    Heartbeat(engine).beat(now=NOW)
    with engine.begin() as connection:
        add_delivery_counts(connection, {(minute_of(NOW), "rejected", "malformed", ""): 1})
    assert _statuses(engine, settings)["success_ratio"] == WARN


def test_a_backlog_whose_oldest_event_waits_too_long_degrades(engine: Engine, settings: Settings) -> None:
    _healthy_database(engine)
    with engine.begin() as connection:
        connection.execute(insert(events_table), [_event_row("evt_stuck", age=1200, status="pending")])
    report = run_checks(engine, settings, now=NOW)
    assert report.check("backlog").status == FAIL
    assert report.check("backlog").data["pending"] == 1


def test_parked_failures_degrade_and_are_grouped_by_reason(engine: Engine, settings: Settings) -> None:
    _healthy_database(engine)
    errors = [
        "UnmappedPrice: subscription sub_1 has price price_x that maps to no tier",
        "UnmappedPrice: subscription sub_2 has price price_y that maps to no tier",
        "KeyError: 'data'",
    ]
    rows = [_event_row(f"evt_park{i}", status="failed", last_error=e) for i, e in enumerate(errors)]
    with engine.begin() as connection:
        connection.execute(insert(events_table), rows)
    parked = run_checks(engine, settings, now=NOW).check("parked")
    assert parked.status == FAIL
    assert [(r["reason"], r["count"]) for r in parked.data["reasons"]] == [("UnmappedPrice", 2), ("KeyError", 1)]


def test_a_worker_whose_heartbeat_is_stale_counts_as_not_running(engine: Engine, settings: Settings) -> None:
    Heartbeat(engine).beat(now=NOW - 120)  # a worker that stopped beating two minutes ago
    report = run_checks(engine, settings, now=NOW)
    assert report.check("worker").status == FAIL
    assert report.check("worker").data["workers_alive"] == 0


def test_an_unreachable_database_degrades_and_skips_what_needs_it(settings: Settings) -> None:
    broken = make_engine(replace(settings, database_url="postgresql://nobody@127.0.0.1:9/none"))
    try:
        report = run_checks(broken, settings, now=NOW)
    finally:
        broken.dispose()
    statuses = {c.name: c.status for c in report.checks}
    assert statuses["database"] == FAIL
    assert {statuses[n] for n in ("last_accepted", "success_ratio", "backlog", "parked", "worker")} == {SKIPPED}


def test_an_unreachable_stripe_api_degrades_and_no_key_skips(engine: Engine, settings: Settings) -> None:
    _healthy_database(engine)

    def refused() -> str:
        raise ConnectionError("connection refused")

    assert _statuses(engine, settings, stripe_probe=refused)["stripe_api"] == FAIL
    assert _statuses(engine, settings)["stripe_api"] == SKIPPED


def test_route_answers_200_when_healthy_and_503_when_degraded_without_secret_material(
    engine: Engine, settings: Settings
) -> None:
    _healthy_database(engine, time.time())  # the route checks against the real clock
    app = create_app(settings, engine=engine, run_worker=False, metrics=WebhookMetrics())
    with AppClient(app) as http:
        healthy = http.get(WEBHOOK_PATH + "/health")
        assert http.post(WEBHOOK_PATH, content=b"{}").status_code == 400  # the webhook route is untouched
    assert healthy.status_code == 200
    assert healthy.json()["status"] == "healthy"
    assert SECRET not in healthy.text
    assert SECRET[6:] not in healthy.text

    app = create_app(replace(settings, webhook_secrets=()), engine=engine, run_worker=False, metrics=WebhookMetrics())
    with AppClient(app) as http:
        degraded = http.get(WEBHOOK_PATH + "/health")
    assert degraded.status_code == 503
    body = degraded.json()
    assert body["status"] == "degraded"
    assert next(c for c in body["checks"] if c["name"] == "secret")["status"] == FAIL


def test_the_stripe_probe_is_asked_at_most_once_per_ttl_and_its_error_is_reused() -> None:
    calls: list[float] = []
    clock = [0.0]

    def probe() -> str:
        calls.append(clock[0])
        if len(calls) == 2:
            raise ConnectionError("refused")
        return "reachable"

    cached = cached_probe(probe, ttl=60, clock=lambda: clock[0])
    assert cached() == "reachable"
    clock[0] = 30
    assert cached() == "reachable"
    clock[0] = 61
    with pytest.raises(ConnectionError):
        cached()
    clock[0] = 90
    with pytest.raises(ConnectionError):
        cached()
    assert calls == [0.0, 61]


def test_with_an_api_key_the_route_reports_whether_stripe_answers(engine: Engine, settings: Settings) -> None:
    """The public answer says whether Stripe answers; the token holder's says what it answered."""
    _healthy_database(engine, time.time())
    state = FakeStripe(endpoints=[endpoint("https://pay.example.com/api/v1/payments/webhook")])
    token = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    with fake_stripe(state):
        keyed = replace(
            settings, stripe_secret_key="sk_test_health", stripe_api_base=state.base, admin_token=ADMIN_TOKEN
        )
        with AppClient(create_app(keyed, engine=engine, run_worker=False, metrics=WebhookMetrics())) as http:
            reachable = http.get(WEBHOOK_PATH + "/health").json()
            detailed = http.get("/admin/api/health", headers=token).json()
    closed = replace(settings, stripe_secret_key="sk_test_health", stripe_api_base=f"http://127.0.0.1:{free_port()}")
    with AppClient(create_app(closed, engine=engine, run_worker=False, metrics=WebhookMetrics())) as http:
        unreachable = http.get(WEBHOOK_PATH + "/health")
    assert next(c for c in reachable["checks"] if c["name"] == "stripe_api") == {"name": "stripe_api", "status": OK}
    check = next(c for c in detailed["checks"] if c["name"] == "stripe_api")
    assert (check["status"], check["detail"]) == (OK, "Stripe API reachable (1 webhook endpoint(s))")
    assert unreachable.status_code == 503
    assert next(c for c in unreachable.json()["checks"] if c["name"] == "stripe_api")["status"] == FAIL


def test_the_public_answer_shows_states_start_time_and_fingerprints_and_nothing_else(
    engine: Engine, settings: Settings
) -> None:
    """A parked error holding a secret inside an event id, and the process id, stay behind the token."""
    leaked = "evt_whsec_leakedsecret123 failed with sk_live_leakedkey456"
    _healthy_database(engine, time.time())
    with engine.begin() as connection:
        connection.execute(
            insert(events_table),
            [_event_row("evt_parked_1", status="failed", last_error=f"UnmappedPrice: {leaked}", attempts=8)],
        )
    app = create_app(replace(settings, admin_token=ADMIN_TOKEN), engine=engine, run_worker=False)
    with AppClient(app) as http:
        public = http.get(WEBHOOK_PATH + "/health")
        detailed = http.get("/admin/api/health", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    assert public.status_code == 503  # the parked event fails its check
    body = public.json()
    assert set(body) == {"status", "checks", "service"}
    assert body["service"] == {"started_at": pytest.approx(time.time(), abs=60)}
    for check in body["checks"]:
        expected = {"name", "status"} | ({"configured", "fingerprints"} if check["name"] == "secret" else set())
        assert set(check) == expected
    secret = next(c for c in body["checks"] if c["name"] == "secret")
    assert secret["configured"] == 1
    assert len(secret["fingerprints"]) == 1
    for text in ("leaked", "UnmappedPrice", "evt_parked_1", str(os.getpid())):
        assert text not in public.text
    parked = next(c for c in detailed.json()["checks"] if c["name"] == "parked")
    assert parked["reasons"][0]["reason"] == "UnmappedPrice"
    assert "leaked" not in detailed.text
    assert "[redacted]" in parked["reasons"][0]["example"]
    assert detailed.json()["service"]["pid"] == os.getpid()


def test_health_answers_are_reused_for_a_second_whoever_asks(engine: Engine, settings: Settings) -> None:
    """Anybody may poll the public endpoints: the database is read once per HEALTH_CACHE_SECONDS."""
    _healthy_database(engine, time.time())
    reads: list[float] = []
    original = webhook_health_module.read_state

    def counting(*args: Any, **kwargs: Any) -> Any:
        reads.append(time.monotonic())
        return original(*args, **kwargs)

    webhook_health_module.read_state = counting  # type: ignore[assignment]
    try:
        app = create_app(replace(settings, health_cache_seconds=60.0), engine=engine, run_worker=False)
        with AppClient(app) as http:
            answers = [http.get(WEBHOOK_PATH + "/health").status_code for _ in range(20)]
        assert answers == [200] * 20
        assert len(reads) == 1
        reads.clear()
        app = create_app(replace(settings, health_cache_seconds=0.0), engine=engine, run_worker=False)
        with AppClient(app) as http:
            for _ in range(3):
                http.get(WEBHOOK_PATH + "/health")
        assert len(reads) == 3
    finally:
        webhook_health_module.read_state = original


# -- Stripe's modes and the inbox's retention --------------------------------------------------------


def _modes(engine: Engine, *livemodes: bool) -> None:
    with engine.begin() as connection:
        connection.execute(
            insert(events_table),
            [_event_row(synthetic.new_id("evt"), livemode=livemode) for livemode in livemodes],
        )


def test_a_service_taking_both_modes_warns_when_both_arrive_and_stays_healthy(
    engine: Engine, settings: Settings
) -> None:
    _healthy_database(engine)
    _modes(engine, False, False)
    report = run_checks(engine, settings, now=NOW)
    assert report.check("stripe_mode").status == OK
    assert "the newest events are test-mode" in report.check("stripe_mode").detail
    _modes(engine, True)
    report = run_checks(engine, settings, now=NOW)
    check = report.check("stripe_mode")
    assert check.status == WARN
    assert "set STRIPE_MODE=live (or test)" in check.detail
    assert check.data["recent_modes"] == ["live", "test"]
    assert report.healthy  # a warning, not a degraded service
    live = run_checks(engine, replace(settings, stripe_mode="live"), now=NOW).check("stripe_mode")
    assert (live.status, live.detail) == (OK, "takes live-mode events only (the other mode's are stored as ignored)")


def test_only_the_newest_events_count_so_the_warning_ends_once_one_mode_arrives_again(
    engine: Engine, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("kamiyo.telemetry.inbox_modes.MODE_WINDOW", 3)
    _modes(engine, False, True, True, True)
    assert run_checks(engine, settings, now=NOW).check("stripe_mode").status == OK
    _modes(engine, False)
    assert run_checks(engine, settings, now=NOW).check("stripe_mode").status == WARN


def test_the_retention_check_warns_after_three_failed_prunes_in_a_row(engine: Engine, settings: Settings) -> None:
    from sqlalchemy import update

    from kamiyo.db.models import maintenance_tasks_table
    from kamiyo.processing.retention import TASK, Retention

    _healthy_database(engine)
    assert run_checks(engine, settings, now=NOW).check("retention").detail == "no prune has run yet"
    retention = Retention(engine, settings, "worker-a")
    while retention.step(NOW - 600):
        pass
    assert run_checks(engine, settings, now=NOW).check("retention").status == OK
    assert "last prune 10 min ago" in run_checks(engine, settings, now=NOW).check("retention").detail
    with engine.begin() as connection:
        connection.execute(
            update(maintenance_tasks_table)
            .where(maintenance_tasks_table.c.name == TASK)
            .values(consecutive_failures=3, last_error="OperationalError: database or disk is full")
        )
    report = run_checks(engine, settings, now=NOW)
    assert report.check("retention").status == WARN
    assert "failed 3 times in a row: OperationalError: database or disk is full" in report.check("retention").detail
    assert report.healthy
