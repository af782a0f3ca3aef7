"""The writer's health from its own account (writer_health.judge), and the kind of a database fault."""

from __future__ import annotations

import sqlite3
from typing import Any

import pytest
from sqlalchemy.exc import OperationalError

from kamiyo.db.errors import FULL, LOCKED, UNAVAILABLE, fault_kind
from kamiyo.webhooks.writer_health import (
    DEAD,
    FAILING,
    FULL_STATE,
    LOCKED_STATE,
    OK,
    STALLED,
    WriterActivity,
    judge,
)


def test_a_writer_that_waits_for_work_and_wrote_last_time_is_ok() -> None:
    assert judge(WriterActivity()).state == OK
    assert judge(WriterActivity(busy_for=1.5, lock_wait_for=1.0)).ok  # a slow moment, not a stall


@pytest.mark.parametrize(
    ("activity", "kwargs", "state"),
    [
        (None, {}, DEAD),
        (WriterActivity(alive=False), {}, DEAD),
        (WriterActivity(), {"unanswered_for": 2.5}, STALLED),
        (WriterActivity(busy_for=3.0), {}, STALLED),
        (WriterActivity(), {"timed_out": 2}, STALLED),
        (WriterActivity(busy_for=3.0, lock_wait_for=2.5), {}, LOCKED_STATE),
        (WriterActivity(failure=LOCKED, failure_detail="database is locked"), {}, LOCKED_STATE),
        (WriterActivity(failure=FULL, failure_detail="database or disk is full"), {}, FULL_STATE),
        (WriterActivity(failure=UNAVAILABLE, failure_detail="server closed the connection"), {}, FAILING),
    ],
)
def test_each_way_of_not_storing_has_its_state(activity: WriterActivity | None, kwargs: Any, state: str) -> None:
    health = judge(activity, **kwargs)
    assert health.state == state
    assert not health.ok
    assert health.detail


def test_a_process_that_does_not_answer_is_stalled_whatever_it_last_said() -> None:
    """Its last account may be a good one: a stopped process says nothing new."""
    assert judge(WriterActivity(failure=FULL), unanswered_for=5.0).state == STALLED


def test_the_stall_limit_is_the_callers() -> None:
    assert judge(WriterActivity(busy_for=1.5), stall_seconds=1.0).state == STALLED


def _sqlite_error(code: int, message: str) -> OperationalError:
    error = sqlite3.OperationalError(message)
    error.sqlite_errorcode = code
    return OperationalError("INSERT ...", None, error)


class _PgError(Exception):
    def __init__(self, sqlstate: str) -> None:
        super().__init__("error")
        self.sqlstate = sqlstate


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        (_sqlite_error(5, "database is locked"), LOCKED),
        (_sqlite_error(6, "database table is locked"), LOCKED),
        (_sqlite_error(13, "database or disk is full"), FULL),
        (_sqlite_error(10, "disk I/O error"), UNAVAILABLE),
        (OperationalError("INSERT ...", None, _PgError("55P03")), LOCKED),
        (OperationalError("INSERT ...", None, _PgError("53100")), FULL),
        (OperationalError("INSERT ...", None, _PgError("08006")), UNAVAILABLE),
    ],
)
def test_a_database_fault_is_named_by_what_an_operator_does_about_it(error: Exception, kind: str) -> None:
    assert fault_kind(error) == kind
