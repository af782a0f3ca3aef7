"""A dry run's private copy of what applying reads and writes: TEMP tables in a read-only snapshot.

``kamiyo replay --dry-run`` (and the admin API's dry run) runs the very code that applies events,
so what it shows is what applying would do, each event seeing what the ones before it would have
done. It runs on a connection of its own, in a read transaction (SQLite: a deferred ``BEGIN``,
without the write lock; PostgreSQL: ``REPEATABLE READ``, made ``READ ONLY`` once the copies are
made), in which TEMP tables named like the real ones hold copies of the rows the selected events
can reach. Unqualified table names resolve to the temporary schema first, on SQLite and on
PostgreSQL alike, so every statement of the apply path reads and writes the copies, and the
database itself refuses a write to a real table (SQLite: an authorizer; PostgreSQL: the read-only
transaction). The connection is a fresh one (no statement prepared against the real tables) and
is closed at the end, its TEMP tables with it. A concurrent delivery or worker never waits for a
dry run: it holds no lock but a snapshot's.

What is copied, from the selected events' payloads (read as the handlers read them,
domain/links.py and domain/subscriptions.py): the events; the customers they name, and those of
the subscriptions they name; the users linked to those customers or named by an email or a
``client_reference_id``; every customer of those users and every subscription of those
customers; those users' overrides. The apply path reads nothing else (processing/store.py: a
customer or a subscription by id, a user by id or email, a user's subscriptions through their
customers, a user's override), so the dry run reads what applying would.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import orjson
from sqlalchemy import (
    BigInteger,
    Column,
    Connection,
    DefaultClause,
    Engine,
    ForeignKey,
    Index,
    MetaData,
    String,
    Table,
    func,
    insert,
    select,
    text,
)

from kamiyo.db.models import (
    customers_table,
    events_table,
    subscriptions_table,
    user_overrides_table,
    users_table,
)
from kamiyo.domain.links import link_hint, normalize_email
from kamiyo.domain.subscriptions import object_id
from kamiyo.processing.handlers import HANDLERS, sync_subscription

# Parents before children (the copies keep the foreign keys between them).
_SHADOWED = (users_table, customers_table, subscriptions_table, user_overrides_table, events_table)
_KEYS = "kamiyo_dry_run_"  # prefix of the TEMP tables of the keys the copies are selected by
_SUBSCRIPTION_TYPES = frozenset(t for t, handler in HANDLERS.items() if handler is sync_subscription)


@contextmanager
def snapshot(
    engine: Engine, select_ids: Callable[[Connection], Sequence[int]]
) -> Iterator[tuple[Connection, list[int]]]:
    """A connection whose transaction sees copies of what the events ``select_ids`` picks can reach
    (inbox ids, in the order to apply them); everything written to it is thrown away."""
    connection = engine.connect()
    connection.invalidate()  # a fresh connection: nothing prepared against the real tables
    try:
        if connection.dialect.name == "postgresql":
            connection = connection.execution_options(isolation_level="REPEATABLE READ")
        else:
            connection = connection.execution_options(readonly=True)  # db/engine.py: BEGIN, no write lock
        with connection.begin() as transaction:
            ids = list(select_ids(connection))
            sources = _real_tables(connection)
            _copy(connection, sources, ids)
            try:
                yield connection, ids
            finally:
                transaction.rollback()
    finally:
        connection.invalidate()  # its TEMP tables go with it
        connection.close()


def _real_tables(connection: Connection) -> dict[str, Table]:
    """The real tables, schema-qualified (the TEMP copies are about to take their plain names)."""
    sources: dict[str, Table] = {}
    metadata = MetaData()
    for table in _SHADOWED:
        if connection.dialect.name == "postgresql":
            schema = connection.execute(
                text(
                    "SELECT n.nspname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                    "WHERE c.oid = to_regclass(:name)"
                ),
                {"name": table.name},
            ).scalar_one()
        else:
            schema = "main"
        sources[table.name] = Table(
            table.name, metadata, *(Column(c.name, c.type) for c in table.columns), schema=schema
        )
    return sources


def _copies(metadata: MetaData) -> dict[str, Table]:
    """TEMP tables named like the real ones: their columns, defaults, keys, unique constraints (what
    the apply path's upserts rely on) and indexes, and foreign keys between the copies."""
    copies = {}
    for table in _SHADOWED:
        columns = []
        for c in table.columns:
            keys = [
                ForeignKey(f"{fk.column.table.name}.{fk.column.name}", ondelete=fk.ondelete) for fk in c.foreign_keys
            ]
            default: Any = c.server_default.arg if isinstance(c.server_default, DefaultClause) else None
            columns.append(
                Column(
                    c.name,
                    c.type,
                    *keys,
                    primary_key=c.primary_key,
                    nullable=c.nullable,
                    unique=bool(c.unique),
                    autoincrement=c.autoincrement,
                    server_default=default,
                )
            )
        copy = copies[table.name] = Table(table.name, metadata, *columns, prefixes=["TEMPORARY"])
        if table is not events_table:  # the copy of the inbox holds the selected events alone, read by id
            for index in table.indexes:  # a user's customers, a customer's subscriptions: as fast as for real
                Index(index.name, *(copy.c[c.name] for c in index.columns), unique=index.unique)
    return copies


def _copy(connection: Connection, sources: dict[str, Table], ids: list[int]) -> None:
    pg = connection.dialect.name == "postgresql"
    metadata = MetaData()
    copies = _copies(metadata)
    keys = {
        name: Table(_KEYS + name, metadata, Column("key", kind, primary_key=True), prefixes=["TEMPORARY"])
        for name, kind in (
            ("events", BigInteger()),
            ("customers", String(255)),
            ("subscriptions", String(255)),
            ("emails", String(320)),
            ("users", BigInteger()),
        )
    }
    metadata.create_all(connection, checkfirst=False)  # the real tables of these names exist
    if pg:
        # No more DDL from here on: the database refuses any write to a real table.
        connection.exec_driver_sql("SET TRANSACTION READ ONLY")
    else:
        _refuse_writes_to_main(connection)

    src, tmp, key = sources, copies, {name: table.c.key for name, table in keys.items()}
    if ids:
        connection.execute(insert(keys["events"]), [{"key": i} for i in dict.fromkeys(ids)])
    _copy_rows(
        connection, src["webhook_events"], tmp["webhook_events"], src["webhook_events"].c.id.in_(select(key["events"]))
    )

    customers, subscriptions, emails, users = _named(connection, tmp["webhook_events"])
    for name, values in (
        ("customers", customers),
        ("subscriptions", subscriptions),
        ("emails", emails),
        ("users", users),
    ):
        if values:
            connection.execute(insert(keys[name]), [{"key": v} for v in values])
    # The customers of the subscriptions named, as stored (the subscription's upsert keeps them).
    stored = (
        select(src["stripe_subscriptions"].c.customer_id)
        .where(
            src["stripe_subscriptions"].c.id.in_(select(key["subscriptions"])),
            src["stripe_subscriptions"].c.customer_id.not_in(select(key["customers"])),
        )
        .distinct()
    )
    connection.execute(insert(keys["customers"]).from_select(["key"], stored))

    s_users, s_customers, s_subs = src["users"], src["stripe_customers"], src["stripe_subscriptions"]
    linked = select(s_customers.c.user_id).where(s_customers.c.id.in_(select(key["customers"])))
    _copy_rows(
        connection,
        s_users,
        tmp["users"],
        s_users.c.id.in_(linked)
        | s_users.c.email.in_(select(key["emails"]))
        | s_users.c.id.in_(select(key["users"]))
        # The newest user, so that a user created here gets the id applying would give it.
        | (s_users.c.id == select(func.max(s_users.c.id)).scalar_subquery()),
    )
    _copy_rows(
        connection,
        s_customers,
        tmp["stripe_customers"],
        s_customers.c.id.in_(select(key["customers"])) | s_customers.c.user_id.in_(select(tmp["users"].c.id)),
    )
    _copy_rows(
        connection,
        s_subs,
        tmp["stripe_subscriptions"],
        s_subs.c.customer_id.in_(select(tmp["stripe_customers"].c.id)) | s_subs.c.id.in_(select(key["subscriptions"])),
    )
    s_overrides = src["user_overrides"]
    _copy_rows(connection, s_overrides, tmp["user_overrides"], s_overrides.c.user_id.in_(select(tmp["users"].c.id)))
    if pg:
        _continue_user_ids(connection, s_users)


def _copy_rows(connection: Connection, source: Table, copy: Table, where: Any) -> None:
    names = [c.name for c in copy.columns]
    connection.execute(insert(copy).from_select(names, select(*(source.c[n] for n in names)).where(where)))


def _named(connection: Connection, events: Table) -> tuple[set[str], set[str], set[str], set[int]]:
    """The customers, subscriptions, emails and user ids the events' payloads name."""
    customers: set[str] = set()
    subscriptions: set[str] = set()
    emails: set[str] = set()
    users: set[int] = set()
    for event_type, payload in connection.execute(select(events.c.type, events.c.payload)):
        try:
            obj = orjson.loads(payload)["data"]["object"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            continue
        if not isinstance(obj, dict):
            continue
        hint = link_hint(event_type, obj)
        customers.update(c for c in (hint.customer_id,) if c)
        emails.update(e for e in (hint.email,) if e)
        if hint.user_ref is not None:  # our user's id or email (Store._user_by_ref)
            if hint.user_ref.isdigit() and len(hint.user_ref) < 19:
                users.add(int(hint.user_ref))
            email = normalize_email(hint.user_ref)
            if email:
                emails.add(email)
        if event_type in _SUBSCRIPTION_TYPES:
            subscriptions.update(s for s in (object_id(obj.get("id")),) if s)
    return customers, subscriptions, emails, users


def _continue_user_ids(connection: Connection, users: Table) -> None:
    """PostgreSQL: the copy's id sequence continues where the real one is, so that a user created in
    the dry run gets the id applying would give it (reading a sequence does not advance it)."""
    real = connection.execute(
        text("SELECT pg_get_serial_sequence(:table, 'id')"), {"table": f"{users.schema}.{users.name}"}
    ).scalar_one()
    if real is None:
        return
    last, called = connection.execute(text(f"SELECT last_value, is_called FROM {real}")).one()
    copy = connection.execute(text("SELECT pg_get_serial_sequence('pg_temp.users', 'id')")).scalar_one()
    connection.execute(
        text("SELECT setval(:sequence, :next, false)"), {"sequence": copy, "next": last + 1 if called else last}
    )


def _refuse_writes_to_main(connection: Connection) -> None:
    """SQLite: from now on, a statement that would change a real table is refused when prepared."""
    driver: Any = connection.connection.driver_connection

    def authorize(action: int, _arg1: Any, _arg2: Any, database: str | None, _trigger: Any) -> int:
        if database == "main" and action in (sqlite3.SQLITE_INSERT, sqlite3.SQLITE_UPDATE, sqlite3.SQLITE_DELETE):
            return sqlite3.SQLITE_DENY
        return sqlite3.SQLITE_OK

    driver.set_authorizer(authorize)
