"""``kamiyo serve``'s own worker (``WORKER_IN_PROCESS``): a thread that applies events beside the
inbox writer, woken by the writer's commits, restarted when it dies.

It runs in ``kamiyo serve``'s inbox process (``webhooks/inbox_process.py`` starts it with
``relayed_worker``), off the event loop's GIL, sharing the writer's engine: on SQLite the two
queue on the engine's write lock, not in SQLite's busy handler. There everything it reports goes
to the server as a message (``webhooks/messages.py``): its metrics through ``WorkerRelay``, and
whether it runs. Tests that give the app an engine run the same ``WorkerThread`` in the server's
own process, with the server's metrics.

It takes batches of at most ``IN_PROCESS_BATCH`` events: it shares SQLite's one write lock with
the inbox writer, and a smaller batch holds it for less time, so deliveries wait less for their
commit.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import replace

from sqlalchemy import Engine

from kamiyo.config import Settings
from kamiyo.processing.restarts import RestartingWorker, WorkerDeath
from kamiyo.telemetry.metrics import ProcessedTally, WorkerMetrics
from kamiyo.webhooks.messages import Processed, ToServer, WorkerDied, WorkerStarted, WorkerStopped

log = logging.getLogger("kamiyo.inbox")
IN_PROCESS_BATCH = 50


def in_process_settings(settings: Settings) -> Settings:
    """``settings`` with the in-process worker's batch size: at most ``IN_PROCESS_BATCH``."""
    return replace(settings, worker_batch_size=min(settings.worker_batch_size, IN_PROCESS_BATCH))


class WorkerThread:
    """Applies events on a thread of its own until ``stop``: a ``RestartingWorker`` of
    ``Worker``s with the in-process batch size, woken by ``wake``.

    ``metrics`` counts what the workers do (their batches, their deaths); ``on_start`` is called
    as each worker starts, ``on_death`` with each death, ``on_end`` if the thread itself ends
    without being told to stop (its restart loop failed: nothing applies events any more)."""

    def __init__(
        self,
        engine: Engine,
        settings: Settings,
        wake: threading.Event,
        *,
        metrics: WorkerMetrics | None,
        on_start: Callable[[], None] | None = None,
        on_death: Callable[[WorkerDeath], None] | None = None,
        on_end: Callable[[], None] | None = None,
    ) -> None:
        from kamiyo.processing.worker import Worker  # the stripe library and the handlers: only when needed

        batched = in_process_settings(settings)
        self._stop = threading.Event()
        self._wake = wake
        self._on_end = on_end
        self._restarting = RestartingWorker(
            lambda: Worker(engine, batched, metrics=metrics),
            metrics=metrics,
            on_start=on_start,
            on_death=on_death,
        )
        self._thread = threading.Thread(target=self._run, name="kamiyo-worker", daemon=True)
        self._thread.start()

    def alive(self) -> bool:
        """Applying events: the thread runs and is not between a worker's death and its restart."""
        return self._thread.is_alive() and not self._restarting.paused

    def stop(self, timeout: float) -> None:
        """Tell the worker to stop after its batch, and wait for the thread up to ``timeout`` seconds."""
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=timeout)

    def _run(self) -> None:
        try:
            self._restarting.run(self._stop, self._wake)
        except Exception:
            log.exception("in-process worker stopped by an error; events are stored but not applied")
        finally:
            if not self._stop.is_set() and self._on_end is not None:
                self._on_end()


class WorkerRelay:
    """``WorkerMetrics`` of a worker in the inbox process: each call becomes a message to the
    server (``send``), which counts it in the metrics that ``GET /metrics`` reads. A death is
    sent whether metrics are on or off: the server also keeps it for its health check."""

    def __init__(self, send: Callable[[ToServer], None]) -> None:
        self._send = send

    def events_processed(self, outcomes: Iterable[tuple[str, str, int, float]], committed_at: float) -> None:
        """A committed batch, summed here into a ``ProcessedTally``: a few numbers whatever its size."""
        self._send(Processed(ProcessedTally.of(outcomes, committed_at)))

    def worker_restarted(self, death: WorkerDeath) -> None:
        self._send(WorkerDied(death))


def relayed_worker(
    engine: Engine, settings: Settings, wake: threading.Event, send: Callable[[ToServer], None]
) -> WorkerThread:
    """The worker of the inbox process: its metrics, its deaths and whether it runs go to the server."""
    return WorkerThread(
        engine,
        settings,
        wake,
        metrics=WorkerRelay(send),
        on_start=lambda: send(WorkerStarted()),
        on_end=lambda: send(WorkerStopped()),
    )
