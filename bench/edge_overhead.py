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

Each round's ratio is this/base of that round; the verdict uses the median. On a shared machine
req/s moves with the neighbours far more than by a few percent, so a third measure comes first:

- ``in process``: the event loop's CPU time per webhook request, this checkout's endpoint (a
  writer that answers at once, no database) behind uvicorn's protocol and behind the bounded one,
  fed the same signed deliveries through a transport that discards what is written; both
  alternate in one process, and the fastest of 25 runs of each counts (the least disturbed).

Results go to ``bench/results/edge-overhead-<time>.json``; the Markdown for docs/PERFORMANCE.md
is printed.
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


def _load(server: Server, url: str, workdir: Path, args: argparse.Namespace, *, bare: bool) -> dict[str, Any]:
    # The bare app ignores event ids: its pool starts over when used up (as in bench/run.py).
    common: dict[str, Any] = {"connections": args.connections, "threads": 1, "stop_at_end": not bare}
    tag = secrets.token_hex(3)
    warm_pool = write_pool(workdir, "warmup", 20_000, secret=SECRET, id_prefix=f"{tag}w", seed=2)
    run_wrk(url, warm_pool, workdir, label="warmup", duration=args.warmup, **common)
    size = 20_000 if bare else args.pool
    pool = write_pool(workdir, "measured", size, secret=SECRET, id_prefix=f"{tag}m", seed=3)
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
            return _load(server, server.url + "/", workdir, args, bare=True)
    settings = {
        "STRIPE_WEBHOOK_SECRET": SECRET,
        "STRIPE_PRICE_TIERS": PRICE_TIERS,
        "DATABASE_URL": f"sqlite:///{workdir / 'kamiyo.db'}",
        "WORKER_IN_PROCESS": "false",
    }
    command = [str(args.base / ".venv" / "bin" / "kamiyo")] if variant == "base" else None
    kamiyo_upgrade(workdir, settings, command)
    with kamiyo_server(workdir, settings, command) as server:
        return _load(server, server.url + "/api/v1/payments/webhook", workdir, args, bare=False)


def in_process(workdir: Path, runs: int = 25) -> dict[str, Any]:
    """µs of event-loop CPU per webhook request, uvicorn's protocol against the bounded one."""
    import asyncio

    import uvicorn
    import uvloop
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    from uvicorn.server import ServerState

    from kamiyo.config import Settings
    from kamiyo.web.server import HttpLimits, bounded_protocol
    from kamiyo.web.webhook import WebhookEndpoint

    workdir.mkdir(parents=True, exist_ok=True)
    pool = write_pool(workdir, "in-process", 4000, secret=SECRET, id_prefix="inproc", seed=4)
    data = pool.requests.read_bytes()
    requests, offset = [], 0
    for length in (int(line) for line in pool.index.read_text().split()):
        requests.append(data[offset : offset + length])
        offset += length

    class Writer:
        async def store_event(
            self, envelope: Any, body: bytes, *, status: str, counted: bool = True, detail: str | None = None
        ) -> bool:
            return True

        def count_rejection(self, reason: str, event_type: str = "") -> None:
            pass

    class Transport(asyncio.Transport):
        def write(self, data: Any) -> None:
            pass

        def close(self) -> None:
            pass

        def is_closing(self) -> bool:
            return False

        def pause_reading(self) -> None:
            pass

        def resume_reading(self) -> None:
            pass

        def get_extra_info(self, name: str, default: Any = None) -> Any:
            return {"peername": ("127.0.0.1", 50000), "sockname": ("127.0.0.1", 8000)}.get(name, default)

    settings = Settings(webhook_secrets=(SECRET,), metrics_enabled=False)
    writer = Writer()
    endpoint = WebhookEndpoint(settings, None, lambda: writer)
    config = uvicorn.Config(endpoint, log_config=None, lifespan="off", access_log=False)
    protocols = {"base": HttpToolsProtocol, "this": bounded_protocol(HttpLimits.from_settings(settings))}

    async def run(protocol_class: Any) -> float:
        protocol = protocol_class(config=config, server_state=ServerState(), app_state={})
        protocol.connection_made(Transport())
        started = time.thread_time()
        for request in requests:
            protocol.data_received(request)
            await asyncio.sleep(0)  # the request's task: verify, envelope, store, answer
            await asyncio.sleep(0)
        return (time.thread_time() - started) / len(requests) * 1e6

    async def all_runs() -> dict[str, list[float]]:
        found: dict[str, list[float]] = {"base": [], "this": []}
        for n in range(runs):
            for name in ("base", "this") if n % 2 else ("this", "base"):
                found[name].append(await run(protocols[name]))
        return found

    found = uvloop.run(all_runs())
    return {
        name: {"min_us": round(min(values), 2), "median_us": round(statistics.median(values), 2)}
        for name, values in found.items()
    }


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
    inner = record["in_process"]
    lines += [
        "",
        f"- in process (event-loop CPU per webhook request, fastest of 25 runs; median): uvicorn's protocol "
        f"{inner['base']['min_us']} µs ({inner['base']['median_us']}), bounded {inner['this']['min_us']} µs "
        f"({inner['this']['median_us']}): {inner['this']['min_us'] / inner['base']['min_us'] - 1:+.1%}",
    ]
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
    record["in_process"] = in_process(scratch / "in-process")
    _say(f"in process: {record['in_process']}")
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
