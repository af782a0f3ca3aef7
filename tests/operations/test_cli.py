"""`kamiyo users`, `kamiyo audit` and `kamiyo replay` as an operator types them (in-process, on SQLite)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson
import pytest
from sqlalchemy import text

from integration.conftest import Harness
from kamiyo import synthetic
from kamiyo.cli.main import main
from kamiyo.db.engine import make_engine
from kamiyo.db.migrate import upgrade
from kamiyo.errors import KamiyoError
from kamiyo.operations.audit import default_actor
from kamiyo.operations.inputs import expiry_time
from operations.conftest import BASIC, Customer
from support import PRICE_TIERS, SECRET, make_settings


@pytest.fixture
def db(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Harness]:
    """A migrated SQLite file, and the environment `kamiyo` reads pointing at it."""
    url = f"sqlite:///{tmp_path / 'kamiyo.db'}"
    monkeypatch.chdir(tmp_path)  # no stray .env
    monkeypatch.setenv("DATABASE_URL", url)
    monkeypatch.setenv("STRIPE_WEBHOOK_SECRET", SECRET)
    monkeypatch.setenv("STRIPE_PRICE_TIERS", PRICE_TIERS)
    monkeypatch.setattr("kamiyo.logs.configure_logging", lambda *_a, **_k: None)  # keep pytest's log capture
    settings = make_settings(url)
    engine = make_engine(settings)
    upgrade(engine)
    yield Harness(engine, settings)
    engine.dispose()


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_set_tier_show_clear_and_audit_round_trip(db: Harness, capsys: pytest.CaptureFixture[str]) -> None:
    customer = Customer("cli")
    db.apply(customer.created(), customer.subscription("active", price=BASIC))

    code, out, _ = run(
        capsys,
        "users",
        "set-tier",
        customer.email,
        "pro",
        "--reason",
        "INC-12 webhooks down",
        "--expires",
        "24h",
        "--by",
        "alice",
    )
    assert code == 0
    assert "stored    pro/active" in out
    assert "override  pro until" in out
    assert f"set by {default_actor()}" in out  # the OS user: shell access is the credential
    assert db.tier_status(customer.email) == ("pro", "active")

    code, out, _ = run(capsys, "users", "show", customer.email, "--json")
    shown = orjson.loads(out)
    assert (code, shown["tier"], shown["stripe_state"]["tier"], shown["override"]["reason"]) == (
        0,
        "pro",
        "basic",
        "INC-12 webhooks down",
    )
    assert datetime.fromisoformat(shown["override"]["expires_at"]) > datetime.now(UTC) + timedelta(hours=23)

    code, out, _ = run(capsys, "users", "clear-override", customer.email, "--by", "bob", "--reason", "fixed")
    assert (code, db.tier_status(customer.email)) == (0, ("basic", "active"))
    assert "override  none" in out

    code, out, _ = run(capsys, "audit", "--since", "1h")
    assert code == 0
    lines = [line for line in out.splitlines() if line.startswith("#")]
    assert "override.clear" in lines[0]
    assert f"by {default_actor()} (claims to be bob)" in lines[0]
    assert "override.set" in lines[1]
    assert "INC-12 webhooks down" in lines[1]
    code, out, _ = run(capsys, "audit", "--target", customer.email, "--json")
    assert [e["action"] for e in orjson.loads(out)] == ["override.clear", "override.set"]


def test_set_tier_without_a_reason_is_refused_by_the_parser(db: Harness, capsys: pytest.CaptureFixture[str]) -> None:
    db.add_user("noreason@example.com")
    with pytest.raises(SystemExit) as exit_info:
        main(["users", "set-tier", "noreason@example.com", "pro"])
    assert exit_info.value.code == 2
    assert "--reason" in capsys.readouterr().err
    assert db.tier_status("noreason@example.com") == ("free", None)


def test_show_of_an_unknown_user_and_a_refused_override_exit_1_naming_why(
    db: Harness, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(capsys, "users", "show", "ghost@example.com")[::2] == (1, "kamiyo: no user ghost@example.com\n")
    code, _, err = run(capsys, "users", "set-tier", "ghost@example.com", "pro", "--reason", "x")
    assert (code, err) == (1, "kamiyo: no user ghost@example.com\n")


def test_users_drift_exits_1_while_a_direct_update_is_unexplained(
    db: Harness, capsys: pytest.CaptureFixture[str]
) -> None:
    db.add_user("runbook@example.com")
    assert run(capsys, "users", "drift")[0] == 0
    with db.engine.begin() as connection:
        connection.execute(
            text("UPDATE users SET subscription_tier = 'pro', subscription_status = 'active' WHERE email = :e"),
            {"e": "runbook@example.com"},
        )
    code, out, _ = run(capsys, "users", "drift")
    assert code == 1
    assert "runbook@example.com: stored pro/active, subscriptions and override give free/-" in out
    code, out, _ = run(capsys, "users", "drift", "--json")
    assert (code, [d["email"] for d in orjson.loads(out)]) == (1, ["runbook@example.com"])

    run(capsys, "users", "set-tier", "runbook@example.com", "pro", "--reason", "document Option 5", "--by", "alice")
    assert run(capsys, "users", "drift")[0] == 0


def test_replay_dry_run_then_apply_with_by_and_reason(
    db: Harness, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    customer = Customer("replay")
    parked = customer.subscription("active", price=synthetic.price("price_legacy_gold"))
    db.apply(customer.created(), parked)
    code, out, _ = run(capsys, "replay", "--failed", "--yes")
    assert code == 1  # still no tier for the price: the replay fails again
    assert f"{parked['id']}  customer.subscription.updated  failed -> failed  error: UnmappedPrice" in out

    monkeypatch.setenv("STRIPE_PRICE_TIERS", PRICE_TIERS + ",price_legacy_gold=enterprise")
    code, out, _ = run(capsys, "replay", "--failed", "--dry-run")
    assert code == 0
    assert f"user {customer.email}: free/- -> enterprise/active" in out
    assert out.splitlines()[-1] == "dry run: 1 event(s) would be replayed: 1 applied; nothing changed"
    assert db.tier_status(customer.email) == ("free", None)

    code, out, _ = run(capsys, "replay", "--failed", "--yes", "--by", "erin", "--reason", "mapped the legacy price")
    assert (code, out.splitlines()[-1]) == (0, "1 event(s) replayed: 1 applied")
    assert db.tier_status(customer.email) == ("enterprise", "active")
    code, out, _ = run(capsys, "audit", "--target", str(parked["id"]), "--json")
    entries = orjson.loads(out)
    # The OS user is the actor; --by, another name, is kept beside it as a claim.
    assert [(e["action"], e["actor"], e["claimed_by"], e["reason"]) for e in entries] == [
        ("replay", default_actor(), "erin", "mapped the legacy price"),
        ("replay", default_actor(), None, None),
    ]


def test_replay_selection_errors_exit_1(db: Harness, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys, "replay")[::2] == (1, "kamiyo: replay needs an event id, --failed, --type or --since\n")
    assert run(capsys, "replay", "evt_never_received")[::2] == (1, "kamiyo: no event evt_never_received in the inbox\n")


def test_expiry_time_reads_durations_from_now_and_absolute_moments() -> None:
    now = datetime(2026, 11, 27, 10, 0, tzinfo=UTC)
    assert expiry_time("24h", now=now) == now + timedelta(hours=24)
    assert expiry_time("30m", now=now) == now + timedelta(minutes=30)
    assert expiry_time("7d", now=now) == now + timedelta(days=7)
    assert expiry_time("2026-11-28T09:00", now=now) == datetime(2026, 11, 28, 9, 0, tzinfo=UTC)
    with pytest.raises(KamiyoError, match="cannot read"):
        expiry_time("tomorrow", now=now)


# -- inputs with bounds, and what reaches the terminal -------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ("users", "set-tier", "bounds@example.com", "pro", "--reason", "x", "--expires", "99999999999d"),
        ("users", "set-tier", "bounds@example.com", "pro", "--reason", "x", "--expires", "99999999999999"),
        ("users", "set-tier", "bounds@example.com", "pro", "--reason", "x", "--expires", "²d"),
        ("replay", "--failed", "--since", "99999999999999"),
        ("replay", "--failed", "--since", "²"),
        ("replay", "--failed", "--limit", "99999999999999999999"),
        ("audit", "--since", "99999999999d"),
        ("audit", "--limit", "0"),
        ("users", "show", "bounds@example.com", "--events", "99999999999999999999"),
    ],
)
def test_an_out_of_range_time_duration_or_count_is_a_usage_error_exit_2_without_a_traceback(
    db: Harness, capsys: pytest.CaptureFixture[str], argv: tuple[str, ...]
) -> None:
    db.add_user("bounds@example.com")
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert "error:" in err
    assert "Traceback" not in out + err
    assert db.tier_status("bounds@example.com") == ("free", None)


SECRET_KEY = "sk_live_51CliLeakAbCdEf0123456789"


def test_events_show_redacts_the_payload_and_escapes_what_reaches_the_terminal(
    db: Harness, capsys: pytest.CaptureFixture[str]
) -> None:
    customer = synthetic.customer(customer_id="cus_cli_leak", email="leak@example.com")
    customer["metadata"] = {"apiKey": "plain-value-0001", "note": f"key {SECRET_KEY}", "bell": "\x1b]0;pwned\x07"}
    event = synthetic.event("customer.created", customer)
    db.deliver(event)
    with db.engine.begin() as connection:
        connection.execute(
            text("UPDATE webhook_events SET last_error = :e WHERE stripe_event_id = :id"),
            {"e": f"boom \x1b[2J {SECRET_KEY}\u2028forged", "id": event["id"]},
        )
    code, out, _ = run(capsys, "events", "show", event["id"])
    assert code == 0
    for leaked in (SECRET_KEY, "plain-value-0001", "\x1b", "\x07", "\u2028"):
        assert leaked not in out
    assert '"apiKey": "[redacted]"' in out
    assert "\\x1b[2J" in out  # shown, not obeyed
    code, out, _ = run(capsys, "events", "list")
    assert code == 0
    assert SECRET_KEY not in out
    assert "\x1b" not in out


def test_events_show_prints_a_payload_nested_990_deep_cut_at_64_levels(
    db: Harness, capsys: pytest.CaptureFixture[str]
) -> None:
    from admin.events import deep_event
    from kamiyo.webhooks.envelope import read_envelope
    from kamiyo.webhooks.inbox import inbox_row, insert_new_events

    event_id, body = deep_event()
    envelope, _ = read_envelope(body)
    with db.engine.begin() as connection:
        insert_new_events(connection, [inbox_row(envelope, body, status="pending")])
    code, out, _ = run(capsys, "events", "show", event_id)
    assert code == 0
    assert "[nested too deep]" in out


def test_users_show_and_audit_escape_stored_text_and_scrub_it(db: Harness, capsys: pytest.CaptureFixture[str]) -> None:
    customer = Customer("terminal")
    db.apply(customer.created(), customer.subscription("active", price=BASIC))
    reason = f"INC-1 \x1b[31mred\x1b[0m {SECRET_KEY}"
    code, _, _ = run(capsys, "users", "set-tier", customer.email, "pro", "--reason", reason, "--by", "x\x1bq")
    assert code == 0
    for argv in (("users", "show", customer.email), ("audit", "--target", customer.email), ("audit", "--json")):
        code, out, _ = run(capsys, *argv)
        assert code == 0
        assert "\x1b" not in out, argv
        assert SECRET_KEY not in out, argv


# -- confirmation before a bulk write (replay, prune; sync in reconcile/test_commands.py) -----------


class _Terminal:
    """stdin as a terminal where the operator types ``answer``."""

    def __init__(self, answer: str) -> None:
        self.answer = answer
        self.asked = 0

    def isatty(self) -> bool:
        return True

    def readline(self) -> str:
        self.asked += 1
        return self.answer


def _parked_events(db: Harness, n: int) -> list[str]:
    ids = []
    for i in range(n):
        customer = Customer(f"confirm{i}")
        parked = customer.subscription("active", price=synthetic.price("price_legacy_gold"))
        db.apply(customer.created(), parked)
        ids.append(str(parked["id"]))
    return ids


def test_a_bulk_replay_without_a_terminal_needs_yes_and_changes_nothing(
    db: Harness, capsys: pytest.CaptureFixture[str]
) -> None:
    [parked] = _parked_events(db, 1)
    code, out, err = run(capsys, "replay", "--failed")
    assert (code, out) == (2, "")
    assert "about to replay 1 event(s) selected by --failed" in err
    assert "add --yes" in err
    assert db.event(parked)["replayed_at"] is None
    assert run(capsys, "audit", "--target", parked)[1].startswith("no manual actions")


def test_a_bulk_replay_on_a_terminal_asks_with_the_count_and_scope(
    db: Harness, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    parked = _parked_events(db, 3)
    no = _Terminal("n\n")
    monkeypatch.setattr("sys.stdin", no)
    code, _out, err = run(capsys, "replay", "--failed", "--limit", "2")
    assert (code, no.asked) == (1, 1)
    assert "About to replay 2 event(s) (the oldest 2 of 3) selected by --failed" in err
    assert "not confirmed: nothing was changed" in err
    assert [db.event(p)["replayed_at"] is None for p in parked] == [True, True, True]

    yes = _Terminal("y\n")
    monkeypatch.setattr("sys.stdin", yes)
    code, out, _err = run(capsys, "replay", "--failed", "--limit", "2")
    assert (code, yes.asked) == (1, 1)  # replayed, still failing (exit 1)
    assert [db.event(p)["replayed_at"] is None for p in parked] == [False, False, True]
    assert out.splitlines()[-1] == f"1 more event(s) selected: continue with --after {parked[1]}"


def test_a_dry_run_and_a_replay_by_id_never_ask(db: Harness, capsys: pytest.CaptureFixture[str]) -> None:
    [parked] = _parked_events(db, 1)
    assert run(capsys, "replay", "--failed", "--dry-run")[0] == 0
    assert run(capsys, "replay", parked)[0] == 1  # one event by id: not bulk; applied, still failing
    assert db.event(parked)["replayed_at"] is not None


def test_replay_limit_over_replay_max_limit_is_a_usage_error(db: Harness, capsys: pytest.CaptureFixture[str]) -> None:
    code, _out, err = run(capsys, "replay", "--failed", "--dry-run", "--limit", "10001")
    assert (code, err) == (2, "kamiyo replay: error: --limit must be a whole number from 1 to 10000\n")


def test_prune_counts_asks_and_deletes_parked_failures_older_than_given(
    db: Harness, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from sqlalchemy import update

    from kamiyo.db.models import events_table

    old, recent = _parked_events(db, 2)
    with db.engine.begin() as connection:
        connection.execute(
            update(events_table)
            .where(events_table.c.stripe_event_id == old)
            .values(received_at=datetime.now(UTC) - timedelta(days=40))
        )
    code, out, _ = run(capsys, "prune", "--failed", "--older-than", "30d", "--dry-run")
    assert code == 0
    assert out.startswith("would delete 1 parked failures received before ")
    assert "(1 failed, received " in out

    code, _out, err = run(capsys, "prune", "--failed", "--older-than", "30d")
    assert code == 2
    assert "add --yes" in err

    monkeypatch.setattr("sys.stdin", _Terminal("yes\n"))
    code, out, _ = run(capsys, "prune", "--failed", "--older-than", "30d", "--by", "erin", "--reason", "INC-3 done")
    assert code == 0
    assert out.splitlines()[-1] == "deleted 1 event(s): 1 failed; recorded in the audit log"
    assert [db.event(recent)["status"]] == ["failed"]
    code, out, _ = run(capsys, "audit", "--json")
    [entry] = [e for e in orjson.loads(out) if e["action"] == "prune"]
    assert (entry["claimed_by"], entry["reason"], entry["after"]["pruned"]) == ("erin", "INC-3 done", 1)


def test_prune_without_anything_old_enough_deletes_nothing_and_asks_nothing(
    db: Harness, capsys: pytest.CaptureFixture[str]
) -> None:
    _parked_events(db, 1)
    code, out, _ = run(capsys, "prune")
    assert (code, out.startswith("nothing to prune: no applied and ignored events received before")) == (0, True)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--failed"], "--failed needs --older-than"),
        (["--older-than", "30d"], "--older-than 30d is less than the 31 day(s) this prune allows"),
        (["--failed", "--older-than", "12h"], "--older-than 12h is less than the 1 day(s) this prune allows"),
        (["--failed", "--older-than", "30m"], "--older-than 30m is less than the 1 day(s) this prune allows"),
        (["--failed", "--older-than", "9999999d"], "is longer than"),
        (["--failed", "--older-than", "99999w"], "is longer than"),
        (["--failed", "--older-than", "²d"], "as a duration"),
    ],
)
def test_prune_refuses_an_age_out_of_bounds(
    db: Harness, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    code, _out, err = run(capsys, "prune", *argv)
    assert code == 2
    assert message in err
    assert "Traceback" not in err
