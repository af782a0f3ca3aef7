"""The processes under load: ``kamiyo serve`` and the bare ASGI app, plus throwaway databases.

Each server runs in its own working directory (no stray ``.env`` is read), bound to 127.0.0.1
on a free port, with its output in ``server.log`` there. Every process started here is
stopped by its own pid when its ``with`` block ends, whatever happened inside.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
from sqlalchemy.engine import make_url

BENCH_DIR = Path(__file__).resolve().parent
START_TIMEOUT = 60.0
# Every variable kamiyo reads: none of them leaks in from the shell running the benchmark.
KAMIYO_ENV_KEYS = (
    "STRIPE_WEBHOOK_SECRET",
    "STRIPE_PRICE_TIERS",
    "DATABASE_URL",
    "PORT",
    "HOST",
    "LOG_LEVEL",
    "LOG_FORMAT",
    "WEBHOOK_MAX_BODY_BYTES",
    "WEBHOOK_TOLERANCE_SECONDS",
    "WORKER_IN_PROCESS",
    "WORKER_BATCH_SIZE",
    "WORKER_MAX_ATTEMPTS",
    "WORKER_POLL_SECONDS",
    "WORKER_RETRY_BASE_SECONDS",
    "SQLITE_SYNCHRONOUS",
    "METRICS_ENABLED",
    "STRIPE_SECRET_KEY",
    "STRIPE_API_BASE",
    "HTTP_HEADER_TIMEOUT_SECONDS",
    "HTTP_BODY_TIMEOUT_SECONDS",
    "HTTP_KEEPALIVE_SECONDS",
    "HTTP_MAX_CONNECTIONS",
    "HTTP_MAX_HEADER_BYTES",
)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def kamiyo_command() -> list[str]:
    """The console script next to this interpreter (``python -m kamiyo`` if absent)."""
    script = Path(sys.executable).with_name("kamiyo")
    return [str(script)] if script.exists() else [sys.executable, "-m", "kamiyo"]


def checkout_kamiyo(checkout: Path) -> list[str]:
    """The ``kamiyo`` console script of another checkout's own ``.venv`` (``make install`` there)."""
    script = checkout.resolve() / ".venv" / "bin" / "kamiyo"
    if not script.exists():
        raise SystemExit(f"{script} is missing: run `make install` in {checkout}")
    return [str(script)]


def kamiyo_env(settings: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in KAMIYO_ENV_KEYS}
    env.update(settings)
    return env


class Server:
    """One server process; ``url`` is its base URL once ``start`` has returned."""

    def __init__(self, name: str, command: list[str], workdir: Path, env: dict[str, str], port: int) -> None:
        self.name = name
        self.command = command
        self.workdir = workdir
        self.env = env
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = workdir / "server.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self, ready_path: str) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                self.command, cwd=self.workdir, env=self.env, stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode} at start:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + ready_path, timeout=2) as answer:
                    if answer.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.1)
        raise RuntimeError(f"{self.name} not ready after {START_TIMEOUT:.0f} s:\n{self.log_tail()}")

    def cpu_seconds(self) -> tuple[float, float]:
        """CPU time used so far (user + system): by the main thread (the event loop), and by
        everything else of the server: its other threads and its child processes (kamiyo serve's
        inbox writer)."""
        total = _cpu(Path(f"/proc/{self.pid}/stat"))
        main = _cpu(Path(f"/proc/{self.pid}/task/{self.pid}/stat"))
        return main, total - main + sum(_cpu(stat) for stat in _children(self.pid))

    def stop(self, *, kill: bool = False) -> None:
        """SIGTERM (graceful), or SIGKILL: a crash, after which every acknowledged event must be stored."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def _children(pid: int) -> list[Path]:
    """The /proc stat files of the processes whose parent is ``pid``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            stat = entry / "stat"
            try:
                if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(stat)
            except (OSError, IndexError, ValueError):
                continue  # gone meanwhile
    return found


def _cpu(stat: Path) -> float:
    """utime + stime of a /proc stat file, in seconds (fields 14 and 15, after the command name)."""
    fields = stat.read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextmanager
def bare_server(workdir: Path, protocol: str = "bounded", *, cpus: str | None = None) -> Iterator[Server]:
    """The bare app, served with kamiyo's bounded protocol or (``httptools``) uvicorn's own; with
    ``cpus``, pinned to those cores (``taskset -c``)."""
    port = free_port()
    command = [sys.executable, str(BENCH_DIR / "bare_app.py"), "--host", "127.0.0.1", "--port", str(port)]
    if cpus is not None:
        command = ["taskset", "-c", cpus, *command]
    command += ["--protocol", protocol]
    server = Server("bare ASGI app", command, workdir, dict(os.environ), port)
    try:
        server.start("/")
        yield server
    finally:
        server.stop()


def kamiyo_upgrade(workdir: Path, settings: dict[str, str], command: list[str] | None = None) -> None:
    """``kamiyo db upgrade`` on the database of ``settings`` (with ``command``, another install's kamiyo)."""
    workdir.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        [*(command or kamiyo_command()), "db", "upgrade"],
        cwd=workdir,
        env=kamiyo_env(settings),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"kamiyo db upgrade failed:\n{done.stdout}\n{done.stderr}")


@contextmanager
def kamiyo_server(workdir: Path, settings: dict[str, str], command: list[str] | None = None) -> Iterator[Server]:
    """``kamiyo serve`` on 127.0.0.1 with ``settings``; SIGKILLed at the end unless already stopped.
    ``command``: another install's ``kamiyo`` (a baseline to compare with)."""
    port = free_port()
    env = kamiyo_env({**settings, "HOST": "127.0.0.1", "PORT": str(port)})
    server = Server("kamiyo serve", [*(command or kamiyo_command()), "serve"], workdir, env, port)
    try:
        server.start("/health")
        yield server
    finally:
        server.stop(kill=True)


def postgres_reachable(admin_url: str) -> str | None:
    """None when PostgreSQL answers at ``admin_url``, else why not."""
    try:
        with psycopg.connect(admin_url, connect_timeout=3):
            return None
    except psycopg.Error as exc:
        return f"{exc.__class__.__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"


@contextmanager
def throwaway_postgres(admin_url: str) -> Iterator[str]:
    """Create a database for one benchmark, yield its SQLAlchemy URL, drop it afterwards."""
    name = f"kamiyo_bench_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    url = make_url(admin_url).set(drivername="postgresql+psycopg", database=name)
    try:
        yield url.render_as_string(hide_password=False)
    finally:
        with psycopg.connect(admin_url, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
