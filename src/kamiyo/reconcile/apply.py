"""One page of subscriptions read from Stripe's API, applied as a set.

The rules are those of ``processing/store.py``, the webhook path, applied to up to 100
subscriptions with a handful of statements instead of a dozen per subscription:

- every snapshot goes through the very statement of ``Store.upsert_subscription`` (the
  stale-write guard in the upsert's WHERE), executed once with all the page's rows;
- a customer seen with an email is linked as ``Store.link_customer`` links it (the email is
  recorded if it is the newest seen; an unlinked customer is linked to the user with that email,
  who is created if there is none; a linked customer stays linked);
- every user of the page's customers gets the tier and status ``Store.recompute_user`` would
  give; a user with a manual override is handed to ``Store.recompute_user`` itself.

``tests/reconcile/test_apply.py`` checks, for any page and any stored state, that the result
is exactly that of ``Store``'s per-row calls.

Each statement is compiled once per dialect and run through ``exec_driver_sql`` with the driver's
own parameters (``_Compiled``): SQLAlchemy's per-execution work (cache key, parameter
construction for every row of an ``executemany``, expanding ``IN`` lists) cost more CPU than
the database spent on the page. Errors are still SQLAlchemy's (a deadlock is an
``OperationalError``, which ``sync.py`` retries). On PostgreSQL a list of ids is one array
parameter (``= ANY``), so that every page runs the same prepared statement, and the rows of an
INSERT or UPDATE are sent as one statement over arrays (``unnest``, a parameter per column)
rather than psycopg's statement per row: the upsert keeps the Store's columns, conflict target
and stale-write guard, taken from the compiled ``subscription_upsert`` itself; only the source
of its rows (``SELECT * FROM unnest(...)`` instead of ``VALUES``) differs, in the same order.
SQLite keeps ``executemany``, a loop in C.

Locks (PostgreSQL) follow the Store's order: subscription rows (the upsert), then customer rows,
then user rows (``FOR UPDATE`` before their subscriptions are read).
"""

from __future__ import annotations

import logging
import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from operator import itemgetter
from typing import Any

from sqlalchemy import Connection, bindparam, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Dialect

from kamiyo.db.models import customers_table, subscriptions_table, user_overrides_table, users_table
from kamiyo.domain.entitlement import SubscriptionState, UserState, user_state
from kamiyo.domain.subscriptions import Version
from kamiyo.domain.tiers import TierMap
from kamiyo.processing.store import Store, subscription_row, subscription_upsert
from kamiyo.reconcile.reader import SyncItem

log = logging.getLogger("kamiyo.state")
_users = users_table
_customers = customers_table
_subs = subscriptions_table
_overrides = user_overrides_table


@dataclass(frozen=True)
class UserDrift:
    """A user whose tier or status a page changed, and why."""

    user_id: int
    email: str
    before: UserState
    after: UserState
    reasons: tuple[str, ...]


@dataclass
class PageResult:
    stored: int = 0  # snapshots written (new, or newer than the stored one)
    kept: int = 0  # snapshots older than the stored one: left as is
    linked: int = 0  # customers linked to a user by email
    drift: list[UserDrift] = field(default_factory=list)


class _PageStatements:
    """The page's statements, built once per dialect (building a statement costs more than running it)."""

    def __init__(self, dialect: Any) -> None:
        self.stored_versions = select(
            _subs.c.id,
            _subs.c.status,
            _subs.c.tier,
            _subs.c.version_terminal,
            _subs.c.version_created,
            _subs.c.version_rank,
            _subs.c.version_event_id,
        ).where(_subs.c.id.in_(_ids()))
        self.ensure_customers = dialect.insert(_customers).on_conflict_do_nothing(index_elements=["id"])
        # No RETURNING: SQLite's executemany is then a loop in C. The statement decides which
        # snapshots win; the counts and reasons are read off the versions read just before.
        self.upsert_subscriptions = subscription_upsert(dialect)
        self.customers = (
            select(_customers.c.id, _customers.c.user_id, _customers.c.email, _customers.c.email_seen_at)
            .where(_customers.c.id.in_(_ids()))
            .with_for_update()
        )
        self.set_customer_email = (
            update(_customers)
            .where(_customers.c.id == bindparam("_id"))
            .values(email=bindparam("email"), email_seen_at=bindparam("email_seen_at"))
        )
        self.insert_users = dialect.insert(_users).on_conflict_do_nothing(index_elements=["email"])
        self.users_by_email = select(_users.c.id, _users.c.email).where(
            _users.c.email.in_(bindparam("emails", expanding=True))
        )
        self.link_customer = (
            update(_customers)
            .where(_customers.c.id == bindparam("_id"))
            .values(user_id=bindparam("_user"), linked_by="email")
        )
        self.set_user_customer = (
            update(_users).where(_users.c.id == bindparam("_user")).values(stripe_customer_id=bindparam("_id"))
        )
        self.lock_users = select(_users.c.id).where(_users.c.id.in_(_ids())).order_by(_users.c.id).with_for_update()
        # Each user, locked, with whether an override exists (then the Store decides, in full).
        self.users = (
            select(
                _users.c.id,
                _users.c.email,
                _users.c.subscription_tier,
                _users.c.subscription_status,
                _overrides.c.user_id.label("override"),
            )
            .select_from(_users.outerjoin(_overrides, _overrides.c.user_id == _users.c.id))
            .where(_users.c.id.in_(_ids()))
            .order_by(_users.c.id)
            .with_for_update(of=_users)
        )
        self.subscriptions = (
            select(_customers.c.user_id, _subs.c.id, _subs.c.status, _subs.c.tier, _subs.c.stripe_created)
            .join(_customers, _customers.c.id == _subs.c.customer_id)
            .where(_customers.c.user_id.in_(_ids()))
        )
        self.set_user_state = (
            update(_users)
            .where(_users.c.id == bindparam("_user"))
            .values(
                subscription_tier=bindparam("tier"), subscription_status=bindparam("status"), updated_at=bindparam("at")
            )
        )


def _ids() -> Any:
    return bindparam("ids", expanding=True)


_STATEMENTS = {"postgresql": _PageStatements(postgresql), "sqlite": _PageStatements(sqlite)}


class _Compiled:
    """One statement compiled once for a connection's dialect and run with the driver's own parameters.

    ``keys``: the columns an INSERT is given (as SQLAlchemy compiles it for parameters with those
    keys); the other columns' scalar Python defaults are filled in here, as SQLAlchemy would.
    An expanding ``IN`` list becomes ``= ANY (array)`` on PostgreSQL and a ``?`` per value on SQLite.
    On PostgreSQL the rows of an INSERT, or of an UPDATE by key of rows the transaction has
    already locked (``locked_update``), are sent as one statement over arrays (``unnest``).
    """

    def __init__(
        self, statement: Any, dialect: Dialect, keys: Sequence[str] | None = None, *, locked_update: bool = False
    ) -> None:
        if keys is None:
            compiled = statement.compile(dialect=dialect)
        else:  # an INSERT of a page's rows: no implicit RETURNING of each row's key
            compiled = statement.compile(dialect=dialect, column_keys=list(keys), for_executemany=True)
        self._sqlite = dialect.name == "sqlite"
        self._sql = compiled.string
        self._defaults: dict[str, Any] = {}
        for column in (*compiled.insert_prefetch, *compiled.update_prefetch):
            default = column.default
            if default is None or not getattr(default, "is_scalar", False):
                raise TypeError(f"{column}: only a scalar Python default can be filled in")
            self._defaults[column.key] = default.arg
        binds = {name: bind for bind, name in compiled.bind_names.items()}
        for name, bind in binds.items():  # a literal in the statement: .values(linked_by="email")
            if bind.value is not None and bind.callable is None and not bind.required and not bind.expanding:
                self._defaults.setdefault(name, bind.value)
        names = list(compiled.positiontup or ()) if self._sqlite else list(binds)
        processors = [binds[name].type.dialect_impl(dialect).bind_processor(dialect) for name in names]
        self._names = names
        self._get = itemgetter(*names) if len(names) > 1 else None
        self._process = [(i, process) for i, process in enumerate(processors) if process is not None]
        self._by_count: dict[int, str] = {}
        self._expanding: str | None = None
        expanding = [name for name, bind in binds.items() if bind.expanding]
        if expanding:
            if len(binds) != 1:
                raise TypeError("an expanding IN list must be the statement's only parameter")
            name = self._expanding = expanding[0]
            token = f"IN (__[POSTCOMPILE_{name}])"
            if token not in self._sql:
                raise TypeError(f"unexpected rendering of the IN list: {self._sql}")
            if self._sqlite:
                self._sql = self._sql.replace(token, "IN ({})")
            else:
                element = binds[name].type.compile(dialect=dialect)
                self._sql = self._sql.replace(token, f"= ANY (CAST({_array_parameter(name)} AS {element}[]))")
        # PostgreSQL: the rows of an INSERT (or of an UPDATE by key) as one statement over arrays,
        # a parameter per column (psycopg's executemany sends a statement per row: 30-90 us of
        # driver work and a server round each; a VALUES row each would be parsed anew each time).
        self._arrays: str | None = None
        if not self._sqlite and (getattr(statement, "is_insert", False) or locked_update):
            types = {name: bind.type.compile(dialect=dialect) for name, bind in binds.items()}
            self._arrays = (_insert_from_arrays if not locked_update else _update_from_arrays)(self._sql, types)

    def _params(self, values: dict[str, Any]) -> Any:
        if self._defaults:
            values = {**self._defaults, **values}
        if not self._sqlite:
            values = dict(values) if self._process else values
            for i, process in self._process:
                name = self._names[i]
                values[name] = process(values[name])
            return values
        row = self._get(values) if self._get is not None else tuple(values[name] for name in self._names)
        if not self._process:
            return row
        converted = list(row)
        for i, process in self._process:
            converted[i] = process(converted[i])
        return tuple(converted)

    def execute(self, connection: Connection, values: dict[str, Any] | list[dict[str, Any]]) -> Any:
        """One row of parameters, or (a list) the same statement for each row: ``executemany``,
        or on PostgreSQL for an INSERT one statement with all the rows."""
        if not isinstance(values, list):
            return connection.exec_driver_sql(self._sql, self._params(values))
        if self._arrays is None or len(values) < 2:
            return connection.exec_driver_sql(self._sql, [self._params(row) for row in values])
        columns: dict[str, list[Any]] = {name: [] for name in self._names}
        for row in values:
            converted = self._params(row)
            for name, column in columns.items():
                column.append(converted[name])
        return connection.exec_driver_sql(self._arrays, columns)

    def rows(self, connection: Connection, values: Sequence[Any]) -> Sequence[Any]:
        """The rows of a SELECT whose one parameter is an ``IN`` list, for ``values``."""
        if not values:
            return []
        if not self._sqlite:
            assert self._expanding is not None
            return connection.exec_driver_sql(self._sql, {self._expanding: list(values)}).all()
        count = len(values)
        sql = self._by_count.get(count)
        if sql is None:
            sql = self._by_count[count] = self._sql.format(", ".join("?" * count))
        return connection.exec_driver_sql(sql, tuple(values)).all()


_PLACEHOLDER = re.compile(r"%\((\w+)\)s(?:::[A-Z ()0-9]+)?")


def _array_parameter(name: str) -> str:
    """A list parameter, sent in binary (``%(name)b``): psycopg writes an array in text with a
    regular-expression search per element to decide its quoting, 3 to 13 times the CPU of the
    binary form (a timestamp column: 270 against 20 us per 100 values); the CAST around it
    fixes the type either way."""
    return f"%({name})b"


def _unnest(names: Sequence[str], types: dict[str, str]) -> str:
    return "unnest(" + ", ".join(f"CAST({_array_parameter(name)} AS {types[name]}[])" for name in names) + ")"


def _insert_from_arrays(sql: str, types: dict[str, str]) -> str:
    """``INSERT INTO t (a, b) VALUES (%(a)s, %(b)s) ON CONFLICT ...`` (PostgreSQL) as
    ``INSERT INTO t (a, b) SELECT * FROM unnest(%(a)b::A[], %(b)b::B[]) ON CONFLICT ...``: the same
    statement, its conflict clause and guard included, for every row of the arrays, in their order."""
    head, values, rest = sql.partition(" VALUES (")
    row, conflict, tail = rest.rpartition(") ON CONFLICT ")
    if not values or not conflict or not head.startswith("INSERT INTO "):
        raise TypeError(f"not an INSERT of one VALUES row with ON CONFLICT: {sql}")
    names = [placeholder.group(1) for placeholder in _PLACEHOLDER.finditer(row)]
    if _PLACEHOLDER.sub("", row).strip(", ") != "":
        raise TypeError(f"a VALUES row that is not all parameters: {sql}")
    return f"{head} SELECT * FROM {_unnest(names, types)} ON CONFLICT {tail}"


def _update_from_arrays(sql: str, types: dict[str, str]) -> str:
    """``UPDATE t SET a=%(a)s WHERE t.id = %(k)s`` (PostgreSQL) as
    ``UPDATE t SET a=v.a FROM unnest(%(a)b::A[], %(k)b::K[]) AS v(a, k) WHERE t.id = v.k``.

    Only for rows this transaction has already locked (``FOR UPDATE``): the order in which the
    join updates them then takes no lock in an order of its own.
    """
    match = re.fullmatch(r"(UPDATE \S+ SET )(.+) WHERE (\S+) = %\((\w+)\)s(?:::[A-Z ()0-9]+)?", sql)
    if match is None:
        raise TypeError(f"not an UPDATE of one row by its key: {sql}")
    head, assignments, key_column, key = match.groups()
    columns, names = [], []
    for assignment in assignments.split(", "):
        column, _, value = assignment.partition("=")
        placeholder = _PLACEHOLDER.fullmatch(value)
        if placeholder is None:
            raise TypeError(f"unexpected assignment {assignment!r} in {sql}")
        columns.append(f"{column}=v.{placeholder.group(1)}")
        names.append(placeholder.group(1))
    names.append(key)
    source = f"{_unnest(names, types)} AS v({', '.join(names)})"
    return f"{head}{', '.join(columns)} FROM {source} WHERE {key_column} = v.{key}"


class _CompiledPage:
    """``_PageStatements``, compiled for one dialect (``_compiled``)."""

    def __init__(self, sql: _PageStatements, dialect: Dialect) -> None:
        self.stored_versions = _Compiled(sql.stored_versions, dialect)
        self.ensure_customers = _Compiled(sql.ensure_customers, dialect, ["id"])
        self.upsert_subscriptions = _Compiled(sql.upsert_subscriptions, dialect)
        self.customers = _Compiled(sql.customers, dialect)
        # locked_update: rows locked just before (the customers, FOR UPDATE; the users, FOR UPDATE).
        self.set_customer_email = _Compiled(sql.set_customer_email, dialect, locked_update=True)
        self.insert_users = _Compiled(sql.insert_users, dialect, ["email", "subscription_tier"])
        self.users_by_email = _Compiled(sql.users_by_email, dialect)
        self.link_customer = _Compiled(sql.link_customer, dialect, locked_update=True)
        self.lock_users = _Compiled(sql.lock_users, dialect)
        self.set_user_customer = _Compiled(sql.set_user_customer, dialect, locked_update=True)  # after lock_users
        self.row_locks = dialect.name != "sqlite"  # SQLite locks the whole database: FOR UPDATE is not rendered
        self.users = _Compiled(sql.users, dialect)
        self.subscriptions = _Compiled(sql.subscriptions, dialect)
        self.set_user_state = _Compiled(sql.set_user_state, dialect, locked_update=True)


_COMPILED: dict[tuple[str, str, str], _CompiledPage] = {}


def _compiled(dialect: Dialect) -> _CompiledPage:
    """The page's statements for this dialect and driver (``sqlite``'s qmark, or PostgreSQL's pyformat)."""
    key = (dialect.name, dialect.driver, dialect.paramstyle)
    page = _COMPILED.get(key)
    if page is None:
        if key[2] != ("qmark" if dialect.name == "sqlite" else "pyformat"):
            raise TypeError(f"apply_page: {dialect.name}+{dialect.driver} ({dialect.paramstyle}) is not supported")
        page = _COMPILED[key] = _CompiledPage(_STATEMENTS[dialect.name], dialect)
    return page


def apply_page(connection: Connection, tiers: TierMap, items: Sequence[SyncItem], *, seen_at: int) -> PageResult:
    """Apply ``items`` in the open transaction; ``seen_at`` is when the API was read (Stripe's clock)."""
    result = PageResult()
    if not items:
        return result
    sql = _compiled(connection.dialect)
    # One snapshot per subscription id (a list page never repeats one; a caller's list might).
    unique = sorted({item.snapshot.id: item for item in reversed(items)}.values(), key=_lock_order)
    customer_ids = sorted({item.snapshot.customer_id for item in unique})
    reasons: dict[str, list[str]] = defaultdict(list)  # customer id -> what changed for it

    # 1. Store.upsert_subscription: the customer row, then the snapshot through the stale-write guard.
    before = {row.id: row for row in sql.stored_versions.rows(connection, [i.snapshot.id for i in unique])}
    sql.ensure_customers.execute(connection, [{"id": c} for c in customer_ids])
    sql.upsert_subscriptions.execute(connection, [subscription_row(i.snapshot) for i in unique])
    for item in unique:
        snap = item.snapshot
        old = before.get(snap.id)
        if old is not None and _version(old) >= snap.version:
            result.kept += 1
            continue
        result.stored += 1
        if old is None:
            reasons[snap.customer_id].append(f"{snap.id} was missing here; Stripe has it {snap.status} ({snap.tier})")
        elif (old.status, old.tier) != (snap.status, snap.tier):
            reasons[snap.customer_id].append(
                f"{snap.id} was {old.status} ({old.tier}) here; Stripe has it {snap.status} ({snap.tier})"
            )

    # 2. Store.link_customer(customer, email, None, seen_at) for each customer seen with an email.
    emails = {item.snapshot.customer_id: item.email for item in unique if item.email}
    links = {row.id: row for row in sql.customers.rows(connection, customer_ids)}
    newer_emails = [
        {"_id": cid, "email": email, "email_seen_at": seen_at}
        for cid, email in sorted(emails.items())
        if seen_at >= links[cid].email_seen_at and email != links[cid].email
    ]
    if newer_emails:
        sql.set_customer_email.execute(connection, newer_emails)
    user_of: dict[str, int | None] = {cid: row.user_id for cid, row in links.items()}
    unlinked = {cid: email for cid, email in sorted(emails.items()) if user_of.get(cid) is None}
    if unlinked:
        new_emails = sorted(set(unlinked.values()))
        sql.insert_users.execute(connection, [{"email": email, "subscription_tier": "free"} for email in new_emails])
        user_by_email = {row.email: int(row.id) for row in sql.users_by_email.rows(connection, new_emails)}
        new_links = [{"_id": cid, "_user": user_by_email[email]} for cid, email in unlinked.items()]
        sql.link_customer.execute(connection, new_links)
        # One row per user, the last of its customers in this order (as the rows one by one would
        # leave it), its row locked first in id order (PostgreSQL): then one UPDATE over arrays
        # instead of psycopg's statement per row (about 7 us per subscription of a first sync).
        customer_of = {link["_user"]: link["_id"] for link in new_links}
        if sql.row_locks:
            sql.lock_users.rows(connection, sorted(customer_of))
        sql.set_user_customer.execute(
            connection, [{"_id": cid, "_user": user_id} for user_id, cid in sorted(customer_of.items())]
        )
        for cid, email in unlinked.items():
            user_of[cid] = user_by_email[email]
            reasons[cid].append(f"customer {cid} linked by email")
            log.debug("customer linked customer=%s user_id=%s by=email", cid, user_by_email[email])
        result.linked = len(new_links)

    # 3. Store.recompute_user for every user of these customers.
    customers_of: dict[int, list[str]] = defaultdict(list)
    for cid in customer_ids:
        user_id = user_of.get(cid)
        if user_id is not None:
            customers_of[int(user_id)].append(cid)
    if customers_of:
        result.drift = _recompute(connection, sql, tiers, customers_of, reasons)
    return result


def _recompute(
    connection: Connection,
    sql: _CompiledPage,
    tiers: TierMap,
    customers_of: dict[int, list[str]],
    reasons: dict[str, list[str]],
) -> list[UserDrift]:
    user_ids = sorted(customers_of)
    users = {int(row.id): row for row in sql.users.rows(connection, user_ids)}
    overridden = {user_id for user_id, row in users.items() if row.override is not None}
    subscriptions: dict[int, list[SubscriptionState]] = defaultdict(list)
    for row in sql.subscriptions.rows(connection, [u for u in user_ids if u not in overridden]):
        subscriptions[int(row.user_id)].append(SubscriptionState(row.id, row.status, row.tier, row.stripe_created))

    drift: list[UserDrift] = []
    writes: list[dict[str, Any]] = []
    now = datetime.now(UTC)
    store: Store | None = None
    for user_id in user_ids:
        user = users[user_id]
        current = UserState(tier=user.subscription_tier, status=user.subscription_status)
        why = tuple(reason for cid in customers_of[user_id] for reason in reasons.get(cid, ()))
        if user_id in overridden:
            # An override decides instead of the subscriptions: the Store's own rule, in full.
            store = store or Store(connection, tiers)
            change = store.recompute_user(user_id)
            if change is not None:
                drift.append(UserDrift(user_id, user.email, change.before, change.after, (*why, "manual override")))
            continue
        after = user_state(subscriptions[user_id], tiers)
        if after is None or after == current:
            continue
        writes.append({"_user": user_id, "tier": after.tier, "status": after.status, "at": now})
        drift.append(UserDrift(user_id, user.email, current, after, why or (_UNEXPLAINED,)))
        log.debug(
            "user state changed user_id=%s email=%s tier=%s->%s status=%s->%s",
            user_id,
            user.email,
            current.tier,
            after.tier,
            current.status,
            after.status,
        )
    if writes:
        sql.set_user_state.execute(connection, writes)
    return drift


_UNEXPLAINED = "the users row disagreed with the subscriptions stored for it (a manual edit, or a missed event)"


def _version(row: Any) -> Version:
    return Version(row.version_terminal, row.version_created, row.version_rank, row.version_event_id)


def _lock_order(item: SyncItem) -> tuple[str, str]:
    """The worker's order on PostgreSQL: customer by customer, so the two queue rather than deadlock."""
    return item.snapshot.customer_id, item.snapshot.id
