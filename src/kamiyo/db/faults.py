"""Which kind of database fault an error is, in the words an operator acts on.

``kamiyo.db.errors.is_database_fault`` tells a failure of the database from an error of a
statement's data; ``fault_kind`` names the failure: the database is *locked* (another
transaction holds the write lock for longer than the wait allowed), *full* (the disk, or a
size limit, refuses another page) or *unavailable* (anything else: unreachable, restarted,
read-only, out of connections). Each calls for a different action, which ``kamiyo doctor``
names.
"""

from __future__ import annotations

from sqlalchemy.exc import StatementError

LOCKED, FULL, UNAVAILABLE = "locked", "full", "unavailable"

# SQLite's primary result codes (the low byte of an extended code).
_SQLITE_BUSY, _SQLITE_LOCKED, _SQLITE_FULL = 5, 6, 13
# PostgreSQL's SQLSTATEs: lock_not_available, deadlock_detected; disk_full, out_of_memory's class.
_PG_LOCKED = ("55P03", "40P01")
_PG_FULL = ("53100",)


def fault_kind(exc: BaseException) -> str:
    """``LOCKED``, ``FULL`` or ``UNAVAILABLE`` for an error ``is_database_fault`` calls a fault."""
    orig = exc.orig if isinstance(exc, StatementError) and exc.orig is not None else exc
    code = getattr(orig, "sqlite_errorcode", None)
    if isinstance(code, int):
        primary = code & 0xFF
        if primary in (_SQLITE_BUSY, _SQLITE_LOCKED):
            return LOCKED
        if primary == _SQLITE_FULL:
            return FULL
    sqlstate = getattr(orig, "sqlstate", None)
    if sqlstate in _PG_LOCKED:
        return LOCKED
    if sqlstate in _PG_FULL:
        return FULL
    message = str(orig).lower()
    if "database is locked" in message:
        return LOCKED
    if "disk is full" in message or "no space left" in message:
        return FULL
    return UNAVAILABLE
