"""The inbox's retention over a large old inbox: how long each step holds its transaction.

N applied events received 100 days ago (payloads of about 1.5 KB) and N/10 recent ones are
stored, then one worker's ``Retention.step`` is called until the run ends, as the worker's loop
calls it between batches. Prints the run's time, the steps' durations (each one transaction,
during which SQLite's write lock is held) and, on SQLite, the file's size before and after.

``.venv/bin/python bench/retention.py --events 100000`` (add ``--postgres URL``, an admin URL such
as ``postgresql://postgres@127.0.0.1:5432/postgres``, for a throwaway PostgreSQL database as well).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import psycopg
from sqlalchemy.engine import make_url

from kamiyo import synthetic
from kamiyo.config import Settings
from kamiyo.db.engine import make_engine
from kamiyo.db.migrate import upgrade
from kamiyo.processing.retention import Retention
from kamiyo.webhooks.envelope import read_envelope
from kamiyo.webhooks.inbox import inbox_row, insert_new_events


def _store(engine: Any, count: int, age_days: float, first: int) -> None:
    received = datetime.fromtimestamp(time.time() - age_days * 86400, UTC)
    rows = []
    for n in range(first, first + count):
        obj = synthetic.customer(customer_id=f"cus_{n}", email=f"r{n}@example.com")
        obj["metadata"] = {"note": "x" * 1200}
        body = orjson.dumps(synthetic.event("customer.updated", obj, event_id=f"evt_retention_{n}"))
        rows.append(inbox_row(read_envelope(body)[0], body, status="applied", received_at=received))
        if len(rows) == 2000:
            with engine.begin() as connection:
                insert_new_events(connection, rows)
            rows = []
    if rows:
        with engine.begin() as connection:
            insert_new_events(connection, rows)


def measure(database_url: str, events: int) -> dict[str, Any]:
    settings = Settings(database_url=database_url, metrics_enabled=False, sqlite_synchronous="NORMAL")
    engine = make_engine(settings)
    upgrade(engine)
    _store(engine, events, 100, 0)
    _store(engine, events // 10, 1, events)
    path = Path(make_url(database_url).database or "") if database_url.startswith("sqlite") else None
    size_before = path.stat().st_size if path else None
    retention = Retention(engine, settings, "bench")
    steps: list[float] = []
    started = time.perf_counter()
    while True:
        step = time.perf_counter()
        if not retention.step():
            break
        steps.append(time.perf_counter() - step)
    took = time.perf_counter() - started
    if path:  # the pages given back leave the file once the WAL is checkpointed
        raw = engine.raw_connection()
        try:
            raw.driver_connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # type: ignore[union-attr]
        finally:
            raw.close()
    engine.dispose()
    steps.sort()
    return {
        "database": make_url(database_url).get_backend_name(),
        "old_events": events,
        "run_seconds": round(took, 2),
        "events_per_second": round(events / took),
        "steps": len(steps),
        "step_p50_ms": round(statistics.median(steps) * 1000, 1),
        "step_p99_ms": round(steps[int(len(steps) * 0.99)] * 1000, 1),
        "step_max_ms": round(steps[-1] * 1000, 1),
        "file_mib_before": round(size_before / 2**20, 1) if size_before else None,
        "file_mib_after": round(path.stat().st_size / 2**20, 1) if path else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--postgres", help="admin URL of a PostgreSQL server for a throwaway database")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        print(orjson.dumps(measure(f"sqlite:///{Path(folder) / 'bench.db'}", args.events)).decode())
    if args.postgres:
        name = f"kamiyo_bench_{uuid.uuid4().hex[:10]}"
        with psycopg.connect(args.postgres, autocommit=True) as admin:
            admin.execute(f'CREATE DATABASE "{name}"')
        try:
            url = make_url(args.postgres).set(drivername="postgresql+psycopg", database=name)
            print(orjson.dumps(measure(url.render_as_string(hide_password=False), args.events)).decode())
        finally:
            with psycopg.connect(args.postgres, autocommit=True) as admin:
                admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


if __name__ == "__main__":
    main()
