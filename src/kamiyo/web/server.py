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
- **pipelining**: at most ``MAX_PIPELINED`` requests may wait behind the one being answered.

The keep-alive wait between requests stays uvicorn's (``timeout_keep_alive``). Every answer the
protocol writes itself closes the connection. Timers are armed only where a wait begins (a
connection opening, an answer ending, a body that did not arrive with its head), so a delivery
that arrives whole in one read costs a timer for its next head and nothing else.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import time
from dataclasses import dataclass
from typing import Any, ClassVar

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
    that server's idle connections."""

    class ServerProtocol(BoundedHttpToolsProtocol):
        pass

    ServerProtocol.limits = limits
    ServerProtocol.idle = {}
    ServerProtocol.cuts = _CutLog()
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


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the bounds of the module docstring. Made per server by
    ``bounded_protocol``, which sets the class attributes."""

    limits: ClassVar[HttpLimits]
    # Connections between requests (no byte of the next one received yet), oldest first.
    idle: ClassVar[dict[BoundedHttpToolsProtocol, None]]
    cuts: ClassVar[_CutLog]

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self._head_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        self._send_timer: asyncio.TimerHandle | None = None
        self._idle = False
        self._in_head = False  # a request's head has begun and is not complete
        self._head_bytes = 0
        self._body_open = False  # the latest request's head is complete and its body is not
        self._keep_alive = True  # what the latest request asked for, held back until its body is whole
        self._stopping = False

    # -- connection ----------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.limits.max_connections and not self._make_room():
            self.cuts.cut("max_connections", f"{len(self.connections) - 1} connections open, all in a request")
            self._close(
                _answer(503, "Service Unavailable", "overloaded", "too many open connections; retry later", _RETRY)
            )
            return
        self._await_request()

    def connection_lost(self, exc: Exception | None) -> None:
        self._leave_idle()
        for timer in (self._head_timer, self._body_timer, self._send_timer):
            if timer is not None:
                timer.cancel()
        self._head_timer = self._body_timer = self._send_timer = None
        super().connection_lost(exc)

    def shutdown(self) -> None:
        self._stopping = True
        self._leave_idle()
        super().shutdown()

    def data_received(self, data: bytes) -> None:
        if self._idle:
            self._leave_idle()
        head_before = self._in_head
        super().data_received(data)
        if self._in_head:
            # Counted from the read after the one the head began in: at most one read over the limit.
            if head_before:
                self._head_bytes += len(data)
                if self._head_bytes > self.limits.max_header_bytes and not self.transport.is_closing():
                    self._head_too_large()
        elif self._body_open and self._body_timer is None and not self.pipeline:
            self._body_timer = self.loop.call_later(self.limits.body_timeout, self._body_timed_out)

    # -- parser callbacks ------------------------------------------------------------------------

    def on_message_begin(self) -> None:
        if len(self.pipeline) >= MAX_PIPELINED:
            # Raised through httptools: uvicorn answers 400 and closes the connection, and the
            # requests parsed so far are dropped unanswered.
            self.cuts.cut("pipeline", f"over {MAX_PIPELINED} requests sent ahead of their answers")
            raise RuntimeError("too many pipelined requests")
        super().on_message_begin()
        self._in_head = True
        self._head_bytes = 0

    def on_headers_complete(self) -> None:
        self._in_head = False
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        previous = self.cycle
        super().on_headers_complete()
        cycle = self.cycle
        if cycle is not previous:
            # Until the whole body has arrived, an answer closes the connection: what is left of
            # the body is never read (on_message_complete restores what the client asked for).
            self._body_open = True
            self._keep_alive = cycle.keep_alive
            cycle.keep_alive = False

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._body_open = False
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None
        cycle = self.cycle
        if cycle is not None and not cycle.response_started and not self._stopping:
            cycle.keep_alive = self._keep_alive

    def on_response_complete(self) -> None:
        started_next = bool(self.pipeline)
        super().on_response_complete()
        if self.transport.is_closing():
            return
        if started_next:
            if self._body_open and not self.pipeline and self._body_timer is None:
                self._body_timer = self.loop.call_later(self.limits.body_timeout, self._body_timed_out)
        elif self._in_head:
            self._arm_head_timer()  # the next head has begun: it has the rest of the head timeout
        else:
            self._await_request()

    # -- writing ---------------------------------------------------------------------------------

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._send_timer is None:
            self._send_timer = self.loop.call_later(self.limits.body_timeout, self._send_timed_out)

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._send_timer is not None:
            self._send_timer.cancel()
            self._send_timer = None

    # -- limits ----------------------------------------------------------------------------------

    def _await_request(self) -> None:
        """Between requests: the next head must arrive in time, and until its first byte this
        connection is the first to go when the cap is reached."""
        self.idle[self] = None
        self._idle = True
        self._arm_head_timer()

    def _leave_idle(self) -> None:
        if self._idle:
            self._idle = False
            self.idle.pop(self, None)

    def _arm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
        self._head_timer = self.loop.call_later(self.limits.header_timeout, self._head_timed_out)

    def _make_room(self) -> bool:
        """Close connections waiting between requests, longest first, until this one fits."""
        while len(self.connections) > self.limits.max_connections:
            if not self.idle:
                return False
            victim = next(iter(self.idle))
            victim._leave_idle()
            victim._close()
            self.cuts.cut("evicted", f"HTTP_MAX_CONNECTIONS={self.limits.max_connections} reached")
        return True

    def _close(self, answer: bytes = b"") -> None:
        """Write ``answer`` (if any) and close; the connection stops counting toward the cap now."""
        self._leave_idle()
        if answer:
            self.transport.write(answer)
        self.transport.close()
        self.connections.discard(self)

    def _cycle_running(self) -> bool:
        return self.cycle is not None and not self.cycle.response_complete

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing():
            return
        self.cuts.cut("header_timeout", f"no complete request head within {self.limits.header_timeout:g} s")
        self._close()

    def _head_too_large(self) -> None:
        self.cuts.cut("header_too_large", f"a request head over {self.limits.max_header_bytes} bytes")
        if self._cycle_running():
            self._close()  # an answer now would land in the middle of the running request's answer
            return
        message = f"request head over {self.limits.max_header_bytes} bytes"
        self._close(_answer(431, "Request Header Fields Too Large", "headers_too_large", message))

    def _body_timed_out(self) -> None:
        self._body_timer = None
        if self.transport.is_closing():
            return
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
        self._send_timer = None
        if self.transport.is_closing() and self.transport.get_write_buffer_size() == 0:
            return
        self.cuts.cut("send_timeout", f"the client read nothing of its answer for {self.limits.body_timeout:g} s")
        self._leave_idle()
        self.transport.abort()  # close() would wait for the unread answer to drain
        self.connections.discard(self)


_RETRY = b"retry-after: 1"
