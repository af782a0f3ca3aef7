"""The inbox writer in a process of its own: what ``kamiyo serve`` runs.

The writer's batches (binding parameters, the transaction, answering the requests) run on an
interpreter of their own, off the event loop's GIL; the loop only pickles each delivery into a
socket and reads the answers back (docs/PERFORMANCE.md). ``InboxProcess`` is the server's side,
``serve`` the child's; what they say to each other is in ``webhooks/messages.py``.

The child runs the same ``InboxWriter``: the same batches, transaction and delivery counts. A 2xx
still means committed, since a request waits for the child's answer, which is sent after the
commit. Should the child die, the requests waiting on it fail (the endpoint answers 503 and
Stripe retries) and a new child starts; a row it committed without answering is a duplicate the
next time. Should the server die, the child finishes what it was sent, then exits.

Every delivery is answered within WEBHOOK_STORE_TIMEOUT_SECONDS: a sweep of the waiting
deliveries, a few times a second, fails those older than that (503: Stripe retries; should the
child commit one later, the retry is a duplicate, answered 200). No timer per request: each
sweep notes the next delivery's number, and a delivery is old when a note taken a bound ago is
above its number. At most WEBHOOK_STORE_MAX_WAITING deliveries wait on the child; the next ones
get 503 at once. The same sweep pings the child; the child's main thread answers with its
writer's ``WriterActivity``, and ``health`` judges it (``writer_health.py``): a child that
leaves pings unanswered is stalled (stopped, hung), and deliveries get 503 at once until it
answers again.

SIGTERM reaches the child too when the whole service is stopped (systemd signals every process
of the unit; the child has a session of its own, so a signal to the terminal's process group
does not reach it). The child then keeps serving the server, which lets its in-flight
deliveries finish, until the server says stop or goes away, at most TERM_GRACE seconds.

With a worker (WORKER_IN_PROCESS), the child also runs ``kamiyo serve``'s worker, a thread beside
the writer (``processing/in_process.py``), off the event loop's GIL too. The writer wakes it after
each commit of a new event, without a round trip through the server, and both share one engine.
Its metrics and deaths reach the server as messages; the server counts them
(``WebhookMetrics``), records each death (``worker_restarts``) and knows whether it runs
(``worker_alive``), for the health check. A child that dies takes its worker with it; the next
child starts a new one.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, cast

from kamiyo.config import Settings
from kamiyo.processing.in_process import WorkerThread, relayed_worker
from kamiyo.processing.restarts import RestartRecord
from kamiyo.webhooks.envelope import Envelope
from kamiyo.webhooks.inbox import InboxUnavailable, InboxWriter, Pending, inbox_row
from kamiyo.webhooks.messages import (
    CountRejection,
    Event,
    Frames,
    Ping,
    Pong,
    Processed,
    Ready,
    Start,
    Stop,
    Stored,
    StoreFailed,
    ToInbox,
    ToServer,
    WorkerDied,
    WorkerStarted,
    WorkerStopped,
    frame,
)
from kamiyo.webhooks.writer_health import (
    PING_SECONDS,
    PONG_SECONDS,
    STALL_SECONDS,
    WriterActivity,
    WriterHealth,
    judge,
)

if TYPE_CHECKING:
    from kamiyo.telemetry.metrics import WebhookMetrics

__all__ = ["InboxProcess", "InboxUnavailable"]

log = logging.getLogger("kamiyo.inbox")
START_TIMEOUT = 60.0
RESTART_PAUSE = 1.0  # between a child's death and the next start, so a crash loop does not spin
SWEEP_SECONDS = 0.25  # how often the waiting deliveries are swept: a 503 comes at most this late
# The writer waits this share of a delivery's bound for SQLite's write lock, so that a batch
# that cannot begin fails (and says why) before its deliveries' bound has passed.
WRITE_WAIT_SHARE = 0.75
# Shutdown budgets. They add up to less than docker-compose.yml's stop_grace_period (30 s):
# uvicorn lets in-flight requests finish for DRAIN_SECONDS (longer than any delivery's bound,
# WEBHOOK_STORE_TIMEOUT_SECONDS <= 15), then the child has STOP_TIMEOUT to store what it was
# sent and exit. A child sent SIGTERM itself serves its server for TERM_GRACE at most.
DRAIN_SECONDS = 17.0
STOP_TIMEOUT = 10.0
TERM_GRACE = DRAIN_SECONDS + 3.0


# -- the server's side -------------------------------------------------------------------------


class InboxProcess:
    """``InboxWriter``'s ``store_event`` and ``count_rejection``, served by a child process.

    Used from one event loop: ``await start()``, then ``store_event`` from its requests, ``await stop()``.
    With ``worker`` the child also runs ``kamiyo serve``'s worker; each death of it (it is
    restarted) is kept in ``worker_restarts``. ``metrics`` counts what the child's worker did
    (its batches, its deaths) and each delivery that could not be stored, with why:
    ``timeout``, ``overloaded``, ``writer_down`` or ``database``.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        count_deliveries: bool = True,
        worker: bool = False,
        metrics: WebhookMetrics | None = None,
    ) -> None:
        self._settings = settings
        self._count_deliveries = count_deliveries
        self._with_worker = worker
        self._metrics = metrics
        self.worker_restarts = RestartRecord()  # deaths of the children's workers, each one restarted
        self._timeout = settings.webhook_store_timeout
        self._max_waiting = settings.webhook_store_max_waiting
        self._worker_running = False  # the current child's worker thread, from Ready to WorkerStopped
        self._next = 0  # the next delivery's number
        self._waiting: dict[int, asyncio.Future[bool]] = {}  # in the order sent: by number
        # (time.monotonic(), the next delivery's number then), one per sweep over the last bound.
        self._marks: collections.deque[tuple[float, int]] = collections.deque()
        self._link: _Link | None = None  # the socket to the current child, from its start
        self._ready = False  # the current child has said it can store
        self._process: subprocess.Popen[bytes] | None = None
        self._restart: asyncio.Task[None] | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._stopping = False
        # What the child last said of its writer, when, and whether it now leaves pings unanswered.
        self._activity: WriterActivity | None = None
        self._pong_at = 0.0
        self._pinged_at = 0.0
        self._unresponsive = False
        self._timed_out = 0  # deliveries failed by the sweep since the writer last answered one

    @property
    def pid(self) -> int | None:
        """The child's process id while it is ready to store."""
        if self._ready and self._process is not None and self._process.poll() is None:
            return self._process.pid
        return None

    def worker_alive(self) -> bool | None:
        """Whether the child's worker is running; None when the child runs none."""
        if not self._with_worker:
            return None
        return self._worker_running and self.pid is not None and not self._unresponsive

    def health(self) -> WriterHealth:
        """Whether a delivery can be stored now: the child runs, answers, and its writer writes."""
        if self.pid is None:
            return judge(None)
        # Stalled exactly when deliveries are refused for it (the sweep's verdict).
        unanswered = time.monotonic() - self._pong_at if self._unresponsive else None
        return judge(
            self._activity,
            stall_seconds=min(STALL_SECONDS, self._timeout),
            unanswered_for=unanswered,
            timed_out=self._timed_out,
        )

    async def start(self) -> None:
        """Start the child and wait until it is ready to store."""
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair()
        with theirs:
            self._process = subprocess.Popen(  # noqa: S603 - this interpreter, our module
                [sys.executable, "-m", "kamiyo.webhooks.inbox_process", str(theirs.fileno())],
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
                # Not in the terminal's process group: a Ctrl-C stops the server, which then stops
                # the child after its last batch, instead of killing the child mid-batch.
                start_new_session=True,
            )
        ready: asyncio.Future[None] = loop.create_future()
        _transport, self._link = await loop.create_unix_connection(lambda: _Link(self, ready), sock=ours)
        self._link.send(Start(self._settings, self._count_deliveries, self._with_worker))
        try:
            await asyncio.wait_for(ready, timeout=START_TIMEOUT)
        except BaseException:
            self._link.close()  # the child reads the end of its input, and exits
            raise
        self._activity = WriterActivity()
        self._pong_at = self._pinged_at = time.monotonic()
        self._unresponsive = False
        self._ready = True
        if self._sweeper is None:
            self._sweeper = loop.create_task(self._sweep())
        log.info("inbox writer process %d started", self._process.pid)

    async def store_event(
        self, envelope: Envelope, body: bytes, *, status: str, counted: bool = True, detail: str | None = None
    ) -> bool:
        """Commit the inbox row of a verified delivery (made in the child, received now); True if
        the event is new, False if its id was already stored. ``InboxUnavailable`` when it could
        not be stored within the bound, or at once when the child cannot take it."""
        link = self._link
        if link is None or not self._ready or self._unresponsive:
            self._store_failed("writer_down")
            raise InboxUnavailable("the inbox writer process is not running or not answering")
        if len(self._waiting) >= self._max_waiting:
            self._store_failed("overloaded")
            raise InboxUnavailable(f"{self._max_waiting} deliveries already wait for the inbox writer")
        number = self._next
        self._next = number + 1
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._waiting[number] = future
        link.send(Event(number, envelope, body, status, counted, time.time(), detail))
        return await future

    def count_rejection(self, reason: str, event_type: str = "") -> None:
        """Count a rejected delivery (in the child's next batch); returns at once."""
        if self._count_deliveries and self._link is not None and self._ready and not self._unresponsive:
            self._link.send(CountRejection(reason, event_type))

    async def stop(self) -> None:
        """Let the child finish what it was sent, then wait for it to exit."""
        self._stopping = True
        if self._restart is not None:
            self._restart.cancel()
        if self._link is not None:
            self._link.send(Stop())
        if self._process is not None:
            await asyncio.get_running_loop().run_in_executor(None, _end, self._process)
        if self._sweeper is not None:
            self._sweeper.cancel()

    async def _sweep(self) -> None:
        """Fail the deliveries waiting past the bound, and ping the child; a few times a second."""
        while True:
            await asyncio.sleep(SWEEP_SECONDS)
            now = time.monotonic()
            self._marks.append((now, self._next))
            cutoff = -1
            while self._marks and self._marks[0][0] <= now - self._timeout:
                cutoff = self._marks.popleft()[1]
            if cutoff > 0:
                self._expire(cutoff)
            if self._link is not None and self._ready and not self._stopping:
                if now - self._pinged_at >= PING_SECONDS:
                    self._pinged_at = now
                    self._link.send(Ping())
                unresponsive = now - self._pong_at - PING_SECONDS > PONG_SECONDS
                if unresponsive and not self._unresponsive:
                    log.error(
                        "inbox writer process %s does not answer (stopped or hung): deliveries get 503 until it does",
                        self.pid,
                    )
                self._unresponsive = unresponsive

    def _expire(self, cutoff: int) -> None:
        """Fail every waiting delivery numbered below ``cutoff`` (all sent a bound ago or more)."""
        expired = []
        for number in self._waiting:
            if number >= cutoff:
                break
            expired.append(number)
        if not expired:
            return
        for number in expired:
            future = self._waiting.pop(number)
            if not future.done():
                future.set_exception(
                    InboxUnavailable(f"no answer from the inbox writer within {self._timeout:g} s; retry later")
                )
            self._store_failed("timeout")
        self._timed_out += len(expired)
        log.error("%d delivery(ies) got no answer from the inbox writer within %g s: 503", len(expired), self._timeout)

    def _store_failed(self, reason: str) -> None:
        if self._metrics is not None:
            self._metrics.store_failed(reason)

    def _received(self, message: ToServer) -> None:
        """What the child said; ``Stored`` first: one comes per batch of deliveries."""
        match message:
            case Stored(numbers, new):
                for number, is_new in zip(numbers, new, strict=True):
                    future = self._waiting.pop(number, None)
                    if future is not None and not future.done():
                        future.set_result(is_new)
                self._timed_out = 0
            case Pong(activity):
                self._activity = activity
                self._pong_at = time.monotonic()
                if activity is not None and not activity.busy_for and activity.failure is None:
                    self._timed_out = 0  # it has caught up and writes: what timed out is over
                if self._unresponsive:
                    self._unresponsive = False
                    log.info("inbox writer process %s answers again", self.pid)
            case StoreFailed(numbers, error):
                for number in numbers:
                    future = self._waiting.pop(number, None)
                    if future is not None and not future.done():
                        future.set_exception(InboxUnavailable(error))
                        self._store_failed("database")
            case Processed(tally):
                if self._metrics is not None:
                    self._metrics.count_processed(tally)
            case Ready() | WorkerStarted():
                self._worker_running = self._with_worker
            case WorkerDied(death):
                self._worker_running = False
                self.worker_restarts.add(death)
                if self._metrics is not None:
                    self._metrics.worker_restarted(death)
            case WorkerStopped():
                self._worker_running = False

    def _lost(self, link: _Link) -> None:
        if link is not self._link:
            return  # the socket of a child already replaced
        was_ready = self._ready
        self._link, self._ready, self._worker_running = None, False, False
        waiting, self._waiting = self._waiting, {}
        for future in waiting.values():
            if not future.done():
                future.set_exception(InboxUnavailable("the inbox writer process stopped before answering"))
        for _future in waiting:
            self._store_failed("writer_down")
        if self._stopping or not was_ready:
            return  # a child that failed to start: its starter says so
        code = self._process.poll() if self._process is not None else None
        log.error(
            "inbox writer process exited (code %s): %d waiting deliveries answered 503; starting a new one",
            code,
            len(waiting),
        )
        self._restart = asyncio.get_running_loop().create_task(self._start_again())

    async def _start_again(self) -> None:
        while not self._stopping:
            if self._process is not None:
                await asyncio.get_running_loop().run_in_executor(None, _end, self._process)
            await asyncio.sleep(RESTART_PAUSE)
            try:
                await self.start()
                return
            except Exception as exc:  # noqa: BLE001 - keep trying: without it no delivery is stored
                log.error("inbox writer process did not start: %s", exc.__class__.__name__)


class _Link(asyncio.Protocol):
    """The socket to one child. What the loop sends in one turn goes out as one frame."""

    def __init__(self, owner: InboxProcess, ready: asyncio.Future[None]) -> None:
        self._owner = owner
        self._ready = ready
        self._frames = Frames()
        self._outbox: list[ToInbox] = []
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not asyncio's class

    def send(self, message: ToInbox) -> None:
        if not self._outbox:
            asyncio.get_running_loop().call_soon(self._flush)
        self._outbox.append(message)

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def _flush(self) -> None:
        messages, self._outbox = self._outbox, []
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(frame(messages))

    def data_received(self, data: bytes) -> None:
        for messages in self._frames.feed(data):
            for message in messages:
                self._owner._received(cast(ToServer, message))
                if isinstance(message, Ready) and not self._ready.done():
                    self._ready.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._ready.done():
            self._ready.set_exception(InboxUnavailable("the inbox writer process exited while starting"))
        self._owner._lost(self)


def _end(process: subprocess.Popen[bytes]) -> None:
    """Wait for the child to exit; kill it if it does not within STOP_TIMEOUT."""
    try:
        process.wait(timeout=STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        log.error("inbox writer process %d did not stop within %.0f s; killing it", process.pid, STOP_TIMEOUT)
        process.kill()
        process.wait()


# -- the child ---------------------------------------------------------------------------------


def serve(connection: socket.socket) -> None:
    """Store what the server sends until it says stop or goes away, then finish and return.

    A SIGTERM does not stop it at once: the server may still be letting its requests finish and
    needs the child meanwhile. It stops when the server says so or goes away, or TERM_GRACE
    seconds after the signal, whichever comes first."""
    from kamiyo.db.engine import make_engine
    from kamiyo.heap import settle
    from kamiyo.logs import configure_logging

    lock = threading.Lock()
    terminated: list[float] = []  # when a SIGTERM came (the handler only notes it)

    def on_sigterm(_signum: int, _frame: Any) -> None:
        if not terminated:
            terminated.append(time.monotonic())

    signal.signal(signal.SIGTERM, on_sigterm)

    def send(message: ToServer) -> None:
        """One message to the server, from any thread of the child (the writer's, the worker's, this one)."""
        with lock, contextlib.suppress(OSError):  # the server is gone: nobody is left to answer
            connection.sendall(frame((message,)))

    def resolve(batch: list[Pending], outcomes: list[bool] | None, error: BaseException | None) -> None:
        numbers = [item.waiter for item in batch]
        if error is None:
            assert outcomes is not None
            send(Stored(numbers, outcomes))
        else:
            send(StoreFailed(numbers, f"{error.__class__.__name__} storing the event; retry later"))

    frames = Frames()
    writer: InboxWriter | None = None
    worker: WorkerThread | None = None
    engine = None
    readable = select.poll()
    readable.register(connection, select.POLLIN)
    try:
        while True:
            if terminated:
                if time.monotonic() - terminated[0] > TERM_GRACE:
                    log.warning("inbox writer process: SIGTERM %.0f s ago and still serving; stopping", TERM_GRACE)
                    return
                if writer is None:
                    return  # not started: nothing to finish
            if not readable.poll(1000):  # wakes at least once a second to look at a SIGTERM's grace
                continue
            data = connection.recv(1 << 16)
            if not data:
                return  # the server is gone; the finally below stores what it sent
            for messages in frames.feed(data):
                for message in messages:
                    match message:
                        case Event():  # first: one per delivery
                            assert writer is not None
                            number, envelope, body, status, counted, received_at, detail = message
                            at = datetime.fromtimestamp(received_at, UTC)
                            row = inbox_row(envelope, body, status=status, received_at=at, detail=detail)
                            writer.submit(row, number, counted=counted)
                        case Ping():
                            send(Pong(writer.activity() if writer is not None else None))
                        case CountRejection(reason, event_type):
                            assert writer is not None
                            writer.count_rejection(reason, event_type)
                        case Start(settings, count_deliveries, run_worker):
                            configure_logging(settings.log_level, background=True, log_format=settings.log_format)
                            engine = make_engine(settings)
                            wake = threading.Event()
                            writer = InboxWriter(
                                engine,
                                count_deliveries=count_deliveries,
                                resolve=resolve,
                                on_commit=wake.set if run_worker else None,
                                write_wait=settings.webhook_store_timeout * WRITE_WAIT_SHARE,
                            )
                            writer.start()
                            if run_worker:
                                worker = relayed_worker(engine, settings, wake, send)
                            settle(batches=run_worker)
                            send(Ready())
                        case Stop():
                            return
    finally:
        if writer is not None:
            writer.stop()  # first: what the server sent is stored, and answered while it listens
        if worker is not None:
            worker.stop(STOP_TIMEOUT)
        if engine is not None:
            engine.dispose()
        connection.close()


def main(argv: list[str]) -> int:
    with socket.socket(fileno=int(argv[0])) as connection:
        serve(connection)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
