"""What the bounded HTTP edge costs the webhook: side by side, in one run.

    .venv/bin/python bench/edge_overhead.py --base /path/to/a/worktree   # 5 rounds x 8 s
    .venv/bin/python bench/edge_overhead.py --base ... --quick           # 1 round x 5 s: a smoke run

``--base`` is another checkout of kamiyo with its own ``.venv`` (``python -m venv .venv &&
.venv/bin/pip install -e .``), e.g. a worktree of main at the commit to compare with. Two pairs
per round, on the same machine in the same minute, the order flipped every round:

- ``bare``: bench/bare_app.py (reads the body, answers 200) served with uvicorn's own httptools
  protocol, then with kamiyo's bounded one (web/server.py): the protocol's cost alone, against
  the cheapest request there is;
- ``kamiyo``: ``kamiyo serve`` from ``--base``, then from this checkout, each on a fresh SQLite
  database with the in-process worker off, replaying bench/run.py's signed deliveries (wrk at
  concurrency 32, 5% re-deliveries): the webhook's whole path, the protocol and the id check
  included.

Each round's ratio is this/base of that round; the verdict uses the median. Results go to
``bench/results/edge-overhead-<time>.json``; the Markdown for docs/PERFORMANCE.md is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shlex
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from deliveries import PRICE_TIERS, write_pool
from loadgen import INSTALL_HINT, run_wrk, wrk_path, wrk_version
from servers import Server, bare_server, kamiyo_server, kamiyo_upgrade

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
SECRET = "whsec_benchmark0123456789abcdefABCDEF"


def _options(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--base", type=Path, required=True, help="a kamiyo checkout with its own .venv")
    parser.add_argument("--duration", type=float, default=8.0, help="seconds of load per measured run (8)")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of warm-up before each run (2)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of both pairs (5)")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--pool", type=int, default=200_000, help="signed deliveries per measured run (200,000)")
    parser.add_argument("--quick", action="store_true", help="1 round of 5 s")
    args = parser.parse_args(argv)
    if args.quick:
        args.duration, args.rounds = 5.0, 1
    return args


def _load(server: Server, url: str, workdir: Path, args: argparse.Namespace) -> dict[str, Any]:
    common: dict[str, Any] = {"connections": args.connections, "threads": 1, "stop_at_end": True}
    tag = secrets.token_hex(3)
    warm_pool = write_pool(workdir, "warmup", 20_000, secret=SECRET, id_prefix=f"{tag}w", seed=2)
    run_wrk(url, warm_pool, workdir, label="warmup", duration=args.warmup, **common)
    pool = write_pool(workdir, "measured", args.pool, secret=SECRET, id_prefix=f"{tag}m", seed=3)
    loop_before, rest_before = server.cpu_seconds()
    load = run_wrk(url, pool, workdir, label="measured", duration=args.duration, **common)
    loop_after, rest_after = server.cpu_seconds()
    answered = max(load.requests, 1)
    return {
        "rps": round(load.rps, 1),
        "p50_ms": round(load.latency_us.get("p50", 0) / 1000, 2),
        "p99_ms": round(load.latency_us.get("p99", 0) / 1000, 2),
        "errors": load.errors,
        # CPU per answered request: the event loop's thread (where the protocol runs), and the rest.
        "loop_cpu_us": round((loop_after - loop_before) / answered * 1e6, 1),
        "other_cpu_us": round((rest_after - rest_before) / answered * 1e6, 1),
    }


def measure(workdir: Path, pair: str, variant: str, args: argparse.Namespace) -> dict[str, Any]:
    if pair == "bare":
        with bare_server(workdir, "httptools" if variant == "base" else "bounded") as server:
            return _load(server, server.url + "/", workdir, args)
    settings = {
        "STRIPE_WEBHOOK_SECRET": SECRET,
        "STRIPE_PRICE_TIERS": PRICE_TIERS,
        "DATABASE_URL": f"sqlite:///{workdir / 'kamiyo.db'}",
        "WORKER_IN_PROCESS": "false",
    }
    command = [str(args.base / ".venv" / "bin" / "kamiyo")] if variant == "base" else None
    kamiyo_upgrade(workdir, settings, command)
    with kamiyo_server(workdir, settings, command) as server:
        return _load(server, server.url + "/api/v1/payments/webhook", workdir, args)


def _say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def _markdown(record: dict[str, Any]) -> str:
    lines = [
        f"Measured {record['started_at']} with `{record['command']}` (base: {record['base']}; "
        f"{record['machine']['nproc']} cores, wrk {record['machine']['wrk']}, {record['options']['rounds']} rounds x "
        f"{record['options']['duration']:.0f} s, {record['options']['connections']} connections; load average "
        f"{record['machine']['loadavg_start'][0]:.1f} at the start, "
        f"{record['machine']['loadavg_end'][0]:.1f} at the end).",
        "",
        "| pair | round | base req/s | this req/s | this/base | p99 base / this | loop CPU µs/request base / this |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for pair, rounds in record["results"].items():
        for n, runs in enumerate(rounds, start=1):
            base, this = runs["base"], runs["this"]
            lines.append(
                f"| {pair} | {n} | {base['rps']:,.0f} | {this['rps']:,.0f} | {this['rps'] / base['rps']:.3f} "
                f"| {base['p99_ms']} / {this['p99_ms']} ms | {base['loop_cpu_us']} / {this['loop_cpu_us']} |"
            )
    lines.append("")
    for pair, verdict in record["verdict"].items():
        lines.append(
            f"- {pair}: median this/base {verdict['median_ratio']:.3f} (rounds {verdict['ratios']}); event-loop CPU "
            f"per request, medians: base {verdict['loop_cpu_us_base']} µs, this {verdict['loop_cpu_us_this']} µs"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = _options(argv)
    if wrk_path() is None:
        print(f"bench: {INSTALL_HINT}", file=sys.stderr)
        return 2
    if not (args.base / ".venv" / "bin" / "kamiyo").exists():
        print(f"bench: no {args.base}/.venv/bin/kamiyo (make a venv there and pip install -e it)", file=sys.stderr)
        return 2
    command = shlex.join([".venv/bin/python", "bench/edge_overhead.py", *(sys.argv[1:] if argv is None else argv)])
    record: dict[str, Any] = {
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": command,
        "base": str(args.base),
        "options": {k: getattr(args, k) for k in ("duration", "warmup", "rounds", "connections", "pool")},
        "machine": {"nproc": os.cpu_count(), "wrk": wrk_version(), "loadavg_start": _loadavg()},
        "results": {"bare": [], "kamiyo": []},
        "verdict": {},
    }
    scratch = Path(tempfile.mkdtemp(prefix="kamiyo-edge-overhead-"))
    for n in range(1, args.rounds + 1):
        order = ("base", "this") if n % 2 else ("this", "base")
        for pair in ("bare", "kamiyo"):
            runs = {}
            for variant in order:
                run = measure(scratch / f"{pair}-r{n}-{variant}", pair, variant, args)
                _say(
                    f"round {n} {pair} {variant}: {run['rps']:,.0f} req/s, p99 {run['p99_ms']} ms, "
                    f"loop {run['loop_cpu_us']} µs/request"
                )
                runs[variant] = run
            record["results"][pair].append(runs)
    for pair, rounds in record["results"].items():
        ratios = [round(r["this"]["rps"] / r["base"]["rps"], 3) for r in rounds]
        record["verdict"][pair] = {
            "ratios": ratios,
            "median_ratio": statistics.median(ratios),
            "loop_cpu_us_base": statistics.median(r["base"]["loop_cpu_us"] for r in rounds),
            "loop_cpu_us_this": statistics.median(r["this"]["loop_cpu_us"] for r in rounds),
        }
    record["machine"]["loadavg_end"] = _loadavg()
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"edge-overhead-{record['started_at'].replace(':', '')}.json"
    out.write_text(json.dumps(record, indent=2))
    print(_markdown(record))
    print(f"\n(results: {out})")
    return 0


def _loadavg() -> tuple[float, float, float]:
    return os.getloadavg()


if __name__ == "__main__":
    sys.exit(main())
