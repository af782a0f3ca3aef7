"""The Click command line on both databases: ``--json`` documents, exit codes, doctor's drift
finding, plain lines in a pipe or with NO_COLOR and rich on a terminal, shell completion.

In-process through Click's test runner, and as real processes (a pipe, a pseudo-terminal)."""

from __future__ import annotations

import os
import pty
import select
import socket
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
from click.testing import CliRunner, Result
from sqlalchemy import text, update

from integration.conftest import Harness
from kamiyo import synthetic
from kamiyo.cli.main import kamiyo, main
from kamiyo.db.models import events_table
from operations.conftest import BASIC, Customer
from support import PRICE_TIERS, SECRET

KAMIYO = [str(Path(sys.executable).with_name("kamiyo"))]


@pytest.fixture
def cli(ops: Harness, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Harness:
    """This backend's database, and the environment `kamiyo` reads pointing at it."""
    monkeypatch.chdir(tmp_path)  # no stray .env
    monkeypatch.setenv("DATABASE_URL", ops.settings.database_url)
    monkeypatch.setenv("STRIPE_WEBHOOK_SECRET", SECRET)
    monkeypatch.setenv("STRIPE_PRICE_TIERS", PRICE_TIERS)
    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.setattr("kamiyo.logs.configure_logging", lambda *_a, **_k: None)  # keep pytest's log capture
    return ops


def invoke(*argv: str) -> Result:
    return CliRunner().invoke(kamiyo, list(argv), catch_exceptions=False)


def document(result: Result) -> Any:
    return orjson.loads(result.stdout)


def hand_edit(harness: Harness, email: str, tier: str, status: str | None) -> None:
    """The runbook's Option 5: an UPDATE on users, by hand, with no record of who or why."""
    with harness.engine.begin() as connection:
        connection.execute(
            text("UPDATE users SET subscription_tier = :t, subscription_status = :s WHERE email = :e"),
            {"t": tier, "s": status, "e": email},
        )


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- --json: one document per reading command ---------------------------------------------------


def test_every_reading_command_prints_one_json_document(cli: Harness) -> None:
    customer = Customer("json")
    created = customer.created()
    parked = customer.subscription("active", price=synthetic.price("price_legacy_gold"))
    cli.apply(created, parked)
    hand_edit(cli, customer.email, "pro", "active")

    listed = invoke("events", "list", "--json")
    assert listed.exit_code == 0
    rows = document(listed)
    assert [r["event_id"] for r in rows] == [parked["id"], created["id"]]  # newest first
    [failed] = [r for r in rows if r["event_id"] == parked["id"]]
    assert set(failed) == {"event_id", "type", "status", "attempts", "received_at", "last_error"}
    assert (failed["status"], "UnmappedPrice" in failed["last_error"]) == ("failed", True)

    shown = document(invoke("events", "show", str(parked["id"]), "--json"))
    assert (shown["stripe_event_id"], shown["payload"]["data"]["object"]["id"]) == (parked["id"], customer.sub_id)

    user = document(invoke("users", "show", customer.email, "--json"))
    assert (user["tier"], user["drift"]["expected"]["tier"]) == ("pro", "free")

    drift = invoke("users", "drift", "--json")
    assert (drift.exit_code, [d["email"] for d in document(drift)]) == (1, [customer.email])

    dry = invoke("replay", "--failed", "--dry-run", "--json")
    assert dry.exit_code == 0
    assert [(r["event_id"], r["dry_run"], r["status_after"]) for r in document(dry)] == [(parked["id"], True, "failed")]

    # A fixed range: "1h" ago from two invocations' clocks may fall on two different seconds.
    until = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    window = ("--since", (datetime.now(UTC) - timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ"), "--until", until)
    report = invoke("incident-report", *window, "--json")
    assert report.exit_code == 0
    assert document(report) == document(invoke("incident-report", *window, "--format", "json"))

    invoke("users", "set-tier", customer.email, "pro", "--reason", "INC-5 documented", "--by", "alice")
    entries = document(invoke("audit", "--target", customer.email, "--json"))
    assert [(e["action"], e["reason"], e["claimed_by"]) for e in entries] == [
        ("override.set", "INC-5 documented", "alice")
    ]


# -- exit codes -----------------------------------------------------------------------------------


def test_exit_codes_0_fine_1_a_problem_found_2_usage_or_configuration_130_interrupted(
    cli: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    cli.add_user("codes@example.com")
    assert invoke("users", "drift").exit_code == 0
    hand_edit(cli, "codes@example.com", "pro", "active")
    assert invoke("users", "drift").exit_code == 1  # found a problem
    assert invoke("users", "show", "ghost@example.com").exit_code == 1  # nothing to show

    usage = invoke("users", "drift", "--everything")
    assert (usage.exit_code, "No such option '--everything'" in usage.stderr) == (2, True)
    bounds = invoke("audit", "--limit", "0")
    assert (bounds.exit_code, bounds.stderr) == (
        2,
        "kamiyo audit: error: --limit must be a whole number from 1 to 100000\n",
    )

    monkeypatch.setenv("PORT", "eighty")
    configuration = invoke("users", "drift")
    assert configuration.exit_code == 2
    assert configuration.stderr.startswith("kamiyo: configuration error: PORT")
    monkeypatch.delenv("PORT")

    def interrupted(*_args: object, **_kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr("kamiyo.operations.users.drift", interrupted)
    assert invoke("users", "drift").exit_code == 130
    assert main(["users", "drift"]) == 130  # the console script's path, as well


def test_an_unreachable_database_exits_1_naming_it_without_a_traceback(
    cli: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    port = closed_port()
    monkeypatch.setenv("DATABASE_URL", f"postgresql+psycopg://postgres@127.0.0.1:{port}/kamiyo?connect_timeout=5")
    result = invoke("users", "drift")
    assert result.exit_code == 1
    assert result.stderr.startswith("kamiyo: the database failed: OperationalError")
    assert "Traceback" not in result.stderr


# -- doctor sees Option 5's trail -----------------------------------------------------------------


def test_doctor_names_users_edited_by_hand_in_sql_and_the_commands_that_resolve_it(cli: Harness) -> None:
    url = f"http://127.0.0.1:{closed_port()}"  # no service: doctor still reads the database
    customers = [Customer(f"option5n{i}") for i in range(4)]
    for customer in customers:
        cli.apply(customer.created(), customer.subscription("active", price=BASIC))
    before = document(invoke("doctor", "--url", url, "--json", "--apply-timeout", "1"))
    assert [f["status"] for f in before["findings"] if f["step"] == "Drift"] == ["ok"]

    for customer in customers:
        hand_edit(cli, customer.email, "pro", "active")
    result = invoke("doctor", "--url", url, "--json", "--apply-timeout", "1")
    assert result.exit_code == 1
    [drift] = [f for f in document(result)["findings"] if f["step"] == "Drift"]
    assert (drift["status"], drift["cause"], drift["option"]) == ("fail", "drift", 5)
    assert drift["found"].startswith("4 user(s) with a tier or status nothing explains")
    named = sorted(customers, key=lambda c: cli.user(c.email)["id"])  # type: ignore[index]
    for customer in named[:3]:
        assert f"{customer.email} (stored pro/active, expected basic/active)" in drift["found"]
    assert named[3].email not in drift["found"]
    assert drift["found"].endswith("and 1 more")
    first = named[0].email
    assert f'`kamiyo users set-tier {first} pro --reason "..."`' in drift["todo"]
    assert f"`kamiyo sync --email {first}`" in drift["todo"]

    plain = invoke("doctor", "--url", url, "--apply-timeout", "1")
    assert "[FAIL] Drift: 4 user(s)" in plain.stdout

    # Made audited, as the finding says: the drift is explained, the finding is gone.
    for customer in customers:
        invoke("users", "set-tier", customer.email, "pro", "--reason", "INC-8 webhooks were down")
    after = document(invoke("doctor", "--url", url, "--json", "--apply-timeout", "1"))
    assert [f["status"] for f in after["findings"] if f["step"] == "Drift"] == ["ok"]


# -- progress, tables and colour: plain in a pipe or with NO_COLOR, rich on a terminal ---------------


def test_prune_and_replay_report_progress_on_stderr_as_plain_lines_in_a_pipe(cli: Harness) -> None:
    customer = Customer("progress")
    parked = customer.subscription("active", price=synthetic.price("price_legacy_gold"))
    cli.apply(customer.created(), parked)
    replayed = invoke("replay", "--failed", "--yes")
    assert (replayed.exit_code, replayed.stderr) == (1, "replay: 1 of 1 events\n")

    with cli.engine.begin() as connection:
        connection.execute(
            update(events_table)
            .where(events_table.c.stripe_event_id == parked["id"])
            .values(received_at=datetime.now(UTC) - timedelta(days=3))
        )
    pruned = invoke("prune", "--failed", "--older-than", "2d", "--yes")
    assert pruned.exit_code == 0
    assert pruned.stderr == "prune: 1 of 1 events deleted\n"
    assert "\x1b" not in pruned.stdout + pruned.stderr


def _environment(harness: Harness, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("STRIPE_", "NO_COLOR", "TERM"))}
    env.update(
        DATABASE_URL=harness.settings.database_url,
        STRIPE_WEBHOOK_SECRET=SECRET,
        STRIPE_PRICE_TIERS=PRICE_TIERS,
        TERM="xterm-256color",
        COLUMNS="200",
        **extra,
    )
    return env


def _on_a_terminal(argv: list[str], env: dict[str, str], cwd: Path) -> tuple[int, str]:
    """Run ``argv`` with stdout and stderr on a pseudo-terminal; what it wrote, and its exit code."""
    leader, follower = pty.openpty()
    process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=follower, stderr=follower, env=env, cwd=cwd)
    os.close(follower)
    chunks = []
    while True:
        ready, _, _ = select.select([leader], [], [], 60)
        if not ready:
            process.kill()
            raise AssertionError(f"{argv} wrote nothing for 60 s")
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the terminal's other side closed: the process ended
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(leader)
    return process.wait(timeout=60), b"".join(chunks).decode().replace("\r\n", "\n")


def test_a_terminal_gets_richs_table_no_color_and_a_pipe_the_same_plain_lines(cli: Harness, tmp_path: Path) -> None:
    cli.add_user("table@example.com")
    assert invoke("users", "set-tier", "table@example.com", "pro", "--reason", "INC-9 \x1b[31m").exit_code == 0
    argv = [*KAMIYO, "audit", "--target", "table@example.com"]

    piped = subprocess.run(argv, env=_environment(cli), cwd=tmp_path, capture_output=True, text=True, check=False)
    assert piped.returncode == 0, piped.stderr
    assert piped.stdout.startswith("#")
    assert "override.set" in piped.stdout
    assert "\x1b" not in piped.stdout

    code, drawn = _on_a_terminal(argv, _environment(cli), tmp_path)
    assert code == 0
    assert "\x1b[" in drawn  # rich's styles
    assert "━" in drawn  # rich's table rule under the header
    assert "\\x1b[31m" in drawn  # what the database holds is shown escaped, never obeyed
    assert "\x1b[31m" not in drawn

    code, plain = _on_a_terminal(argv, _environment(cli, NO_COLOR="1"), tmp_path)
    assert (code, plain) == (0, piped.stdout)


def test_doctors_verdict_is_coloured_on_a_terminal_and_plain_with_no_color(cli: Harness, tmp_path: Path) -> None:
    argv = [*KAMIYO, "doctor", "--url", f"http://127.0.0.1:{closed_port()}", "--apply-timeout", "1"]
    code, drawn = _on_a_terminal(argv, _environment(cli), tmp_path)
    assert code == 1  # nothing listens
    assert "\x1b[1;31m[FAIL]\x1b[0m Step 5: port" in drawn
    code, plain = _on_a_terminal(argv, _environment(cli, NO_COLOR="1"), tmp_path)
    assert code == 1
    assert "\x1b" not in plain
    assert "[FAIL] Step 5: port" in plain


# -- the groups and shell completion ---------------------------------------------------------------


def test_help_lists_every_command_group() -> None:
    result = CliRunner().invoke(kamiyo, ["--help"])
    assert result.exit_code == 0
    commands = result.stdout.split("Commands:")[1]
    listed = [line.split()[0] for line in commands.splitlines() if line.startswith("  ") and line.split()]
    assert set(listed) >= {
        "serve", "worker", "db", "events", "replay", "users", "audit", "sync", "backfill", "prune",
        "trigger", "doctor", "incident-report", "completion",
    }  # fmt: skip


@pytest.mark.parametrize(
    ("shell", "marker"), [("bash", "complete -o nosort -F"), ("zsh", "compdef"), ("fish", "complete")]
)
def test_completion_prints_clicks_script_for_the_shell(shell: str, marker: str) -> None:
    result = CliRunner().invoke(kamiyo, ["completion", shell])
    assert result.exit_code == 0
    assert marker in result.stdout
    assert "_KAMIYO_COMPLETE" in result.stdout
    assert CliRunner().invoke(kamiyo, ["completion", "tcsh"]).exit_code == 2


def test_the_installed_script_completes_commands_and_options_as_bash_asks(tmp_path: Path) -> None:
    def complete(line: str) -> list[str]:
        words = line.split(" ")
        env = {**os.environ, "_KAMIYO_COMPLETE": "bash_complete", "COMP_WORDS": line, "COMP_CWORD": str(len(words) - 1)}
        result = subprocess.run(KAMIYO, env=env, cwd=tmp_path, capture_output=True, text=True, check=False)
        assert result.returncode == 0, result.stderr
        return [entry.split(",", 1)[1] for entry in result.stdout.splitlines()]

    assert complete("kamiyo us") == ["users"]
    assert set(complete("kamiyo users ")) == {"set-tier", "clear-override", "show", "drift"}
    assert "--dry-run" in complete("kamiyo replay --")
    assert complete("kamiyo events list --status ") == ["pending", "applied", "ignored", "failed"]


def test_help_needs_neither_the_database_libraries_nor_rich(tmp_path: Path) -> None:
    """Each command imports what it uses when it runs: `kamiyo --help` and completion stay quick."""
    probe = (
        "import sys\n"
        "from kamiyo.cli.main import main\n"
        "assert main(['--help']) == 0\n"
        "assert main(['users', 'drift', '--help']) == 0\n"
        "print(sorted(m for m in ('sqlalchemy', 'alembic', 'rich', 'stripe', 'kamiyo.config') if m in sys.modules))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, check=False, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "[]"
