"""The apply engine's statements: SQLAlchemy Core, built once, run through SQLAlchemy's compiled cache.

The one difference between the dialects is here: how a list of keys travels. On PostgreSQL it is
one array parameter (``= ANY (:keys)``); on SQLite one JSON text read by ``json_each``. Either way
a statement's text never depends on how many keys it is given, so each is compiled once and
prepared once, whatever the batch.

Row locks (PostgreSQL; SQLite has one writer and renders no ``FOR UPDATE``): customers, then
users, each in id order, taken by the load's first two statements. Every path that writes these
rows takes its locks that way, so that concurrent workers queue instead of deadlocking, and every
row is read after its lock is held (under READ COMMITTED a statement that starts after another
transaction committed sees what it wrote).
"""

from __future__ import annotations

import functools
from collections.abc import Collection
from typing import Any

import orjson
from sqlalchemy import BigInteger, ColumnElement, String, bindparam, func, or_, select, tuple_, update
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
        dialect: Any = postgresql if name == "postgresql" else sqlite
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
        # Flush. New rows: inserted unless there (RETURNING tells which were), in the batch's order.
        self.insert_users = (
            dialect.insert(_users)
            .on_conflict_do_nothing(index_elements=["email"])
            .returning(_users.c.id, _users.c.email)
        )
        self.record_customers = dialect.insert(_customers).on_conflict_do_nothing(index_elements=["id"])
        self.insert_customers = (
            dialect.insert(_customers).on_conflict_do_nothing(index_elements=["id"]).returning(_customers.c.id)
        )
        self.upsert_subscriptions = subscription_upsert(name)
        self.update_customers = (
            update(_customers)
            .where(_customers.c.id == bindparam("b_id"))
            .values(
                user_id=bindparam("b_user_id"),
                email=bindparam("b_email"),
                email_seen_at=bindparam("b_email_seen_at"),
                linked_by=bindparam("b_linked_by"),
            )
        )
        self.update_user_states = (
            update(_users)
            .where(_users.c.id == bindparam("b_id"))
            .values(
                subscription_tier=bindparam("b_tier"),
                subscription_status=bindparam("b_status"),
                stripe_customer_id=bindparam("b_customer"),
                updated_at=bindparam("b_at"),
            )
        )
        self.update_user_customers = (
            update(_users).where(_users.c.id == bindparam("b_id")).values(stripe_customer_id=bindparam("b_customer"))
        )


def subscription_upsert(name: str) -> Any:
    """INSERT ... ON CONFLICT DO UPDATE with the stale-write guard: a stored snapshot is only
    replaced by one of a greater version, whatever the engine decided and whoever else writes."""
    dialect: Any = postgresql if name == "postgresql" else sqlite
    stmt = dialect.insert(_subs)
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
