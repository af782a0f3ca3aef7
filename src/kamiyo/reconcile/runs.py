"""``reconcile_runs``: one row per sync or backfill, its progress, and how it ended.

A sync records its cursor (the last subscription id whose page is committed) in the same
transaction as that page's changes, so ``--resume`` continues exactly after the last page that
took effect. Status: ``running`` → ``done`` | ``failed`` | ``interrupted``.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, Engine, Row, String, bindparam, func, select, update

from kamiyo.db.models import reconcile_runs_table

_runs = reconcile_runs_table
RUNNING, DONE, FAILED, INTERRUPTED = "running", "done", "failed", "interrupted"


@dataclass(frozen=True)
class Run:
    id: int
    kind: str
    status: str
    dry_run: bool
    scope: str | None
    cursor: str | None
    seen: int
    changed: int
    started_at: datetime
    finished_at: datetime | None
    error: str | None


def start_run(engine: Engine, kind: str, *, dry_run: bool = False, scope: str | None = None) -> Run:
    with engine.begin() as connection:
        run_id = connection.execute(
            _runs.insert()
            .values(kind=kind, status=RUNNING, dry_run=dry_run, scope=scope, started_at=datetime.now(UTC))
            .returning(_runs.c.id)
        ).scalar_one()
    return get_run(engine, int(run_id))


def get_run(engine: Engine, run_id: int) -> Run:
    with engine.connect().execution_options(readonly=True) as connection:
        row = connection.execute(select(_runs).where(_runs.c.id == run_id)).one()
    return _run(row)


_PROGRESS = (
    update(_runs)
    .where(_runs.c.id == bindparam("run_id"))
    .values(
        seen=_runs.c.seen + bindparam("seen"),
        changed=_runs.c.changed + bindparam("changed"),
        cursor=func.coalesce(bindparam("cursor", type_=String), _runs.c.cursor),
    )
)


def record_progress(connection: Connection, run_id: int, *, cursor: str | None, seen: int, changed: int) -> None:
    """Add a page's counts and move the cursor, inside the transaction that applied the page."""
    connection.execute(_PROGRESS, {"run_id": run_id, "seen": seen, "changed": changed, "cursor": cursor})


def finish_run(
    engine: Engine,
    run_id: int,
    status: str,
    *,
    seen: int | None = None,
    changed: int | None = None,
    cursor: str | None = None,
    error: str | None = None,
) -> None:
    values: dict[str, object] = {"status": status, "finished_at": datetime.now(UTC), "error": error}
    if seen is not None:
        values["seen"] = seen
    if changed is not None:
        values["changed"] = changed
    if cursor is not None:
        values["cursor"] = cursor
    with engine.begin() as connection:
        connection.execute(update(_runs).where(_runs.c.id == run_id).values(**values))


def resumable_sync(engine: Engine) -> Run | None:
    """The latest full (unscoped, not dry) sync, if it did not finish."""
    with engine.connect().execution_options(readonly=True) as connection:
        row = connection.execute(
            select(_runs)
            .where(_runs.c.kind == "sync", _runs.c.scope.is_(None), _runs.c.dry_run.is_(False))
            .order_by(_runs.c.id.desc())
            .limit(1)
        ).first()
    run = _run(row) if row is not None else None
    return run if run is not None and run.status != DONE else None


def reopen_run(engine: Engine, run_id: int) -> None:
    with engine.begin() as connection:
        connection.execute(
            update(_runs).where(_runs.c.id == run_id).values(status=RUNNING, finished_at=None, error=None)
        )


def latest_run(engine: Engine, kind: str, *, status: str | None = None) -> Run | None:
    query = select(_runs).where(_runs.c.kind == kind, _runs.c.dry_run.is_(False))
    if status is not None:
        query = query.where(_runs.c.status == status)
    with engine.connect().execution_options(readonly=True) as connection:
        row = connection.execute(query.order_by(_runs.c.id.desc()).limit(1)).first()
    return _run(row) if row is not None else None


def as_utc(moment: datetime) -> datetime:
    """SQLite hands datetimes back without their zone; everything kamiyo stores is UTC."""
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def _run(row: Row[Any]) -> Run:
    mapping = row._mapping
    return Run(
        id=int(mapping["id"]),
        kind=mapping["kind"],
        status=mapping["status"],
        dry_run=bool(mapping["dry_run"]),
        scope=mapping["scope"],
        cursor=mapping["cursor"],
        seen=int(mapping["seen"]),
        changed=int(mapping["changed"]),
        started_at=as_utc(mapping["started_at"]),
        finished_at=as_utc(mapping["finished_at"]) if mapping["finished_at"] is not None else None,
        error=mapping["error"],
    )
