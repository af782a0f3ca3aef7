"""Ingest and apply throughput, side by side with a bare ASGI app.

    make bench                                  # = .venv/bin/python bench/run.py
    .venv/bin/python bench/run.py --update-docs # also rewrite the figures in docs/PERFORMANCE.md
    .venv/bin/python bench/run.py --quick       # one short round, a smaller backlog

What one run measures, on this machine, in this order:

1. Ingest, in rounds: the bare ASGI app (``bare_app.py``), then ``kamiyo serve`` on a fresh
   SQLite database, then on a fresh PostgreSQL database, each with the in-process worker off,
   each under ``wrk`` at concurrency 32 replaying deliveries signed just before the run (5%
   re-deliveries). Each server is then killed with SIGKILL, and every event it acknowledged
   with a 2xx is looked up in its database: "durable" is checked, not assumed.
2. In each round, one more SQLite run with the in-process worker on, and the time it then
   takes to drain what the load left pending.
3. Apply: a backlog of realistic pending events drained by ``Worker.run_once`` (SQLite, then
   PostgreSQL).

Throughput is compared as ratios within one run (kamiyo / bare of the same round), because the
machine is shared: absolute figures move with whatever else runs. Results go to
``bench/results/<time>.json`` (and ``latest.json``); the Markdown for docs/PERFORMANCE.md is
printed and written to ``bench/results/PERFORMANCE.md``. PostgreSQL is 127.0.0.1:5432 user
postgres unless ``KAMIYO_BENCH_PG_URL`` says otherwise; each benchmark database is dropped after.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import shlex
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path
from typing import Any

import psycopg
from sqlalchemy import create_engine, func, select

import report
from backlog import drain_backlog
from deliveries import PRICE_TIERS, Pool, write_pool
from kamiyo.db.models import events_table
from loadgen import INSTALL_HINT, LoadResult, run_wrk, wrk_path, wrk_version
from servers import (
    Server,
    bare_server,
    kamiyo_server,
    kamiyo_upgrade,
    postgres_reachable,
    throwaway_postgres,
)

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
DOCS = ROOT / "docs" / "PERFORMANCE.md"
SECRET = "whsec_benchmark0123456789abcdefABCDEF"
PG_ADMIN_URL = os.environ.get("KAMIYO_BENCH_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
BARE_POOL = 20_000  # the bare app ignores ids: its pool may start over
MIN_POOL, MAX_POOL = 20_000, 600_000
WARMUP_POOL = 20_000
DRAIN_TIMEOUT = 300.0


def _options(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of load per measured run (10)")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of warm-up before each run (2)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of bare / SQLite / PostgreSQL runs (3)")
    parser.add_argument("--connections", type=int, default=32, help="concurrent connections (32)")
    parser.add_argument("--threads", type=int, default=1, help="wrk threads (1: leaves a core to the server)")
    parser.add_argument("--apply-events", type=int, default=20_000, help="backlog size for the apply benchmark")
    parser.add_argument(
        "--apply-timeout", type=float, default=120.0, help="stop draining after this many seconds (120)"
    )
    parser.add_argument("--no-postgres", action="store_true", help="SQLite only")
    parser.add_argument("--no-worker-run", action="store_true", help="skip the run with the in-process worker")
    parser.add_argument("--no-apply", action="store_true", help="skip the apply benchmark")
    parser.add_argument(
        "--quick", action="store_true", help="1 round of 5 s, a backlog of 5,000 for at most 30 s: a smoke run"
    )
    parser.add_argument("--profile", action="store_true", help="one more SQLite run under py-spy (pip install py-spy)")
    parser.add_argument("--update-docs", action="store_true", help="rewrite the figures in docs/PERFORMANCE.md")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory (pools, logs, databases)")
    args = parser.parse_args(argv)
    if args.quick:  # smaller defaults; what was given explicitly stays
        for name, value in (("duration", 5.0), ("rounds", 1), ("apply_events", 5_000), ("apply_timeout", 30.0)):
            if getattr(args, name) == parser.get_default(name):
                setattr(args, name, value)
    if args.duration < 1 or args.rounds < 1 or args.connections < 1 or args.threads < 1:
        parser.error("--duration, --rounds, --connections and --threads must be at least 1")
    return args


# -- one measured run -------------------------------------------------------------------------


def _kamiyo_settings(database_url: str, *, worker: bool) -> dict[str, str]:
    return {
        "STRIPE_WEBHOOK_SECRET": SECRET,
        "STRIPE_PRICE_TIERS": PRICE_TIERS,
        "DATABASE_URL": database_url,
        "WORKER_IN_PROCESS": "true" if worker else "false",
    }


def _load(
    server: Server,
    pool: Pool,
    workdir: Path,
    label: str,
    args: argparse.Namespace,
    seconds: float,
    *,
    stop_at_end: bool = True,
) -> LoadResult:
    return run_wrk(
        server.url + "/api/v1/payments/webhook",
        pool,
        workdir,
        label=label,
        duration=seconds,
        connections=args.connections,
        threads=args.threads,
        stop_at_end=stop_at_end,
    )


def measure_bare(workdir: Path, pool: Pool, args: argparse.Namespace) -> dict[str, Any]:
    """The bare app under the same load; its pool starts over when used up (it ignores event ids)."""
    with bare_server(workdir) as server:
        _load(server, pool, workdir, "warmup", args, args.warmup, stop_at_end=False)
        before = server.cpu_seconds()
        load = _load(server, pool, workdir, "measured", args, args.duration, stop_at_end=False)
        load.note_server_cpu(before, server.cpu_seconds())
    return {"load": load.summary(), "wrk": load.wrk_output}


def measure_kamiyo(
    workdir: Path,
    database_url: str,
    args: argparse.Namespace,
    *,
    pool_size: int,
    worker: bool = False,
    profile_to: Path | None = None,
) -> dict[str, Any]:
    """One kamiyo server under load; then SIGKILL, and every acknowledged event looked up."""
    settings = _kamiyo_settings(database_url, worker=worker)
    kamiyo_upgrade(workdir, settings)
    tag = secrets.token_hex(3)
    outcome: dict[str, Any] = {}
    with kamiyo_server(workdir, settings) as server:
        warm_pool = write_pool(workdir, "warmup", WARMUP_POOL, secret=SECRET, id_prefix=f"{tag}w", seed=2)
        warm = _load(server, warm_pool, workdir, "warmup", args, args.warmup)
        pool = write_pool(workdir, "measured", pool_size, secret=SECRET, id_prefix=f"{tag}m", seed=3)
        profiler = _start_profiler(server.pid, args.duration, profile_to) if profile_to else None
        before = server.cpu_seconds()
        load = _load(server, pool, workdir, "measured", args, args.duration)
        load.note_server_cpu(before, server.cpu_seconds())
        if profiler is not None:
            outcome["profile"] = _finish_profiler(profiler, profile_to)  # type: ignore[arg-type]
        if worker:
            outcome["drain"] = _wait_for_drain(database_url)
        server.stop(kill=True)  # a crash: what was acknowledged must already be committed
    acked = warm.acked | load.acked
    stored = _stored_event_ids(database_url)
    missing = acked - stored
    outcome.update(
        load=load.summary(),
        wrk=load.wrk_output,
        pool={"requests": pool.count, "distinct": pool.distinct, "duplicates": pool.duplicates},
        durability={
            "acknowledged_distinct": len(acked),
            "stored_rows": len(stored),
            "missing": len(missing),
            "missing_sample": sorted(missing)[:5],
            # Requests in flight when wrk stopped: stored, never answered. At most one per connection.
            "stored_not_acknowledged": len(stored - acked),
        },
    )
    return outcome


def _stored_event_ids(database_url: str) -> set[str]:
    engine = create_engine(database_url)
    try:
        with engine.connect() as connection:
            return set(connection.execute(select(events_table.c.stripe_event_id)).scalars())
    finally:
        engine.dispose()


def _wait_for_drain(database_url: str) -> dict[str, Any]:
    """Time the server's in-process worker finishing the backlog the load left behind."""
    engine = create_engine(database_url)
    pending = select(func.count()).select_from(events_table).where(events_table.c.status == "pending")
    applied = select(func.count()).select_from(events_table).where(events_table.c.status != "pending")
    try:
        with engine.connect() as connection:
            at_end = int(connection.execute(pending).scalar_one())
            done_at_end = int(connection.execute(applied).scalar_one())
        started = time.perf_counter()
        left = at_end
        while left and time.perf_counter() - started < DRAIN_TIMEOUT:
            time.sleep(0.2)
            with engine.connect() as connection:
                left = int(connection.execute(pending).scalar_one())
        elapsed = time.perf_counter() - started
    finally:
        engine.dispose()
    return {
        "applied_during_load": done_at_end,
        "backlog_at_end": at_end,
        "drain_s": round(elapsed, 2) if left == 0 else None,
        "still_pending": left,
    }


# -- profiling (optional) ----------------------------------------------------------------------


def _py_spy() -> str | None:
    beside = Path(sys.executable).with_name("py-spy")
    return str(beside) if beside.exists() else shutil.which("py-spy")


def _start_profiler(pid: int, seconds: float, output: Path) -> subprocess.Popen[bytes]:
    tool = _py_spy()
    if tool is None:
        raise RuntimeError("--profile needs py-spy: .venv/bin/pip install py-spy (not a project dependency)")
    command = [
        tool,
        "record",
        "--pid",
        str(pid),
        "--duration",
        str(max(1, int(seconds) - 1)),
        "--rate",
        "200",
        "--nonblocking",
        "--threads",
        "--format",
        "raw",
        "--output",
        str(output),
    ]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _finish_profiler(profiler: subprocess.Popen[bytes], output: Path) -> str:
    _out, err = profiler.communicate(timeout=120)
    if profiler.returncode != 0:
        return f"py-spy failed: {err.decode(errors='replace').strip()[-500:]}"
    return str(output)


# -- the whole run -----------------------------------------------------------------------------


def _machine(pg_version: str | None) -> dict[str, Any]:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "memory_gb": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "postgres": pg_version,
        "wrk": wrk_version(),
        "versions": {
            name: version(name) for name in ("uvicorn", "uvloop", "httptools", "starlette", "sqlalchemy", "psycopg")
        },
        "loadavg_start": " ".join(f"{v:.2f}" for v in os.getloadavg()),
    }


def _pg_version(admin_url: str) -> str:
    with psycopg.connect(admin_url, connect_timeout=3) as connection:
        row = connection.execute("SHOW server_version").fetchone()
    return f"PostgreSQL {row[0].split()[0]}" if row else "PostgreSQL"


def _say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def _describe(scenario: str, run: dict[str, Any]) -> str:
    load = run["load"]
    text = f"{scenario}: {load['rps']:,.0f} req/s p50 {load['latency_ms']['p50']} ms p99 {load['latency_ms']['p99']} ms"
    if load["non_2xx"] or sum(load["errors"].values()) - load["non_2xx"]:
        text += f" non-2xx {load['non_2xx']} errors {load['errors']}"
    if "durability" in run:
        d = run["durability"]
        text += f"; acked {d['acknowledged_distinct']:,}, stored {d['stored_rows']:,}, missing {d['missing']}"
    if load["pool_exhausted"]:
        text += " (pool exhausted: lower bound)"
    return text


def _kamiyo_pool_size(bare_rps: float, args: argparse.Namespace) -> int:
    """Enough deliveries for kamiyo to run the full duration at the bare app's pace, never repeating."""
    return max(MIN_POOL, min(MAX_POOL, int(bare_rps * (args.duration + 2))))


def main(argv: list[str] | None = None) -> int:
    args = _options(argv)
    if wrk_path() is None:
        print(f"bench: {INSTALL_HINT}", file=sys.stderr)
        return 2
    started = time.time()
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    command = shlex.join([".venv/bin/python", "bench/run.py", *(sys.argv[1:] if argv is None else argv)])
    skipped: list[str] = []
    pg_problem = "disabled with --no-postgres" if args.no_postgres else postgres_reachable(PG_ADMIN_URL)
    if pg_problem:
        skipped.append(f"PostgreSQL ({pg_problem})")
        _say(f"PostgreSQL figures skipped: {pg_problem}")
    record: dict[str, Any] = {
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": command,
        "options": {
            k: getattr(args, k)
            for k in ("duration", "warmup", "rounds", "connections", "threads", "apply_events", "apply_timeout")
        },
        "machine": _machine(None if pg_problem else _pg_version(PG_ADMIN_URL)),
        "ingest": [],
        "apply": {},
    }
    scratch = Path(tempfile.mkdtemp(prefix="kamiyo-bench-"))
    _say(f"scratch directory {scratch}")
    try:
        _run_all(args, scratch, record, use_pg=not pg_problem)
    finally:
        if args.keep:
            _say(f"kept {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)
    record["machine"]["loadavg_end"] = " ".join(f"{v:.2f}" for v in os.getloadavg())
    record["elapsed_s"] = round(time.time() - started, 1)
    if skipped:
        record["skipped"] = "; ".join(skipped)

    RESULTS.mkdir(parents=True, exist_ok=True)
    text = json.dumps(record, indent=2, default=str)
    (RESULTS / f"{stamp}.json").write_text(text)
    (RESULTS / "latest.json").write_text(text)
    block = report.markdown(record)
    (RESULTS / "PERFORMANCE.md").write_text(block + "\n")
    print()
    print(report.console_table(record))
    print()
    print(block)
    print()
    _say(f"results: {RESULTS / (stamp + '.json')}")
    if args.update_docs:
        report.update_docs(DOCS, block)
        _say(f"updated {DOCS.relative_to(ROOT)}")
    failures = [
        run
        for run in record["ingest"]
        if run.get("durability", {}).get("missing") or run["load"]["non_2xx"] or run["load"]["errors"]["timeout"]
    ]
    return 1 if failures else 0


def _run_all(args: argparse.Namespace, scratch: Path, record: dict[str, Any], *, use_pg: bool) -> None:
    bare_pool = write_pool(scratch, "bare", BARE_POOL, secret=SECRET, id_prefix="bare", seed=1)
    record["pool"] = {"mean_body_bytes": bare_pool.mean_body_bytes}
    bare_rates: list[float] = []
    drains: list[dict[str, Any]] = []
    for n in range(1, args.rounds + 1):
        run = measure_bare(scratch / f"r{n}-bare", bare_pool, args)
        record["ingest"].append({"scenario": "bare", "round": n, **run})
        bare_rates.append(run["load"]["rps"])
        _say(_describe(f"round {n} bare", run))
        pool_size = _kamiyo_pool_size(run["load"]["rps"], args)

        db = scratch / f"r{n}-sqlite"
        run = measure_kamiyo(db, f"sqlite:///{db / 'kamiyo.db'}", args, pool_size=pool_size)
        record["ingest"].append({"scenario": "sqlite", "round": n, **run})
        _say(_describe(f"round {n} kamiyo SQLite", run))

        if not args.no_worker_run:
            db = scratch / f"r{n}-sqlite-worker"
            run = measure_kamiyo(db, f"sqlite:///{db / 'kamiyo.db'}", args, pool_size=pool_size, worker=True)
            record["ingest"].append({"scenario": "sqlite_worker", "round": n, **run})
            drains.append(run["drain"])
            _say(_describe(f"round {n} kamiyo SQLite + in-process worker", run) + f"; drain {run.get('drain')}")

        if use_pg:
            with throwaway_postgres(PG_ADMIN_URL) as url:
                run = measure_kamiyo(scratch / f"r{n}-pg", url, args, pool_size=pool_size)
            record["ingest"].append({"scenario": "postgres", "round": n, **run})
            _say(_describe(f"round {n} kamiyo PostgreSQL", run))

    if drains:  # the run that left the most pending when its load stopped
        record["post_load_drain"] = max(drains, key=lambda drain: drain["backlog_at_end"])

    if not args.no_apply:
        targets = [("SQLite", None)] + ([("PostgreSQL", PG_ADMIN_URL)] if use_pg else [])
        for name, admin in targets:
            _say(f"apply: {args.apply_events:,} pending events on {name}")
            try:
                if admin is None:
                    where = scratch / "apply-sqlite"
                    result = drain_backlog(
                        f"sqlite:///{where / 'kamiyo.db'}",
                        args.apply_events,
                        where,
                        secret=SECRET,
                        timeout=args.apply_timeout,
                    )
                else:
                    with throwaway_postgres(admin) as url:
                        result = drain_backlog(
                            url, args.apply_events, scratch / "apply-pg", secret=SECRET, timeout=args.apply_timeout
                        )
            except Exception as exc:
                result = {"error": f"{exc.__class__.__name__}: {exc}"}
            record["apply"][name] = result
            _say(f"apply {name}: {result}")

    if args.profile:
        db = scratch / "profile"
        out = RESULTS / f"profile-{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}.txt"
        RESULTS.mkdir(parents=True, exist_ok=True)
        pool_size = _kamiyo_pool_size(max(bare_rates), args)
        run = measure_kamiyo(db, f"sqlite:///{db / 'kamiyo.db'}", args, pool_size=pool_size, profile_to=out)
        record["profile"] = {"load": run["load"], "output": run.get("profile")}
        _say(f"profiled run (not in the table): {_describe('kamiyo SQLite under py-spy', run)} -> {run.get('profile')}")


if __name__ == "__main__":
    sys.exit(main())
