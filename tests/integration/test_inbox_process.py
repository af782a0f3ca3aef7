"""The inbox writer process (what ``kamiyo serve`` runs): every answer is true, and its death loses nothing.

Each test starts a real child process on the fixture's database (SQLite file or PostgreSQL).
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, func, select, text

from kamiyo.config import Settings
from kamiyo.db.engine import make_engine
from kamiyo.db.migrate import upgrade
from kamiyo.db.models import delivery_stats_table, events_table
from kamiyo.telemetry.metrics import WebhookMetrics
from kamiyo.webhooks.inbox_process import InboxProcess, InboxUnavailable
from kamiyo.webhooks.writer_health import DEAD, LOCKED_STATE, OK, STALLED
from support import event_delivery, make_settings, sqlite_write_locked, stored_emails

Scenario = Callable[[InboxProcess], Awaitable[Any]]


async def _store(writer: InboxProcess, event_id: str, *, email: str = "ann@example.com") -> bool:
    envelope, body = event_delivery(event_id, email=email)
    return await writer.store_event(envelope, body, status="pending")


def _run(settings: Settings, scenario: Scenario, **kwargs: Any) -> Any:
    """Start a writer process, run ``scenario`` on it, stop it."""

    async def main() -> Any:
        writer = InboxProcess(settings, **kwargs)
        await writer.start()
        try:
            return await scenario(writer)
        finally:
            await writer.stop()

    return asyncio.run(main())


def test_each_event_is_stored_once_and_answered_new_or_duplicate(settings: Settings, engine: Engine) -> None:
    """300 concurrent stores, each id delivered twice: one answer "new" per id, one row per id."""
    ids = [f"evt_proc_{n:03d}" for n in range(150)]

    async def scenario(writer: InboxProcess) -> list[bool]:
        return list(await asyncio.gather(*(_store(writer, event_id) for event_id in ids + ids)))

    outcomes = _run(settings, scenario)
    by_id: dict[str, list[bool]] = {}
    for event_id, new in zip(ids + ids, outcomes, strict=True):
        by_id.setdefault(event_id, []).append(new)
    assert all(sorted(answers) == [False, True] for answers in by_id.values())
    assert sorted(stored_emails(engine)) == ids


def test_an_event_already_stored_is_answered_duplicate(settings: Settings, engine: Engine) -> None:
    async def scenario(writer: InboxProcess) -> tuple[bool, bool]:
        return await _store(writer, "evt_twice"), await _store(writer, "evt_twice", email="x@example.com")

    assert _run(settings, scenario) == (True, False)
    assert stored_emails(engine) == {"evt_twice": "ann@example.com"}  # the first copy is kept


def test_stop_stores_what_was_sent_and_writes_the_delivery_counts(settings: Settings, engine: Engine) -> None:
    async def scenario(writer: InboxProcess) -> list[asyncio.Task[bool]]:
        tasks = [asyncio.ensure_future(_store(writer, f"evt_stop_{n}")) for n in range(50)]
        writer.count_rejection("invalid_signature")
        await asyncio.sleep(0)  # the stores are sent; stop() follows them on the same socket
        return tasks

    async def main() -> list[bool]:
        writer = InboxProcess(settings)
        await writer.start()
        tasks = await scenario(writer)
        await writer.stop()
        return [task.result() for task in tasks]

    assert asyncio.run(main()) == [True] * 50
    assert len(stored_emails(engine)) == 50
    with engine.connect() as connection:
        counts = dict(
            connection.execute(
                select(delivery_stats_table.c.outcome, func.sum(delivery_stats_table.c.count)).group_by(
                    delivery_stats_table.c.outcome
                )
            ).all()
        )
    assert counts == {"accepted": 50, "rejected": 1}


def test_a_dead_writer_fails_its_waiting_deliveries_and_a_new_one_takes_over(
    settings: Settings, engine: Engine
) -> None:
    """Killed mid-batch (its commit blocked by another writer): the waiting store fails, never
    answers "stored"; a new child starts and stores the retry."""

    async def scenario(writer: InboxProcess) -> tuple[type[BaseException], bool]:
        first = writer.pid
        assert first is not None
        with engine.begin() as blocker:  # holds the write lock: the child's batch waits behind it
            if blocker.dialect.name == "postgresql":
                blocker.execute(text("LOCK TABLE webhook_events IN EXCLUSIVE MODE"))
            waiting = asyncio.ensure_future(_store(writer, "evt_retried"))
            await asyncio.sleep(0.5)
            assert not waiting.done()
            os.kill(first, signal.SIGKILL)
            with pytest.raises(InboxUnavailable) as failed:
                await asyncio.wait_for(waiting, timeout=10)
        deadline = time.monotonic() + 30
        while writer.pid in (None, first) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert writer.pid not in (None, first)
        return failed.type, await _store(writer, "evt_retried")

    assert _run(settings, scenario) == (InboxUnavailable, True)
    assert list(stored_emails(engine)) == ["evt_retried"]


def _statuses(engine: Engine) -> dict[str, str]:
    with engine.connect() as connection:
        return dict(connection.execute(select(events_table.c.stripe_event_id, events_table.c.status)).all())


async def _until_applied(engine: Engine, *event_ids: str, timeout: float = 30.0) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        statuses = _statuses(engine)
        if all(statuses.get(event_id) == "applied" for event_id in event_ids):
            return statuses
        await asyncio.sleep(0.05)
    return _statuses(engine)


def test_the_worker_in_the_child_applies_what_it_stores_and_reports_each_batch(
    settings: Settings, engine: Engine
) -> None:
    """What ``kamiyo serve`` runs by default: stored events are applied in the child, and the
    server's metrics count what was applied.

    The server's side now takes the metrics themselves (``metrics=``) instead of a callback per
    message, so the counts are read from the server's registry rather than from the tallies."""
    metrics = WebhookMetrics()
    ids = [f"evt_applied_{n}" for n in range(20)]

    async def scenario(writer: InboxProcess) -> tuple[bool | None, dict[str, str]]:
        assert all(await asyncio.gather(*(_store(writer, event_id) for event_id in ids)))
        statuses = await _until_applied(engine, *ids)
        # The batch's Processed message follows its commit: give it a moment to arrive.
        await _until(lambda: _sample(metrics, "webhook_events_applied_total", type="customer.updated") == len(ids))
        return writer.worker_alive(), statuses

    alive, statuses = _run(settings, scenario, worker=True, metrics=metrics)
    assert alive is True
    assert statuses == dict.fromkeys(ids, "applied")
    assert _sample(metrics, "webhook_events_applied_total", type="customer.updated") == len(ids)
    assert _sample(metrics, "webhook_event_apply_lag_seconds_count") == len(ids)


def _sample(metrics: WebhookMetrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


def test_without_a_worker_the_child_applies_nothing(settings: Settings, engine: Engine) -> None:
    async def scenario(writer: InboxProcess) -> bool | None:
        assert await _store(writer, "evt_left_pending")
        await asyncio.sleep(0.5)
        return writer.worker_alive()

    assert _run(settings, scenario) is None
    assert _statuses(engine) == {"evt_left_pending": "pending"}


def test_a_dead_child_takes_its_worker_along_and_the_next_child_starts_another(
    settings: Settings, engine: Engine
) -> None:
    async def scenario(writer: InboxProcess) -> list[bool | None]:
        first = writer.pid
        assert first is not None
        seen = [writer.worker_alive()]
        os.kill(first, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while writer.pid == first and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        seen.append(writer.worker_alive())  # between the death and the next start
        deadline = time.monotonic() + 30
        while writer.pid is None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert await _store(writer, "evt_after_restart")
        seen.append(writer.worker_alive())
        assert (await _until_applied(engine, "evt_after_restart"))["evt_after_restart"] == "applied"
        return seen

    assert _run(settings, scenario, worker=True) == [True, False, True]


def test_a_worker_thread_told_to_stop_says_nothing_of_a_death_and_one_whose_loop_fails_says_it_stopped(
    settings: Settings, engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The child's side of ``worker_alive``: a requested stop sends no death and no "stopped"; a
    thread whose restart loop itself fails reports the unexpected end (a worker that dies is
    restarted: tests/integration/test_worker_restarts.py).

    The thread is now ``processing.in_process.relayed_worker`` (it was ``_WorkerThread`` in this
    module) and its messages are typed: the test compares their types."""
    from kamiyo.processing.in_process import relayed_worker
    from kamiyo.processing.restarts import RestartingWorker
    from kamiyo.webhooks.messages import WorkerStarted, WorkerStopped

    sent: list[Any] = []
    stopped = relayed_worker(engine, settings, threading.Event(), sent.append)
    stopped.stop(timeout=10)
    assert [m for m in sent if not isinstance(m, WorkerStarted)] == []

    def broken(_self: RestartingWorker, _stop: threading.Event, _wake: threading.Event | None = None) -> None:
        raise RuntimeError("the restart loop ended")

    monkeypatch.setattr(RestartingWorker, "run", broken)
    sent.clear()
    failed = relayed_worker(engine, settings, threading.Event(), sent.append)
    deadline = time.monotonic() + 10
    while not sent and time.monotonic() < deadline:
        time.sleep(0.01)
    failed.stop(timeout=10)
    assert [type(m) for m in sent] == [WorkerStopped]


# -- a writer process that stalls, dies, is sent SIGTERM, or finds the database locked ----------


async def _until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {condition}"
        await asyncio.sleep(0.02)


@contextmanager
def _stopped(pid: int) -> Iterator[None]:
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


@pytest.mark.timeout(60)
def test_a_stopped_writer_process_gets_each_delivery_answered_within_the_bound_and_health_says_stalled(
    settings: Settings, engine: Engine
) -> None:
    """SIGSTOP: a delivery waiting on it fails within WEBHOOK_STORE_TIMEOUT_SECONDS (never hangs),
    health turns to stalled within seconds and new deliveries then fail at once; after SIGCONT
    it stores again and says so."""
    bounded = replace(settings, webhook_store_timeout=1.0)

    async def scenario(writer: InboxProcess) -> dict[str, Any]:
        pid = writer.pid
        assert pid is not None
        assert writer.health().ok
        seen: dict[str, Any] = {}
        with _stopped(pid):
            started = time.monotonic()
            with pytest.raises(InboxUnavailable, match="no answer"):
                await asyncio.wait_for(_store(writer, "evt_while_stopped"), timeout=10)
            seen["answered_after"] = time.monotonic() - started
            # First from the delivery that timed out, then from the pings it leaves unanswered.
            await _until(lambda: writer.health().state == STALLED, timeout=5)
            await _until(lambda: "has not answered" in writer.health().detail, timeout=5)
            seen["stalled_after"] = time.monotonic() - started
            seen["worker_alive"] = writer.worker_alive()
            started = time.monotonic()
            with pytest.raises(InboxUnavailable):
                await _store(writer, "evt_refused_at_once")
            seen["refused_after"] = time.monotonic() - started
        await _until(lambda: writer.health().ok, timeout=10)
        seen["stored_after_resume"] = await _store(writer, "evt_after_resume")
        return seen

    seen = _run(bounded, scenario, worker=True)
    assert 0.9 < seen["answered_after"] < 2.0
    assert seen["stalled_after"] < 5.0
    assert seen["worker_alive"] is False
    assert seen["refused_after"] < 0.1
    assert seen["stored_after_resume"] is True
    # Sent before the stop and committed after it: Stripe's retry would be answered "duplicate".
    assert sorted(stored_emails(engine)) == ["evt_after_resume", "evt_while_stopped"]


@pytest.mark.timeout(60)
def test_beyond_the_waiting_limit_a_delivery_is_refused_at_once_and_those_waiting_are_stored(
    settings: Settings, engine: Engine
) -> None:
    limited = replace(settings, webhook_store_max_waiting=3)

    async def scenario(writer: InboxProcess) -> tuple[float, list[bool]]:
        pid = writer.pid
        assert pid is not None
        with _stopped(pid):
            waiting = [asyncio.ensure_future(_store(writer, f"evt_waiting_{n}")) for n in range(3)]
            await asyncio.sleep(0.05)
            started = time.monotonic()
            with pytest.raises(InboxUnavailable, match="already wait"):
                await _store(writer, "evt_one_too_many")
            refused_after = time.monotonic() - started
        return refused_after, list(await asyncio.gather(*waiting))

    refused_after, stored = _run(limited, scenario)
    assert refused_after < 0.1
    assert stored == [True, True, True]
    assert sorted(stored_emails(engine)) == [f"evt_waiting_{n}" for n in range(3)]


@pytest.mark.timeout(60)
def test_sigterm_to_the_writer_process_leaves_it_serving_until_the_server_stops_it(
    settings: Settings, engine: Engine
) -> None:
    """systemd stops a service by sending SIGTERM to every process of it at once: the child must
    go on storing the deliveries the server is still letting finish, and stop when told."""
    processes: list[Any] = []

    async def scenario(writer: InboxProcess) -> tuple[list[bool], int | None]:
        pid = writer.pid
        assert pid is not None
        processes.append(writer._process)
        os.kill(pid, signal.SIGTERM)
        await asyncio.sleep(0.5)
        stored = list(await asyncio.gather(*(_store(writer, f"evt_after_sigterm_{n}") for n in range(20))))
        return stored, writer.pid

    stored, pid_after = _run(settings, scenario)
    assert stored == [True] * 20
    assert pid_after == processes[0].pid  # the same child: it neither died nor was replaced
    assert processes[0].returncode == 0  # and it exited when the server said stop
    assert len(stored_emails(engine)) == 20


@pytest.mark.timeout(60)
def test_a_killed_writer_process_shows_as_dead_until_the_next_one_is_ready(settings: Settings, engine: Engine) -> None:
    async def scenario(writer: InboxProcess) -> list[str]:
        first = writer.pid
        assert first is not None
        states = [writer.health().state]
        os.kill(first, signal.SIGKILL)
        await _until(lambda: writer.pid != first)
        states.append(writer.health().state)
        await _until(lambda: writer.pid is not None, timeout=30)
        states.append(writer.health().state)
        return states

    assert _run(settings, scenario) == [OK, DEAD, OK]


@pytest.mark.timeout(60)
def test_with_sqlite_locked_by_another_process_deliveries_fail_within_the_bound_and_health_says_locked(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path / 'kamiyo.db'}"
    settings = make_settings(url, webhook_store_timeout=2.0)
    engine = make_engine(settings)
    upgrade(engine)

    async def scenario(writer: InboxProcess) -> dict[str, Any]:
        seen: dict[str, Any] = {}
        with sqlite_write_locked(tmp_path / "kamiyo.db"):
            started = time.monotonic()
            with pytest.raises(InboxUnavailable):
                await asyncio.wait_for(_store(writer, "evt_while_locked"), timeout=20)
            seen["answered_after"] = time.monotonic() - started
            await _until(lambda: writer.health().state == LOCKED_STATE, timeout=5)
            seen["detail"] = writer.health().detail
        await _until(lambda: writer.health().ok, timeout=10)
        seen["stored_after"] = await _store(writer, "evt_after_unlock")
        return seen

    try:
        seen = _run(settings, scenario)
    finally:
        engine.dispose()
    assert seen["answered_after"] < 2.5
    assert "locked" in seen["detail"]
    assert seen["stored_after"] is True
