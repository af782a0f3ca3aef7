"""A worker's metrics are one call wherever it runs: counted in the process, or relayed from the
inbox process to the server (processing/in_process.py ``WorkerRelay``), with the same result."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from kamiyo.processing.in_process import WorkerRelay
from kamiyo.processing.restarts import RestartingWorker, WorkerDeath
from kamiyo.telemetry.metrics import WebhookMetrics, WorkerMetrics
from kamiyo.webhooks.inbox_process import InboxProcess
from kamiyo.webhooks.messages import Frames, Processed, WorkerDied, frame
from support import make_settings

NOW = time.time()
BATCHES = [
    [("applied", "customer.subscription.updated", int(NOW) - 2, 0.004), ("ignored", "charge.refunded", int(NOW), 0.0)],
    [("pending", "invoice.paid", int(NOW) - 40, 0.02), ("failed", "invoice.paid", int(NOW) - 90, 0.03)],
    [("applied", "customer.created", int(NOW) - 7200, 0.0004)] * 3,
]
DEATH = WorkerDeath("RuntimeError: the loop broke", NOW, 2.0)
pytestmark = pytest.mark.timeout(30)


def _report(metrics: WorkerMetrics) -> None:
    """What a worker and its restarts report: three batches and a death."""
    for number, batch in enumerate(BATCHES):
        metrics.events_processed(iter(batch), NOW + number)
    metrics.worker_restarted(DEATH)


def _samples(metrics: WebhookMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in metrics.registry.collect()
        for sample in family.samples
    }


def test_relayed_through_the_framing_the_server_counts_what_the_worker_would_have_counted_itself() -> None:
    counted_here = WebhookMetrics()
    _report(counted_here)

    sent: list[Any] = []
    _report(WorkerRelay(sent.append))
    server_metrics = WebhookMetrics()
    server = InboxProcess(make_settings("sqlite:///unused.db"), worker=True, metrics=server_metrics)
    for messages in Frames().feed(frame(sent)):
        for message in messages:
            server._received(message)

    assert [type(message) for message in sent] == [Processed, Processed, Processed, WorkerDied]
    assert _samples(server_metrics) == _samples(counted_here)
    assert _samples(counted_here)[("webhook_worker_restarts_total", ())] == 1.0
    assert _samples(counted_here)[("webhook_events_applied_total", (("type", "customer.created"),))] == 3.0
    assert server.worker_restarts.count == 1
    assert server.worker_restarts.last == DEATH


def test_a_restarting_worker_counts_each_death_through_its_metrics_then_tells_on_death() -> None:
    """The death is counted where it happens, by the metrics it was given, whatever they are."""
    calls: list[tuple[str, WorkerDeath]] = []
    stop = threading.Event()

    class Recorder:
        def events_processed(self, outcomes: Any, committed_at: float) -> None:
            raise AssertionError("no batch was committed")

        def worker_restarted(self, death: WorkerDeath) -> None:
            calls.append(("metrics", death))

    def told(death: WorkerDeath) -> None:
        calls.append(("on_death", death))
        stop.set()

    class Broken:
        def run(self, _stop: threading.Event, _wake: threading.Event | None = None) -> None:
            raise RuntimeError("dies at once")

    restarting = RestartingWorker(Broken, metrics=Recorder(), on_death=told, pause=0.01)  # type: ignore[arg-type]
    restarting.run(stop)
    assert [who for who, _death in calls] == ["metrics", "on_death"]
    assert calls[0][1] is calls[1][1]
    assert calls[0][1].error == "RuntimeError: dies at once"
