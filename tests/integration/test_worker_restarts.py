"""A worker that dies is restarted, with a bounded pause, counted, logged, and shown by the webhook
health and ``kamiyo doctor``: in ``kamiyo serve``'s inbox process (``relayed_worker``) and in the
server's own thread when it runs without that process (an engine given by a test).

On SQLite and on PostgreSQL. A death is injected by making ``Worker.run`` raise (its own loop
never lets a failed batch out; what it guards against is a bug).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine, select

from e2e.harness import free_port
from integration.test_worker import customer_event, sub_event
from kamiyo.config import Settings
from kamiyo.db.models import events_table
from kamiyo.diagnosis.doctor import FAIL, WARN, Doctor, diagnose_worker_restarts, restarts_from_metrics
from kamiyo.processing.in_process import relayed_worker
from kamiyo.processing.restarts import RestartingWorker, RestartRecord, WorkerDeath
from kamiyo.processing.worker import Worker
from kamiyo.telemetry.metrics import WebhookMetrics
from kamiyo.telemetry.webhook_health import OK, run_checks
from kamiyo.web.app import WEBHOOK_PATH, create_app
from kamiyo.webhooks.inbox_process import InboxProcess
from kamiyo.webhooks.messages import WorkerDied, WorkerStarted
from support import signed

pytestmark = pytest.mark.timeout(120)

SECRET_IN_ERROR = "sk_live_0123456789abcdefghijkl"
ADMIN_TOKEN = "kamiyo-test-admin-token-0123456789"


def _dies_once(monkeypatch: pytest.MonkeyPatch, error: str = "the loop broke") -> list[int]:
    """``Worker.run`` raises the first time it is called, then runs as it does."""
    real = Worker.run
    calls: list[int] = []

    def run(self: Worker, stop: threading.Event, wake: threading.Event | None = None) -> None:
        calls.append(1)
        if len(calls) == 1:
            self.heartbeat.beat()  # alive for a moment, as a real worker is before it dies
            raise RuntimeError(f"{error} (key {SECRET_IN_ERROR})")
        real(self, stop, wake)

    monkeypatch.setattr(Worker, "run", run)
    return calls


def _wait(probe: Callable[[], Any], timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.02)


def _statuses(engine: Engine, *event_ids: str) -> list[str | None]:
    with engine.connect() as connection:
        rows = dict(connection.execute(select(events_table.c.stripe_event_id, events_table.c.status)).all())
    return [rows.get(event_id) for event_id in event_ids]


def test_a_worker_that_dies_is_restarted_and_applies_events_afterwards(
    harness: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    calls = _dies_once(monkeypatch)
    deaths: list[WorkerDeath] = []
    events = [customer_event("ann@example.com"), sub_event("active")]
    harness.deliver(*events)
    stop = threading.Event()
    restarting = RestartingWorker(lambda: Worker(harness.engine, harness.settings), on_death=deaths.append, pause=0.05)
    thread = threading.Thread(target=restarting.run, args=(stop,), daemon=True)
    with caplog.at_level(logging.INFO, logger="kamiyo.worker"):
        thread.start()
        try:
            applied = _wait(lambda: _statuses(harness.engine, *(e["id"] for e in events)) == ["applied"] * 2)
        finally:
            stop.set()
            thread.join(timeout=30)
    assert applied
    assert not thread.is_alive()
    assert len(calls) == 2
    assert restarting.deaths == 1
    assert len(deaths) == 1
    assert deaths[0].error == "RuntimeError: the loop broke (key [redacted])"
    assert 0.025 <= deaths[0].restart_in <= 0.05
    assert harness.tier_status("ann@example.com") == ("pro", "active")
    died = [r for r in caplog.records if r.getMessage().startswith("worker thread died")]
    assert len(died) == 1
    assert "RuntimeError: the loop broke" in died[0].getMessage()
    assert died[0].exc_info is not None  # the stack is logged, with the error as describe tells it
    assert SECRET_IN_ERROR not in str(died[0].exc_info[1])


def test_a_worker_that_keeps_dying_is_restarted_after_doubling_pauses_up_to_a_bound() -> None:
    """A crash loop does not spin: each pause doubles (with jitter) up to the bound."""
    deaths: list[WorkerDeath] = []

    class Broken:
        def run(self, _stop: threading.Event, _wake: threading.Event | None = None) -> None:
            raise RuntimeError("dies at once")

    stop = threading.Event()
    restarting = RestartingWorker(Broken, on_death=deaths.append, pause=0.02, max_pause=0.16)  # type: ignore[arg-type]
    thread = threading.Thread(target=restarting.run, args=(stop,), daemon=True)
    thread.start()
    time.sleep(1.5)
    stop.set()
    thread.join(timeout=10)
    assert not thread.is_alive()
    ceilings = [min(0.02 * 2**n, 0.16) for n in range(len(deaths))]
    assert all(c / 2 <= d.restart_in <= c for c, d in zip(ceilings, deaths, strict=True))
    # 1.5 s of pauses of at least half of 0.02, 0.04, 0.08, then 0.16: a bounded number of deaths.
    assert 5 <= len(deaths) <= 25


def test_the_worker_thread_of_the_inbox_process_restarts_its_worker_and_tells_the_server(
    settings: Settings, engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The child's side: a worker that dies is restarted and applies what is stored; the server
    is told of each start and of the death, never that the thread stopped.

    The thread is now ``processing.in_process.relayed_worker`` (it was ``_WorkerThread`` in
    webhooks/inbox_process.py) and its messages are typed: the test compares their types."""
    from kamiyo.webhooks.messages import Processed

    _dies_once(monkeypatch)
    events = [customer_event("ann@example.com"), sub_event("active")]
    from integration.conftest import Harness

    Harness(engine, settings).deliver(*events)
    sent: list[Any] = []
    monkeypatch.setattr("kamiyo.processing.restarts.RESTART_PAUSE", 0.05)
    thread = relayed_worker(engine, settings, threading.Event(), sent.append)
    try:
        applied = _wait(lambda: _statuses(engine, *(e["id"] for e in events)) == ["applied"] * 2)
    finally:
        thread.stop(timeout=30)
    assert applied
    kinds = [type(message) for message in sent if not isinstance(message, Processed)]
    assert kinds == [WorkerStarted, WorkerDied, WorkerStarted]
    death = next(message.death for message in sent if isinstance(message, WorkerDied))
    assert isinstance(death, WorkerDeath)
    assert death.error.startswith("RuntimeError: the loop broke")


def test_the_server_counts_each_death_its_child_reports_and_knows_the_worker_is_down_until_it_restarts(
    settings: Settings, engine: Engine
) -> None:
    """The messages are now typed (``WorkerDied``, ``WorkerStarted``) and the server's side takes
    the metrics themselves: the death is read from its counter and its record."""
    metrics = WebhookMetrics()

    async def scenario() -> list[bool | None]:
        writer = InboxProcess(settings, worker=True, metrics=metrics)
        await writer.start()
        try:
            seen = [writer.worker_alive()]
            writer._received(WorkerDied(WorkerDeath("RuntimeError: boom", time.time(), 1.0)))
            seen.append(writer.worker_alive())
            assert writer.worker_restarts.count == 1
            last = writer.worker_restarts.last
            assert last is not None
            assert last.error == "RuntimeError: boom"
            writer._received(WorkerStarted())
            seen.append(writer.worker_alive())
            return seen
        finally:
            await writer.stop()

    assert asyncio.run(scenario()) == [True, False, True]
    assert metrics.registry.get_sample_value("webhook_worker_restarts_total") == 1.0


@contextlib.contextmanager
def _serving(app: Any) -> Iterator[str]:
    """``app`` on a real port of 127.0.0.1 (uvicorn in a thread), for the doctor's HTTP requests."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        assert _wait(lambda: server.started, timeout=20), "the test server did not start"
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def test_the_servers_own_worker_thread_is_restarted_and_the_health_metrics_and_doctor_show_it(
    settings: Settings, engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker thread of a server without the inbox process (an engine given): restarted,
    applying deliveries afterwards; the webhook health's worker check warns (the public one names
    the state only, the admin API adds the count and the last error), /metrics counts the restart,
    and ``kamiyo doctor`` says "worker thread died 1 time(s); last error ..."."""
    _dies_once(monkeypatch)
    monkeypatch.setattr("kamiyo.processing.restarts.RESTART_PAUSE", 0.05)
    settings = dataclasses.replace(settings, admin_token=ADMIN_TOKEN, health_cache_seconds=0.0)
    events = [customer_event("ann@example.com"), sub_event("active")]
    app = create_app(settings, engine=engine, run_worker=True, metrics=WebhookMetrics())
    with _serving(app) as url, httpx.Client(base_url=url, timeout=15) as http:
        for event in events:
            body, headers = signed(event)
            assert http.post(WEBHOOK_PATH, content=body, headers=headers).status_code == 200
        applied = _wait(lambda: _statuses(engine, *(e["id"] for e in events)) == ["applied"] * 2)
        public = http.get(WEBHOOK_PATH + "/health").json()
        full = http.get("/admin/api/health", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}).json()
        scraped = http.get("/metrics").text
        diagnosis = Doctor(settings, url=url, engine=engine, apply_timeout=10).run()
    assert applied
    assert next(c for c in public["checks"] if c["name"] == "worker") == {"name": "worker", "status": WARN}
    worker = next(c for c in full["checks"] if c["name"] == "worker")
    assert worker["status"] == WARN
    assert worker["in_process_worker"] is True
    assert worker["in_process_worker_restarts"] == 1
    assert worker["in_process_worker_last_error"] == "RuntimeError: the loop broke (key [redacted])"
    assert "worker thread died 1 time(s)" in worker["detail"]
    assert SECRET_IN_ERROR not in str(full)
    assert restarts_from_metrics(scraped) == 1.0
    said = [f for f in diagnosis.findings if "worker thread died" in f.found]
    assert len(said) == 1
    assert said[0].status == WARN
    assert "worker thread died 1 time(s); last error RuntimeError: the loop broke (key [redacted])" in said[0].found


def test_a_dead_in_process_worker_fails_the_health_check_and_the_doctor_says_so(
    engine: Engine, settings: Settings
) -> None:
    """Between a death and the restart (or for good, if the thread is gone): the worker check fails
    even while other workers' heartbeats are recent, and the doctor names the worker as the cause."""
    from kamiyo.telemetry.heartbeat import Heartbeat

    Heartbeat(engine).beat()  # another worker, alive
    restarts = RestartRecord()
    now = time.time()
    restarts.add(WorkerDeath("OperationalError: database is locked", now - 5, 30.0))
    report = run_checks(engine, settings, now=now, in_process_worker=False, worker_restarts=restarts)
    check = report.check("worker")
    assert check.status == "fail"
    assert "worker thread died 1 time(s); last error OperationalError: database is locked" in check.detail
    finding = diagnose_worker_restarts(check.to_json(), None, now=now)
    assert finding is not None
    assert (finding.status, finding.cause) == (FAIL, "worker_down")

    Heartbeat(engine).beat(now=now + 7200)
    alive = run_checks(engine, settings, now=now + 7200, in_process_worker=True, worker_restarts=restarts)
    assert alive.check("worker").status == OK  # long ago: shown, no longer a warning
    assert alive.check("worker").data["in_process_worker_restarts"] == 1


def test_the_doctor_counts_restarts_from_the_metrics_when_the_health_has_no_detail() -> None:
    page = "# TYPE webhook_worker_restarts_total counter\nwebhook_worker_restarts_total 3.0\n"
    finding = diagnose_worker_restarts({"name": "worker", "status": "ok"}, restarts_from_metrics(page), now=0.0)
    assert finding is not None
    assert finding.status == WARN
    assert "restarted 3 time(s)" in finding.found
    assert diagnose_worker_restarts({"name": "worker", "status": "ok"}, 0.0, now=0.0) is None
