"""The audit log: one entry per manual action, append-only in the database itself (SQLite and PostgreSQL)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from integration.conftest import Harness
from kamiyo import synthetic
from kamiyo.errors import KamiyoError
from kamiyo.operations import audit
from kamiyo.operations.audit import default_actor, list_audit, record_action
from kamiyo.operations.overrides import clear_override, set_override
from kamiyo.operations.replay import replay_events
from operations.conftest import BASIC, Customer, audit_about


def _record(ops: Harness, target: str, action: str = "test.action") -> None:
    with ops.engine.begin() as connection:
        record_action(
            connection,
            action=action,
            actor="carol",
            reason="why",
            target=target,
            before={"tier": "free", "at": datetime(2026, 1, 1, tzinfo=UTC)},
            after={"tier": "pro"},
        )


def test_override_set_and_clear_each_record_who_when_why_before_and_after(ops: Harness) -> None:
    customer = Customer("audited")
    ops.apply(customer.created(), customer.subscription("active", price=BASIC))
    started = datetime.now(UTC) - timedelta(seconds=1)
    expires = datetime.now(UTC) + timedelta(hours=24)
    tiers = ops.settings.price_tiers
    set_override(
        ops.engine,
        email=customer.email,
        tier="pro",
        reason="INC-9 webhooks down",
        expires_at=expires,
        actor="alice",
        tiers=tiers,
    )
    clear_override(ops.engine, email=customer.email, actor="bob", reason="webhooks fixed", tiers=tiers)

    first, second = audit_about(ops.engine, customer.email)
    assert (first.action, first.actor, first.reason) == ("override.set", "alice", "INC-9 webhooks down")
    assert first.before == {"tier": "basic", "status": "active", "override": None}
    assert first.after is not None
    assert (first.after["tier"], first.after["status"]) == ("pro", "active")
    assert first.after["override"]["tier"] == "pro"
    assert datetime.fromisoformat(first.after["override"]["expires_at"]) == expires
    assert (second.action, second.actor, second.reason) == ("override.clear", "bob", "webhooks fixed")
    assert second.before == first.after
    assert second.after == {"tier": "basic", "status": "active", "override": None}
    assert started <= first.at <= second.at <= datetime.now(UTC)


def test_applying_a_replay_records_one_entry_per_event_and_a_dry_run_none(ops: Harness) -> None:
    customer = Customer("replayed")
    created, sub = customer.created(), customer.subscription("active", price=BASIC)
    ops.apply(created, sub)

    replay_events(ops.engine, event_id=sub["id"], dry_run=True, actor="dave", reason="look", settings=ops.settings)
    assert audit_about(ops.engine, sub["id"]) == []

    replay_events(ops.engine, event_id=sub["id"], actor="dave", reason="INC-9 recheck", settings=ops.settings)
    [entry] = audit_about(ops.engine, sub["id"])
    assert (entry.action, entry.actor, entry.reason) == ("replay", "dave", "INC-9 recheck")
    assert entry.before == {"status": "applied", "attempts": 1, "error": None}
    assert entry.after is not None
    assert (entry.after["status"], entry.after["users"]) == ("applied", [])
    assert audit_about(ops.engine, created["id"]) == []


def test_the_database_rejects_updating_an_audit_entry(ops: Harness) -> None:
    target = synthetic.new_id("target")
    _record(ops, target)
    with pytest.raises(DBAPIError, match="append-only"), ops.engine.begin() as connection:
        connection.execute(text("UPDATE audit_log SET actor = 'mallory' WHERE target = :t"), {"t": target})
    assert [e.actor for e in audit_about(ops.engine, target)] == ["carol"]


def test_the_database_rejects_deleting_audit_entries(ops: Harness) -> None:
    target = synthetic.new_id("target")
    _record(ops, target)
    with pytest.raises(DBAPIError, match="append-only"), ops.engine.begin() as connection:
        connection.execute(text("DELETE FROM audit_log WHERE target = :t"), {"t": target})
    assert len(audit_about(ops.engine, target)) == 1


def test_the_database_rejects_emptying_the_audit_log(ops: Harness) -> None:
    """An unqualified DELETE on SQLite; TRUNCATE (which skips row triggers) on PostgreSQL."""
    target = synthetic.new_id("target")
    _record(ops, target)
    statement = "TRUNCATE audit_log" if ops.engine.dialect.name == "postgresql" else "DELETE FROM audit_log"
    with pytest.raises(DBAPIError, match="append-only"), ops.engine.begin() as connection:
        connection.execute(text(statement))
    assert len(audit_about(ops.engine, target)) == 1


def _entry_id(ops: Harness, target: str) -> int:
    [entry] = audit_about(ops.engine, target)
    return entry.id


@pytest.mark.parametrize(
    "statement",
    [
        # SQLite: REPLACE deletes the old row without firing the DELETE trigger, then inserts.
        pytest.param(
            "INSERT OR REPLACE INTO audit_log (id, at, action, actor) VALUES (:id, :at, 'forged', 'mallory')",
            id="insert-or-replace",
        ),
        pytest.param(
            "REPLACE INTO audit_log (id, at, action, actor) VALUES (:id, :at, 'forged', 'mallory')", id="replace"
        ),
        # Both: an upsert on the id is an UPDATE in disguise.
        pytest.param(
            "INSERT INTO audit_log (id, at, action, actor) VALUES (:id, :at, 'forged', 'mallory') "
            "ON CONFLICT (id) DO UPDATE SET actor = 'mallory', action = 'forged'",
            id="on-conflict-do-update",
        ),
        # Both: a plain insert of an id that exists (the primary key on PostgreSQL, the trigger on SQLite).
        pytest.param(
            "INSERT INTO audit_log (id, at, action, actor) VALUES (:id, :at, 'forged', 'mallory')", id="insert"
        ),
    ],
)
def test_the_database_rejects_rewriting_an_entry_by_inserting_its_id_again(ops: Harness, statement: str) -> None:
    """On PostgreSQL REPLACE is not even a statement: refused all the same."""
    target = synthetic.new_id("target")
    _record(ops, target)
    entry_id = _entry_id(ops, target)
    with pytest.raises(DBAPIError), ops.engine.begin() as connection:
        connection.execute(text(statement), {"id": entry_id, "at": datetime.now(UTC)})
    [entry] = audit_about(ops.engine, target)
    assert (entry.id, entry.actor, entry.action) == (entry_id, "carol", "test.action")


def test_inserting_a_new_entry_with_an_id_of_its_own_still_works(ops: Harness) -> None:
    """The refusal is for ids that exist: appending stays possible."""
    target = synthetic.new_id("target")
    with ops.engine.begin() as connection:
        top = connection.execute(text("SELECT COALESCE(MAX(id), 0) FROM audit_log")).scalar_one()
        connection.execute(
            text("INSERT INTO audit_log (id, at, action, actor, target) VALUES (:id, :at, 'x', 'carol', :t)"),
            {"id": top + 1000, "at": datetime.now(UTC), "t": target},
        )
    assert _entry_id(ops, target) == top + 1000


def test_a_claimed_name_is_kept_beside_the_actor(ops: Harness) -> None:
    target = synthetic.new_id("target")
    with ops.engine.begin() as connection:
        record_action(
            connection,
            action="x",
            actor="api:ann",
            reason=None,
            target=target,
            before=None,
            after=None,
            claimed_by="bob",
        )
    [entry] = audit_about(ops.engine, target)
    assert (entry.actor, entry.claimed_by) == ("api:ann", "bob")


def test_the_cli_actor_is_the_os_user_and_by_a_claim_when_it_names_someone_else(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(audit.getpass, "getuser", lambda: "opsperson")
    assert audit.cli_actor(None) == ("opsperson", None)
    assert audit.cli_actor("opsperson") == ("opsperson", None)
    assert audit.cli_actor(" alice ") == ("opsperson", "alice")


def test_an_entry_rolls_back_with_the_change_it_describes(ops: Harness) -> None:
    target = synthetic.new_id("target")

    def change_that_fails() -> None:
        with ops.engine.begin() as connection:
            record_action(connection, action="x", actor="carol", reason=None, target=target, before=None, after=None)
            raise RuntimeError("the change failed")

    with pytest.raises(RuntimeError):
        change_that_fails()
    assert audit_about(ops.engine, target) == []


def test_list_audit_is_newest_first_and_since_leaves_older_entries_out(ops: Harness) -> None:
    target = synthetic.new_id("target")
    _record(ops, target, "first")
    with ops.engine.connect() as connection:
        middle = list_audit(connection, target=target)[0].at
    _record(ops, target, "second")
    with ops.engine.connect() as connection:
        assert [e.action for e in list_audit(connection, target=target)] == ["second", "first"]
        assert [e.action for e in list_audit(connection, target=target, since=middle + timedelta(microseconds=1))] == [
            "second"
        ]
        assert len(list_audit(connection, limit=1)) == 1
    entry = audit_about(ops.engine, target)[0]
    assert entry.before == {"tier": "free", "at": "2026-01-01T00:00:00+00:00"}  # stored as JSON


def test_record_action_needs_an_action_and_an_actor(ops: Harness) -> None:
    target = synthetic.new_id("target")
    for action, actor in (("x", " "), ("", "carol")):
        with pytest.raises(KamiyoError, match="an action and an actor"), ops.engine.begin() as connection:
            record_action(connection, action=action, actor=actor, reason=None, target=target, before=None, after=None)
    assert audit_about(ops.engine, target) == []


def test_default_actor_is_the_os_user_or_the_uid_without_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(audit.getpass, "getuser", lambda: "opsperson")
    assert default_actor() == "opsperson"

    def no_user() -> str:
        raise OSError("no username")

    monkeypatch.setattr(audit.getpass, "getuser", no_user)
    assert default_actor().startswith("uid:")
