"""Writes that apply events, all inside the caller's transaction.

Lock order, kept by every path so that concurrent workers on PostgreSQL cannot deadlock one
another within one event: subscription row → customer row → user row. Locking the customer row
before reading whether it is linked, and the user row before reading the user's subscriptions,
closes the write-skew gaps between two workers applying events of one customer at once.
(SQLite has a single writer, so ``FOR UPDATE`` is simply not rendered there.)

On SQLite, a worker's batch reads each customer, user and user's subscriptions once and keeps
them, up to date with its own writes, for its later events (``remember_batch``, batch_view.py).
"""

from __future__ import annotations

import functools
import logging
import operator
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, bindparam, select, tuple_, update
from sqlalchemy.dialects import postgresql, sqlite

from kamiyo.db.driver import as_sqlalchemy_error, driver_connection
from kamiyo.db.models import customers_table, subscriptions_table, user_overrides_table, users_table
from kamiyo.domain.entitlement import SubscriptionState, UserState, user_state
from kamiyo.domain.overrides import override_in_force, override_state
from kamiyo.domain.subscriptions import SubscriptionSnapshot
from kamiyo.domain.tiers import FREE, TierMap
from kamiyo.processing.batch_view import BatchView, CustomerRow, UserRow

log = logging.getLogger("kamiyo.state")
_users = users_table
_customers = customers_table
_subs = subscriptions_table
_overrides = user_overrides_table


def subscription_row(snap: SubscriptionSnapshot) -> dict[str, Any]:
    """The ``stripe_subscriptions`` row of a snapshot."""
    return {
        "id": snap.id,
        "customer_id": snap.customer_id,
        "status": snap.status,
        "tier": snap.tier,
        "price_ids": ",".join(snap.price_ids)[:2048],
        "livemode": snap.livemode,
        "stripe_created": snap.stripe_created,
        "current_period_end": snap.current_period_end,
        "cancel_at_period_end": snap.cancel_at_period_end,
        "cancel_at": snap.cancel_at,
        "canceled_at": snap.canceled_at,
        "ended_at": snap.ended_at,
        "trial_end": snap.trial_end,
        "version_terminal": snap.version.terminal,
        "version_created": snap.version.created,
        "version_rank": snap.version.rank,
        "version_event_id": snap.version.event_id,
        "updated_at": datetime.now(UTC),
    }


@functools.cache
def subscription_upsert(dialect: Any) -> Any:
    """INSERT ... ON CONFLICT DO UPDATE with the stale-write guard: a row is only replaced by a
    greater version. Built once per dialect; executed with one row, or with a page of rows
    (``reconcile/apply.py``), it is the same statement either way."""
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


class _Statements:
    """Every statement of the apply path, built once per dialect and run with bound parameters.

    Building a Core statement and computing its cache key costs several times more than
    running it; on the worker's hot path that was most of the time an event took.
    """

    def __init__(self, dialect: Any) -> None:
        self.upsert_subscription = subscription_upsert(dialect).returning(_subs.c.id)
        self.ensure_customer = dialect.insert(_customers).on_conflict_do_nothing(index_elements=["id"])
        self.customer_user = select(_customers.c.user_id).where(_customers.c.id == bindparam("cid")).with_for_update()
        self.customer_row = (
            select(_customers.c.user_id, _customers.c.email, _customers.c.email_seen_at)
            .where(_customers.c.id == bindparam("cid"))
            .with_for_update()
        )
        self.set_customer_email = (
            update(_customers)
            .where(_customers.c.id == bindparam("cid"))
            .values(email=bindparam("new_email"), email_seen_at=bindparam("seen_at"))
        )
        self.link_customer = (
            update(_customers)
            .where(_customers.c.id == bindparam("cid"))
            .values(user_id=bindparam("uid"), linked_by=bindparam("how"))
        )
        self.set_user_customer = (
            update(_users).where(_users.c.id == bindparam("uid")).values(stripe_customer_id=bindparam("cid"))
        )
        self.unset_user_customer = (
            update(_users)
            .where(_users.c.id == bindparam("uid"), _users.c.stripe_customer_id == bindparam("cid"))
            .values(stripe_customer_id=None)
        )
        self.user_by_id = select(_users.c.id).where(_users.c.id == bindparam("uid"))
        self.user_by_email = select(_users.c.id).where(_users.c.email == bindparam("address"))
        self.insert_user = dialect.insert(_users).on_conflict_do_nothing(index_elements=["email"])
        self.user_state = (
            select(_users.c.email, _users.c.subscription_tier, _users.c.subscription_status)
            .where(_users.c.id == bindparam("uid"))
            .with_for_update()
        )
        self.set_user_state = (
            update(_users)
            .where(_users.c.id == bindparam("uid"))
            .values(
                subscription_tier=bindparam("tier"),
                subscription_status=bindparam("status"),
                updated_at=bindparam("now"),
            )
        )
        self.user_subscriptions = (
            select(_subs.c.id, _subs.c.status, _subs.c.tier, _subs.c.stripe_created)
            .join(_customers, _customers.c.id == _subs.c.customer_id)
            .where(_customers.c.user_id == bindparam("uid"))
        )
        self.user_override = select(_overrides.c.tier, _overrides.c.expires_at).where(
            _overrides.c.user_id == bindparam("uid")
        )
        # user_state and user_override in one statement: SQLite only (see recompute_user).
        self.user_state_override = (
            select(
                _users.c.email,
                _users.c.subscription_tier,
                _users.c.subscription_status,
                _overrides.c.tier,
                _overrides.c.expires_at,
            )
            .select_from(_users.outerjoin(_overrides, _overrides.c.user_id == _users.c.id))
            .where(_users.c.id == bindparam("uid"))
            .with_for_update(of=_users)
        )


_STATEMENTS = {"postgresql": _Statements(postgresql), "sqlite": _Statements(sqlite)}

# The columns an INSERT of the apply path names. Every one is passed by the caller, so that the
# statement has no Python-side default left for SQLAlchemy to fill in (the driver runs it as is).
_INSERT_KEYS = {
    "ensure_customer": ["id", "email_seen_at", "deleted"],
    "insert_user": ["email", "subscription_tier"],
}


class _Compiled:
    """One statement rendered for one dialect: the SQL string, how to build its parameters, and
    how to read its result columns, exactly as SQLAlchemy would (same bind and result processors)."""

    __slots__ = ("_fast", "_processed", "binds", "positional", "results", "sql")

    def __init__(self, stmt: Any, dialect: Any, keys: list[str] | None) -> None:
        compiled = stmt.compile(dialect=dialect, column_keys=keys)
        if compiled.insert_prefetch or compiled.update_prefetch:
            raise AssertionError(f"statement needs Python-side defaults: {compiled.string}")
        self.sql: str = compiled.string
        self.positional: bool = bool(compiled.positional)
        names = list(compiled.positiontup) if compiled.positional else list(compiled.binds)
        # (parameter key, value when the caller has none, processor)
        self.binds: list[tuple[str, Any, Callable[[Any], Any] | None, bool]] = []
        for name in names:
            bind = compiled.binds[name]
            processor = bind.type.dialect_impl(dialect).bind_processor(dialect)
            self.binds.append((compiled.escaped_bind_names.get(name, name), bind.value, processor, bind.required))
        # Positional, every parameter given by the caller: one itemgetter, then the processors.
        self._fast: Callable[[Mapping[str, Any]], Any] | None = None
        if self.positional and self.binds and all(required for *_rest, required in self.binds):
            self._fast = operator.itemgetter(*(name for name, *_rest in self.binds))
        self._processed: list[tuple[int, Callable[[Any], Any]]] = []
        for n, bound in enumerate(self.binds):
            if bound[2] is not None:
                self._processed.append((n, bound[2]))
        columns = getattr(stmt, "selected_columns", None)
        if columns is None:
            returning = getattr(stmt, "_returning", ())
            columns = list(returning)
        self.results: list[Callable[[Any], Any] | None] = [
            column.type.dialect_impl(dialect).result_processor(dialect, None) for column in columns
        ]

    def parameters(self, given: Mapping[str, Any]) -> Any:
        if self._fast is not None:
            picked = self._fast(given)
            values = list(picked) if len(self.binds) > 1 else [picked]
            for n, process in self._processed:
                values[n] = process(values[n])
            return values
        values = []
        for name, default, processor, required in self.binds:
            value = given[name] if required or name in given else default
            values.append(processor(value) if processor is not None else value)
        if self.positional:
            return values
        return {name: value for (name, *_rest), value in zip(self.binds, values, strict=True)}

    def many(self, given: Sequence[Mapping[str, Any]]) -> list[Any]:
        return [self.parameters(one) for one in given]

    def rows(self, raw: Sequence[Sequence[Any]]) -> list[tuple[Any, ...]]:
        if not any(self.results):
            return [tuple(row) for row in raw]
        return [tuple(p(v) if p is not None else v for p, v in zip(self.results, row, strict=True)) for row in raw]


class _DriverStatements:
    """``_Statements`` rendered once for a live dialect, run on the DBAPI cursor of the open
    transaction. SQLAlchemy's per-statement path costs ~30 times more than the statement itself
    on SQLite; these are the handful of statements every event runs."""

    def __init__(self, dialect: Any) -> None:
        source = _STATEMENTS["postgresql" if dialect.name == "postgresql" else "sqlite"]
        self.by_name: dict[str, _Compiled] = {
            name: _Compiled(stmt, dialect, _INSERT_KEYS.get(name)) for name, stmt in vars(source).items()
        }


_DRIVER_STATEMENTS: dict[tuple[type, str, str], _DriverStatements] = {}
_DRIVER_LOCK = threading.Lock()


_COMPILED: dict[tuple[int, tuple[type, str, str]], tuple[Any, _Compiled]] = {}


def compiled_for(stmt: Any, dialect: Any) -> _Compiled:
    """``stmt`` (a module-level statement, built once) rendered once for a kind of dialect."""
    key = (id(stmt), dialect_key(dialect))
    found = _COMPILED.get(key)
    if found is None or found[0] is not stmt:
        with _DRIVER_LOCK:
            found = _COMPILED[key] = (stmt, _Compiled(stmt, dialect, None))
    return found[1]


def dialect_key(dialect: Any) -> tuple[type, str, str]:
    return (type(dialect), dialect.name, str(dialect.paramstyle))


def _driver_statements(dialect: Any) -> _DriverStatements:
    key = dialect_key(dialect)
    found = _DRIVER_STATEMENTS.get(key)
    if found is None:
        with _DRIVER_LOCK:
            found = _DRIVER_STATEMENTS.get(key)
            if found is None:
                found = _DRIVER_STATEMENTS[key] = _DriverStatements(dialect)
    return found


@dataclass(frozen=True)
class UserChange:
    user_id: int
    email: str
    before: UserState
    after: UserState


class Store:
    """The persistence operations event handlers need, bound to one open transaction.

    The statements run on the transaction's DBAPI cursor, rendered once per dialect
    (``_DriverStatements``); a database error comes out as SQLAlchemy's, as it would from
    ``Connection.execute``.

    ``deferred_logs``: when a list, the log lines of state changes are appended to it instead of
    being written, for the caller to write once its transaction commits (the worker's batches).
    """

    def __init__(self, connection: Connection, tiers: TierMap) -> None:
        self.connection = connection
        self.tiers = tiers
        self._driver = _driver_statements(connection.dialect).by_name
        self._single_writer = connection.dialect.name == "sqlite"
        self._dialect = connection.dialect
        self._dbapi_error: type[Exception] = connection.dialect.loaded_dbapi.Error
        self._raw: Any = None  # the DBAPI connection of the open transaction (see _run)
        self.deferred_logs: list[tuple[logging.Logger, int, str, tuple[Any, ...]]] | None = None
        # Customers whose row this transaction holds locked (so it exists until it ends): with
        # ``remember_batch`` on, ``ensure_customer`` skips them. On SQLite, ``_view`` holds the
        # rows the transaction has read. Whoever rolls back part of the transaction (a
        # savepoint) calls ``forget_batch``.
        self._locked_customers: set[str] | None = None
        self._view: BatchView | None = None

    def remember_batch(self) -> None:
        """For the rest of the transaction (a worker's batch), remember the customer rows it locks,
        and on SQLite the rows it reads (``batch_view.py``)."""
        self._locked_customers = set()
        if self._single_writer:
            self._view = BatchView()

    def forget_batch(self) -> None:
        """Part of the transaction was rolled back: what it wrote or locked may be gone."""
        if self._locked_customers is not None:
            self._locked_customers.clear()
        if self._view is not None:
            self._view = BatchView()

    def _locked(self, customer_id: str) -> None:
        if self._locked_customers is not None:
            self._locked_customers.add(customer_id)

    def _run(self, name: str, params: Mapping[str, Any]) -> Any:
        """Run one of ``_Statements`` on the DBAPI cursor of the connection's transaction.

        What ``driver_execute`` does, with the DBAPI connection kept for as long as the
        transaction is open and the error translated in a plain ``try``: on the worker's hot
        path, its per-statement look-ups and context manager cost more than SQLite's work."""
        compiled = self._driver[name]
        values = compiled.parameters(params)
        if self._raw is None or not self.connection.in_transaction():
            self._raw = driver_connection(self.connection)
        try:
            return self._raw.execute(compiled.sql, values)
        except self._dbapi_error as exc:
            raise as_sqlalchemy_error(self._dialect, compiled.sql, values, exc) from exc

    def _rows(self, name: str, params: Mapping[str, Any]) -> list[tuple[Any, ...]]:
        return self._driver[name].rows(self._run(name, params).fetchall())

    def _first(self, name: str, params: Mapping[str, Any]) -> tuple[Any, ...] | None:
        rows = self._rows(name, params)
        return rows[0] if rows else None

    def _info(self, message: str, *args: Any) -> None:
        if self.deferred_logs is not None:
            self.deferred_logs.append((log, logging.INFO, message, args))
        else:
            log.info(message, *args)

    # -- subscriptions ---------------------------------------------------------------------

    def upsert_subscription(self, snap: SubscriptionSnapshot) -> bool:
        """Store ``snap`` unless the stored snapshot is newer; True when it was stored.

        The stale-write guard lives in the upsert's WHERE, so it holds under any concurrency.
        """
        self.ensure_customer(snap.customer_id)
        # RETURNING, not rowcount: psycopg reports rowcount -1 for this upsert, which is truthy.
        stored = bool(self._rows("upsert_subscription", subscription_row(snap)))
        if stored and self._view is not None:
            customer = self._customer_row(snap.customer_id)
            state = SubscriptionState(snap.id, snap.status, snap.tier, snap.stripe_created)
            self._view.subscription_stored(state, customer.user_id if customer is not None else None)
        return stored

    # -- customers and users ---------------------------------------------------------------

    def ensure_customer(self, customer_id: str) -> None:
        if self._locked_customers is not None and customer_id in self._locked_customers:
            return  # this transaction holds the row locked: it exists
        if self._view is not None:
            # Read first: most customers exist already, and an INSERT that inserts nothing costs
            # SQLite about as much as one that does. A new row is known without reading it back.
            if self._customer_row(customer_id) is None:
                self._run("ensure_customer", {"id": customer_id, "email_seen_at": 0, "deleted": False})
                self._view.customers[customer_id] = CustomerRow(user_id=None, email=None, email_seen_at=0)
            return
        self._run("ensure_customer", {"id": customer_id, "email_seen_at": 0, "deleted": False})

    def customer_user(self, customer_id: str) -> int | None:
        """The user a customer is linked to, locking the customer row."""
        if self._view is not None:
            customer = self._customer_row(customer_id)
            return customer.user_id if customer is not None else None
        row = self._first("customer_user", {"cid": customer_id})
        if row is None:
            return None
        self._locked(customer_id)
        user_id: int | None = row[0]
        return user_id

    def link_customer(self, customer_id: str, email: str | None, user_ref: str | None, seen_at: int) -> str:
        """Record what an event says of a customer; link it to a user. Returns what happened.

        The first email seen for an unlinked customer links it (matching or creating the user);
        a linked customer stays linked, except that ``client_reference_id`` (our own user)
        moves it. Users whose subscriptions change hands are recomputed.
        """
        self.ensure_customer(customer_id)
        customer = self._customer_row(customer_id)
        if customer is None:
            raise AssertionError(f"customer {customer_id} vanished inside the transaction")
        linked_user = customer.user_id
        if email and seen_at >= customer.email_seen_at and email != customer.email:
            self._run("set_customer_email", {"cid": customer_id, "new_email": email, "seen_at": seen_at})
            customer.email, customer.email_seen_at = email, seen_at

        target: int | None = None
        how = ""
        if user_ref is not None:
            target = self._user_by_ref(user_ref)
            how = "client_reference_id"
        if target is None and linked_user is None and email:
            target = self._user_for_email(email)
            how = "email"
        if target is None or target == linked_user:
            return (
                f"customer {customer_id} already linked"
                if linked_user
                else f"customer {customer_id} not linked (no email yet)"
            )

        self._run("link_customer", {"cid": customer_id, "uid": target, "how": how})
        customer.user_id = target
        self._run("set_user_customer", {"uid": target, "cid": customer_id})
        if self._view is not None:
            self._view.subscriptions_moved(linked_user, target)
        self._info("customer linked customer=%s user_id=%s by=%s", customer_id, target, how)
        if linked_user is not None:
            # The previous user loses this customer's subscriptions: with none left, back to free.
            self._run("unset_user_customer", {"uid": linked_user, "cid": customer_id})
            self.recompute_user(linked_user, reset_when_none=True)
        self.recompute_user(target)
        return f"customer {customer_id} linked to user {target} by {how}"

    def _customer_row(self, customer_id: str) -> CustomerRow | None:
        """The customer's link and email, locking its row; None when there is no such customer."""
        if self._view is not None:
            known = self._view.customers.get(customer_id)
            if known is not None:
                return known
        row = self._first("customer_row", {"cid": customer_id})
        if row is None:
            return None
        self._locked(customer_id)
        customer = CustomerRow(*row)
        if self._view is not None:
            self._view.customers[customer_id] = customer
        return customer

    def _user_by_ref(self, ref: str) -> int | None:
        from kamiyo.domain.links import normalize_email

        if ref.isdigit() and len(ref) < 19:
            found = self._first("user_by_id", {"uid": int(ref)})
            if found is not None:
                return int(found[0])
        email = normalize_email(ref)
        if email is not None:
            found = self._first("user_by_email", {"address": email})
            return int(found[0]) if found is not None else None
        return None

    def _user_for_email(self, email: str) -> int:
        """The user with ``email``, created (tier free) if there is none."""
        self._run("insert_user", {"email": email, "subscription_tier": FREE})
        found = self._first("user_by_email", {"address": email})
        if found is None:
            raise AssertionError(f"user {email} neither found nor created")
        return int(found[0])

    def recompute_user(self, user_id: int, *, reset_when_none: bool = False) -> UserChange | None:
        """Derive the user's tier and status from all of their subscriptions; write if changed.

        A manual override in force (``kamiyo users set-tier``) wins over the subscriptions, and
        since every path that applies a change ends here (webhooks, replay, sync), over all of
        them. A user with no subscriptions at all is left as is (nothing we know contradicts
        it), unless ``reset_when_none``: their subscriptions just moved to another user, or
        their override ended.
        """
        after: UserState | None
        if self._single_writer:
            # SQLite: nothing can change between statements of a write transaction, so the
            # override is read along with the user row (derived_state in one statement fewer).
            known = self._user_row(user_id)
            email, tier, status = known.email, known.tier, known.status
            if known.override_tier is not None and override_in_force(known.override_expires, datetime.now(UTC)):
                after = override_state(str(known.override_tier))
            else:
                after = self.stripe_state(user_id)
                if after is None and reset_when_none:
                    after = UserState(tier=FREE, status=None)
        else:
            # PostgreSQL: the override and the subscriptions are read by statements that start
            # once the user row is locked, so that they see what the lock holder committed.
            user = self._first("user_state", {"uid": user_id})
            if user is None:
                raise AssertionError(f"no user {user_id}")
            email, tier, status = user
            after = self.derived_state(user_id, reset_when_none=reset_when_none)
        before = UserState(tier=tier, status=status)
        if after is None or after == before:
            return None
        self._run(
            "set_user_state", {"uid": user_id, "tier": after.tier, "status": after.status, "now": datetime.now(UTC)}
        )
        if self._view is not None:
            self._view.user_state_written(user_id, after.tier, after.status)
        self._info(
            "user state changed user_id=%s email=%s tier=%s->%s status=%s->%s",
            user_id,
            email,
            before.tier,
            after.tier,
            before.status,
            after.status,
        )
        return UserChange(user_id, email, before, after)

    def _user_row(self, user_id: int) -> UserRow:
        """SQLite: the user row with the user's override, in one statement (or from the view)."""
        if self._view is not None:
            known = self._view.users.get(user_id)
            if known is not None:
                return known
        row = self._first("user_state_override", {"uid": user_id})
        if row is None:
            raise AssertionError(f"no user {user_id}")
        user = UserRow(*row)
        if self._view is not None:
            self._view.users[user_id] = user
        return user

    def derived_state(self, user_id: int, *, reset_when_none: bool = False) -> UserState | None:
        """What the user's tier and status should be: an override in force, else Stripe's state."""
        override_tier = self.override_tier(user_id)
        if override_tier is not None:
            return override_state(override_tier)
        state = self.stripe_state(user_id)
        if state is None and reset_when_none:
            return UserState(tier=FREE, status=None)
        return state

    def stripe_state(self, user_id: int) -> UserState | None:
        """The tier and status the user's subscriptions give; None when they have none."""
        states = self._view.subscriptions(user_id) if self._view is not None else None
        if states is None:
            states = [SubscriptionState(*row) for row in self._rows("user_subscriptions", {"uid": user_id})]
            if self._view is not None:
                self._view.set_subscriptions(user_id, states)
        return user_state(states, self.tiers)

    def override_tier(self, user_id: int) -> str | None:
        """The tier of the user's manual override if one is in force now (an expired one is ignored
        even before the worker's sweep deletes it)."""
        row = self._first("user_override", {"uid": user_id})
        if row is None or not override_in_force(row[1], datetime.now(UTC)):
            return None
        return str(row[0])
