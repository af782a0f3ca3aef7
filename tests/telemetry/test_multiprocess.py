"""Several processes (two `kamiyo serve`, one `kamiyo worker`, the worker inside `kamiyo serve`'s
inbox process): counts neither reset, double nor go missing."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from kamiyo import synthetic
from support import signed
from telemetry.scrape import samples, value
from telemetry.servers import ServerFactory


def _event(n: int) -> dict[str, object]:
    customer = synthetic.customer(customer_id=f"cus_mp{n}", email=f"mp{n}@example.com")
    return synthetic.event("customer.created", customer)


@pytest.mark.slow
@pytest.mark.postgres
def test_any_process_reports_the_sum_of_all_and_a_restart_loses_nothing(servers: ServerFactory, tmp_path: Path) -> None:
    shared = {"PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "prom"), "WORKER_IN_PROCESS": "false"}
    (tmp_path / "prom").mkdir()
    first = servers("postgres", **shared)
    second = servers(database_url=first.database_url, **shared)
    events = [_event(n) for n in range(5)]
    with first.worker():
        for event in events[:3]:
            assert first.deliver(event).status_code == 200
        for event in events[3:]:
            assert second.deliver(event).status_code == 200
        body, headers = signed(events[0], "whsec_not_the_one")
        assert second.post(body, headers).status_code == 400
        for event in events:
            first.wait_status(str(event["id"]), "applied")

        for server in (first, second):
            # The other serve process counts its deliveries into the shared directory at least
            # once a second (WebhookMetrics.flush); the scraped one counts its own before answering.
            deadline = time.monotonic() + 10
            found = samples(server.metrics_text())
            while value(found, "webhook_attempts_total") < 6 and time.monotonic() < deadline:
                time.sleep(0.1)
                found = samples(server.metrics_text())
            assert value(found, "webhook_attempts_total") == 6
            assert value(found, "stripe_webhooks_received_total", type="customer.created") == 5
            assert value(found, "webhook_failures_total", reason="invalid_signature") == 1
            # Counted by the worker process, reported by the serve processes.
            assert value(found, "webhook_events_applied_total", type="customer.created") == 5
            assert value(found, "webhook_workers_alive") == 1

    second.restart()
    assert second.deliver(_event(9)).status_code == 200
    found = samples(second.metrics_text())
    assert value(found, "webhook_attempts_total") == 7  # not reset to 1, not doubled to 13
    assert value(found, "webhook_events_applied_total", type="customer.created") == 5


ADMIN_TOKEN = "multiprocess-admin-token-0123"


@pytest.mark.slow
def test_serve_reports_what_the_worker_in_its_inbox_process_applied(servers: ServerFactory) -> None:
    """`kamiyo serve` alone (WORKER_IN_PROCESS, the default): its worker runs in the inbox
    writer's process, and the serve process reports that worker's counts and liveness."""
    server = servers(KAMIYO_ADMIN_TOKEN=ADMIN_TOKEN)
    events = [_event(n) for n in range(3)]
    for event in events:
        assert server.deliver(event).status_code == 200
    for event in events:
        server.wait_status(str(event["id"]), "applied")
    found = samples(server.metrics_text())
    assert value(found, "webhook_events_applied_total", type="customer.created") == 3
    assert value(found, "webhook_event_apply_lag_seconds_count") == 3
    assert value(found, "webhook_workers_alive") == 1
    # The public health says the worker check is ok; the token holder's view says whose worker it is.
    health = server.http.get("/admin/api/health", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}).json()
    worker = next(check for check in health["checks"] if check["name"] == "worker")
    assert (worker["status"], worker["in_process_worker"]) == ("ok", True)
