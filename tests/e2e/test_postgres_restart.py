"""PostgreSQL restarted under load: a real ``kamiyo serve`` (its worker applying) on a private
PostgreSQL cluster, signed deliveries from Python, ``pg_ctlcluster ... restart`` in the middle.

The shared server on 127.0.0.1:5432 is never touched: the test makes a cluster of its own (as
root, as CI runs: ``pg_createcluster``), on a free port, and drops it afterwards whatever
happens. Without the Debian cluster tools it fails under ``CI=true`` and skips elsewhere.

What must hold: every delivery is answered, 200 or 503 (never 500, never a hang), 200 again
soon after the restart, every acknowledged event is stored and applied, none is parked because
of the restart, and the server is still running.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import psycopg
import pytest

from e2e.harness import KamiyoServer, free_port, wait_until
from kamiyo import synthetic
from support import in_ci, signed

pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.timeout(300)]

CLIENTS = 4  # concurrent senders
PACE = 0.02  # each sender's pause between deliveries: at most CLIENTS / PACE deliveries a second
MAX_DELIVERIES = 4000  # the load is bounded in count...
MAX_LOAD_SECONDS = 60.0  # ...and in time
LOAD_BEFORE_RESTART = 2.0  # seconds of load before the restart begins
LOAD_AFTER_RESTART = 3.0  # and after it has returned
ANSWER_BOUND = 20.0  # no delivery may wait longer than this for its answer
BACK_TO_200 = 15.0  # after the restart returned, deliveries are acknowledged again within this


@dataclass(frozen=True)
class Cluster:
    version: str
    name: str
    port: int

    @property
    def admin_url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def ctl(self, action: str) -> None:
        _run(["pg_ctlcluster", "--skip-systemctl-redirect", self.version, self.name, action])


def _run(command: list[str]) -> None:
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout}\n{result.stderr}"


def _require_cluster_tools() -> str:
    """The installed PostgreSQL version (the one directory of /etc/postgresql)."""
    missing = [tool for tool in ("pg_createcluster", "pg_ctlcluster", "pg_dropcluster") if shutil.which(tool) is None]
    versions = sorted(os.listdir("/etc/postgresql")) if os.path.isdir("/etc/postgresql") else []
    problem = ""
    if missing:
        problem = f"{', '.join(missing)} not installed (Debian package postgresql-common)"
    elif len(versions) != 1:
        problem = f"expected one PostgreSQL version in /etc/postgresql, found {versions}"
    elif os.geteuid() != 0:
        problem = "pg_createcluster needs root (CI runs as root)"
    if problem:
        if in_ci():
            pytest.fail(problem)
        pytest.skip(problem)
    return versions[0]


@pytest.fixture
def private_cluster() -> Iterator[Cluster]:
    version = _require_cluster_tools()
    cluster = Cluster(version, f"kamiyo_fault_{uuid.uuid4().hex[:10]}", free_port())
    try:
        _run(["pg_createcluster", version, cluster.name, "-p", str(cluster.port), "--", "--auth=trust"])
        cluster.ctl("start")
        wait_until(lambda: _accepts(cluster), timeout=30, what="the private cluster to accept connections")
        with psycopg.connect(cluster.admin_url, autocommit=True) as admin:
            admin.execute("CREATE DATABASE kamiyo")
        yield cluster
    finally:
        subprocess.run(
            ["pg_dropcluster", "--stop", version, cluster.name], capture_output=True, timeout=120, check=False
        )


def _accepts(cluster: Cluster) -> bool:
    try:
        with psycopg.connect(cluster.admin_url, connect_timeout=2):
            return True
    except psycopg.OperationalError:
        return False


@dataclass(frozen=True)
class Answer:
    event_id: str
    status: int | None  # None: no answer at all (a transport error or a timeout)
    sent_at: float
    seconds: float


def _deliveries(server: KamiyoServer, stop: threading.Event) -> list[Answer]:
    """Signed ``customer.created`` events, each new, from ``CLIENTS`` threads until ``stop``."""
    answers: list[Answer] = []
    lock = threading.Lock()
    counter = iter(range(MAX_DELIVERIES))
    deadline = time.monotonic() + MAX_LOAD_SECONDS

    def client() -> None:
        with httpx.Client(base_url=server.url, timeout=ANSWER_BOUND + 5) as http:
            while not stop.is_set() and time.monotonic() < deadline:
                with lock:
                    n = next(counter, None)
                if n is None:
                    return
                customer = synthetic.customer(customer_id=f"cus_fault_{n:05d}", email=f"fault{n}@example.com")
                event = synthetic.event("customer.created", customer)
                body, headers = signed(event)
                started = time.monotonic()
                try:
                    status: int | None = http.post(
                        "/api/v1/payments/webhook", content=body, headers=headers
                    ).status_code
                except httpx.TransportError:
                    status = None
                with lock:
                    answers.append(Answer(event["id"], status, started, time.monotonic() - started))
                stop.wait(PACE)

    with ThreadPoolExecutor(CLIENTS) as pool:
        for future in [pool.submit(client) for _ in range(CLIENTS)]:
            future.result()
    return answers


def test_postgresql_restarted_mid_load_loses_no_acknowledged_event(private_cluster: Cluster, tmp_path: Path) -> None:
    url = f"postgresql+psycopg://postgres@127.0.0.1:{private_cluster.port}/kamiyo"
    server = KamiyoServer(tmp_path / "server", url, WORKER_MAX_ATTEMPTS="3")
    try:
        server.upgrade()
        server.start()
        stop = threading.Event()
        answers: list[Answer] = []
        load = threading.Thread(target=lambda: answers.extend(_deliveries(server, stop)), daemon=True)
        load.start()
        time.sleep(LOAD_BEFORE_RESTART)
        restart_began = time.monotonic()
        private_cluster.ctl("restart")
        restart_ended = time.monotonic()
        time.sleep(LOAD_AFTER_RESTART)
        stop.set()
        load.join(timeout=ANSWER_BOUND + 30)
        assert not load.is_alive(), "the load did not end: a delivery hung"

        assert server.process is not None
        assert server.process.poll() is None, server.log()[-3000:]
        statuses = {a.status for a in answers}
        assert statuses <= {200, 503}, f"answers other than 200 and 503: {statuses}\n{server.log()[-3000:]}"
        assert max(a.seconds for a in answers) < ANSWER_BOUND
        refused = [a for a in answers if a.status == 503]
        assert refused, "no delivery was refused: the restart did not happen under load"
        assert any(a.status == 200 and a.sent_at < restart_began for a in answers)
        back = [a.sent_at for a in answers if a.status == 200 and a.sent_at > restart_ended]
        assert back, f"no delivery acknowledged after the restart\n{server.log()[-3000:]}"
        assert min(back) - restart_ended < BACK_TO_200
        # Everything after the first acknowledgement since the restart is acknowledged too.
        assert all(a.status == 200 for a in answers if a.sent_at > min(back) + 1.0)

        acknowledged = {a.event_id for a in answers if a.status == 200}

        def applied() -> bool:
            rows = server.rows("SELECT stripe_event_id, status FROM webhook_events")
            stored = dict(rows)
            return acknowledged <= set(stored) and all(stored[e] == "applied" for e in acknowledged)

        wait_until(applied, timeout=60, what="every acknowledged event to be applied")
        parked = server.rows("SELECT stripe_event_id, last_error FROM webhook_events WHERE status <> 'applied'")
        assert parked == [], parked  # none parked, none left pending (a 503'd one that was stored is applied too)
        retried = server.rows("SELECT count(*) FROM webhook_events WHERE attempts <> 1")[0][0]
        assert retried == 0  # the restart was never counted as an event's attempt
        users = server.rows("SELECT count(*) FROM users WHERE email LIKE 'fault%@example.com'")[0][0]
        assert users >= len(acknowledged)
        assert httpx.get(server.url + "/health", timeout=5).status_code == 200
        assert server.process.poll() is None
        assert not server.log_lines("parked"), server.log_lines("parked")[:5]
        assert not server.log_lines("worker thread died")
        faults = len(server.log_lines("worker batch failed (database fault)"))
        print(
            f"worker batches failed on the fault: {faults}; "
            f"deliveries {len(answers)}: acknowledged {len(acknowledged)}, refused (503) {len(refused)}; "
            f"restart took {restart_ended - restart_began:.1f} s; first 200 after it "
            f"{min(back) - restart_ended:.2f} s; slowest answer {max(a.seconds for a in answers):.2f} s"
        )
    finally:
        server.close()


def test_without_the_cluster_tools_the_fault_test_fails_in_ci_and_skips_elsewhere(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(shutil, "which", lambda _tool: None)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="pg_createcluster"):
        _require_cluster_tools()
    monkeypatch.setenv("CI", "")
    with pytest.raises(pytest.skip.Exception, match="pg_createcluster"):
        _require_cluster_tools()
