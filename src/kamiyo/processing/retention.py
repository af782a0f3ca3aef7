"""The inbox's retention, run by the workers: one of them at a time, a short transaction per step.

Every ``INTERVAL_SECONDS`` one worker takes the ``inbox_retention`` task (its row in
``maintenance_tasks``: ``holder`` until ``lease_until``, renewed while it runs; a worker that dies
loses it after ``LEASE_SECONDS``) and, one transaction per call of ``step`` between its batches
of events (operations/prune.py): deletes the applied and ignored events received more than
``INBOX_RETENTION_DAYS`` ago, the delivery stats past 35 days, and on SQLite gives the freed pages
back to the file system. How the run went is recorded on the task's row, which the health check
and the metrics read (``retention_status``), so every process reports the same. A failure is
recorded there and the run is tried again after ``RETRY_SECONDS``; it never stops the worker.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine, select, update
from sqlalchemy.dialects import postgresql, sqlite

from kamiyo.config import Settings
from kamiyo.db.errors import describe
from kamiyo.db.models import maintenance_tasks_table
from kamiyo.operations.prune import (
    PruneScope,
    boundary,
    prune_batch,
    reclaim_space,
    retention_scope,
)
from kamiyo.telemetry.delivery_stats import prune_delivery_stats_batch

log = logging.getLogger("kamiyo.prune")
_tasks = maintenance_tasks_table
TASK = "inbox_retention"
INTERVAL_SECONDS = 3600.0
RETRY_SECONDS = 300.0
LEASE_SECONDS = 120.0


@dataclass(frozen=True)
class RetentionStatus:
    """How the retention last went (Unix seconds), whichever worker ran it."""

    last_success_at: float | None
    last_failure_at: float | None
    consecutive_failures: int
    last_error: str | None
    last_pruned: int
    running: bool


def retention_status(engine: Engine, *, now: float | None = None) -> RetentionStatus | None:
    """The task's row, or None before any worker has looked at it."""
    now = time.time() if now is None else now
    with engine.connect().execution_options(readonly=True) as connection:
        row = connection.execute(select(_tasks).where(_tasks.c.name == TASK)).first()
    if row is None:
        return None
    return RetentionStatus(
        last_success_at=row.last_success_at,
        last_failure_at=row.last_failure_at,
        consecutive_failures=int(row.consecutive_failures),
        last_error=row.last_error,
        last_pruned=int(row.last_pruned),
        running=row.holder is not None and row.lease_until > now,
    )


@dataclass
class _Pass:
    scope: PruneScope
    boundary: int
    phase: str = "events"  # events -> stats -> space -> done
    after: int | None = 0
    events: int = 0
    stats: int = 0
    pages: int = 0


class Retention:
    """One worker's side of the task: ``step`` between batches, as often as the worker likes."""

    def __init__(
        self,
        engine: Engine,
        settings: Settings,
        owner: str,
        *,
        interval: float = INTERVAL_SECONDS,
        retry: float = RETRY_SECONDS,
        lease: float = LEASE_SECONDS,
    ) -> None:
        self.engine = engine
        self.retention_days = settings.inbox_retention_days
        self.owner = owner[:128]
        self.interval = interval
        self.retry = retry
        self.lease = lease
        self._due = 0.0  # when to look at the task again (Unix seconds)
        self._lease_until = 0.0
        self._run: _Pass | None = None

    def step(self, now: float | None = None) -> bool:
        """Do the next short piece of the run (taking the task first when it is due); True when
        something was done. Never raises: a failure is logged and recorded on the task's row."""
        now = time.time() if now is None else now
        if self._run is None and (now < self._due or not self._take(now)):
            return False
        try:
            if now > self._lease_until - self.lease / 2 and not self._renew(now):
                log.warning("inbox retention: another worker took the task over; this one stops")
                self._run, self._due = None, now + self.retry
                return False
            if self._advance(now):
                self._finish(now)
        except Exception as exc:  # noqa: BLE001 - recorded and retried later: it must never stop the worker
            self._fail(exc, now)
            return False
        return True

    # -- the task's row ---------------------------------------------------------------------

    def _take(self, now: float) -> bool:
        """Take the task if it is due and nobody holds it; start a run."""
        try:
            with self.engine.begin() as connection:
                dialect: Any = postgresql if connection.dialect.name == "postgresql" else sqlite
                connection.execute(dialect.insert(_tasks).values(name=TASK).on_conflict_do_nothing())
                query = select(_tasks).where(_tasks.c.name == TASK)
                if connection.dialect.name == "postgresql":
                    query = query.with_for_update()
                task = connection.execute(query).one()
                wait = [task.lease_until if task.holder not in (None, self.owner) else 0.0]
                if task.last_success_at is not None:
                    wait.append(task.last_success_at + self.interval)
                if task.last_failure_at is not None and (task.last_success_at or 0.0) < task.last_failure_at:
                    wait.append(task.last_failure_at + self.retry)
                if max(wait) > now:
                    self._due = max(wait)
                    return False
                connection.execute(
                    update(_tasks).where(_tasks.c.name == TASK).values(holder=self.owner, lease_until=now + self.lease)
                )
            self._lease_until = now + self.lease
            scope = retention_scope(self.retention_days, now=now)
            self._run = _Pass(scope, boundary(self.engine, scope.before))
        except Exception as exc:  # noqa: BLE001 - as in step
            self._fail(exc, now)
            return False
        log.info("inbox retention started: %s", self._run.scope.label())
        return True

    def _renew(self, now: float) -> bool:
        with self.engine.begin() as connection:
            renewed = connection.execute(
                update(_tasks)
                .where(_tasks.c.name == TASK, _tasks.c.holder == self.owner)
                .values(lease_until=now + self.lease)
            ).rowcount
        self._lease_until = now + self.lease
        return bool(renewed)

    def _finish(self, now: float) -> None:
        run, self._run = self._run, None
        assert run is not None
        with self.engine.begin() as connection:
            connection.execute(
                update(_tasks)
                .where(_tasks.c.name == TASK)
                .values(
                    holder=None,
                    lease_until=0.0,
                    last_success_at=now,
                    consecutive_failures=0,
                    last_error=None,
                    last_pruned=run.events,
                )
            )
        self._due = now + self.interval
        log.info(
            "inbox retention done: %d event(s) pruned (%s), %d delivery stat row(s), %d free page(s) given back",
            run.events,
            run.scope.label(),
            run.stats,
            run.pages,
        )

    def _fail(self, exc: BaseException, now: float) -> None:
        self._run, self._due = None, now + self.retry
        error = describe(exc)
        log.error("inbox retention failed, retry in %.0f s: %s", self.retry, error)
        try:
            with self.engine.begin() as connection:
                connection.execute(
                    update(_tasks)
                    .where(_tasks.c.name == TASK)
                    .values(
                        holder=None,
                        lease_until=0.0,
                        last_failure_at=now,
                        consecutive_failures=_tasks.c.consecutive_failures + 1,
                        last_error=error,
                    )
                )
        except Exception as again:  # noqa: BLE001 - the database is likely what failed; the log says it
            log.warning("inbox retention failure not recorded: %s", describe(again))

    # -- the run ----------------------------------------------------------------------------

    def _advance(self, now: float) -> bool:
        """One transaction of the run; True once there is nothing left to do."""
        run = self._run
        assert run is not None
        if run.phase == "events":
            counts, run.after = prune_batch(self.engine, run.scope, run.boundary, after=run.after or 0)
            run.events += sum(counts.values())
            if run.after is None:
                run.phase = "stats"
            return False
        if run.phase == "stats":
            deleted = prune_delivery_stats_batch(self.engine, now=now)
            run.stats += deleted
            if not deleted:
                run.phase = "space"
            return False
        given = reclaim_space(self.engine)
        run.pages += given
        return given == 0
