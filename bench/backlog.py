"""Apply throughput: a backlog of pending events drained by ``Worker.run_once``, in this process.

The backlog is what a burst or an outage leaves behind: for each of N/4 customers, the
subscription is created, its first invoice is paid (the invoice carries the customer's email,
which links the customer to a user, created on the spot), then the subscription is updated
(an upgrade, a downgrade, or a failed renewal) and the next invoice is paid or fails. Events of
all customers are interleaved by time with a few seconds of jitter, so some subscriptions
arrive before their customer is linked (they wait, then apply when the invoice links it) and
some updates arrive before the snapshot they replace (the stale one is left as is). One event
in five uses the pre-basil payload shape.

Alone: ``.venv/bin/python bench/backlog.py --events 20000`` (add ``--postgres URL``, an admin
URL such as ``postgresql://postgres@127.0.0.1:5432/postgres``, for a throwaway PostgreSQL
database as well).

The worker runs with the service's defaults (batch of 200, metrics on, one log line per
event at INFO, written to a file, the collector settled by ``heap.settle``), exactly as ``kamiyo
worker`` would; ``--batch-size N`` gives it batches of N instead (what a batch costs whatever its
size shows as CPU per event), ``--python-gc`` keeps Python's collector settings. The collections
during the drain and the seconds spent in them are printed too.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import logging
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson
from sqlalchemy import func, select

from deliveries import PRICE_TIERS, PRICES
from kamiyo import synthetic
from kamiyo.config import Settings
from kamiyo.db.engine import make_engine
from kamiyo.db.migrate import upgrade
from kamiyo.db.models import events_table, users_table
from kamiyo.domain.tiers import parse_price_tiers
from kamiyo.heap import settle
from kamiyo.logs import configure_logging
from kamiyo.processing.worker import Worker
from kamiyo.webhooks.envelope import read_envelope
from kamiyo.webhooks.inbox import inbox_row, insert_new_events
from servers import throwaway_postgres

_INSERT_CHUNK = 2000


def backlog_events(count: int, *, seed: int = 7) -> list[bytes]:
    """``count`` event bodies (a multiple of 4 is used), interleaved by time across customers."""
    rng = random.Random(seed)
    start = int(time.time()) - 3600
    timed: list[tuple[float, int, bytes]] = []
    for n in range(max(1, count // 4)):
        api = synthetic.LEGACY_API_VERSION if n % 5 == 0 else synthetic.LATEST_API_VERSION
        customer_id, sub_id = f"cus_bench{n:07d}", f"sub_bench{n:07d}"
        email = f"Customer{n}@Example.com"
        t0 = start + n * 3600 // max(1, count // 4)
        first, second = rng.sample(PRICES, 2)
        renewal = rng.random()
        later_status = "past_due" if renewal < 0.1 else "active"
        history: list[tuple[int, dict[str, Any]]] = [
            (t0, _subscription_event("customer.subscription.created", sub_id, customer_id, first, t0, api, "active")),
            (t0, _invoice_event("invoice.paid", sub_id, customer_id, email, first, t0, api, paid=True)),
            (
                t0 + 30,
                _subscription_event(
                    "customer.subscription.updated", sub_id, customer_id, second, t0 + 30, api, later_status
                ),
            ),
            (
                t0 + 30,
                _invoice_event(
                    "invoice.payment_failed" if later_status == "past_due" else "invoice.payment_succeeded",
                    sub_id,
                    customer_id,
                    email,
                    second,
                    t0 + 30,
                    api,
                    paid=later_status == "active",
                ),
            ),
        ]
        for created, event in history:
            timed.append((created + rng.uniform(0, 20), len(timed), orjson.dumps(event)))
    timed.sort()
    return [body for _when, _n, body in timed]


def _subscription_event(
    event_type: str, sub_id: str, customer_id: str, price_id: str, created: int, api: str, status: str
) -> dict[str, Any]:
    sub = synthetic.subscription(
        sub_id=sub_id,
        customer_id=customer_id,
        status=status,
        price_obj=synthetic.price(price_id),
        created=created,
        api_version=api,
    )
    previous: dict[str, Any] | None = {"items": {}} if event_type.endswith(".updated") else None
    return synthetic.event(event_type, sub, created=created, api_version=api, previous_attributes=previous)


def _invoice_event(
    event_type: str,
    sub_id: str,
    customer_id: str,
    email: str,
    price_id: str,
    created: int,
    api: str,
    *,
    paid: bool,
) -> dict[str, Any]:
    inv = synthetic.invoice(
        customer_id=customer_id,
        sub_id=sub_id,
        email=email,
        paid=paid,
        api_version=api,
        created=created,
        price_id=price_id,
    )
    return synthetic.event(event_type, inv, created=created, api_version=api)


def bench_settings(database_url: str, secret: str) -> Settings:
    """The service's defaults, with our secret and price tiers."""
    return Settings(webhook_secrets=(secret,), price_tiers=parse_price_tiers(PRICE_TIERS), database_url=database_url)


def drain_backlog(
    database_url: str,
    count: int,
    workdir: Path,
    *,
    secret: str,
    timeout: float,
    batch_size: int | None = None,
    python_gc: bool = False,
) -> dict[str, Any]:
    """Fill a fresh inbox with ``count`` pending events, then time the worker draining it.

    The worker stops after ``timeout`` seconds even if events are left: the rate is then what it
    applied in that time, and the drain time is projected from it (and reported as such).
    """
    workdir.mkdir(parents=True, exist_ok=True)
    settings = bench_settings(database_url, secret)
    if batch_size is not None:
        settings = dataclasses.replace(settings, worker_batch_size=batch_size)
    engine = make_engine(settings)
    log_file = (workdir / "worker.log").open("a")
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    thresholds = gc.get_threshold()
    try:
        upgrade(engine)
        bodies = backlog_events(count)
        for offset in range(0, len(bodies), _INSERT_CHUNK):
            rows = []
            for body in bodies[offset : offset + _INSERT_CHUNK]:
                envelope, _event = read_envelope(body)
                rows.append(inbox_row(envelope, body, status="pending"))
            with engine.begin() as connection:
                insert_new_events(connection, rows)

        configure_logging(settings.log_level)
        handler = root.handlers[0]
        assert isinstance(handler, logging.StreamHandler)
        handler.setStream(log_file)

        worker = Worker(engine, settings)
        if not python_gc:
            settle(batches=True)  # as `kamiyo worker` does once it has started
        collector = _Collections()
        gc.callbacks.append(collector)
        batches = handled = 0
        cpu_started = time.process_time()
        started = time.perf_counter()
        try:
            while time.perf_counter() - started < timeout:
                done = worker.run_once()
                if not done:
                    break
                batches += 1
                handled += done
        finally:
            gc.callbacks.remove(collector)
        elapsed = time.perf_counter() - started
        cpu = time.process_time() - cpu_started

        with engine.connect() as connection:
            by_status = select(events_table.c.status, func.count()).group_by(events_table.c.status)
            statuses = {str(status): int(n) for status, n in connection.execute(by_status)}
            by_tier = select(users_table.c.subscription_tier, func.count()).group_by(users_table.c.subscription_tier)
            tiers = {str(tier): int(n) for tier, n in connection.execute(by_tier)}
        drained = statuses.get("pending", 0) == 0
        rate = handled / elapsed if elapsed else 0.0
        return {
            "events": len(bodies),
            "handled": handled,
            "batches": batches,
            "batch_size": settings.worker_batch_size,
            "elapsed_s": round(elapsed, 3),
            "drained": drained,
            # Measured when the backlog was drained; otherwise projected from the rate so far.
            "drain_s": round(elapsed if drained else len(bodies) / rate, 2) if rate else None,
            "events_per_s": round(rate, 1),
            # This process's CPU (for PostgreSQL, not the database server's).
            "cpu_us_per_event": round(cpu / handled * 1e6, 1) if handled else None,
            "gc": "python" if python_gc else "service",
            "gc_collections": collector.count,
            "gc_s": round(collector.seconds, 3),
            "statuses": statuses,
            "users_by_tier": tiers,
            "users": sum(tiers.values()),
        }
    finally:
        gc.set_threshold(*thresholds)
        gc.unfreeze()
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
        log_file.close()
        engine.dispose()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Drain a backlog of pending events with the worker; print the rate.")
    parser.add_argument("--events", type=int, default=20_000, help="backlog size (20,000)")
    parser.add_argument("--timeout", type=float, default=300.0, help="stop the worker after this many seconds (300)")
    parser.add_argument("--batch-size", type=int, help="the worker's batch (the service's default, WORKER_BATCH_SIZE)")
    parser.add_argument("--postgres", metavar="URL", help="admin URL: also drain on a throwaway PostgreSQL database")
    parser.add_argument(
        "--python-gc", action="store_true", help="keep Python's collector settings (not the worker's, heap.settle)"
    )
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="kamiyo-backlog-") as scratch:
        where = Path(scratch) / "sqlite"
        where.mkdir()
        _print("SQLite", drain_backlog(f"sqlite:///{where / 'kamiyo.db'}", args.events, where, **_options(args)))
        if args.postgres:
            with throwaway_postgres(args.postgres) as url:
                _print("PostgreSQL", drain_backlog(url, args.events, Path(scratch) / "pg", **_options(args)))
    return 0


def _options(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "secret": "whsec_backlog_bench",
        "timeout": args.timeout,
        "batch_size": args.batch_size,
        "python_gc": args.python_gc,
    }


class _Collections:
    """``gc.callbacks``: how many collections, and the seconds spent in them."""

    def __init__(self) -> None:
        self.count = 0
        self.seconds = 0.0
        self._started = 0.0

    def __call__(self, phase: str, _info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.count += 1
            self.seconds += time.perf_counter() - self._started


def _print(database: str, result: dict[str, Any]) -> None:
    print(
        f"{database}: {result['handled']:,} events in {result['elapsed_s']} s, "
        f"{result['events_per_s']:,.1f} events/s, {result['cpu_us_per_event']} µs CPU/event, "
        f"{result['gc']} gc: {result['gc_collections']} collections, {result['gc_s']} s "
        f"(drained: {result['drained']}, statuses {result['statuses']}, users {result['users_by_tier']})",
        flush=True,
    )


if __name__ == "__main__":
    raise SystemExit(main())
