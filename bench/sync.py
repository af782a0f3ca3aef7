"""The benchmark of issue 3: sync throughput and peak memory, 10,000 and 100,000 subscriptions.

    .venv/bin/python bench/sync.py                      # SQLite, 10k and 100k (about 2 minutes)
    .venv/bin/python bench/sync.py --sizes 10000        # one size
    .venv/bin/python bench/sync.py --postgres            # PostgreSQL (KAMIYO_TEST_PG_URL), a fresh database per size

The local Stripe-compatible API (``tests/stripe_api.py``) runs in a process of its own, serving
``count`` generated subscriptions, each with its customer expanded and padded to the weight of a
real Stripe object (about 2.8 KB). The rate budget is lifted (``STRIPE_RATE_LIMIT`` 100000).

For each size, two syncs run, each in a fresh process so that its peak memory (``ru_maxrss``)
is its own: the first into an empty database (every customer linked, every user created), then
a re-sync of the same database (nothing to change: the common case). A sync is what ``kamiyo
sync`` runs (``parallel=True``: pages are read in a second process); the reader process's
peak memory is reported too. Flat memory means the same peak for 10,000 and 100,000. CPU is
reported per subscription, writer plus reader process (the API server's is not counted): on a
shared machine it is steadier than the wall clock. To compare two versions, run them alternately
(e.g. the old one with ``PYTHONPATH`` pointing at a copy of its ``src``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # stripe_api: the local API


def serve(count: int) -> None:
    """Child: serve ``count`` generated subscriptions on 127.0.0.1; print the URL; run until killed."""
    from stripe_api import FakeStripe, GeneratedSubscriptions, StripeApiServer

    account = FakeStripe()
    account.log_requests = False
    account.generated = GeneratedSubscriptions(count)
    server = StripeApiServer(account).start()
    print(server.url, flush=True)
    while True:
        time.sleep(3600)


def measure(url: str, database_url: str) -> dict[str, Any]:
    """Child: one sync, exactly as `kamiyo sync` runs it (output discarded); its figures as JSON on stdout."""
    from kamiyo.cli.sync import run_sync
    from kamiyo.config import Settings
    from kamiyo.db.engine import make_engine
    from kamiyo.db.migrate import upgrade
    from kamiyo.domain.tiers import parse_price_tiers
    from kamiyo.reconcile.gateway import StripeApiGateway
    from kamiyo.reconcile.ratelimit import RateBudget
    from stripe_api import API_KEY

    settings = Settings(database_url=database_url, price_tiers=parse_price_tiers("price_pro_monthly=pro"))
    engine = make_engine(settings)
    upgrade(engine)
    engine.dispose()
    gateway = StripeApiGateway(API_KEY, url, budget=RateBudget(100_000))  # the rate budget lifted
    with open(os.devnull, "w") as devnull:
        started, cpu, children = time.perf_counter(), time.process_time(), _children_cpu()
        summary = run_sync(settings, gateway=gateway, out=devnull, err=devnull)
        seconds = time.perf_counter() - started
    cpu_seconds = time.process_time() - cpu
    reader_cpu = _children_cpu() - children  # the reader process, joined when the sync ends
    return {
        "seen": summary.seen,
        "changed": summary.changed,
        "seconds": round(seconds, 2),
        "per_second": round(summary.seen / seconds),
        "cpu_seconds": round(cpu_seconds, 2),
        "reader_cpu_seconds": round(reader_cpu, 2),
        "cpu_us_per_subscription": round((cpu_seconds + reader_cpu) / max(summary.seen, 1) * 1e6),
        "peak_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "reader_peak_mb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1),
    }


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_size(count: int, postgres: bool) -> list[dict[str, Any]]:
    from support import throwaway_postgres

    server = subprocess.Popen(
        [sys.executable, __file__, "--serve", str(count)], stdout=subprocess.PIPE, text=True, cwd=ROOT
    )
    try:
        assert server.stdout is not None
        url = server.stdout.readline().strip()
        with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
            db = stack.enter_context(throwaway_postgres()) if postgres else f"sqlite:///{Path(tmp) / 'kamiyo.db'}"
            rows = []
            for kind in ("first sync, empty database", "re-sync, nothing to change"):
                out = subprocess.run(
                    [sys.executable, __file__, "--measure", url, db],
                    capture_output=True,
                    text=True,
                    check=True,
                    cwd=ROOT,
                    env={**os.environ, "LOG_LEVEL": "WARNING"},
                )
                row = {
                    "subscriptions": count,
                    "database": "PostgreSQL" if postgres else "SQLite",
                    "sync": kind,
                    **json.loads(out.stdout.strip().splitlines()[-1]),
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
            return rows
    finally:
        server.kill()
        server.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--postgres", action="store_true", help="PostgreSQL instead of SQLite (a fresh database each)")
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--measure", nargs=2, metavar=("URL", "DATABASE_URL"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve)
        return
    if args.measure:
        print(json.dumps(measure(*args.measure)))
        return
    load = os.getloadavg()
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load {load[0]:.2f} at start")
    rows = [row for count in args.sizes for row in run_size(count, args.postgres)]
    print()
    print(
        "| database | subscriptions | sync | seconds | subscriptions/s | CPU µs/subscription (writer + reader) "
        "| peak MB (writer) | peak MB (reader) |"
    )
    print("|---|---:|---|---:|---:|---:|---:|---:|")
    for row in rows:
        print(
            f"| {row['database']} | {row['subscriptions']:,} | {row['sync']} | {row['seconds']} | "
            f"{row['per_second']:,} | {row['cpu_us_per_subscription']} ({row['cpu_seconds']} + "
            f"{row['reader_cpu_seconds']} s) | {row['peak_mb']} | {row['reader_peak_mb']} |"
        )
    print(f"\nload average at the end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
