"""GET /health means "this process can store a delivery": the inbox writer's state, not the worker's.

Here the writer is a thread of the app's own process (an engine given by the test); kamiyo
serve's writer process is covered by test_inbox_process.py and tests/e2e/test_faults.py.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

from appclient import AppClient
from kamiyo.db.engine import make_engine
from kamiyo.db.migrate import upgrade
from kamiyo.telemetry.metrics import WebhookMetrics
from kamiyo.web.app import WEBHOOK_PATH, create_app
from support import make_settings, sqlite_write_locked


def _eventually(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {condition}"
        time.sleep(0.05)


def _writer_up(http: AppClient) -> float:
    for line in http.get("/metrics").text.splitlines():
        if line.startswith("webhook_writer_up "):
            return float(line.split()[1])
    raise AssertionError("webhook_writer_up not exported")


@pytest.mark.timeout(60)
def test_health_fails_while_the_database_is_locked_and_says_so_and_recovers(tmp_path: Path) -> None:
    """No delivery needed: the writer's own probe finds the lock; /health, the webhook health's
    writer check and webhook_writer_up all say so within seconds, and all turn back after."""
    settings = make_settings(f"sqlite:///{tmp_path / 'kamiyo.db'}", webhook_store_timeout=1.0)
    engine = make_engine(settings)
    upgrade(engine)
    app = create_app(settings, engine=engine, run_worker=False, metrics=WebhookMetrics())
    try:
        with AppClient(app) as http:
            healthy = http.get("/health")
            assert (healthy.status_code, healthy.json()) == (200, {"status": "ok", "database": "ok", "writer": "ok"})
            assert _writer_up(http) == 1.0
            with sqlite_write_locked(tmp_path / "kamiyo.db"):
                _eventually(lambda: http.get("/health").status_code == 503)
                assert http.get("/health").json()["writer"] == "locked"
                checks = {c["name"]: c for c in http.get(WEBHOOK_PATH + "/health").json()["checks"]}
                assert checks["writer"]["status"] == "fail"  # the public report: name and state only
                assert _writer_up(http) == 0.0
            _eventually(lambda: http.get("/health").status_code == 200)
            assert _writer_up(http) == 1.0
    finally:
        engine.dispose()
