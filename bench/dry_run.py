"""A replay dry run over thousands of events, and what it costs the deliveries stored meanwhile.

N/2 customers, each with a ``customer.created`` (its email: a user is created) and a
``customer.subscription.created``, are stored and then replayed with ``--dry-run``, in a thread,
while this process stores one delivery after another (each an inbox insert and commit, as the
inbox writer does) and, every other time, sets a manual override on a user the dry run changes
(the row a worker or an operator would write). It prints how long the dry run took, how many
writes went through meanwhile, and their latency.

``.venv/bin/python bench/dry_run.py --events 5000`` (add ``--postgres URL``, an admin URL such as
``postgresql://postgres@127.0.0.1:5432/postgres``, for a throwaway PostgreSQL database as well).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
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
from kamiyo.domain.tiers import parse_price_tiers
from kamiyo.operations.overrides import set_override
from kamiyo.operations.replay import replay_events
from kamiyo.webhooks.envelope import read_envelope
from kamiyo.webhooks.inbox import inbox_row, insert_new_events

PRO = synthetic.price("price_pro_monthly")


def _store(engine: Any, events: list[dict[str, Any]]) -> None:
    rows = []
    for event in events:
        body = orjson.dumps(event)
        rows.append(inbox_row(read_envelope(body)[0], body, status="pending"))
    with engine.begin() as connection:
        insert_new_events(connection, rows)


def measure(database_url: str, events: int) -> dict[str, Any]:
    settings = Settings(
        database_url=database_url,
        price_tiers=parse_price_tiers("price_pro_monthly=pro,price_basic=basic"),
        replay_max_limit=max(events, 1),
        metrics_enabled=False,
    )
    engine = make_engine(settings)
    upgrade(engine)
    cutoff = datetime.now(UTC)
    time.sleep(0.01)
    batch: list[dict[str, Any]] = []
    for i in range(events // 2):
        customer = f"cus_bench_{i}"
        batch.append(synthetic.event("customer.created", synthetic.customer(customer_id=customer, email=f"b{i}@x.io")))
        sub = synthetic.subscription(sub_id=f"sub_bench_{i}", customer_id=customer, price_obj=PRO)
        batch.append(synthetic.event("customer.subscription.created", sub))
        if len(batch) >= 1000:
            _store(engine, batch)
            batch = []
    _store(engine, batch)
    with engine.begin() as connection:
        connection.exec_driver_sql("INSERT INTO users (email, subscription_tier) VALUES ('b0@x.io', 'free')")

    took: list[float] = []
    finished = threading.Event()

    def dry_run() -> None:
        started = time.perf_counter()
        replay_events(engine, since=cutoff, dry_run=True, actor="bench", reason=None, settings=settings, limit=events)
        took.append(time.perf_counter() - started)
        finished.set()

    thread = threading.Thread(target=dry_run)
    thread.start()
    time.sleep(0.2)
    waits: list[float] = []
    n = 0
    while not finished.is_set():
        started = time.perf_counter()
        if n % 2:
            _store(
                engine, [synthetic.event("customer.created", synthetic.customer(customer_id=f"cus_w{n}", email=None))]
            )
        else:
            set_override(
                engine,
                email="b0@x.io",
                tier="basic" if n % 4 else "pro",
                reason="bench",
                expires_at=None,
                actor="bench",
                tiers=settings.price_tiers,
            )
        waits.append(time.perf_counter() - started)
        n += 1
        time.sleep(0.01)
    thread.join()
    engine.dispose()
    waits.sort()
    return {
        "database": make_url(database_url).get_backend_name(),
        "events": events,
        "dry_run_seconds": round(took[0], 2),
        "writes_meanwhile": len(waits),
        "write_p50_ms": round(statistics.median(waits) * 1000, 1) if waits else None,
        "write_p99_ms": round(waits[int(len(waits) * 0.99)] * 1000, 1) if waits else None,
        "write_max_ms": round(waits[-1] * 1000, 1) if waits else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--events", type=int, default=5000)
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
