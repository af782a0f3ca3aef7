"""Webhook ingest throughput with metrics on versus off, side by side.

    .venv/bin/python bench/metrics_overhead.py               # 5 rounds x 8 s, SQLite
    .venv/bin/python bench/metrics_overhead.py --postgres    # PostgreSQL as well
    .venv/bin/python bench/metrics_overhead.py --quick       # 1 round x 5 s: a smoke run

The load is bench/run.py's: ``wrk`` at concurrency 32 replaying deliveries signed just before
the run (5% re-deliveries), ``kamiyo serve`` with the in-process worker off, a fresh database per
run. Three variants per round, on the same machine in the same minute:

- ``off``: ``METRICS_ENABLED=false`` (no Prometheus counting, no delivery stats);
- ``on``: the default (Prometheus counters and histograms in the server's process, per-minute
  delivery counts gathered by the inbox writer and written at most once a second);
- ``on, multiprocess``: as ``on`` with ``PROMETHEUS_MULTIPROC_DIR`` set (counters in mmap files).

The order of the variants flips every round, so a machine that slows down or speeds up over the
run does not favour one. Each round's ratio is on/off of that round; the verdict uses the median
ratio (the target: at least 0.95, i.e. metrics cost at most 5%). Results go to
``bench/results/metrics-overhead-<time>.json``; the Markdown for docs/PERFORMANCE.md is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from deliveries import PRICE_TIERS, write_pool
from loadgen import INSTALL_HINT, run_wrk, wrk_path, wrk_version
from servers import kamiyo_server, kamiyo_upgrade, postgres_reachable, throwaway_postgres

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
SECRET = "whsec_benchmark0123456789abcdefABCDEF"
PG_ADMIN_URL = os.environ.get("KAMIYO_BENCH_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
VARIANTS = ("off", "on", "on, multiprocess")
TARGET = 0.95


def _options(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--duration", type=float, default=8.0, help="seconds of load per measured run (8)")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of warm-up before each run (2)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of the three variants (5)")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--pool", type=int, default=200_000, help="signed deliveries per measured run (200,000)")
    parser.add_argument("--postgres", action="store_true", help="also run every variant on PostgreSQL")
    parser.add_argument("--quick", action="store_true", help="1 round of 5 s")
    args = parser.parse_args(argv)
    if args.quick:
        args.duration, args.rounds = 5.0, 1
    return args


def _settings(database_url: str, variant: str, scratch: Path) -> dict[str, str]:
    settings = {
        "STRIPE_WEBHOOK_SECRET": SECRET,
        "STRIPE_PRICE_TIERS": PRICE_TIERS,
        "DATABASE_URL": database_url,
        "WORKER_IN_PROCESS": "false",
        "METRICS_ENABLED": "false" if variant == "off" else "true",
    }
    if variant == "on, multiprocess":
        directory = scratch / "prometheus-multiproc"
        shutil.rmtree(directory, ignore_errors=True)  # a fresh directory, as at every deploy
        directory.mkdir(parents=True)
        settings["PROMETHEUS_MULTIPROC_DIR"] = str(directory)
    return settings


def measure(workdir: Path, database_url: str, variant: str, args: argparse.Namespace) -> dict[str, Any]:
    settings = _settings(database_url, variant, workdir)
    kamiyo_upgrade(workdir, settings)
    tag = secrets.token_hex(3)
    with kamiyo_server(workdir, settings) as server:
        url = server.url + "/api/v1/payments/webhook"
        common = {"connections": args.connections, "threads": args.threads, "stop_at_end": True}
        warm_pool = write_pool(workdir, "warmup", 20_000, secret=SECRET, id_prefix=f"{tag}w", seed=2)
        run_wrk(url, warm_pool, workdir, label="warmup", duration=args.warmup, **common)
        pool = write_pool(workdir, "measured", args.pool, secret=SECRET, id_prefix=f"{tag}m", seed=3)
        cpu_before = _cpu_seconds(server.pid)
        load = run_wrk(url, pool, workdir, label="measured", duration=args.duration, **common)
        cpu = _cpu_seconds(server.pid) - cpu_before
        metrics_page = None
        if variant != "off":
            import urllib.request

            with urllib.request.urlopen(server.url + "/metrics", timeout=10) as answer:
                metrics_page = answer.read().decode()
    summary = load.summary()
    return {
        "variant": variant,
        "load": summary,
        # CPU time of the server process per answered request: unlike req/s, barely moved by
        # whatever else runs on a shared machine.
        "cpu_us_per_request": round(cpu / max(load.requests, 1) * 1e6, 1),
        "attempts_counted": _attempts(metrics_page) if metrics_page else None,
    }


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (and its reaped children), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = sum(int(v) for v in fields[11:15])  # utime, stime, cutime, cstime
    return ticks / os.sysconf("SC_CLK_TCK")


def _attempts(page: str) -> float | None:
    for line in page.splitlines():
        if line.startswith("webhook_attempts_total "):
            return float(line.split()[1])
    return None


def _say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def _markdown(record: dict[str, Any]) -> str:
    lines = [
        f"Measured {record['started_at']} with `{record['command']}` "
        f"({record['machine']['nproc']} cores, wrk {record['machine']['wrk']}, "
        f"{record['options']['rounds']} rounds x {record['options']['duration']:.0f} s, "
        f"{record['options']['connections']} connections, in-process worker off).",
        "",
        "| database | round | off req/s | on req/s | on, multiprocess req/s | on/off | multiprocess/off "
        "| CPU µs/request off / on / multiprocess |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for backend, rounds in record["results"].items():
        for n, runs in enumerate(rounds, start=1):
            rps = {run["variant"]: run["load"]["rps"] for run in runs}
            cpu = {run["variant"]: run["cpu_us_per_request"] for run in runs}
            lines.append(
                f"| {backend} | {n} | {rps['off']:,.0f} | {rps['on']:,.0f} | {rps['on, multiprocess']:,.0f} "
                f"| {rps['on'] / rps['off']:.3f} | {rps['on, multiprocess'] / rps['off']:.3f} "
                f"| {cpu['off']} / {cpu['on']} / {cpu['on, multiprocess']} |"
            )
    lines.append("")
    for backend, verdict in record["verdict"].items():
        lines.append(
            f"- {backend}: median on/off {verdict['median_on_over_off']:.3f}, multiprocess/off "
            f"{verdict['median_multiprocess_over_off']:.3f} (target ≥ {TARGET}): "
            f"{'within' if verdict['within_target'] else 'NOT within'} 5%; "
            f"p99 latency off {verdict['p99_ms_off']:.1f} ms, on {verdict['p99_ms_on']:.1f} ms; server CPU per "
            f"request off {verdict['cpu_us_off']:.1f} µs, on {verdict['cpu_us_on']:.1f} µs, "
            f"multiprocess {verdict['cpu_us_multiprocess']:.1f} µs "
            f"(medians); load average {record['machine']['loadavg_start'][0]:.1f} at the start, "
            f"{record['machine']['loadavg_end'][0]:.1f} at the end"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = _options(argv)
    if wrk_path() is None:
        print(f"bench: {INSTALL_HINT}", file=sys.stderr)
        return 2
    os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)  # only the multiprocess variant sets it
    backends = ["sqlite"]
    if args.postgres:
        problem = postgres_reachable(PG_ADMIN_URL)
        if problem:
            print(f"bench: PostgreSQL unreachable: {problem}", file=sys.stderr)
            return 2
        backends.append("postgres")
    command = shlex.join([".venv/bin/python", "bench/metrics_overhead.py", *(sys.argv[1:] if argv is None else argv)])
    record: dict[str, Any] = {
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": command,
        "options": {k: getattr(args, k) for k in ("duration", "warmup", "rounds", "connections", "threads", "pool")},
        "machine": {"nproc": os.cpu_count(), "wrk": wrk_version(), "loadavg_start": os.getloadavg()},
        "results": {},
        "verdict": {},
    }
    # Not kamiyo-bench-*: a clean-up of bench/run.py's stale scratch directories once took one mid-run.
    scratch = Path(tempfile.mkdtemp(prefix="kamiyo-metrics-overhead-"))
    try:
        for backend in backends:
            rounds: list[list[dict[str, Any]]] = []
            for n in range(1, args.rounds + 1):
                order = VARIANTS if n % 2 else tuple(reversed(VARIANTS))
                runs = []
                for variant in order:
                    where = scratch / f"{backend}-r{n}-{variant.replace(', ', '-')}"
                    if backend == "sqlite":
                        run = measure(where, f"sqlite:///{where / 'kamiyo.db'}", variant, args)
                    else:
                        with throwaway_postgres(PG_ADMIN_URL) as url:
                            run = measure(where, url, variant, args)
                    load = run["load"]
                    _say(
                        f"{backend} round {n} metrics {variant}: {load['rps']:,.0f} req/s, "
                        f"p99 {load['latency_ms']['p99']} ms, non-2xx {load['non_2xx']}"
                        + (" (pool exhausted: raise --pool)" if load["pool_exhausted"] else "")
                    )
                    runs.append(run)
                rounds.append(sorted(runs, key=lambda r: VARIANTS.index(r["variant"])))
            record["results"][backend] = rounds

            def rps(runs: list[dict[str, Any]], variant: str) -> float:
                return float(next(r["load"]["rps"] for r in runs if r["variant"] == variant))

            def p99(variant: str, rounds: list[list[dict[str, Any]]] = rounds) -> float:
                return float(
                    statistics.median(
                        next(r["load"]["latency_ms"]["p99"] for r in runs if r["variant"] == variant) for runs in rounds
                    )
                )

            on = statistics.median(rps(runs, "on") / rps(runs, "off") for runs in rounds)
            multi = statistics.median(rps(runs, "on, multiprocess") / rps(runs, "off") for runs in rounds)
            record["verdict"][backend] = {
                "median_on_over_off": round(on, 4),
                "median_multiprocess_over_off": round(multi, 4),
                "within_target": on >= TARGET and multi >= TARGET,
                "p99_ms_off": p99("off"),
                "p99_ms_on": p99("on"),
                **{
                    f"cpu_us_{name}": statistics.median(
                        next(r["cpu_us_per_request"] for r in runs if r["variant"] == variant) for runs in rounds
                    )
                    for name, variant in (("off", "off"), ("on", "on"), ("multiprocess", "on, multiprocess"))
                },
            }
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    record["machine"]["loadavg_end"] = os.getloadavg()
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    (RESULTS / f"metrics-overhead-{stamp}.json").write_text(json.dumps(record, indent=2, default=str))
    print()
    print(_markdown(record))
    return 0 if all(v["within_target"] for v in record["verdict"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
