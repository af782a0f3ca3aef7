"""Whether the inbox writer can store a delivery now: what it reports, and the verdict from it.

The writer (``InboxWriter``, in ``kamiyo serve``'s writer process) keeps a ``WriterActivity``
current as it works: whether its thread runs, how long it has been on its current work, how
long that work has found SQLite's write lock held by another process, and the kind of database
fault that failed its last write, if its last write failed. While it has nothing to do, it
writes a probe through the same path every few seconds (``PROBE_SECONDS``), so that a database
that became locked or full is noticed before a delivery finds out. The server reads the
activity from the child with a ping every ``PING_SECONDS``; a writer process that does not
answer within the stall limit is stalled (stopped, or hung).

``judge`` turns that into ``WriterHealth``: ``/health``, the webhook health's ``writer`` check,
the ``webhook_writer_up`` gauge and ``kamiyo doctor`` all read it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from kamiyo.db.errors import FULL, LOCKED

# The writer's states, from the worst: no writer, a writer that does not answer, a database
# that does not let it write, and a writer that stores.
DEAD, STALLED, LOCKED_STATE, FULL_STATE, FAILING, OK = "dead", "stalled", LOCKED, FULL, "failing", "ok"
STATES = (DEAD, STALLED, LOCKED_STATE, FULL_STATE, FAILING, OK)
PING_SECONDS = 0.5  # how often the server asks the writer process how it is
PONG_SECONDS = 1.0  # a writer process that leaves a ping unanswered for longer is stalled
PROBE_SECONDS = 2.0  # an idle writer writes a probe this often
STALL_SECONDS = 2.0  # a write that takes longer than this is a stall


class WriterActivity(NamedTuple):
    """The writer's own account of itself, at one moment (sent from its process on each ping)."""

    alive: bool = True
    busy_for: float = 0.0  # seconds on the current batch or probe; 0 while waiting for work
    lock_wait_for: float = 0.0  # of which, seconds SQLite's write lock was held by another process
    failure: str | None = None  # the fault kind (kamiyo.db.errors) that failed the last write; None after a success
    failure_detail: str = ""  # that error in one line (kamiyo.db.errors.describe)


@dataclass(frozen=True)
class WriterHealth:
    """The verdict: ``state`` (one of ``STATES``) and a sentence for operators."""

    state: str
    detail: str

    @property
    def ok(self) -> bool:
        return self.state == OK


def judge(
    activity: WriterActivity | None,
    *,
    stall_seconds: float = STALL_SECONDS,
    unanswered_for: float | None = None,
    timed_out: int = 0,
) -> WriterHealth:
    """The writer's health. ``activity`` None: no writer runs. ``unanswered_for``: how long the
    writer process has left pings unanswered, once that is longer than it may (None while it
    answers); ``timed_out``: deliveries answered 503 for want of an answer in time since the
    writer last stored one."""
    if activity is None:
        return WriterHealth(DEAD, "the inbox writer process is not running (a new one is starting)")
    if unanswered_for is not None:
        return WriterHealth(
            STALLED, f"the inbox writer process has not answered for {unanswered_for:.0f} s (stopped or hung)"
        )
    if not activity.alive:
        return WriterHealth(DEAD, "the inbox writer thread has stopped")
    if activity.lock_wait_for > stall_seconds:
        return WriterHealth(
            LOCKED_STATE,
            f"the inbox writer has waited {activity.lock_wait_for:.0f} s for the database's write lock, "
            "held by another process",
        )
    if activity.failure == LOCKED:
        return WriterHealth(LOCKED_STATE, f"the database is locked: {activity.failure_detail}")
    if activity.failure == FULL:
        return WriterHealth(FULL_STATE, f"the database is full: {activity.failure_detail}")
    if activity.failure is not None:
        return WriterHealth(FAILING, f"the database refuses writes: {activity.failure_detail}")
    if activity.busy_for > stall_seconds:
        return WriterHealth(STALLED, f"the inbox writer has been on one write for {activity.busy_for:.0f} s")
    if timed_out:
        return WriterHealth(STALLED, f"{timed_out} delivery(ies) got no answer from the inbox writer in time")
    return WriterHealth(OK, "the inbox writer stores deliveries")
