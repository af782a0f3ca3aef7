"""Reading a sync's pages: the API's list turned into snapshots, ahead of the page being applied.

Reading (HTTP, JSON, ``read_subscription``) and applying (SQL) each cost about as much CPU per
page. This module imports neither SQLAlchemy nor the database layer: a reader process starts
in a fraction of a second. ``ThreadReader`` reads in a thread of this process, one or two pages ahead: the API's
latency overlaps the database's, but the two share one core (the GIL). ``ProcessReader``
reads in a child process, so that a full sync uses two cores; it needs a gateway that can be
rebuilt there from its settings (``StripeApiGateway``) and no database (a full, unscoped sync);
while the child starts, the first pages are read in this process.

Either way at most two pages wait between reader and writer: memory stays flat however many
subscriptions there are. A failure while reading is raised in the consumer, at the point the
page would have come.
"""

from __future__ import annotations

import logging
import multiprocessing
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from kamiyo.domain.links import normalize_email
from kamiyo.domain.subscriptions import SubscriptionSnapshot, read_subscription
from kamiyo.domain.tiers import TierMap
from kamiyo.errors import ApplyError, KamiyoError
from kamiyo.heap import settle
from kamiyo.logs import current_log_format
from kamiyo.reconcile.gateway import GatewayConfig, Page, StripeApiGateway, StripeGateway, read_version_created

log = logging.getLogger("kamiyo.reconcile")
SYNC_EVENT_TYPE = "sync"
_DEPTH = 2  # pages read ahead
_POLL_SECONDS = 0.2


@dataclass(frozen=True)
class SyncItem:
    """A subscription as read from the API, with its customer's email (normalised) if Stripe has one."""

    snapshot: SubscriptionSnapshot
    email: str | None


@dataclass(frozen=True)
class ReadPage:
    """One page of the list, read: what to apply, what could not be read, and where it ends."""

    items: list[SyncItem]
    problems: list[str]
    listed: int  # subscriptions on the page (items + problems)
    last_id: str  # the page's last subscription: the cursor once the page is applied
    read_at: int


def list_pages(gateway: StripeGateway, *, customer: str | None, starting_after: str | None) -> Iterator[Page]:
    """Every page of the subscription list (of one customer, or all), from ``starting_after`` on."""
    while True:
        page = gateway.list_subscriptions(customer=customer, starting_after=starting_after)
        if page.data:
            yield page
        if not page.has_more or not page.data:
            return
        starting_after = str(page.data[-1]["id"])


def read_page(page: Page, tiers: TierMap, label: str) -> ReadPage:
    """Snapshots of a page's subscriptions, versioned as state verified at the read; the rest as problems."""
    created = read_version_created(page.read_at)
    items, problems = [], []
    for obj in page.data:
        try:
            snapshot = read_subscription(obj, tiers, created=created, event_type=SYNC_EVENT_TYPE, event_id=label)
        except (ApplyError, ValueError) as exc:
            problems.append(f"{obj.get('id', '<no id>')}: {exc}")
            continue
        items.append(SyncItem(snapshot, _customer_email(obj.get("customer"))))
    return ReadPage(items, problems, len(page.data), str(page.data[-1].get("id")), page.read_at)


def _customer_email(customer: Any) -> str | None:
    """The expanded customer's email; None for a bare id or a deleted customer."""
    if not isinstance(customer, dict) or customer.get("deleted"):
        return None
    return normalize_email(customer.get("email"))


class ThreadReader:
    """Read ``pages`` in a thread of this process, ``_DEPTH`` pages ahead."""

    def __init__(self, pages: Iterator[Page], tiers: TierMap, label: str) -> None:
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=_DEPTH)
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=_produce, args=(pages, tiers, label, self._put), name="kamiyo-sync-read", daemon=True
        )
        self._thread.start()

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=_POLL_SECONDS)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> Iterator[ReadPage]:
        while (page := _page(self._queue.get())) is not None:
            yield page

    def close(self) -> None:
        self._stop.set()


class ProcessReader:
    """Read a full sync's pages in a child process (see the module docstring).

    A child is a new interpreter that imports ``stripe`` before its first request, which takes
    long next to a sync's first pages. Until it says it is ready, this process reads the
    first pages itself (the writer would otherwise wait for them); it then hands the child the
    cursor after the last page it read, and the child reads the rest. Should the child never
    become ready, this process reads the whole list.
    """

    def __init__(self, gateway: StripeApiGateway, tiers: TierMap, label: str, starting_after: str | None) -> None:
        context = multiprocessing.get_context("spawn")  # no fork of a process that holds threads and connections
        self._gateway, self._tiers, self._label, self._starting_after = gateway, tiers, label, starting_after
        self._queue: Any = context.Queue(maxsize=_DEPTH)
        self._start: Any = context.Queue(maxsize=1)  # (cursor,): read after it; None: nothing left to read
        self._ready: Any = context.Event()
        self._stop: Any = context.Event()
        self._process = context.Process(
            target=_read_in_child,
            args=(
                gateway.config(),
                tiers,
                label,
                self._start,
                self._queue,
                self._ready,
                self._stop,
                logging.getLogger().level,
                current_log_format(),
            ),
            name="kamiyo-sync-read",
            daemon=True,
        )
        self._process.start()

    def __iter__(self) -> Iterator[ReadPage]:
        cursor, read_here = self._starting_after, 0
        while not self._ready.is_set():
            listed = self._gateway.list_subscriptions(customer=None, starting_after=cursor)
            if listed.data:
                read_here += 1
                yield read_page(listed, self._tiers, self._label)
            if not listed.has_more or not listed.data:
                self._start.put(None)
                return
            cursor = str(listed.data[-1]["id"])
        log.debug("sync reader process ready after %d pages read here; it reads after %s", read_here, cursor)
        self._start.put((cursor,))
        while True:
            try:
                item = self._queue.get(timeout=_POLL_SECONDS)
            except queue.Empty:
                if not self._process.is_alive():
                    raise KamiyoError(
                        f"the sync's reader process ended unexpectedly ({self._process.exitcode})"
                    ) from None
                continue
            page = _page(item)
            if page is None:
                return
            yield page

    def close(self) -> None:
        self._stop.set()
        self._process.join(timeout=2)
        if self._process.is_alive():
            self._process.terminate()
            self._process.join(timeout=2)


_DONE = "done"


@dataclass(frozen=True)
class _Failure:
    error: BaseException


def _produce(pages: Iterator[Page], tiers: TierMap, label: str, put: Callable[[Any], bool]) -> None:
    try:
        for page in pages:
            if not put(read_page(page, tiers, label)):
                return
    except BaseException as exc:  # noqa: BLE001 - handed to the consumer, raised there
        put(_Failure(exc))
        return
    put(_DONE)


def _page(item: Any) -> ReadPage | None:
    """What the reader handed over: a page, the end (None), or its failure (raised)."""
    if isinstance(item, _Failure):
        raise item.error
    return None if isinstance(item, str) else item  # _DONE


def _read_in_child(
    config: GatewayConfig,
    tiers: TierMap,
    label: str,
    start: Any,
    pages_out: Any,
    ready: Any,
    stop: Any,
    log_level: int,
    log_format: str,
) -> None:
    """The child process: once ready, take the cursor from ``start``, then list, read and hand
    over pages until the list ends or ``stop`` is set."""
    from kamiyo.logs import configure_logging

    configure_logging(logging.getLevelName(log_level) if log_level else "WARNING", log_format=log_format)

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                pages_out.put(item, timeout=_POLL_SECONDS)
                return True
            except queue.Full:
                continue
        pages_out.cancel_join_thread()  # nobody reads any more: exit without flushing to the pipe
        return False

    try:
        gateway = StripeApiGateway.from_config(config)
        # The imports' objects are long-lived: collections need not walk them again and again. A
        # parsed page is a few thousand dicts and lists, without a cycle among them, all freed by
        # reference counting once handed over: at Python's threshold the collector ran several
        # times a page, walking them (docs/PERFORMANCE.md, "Reconcile").
        settle(batches=True)
        ready.set()
        while True:
            if stop.is_set():
                return
            try:
                command = start.get(timeout=_POLL_SECONDS)
                break
            except queue.Empty:
                continue
        if command is None:  # the parent read the whole list while this process started
            return
        _produce(list_pages(gateway, customer=None, starting_after=command[0]), tiers, label, _portable(put))
    except KeyboardInterrupt:
        return


def _portable(put: Callable[[Any], bool]) -> Callable[[Any], bool]:
    """Failures cross the process boundary as kamiyo errors (a library's exception may not pickle)."""

    def send(item: Any) -> bool:
        if isinstance(item, _Failure) and not isinstance(item.error, KamiyoError):
            item = _Failure(KamiyoError(f"{item.error.__class__.__name__}: {item.error}"))
        return put(item)

    return send
