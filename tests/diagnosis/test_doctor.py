"""kamiyo doctor against real servers, each runbook failure mode broken on purpose.

Every test checks that doctor names the failure and the runbook option that applies, and that
its end-to-end probe leaves no trace in user-visible state.
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
from sqlalchemy import insert

from diagnosis.fake_stripe import FakeStripe, endpoint, fake_stripe
from e2e.harness import free_port, wait_until
from kamiyo import synthetic
from kamiyo.config import load_settings
from kamiyo.db.engine import make_engine
from kamiyo.db.models import events_table
from kamiyo.diagnosis.doctor import FAIL, OK, SKIPPED, Diagnosis, Doctor
from kamiyo.diagnosis.stripe_view import stripe_view
from kamiyo.webhooks.envelope import read_envelope
from kamiyo.webhooks.inbox import inbox_row
from support import OLD_SECRET, signed
from telemetry.servers import Server, ServerFactory

pytestmark = pytest.mark.slow


def diagnose(server: Server, *, apply_timeout: float = 10.0, **env: str) -> Diagnosis:
    """doctor as the operator runs it next to the service: same environment, unless ``env`` changes it."""
    settings = load_settings(server.env(**env), env_file=None)
    engine = make_engine(settings)
    try:
        doctor = Doctor(
            settings, url=server.url, engine=engine, stripe=stripe_view(settings), apply_timeout=apply_timeout
        )
        return doctor.run()
    finally:
        engine.dispose()


def _causes(diagnosis: Diagnosis) -> set[str | None]:
    return {f.cause for f in diagnosis.findings if f.status == FAIL}


def _probe_rows(server: Server) -> list[tuple[Any, ...]]:
    return server.rows(
        "SELECT 'event', stripe_event_id FROM webhook_events WHERE stripe_event_id LIKE 'evt_kamiyo_probe_%' "
        "UNION ALL SELECT 'sub', id FROM stripe_subscriptions WHERE id LIKE 'sub_kamiyo_probe_%' "
        "UNION ALL SELECT 'customer', id FROM stripe_customers WHERE id LIKE 'cus_kamiyo_probe_%'"
    )


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_a_healthy_service_passes_every_step_exits_0_and_the_probe_leaves_no_trace(
    servers: ServerFactory, backend: str
) -> None:
    server = servers(backend)
    assert server.deliver(synthetic.event("customer.created", synthetic.customer(customer_id="cus_h", email="h@x.io")))
    server.wait_for_user("h@x.io", ("free", None))
    users_before = server.rows("SELECT id, email, subscription_tier, subscription_status, updated_at FROM users")

    result = server.cli("doctor", "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["healthy"] is True
    assert report["verdict"] is None
    statuses = {f["step"]: f["status"] for f in report["findings"]}
    assert statuses["Step 5: port"] == OK
    assert statuses["Step 3: endpoint"] == OK
    assert statuses["Step 2: webhook secret"] == OK
    assert statuses["End to end"] == OK
    assert statuses["Step 4: Stripe"] == SKIPPED
    assert _probe_rows(server) == []
    assert (
        server.rows("SELECT id, email, subscription_tier, subscription_status, updated_at FROM users") == users_before
    )
    # Neither the ping nor the probe counts as a delivery (counts are written at most once a
    # second: after that long, any count of theirs would be in the table).
    time.sleep(1.5)
    assert server.rows("SELECT outcome, count FROM webhook_delivery_stats") == [("accepted", 1)]


def test_only_doctors_own_ping_is_left_out_of_the_counts_not_anyone_sending_its_user_agent(
    servers: ServerFactory,
) -> None:
    server = servers()
    assert server.cli("doctor", "--json").returncode == 0
    forged = server.post(b'{"type":"ping"}', {"User-Agent": "kamiyo-doctor/1", "Content-Type": "application/json"})
    assert forged.status_code == 400
    wait_until(
        lambda: server.rows("SELECT outcome, reason, count FROM webhook_delivery_stats"),
        timeout=10,
        what="the forged ping's count",
    )
    time.sleep(1.5)  # counts are written at most once a second: doctor's would be there by now
    assert server.rows("SELECT outcome, reason, count FROM webhook_delivery_stats") == [
        ("rejected", "missing_signature", 1)
    ]


def test_missing_secret_is_named_with_option_2(servers: ServerFactory) -> None:
    server = servers(STRIPE_WEBHOOK_SECRET="")
    result = server.cli("doctor")
    assert result.returncode == 1
    assert "STRIPE_WEBHOOK_SECRET is not set" in result.stdout
    assert "Verdict: Option 2: Update Webhook Secret." in result.stdout


def _counted_rejections(server: Server, count: int) -> None:
    """The service writes its per-minute delivery counts at most once a second: wait for them."""

    def rejected() -> bool:
        rows = server.rows("SELECT COALESCE(SUM(count), 0) FROM webhook_delivery_stats WHERE outcome = 'rejected'")
        return int(rows[0][0]) >= count

    wait_until(rejected, timeout=10, what=f"{count} rejections counted")


def test_wrong_secret_after_a_deploy_shows_as_an_invalid_signature_spike_with_option_2(
    servers: ServerFactory,
) -> None:
    """Stripe signs with a secret the service does not have: Step 1 sees the spike right after the start."""
    server = servers()
    for n in range(10):
        body, headers = signed(synthetic.event("invoice.paid", {"id": f"in_{n}", "object": "invoice"}), OLD_SECRET)
        assert server.post(body, headers).status_code == 400
    _counted_rejections(server, 10)
    diagnosis = diagnose(server)
    verdict = diagnosis.verdict
    assert verdict is not None
    assert (verdict.cause, verdict.option) == ("secret_mismatch", 2)
    assert "secret mismatch: 10 deliveries" in verdict.found
    assert "right after the service started" in verdict.found


def test_a_secret_changed_without_a_restart_is_caught_by_comparing_fingerprints(shared_server: Server) -> None:
    """The operator's environment holds the new secret; the running service still the old one."""
    server = shared_server
    diagnosis = diagnose(server, STRIPE_WEBHOOK_SECRET=OLD_SECRET)
    verdict = diagnosis.verdict
    assert verdict is not None
    assert (verdict.cause, verdict.option) == ("secret_mismatch", 2)
    assert "different secret" in verdict.found


def test_clock_skew_shows_as_timestamp_failures_and_no_runbook_option(servers: ServerFactory) -> None:
    server = servers()
    for n in range(5):
        event = synthetic.event("invoice.paid", {"id": f"in_{n}", "object": "invoice"})
        body, headers = signed(event, timestamp=int(time.time()) - 900)
        assert server.post(body, headers).status_code == 400
    _counted_rejections(server, 5)
    verdict = diagnose(server).verdict
    assert verdict is not None
    assert (verdict.cause, verdict.option) == ("clock_skew", None)
    assert "clock" in verdict.todo


def test_a_service_that_is_down_is_found_at_step_5_with_option_1(servers: ServerFactory) -> None:
    server = servers(start=False)
    result = server.cli("doctor", "--json", "--url", f"http://127.0.0.1:{free_port()}")
    assert result.returncode == 1
    report = json.loads(result.stdout)
    assert report["verdict"]["cause"] == "service_down"
    assert report["verdict"]["option_title"] == "Option 1: Restart Service"
    assert report["verdict"]["step"] == "Step 5: port"


def test_a_service_without_a_worker_is_found_by_the_probe_with_option_1(servers: ServerFactory) -> None:
    server = servers(WORKER_IN_PROCESS="false")
    diagnosis = diagnose(server, apply_timeout=1.0)
    verdict = diagnosis.verdict
    assert verdict is not None
    assert (verdict.cause, verdict.option) == ("worker_down", 1)
    assert "worker not running" in verdict.found
    assert _probe_rows(server) == []  # the unapplied probe is removed too, before any worker can apply it


@pytest.mark.timeout(120)
def test_the_probe_is_built_in_the_services_stripe_mode_and_a_mismatch_is_named(servers: ServerFactory) -> None:
    """A live service applies doctor's live-mode probe; doctor run with a test-mode environment is told why
    its probe was ignored."""
    server = servers(STRIPE_MODE="live")
    diagnosis = diagnose(server)
    assert {f.step: f.status for f in diagnosis.findings}["End to end"] == OK, diagnosis.to_text()
    assert _probe_rows(server) == []

    mismatch = diagnose(server, STRIPE_MODE="test")
    probe = next(f for f in mismatch.findings if f.step == "End to end")
    assert (probe.status, probe.cause) == (FAIL, "probe_failed")
    assert "test-mode event ignored: this service takes live-mode events only (STRIPE_MODE)" in probe.found
    assert "STRIPE_MODE" in probe.todo
    assert _probe_rows(server) == []


def test_parked_failures_with_an_unmapped_price_name_the_price_setting_and_replay(servers: ServerFactory) -> None:
    server = servers()
    sub = synthetic.subscription(sub_id="sub_unmapped", customer_id="cus_u", price_obj=synthetic.price("price_new"))
    event = synthetic.event("customer.subscription.created", sub)
    assert server.deliver(event).status_code == 200
    server.wait_status(str(event["id"]), "failed")
    verdict = diagnose(server).verdict
    assert verdict is not None
    assert (verdict.cause, verdict.option) == ("parked", 1)
    assert "UnmappedPrice" in verdict.found
    assert "STRIPE_PRICE_TIERS" in verdict.todo
    assert "kamiyo replay --failed" in verdict.todo


def test_a_stuck_backlog_is_named_with_option_1(servers: ServerFactory) -> None:
    """An event pending for 20 minutes (held back far into the future) while a worker is alive."""
    server = servers()
    body = orjson.dumps(synthetic.event("customer.created", synthetic.customer(customer_id="cus_s", email="s@x.io")))
    envelope, _ = read_envelope(body)
    row = inbox_row(envelope, body, status="pending")
    row.update(received_at=datetime.fromtimestamp(time.time() - 1200, UTC), available_at=time.time() + 86400)
    with server.engine.begin() as connection:
        connection.execute(insert(events_table).values(row))
    verdict = diagnose(server).verdict
    assert verdict is not None
    assert (verdict.cause, verdict.option) == ("backlog_stuck", 1)
    assert "1 event(s) pending, the oldest for 20 min" in verdict.found


def test_a_malformed_secret_in_the_environment_is_reported_not_crashed_on(servers: ServerFactory) -> None:
    server = servers()
    result = server.cli("doctor", "--json", STRIPE_WEBHOOK_SECRET='"whsec_pasted_with_quotes"')
    assert result.returncode == 1
    report = json.loads(result.stdout)
    assert report["verdict"]["cause"] == "config_invalid"
    assert report["verdict"]["option"] == 2
    assert "whsec_pasted_with_quotes" not in result.stdout


def test_step_4_reads_a_disabled_endpoint_from_stripe_and_names_option_4(shared_server: Server) -> None:
    server = shared_server
    state = FakeStripe(endpoints=[endpoint("https://pay.example.com/api/v1/payments/webhook", status="disabled")])
    with fake_stripe(state):
        diagnosis = diagnose(server, STRIPE_SECRET_KEY="sk_test_doctor", STRIPE_API_BASE=state.base)
    verdict = diagnosis.verdict
    assert verdict is not None
    assert (verdict.cause, verdict.option) == ("endpoint_disabled", 4)
    assert "is disabled" in verdict.found


def test_step_4_with_a_good_endpoint_reports_it_and_counts_undelivered_events(shared_server: Server) -> None:
    server = shared_server
    state = FakeStripe(
        endpoints=[
            endpoint("https://other.example.com/hooks", events=("invoice.paid",)),
            endpoint("https://pay.example.com/api/v1/payments/webhook"),
        ],
        undelivered=150,
    )
    with fake_stripe(state):
        diagnosis = diagnose(server, STRIPE_SECRET_KEY="sk_test_doctor", STRIPE_API_BASE=state.base)
    stripe = [f for f in diagnosis.findings if f.step == "Step 4: Stripe"]
    assert [f.status for f in stripe] == [OK, "warn"]
    assert "subscribed to the runbook's seven events" in stripe[0].found
    assert stripe[1].found.startswith("150 event(s)")
    assert diagnosis.healthy
    assert any("delivery_success=false" in path or "delivery_success=False" in path for path in state.requests)


def test_step_4_names_the_runbook_events_the_endpoint_is_missing(shared_server: Server) -> None:
    server = shared_server
    partial = ("customer.subscription.created", "customer.subscription.updated")
    state = FakeStripe(endpoints=[endpoint("https://pay.example.com/api/v1/payments/webhook", events=partial)])
    with fake_stripe(state):
        verdict = diagnose(server, STRIPE_SECRET_KEY="sk_test_doctor", STRIPE_API_BASE=state.base).verdict
    assert verdict is not None
    assert (verdict.cause, verdict.option) == ("endpoint_events", 4)
    assert "invoice.payment_failed" in verdict.found
