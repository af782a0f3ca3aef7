"""Statements sent to the DBAPI driver as they are, inside SQLAlchemy's transaction.

The hot paths (the inbox writer, the worker's statements) skip SQLAlchemy's per-statement work,
which costs many times the statement itself on SQLite. These helpers keep what that path
would have given: the connection's transaction (begun if need be) and errors raised as
SQLAlchemy's ``DBAPIError`` classes, which the callers' retry and isolation logic handle.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from sqlalchemy import Connection, Dialect
from sqlalchemy.exc import DBAPIError, StatementError


def driver_connection(connection: Connection) -> Any:
    """The DBAPI connection of ``connection``'s transaction, begun as ``execute`` would begin it."""
    if not connection.in_transaction():
        connection.begin()
    driver = connection.connection.driver_connection
    assert driver is not None
    return driver


def as_sqlalchemy_error(dialect: Dialect, sql: str, params: Any, exc: Exception) -> StatementError:
    """The error SQLAlchemy's ``Connection.execute`` would have raised for the driver's ``exc``, with
    its parameters hidden as the service's engines hide them (``hide_parameters``)."""
    return DBAPIError.instance(sql, params, exc, dialect.loaded_dbapi.Error, hide_parameters=True, dialect=dialect)


@contextlib.contextmanager
def sqlalchemy_errors(connection: Connection, sql: str, params: Any) -> Iterator[None]:
    """Raise a driver error as SQLAlchemy would have raised it from ``Connection.execute``."""
    try:
        yield
    except connection.dialect.loaded_dbapi.Error as exc:
        raise as_sqlalchemy_error(connection.dialect, sql, params, exc) from exc
