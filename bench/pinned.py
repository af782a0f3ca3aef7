"""``make run`` under load on one core, beside a bare ASGI app pinned the same way, two checkouts alternating.

    .venv/bin/python bench/pinned.py --base ../bench-base11                  # 3 rounds of 60 s runs
    .venv/bin/python bench/pinned.py --base ../bench-base11 --rounds 1 --duration 10   # a smoke run

The server process and its children (kamiyo serve's inbox process, where its worker applies) are
pinned to one core (``taskset -c 0``), ``wrk`` to the other (``taskset -c 1``): receiving and
applying share one core, as on a small machine, and the load generator does not take from it.
Each round runs, each server fresh and on a fresh SQLite database (``make run``'s database):

1. the bare app (bench/bare_app.py, the same server stack, pinned the same way);
2. ``kamiyo serve`` as ``make run`` starts it (in-process worker applying, service defaults), of
   the base checkout and of this one (which goes first alternates from round to round);
3. ``kamiyo serve`` with ``WORKER_IN_PROCESS=false`` (ingest alone), base and this, alternating.

Load: ``wrk -t1``, concurrency 32, ``--duration`` seconds after a short warm-up, replaying
deliveries signed just before the run (bench/deliveries.py: the subscribed types, 5%
re-deliveries), never repeating one for kamiyo. After each kamiyo run the server is killed with
SIGKILL and every event acknowledged with a 2xx is looked up in its database. Reported: req/s, as
a fraction of the bare app's in the same round, p50/p99, what the worker had applied by the end,
and the server's CPU (cores busy should not exceed 1: the pinning holds). Results go to
``bench/results/pinned-<time>.json``; a Markdown table is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, func, select

from deliveries import PRICE_TIERS, Pool, write_pool
from kamiyo.db.models import events_table
from loadgen import LoadResult, run_wrk
from servers import bare_server, checkout_kamiyo, kamiyo_server, kamiyo_upgrade

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
SECRET = "whsec_benchmark0123456789abcdefABCDEF"
SERVER_CPU, LOAD_CPU = "0", "1"
BARE_POOL = 20_000  # the bare app ignores ids: its pool may start over
MIN_POOL, MAX_POOL = 20_000, 600_000
_events = events_table


def _options() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--base", type=Path, help="the other checkout (with its .venv); without it, this one only")
    parser.add_argument("--this", type=Path, default=ROOT, help="the checkout measured as 'this' (this one)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds (3)")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of measured load per run (60)")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds of warm-up per run (3)")
    parser.add_argument("--connections", type=int, default=32, help="concurrency (32)")
    return parser.parse_args()


def _say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def _affinity(pid: int) -> list[str]:
    """``Cpus_allowed_list`` of the process and of each of its children."""
    found = []
    for entry in [Path(f"/proc/{pid}"), *_children(pid)]:
        try:
            for line in (entry / "status").read_text().splitlines():
                if line.startswith("Cpus_allowed_list:"):
                    found.append(line.split(":", 1)[1].strip())
        except OSError:
            continue
    return found


def _children(pid: int) -> list[Path]:
    children = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    children.append(entry)
            except (OSError, IndexError, ValueError):
                continue
    return children


def _load(
    url: str, pool: Pool, workdir: Path, label: str, duration: float, args: argparse.Namespace, *, stop_at_end: bool
) -> LoadResult:
    """``wrk -t1`` at the run's concurrency, pinned to the load generator's core."""
    return run_wrk(
        url,
        pool,
        workdir,
        label=label,
        duration=duration,
        connections=args.connections,
        threads=1,
        stop_at_end=stop_at_end,
        cpus=LOAD_CPU,
    )


def measure_bare(workdir: Path, args: argparse.Namespace) -> dict[str, Any]:
    with bare_server(workdir, cpus=SERVER_CPU) as server:
        pool = write_pool(workdir, "bare", BARE_POOL, secret=SECRET, id_prefix="bare", seed=2)
        _load(server.url + "/", pool, workdir, "warmup", args.warmup, args, stop_at_end=False)
        before = server.cpu_seconds()
        load = _load(server.url + "/", pool, workdir, "measured", args.duration, args, stop_at_end=False)
        load.note_server_cpu(before, server.cpu_seconds())
        affinity = _affinity(server.pid)
    return {"scenario": "bare", "version": "bare", **_figures(load), "affinity": affinity}


def _figures(load: LoadResult) -> dict[str, Any]:
    summary = load.summary()
    return {
        "rps": summary["rps"],
        "p50_ms": summary["latency_ms"].get("p50"),
        "p99_ms": summary["latency_ms"].get("p99"),
        "non_2xx": summary["non_2xx"],
        "errors": summary["errors"],
        "pool_exhausted": summary["pool_exhausted"],
        "server_cpu": summary["server_cpu"],
        "wrk_cpu_cores": summary["wrk_cpu_cores"],
    }


def measure_kamiyo(
    name: str, command: list[str], workdir: Path, *, worker: bool, args: argparse.Namespace
) -> dict[str, Any]:
    database_url = f"sqlite:///{workdir / 'kamiyo.db'}"
    settings = {
        "STRIPE_WEBHOOK_SECRET": SECRET,
        "STRIPE_PRICE_TIERS": PRICE_TIERS,
        "DATABASE_URL": database_url,
        "WORKER_IN_PROCESS": "true" if worker else "false",
    }
    kamiyo_upgrade(workdir, settings, command)
    tag = secrets.token_hex(3)
    with kamiyo_server(workdir, settings, ["taskset", "-c", SERVER_CPU, *command]) as server:
        url = server.url + "/api/v1/payments/webhook"
        warm_pool = write_pool(workdir, "warmup", MIN_POOL, secret=SECRET, id_prefix=f"{tag}w", seed=2)
        warm = _load(url, warm_pool, workdir, "warmup", args.warmup, args, stop_at_end=True)
        # Enough deliveries for the whole run at half again the warm-up's pace, never repeating one.
        size = max(MIN_POOL, min(MAX_POOL, int(warm.rps * 1.5 * (args.duration + 2))))
        pool = write_pool(workdir, "measured", size, secret=SECRET, id_prefix=f"{tag}m", seed=3)
        before = server.cpu_seconds()
        load = _load(url, pool, workdir, "measured", args.duration, args, stop_at_end=True)
        load.note_server_cpu(before, server.cpu_seconds())
        affinity = _affinity(server.pid)
        server.stop(kill=True)  # a crash: what was acknowledged must already be committed
    engine = create_engine(database_url)
    try:
        with engine.connect() as connection:
            stored = set(connection.execute(select(_events.c.stripe_event_id)).scalars())
            by_status = select(_events.c.status, func.count()).group_by(_events.c.status)
            statuses = {str(status): int(n) for status, n in connection.execute(by_status)}
    finally:
        engine.dispose()
    acked = warm.acked | load.acked
    return {
        "scenario": "worker" if worker else "ingest",
        "version": name,
        **_figures(load),
        "pool": size,
        "acknowledged": len(acked),
        "missing": len(acked - stored),
        "statuses_at_kill": statuses,
        "affinity": affinity,
    }


def _summary(runs: list[dict[str, Any]], names: list[str], rounds: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for scenario in ("worker", "ingest"):
        for name in names:
            mine = [r for r in runs if r["scenario"] == scenario and r["version"] == name]
            fractions = []
            for round_ in range(rounds):
                bare = [r for r in runs if r["scenario"] == "bare" and r["round"] == round_]
                kamiyo = [r for r in mine if r["round"] == round_]
                if bare and kamiyo:
                    fractions.append(kamiyo[0]["rps"] / bare[0]["rps"])
            out[f"{scenario}/{name}"] = {
                "rps_median": round(statistics.median(r["rps"] for r in mine)),
                "cpu_us_per_request_median": round(statistics.median(_cpu_per_request(r) for r in mine), 1),
                "of_bare_per_round": [round(f, 3) for f in fractions],
                "of_bare_median": round(statistics.median(fractions), 3),
                "p99_ms_median": statistics.median(r["p99_ms"] or 0 for r in mine),
                "p99_ms_max": max(r["p99_ms"] or 0 for r in mine),
                "missing": sum(r["missing"] for r in mine),
            }
        if len(names) == 2:
            ratios = []
            for round_ in range(rounds):
                by = {r["version"]: r for r in runs if r["scenario"] == scenario and r["round"] == round_}
                ratios.append(by["this"]["rps"] / by["base"]["rps"])
            out[f"{scenario}/this_over_base"] = {
                "per_round": [round(r, 3) for r in ratios],
                "median": round(statistics.median(ratios), 3),
            }
    bare = [r for r in runs if r["scenario"] == "bare"]
    out["bare"] = {
        "rps_median": round(statistics.median(r["rps"] for r in bare)),
        "cpu_us_per_request_median": round(statistics.median(_cpu_per_request(r) for r in bare), 1),
    }
    for key, row in out.items():
        if "cpu_us_per_request_median" in row and key != "bare":
            # What a core of its own would give, as a fraction of the bare app's: CPU per request
            # does not depend on how much of the core the neighbours left.
            row["of_bare_by_cpu"] = round(
                out["bare"]["cpu_us_per_request_median"] / row["cpu_us_per_request_median"], 3
            )
    return out


def _cpu_per_request(run: dict[str, Any]) -> float:
    cpu = run["server_cpu"]
    return float(cpu["main_thread_us_per_request"] + cpu["other_threads_us_per_request"])


def main() -> int:
    args = _options()
    versions = {"this": checkout_kamiyo(args.this)}
    if args.base is not None:
        versions = {"base": checkout_kamiyo(args.base), **versions}
    names = list(versions)
    runs: list[dict[str, Any]] = []
    started = datetime.now(UTC)
    loadavg_start = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="kamiyo-pinned-") as scratch:
        for round_ in range(args.rounds):
            order = names if round_ % 2 == 0 else names[::-1]
            result = measure_bare(Path(scratch) / f"{round_}-bare", args)
            result["round"] = round_
            runs.append(result)
            _say(json.dumps(result))
            for worker in (True, False):
                for name in order:
                    workdir = Path(scratch) / f"{round_}-{name}-{'worker' if worker else 'ingest'}"
                    result = measure_kamiyo(name, versions[name], workdir, worker=worker, args=args)
                    result["round"] = round_
                    result["loadavg"] = round(os.getloadavg()[0], 2)
                    runs.append(result)
                    _say(json.dumps(result))
    summary = _summary(runs, names, args.rounds)
    report = {
        "started_at": started.isoformat(timespec="seconds"),
        "options": {k: str(v) for k, v in vars(args).items()},
        "base": str(args.base.resolve()) if args.base else None,
        "this": str(args.this.resolve()),
        "loadavg": {"start": loadavg_start, "end": os.getloadavg()},
        "runs": runs,
        "summary": summary,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"pinned-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(report, indent=2))
    print()
    print(
        "| scenario | version | req/s (median) | of bare (per round) | p99 ms (median, max) "
        "| server CPU µs/request (of bare by CPU) | acked events missing |"
    )
    print("|---|---|---:|---|---:|---:|---:|")
    bare = summary["bare"]
    print(f"| bare app | - | {bare['rps_median']:,} | 1 | - | {bare['cpu_us_per_request_median']} | - |")
    for scenario in ("worker", "ingest"):
        for name in names:
            row = summary[f"{scenario}/{name}"]
            print(
                f"| {scenario} | {name} | {row['rps_median']:,} | {row['of_bare_median']:.1%} "
                f"({', '.join(f'{f:.1%}' for f in row['of_bare_per_round'])}) | "
                f"{row['p99_ms_median']}, {row['p99_ms_max']} | "
                f"{row['cpu_us_per_request_median']} ({row['of_bare_by_cpu']:.1%}) | {row['missing']} |"
            )
        if f"{scenario}/this_over_base" in summary:
            ratio = summary[f"{scenario}/this_over_base"]
            print(
                f"| {scenario} | this / base | {ratio['median']} ({', '.join(map(str, ratio['per_round']))}) | | | | |"
            )
    _say(f"written to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
