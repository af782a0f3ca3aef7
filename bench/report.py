"""Figures of one benchmark run: the console table, and the Markdown block of docs/PERFORMANCE.md."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

BEGIN = "<!-- bench:results:begin -->"
END = "<!-- bench:results:end -->"

SCENARIOS = (
    ("bare", "bare ASGI app (reads the body, answers 200)"),
    ("sqlite", "kamiyo, SQLite, ingest only (`WORKER_IN_PROCESS=false`)"),
    ("sqlite_worker", "kamiyo, SQLite, in-process worker applying meanwhile"),
    ("postgres", "kamiyo, PostgreSQL, ingest only"),
)


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def aggregate(record: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per scenario: medians over its runs, and the ratio to the bare app of the same round."""
    runs: list[dict[str, Any]] = record["ingest"]
    bare_by_round = {run["round"]: run["load"]["rps"] for run in runs if run["scenario"] == "bare"}
    bare_median = _median(list(bare_by_round.values()))
    bare_cpu = _median([_cpu_per_request(run) for run in runs if run["scenario"] == "bare"])
    out: dict[str, dict[str, Any]] = {}
    for scenario, title in SCENARIOS:
        mine = [run for run in runs if run["scenario"] == scenario]
        if not mine:
            continue
        rps = [run["load"]["rps"] for run in mine]
        ratios = []
        for run in mine:
            paired = bare_by_round.get(run["round"]) or bare_median
            if paired:
                ratios.append(run["load"]["rps"] / paired)
        out[scenario] = {
            "title": title,
            "runs": len(mine),
            "rps": _median(rps),
            "rps_min": min(rps),
            "rps_max": max(rps),
            "p50_ms": _median([run["load"]["latency_ms"]["p50"] for run in mine]),
            "p99_ms": _median([run["load"]["latency_ms"]["p99"] for run in mine]),
            "ratio": _median(ratios) if scenario != "bare" else 1.0,
            "cpu_main_us": _median([run["load"]["server_cpu"].get("main_thread_us_per_request", 0) for run in mine]),
            "cpu_other_us": _median([run["load"]["server_cpu"].get("other_threads_us_per_request", 0) for run in mine]),
            "cores_busy": _median([run["load"]["server_cpu"].get("cores_busy", 0) for run in mine]),
            # bare's CPU per request over this one's: the share of bare's rate it would reach if both
            # were purely CPU-bound on the same cores. Steadier than req/s on a busy machine.
            "cpu_ratio": (bare_cpu / mine_cpu)
            if bare_cpu and (mine_cpu := _median([_cpu_per_request(run) for run in mine]))
            else None,
            "non_2xx": sum(run["load"]["non_2xx"] for run in mine),
            "socket_errors": sum(sum(v for k, v in run["load"]["errors"].items() if k != "status") for run in mine),
            "missing": sum(run["durability"]["missing"] for run in mine if run.get("durability")),
            "acked": sum(run["durability"]["acknowledged_distinct"] for run in mine if run.get("durability")),
            "stored": sum(run["durability"]["stored_rows"] for run in mine if run.get("durability")),
            "duplicate_share": _median(
                [
                    run["load"]["acknowledged_duplicate_answers"] / run["load"]["acknowledged_2xx_answers"]
                    for run in mine
                    if run.get("durability") and run["load"]["acknowledged_2xx_answers"]
                ]
            ),
            "exhausted": any(run["load"]["pool_exhausted"] for run in mine),
        }
    return out


def _cpu_per_request(run: dict[str, Any]) -> float:
    cpu = run["load"].get("server_cpu") or {}
    return float(cpu.get("main_thread_us_per_request", 0) + cpu.get("other_threads_us_per_request", 0))


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.1f}%"


def _num(value: float | None, digits: int = 0) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}"


def console_table(record: dict[str, Any]) -> str:
    figures = aggregate(record)
    lines = [
        f"{'scenario':<16} {'runs':>4} {'req/s':>9} {'min..max':>17} {'p50 ms':>7} {'p99 ms':>7} {'vs bare':>8}"
        f" {'non-2xx':>7} {'missing':>7} {'CPU µs/req main+other':>22} {'cores':>5} {'CPU vs bare':>11}",
    ]
    for scenario, row in figures.items():
        spread = f"{_num(row['rps_min'])}..{_num(row['rps_max'])}"
        ratio = f"{row['ratio'] * 100:.1f}%" if row["ratio"] is not None else "-"
        missing = "-" if scenario == "bare" else str(row["missing"])
        lines.append(
            f"{scenario:<16} {row['runs']:>4} {_num(row['rps']):>9} {spread:>17} {_num(row['p50_ms'], 2):>7}"
            f" {_num(row['p99_ms'], 2):>7} {ratio:>8} {row['non_2xx']:>7} {missing:>7}"
            f" {_num(row['cpu_main_us']) + ' + ' + _num(row['cpu_other_us']):>22} {_num(row['cores_busy'], 2):>5}"
            f" {_percent(row['cpu_ratio']):>11}"
        )
    for name, apply in record.get("apply", {}).items():
        if "error" in apply:
            lines.append(f"apply {name:<10} error: {apply['error']}")
            continue
        how = "drained in" if apply["drained"] else "projected drain"
        lines.append(
            f"apply {name:<10} {apply['events']:,} events, {how} {_num(apply['drain_s'], 2)} s"
            f" = {_num(apply['events_per_s'])} events/s  statuses {apply['statuses']}"
        )
    drain = record.get("post_load_drain")
    if drain:
        lines.append(
            f"in-process worker: backlog of {drain['backlog_at_end']:,} pending when the load stopped,"
            f" drained in {_num(drain['drain_s'], 2)} s"
        )
    return "\n".join(lines)


def _order(record: dict[str, Any]) -> str:
    """The runs of one round, in the order they ran."""
    ran = {run["scenario"] for run in record["ingest"]}
    names = (
        ("bare", "bare"),
        ("sqlite", "kamiyo SQLite"),
        ("sqlite_worker", "kamiyo SQLite with its worker"),
        ("postgres", "kamiyo PostgreSQL"),
    )
    return " → ".join(name for scenario, name in names if scenario in ran)


def markdown(record: dict[str, Any]) -> str:
    """The generated block of docs/PERFORMANCE.md (between the markers)."""
    figures = aggregate(record)
    machine = record["machine"]
    opts = record["options"]
    out = [
        f"Measured {record['started_at'][:16].replace('T', ' ')} UTC with `{record['command']}`"
        f" (about {record['elapsed_s'] / 60:.0f} min).",
        "",
        f"Machine: {machine['nproc']} cores ({machine['cpu']}), {machine['memory_gb']:.0f} GB, Linux"
        f" {machine['kernel']}; Python {machine['python']}; uvicorn {machine['versions']['uvicorn']},"
        f" uvloop {machine['versions']['uvloop']}, httptools {machine['versions']['httptools']},"
        f" Starlette {machine['versions']['starlette']}, SQLAlchemy {machine['versions']['sqlalchemy']};"
        f" SQLite {machine['sqlite']}; {machine['postgres'] or 'PostgreSQL not measured'}; {machine['wrk']}."
        f" Load average {machine['loadavg_start']} at the start, {machine['loadavg_end']} at the end"
        " (the machine is shared: other work ran alongside).",
        "",
        f"Load: `wrk -t{opts['threads']} -c{opts['connections']}` (concurrency {opts['connections']}),"
        f" {opts['duration']:g} s per run after a {opts['warmup']:g} s warm-up, {opts['rounds']} round(s)"
        f" of {_order(record)}, each on a fresh server and a fresh database."
        f" Deliveries are signed just before each run, {record['pool']['mean_body_bytes']:.0f} bytes of"
        " JSON on average, 5% of them re-deliveries of an earlier event. Service defaults otherwise"
        " (`SQLITE_SYNCHRONOUS=FULL`, `LOG_LEVEL=INFO`, metrics on).",
        "",
        f"### Ingest: signed, durable deliveries at concurrency {opts['connections']}",
        "",
        "| scenario | req/s (median) | min – max | p50 | p99 | vs bare | server CPU per request"
        " | CPU vs bare | acknowledged events stored |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for scenario, row in figures.items():
        if scenario == "bare":
            stored = "n/a"
        else:
            stored = (
                f"{row['acked']:,} of {row['acked']:,} after `kill -9`"
                if row["missing"] == 0
                else f"**{row['missing']:,} MISSING** of {row['acked']:,}"
            )
            if row["non_2xx"]:
                stored += f"; {row['non_2xx']:,} non-2xx answers"
        ratio = "100%" if scenario == "bare" else f"**{row['ratio'] * 100:.1f}%**"
        cpu_ratio = "100%" if scenario == "bare" else _percent(row["cpu_ratio"])
        cpu = f"{_num(row['cpu_main_us'])} µs"
        if row["cpu_other_us"]:
            cpu += f" + {_num(row['cpu_other_us'])} µs"
        out.append(
            f"| {row['title']} | {_num(row['rps'])} | {_num(row['rps_min'])} – {_num(row['rps_max'])}"
            f" | {_num(row['p50_ms'], 2)} ms | {_num(row['p99_ms'], 2)} ms | {ratio} | {cpu} | {cpu_ratio} | {stored} |"
        )
    out += [
        "",
        "\"vs bare\" is the median over rounds of kamiyo's req/s divided by the bare app's in the same"
        " round. Target ≥ 25%, aim 40%."
        " Server CPU per request is the server process's user + system time over the run divided by"
        " the requests answered: event-loop thread + everything else of the server (its inbox"
        " writer process, with the in-process worker when it runs, and the log thread; for PostgreSQL, not the database"
        " server's own CPU). \"CPU vs bare\" is the bare app's CPU per"
        " request over this one's: the share of bare's rate it would reach if both were CPU-bound; it"
        " moves far less with the neighbours' load than req/s, which is the first figure to move"
        " when the shared machine is busy (the bare app is pure CPU, kamiyo waits on fsync too).",
    ]
    if any(row["exhausted"] for row in figures.values()):
        out.append("A run used up its pool of deliveries before the end: its req/s is a lower bound.")
    drain = record.get("post_load_drain")
    if drain:
        if drain["backlog_at_end"]:
            left = (
                f"{drain['backlog_at_end']:,} were still pending when it stopped; the worker drained them in"
                f" {_num(drain['drain_s'], 2)} s."
                if drain["drain_s"] is not None
                else f"{drain['backlog_at_end']:,} were still pending when it stopped, {drain['still_pending']:,}"
                " of them still after the drain timeout."
            )
        else:
            left = "none was left pending when it stopped (the worker kept up with what was acknowledged)."
        out += [
            "",
            f"With the in-process worker, {drain['applied_during_load']:,} events were applied during the load"
            f" (of the runs, the one that left the most pending); {left}",
        ]
    apply = record.get("apply", {})
    if apply:
        out += [
            "",
            "### Apply: a backlog drained by the worker",
            "",
            "| database | events | drain time | events/s | worker CPU per event | outcome |",
            "|---|---:|---:|---:|---:|---|",
        ]
        for name, row in apply.items():
            if "error" in row:
                out.append(f"| {name} | - | - | - | error: {row['error']} |")
                continue
            statuses = ", ".join(f"{v:,} {k}" for k, v in sorted(row["statuses"].items()))
            if row["drained"]:
                drain = f"{_num(row['drain_s'], 2)} s"
            else:
                drain = f"~{_num(row['drain_s'], 0)} s (projected: stopped after {row['elapsed_s']:.0f} s)"
            out.append(
                f"| {name} | {row['events']:,} | {drain} | **{_num(row['events_per_s'])}** |"
                f" {_num(row.get('cpu_us_per_event'))} µs | {statuses}; {row['users']:,} users |"
            )
        out += [
            "",
            "`Worker(engine, settings).run_once()` in a loop until it finds nothing, in one process, with"
            f" the default batch of {next(iter(apply.values())).get('batch_size', 200)}: per customer a"
            " subscription created, its first invoice paid (the invoice carries the email: the user is"
            " created and linked), the subscription updated and the next invoice paid or failed, all"
            " customers interleaved with jitter. Target ≥ 5,000 events/s on SQLite.",
        ]
    skipped = record.get("skipped")
    if skipped:
        out += ["", f"Not measured: {skipped}."]
    return "\n".join(out)


def update_docs(path: Path, block: str) -> None:
    """Replace the generated block of ``path`` (between the markers) with ``block``."""
    text = path.read_text()
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        raise RuntimeError(f"{path} has no {BEGIN} … {END} block to update")
    path.write_text(text[: start + len(BEGIN)] + "\n" + block + "\n" + text[end:])
