"""A worker that ends by an error is started again: ``RestartingWorker``.

``Worker.run`` never lets a failed batch end it, but a bug elsewhere in its loop could; without
a restart the events would go on being stored and never applied. ``RestartingWorker`` runs a
fresh ``Worker`` each time, after a pause that doubles with each death in a row (from
``RESTART_PAUSE`` up to ``MAX_RESTART_PAUSE``, with jitter), so a worker that dies at once
does not spin; a worker that ran ``HEALTHY_SECONDS`` before dying starts the doubling over.

Each death is logged (the error as ``kamiyo.db.errors.describe`` tells it, without SQL or its
parameters, and the stack without the exception's text) and reported as a ``WorkerDeath`` to the
worker's metrics (``worker_restarted``: ``webhook_worker_restarts_total``) and to ``on_death``.
``kamiyo serve`` keeps the count and the last death in a ``RestartRecord`` for the webhook
health's worker check and ``kamiyo doctor``. In its inbox process the metrics are a relay
(``processing/in_process.py``): the death reaches the server in a ``WorkerDied`` message, and
the server counts it and records it.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

from kamiyo.db.errors import describe

if TYPE_CHECKING:
    from kamiyo.processing.worker import Worker
    from kamiyo.telemetry.metrics import WorkerMetrics

log = logging.getLogger("kamiyo.worker")
RESTART_PAUSE = 1.0
MAX_RESTART_PAUSE = 60.0
HEALTHY_SECONDS = 300.0  # a worker that ran this long before dying starts the pauses over


class WorkerDied(Exception):
    """Stands in for the error a worker died of, in the log: its text as ``describe`` tells it."""


class WorkerDeath(NamedTuple):
    """A worker that ended by an error, and when the next one starts."""

    error: str  # one line: class and message, no SQL, no parameters, credentials scrubbed
    died_at: float  # Unix seconds
    restart_in: float  # seconds until the next worker starts


class RestartRecord:
    """How many times ``kamiyo serve``'s in-process worker died, and the last death: what the
    health check and the doctor show. Written by one thread, read by any."""

    def __init__(self) -> None:
        self._state: tuple[int, WorkerDeath | None] = (0, None)

    def add(self, death: WorkerDeath) -> None:
        count, _last = self._state
        self._state = (count + 1, death)  # one assignment: a reader sees the count and its death

    @property
    def count(self) -> int:
        return self._state[0]

    @property
    def last(self) -> WorkerDeath | None:
        return self._state[1]

    def snapshot(self) -> tuple[int, WorkerDeath | None]:
        return self._state


class RestartingWorker:
    """Runs a worker made by ``make_worker`` until ``stop`` is set, making a new one whenever
    the last ended by an error. Each ``WorkerDeath`` is counted by ``metrics.worker_restarted``,
    then given to ``on_death``; ``on_start`` is called as each worker starts. None may raise."""

    def __init__(
        self,
        make_worker: Callable[[], Worker],
        *,
        metrics: WorkerMetrics | None = None,
        on_start: Callable[[], None] | None = None,
        on_death: Callable[[WorkerDeath], None] | None = None,
        pause: float = RESTART_PAUSE,
        max_pause: float = MAX_RESTART_PAUSE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._make_worker = make_worker
        self._metrics = metrics
        self._on_start = on_start
        self._on_death = on_death
        self._pause = pause
        self._max_pause = max_pause
        self._clock = clock
        self.paused = False  # a worker died and the next one has not started yet
        self.deaths = 0

    def run(self, stop: threading.Event, wake: threading.Event | None = None) -> None:
        """Apply events until ``stop`` is set, whatever the workers die of."""
        wake = wake or threading.Event()
        in_a_row = 0
        while not stop.is_set():
            started = self._clock()
            try:
                worker = self._make_worker()
                self.paused = False
                if self._on_start is not None:
                    self._on_start()
                worker.run(stop, wake)
                return  # told to stop
            except Exception as exc:  # whatever ended it, events must go on being applied
                self.paused = True
                self.deaths += 1
                in_a_row = 1 if self._clock() - started >= HEALTHY_SECONDS else in_a_row + 1
                pause = min(self._pause * 2 ** min(in_a_row - 1, 32), self._max_pause) * random.uniform(0.5, 1.0)
                death = WorkerDeath(describe(exc), time.time(), pause)
                # The traceback with the error as ``describe`` tells it: the exception's own text
                # (and the driver's error it was raised from) may quote a statement's values.
                told = WorkerDied(death.error)
                log.error(
                    "worker thread died (%d time(s) in this process): %s; restarting it in %.1f s",
                    self.deaths,
                    death.error,
                    pause,
                    exc_info=(WorkerDied, told, exc.__traceback__),
                )
                if self._metrics is not None:
                    self._metrics.worker_restarted(death)
                if self._on_death is not None:
                    self._on_death(death)
                if stop.wait(pause):
                    return
