"""The append-only audit log of manual actions: who, when, why, before and after.

Nothing in kamiyo updates or deletes an entry, and the database refuses to (triggers from
migration 0005; on SQLite also an INSERT OR REPLACE of an existing id, migration 0007).
``record_action`` writes inside the caller's transaction, so an entry exists exactly when the
change it describes was committed.

The actor is who is proven to act: the name of the admin token that signed in or sent the
request, or the OS user running the CLI (shell access is the credential). A name given without
proof (the console's name field, ``X-Kamiyo-Actor``, ``--by`` when it is not the OS user) is
kept beside it as ``claimed_by``, never as the actor.
"""

from __future__ import annotations

import getpass
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
from sqlalchemy import Connection, insert, select

from kamiyo.db.models import audit_log_table
from kamiyo.domain.overrides import as_utc
from kamiyo.errors import KamiyoError

_audit = audit_log_table


@dataclass(frozen=True)
class AuditEntry:
    """One manual action. ``at`` is an aware UTC datetime; ``before``/``after`` are JSON objects."""

    id: int
    at: datetime
    action: str
    actor: str
    reason: str | None
    target: str | None
    before: dict[str, Any] | None
    after: dict[str, Any] | None
    claimed_by: str | None = None


def default_actor() -> str:
    """Who runs this process: the OS user (``--by`` overrides it on every command)."""
    try:
        return getpass.getuser()
    except (OSError, KeyError):  # no passwd entry and no LOGNAME/USER, e.g. an arbitrary container uid
        return f"uid:{os.getuid()}" if hasattr(os, "getuid") else "unknown"


def cli_actor(by: str | None) -> tuple[str, str | None]:
    """The CLI's actor and claim: the OS user, and ``--by`` beside it when it names someone else."""
    actor = default_actor()
    claimed = (by or "").strip()[:255] or None
    return actor, (claimed if claimed != actor else None)


def record_action(
    connection: Connection,
    *,
    action: str,
    actor: str,
    reason: str | None,
    target: str | None,
    before: dict[str, Any] | None,
    after: dict[str, Any] | None,
    claimed_by: str | None = None,
) -> None:
    """Append one entry, in the caller's transaction (it commits or rolls back with the change).

    ``claimed_by``: a name the actor gave without proving it, kept beside the actor.
    """
    if not action.strip() or not actor.strip():
        raise KamiyoError("an audit entry needs an action and an actor")
    connection.execute(
        insert(_audit).values(
            at=datetime.now(UTC),
            action=action.strip()[:64],
            actor=actor.strip()[:255],
            reason=(reason or "").strip() or None,
            target=target[:400] if target else None,
            before=_plain(before),
            after=_plain(after),
            claimed_by=(claimed_by or "").strip()[:255] or None,
        )
    )


def list_audit(
    connection: Connection, *, since: datetime | None = None, limit: int = 200, target: str | None = None
) -> list[AuditEntry]:
    """Entries newest first, optionally from ``since`` on and about one ``target``."""
    query = select(_audit).order_by(_audit.c.id.desc()).limit(max(1, min(limit, 100_000)))
    if since is not None:
        query = query.where(_audit.c.at >= as_utc(since))
    if target is not None:
        query = query.where(_audit.c.target == target)
    return [
        AuditEntry(
            id=row.id,
            at=as_utc(row.at),
            action=row.action,
            actor=row.actor,
            reason=row.reason,
            target=row.target,
            before=row.before,
            after=row.after,
            claimed_by=row.claimed_by,
        )
        for row in connection.execute(query)
    ]


def _plain(value: dict[str, Any] | None) -> dict[str, Any] | None:
    """JSON-ready (datetimes and dataclasses become strings and objects) before the JSON column sees it."""
    if value is None:
        return None
    plain: dict[str, Any] = orjson.loads(orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS))
    return plain
