"""``kamiyo serve``'s HTTP/1.1 connections: uvicorn's httptools protocol with every wait bounded.

uvicorn arms a timer only while a kept-alive connection waits for its next request. Nothing
bounds a connection that sends nothing after it opens, a head or a body that trickles in a byte
at a time, the size of a head (httptools keeps whatever it is sent), or a client that stops
reading its answer; and ``limit_concurrency`` counts idle connections as well, so a few hundred
sockets that never send a byte lock everyone out. This protocol bounds each of them:

- **head**: from the connection's opening, and on a kept-alive connection from the end of the
  previous answer, the request's head (line and headers) must be complete within
  ``header_timeout``; otherwise the connection is closed without an answer. A head over
  ``max_header_bytes`` is answered 431.
- **body**: from the end of the head, the whole body must have arrived within ``body_timeout``
  (in total, so a trickle is cut), on every route, whether the app reads the body or not. A
  request still unanswered then is answered 408.
- **answer**: a client that stops reading its answer for ``body_timeout`` is disconnected.
- **early answers**: an answer that starts before the whole body has arrived (a 413, a 408, any
  other) carries ``Connection: close``, and the connection is closed once it is sent: the rest of
  the body is never read.
- **connections**: at most ``max_connections`` are open. A new one over the cap closes the
  connection that has waited longest between requests; when every connection is in a request,
  the new one is answered 503 and closed at once.
- **pipelining**: at most ``MAX_PIPELINED`` requests may wait behind the one being answered;
  more, and the connection is closed.

An answer's head and the first piece of its body go out in one write (uvicorn writes them apart).
The keep-alive wait between requests stays uvicorn's (``timeout_keep_alive``). Every answer the
protocol writes itself closes the connection. A connection keeps its deadlines as numbers, and
one sweep per server, a few times per timeout, acts on those that have passed: a request costs
no timer of its own, and a cut comes at most a quarter of its timeout (at most 1 s) late.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import resource
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar, cast

import orjson
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from kamiyo.config import Settings

log = logging.getLogger("kamiyo.http")

MAX_PIPELINED = 16  # requests parsed and waiting behind the one being answered, on one connection
FILE_HEADROOM = 128  # descriptors kept for everything but client connections (database, logs, pipes)
REPORT_SECONDS = 60.0  # connections cut for one reason are logged at most once this often


@dataclass(frozen=True)
class HttpLimits:
    """The bounds of every connection, from ``HTTP_*`` settings."""

    header_timeout: float
    body_timeout: float
    max_connections: int
    max_header_bytes: int

    @classmethod
    def from_settings(cls, settings: Settings) -> HttpLimits:
        return cls(
            header_timeout=settings.http_header_timeout,
            body_timeout=settings.http_body_timeout,
            max_connections=settings.http_max_connections,
            max_header_bytes=settings.http_max_header_bytes,
        )


def bounded_protocol(limits: HttpLimits) -> type[BoundedHttpToolsProtocol]:
    """The protocol class to pass as ``uvicorn.Config(http=...)``: one per server, since it keeps
    that server's sweep."""

    class ServerProtocol(BoundedHttpToolsProtocol):
        pass

    ServerProtocol.limits = limits
    ServerProtocol.header_timeout = limits.header_timeout
    ServerProtocol.body_timeout = limits.body_timeout
    ServerProtocol.max_header_bytes = limits.max_header_bytes
    ServerProtocol.cuts = _CutLog()
    ServerProtocol.sweep_seconds = min(1.0, max(0.05, min(limits.header_timeout, limits.body_timeout) / 4))
    ServerProtocol.sweeper = None
    ServerProtocol.turns = itertools.count()
    return ServerProtocol


def raise_open_file_limit(max_connections: int) -> None:
    """Make room for ``max_connections`` sockets in the process's open-file limit (up to the hard
    limit); warn when even that is too low, since accept() would then fail instead of the cap."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = max_connections + FILE_HEADROOM
    if soft != resource.RLIM_INFINITY and soft < wanted:
        new = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        except (ValueError, OSError):
            new = soft
        if new < wanted:
            log.warning(
                "open-file limit %d is too low for HTTP_MAX_CONNECTIONS=%d (needs %d): raise `ulimit -n` "
                "or lower HTTP_MAX_CONNECTIONS",
                new,
                max_connections,
                wanted,
            )


def _answer(status: int, phrase: str, reason: str, message: str, *extra: bytes) -> bytes:
    """A whole HTTP/1.1 answer that closes the connection, written by the protocol itself."""
    body = orjson.dumps({"error": message, "reason": reason})
    head = [
        b"HTTP/1.1 %d %s" % (status, phrase.encode()),
        b"content-type: application/json",
        b"content-length: %d" % len(body),
        b"connection: close",
        *extra,
    ]
    return b"\r\n".join(head) + b"\r\n\r\n" + body


class _CutLog:
    """One log line per reason at most every ``REPORT_SECONDS``, with how many were cut since the
    last line: a flood of slow clients must not become a flood of log lines."""

    def __init__(self) -> None:
        self._counts: dict[str, int] = {}
        self._logged: dict[str, float] = {}

    def cut(self, reason: str, detail: str) -> None:
        count = self._counts.get(reason, 0) + 1
        now = time.monotonic()
        if now - self._logged.get(reason, -REPORT_SECONDS) < REPORT_SECONDS:
            self._counts[reason] = count
            return
        self._counts[reason] = 0
        self._logged[reason] = now
        log.warning("http connection closed reason=%s count=%d: %s", reason, count, detail)


# The methods called for every request name their base explicitly: cheaper than super(), and on
# the webhook's path every step counts.
_Base = HttpToolsProtocol


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the bounds of the module docstring. Made per server by
    ``bounded_protocol``, which sets the class attributes."""

    limits: ClassVar[HttpLimits]
    cuts: ClassVar[_CutLog]
    sweep_seconds: ClassVar[float]
    sweeper: ClassVar[asyncio.TimerHandle | None]
    # The limits again, one attribute away: read for every request.
    header_timeout: ClassVar[float]
    body_timeout: ClassVar[float]
    max_header_bytes: ClassVar[int]
    turns: ClassVar[Iterator[int]]  # orders the connections waiting between requests, oldest first

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self._idle_turn: int | None = None  # between requests, no byte of the next one yet
        # Loop times (None: no such wait now).
        self._head_deadline: float | None = None
        self._body_deadline: float | None = None
        self._send_deadline: float | None = None
        # Bytes received outside a request body since the last complete head: a head in the
        # making, or requests sent ahead of their answers. Counted a whole read at a time; a head
        # that completes within a read large enough to hold more than the limit is measured
        # itself (``on_headers_complete``).
        self._head_bytes = 0
        self._read_bytes = 0  # the size of the read being parsed
        self._held = False  # the latest request's keep-alive is held back until its body is whole
        self._keep_alive = True  # what that request asked for
        self._stopping = False

    # -- connection ----------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        # Given to each request's cycle as its transport: the cycle calls only write, close and is_closing.
        self._answers = cast(asyncio.Transport, _HeadWithBody(transport, self.loop))
        if len(self.connections) > self.limits.max_connections and not self._make_room():
            self.cuts.cut("max_connections", f"{len(self.connections) - 1} connections open, all in a request")
            self._close(
                _answer(503, "Service Unavailable", "overloaded", "too many open connections; retry later", _RETRY)
            )
            return
        self._await_request(self.loop.time())
        cls = type(self)
        if cls.sweeper is None:
            cls.sweeper = self.loop.call_later(cls.sweep_seconds, cls._sweep, self.loop, self.connections)

    def shutdown(self) -> None:
        self._stopping = True
        self._idle_turn = None
        super().shutdown()

    def data_received(self, data: bytes) -> None:
        # Everything a read can change is looked at once it has been parsed: one step per read,
        # not one per parser callback.
        self._idle_turn = None
        self._read_bytes = len(data)
        before = self.cycle
        in_body = before is not None and before.more_body and not before.response_complete
        _Base.data_received(self, data)
        if in_body and not before.more_body:  # that body is whole now: keep-alive as asked
            self._body_deadline = None
            if self._held and not before.response_started and not self._stopping:
                before.keep_alive = self._keep_alive
            self._held = False
        cycle = self.cycle
        if cycle is not before:  # a head is complete: a new request
            self._head_deadline = None
            self._head_bytes = 0
            if len(self.pipeline) > MAX_PIPELINED:
                self._too_far_ahead()
            elif cycle.more_body:
                # Its body is still coming. Until it is whole, an answer closes the connection:
                # what is left of the body is never read. (No answer has started: the request's
                # task runs after this read.)
                self._keep_alive, cycle.keep_alive = cycle.keep_alive, False
                self._held = True
                if not self.pipeline:
                    self._body_deadline = self.loop.time() + self.body_timeout
        elif not in_body:
            self._head_bytes += len(data)
            if self._head_bytes > self.max_header_bytes and not self.transport.is_closing():
                self._head_too_large()

    def on_headers_complete(self) -> None:
        # Only when this read and what came before it could hold a head over the limit is the head
        # measured: its request line and headers, as received. One over the limit gets the 431 app
        # instead of ours, and its answer closes the connection.
        if (
            self._head_bytes + self._read_bytes > self.max_header_bytes
            and _head_size(self.url, self.headers) > self.max_header_bytes
        ):
            self.cuts.cut("header_too_large", f"a request head over {self.max_header_bytes} bytes")
            app, self.app = self.app, _HeadTooLarge(self.max_header_bytes)
            try:
                _Base.on_headers_complete(self)
            finally:
                self.app = app
        else:
            _Base.on_headers_complete(self)
        self.cycle.transport = self._answers

    def on_response_complete(self) -> None:
        if self.pipeline:
            _Base.on_response_complete(self)  # starts the next request, already parsed
            cycle = self.cycle
            if cycle.more_body and not self.pipeline and self._body_deadline is None:
                self._body_deadline = self.loop.time() + self.body_timeout
            return
        _Base.on_response_complete(self)
        # The next head must come in time (on a connection closing meanwhile, nothing acts on it).
        self._head_deadline = self.loop.time() + self.header_timeout
        if not self._head_bytes:  # none of it yet: idle
            self._idle_turn = next(self.turns)

    # -- writing ---------------------------------------------------------------------------------

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._send_deadline is None:
            self._send_deadline = self.loop.time() + self.limits.body_timeout

    def resume_writing(self) -> None:
        super().resume_writing()
        self._send_deadline = None

    # -- limits ----------------------------------------------------------------------------------

    def _await_request(self, now: float) -> None:
        """Between requests: the next head must arrive in time, and until its first byte this
        connection is among the first to go when the cap is reached."""
        self._idle_turn = next(self.turns)
        self._head_deadline = now + self.header_timeout

    @classmethod
    def _sweep(cls, loop: asyncio.AbstractEventLoop, connections: set[Any]) -> None:
        """Act on every deadline that has passed; again in ``sweep_seconds`` while any connection is open."""
        now = loop.time()
        for connection in list(connections):
            if isinstance(connection, BoundedHttpToolsProtocol):
                connection._check(now)
        cls.sweeper = loop.call_later(cls.sweep_seconds, cls._sweep, loop, connections) if connections else None

    def _check(self, now: float) -> None:
        if self._send_deadline is not None and now >= self._send_deadline:
            self._send_timed_out()
        elif self.transport.is_closing():
            return
        elif self._head_deadline is not None and now >= self._head_deadline:
            self._head_timed_out()
        elif self._body_deadline is not None and now >= self._body_deadline:
            self._body_timed_out()

    def _make_room(self) -> bool:
        """Close connections waiting between requests, longest first, until this one fits."""
        while len(self.connections) > self.limits.max_connections:
            idle = [
                (c._idle_turn, c)
                for c in self.connections
                if isinstance(c, BoundedHttpToolsProtocol) and c._idle_turn is not None
            ]
            if not idle:
                return False
            min(idle, key=_turn)[1]._close()
            self.cuts.cut("evicted", f"HTTP_MAX_CONNECTIONS={self.limits.max_connections} reached")
        return True

    def _close(self, answer: bytes = b"") -> None:
        """Write ``answer`` (if any) and close; the connection stops counting toward the cap now."""
        self._idle_turn = None
        self._head_deadline = self._body_deadline = None
        if answer:
            self.transport.write(answer)
        self.transport.close()
        self.connections.discard(self)

    def _too_far_ahead(self) -> None:
        """More requests sent ahead of their answers than MAX_PIPELINED: closed, unanswered (an
        answer now could land in the middle of the running request's). The requests parsed from
        this one read are all that was taken in."""
        self.cuts.cut("pipeline", f"over {MAX_PIPELINED} requests sent ahead of their answers")
        self.pipeline.clear()
        self._close()

    def _head_timed_out(self) -> None:
        self.cuts.cut("header_timeout", f"no complete request head within {self.limits.header_timeout:g} s")
        self._close()

    def _head_too_large(self) -> None:
        self.cuts.cut("header_too_large", f"a request head over {self.limits.max_header_bytes} bytes")
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            self._close()  # an answer now would land in the middle of the running request's answer
            return
        message = f"request head over {self.limits.max_header_bytes} bytes"
        self._close(_answer(431, "Request Header Fields Too Large", "headers_too_large", message))

    def _body_timed_out(self) -> None:
        self.cuts.cut("body_timeout", f"a request body not received within {self.limits.body_timeout:g} s")
        cycle = self.cycle
        if cycle is not None and not cycle.response_started:
            # The app's receive() now says the client is gone, and its send() writes nothing.
            cycle.disconnected = True
            cycle.message_event.set()
            message = f"request body not received within {self.limits.body_timeout:g} s"
            self._close(_answer(408, "Request Timeout", "timeout", message))
            return
        self._close()

    def _send_timed_out(self) -> None:
        self._send_deadline = None
        self.cuts.cut("send_timeout", f"the client read nothing of its answer for {self.limits.body_timeout:g} s")
        self._idle_turn = None
        self.transport.abort()  # close() would wait for the unread answer to drain
        self.connections.discard(self)


_RETRY = b"retry-after: 1"


class _HeadWithBody:
    """The transport a request's cycle writes its answer through: the answer's head is held until
    the first piece of its body and goes out with it, in one write. uvicorn writes them apart: two
    sends, two segments, and a client woken twice per answer. A head is never held past the loop's
    turn (a streamed answer's first piece may come much later); closing writes it first. (What
    starts like a head is held: a body piece that does goes out at the turn, still in order.)"""

    __slots__ = ("_head", "_loop", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._head: bytes | None = None

    def write(self, data: bytes) -> None:
        head = self._head
        if head is not None:
            self._head = None
            self._transport.write(head + data)
        elif data.startswith(_STATUS_LINE) and not data.startswith(_CONTINUE):
            self._head = data
            self._loop.call_soon(self.flush)
        else:
            self._transport.write(data)

    def flush(self) -> None:
        head = self._head
        if head is not None:
            self._head = None
            if not self._transport.is_closing():  # cut by a limit meanwhile: nobody reads it
                self._transport.write(head)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def is_closing(self) -> bool:
        return self._transport.is_closing()


_STATUS_LINE = b"HTTP/1.1 "
_CONTINUE = b"HTTP/1.1 100 "


def _head_size(url: bytes, headers: list[tuple[bytes, bytes]]) -> int:
    """A head's size as received, near enough: its request line and each ``name: value`` line."""
    return len(url) + 16 + sum(len(name) + len(value) + 4 for name, value in headers)


class _HeadTooLarge:
    """The app a request whose head is over the limit gets: 431, and the connection closes."""

    def __init__(self, limit: int) -> None:
        self._body = orjson.dumps({"error": f"request head over {limit} bytes", "reason": "headers_too_large"})

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", b"%d" % len(self._body)),
            (b"connection", b"close"),
        ]
        await send({"type": "http.response.start", "status": 431, "headers": headers})
        await send({"type": "http.response.body", "body": self._body})


def _turn(entry: tuple[int, BoundedHttpToolsProtocol]) -> int:
    return entry[0]
