"""Sync throughput and peak memory, 10,000 and 100,000 subscriptions.

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
with ``--base``: each measurement runs a checkout's own interpreter and its own copy of this
script, so each measures its own kamiyo, against the one API server of this checkout.

    .venv/bin/python bench/sync.py --base ../bench-base11 --sizes 100000 --databases postgres sqlite \\
        --rounds 2 --no-resync
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
RESULTS = ROOT / "bench" / "results"
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


def run_size(
    count: int, databases: list[str], versions: dict[str, list[str]], rounds: int, *, resync: bool
) -> list[dict[str, Any]]:
    """Sync ``count`` subscriptions with each version, alternating, ``rounds`` times per database.

    ``versions`` maps a name to the command that runs one measurement (a checkout's interpreter
    and its own bench/sync.py); one API server serves them all.
    """
    from support import throwaway_postgres

    server = subprocess.Popen(
        [sys.executable, __file__, "--serve", str(count)], stdout=subprocess.PIPE, text=True, cwd=ROOT
    )
    kinds = ["first sync, empty database", *(["re-sync, nothing to change"] if resync else [])]
    names = list(versions)
    rows = []
    try:
        assert server.stdout is not None
        url = server.stdout.readline().strip()
        pair = 0
        for round_ in range(rounds):
            for database in databases:
                order = names if pair % 2 == 0 else names[::-1]
                pair += 1
                for name in order:
                    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
                        postgres = database == "postgres"
                        db = (
                            stack.enter_context(throwaway_postgres()) if postgres else f"sqlite:///{Path(tmp) / 'k.db'}"
                        )
                        for kind in kinds:
                            out = subprocess.run(
                                [*versions[name], "--measure", url, db],
                                capture_output=True,
                                text=True,
                                check=True,
                                cwd=tmp,
                                env={**os.environ, "LOG_LEVEL": "WARNING"},
                            )
                            row = {
                                "version": name,
                                "round": round_,
                                "subscriptions": count,
                                "database": "PostgreSQL" if postgres else "SQLite",
                                "sync": kind,
                                "loadavg": round(os.getloadavg()[0], 2),
                                **json.loads(out.stdout.strip().splitlines()[-1]),
                            }
                            rows.append(row)
                            print(json.dumps(row), flush=True)
        return rows
    finally:
        server.kill()
        server.wait()


def _version_command(checkout: Path) -> list[str]:
    """A checkout's own interpreter running its own copy of this script (its kamiyo, its API)."""
    python = checkout.resolve() / ".venv" / "bin" / "python"
    if not python.exists():
        raise SystemExit(f"{python} is missing: run `make install` in {checkout}")
    return [str(python), str(checkout.resolve() / "bench" / "sync.py")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--postgres", action="store_true", help="PostgreSQL instead of SQLite (a fresh database each)")
    parser.add_argument(
        "--databases", nargs="+", choices=("sqlite", "postgres"), help="several databases, in this order"
    )
    parser.add_argument("--base", type=Path, help="another checkout (with its .venv), measured alternately with this")
    parser.add_argument("--this", type=Path, help="the checkout measured as 'this' (default: this one)")
    parser.add_argument("--rounds", type=int, default=1, help="measurements per version and database (1)")
    parser.add_argument("--no-resync", action="store_true", help="the first sync only")
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--measure", nargs=2, metavar=("URL", "DATABASE_URL"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve)
        return
    if args.measure:
        print(json.dumps(measure(*args.measure)))
        return
    databases = args.databases or (["postgres"] if args.postgres else ["sqlite"])
    versions = {"this": _version_command(args.this) if args.this else [sys.executable, __file__]}
    if args.base is not None:
        versions = {"base": _version_command(args.base), **versions}
    load = os.getloadavg()
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load {load[0]:.2f} at start")
    rows = [
        row
        for count in args.sizes
        for row in run_size(count, databases, versions, args.rounds, resync=not args.no_resync)
    ]
    print()
    print(
        "| version | database | subscriptions | sync | seconds | subscriptions/s "
        "| CPU µs/subscription (writer + reader) | peak MB (writer) | peak MB (reader) |"
    )
    print("|---|---|---:|---|---:|---:|---:|---:|---:|")
    for row in rows:
        print(
            f"| {row['version']} | {row['database']} | {row['subscriptions']:,} | {row['sync']} | {row['seconds']} | "
            f"{row['per_second']:,} | {row['cpu_us_per_subscription']} ({row['cpu_seconds']} + "
            f"{row['reader_cpu_seconds']} s) | {row['peak_mb']} | {row['reader_peak_mb']} |"
        )
    print(f"\nload average at the end: {os.getloadavg()[0]:.2f}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"sync-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({"options": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=2))
    print(f"written to {path}")


if __name__ == "__main__":
    main()
