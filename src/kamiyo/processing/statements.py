"""The apply engine's statements: SQLAlchemy Core, built once, run through SQLAlchemy's compiled
cache; the writes of many rows through ``BulkWrite``, ``ArrayInsert`` and ``InsertReturning``.

The differences between the dialects are here: how a list of keys travels, and how many rows are
inserted. On PostgreSQL a list is one array parameter (``= ANY (:keys)``), and many rows are one
INSERT of one array per column, unnested; on SQLite a list is one JSON text read by
``json_each``, and many rows go to the driver's ``executemany`` (or, for RETURNING, a multi-row
INSERT). Either way a statement's text never depends on how many keys or rows it is given
(SQLite's multi-row INSERT aside), so each is compiled once and prepared once, whatever the batch.

Row locks (PostgreSQL; SQLite has one writer and renders no ``FOR UPDATE``): customers, then
users, each in id order, taken by the load's first two statements. Every path that writes these
rows takes its locks that way, so that concurrent workers queue instead of deadlocking, and every
row is read after its lock is held (under READ COMMITTED a statement that starts after another
transaction committed sees what it wrote).
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

import orjson
from sqlalchemy import (
    BigInteger,
    ColumnElement,
    Connection,
    Dialect,
    String,
    bindparam,
    func,
    or_,
    select,
    tuple_,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.sql.expression import any_

from kamiyo.db.models import customers_table, subscriptions_table, user_overrides_table, users_table

_users = users_table
_customers = customers_table
_subs = subscriptions_table
_overrides = user_overrides_table


def keys_parameter(dialect_name: str, keys: Collection[Any]) -> Any:
    """The value of a key-list parameter (``in_keys``) for ``keys``."""
    if dialect_name == "postgresql":
        return list(keys)
    return orjson.dumps(list(keys)).decode()


def _in_keys(dialect_name: str, column: Any, name: str) -> ColumnElement[bool]:
    """``column`` is one of the keys of parameter ``name`` (``keys_parameter``)."""
    if dialect_name == "postgresql":
        item = BigInteger() if isinstance(column.type, BigInteger) else String()
        listed: ColumnElement[bool] = column == any_(bindparam(name, type_=postgresql.ARRAY(item)))
        return listed
    keys = func.json_each(bindparam(name, type_=String())).table_valued("value")
    within: ColumnElement[bool] = column.in_(select(keys.c.value).scalar_subquery())
    return within


class BulkWrite:
    """A Core INSERT or UPDATE run for many rows by the driver's ``executemany``.

    The statement is compiled once per dialect and set of row keys (``Compiled.string``, its
    parameters' order and their types' bind processors, all public API) and sent with
    ``Connection.exec_driver_sql``: a row's values go through the processors their types have
    (a datetime as SQLite's text, a JSON value through the engine's serializer, a boolean
    checked) and nothing else, where ``Connection.execute`` assembles every row's parameters anew.
    Rows carry exactly the statement's keys (the columns of an INSERT, the ``bindparam`` names of
    an UPDATE). Not for RETURNING (SQLite's ``executemany`` returns no rows): the engine sends
    those through ``Connection.execute``, which SQLAlchemy runs as multi-row INSERTs."""

    def __init__(self, statement: Any) -> None:
        self.statement = statement
        self._forms: weakref.WeakKeyDictionary[Dialect, dict[tuple[str, ...], _DriverForm]] = (
            weakref.WeakKeyDictionary()
        )

    def execute(self, connection: Connection, rows: Sequence[Mapping[str, Any]]) -> int:
        """Run the statement once per row; return how many rows it changed in all."""
        if not rows:
            return 0
        keys = tuple(rows[0])
        dialect = connection.dialect
        forms = self._forms.get(dialect)
        if forms is None:
            forms = self._forms.setdefault(dialect, {})
        form = forms.get(keys)
        if form is None:
            form = forms[keys] = _DriverForm(self.statement, dialect, keys)
        return int(connection.exec_driver_sql(form.sql, form.parameters(rows)).rowcount)


class _DriverForm:
    """A statement as one dialect's driver takes it: its text, and how a row becomes parameters."""

    def __init__(self, statement: Any, dialect: Dialect, keys: tuple[str, ...]) -> None:
        compiled = statement.compile(dialect=dialect, column_keys=list(keys) if statement.is_insert else None)
        self.sql = compiled.string
        self.positional = compiled.positional
        names = list(compiled.positiontup or ()) if compiled.positional else list(compiled.binds)
        self.columns = [
            (name, compiled.binds[name].type.dialect_impl(dialect).bind_processor(dialect)) for name in names
        ]
        # An INSERT renders a column the rows leave out when it has a default on the Python side:
        # its value is the default's constant (SQLAlchemy would compute it for each row).
        self.defaults: dict[str, Any] = {}
        for name in names:
            if name not in keys:
                default = statement.table.c[name].default if statement.is_insert else None
                if default is None or not default.is_scalar:
                    raise ValueError(f"BulkWrite: every row must give {name!r}")
                self.defaults[name] = default.arg
        self.processed = bool(self.defaults) or any(processor is not None for _, processor in self.columns)

    def parameters(self, rows: Sequence[Mapping[str, Any]]) -> list[Any]:
        if not self.processed:
            if self.positional:
                return [tuple([row[name] for name, _ in self.columns]) for row in rows]
            return list(rows)
        columns = [(name, None if processor is None else _last_value(processor)) for name, processor in self.columns]
        if self.defaults:
            rows = [{**self.defaults, **row} for row in rows]
        if self.positional:
            return [
                tuple([row[name] if processor is None else processor(row[name]) for name, processor in columns])
                for row in rows
            ]
        return [
            {name: row[name] if processor is None else processor(row[name]) for name, processor in columns}
            for row in rows
        ]


def _last_value(processor: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """``processor``, reusing its last result when given the same object again: the rows of a
    batch share their time (one ``datetime``), converted once instead of once per row."""
    last: list[Any] = [_NOTHING, None]

    def process(value: Any) -> Any:
        if value is not last[0]:
            last[0], last[1] = value, processor(value)
        return last[1]

    return process


_NOTHING = object()


SUBSCRIPTION_COLUMNS = (
    _subs.c.id,
    _subs.c.customer_id,
    _subs.c.status,
    _subs.c.tier,
    _subs.c.stripe_created,
    _subs.c.version_terminal,
    _subs.c.version_created,
    _subs.c.version_rank,
    _subs.c.version_event_id,
)


class Statements:
    """The statements of one dialect."""

    customers: Any
    users: Any

    def __init__(self, name: str, *, locked: bool) -> None:
        customer_columns = (
            _customers.c.id,
            _customers.c.user_id,
            _customers.c.email,
            _customers.c.email_seen_at,
            _customers.c.linked_by,
        )
        # Load: the batch's customers (locked), then its users (locked), then the other customers
        # of those users, then every subscription of all those customers or named by the batch.
        self.customers = (
            select(*customer_columns).where(_in_keys(name, _customers.c.id, "customer_ids")).order_by(_customers.c.id)
        )
        self.users = (
            select(
                _users.c.id,
                _users.c.email,
                _users.c.subscription_tier,
                _users.c.subscription_status,
                _users.c.stripe_customer_id,
                _overrides.c.tier,
                _overrides.c.expires_at,
            )
            .select_from(_users.outerjoin(_overrides, _overrides.c.user_id == _users.c.id))
            .where(or_(_in_keys(name, _users.c.id, "user_ids"), _in_keys(name, _users.c.email, "emails")))
            .order_by(_users.c.id)
        )
        if locked:
            self.customers = self.customers.with_for_update()
            self.users = self.users.with_for_update(of=_users)
        self.customers_of_users = select(*customer_columns).where(_in_keys(name, _customers.c.user_id, "user_ids"))
        self.subscriptions = select(*SUBSCRIPTION_COLUMNS).where(
            or_(
                _in_keys(name, _subs.c.id, "subscription_ids"),
                _in_keys(name, _subs.c.customer_id, "customer_ids"),
            )
        )
        # Flush. New rows: inserted unless there (RETURNING tells which were).
        self.insert_users = InsertReturning(
            name,
            _users,
            ("email", "subscription_tier", "subscription_status", "stripe_customer_id", "updated_at"),
            conflict="email",
            returning=(_users.c.id, _users.c.email),
        )
        self.record_customers = _inserts(name, _customers, ("id", "deleted"), _do_nothing_on_id)
        self.insert_customers = InsertReturning(
            name,
            _customers,
            ("id", "user_id", "email", "email_seen_at", "linked_by", "deleted"),
            conflict="id",
            returning=(_customers.c.id,),
        )
        self.upsert_subscriptions = _inserts(name, _subs, _SUBSCRIPTION_ROW_COLUMNS, _guarded_upsert)
        self.update_customers = update_by_id(
            _customers, user_id="user_id", email="email", email_seen_at="email_seen_at", linked_by="linked_by"
        )
        self.update_user_states = update_by_id(
            _users,
            subscription_tier="tier",
            subscription_status="status",
            stripe_customer_id="customer",
            updated_at="at",
        )
        self.update_user_customers = update_by_id(_users, stripe_customer_id="customer")


class ArrayInsert:
    """PostgreSQL: an INSERT of many rows as one statement, each column's values one array,
    unnested (``finish`` adds its ON CONFLICT clause, and RETURNING if any). One round trip and
    one parameter per column, where the driver's ``executemany`` sends and converts each row
    apart, and one statement text whatever the number of rows, where multi-row VALUES is another
    text for each batch size, beyond what psycopg keeps converted. Rows must not repeat a conflict
    key (PostgreSQL refuses to update one row twice in a statement)."""

    def __init__(self, table: Any, columns: tuple[str, ...], finish: Callable[[Any], Any]) -> None:
        self._columns = columns
        insert = postgresql.insert(table).from_select(list(columns), _unnested(table, columns))
        # SQLAlchemy keeps an INSERT's rowcount only when asked.
        self.statement = finish(insert).execution_options(preserve_rowcount=True)

    def parameters(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, list[Any]]:
        """``rows`` (each with exactly the columns given) as the statement's arrays."""
        return {f"a_{column}": [row[column] for row in rows] for column in self._columns}

    def execute(self, connection: Connection, rows: Sequence[Mapping[str, Any]]) -> int:
        """Insert ``rows``; return how many rows it changed."""
        if not rows:
            return 0
        return int(connection.execute(self.statement, self.parameters(rows)).rowcount)


class InsertReturning:
    """``INSERT ... ON CONFLICT DO NOTHING RETURNING`` of many rows in one statement: the rows
    inserted come back, those already there do not. On PostgreSQL an ``ArrayInsert``; on SQLite,
    SQLAlchemy's multi-row INSERT (``insertmanyvalues``)."""

    def __init__(
        self, name: str, table: Any, columns: tuple[str, ...], *, conflict: str, returning: tuple[Any, ...]
    ) -> None:
        def finish(stmt: Any) -> Any:
            return stmt.on_conflict_do_nothing(index_elements=[conflict]).returning(*returning)

        self._parameters: Callable[[Sequence[Mapping[str, Any]]], Any]
        if name == "postgresql":
            arrays = ArrayInsert(table, columns, finish)
            self._statement, self._parameters = arrays.statement, arrays.parameters
        else:
            self._statement, self._parameters = finish(sqlite.insert(table)), list

    def execute(self, connection: Connection, rows: Sequence[Mapping[str, Any]]) -> Sequence[Any]:
        """Insert ``rows`` (each with exactly the columns given); the rows RETURNING gave."""
        if not rows:
            return []
        return connection.execute(self._statement, self._parameters(rows)).all()


def _inserts(name: str, table: Any, columns: tuple[str, ...], finish: Callable[[Any], Any]) -> ArrayInsert | BulkWrite:
    """An INSERT of many rows that counts what it wrote: arrays on PostgreSQL, the driver's
    ``executemany`` on SQLite."""
    if name == "postgresql":
        return ArrayInsert(table, columns, finish)
    return BulkWrite(finish(sqlite.insert(table)))


def _unnested(table: Any, columns: tuple[str, ...]) -> Any:
    """``SELECT`` of rows from one array parameter per column (``a_<column>``, the column's type)."""
    arrays = [bindparam(f"a_{column}", type_=postgresql.ARRAY(table.c[column].type)) for column in columns]
    rows = func.unnest(*arrays).table_valued(*columns).render_derived()
    return select(*(rows.c[column] for column in columns))


def update_by_id(table: Any, **columns: str) -> BulkWrite:
    """``UPDATE table SET column = :b_<key>, ... WHERE id = :b_id`` for many rows: ``columns`` names
    the row key of each column's value (``b_`` and the key: a column's own name is reserved for
    SQLAlchemy's parameter of that column)."""
    values: dict[str, Any] = {column: bindparam(f"b_{key}") for column, key in columns.items()}
    return BulkWrite(update(table).where(table.c.id == bindparam("b_id")).values(values))


def _do_nothing_on_id(stmt: Any) -> Any:
    return stmt.on_conflict_do_nothing(index_elements=["id"])


# The columns of a subscription's row (engine.subscription_row): all of the table's.
_SUBSCRIPTION_ROW_COLUMNS = tuple(column.name for column in _subs.columns)


def _guarded_upsert(stmt: Any) -> Any:
    """``stmt`` (an INSERT into the subscriptions) ON CONFLICT DO UPDATE with the stale-write guard:
    a stored snapshot is only replaced by one of a greater version, whatever the engine decided
    and whoever else writes."""
    stored = tuple_(_subs.c.version_terminal, _subs.c.version_created, _subs.c.version_rank, _subs.c.version_event_id)
    incoming = tuple_(
        stmt.excluded.version_terminal,
        stmt.excluded.version_created,
        stmt.excluded.version_rank,
        stmt.excluded.version_event_id,
    )
    columns = [column.name for column in _subs.columns if column.name != "id"]
    return stmt.on_conflict_do_update(
        index_elements=["id"],
        set_={name: getattr(stmt.excluded, name) for name in columns},
        where=stored < incoming,
    )


@functools.cache
def statements(dialect_name: str, *, locked: bool) -> Statements:
    """The statements of a dialect; ``locked``: the load takes its row locks (not in a dry run)."""
    return Statements("postgresql" if dialect_name == "postgresql" else "sqlite", locked=locked)
