"""Durable storage of accepted events, with group commit.

Each request hands its row to one writer thread and waits. The thread takes every row that is
waiting (up to ``max_batch``), inserts them in ONE transaction with
``ON CONFLICT (stripe_event_id) DO NOTHING RETURNING stripe_event_id`` and commits, then wakes
the requests. A commit (an fsync on SQLite) is paid once per batch rather than once per request,
and no request is answered before its row is committed: the endpoint's 2xx means durable.

When the database itself fails (locked, full, unreachable: ``kamiyo.db.errors.is_database_fault``)
the whole batch fails at once and the writer backs off before its next write; only an error of
one row's data sends the batch again one row at a time, so that the other rows are stored.
The writer never waits longer than ``write_wait`` for SQLite's write lock, and reports how it
is doing (``activity``; ``kamiyo.webhooks.writer_health``), probing the database with a write
of its own when it has had nothing to write for a while.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from sqlalchemy import Connection, Dialect, Engine, delete

from kamiyo.db.driver import driver_connection, sqlalchemy_errors
from kamiyo.db.engine import WRITE_WAIT_OPTION, sqlite_write_lock
from kamiyo.db.errors import FULL, describe, fault_kind, is_database_fault
from kamiyo.db.models import events_table
from kamiyo.domain.outcomes import InboxStatus
from kamiyo.telemetry.delivery_stats import DeliveryKey, add_delivery_counts, minute_of
from kamiyo.webhooks.envelope import Envelope
from kamiyo.webhooks.writer_health import PROBE_SECONDS, WriterActivity, WriterHealth, judge

log = logging.getLogger("kamiyo.inbox")
delivery_log = logging.getLogger("kamiyo.webhook")  # the endpoint's logger: one line per delivery
_table = events_table
# After a database fault the writer waits before it writes again: BACKOFF_FIRST, doubling up to
# BACKOFF_MAX. What arrives meanwhile waits for that write (its delivery's own bound still holds).
BACKOFF_FIRST = 0.1
BACKOFF_MAX = 2.0


class InboxUnavailable(Exception):
    """The row's fate is unknown or it was not stored: the delivery must be retried (503)."""


@dataclass(slots=True)
class Pending:
    """A row waiting for its batch."""

    row: dict[str, Any]
    # Whoever waits for the row: (event loop, future) in this process, a number across processes
    # (inbox_process.py). The writer's ``resolve`` knows which.
    waiter: Any
    counted: bool = True


class Inbox(Protocol):
    """Where the webhook endpoint stores rows: ``InboxWriter`` here, or ``InboxProcess``."""

    async def store_event(
        self, envelope: Envelope, body: bytes, *, status: str, counted: bool = True, detail: str | None = None
    ) -> bool: ...

    def count_rejection(self, reason: str, event_type: str = "") -> None: ...

    def health(self) -> WriterHealth: ...


# Answers a batch's waiters: the outcomes (True: the event is new), or the error that failed it.
Resolver = Callable[[list[Pending], list[bool] | None, BaseException | None], None]


@dataclass(slots=True)
class _Count:
    """A rejected delivery to add to the delivery stats; nobody waits for it."""

    key: DeliveryKey


def inbox_row(
    envelope: Envelope,
    body: bytes,
    *,
    status: str,
    source: str = "webhook",
    received_at: datetime | None = None,
    detail: str | None = None,
) -> dict[str, Any]:
    """The inbox row for one verified event (``body`` is known to be UTF-8 JSON), received now
    unless ``received_at`` says when. ``detail``: why an event stored as ignored is ignored, when
    its type does not say it (an event of the other Stripe mode)."""
    return {
        "stripe_event_id": envelope.event_id,
        "type": envelope.type,
        "api_version": envelope.api_version,
        "created": envelope.created,
        "livemode": envelope.livemode,
        "object_id": envelope.object_id,
        "payload": body.decode("utf-8"),
        "source": source,
        "received_at": received_at or datetime.now(UTC),
        "status": status,
        "attempts": 0,
        "available_at": 0.0,
        "detail": detail,
    }


def insert_new_events(connection: Connection, rows: list[dict[str, Any]]) -> set[str]:
    """Insert ``rows`` (made by ``inbox_row``) in the open transaction; return the event ids that were new.

    One multi-row ``INSERT ... ON CONFLICT (stripe_event_id) DO NOTHING RETURNING`` per chunk of
    rows, rendered once per dialect and row count and sent to the driver as it is: the inbox
    writer's cost per row is then the driver's, not that of SQLAlchemy's per-row compilation.
    Values pass through the columns' own type conversions, so a row reads
    back exactly as one inserted through SQLAlchemy.
    """
    new: set[str] = set()
    if not rows:
        return new
    insert = _raw_insert(connection.dialect)
    for start in range(0, len(rows), _CHUNK_ROWS):
        chunk = rows[start : start + _CHUNK_ROWS]
        new.update(insert.execute(connection, chunk))
    return new


_CHUNK_ROWS = 256  # x 13 columns: far below SQLite's 32,766 and PostgreSQL's 65,535 parameters
_INBOX_COLUMNS = (
    "stripe_event_id",
    "type",
    "api_version",
    "created",
    "livemode",
    "object_id",
    "payload",
    "source",
    "received_at",
    "status",
    "attempts",
    "available_at",
    "detail",
)


class _RawInsert:
    """The inbox insert for one dialect: its SQL by row count, and the columns' bind conversions."""

    def __init__(self, dialect: Dialect) -> None:
        columns = [_table.c[name] for name in _INBOX_COLUMNS]
        preparer = dialect.identifier_preparer
        names = ", ".join(preparer.quote(c.name) for c in columns)
        self._head = f"INSERT INTO {preparer.format_table(_table)} ({names}) VALUES "
        key = preparer.quote("stripe_event_id")
        # PostgreSQL: numbered parameters, sent as they are through psycopg's RawCursor. With %s
        # markers psycopg would rewrite the statement for every batch (it caches that only for
        # statements of at most 50 parameters).
        self._numbered = dialect.name == "postgresql"
        self._width = len(columns)
        self._tail = f" ON CONFLICT ({key}) DO NOTHING RETURNING {key}"
        self._convert = [c.type.dialect_impl(dialect).bind_processor(dialect) for c in columns]
        self._sql: dict[int, str] = {}

    def sql(self, count: int) -> str:
        sql = self._sql.get(count)
        if sql is None:
            if self._numbered:
                rows = (
                    "(" + ", ".join(f"${row * self._width + n}" for n in range(1, self._width + 1)) + ")"
                    for row in range(count)
                )
            else:
                rows = ("(" + ", ".join(["?"] * self._width) + ")" for _ in range(count))
            sql = self._sql[count] = self._head + ", ".join(rows) + self._tail
        return sql

    def execute(self, connection: Connection, rows: list[dict[str, Any]]) -> list[str]:
        """Insert ``rows`` in the connection's transaction; the event ids that were new."""
        sql, parameters = self.sql(len(rows)), self.parameters(rows)
        with sqlalchemy_errors(connection, sql, None):
            driver = driver_connection(connection)
            if not self._numbered:
                # The sqlite3 cursor itself: no SQLAlchemy result object to build per row.
                return [row[0] for row in driver.execute(sql, parameters)]
            import psycopg

            with psycopg.RawCursor(driver) as cursor:
                cursor.execute(sql, parameters)
                return [row[0] for row in cursor.fetchall()]

    def parameters(self, rows: list[dict[str, Any]]) -> tuple[Any, ...]:
        values: list[Any] = []
        for row in rows:
            if len(row) != len(_INBOX_COLUMNS):
                raise ValueError(f"an inbox row has the columns {sorted(row)}, expected {sorted(_INBOX_COLUMNS)}")
            for name, convert in zip(_INBOX_COLUMNS, self._convert, strict=True):
                value = row[name]
                values.append(value if convert is None or value is None else convert(value))
        return tuple(values)


_raw_inserts: dict[str, _RawInsert] = {}


def _raw_insert(dialect: Dialect) -> _RawInsert:
    insert = _raw_inserts.get(dialect.name)
    if insert is None:
        insert = _raw_inserts[dialect.name] = _RawInsert(dialect)
    return insert


PROBE_EVENT_ID_PREFIX = "evt_kamiyo_writer_probe_"
# About the size of a Stripe event: on a database that can take no new page, a probe needs one
# just as a delivery does. After a batch was refused for want of space, the probe writes at least
# FULL_PROBE_BYTES and four times that batch (up to PROBE_MAX_BYTES) until it succeeds: a probe
# must not find room for one small row in a page and call the database writable while the
# deliveries it refused, which need pages of their own, still do not fit.
PROBE_BYTES = 4096
FULL_PROBE_BYTES = 64 * 1024
PROBE_MAX_BYTES = 4 * 1024 * 1024


def write_probe(connection: Connection, size: int = PROBE_BYTES) -> None:
    """Write what a delivery writes (a row of about ``size`` bytes), in the open transaction, and
    delete it again before the commit: the commit then proves that the inbox takes a row (the
    write lock, pages, the disk), and leaves nothing behind for anyone to see."""
    row = {
        "stripe_event_id": PROBE_EVENT_ID_PREFIX + secrets.token_hex(8),
        "type": "kamiyo.writer_probe",
        "api_version": None,
        "created": 0,
        "livemode": False,
        "object_id": None,
        "payload": '{"probe": "' + "x" * max(0, min(size, PROBE_MAX_BYTES) - 14) + '"}',
        "source": "probe",
        "received_at": datetime.now(UTC),
        "status": InboxStatus.IGNORED.value,
        "attempts": 0,
        "available_at": 0.0,
        "detail": None,
    }
    insert_new_events(connection, [row])
    connection.execute(delete(_table).where(_table.c.stripe_event_id == row["stripe_event_id"]))


class InboxWriter:
    """One thread that commits batches of inbox rows for the event loop's requests.

    With ``count_deliveries`` it also keeps ``webhook_delivery_stats``. The counts of stored
    deliveries and of rejections (``count_rejection``) gather in memory and are written at most
    every ``stats_seconds``, in the transaction of a batch of inserts (or, when no delivery comes,
    one of their own), not in every batch: an upsert per batch costs ingest throughput
    (docs/PERFORMANCE.md, "Metrics overhead"). A count is added only once the rows it counts are
    committed; a crash loses at most the last ``stats_seconds`` of counts, never an event.

    ``write_wait`` bounds each transaction's wait for SQLite's write lock (the engine's default
    otherwise). ``store_timeout`` and ``max_waiting`` bound ``store`` itself, for a writer that
    serves the event loop of its own process (``InboxProcess`` bounds its requests itself).
    """

    def __init__(
        self,
        engine: Engine,
        *,
        max_batch: int = 512,
        on_commit: Callable[[], None] | None = None,
        count_deliveries: bool = True,
        stats_seconds: float = 1.0,
        resolve: Resolver | None = None,
        write_wait: float | None = None,
        store_timeout: float | None = None,
        max_waiting: int | None = None,
        probe_seconds: float = PROBE_SECONDS,
    ) -> None:
        self._engine = engine
        self._write_engine = engine
        if write_wait is not None:
            self._write_engine = engine.execution_options(**{WRITE_WAIT_OPTION: write_wait})
        self._resolve = resolve or _resolve_futures
        self._max_batch = max_batch
        self._on_commit = on_commit
        self._count_deliveries = count_deliveries
        self._stats_seconds = stats_seconds
        self._stats_due = 0.0  # time.monotonic() from which pending counts go out with the next batch
        self._store_timeout = store_timeout
        self._max_waiting = max_waiting
        self._probe_seconds = probe_seconds
        # Counts not yet committed (kept across a failed batch, so an outage loses none).
        self._counts: dict[DeliveryKey, int] = {}
        self._queue: queue.SimpleQueue[Pending | _Count | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        # What ``activity`` reports, kept by the writer's thread.
        self._busy_since: float | None = None  # time.monotonic() when it took up its current work
        self._last_write = time.monotonic()  # when a write last committed or failed (probes wait after it)
        self._failure: tuple[str, str] | None = None  # (fault kind, description) of the last write, if it failed
        self._backoff = 0.0
        self._retry_at = 0.0  # no write before this time.monotonic()
        self._probe_bytes = PROBE_BYTES  # what the next probe writes (more after a batch found no room)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="kamiyo-inbox", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Finish what is queued, then stop."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout=30)
            self._thread = None

    def activity(self) -> WriterActivity:
        """How the writer is doing now (read from any thread)."""
        thread = self._thread
        if thread is None or not thread.is_alive():
            return WriterActivity(alive=False)
        now = time.monotonic()
        busy_since = self._busy_since
        lock = sqlite_write_lock(self._engine)
        failure = self._failure
        return WriterActivity(
            alive=True,
            busy_for=0.0 if busy_since is None else now - busy_since,
            lock_wait_for=0.0 if lock is None or thread.ident is None else lock.busy_for(thread.ident),
            failure=None if failure is None else failure[0],
            failure_detail="" if failure is None else failure[1],
        )

    def health(self) -> WriterHealth:
        """Whether this writer can store a delivery now (``/health`` when it runs in the server's process)."""
        return judge(self.activity())

    async def store_event(
        self, envelope: Envelope, body: bytes, *, status: str, counted: bool = True, detail: str | None = None
    ) -> bool:
        """Commit the inbox row of a verified delivery; True if the event is new (see ``store``)."""
        return await self.store(inbox_row(envelope, body, status=status, detail=detail), counted=counted)

    async def store(self, row: dict[str, Any], *, counted: bool = True) -> bool:
        """Commit ``row``; True if the event is new, False if its id was already stored.

        ``counted=False`` leaves the delivery out of the delivery stats (doctor's probe). Raises
        ``InboxUnavailable`` at once when ``max_waiting`` rows already wait, and when no answer
        came within ``store_timeout`` (the row may still be committed later: a retry of the
        delivery is then a duplicate).
        """
        if self._max_waiting is not None and self._queue.qsize() >= self._max_waiting:
            raise InboxUnavailable(f"{self._max_waiting} deliveries already wait for the inbox writer")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[bool] = loop.create_future()
        self.submit(row, (loop, future), counted=counted)
        if self._store_timeout is None:
            return await future
        try:
            return await asyncio.wait_for(future, self._store_timeout)
        except TimeoutError:
            raise InboxUnavailable(f"no answer from the inbox writer within {self._store_timeout:g} s") from None

    def submit(self, row: dict[str, Any], waiter: Any, *, counted: bool = True) -> None:
        """Queue ``row``; ``resolve`` answers ``waiter`` once its batch is committed (or failed)."""
        self._queue.put(Pending(row, waiter, counted))

    def count_rejection(self, reason: str, event_type: str = "") -> None:
        """Count a rejected delivery with the next batch; returns at once, never touches the database."""
        if self._count_deliveries:
            self._queue.put(_Count((minute_of(time.time()), "rejected", reason, event_type)))

    def _run(self) -> None:
        stopping = False
        while not stopping:
            self._busy_since = None
            batch: list[Pending | _Count] = []
            try:
                first = self._queue.get(timeout=self._idle_wait())
            except queue.Empty:
                pass  # nothing came: counts may be due, or a probe
            else:
                if first is None:
                    break
                batch.append(first)
            self._busy_since = time.monotonic()
            while batch and len(batch) < self._max_batch:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stopping = True
                    break
                batch.append(item)
            pending: list[Pending] = []
            for item in batch:
                if isinstance(item, _Count):
                    self._counts[item.key] = self._counts.get(item.key, 0) + 1
                else:
                    pending.append(item)
            self._commit(pending)
            if not pending and time.monotonic() - self._last_write >= self._probe_seconds:
                self._probe()
        self._busy_since = time.monotonic()
        if self._counts:
            self._commit([], final=True)

    def _idle_wait(self) -> float:
        """How long the writer may wait for work: until pending counts are due, or a probe."""
        now = time.monotonic()
        wait = self._last_write + self._probe_seconds - now
        if self._counts:
            wait = min(wait, self._stats_due - now)
        return max(0.0, wait)

    def _commit(self, batch: list[Pending], *, final: bool = False) -> bool:
        """Store ``batch`` (and the counts, when due) and answer its waiters; True if the database failed."""
        if not batch and not (self._counts and (final or time.monotonic() >= self._stats_due)):
            return False
        self._wait_out_backoff()
        try:
            outcomes = self._insert(batch, final=final)
        except Exception as exc:  # noqa: BLE001 - storage failed: every waiting request must hear it
            self._stats_due = time.monotonic() + self._stats_seconds  # no tight retry loop while it is down
            if is_database_fault(exc):
                # The database itself: every row would fail the same way, now. No row-by-row retry
                # (each would wait out the same lock or find the same full disk).
                self._failed(exc)
                if self._failure is not None and self._failure[0] == FULL:
                    refused = sum(len(item.row["payload"]) for item in batch)
                    self._probe_bytes = max(self._probe_bytes, FULL_PROBE_BYTES, 4 * refused)
                if batch:
                    log.error("inbox batch of %d not stored: %s", len(batch), describe(exc))
                    self._resolve(batch, None, exc)
                else:
                    log.error("delivery stats not stored (kept for the next batch): %s", describe(exc))
                return True
            self._stored()  # the database answered: it refused this data, not every write
            if len(batch) > 1:
                # One row the database refuses must not fail the deliveries batched with it.
                log.warning("inbox batch of %d failed (%s); storing one by one", len(batch), exc.__class__.__name__)
                self._commit_one_by_one(batch)
            elif batch:
                log.error("inbox commit failed for event %s: %s", batch[0].row["stripe_event_id"], describe(exc))
                self._resolve(batch, None, exc)
            else:
                log.error("delivery stats not stored (kept for the next batch): %s", describe(exc))
            return False
        if batch:
            self._stored()
        else:
            # Counts alone: an update in place, which proves little of a full database. Only a
            # delivery or a probe says the writer stores again.
            self._last_write = time.monotonic()
        self._resolve(batch, outcomes, None)
        if self._on_commit is not None and any(outcomes):
            self._on_commit()
        # The delivery's log line, written here rather than by the request: in kamiyo serve this
        # is the writer's process, and the event loop's time goes to the next request instead.
        for item, new in zip(batch, outcomes, strict=True):
            row = item.row
            delivery_log.info(
                "webhook %(outcome)s event=%(event)s type=%(type)s",
                {"outcome": "accepted" if new else "duplicate", "event": row["stripe_event_id"], "type": row["type"]},
            )
        return False

    def _commit_one_by_one(self, batch: list[Pending]) -> None:
        """Each row in a transaction of its own; a database fault on the way fails the rest at once."""
        for index, item in enumerate(batch):
            if self._commit([item]):
                rest = batch[index + 1 :]
                if rest:
                    self._resolve(rest, None, InboxUnavailable("the database failed; retry later"))
                return

    def _probe(self) -> None:
        """An idle writer's write: does the database still take a row?"""
        self._wait_out_backoff()
        try:
            with self._write_engine.begin() as connection:
                write_probe(connection, self._probe_bytes)
        except Exception as exc:  # noqa: BLE001 - whatever it is, the writer cannot store now
            if self._failure is None:
                log.error("inbox writer's probe write failed: %s", describe(exc))
            self._failed(exc)
            return
        self._stored()

    def _stored(self) -> None:
        if self._failure is not None:
            log.info("inbox writer stores again (after: %s)", self._failure[1])
        self._failure = None
        self._probe_bytes = PROBE_BYTES
        self._backoff = self._retry_at = 0.0
        self._last_write = time.monotonic()

    def _failed(self, exc: BaseException) -> None:
        kind = fault_kind(exc) if is_database_fault(exc) else "unavailable"
        self._failure = (kind, describe(exc))
        self._backoff = min(BACKOFF_MAX, self._backoff * 2 or BACKOFF_FIRST)
        self._last_write = time.monotonic()
        self._retry_at = self._last_write + self._backoff

    def _wait_out_backoff(self) -> None:
        delay = self._retry_at - time.monotonic()
        if delay > 0:
            time.sleep(delay)

    def _insert(self, batch: list[Pending], *, final: bool = False) -> list[bool]:
        """Insert the batch in one transaction; per item, True if its event was new."""
        # Two deliveries of one event in the same batch: the first is inserted, the rest
        # answer "duplicate", exactly as if they had come in separate batches.
        unique: dict[str, dict[str, Any]] = {}
        for item in batch:
            unique.setdefault(item.row["stripe_event_id"], item.row)
        with self._write_engine.begin() as connection:
            new_ids = insert_new_events(connection, list(unique.values())) if unique else set()
            outcomes: list[bool] = []
            for item in batch:
                event_id = item.row["stripe_event_id"]
                outcomes.append(event_id in new_ids)
                new_ids.discard(event_id)
            counts = _with_stored(self._counts, batch, outcomes) if self._count_deliveries else {}
            due = bool(counts) and (final or time.monotonic() >= self._stats_due)
            if due:
                add_delivery_counts(connection, counts)
        # Committed: the batch's counts are now either written or pending with the earlier ones.
        if due:
            self._counts = {}
            self._stats_due = time.monotonic() + self._stats_seconds
        else:
            self._counts = counts
        return outcomes


def _with_stored(pending: dict[DeliveryKey, int], batch: list[Pending], outcomes: list[bool]) -> dict[DeliveryKey, int]:
    """The pending counts plus one accepted or duplicate count per stored delivery, by minute and type."""
    counts = dict(pending)
    for item, new in zip(batch, outcomes, strict=True):
        if item.counted:
            row = item.row
            key = (minute_of(row["received_at"].timestamp()), "accepted" if new else "duplicate", "", row["type"])
            counts[key] = counts.get(key, 0) + 1
    return counts


def _resolve_futures(batch: list[Pending], outcomes: list[bool] | None, error: BaseException | None) -> None:
    """The waiters are futures of ``store``'s event loops."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[bool], bool | None]]] = {}
    for index, item in enumerate(batch):
        outcome = outcomes[index] if outcomes is not None else None
        loop, future = item.waiter
        by_loop.setdefault(loop, []).append((future, outcome))
    for loop, pairs in by_loop.items():
        # One wake-up of the event loop per batch, not one per request.
        loop.call_soon_threadsafe(_settle, pairs, error)


def _settle(pairs: list[tuple[asyncio.Future[bool], bool | None]], error: BaseException | None) -> None:
    for future, outcome in pairs:
        if future.done():
            continue
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(bool(outcome))
