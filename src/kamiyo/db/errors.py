"""Which database errors are the database's, and how an error is told without its data.

A *database fault* is a failure of the database itself, whatever the statement: unreachable or
restarted, locked, full, read-only, a statement or lock timeout, a pool with no connection to
give. Every statement of the moment would fail the same way, so the caller fails the whole
batch fast, backs off and tries again later; it is never held against one event. Anything else
a statement raises (``IntegrityError``, ``DataError``: a value the schema refuses) belongs to
the data it was given. ``fault_kind`` names a fault in the words an operator acts on: the
database is *locked* (another transaction holds the write lock for longer than the wait
allowed), *full* (the disk, or a size limit, refuses another page) or *unavailable* (anything
else: unreachable, restarted, read-only, out of connections); ``kamiyo doctor`` names the action.

``describe`` tells an error in one line for logs and stored errors: its class, the driver's
primary message and, on PostgreSQL, its SQLSTATE. Never the SQL's parameters (customers' emails)
nor PostgreSQL's ``DETAIL`` line, which repeats the offending values.
"""

from __future__ import annotations

from sqlalchemy.exc import DataError, DBAPIError, DisconnectionError, IntegrityError, StatementError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from kamiyo.scrub import clean

_MAX_MESSAGE = 300
LOCKED, FULL, UNAVAILABLE = "locked", "full", "unavailable"

# SQLite's primary result codes (the low byte of an extended code).
_SQLITE_BUSY, _SQLITE_LOCKED, _SQLITE_FULL = 5, 6, 13
# PostgreSQL's SQLSTATEs: lock_not_available, deadlock_detected; disk_full.
_PG_LOCKED = ("55P03", "40P01")
_PG_FULL = ("53100",)


def is_database_fault(exc: BaseException) -> bool:
    """True when ``exc`` is a failure of the database rather than of the data a statement carried."""
    if isinstance(exc, DisconnectionError | PoolTimeout):
        return True
    if isinstance(exc, DBAPIError):
        if exc.connection_invalidated:
            return True
        return not isinstance(exc, IntegrityError | DataError)
    return False


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


def describe(exc: BaseException) -> str:
    """``Class: message`` in one line, without SQL, parameters or the values PostgreSQL quotes."""
    name = exc.__class__.__name__
    if isinstance(exc, StatementError) and exc.orig is not None:
        orig = exc.orig
        diag = getattr(orig, "diag", None)
        primary = getattr(diag, "message_primary", None) if diag is not None else None
        message = primary or (str(orig).strip().splitlines() or [""])[0]
        sqlstate = getattr(orig, "sqlstate", None)
        if sqlstate:
            message = f"{message} (sqlstate {sqlstate})"
    else:
        message = (str(exc).strip().splitlines() or [""])[0]
    text = f"{name}: {message}" if message else name
    return clean(text[:_MAX_MESSAGE])
