"""Apply as an operator sees it: a backlog ingested through the endpoint, drained by ``kamiyo worker``.

    .venv/bin/python bench/drain.py --base ../bench-base11               # both databases, 1 and 2 workers
    .venv/bin/python bench/drain.py --base ../bench-base11 --rounds 1 --events 10000 --backends sqlite

``--base`` is another checkout with its own ``.venv`` (``make install`` there); without it only
this checkout is measured. Every figure is measured for the base and for this checkout in the
same run, alternating (which goes first alternates from one pair to the next): the machine is
shared, so the ratio within a pair says more than either figure alone.

One measurement, all of it through the checkout's own ``kamiyo`` (its ``.venv/bin/kamiyo``):

1. A fresh database (SQLite file, or a throwaway PostgreSQL database), ``kamiyo db upgrade``.
2. ``kamiyo serve`` with ``WORKER_IN_PROCESS=false`` (nothing applies); ``wrk`` at concurrency
   32 posts ``--events`` realistic deliveries (bench/backlog.py's mix: per customer a
   subscription created, its first invoice paid, the subscription updated, the next invoice paid
   or failed; customers interleaved), each signed just before, each once. Every one must be
   answered 2xx and be pending in the inbox; the server is then stopped.
3. ``--workers`` ``kamiyo worker`` processes start together (service defaults: batch of 200,
   one log line per event, written to a file). The inbox is polled every 50 ms until no event
   is pending. The drain time runs from the first applied event (the smallest ``processed_at``)
   to the poll that found the backlog empty; events/s is the backlog over that time. The
   workers' start (imports, connecting) is therefore not counted. Worker CPU (user + system,
   all workers, from /proc) is per event over the same span, roughly: from the first poll that
   saw an event applied; on PostgreSQL, so is the CPU of the server's backends serving the
   benchmark's database (found by their process title), the poll's own left out.

Results go to ``bench/results/drain-<time>.json``; a Markdown table is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, func, select, text

from backlog import backlog_events
from deliveries import PRICE_TIERS, write_bodies
from kamiyo.db.models import events_table, users_table
from loadgen import run_wrk
from servers import checkout_kamiyo, kamiyo_env, kamiyo_server, kamiyo_upgrade, throwaway_postgres

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
SECRET = "whsec_benchmark0123456789abcdefABCDEF"
PG_ADMIN_URL = os.environ.get("KAMIYO_BENCH_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
POLL_SECONDS = 0.05
_events = events_table


def _options() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--base", type=Path, help="the other checkout (with its .venv); without it, this one only")
    parser.add_argument("--this", type=Path, default=ROOT, help="the checkout measured as 'this' (this one)")
    parser.add_argument("--events", type=int, default=30_000, help="backlog size, a multiple of 4 (30,000)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker processes (1 2)")
    parser.add_argument("--backends", nargs="+", choices=("postgres", "sqlite"), default=["postgres", "sqlite"])
    parser.add_argument("--rounds", type=int, default=2, help="pairs per database and worker count (2)")
    parser.add_argument("--timeout", type=float, default=300.0, help="give up on a drain after this long (300 s)")
    parser.add_argument("--connections", type=int, default=32, help="wrk's concurrency while ingesting (32)")
    return parser.parse_args()


def _say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


@contextmanager
def _database(backend: str, workdir: Path) -> Iterator[str]:
    if backend == "sqlite":
        yield f"sqlite:///{workdir / 'kamiyo.db'}"
    else:
        with throwaway_postgres(PG_ADMIN_URL) as url:
            yield url


def _ingest(command: list[str], workdir: Path, settings: dict[str, str], bodies: list[bytes], connections: int) -> Any:
    """Post every body through ``kamiyo serve`` (no worker) until all are stored; return wrk's result."""
    engine = create_engine(settings["DATABASE_URL"])
    stored = select(func.count()).select_from(_events)

    def all_stored() -> bool:
        with engine.connect() as connection:
            return int(connection.execute(stored).scalar_one()) >= len(bodies)

    try:
        with kamiyo_server(workdir, {**settings, "WORKER_IN_PROCESS": "false"}, command) as server:
            pool = write_bodies(workdir, "backlog", bodies, secret=SECRET)
            load = run_wrk(
                server.url + "/api/v1/payments/webhook",
                pool,
                workdir,
                label="ingest",
                duration=180,
                connections=connections,
                threads=1,
                stop_at_end=True,
                stop_when=all_stored,
            )
            server.stop()
    finally:
        engine.dispose()
    return load


def _cpu_seconds(pids: list[int]) -> float:
    return sum(_cpu_by_pid(pids).values())


def _cpu_by_pid(pids: list[int]) -> dict[int, float]:
    """User + system CPU seconds of each process still there."""
    found = {}
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        found[pid] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return found


def _database_backends(database: str, besides: int) -> list[int]:
    """PostgreSQL's backend processes serving ``database`` (their title names it), but ``besides``."""
    pids = []
    needle = f" {database} ".encode()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != besides:
            try:
                if needle in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def _utc_seconds(value: Any) -> float:
    """A stored ``processed_at`` as a POSIX time (SQLite gives it back without its zone: UTC)."""
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return float(value.timestamp())


def _drain(
    command: list[str], workdir: Path, settings: dict[str, str], database_url: str, workers: int, timeout: float
) -> dict[str, Any]:
    """Start ``workers`` ``kamiyo worker`` processes; time them emptying the backlog; stop them."""
    engine = create_engine(database_url, pool_size=1)
    pending = select(func.count()).select_from(_events).where(_events.c.status == "pending")
    processes: list[subprocess.Popen[bytes]] = []
    postgres = engine.dialect.name == "postgresql"
    server_at_first: dict[int, float] = {}
    server_cpu: float | None = None
    try:
        with engine.connect() as connection:
            backlog = int(connection.execute(pending).scalar_one())
            # The poll's own backend is left out of the database server's CPU (one pooled connection).
            poller = int(connection.execute(text("SELECT pg_backend_pid()")).scalar_one()) if postgres else 0
        env = kamiyo_env(settings)
        for n in range(workers):
            with (workdir / f"worker-{n}.log").open("ab") as log:
                processes.append(
                    subprocess.Popen([*command, "worker"], cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT)
                )
        pids = [p.pid for p in processes]
        started = time.time()
        cpu_at_first: float | None = None
        emptied: float | None = None
        left = backlog
        while time.time() - started < timeout:
            with engine.connect() as connection:
                left = int(connection.execute(pending).scalar_one())
            now = time.time()
            if cpu_at_first is None and left < backlog:
                cpu_at_first = _cpu_seconds(pids)
                if postgres:
                    server_at_first = _cpu_by_pid(_database_backends(engine.url.database or "", poller))
            if left == 0:
                emptied = now
                break
            if any(p.poll() is not None for p in processes):
                raise RuntimeError(f"a worker exited early; see {workdir}/worker-*.log")
            time.sleep(POLL_SECONDS)
        cpu_at_end = _cpu_seconds(pids)
        if postgres:
            at_end = _cpu_by_pid(_database_backends(engine.url.database or "", poller))
            server_cpu = sum(cpu - server_at_first.get(pid, 0.0) for pid, cpu in at_end.items())
    finally:
        for process in processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
    try:
        with engine.connect() as connection:
            span = select(func.min(_events.c.processed_at), func.max(_events.c.processed_at))
            first, last = connection.execute(span).one()
            by_status = select(_events.c.status, func.count()).group_by(_events.c.status)
            statuses = {str(status): int(n) for status, n in connection.execute(by_status)}
            users = int(connection.execute(select(func.count()).select_from(users_table)).scalar_one())
    finally:
        engine.dispose()
    result: dict[str, Any] = {"backlog": backlog, "statuses": statuses, "users": users, "still_pending": left}
    if first is None:
        return {**result, "drained": False}
    first_s = _utc_seconds(first)
    result["span_processed_at_s"] = round(_utc_seconds(last) - first_s, 3)
    if emptied is None:
        done = backlog - left
        return {**result, "drained": False, "events_per_s": round(done / (time.time() - first_s), 1)}
    seconds = emptied - first_s
    cpu = cpu_at_end - (cpu_at_first if cpu_at_first is not None else 0.0)
    return {
        **result,
        "drained": True,
        "drain_s": round(seconds, 3),
        "events_per_s": round(backlog / seconds, 1),
        "worker_cpu_us_per_event": round(cpu / backlog * 1e6, 1),
        # PostgreSQL's backends for this database (the workers' connections), same span.
        "database_cpu_us_per_event": round(server_cpu / backlog * 1e6, 1) if server_cpu is not None else None,
    }


def measure(
    name: str, command: list[str], backend: str, workers: int, workdir: Path, args: argparse.Namespace
) -> dict[str, Any]:
    workdir.mkdir(parents=True, exist_ok=True)
    bodies = backlog_events(args.events)
    with _database(backend, workdir) as database_url:
        settings = {"STRIPE_WEBHOOK_SECRET": SECRET, "STRIPE_PRICE_TIERS": PRICE_TIERS, "DATABASE_URL": database_url}
        kamiyo_upgrade(workdir, settings, command)
        load = _ingest(command, workdir, settings, bodies, args.connections)
        if load.non_2xx or load.socket_errors:
            raise RuntimeError(f"{name}: ingest incomplete: {load.summary()}")
        drained = _drain(command, workdir, settings, database_url, workers, args.timeout)
    if drained["backlog"] != len(bodies):
        raise RuntimeError(f"{name}: {drained['backlog']} pending after ingest, {len(bodies)} posted")
    return {
        "version": name,
        "backend": backend,
        "workers": workers,
        "ingest_rps": round(load.rps, 1),
        "loadavg": round(os.getloadavg()[0], 2),
        **drained,
    }


def _summary(runs: list[dict[str, Any]], args: argparse.Namespace, versions: list[str]) -> list[dict[str, Any]]:
    rows = []
    for backend in args.backends:
        for version in versions:
            row: dict[str, Any] = {"backend": backend, "version": version}
            for workers in args.workers:
                rates = [
                    r["events_per_s"]
                    for r in runs
                    if r["backend"] == backend and r["version"] == version and r["workers"] == workers
                ]
                row[f"{workers}w"] = round(statistics.median(rates)) if rates else None
                row[f"{workers}w_all"] = rates
            if 1 in args.workers and 2 in args.workers and row["1w"]:
                row["2w_over_1w"] = round(row["2w"] / row["1w"], 2)
            rows.append(row)
    return rows


def main() -> int:
    args = _options()
    versions = {"this": checkout_kamiyo(args.this)}
    if args.base is not None:
        versions = {"base": checkout_kamiyo(args.base), **versions}
    names = list(versions)
    runs: list[dict[str, Any]] = []
    started = datetime.now(UTC)
    with tempfile.TemporaryDirectory(prefix="kamiyo-drain-") as scratch:
        pair = 0
        for round_ in range(args.rounds):
            for backend in args.backends:
                for workers in args.workers:
                    order = names if pair % 2 == 0 else names[::-1]
                    pair += 1
                    for name in order:
                        workdir = Path(scratch) / f"{backend}-{workers}w-{round_}-{name}"
                        result = measure(name, versions[name], backend, workers, workdir, args)
                        result["round"] = round_
                        runs.append(result)
                        _say(json.dumps(result))
    summary = _summary(runs, args, names)
    report = {
        "started_at": started.isoformat(timespec="seconds"),
        "options": {k: str(v) for k, v in vars(args).items()},
        "base": str(args.base.resolve()) if args.base else None,
        "this": str(args.this.resolve()),
        "runs": runs,
        "summary": summary,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"drain-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(report, indent=2))
    print()
    heads = [f"{n} worker{'s' if n > 1 else ''} (events/s, median)" for n in args.workers]
    print("| database | version | " + " | ".join(heads) + " | 2 / 1 |")
    print("|---|---|" + "---:|" * (len(heads) + 1))
    for row in summary:
        cells = [f"{row[f'{n}w']:,}" if row[f"{n}w"] is not None else "-" for n in args.workers]
        print(f"| {row['backend']} | {row['version']} | " + " | ".join(cells) + f" | {row.get('2w_over_1w', '-')} |")
    _say(f"written to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
