"""Two versions of kamiyo side by side: the same ingest load, alternating, in one run.

    .venv/bin/python bench/versions.py --base ../wt-base            # this checkout against another
    .venv/bin/python bench/versions.py --base ../wt-base --pairs 5 --duration 8

``--base`` is another checkout of the repository with its own ``.venv`` (``make install`` there),
e.g. a worktree of main at the branch point: ``git worktree add --detach ../wt-base <commit>``.
Each pair runs ``kamiyo serve`` of the base, then of this checkout (the order alternates from
pair to pair), each on a fresh SQLite database (and, with ``--postgres``, also on a fresh
PostgreSQL database), in-process worker off, under bench/run.py's load: ``wrk`` at concurrency
32 replaying deliveries signed just before the run. What is compared is the ratio of the two
within each pair (the machine is shared), and the server's CPU time per delivery: the event
loop's, and the rest (the inbox writer process). Every event acknowledged with a 2xx is looked
up in the database after a SIGKILL, as in bench/run.py. Results go to
``bench/results/versions-<time>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, select

from deliveries import PRICE_TIERS, write_pool
from kamiyo.db.models import events_table
from loadgen import run_wrk
from servers import Server, free_port, kamiyo_env, throwaway_postgres

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
SECRET = "whsec_benchmark0123456789abcdefABCDEF"
PG_ADMIN_URL = os.environ.get("KAMIYO_BENCH_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


def _options() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--base", type=Path, required=True, help="the other checkout (with its .venv)")
    parser.add_argument("--pairs", type=int, default=4, help="pairs of runs per database (4)")
    parser.add_argument("--duration", type=float, default=8.0, help="seconds of measured load per run (8)")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of warm-up per run (2)")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--pool", type=int, default=200_000, help="signed deliveries per measured run")
    parser.add_argument("--postgres", action="store_true", help="PostgreSQL pairs too")
    return parser.parse_args()


def _kamiyo(checkout: Path) -> list[str]:
    script = checkout / ".venv" / "bin" / "kamiyo"
    if not script.exists():
        raise SystemExit(f"{script} is missing: run `make install` in {checkout}")
    return [str(script)]


@contextmanager
def _serve(command: list[str], workdir: Path, database_url: str) -> Iterator[Server]:
    settings = {
        "STRIPE_WEBHOOK_SECRET": SECRET,
        "STRIPE_PRICE_TIERS": PRICE_TIERS,
        "DATABASE_URL": database_url,
        "WORKER_IN_PROCESS": "false",
    }
    import subprocess

    workdir.mkdir(parents=True, exist_ok=True)
    subprocess.run([*command, "db", "upgrade"], cwd=workdir, env=kamiyo_env(settings), check=True, capture_output=True)
    port = free_port()
    env = kamiyo_env({**settings, "HOST": "127.0.0.1", "PORT": str(port)})
    server = Server("kamiyo serve", [*command, "serve"], workdir, env, port)
    try:
        server.start("/health")
        yield server
    finally:
        server.stop(kill=True)


def _measure(
    name: str, command: list[str], workdir: Path, database_url: str, args: argparse.Namespace
) -> dict[str, Any]:
    tag = secrets.token_hex(3)
    with _serve(command, workdir, database_url) as server:
        url = server.url + "/api/v1/payments/webhook"
        common = {"connections": args.connections, "threads": 1, "stop_at_end": True}
        warm = write_pool(workdir, "warmup", 20_000, secret=SECRET, id_prefix=f"{tag}w", seed=2)
        run_wrk(url, warm, workdir, label="warmup", duration=args.warmup, **common)
        pool = write_pool(workdir, "measured", args.pool, secret=SECRET, id_prefix=f"{tag}m", seed=3)
        loop_before, rest_before = server.cpu_seconds()
        load = run_wrk(url, pool, workdir, label="measured", duration=args.duration, **common)
        loop_after, rest_after = server.cpu_seconds()
    engine = create_engine(database_url)
    try:
        with engine.connect() as connection:
            stored = set(connection.execute(select(events_table.c.stripe_event_id)).scalars())
    finally:
        engine.dispose()
    lost = len(load.acked - stored)
    requests = max(load.requests, 1)
    summary = load.summary()
    return {
        "version": name,
        "rps": summary["rps"],
        "p50_ms": summary["latency_ms"].get("p50"),
        "p99_ms": summary["latency_ms"].get("p99"),
        "non_2xx": summary["non_2xx"],
        "loop_cpu_us": round((loop_after - loop_before) / requests * 1e6, 1),
        "other_cpu_us": round((rest_after - rest_before) / requests * 1e6, 1),
        "lost": lost,
    }


def _say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def main() -> int:
    args = _options()
    versions = {"base": _kamiyo(args.base.resolve()), "this": _kamiyo(ROOT)}
    backends = ["sqlite", *(["postgres"] if args.postgres else [])]
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="kamiyo-versions-") as scratch:
        for backend in backends:
            for pair in range(args.pairs):
                order = ["base", "this"] if pair % 2 == 0 else ["this", "base"]
                for name in order:
                    workdir = Path(scratch) / f"{backend}-{pair}-{name}"
                    if backend == "sqlite":
                        result = _measure(name, versions[name], workdir, f"sqlite:///{workdir / 'k.db'}", args)
                    else:
                        with throwaway_postgres(PG_ADMIN_URL) as url:
                            result = _measure(name, versions[name], workdir, url, args)
                    result.update(backend=backend, pair=pair)
                    runs.append(result)
                    _say(json.dumps(result))
    report: dict[str, Any] = {"options": {k: str(v) for k, v in vars(args).items()}, "runs": runs, "ratios": {}}
    for backend in backends:
        ratios = []
        for pair in range(args.pairs):
            by = {r["version"]: r for r in runs if r["backend"] == backend and r["pair"] == pair}
            ratios.append(by["this"]["rps"] / by["base"]["rps"])
        mine = [r for r in runs if r["backend"] == backend and r["version"] == "this"]
        base = [r for r in runs if r["backend"] == backend and r["version"] == "base"]
        report["ratios"][backend] = {
            "rps_this_over_base_per_pair": [round(r, 3) for r in ratios],
            "rps_ratio_median": round(statistics.median(ratios), 3),
            "loop_cpu_us_median": {
                "base": statistics.median(r["loop_cpu_us"] for r in base),
                "this": statistics.median(r["loop_cpu_us"] for r in mine),
            },
            "other_cpu_us_median": {
                "base": statistics.median(r["other_cpu_us"] for r in base),
                "this": statistics.median(r["other_cpu_us"] for r in mine),
            },
            "p99_ms_median": {
                "base": statistics.median(r["p99_ms"] or 0 for r in base),
                "this": statistics.median(r["p99_ms"] or 0 for r in mine),
            },
            "lost": sum(r["lost"] for r in runs if r["backend"] == backend),
        }
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"versions-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(report, indent=2))
    print(json.dumps(report["ratios"], indent=2))
    _say(f"written to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
