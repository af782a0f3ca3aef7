"""A real ``kamiyo serve`` under faults: its database locked or full, its writer process stopped,
killed, or sent SIGTERM together with the server under load.

In every case each delivery gets an answer within WEBHOOK_STORE_TIMEOUT_SECONDS (503 while the
event cannot be stored, so Stripe retries; never 2xx before the commit), ``/health`` turns to
503 within seconds and back to 200 once the fault is gone, and every acknowledged event is in
the database.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from e2e.harness import WEBHOOK_PATH, KamiyoServer, ServerFactory, wait_until
from kamiyo import synthetic
from support import signed, sqlite_write_locked

pytestmark = pytest.mark.slow

BOUND = 2.0  # WEBHOOK_STORE_TIMEOUT_SECONDS of these servers
FAULTS = Path(__file__).parent / "faults"  # sitecustomize.py: SQLite's max_page_count, from a file


def _bounded(servers: ServerFactory, backend: str = "sqlite", **settings: str) -> KamiyoServer:
    return servers(backend, WEBHOOK_STORE_TIMEOUT_SECONDS=str(BOUND), **settings)


def _event(n: int | str, *, pad: int = 0) -> dict[str, Any]:
    """A ``customer.updated`` event; ``pad`` characters more in its description (a larger row)."""
    customer = synthetic.customer(customer_id=synthetic.new_id("cus"), email=f"f{n}@example.com")
    if pad:
        customer["description"] = "x" * pad
    return synthetic.event("customer.updated", customer)


class Deliveries:
    """Deliveries posted one at a time, each answer and how long it took, and the acknowledged ids."""

    def __init__(self, server: KamiyoServer, *, pad: int = 0) -> None:
        self.server = server
        self.pad = pad
        self.acked: set[str] = set()
        self.statuses: list[int] = []
        self._n = 0

    def post(self, timeout: float = 30.0) -> tuple[int, float]:
        self._n += 1
        event = _event(f"{self._n}.{time.monotonic_ns()}", pad=self.pad)
        body, headers = signed(event)
        started = time.monotonic()
        response = httpx.post(self.server.webhook_url, content=body, headers=headers, timeout=timeout)
        took = time.monotonic() - started
        self.statuses.append(response.status_code)
        if 200 <= response.status_code < 300:
            self.acked.add(event["id"])
        return response.status_code, took

    def all_acked_stored(self) -> None:
        stored = {row[0] for row in self.server.rows("SELECT stripe_event_id FROM webhook_events")}
        missing = self.acked - stored
        assert not missing, f"{len(missing)} acknowledged event(s) not stored"


def _health(server: KamiyoServer) -> tuple[int, dict[str, Any]]:
    response = httpx.get(server.url + "/health", timeout=5)
    return response.status_code, response.json()


def _wait_health(server: KamiyoServer, status: int, writer: str | None = None, timeout: float = 10.0) -> float:
    """Seconds until /health answers ``status`` (and the writer state ``writer``)."""
    started = time.monotonic()

    def there() -> bool:
        code, body = _health(server)
        return code == status and (writer is None or body.get("writer") == writer)

    wait_until(there, timeout=timeout, interval=0.1, what=f"/health {status} writer={writer}")
    return time.monotonic() - started


def _writer_pid(server: KamiyoServer) -> int:
    started = re.findall(r"inbox writer process (\d+) started", server.log())
    assert started, "the server names its inbox writer process"
    return int(started[-1])


def _doctor_verdict(server: KamiyoServer) -> str | None:
    result = server.cli("doctor", "--url", server.url, "--json", timeout=90)
    report = json.loads(result.stdout)
    return (report.get("verdict") or {}).get("cause")


@pytest.mark.timeout(180)
def test_database_locked_deliveries_get_503_within_the_bound_health_fails_and_all_recovers(
    servers: ServerFactory,
) -> None:
    server = _bounded(servers)
    deliveries = Deliveries(server)
    assert deliveries.post()[0] == 200
    with sqlite_write_locked(server.database_url.removeprefix("sqlite:///")):
        answers = [deliveries.post() for _ in range(3)]
        assert [status for status, _ in answers] == [503] * 3
        assert max(took for _, took in answers) < BOUND + 1.5
        assert _wait_health(server, 503, "locked", timeout=5) < 5
        assert _doctor_verdict(server) == "database_locked"
    assert _wait_health(server, 200, "ok") < 10
    assert deliveries.post()[0] == 200
    deliveries.all_acked_stored()


@pytest.mark.timeout(180)
def test_database_full_deliveries_get_503_health_fails_and_all_recovers_once_it_has_room(
    servers: ServerFactory, tmp_path: Path
) -> None:
    limit = tmp_path / "max_pages"
    server = _bounded(servers, start=False, PYTHONPATH=str(FAULTS), KAMIYO_TEST_MAX_PAGES_FILE=str(limit))
    path = server.database_url.removeprefix("sqlite:///")
    with sqlite3.connect(path) as connection:
        connection.execute("VACUUM")  # no free page left for a delivery to reuse
    server.start()
    deliveries = Deliveries(server, pad=6000)  # each row needs pages of its own: a full database refuses it
    assert deliveries.post()[0] == 200
    with sqlite3.connect(path) as connection:
        limit.write_text(str(connection.execute("PRAGMA page_count").fetchone()[0]))
    answers = [deliveries.post() for _ in range(3)]
    assert [status for status, _ in answers] == [503] * 3
    assert max(took for _, took in answers) < BOUND + 1.5
    assert _wait_health(server, 503, "full", timeout=5) < 5
    assert _doctor_verdict(server) == "database_full"
    limit.write_text("")  # space freed
    assert _wait_health(server, 200, "ok") < 10
    assert deliveries.post()[0] == 200
    deliveries.all_acked_stored()


@pytest.mark.timeout(180)
def test_writer_process_stopped_deliveries_get_503_within_the_bound_and_sigcont_recovers(
    servers: ServerFactory,
) -> None:
    server = _bounded(servers)
    deliveries = Deliveries(server)
    assert deliveries.post()[0] == 200
    pid = _writer_pid(server)
    os.kill(pid, signal.SIGSTOP)
    try:
        status, took = deliveries.post()
        assert status == 503
        assert took < BOUND + 1.5
        assert _wait_health(server, 503, "stalled", timeout=5) < 5
        status, took = deliveries.post()  # known stalled: answered at once
        assert status == 503
        assert took < 0.5
        assert _doctor_verdict(server) == "writer_stalled"
    finally:
        os.kill(pid, signal.SIGCONT)
    assert _wait_health(server, 200, "ok") < 10
    assert deliveries.post()[0] == 200
    assert _writer_pid(server) == pid  # the same process took up its work again
    deliveries.all_acked_stored()


@pytest.mark.timeout(180)
def test_writer_process_killed_health_fails_until_a_new_one_runs_and_deliveries_resume(
    servers: ServerFactory,
) -> None:
    server = _bounded(servers)
    deliveries = Deliveries(server)
    assert deliveries.post()[0] == 200
    pid = _writer_pid(server)
    os.kill(pid, signal.SIGKILL)
    seen: list[int] = []

    def restarted() -> bool:
        code, _body = _health(server)
        seen.append(code)
        return code == 200 and _writer_pid(server) != pid

    wait_until(restarted, timeout=30, interval=0.05, what="a new inbox writer process")
    assert 503 in seen, "/health said 200 while no writer process ran"
    assert deliveries.post()[0] == 200
    deliveries.all_acked_stored()


@pytest.mark.timeout(180)
@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_sigterm_to_server_and_writer_together_under_load_finishes_in_flight_deliveries_and_loses_none(
    servers: ServerFactory, backend: str
) -> None:
    """systemd's stop: SIGTERM to every process of the service at once, while deliveries arrive.
    Those in flight finish (200), none is answered 5xx (a refused connection is Stripe's cue to
    retry), every acknowledged event is stored, and both processes exit within the budgets."""
    server = servers(backend)
    assert server.process is not None
    child = _writer_pid(server)
    acked: set[str] = set()
    statuses: list[int] = []
    errors: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()
    deadline = time.monotonic() + 40

    def load(worker: int) -> None:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            n = 0
            while not stop.is_set() and time.monotonic() < deadline:
                n += 1
                event = _event(f"{worker}.{n}")
                body, headers = signed(event)
                try:
                    status = client.post(WEBHOOK_PATH, content=body, headers=headers).status_code
                except httpx.TransportError as exc:
                    with lock:
                        errors.append(exc.__class__.__name__)
                    if server.process is not None and server.process.poll() is not None:
                        return
                    time.sleep(0.01)
                    continue
                with lock:
                    statuses.append(status)
                    if 200 <= status < 300:
                        acked.add(event["id"])

    threads = [threading.Thread(target=load, args=(n,), daemon=True) for n in range(8)]
    for thread in threads:
        thread.start()
    wait_until(lambda: len(acked) >= 200, timeout=30, what="load under way")
    terminated = time.monotonic()
    os.kill(server.process.pid, signal.SIGTERM)
    os.kill(child, signal.SIGTERM)
    code = server.process.wait(timeout=40)
    stopped_after = time.monotonic() - terminated
    stop.set()
    for thread in threads:
        thread.join(timeout=40)

    assert code == -signal.SIGTERM  # uvicorn's graceful exit re-raises the signal it stopped for
    assert stopped_after < 27  # inside docker compose's 30 s stop_grace_period
    wait_until(lambda: not Path(f"/proc/{child}").exists() or _zombie(child), timeout=15, what="the writer to exit")
    assert statuses
    assert not [s for s in statuses if s >= 500], f"5xx while stopping: {sorted(set(statuses))}"
    stored = {row[0] for row in server.rows("SELECT stripe_event_id FROM webhook_events")}
    assert acked <= stored, f"{len(acked - stored)} acknowledged event(s) lost"


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True
