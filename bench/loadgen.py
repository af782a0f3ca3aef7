"""Load from ``wrk`` replaying a pool of pre-signed deliveries (``replay.lua``), and what came back.

A Python client cannot produce tens of thousands of requests a second; wrk (C, epoll, LuaJIT)
can, on one thread, leaving the other core to the server. Concurrency is the number of open
connections, each with one request in flight at a time.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deliveries import Pool

LUA_SCRIPT = Path(__file__).resolve().parent / "replay.lua"
INSTALL_HINT = "wrk is not installed: on Debian or Ubuntu, as root: apt-get update && apt-get install -y wrk"


def wrk_path() -> str | None:
    return shutil.which("wrk")


def wrk_version() -> str:
    path = wrk_path()
    if path is None:
        return "missing"
    done = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10, check=False)
    return (done.stdout or done.stderr).splitlines()[0].strip() if (done.stdout or done.stderr) else "unknown"


@dataclass
class LoadResult:
    """One wrk run: throughput, latency, and every event acknowledged with a 2xx."""

    label: str
    duration_s: float
    requests: int
    errors: dict[str, int]
    latency_us: dict[str, float]
    wrapped: int
    exhausted: bool
    acked: set[str] = field(default_factory=set)
    acked_duplicate_answers: int = 0
    acked_answers: int = 0
    wrk_output: str = ""
    client_cpu_s: float = 0.0
    server_cpu: dict[str, float] = field(default_factory=dict)

    @property
    def rps(self) -> float:
        return self.requests / self.duration_s if self.duration_s else 0.0

    @property
    def non_2xx(self) -> int:
        return self.errors.get("status", 0)

    @property
    def socket_errors(self) -> int:
        return sum(v for k, v in self.errors.items() if k != "status")

    def summary(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "duration_s": round(self.duration_s, 3),
            "requests": self.requests,
            "rps": round(self.rps, 1),
            "latency_ms": {k: round(v / 1000, 3) for k, v in self.latency_us.items()},
            "errors": self.errors,
            "non_2xx": self.non_2xx,
            "acknowledged_2xx_answers": self.acked_answers,
            "acknowledged_duplicate_answers": self.acked_duplicate_answers,
            "acknowledged_distinct_events": len(self.acked),
            "pool_wrapped": self.wrapped,
            "pool_exhausted": self.exhausted,
            "wrk_cpu_cores": round(self.client_cpu_s / self.duration_s, 2) if self.duration_s else None,
            "server_cpu": self.server_cpu,
        }

    def note_server_cpu(self, before: tuple[float, float], after: tuple[float, float]) -> None:
        """Server CPU over the run (``Server.cpu_seconds`` before and after): per request, and cores busy."""
        main, other = after[0] - before[0], after[1] - before[1]
        if self.requests and self.duration_s:
            self.server_cpu = {
                "main_thread_us_per_request": round(main / self.requests * 1e6, 1),
                "other_threads_us_per_request": round(other / self.requests * 1e6, 1),
                "cores_busy": round((main + other) / self.duration_s, 2),
            }


def _run(
    command: list[str], workdir: Path, env: dict[str, str], timeout: float, stop_when: Callable[[], bool] | None
) -> subprocess.CompletedProcess[str]:
    if stop_when is None:
        return subprocess.run(
            command, cwd=workdir, env=env, capture_output=True, text=True, timeout=timeout, check=False
        )
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        process = subprocess.Popen(command, cwd=workdir, env=env, stdout=out, stderr=err, text=True)
        deadline = time.monotonic() + timeout
        try:
            while process.poll() is None:
                if stop_when() or time.monotonic() > deadline:
                    process.send_signal(signal.SIGINT)
                    process.wait(timeout=30)
                    break
                time.sleep(0.05)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(command, process.returncode, out.read(), err.read())


def run_wrk(
    url: str,
    pool: Pool,
    workdir: Path,
    *,
    label: str,
    duration: float,
    connections: int,
    threads: int,
    stop_at_end: bool,
    cpus: str | None = None,
    stop_when: Callable[[], bool] | None = None,
) -> LoadResult:
    """Replay ``pool`` against ``url`` for ``duration`` seconds (less if the pool runs out).

    ``cpus``: pin wrk to these cores (``taskset -c``), e.g. away from a server pinned to another.
    ``stop_when``: asked every 50 ms; once true, wrk is interrupted (SIGINT: it stops and reports
    as at the end of its duration). wrk's clock runs its whole duration even when every thread
    has sent its share, so a run that must end when something is done says what that is here.
    """
    path = wrk_path()
    if path is None:
        raise RuntimeError(INSTALL_HINT)
    workdir.mkdir(parents=True, exist_ok=True)
    acks = workdir / f"{label}.acks"
    summary_path = workdir / f"{label}.summary.json"
    env = {
        **os.environ,
        "BENCH_REQUESTS": str(pool.requests),
        "BENCH_INDEX": str(pool.index),
        "BENCH_ACKS": str(acks),
        "BENCH_SUMMARY": str(summary_path),
        "BENCH_THREADS": str(threads),
        "BENCH_STOP_AT_END": "1" if stop_at_end else "0",
    }
    command = [
        path,
        f"-t{threads}",
        f"-c{connections}",
        f"-d{max(1, round(duration))}s",
        "--timeout",
        "10s",
        "--latency",
        "-s",
        str(LUA_SCRIPT),
        url,
    ]
    if cpus is not None:
        command = ["taskset", "-c", cpus, *command]
    # Loading a large pool takes wrk a few seconds before the clock starts: allow for it.
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = _run(command, workdir, env, duration + 120, stop_when)
    if done.returncode != 0 or not summary_path.exists():
        raise RuntimeError(f"wrk failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    figures = json.loads(summary_path.read_text())
    result = LoadResult(
        label=label,
        duration_s=figures["duration_us"] / 1e6,
        requests=figures["requests"],
        errors=figures["errors"],
        latency_us=figures["latency_us"],
        wrapped=figures["wrapped"],
        exhausted=figures["threads_exhausted"] > 0,
        wrk_output=done.stdout,
        # Includes reading the pool before the clock starts: an upper bound of wrk's share.
        client_cpu_s=(after.ru_utime + after.ru_stime) - (children.ru_utime + children.ru_stime),
    )
    for thread in range(threads):
        ack_file = Path(f"{acks}.{thread}")
        if not ack_file.exists():
            continue
        with ack_file.open() as lines:
            for line in lines:
                event_id, _sep, flag = line.rstrip("\n").partition(" ")
                result.acked.add(event_id)
                result.acked_answers += 1
                result.acked_duplicate_answers += flag == "d"
        ack_file.unlink()
    return result
