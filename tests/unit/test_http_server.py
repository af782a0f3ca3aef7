"""The bounded HTTP protocol driven directly, with a transport that records what is done to it:
what a real socket cannot show cheaply (a client that stops reading its answer), and the settings."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import Any

import pytest
import uvicorn
from uvicorn.server import ServerState

from kamiyo.config import load_settings
from kamiyo.errors import ConfigError
from kamiyo.web.server import HttpLimits, bounded_protocol

pytestmark = pytest.mark.timeout(30)

LIMITS = HttpLimits(header_timeout=0.2, body_timeout=0.2, max_connections=4, max_header_bytes=4096)


class _Transport(asyncio.Transport):
    """Records writes, close and abort; its write buffer is whatever the test says. Closing tells
    the protocol the connection is lost on the next turn of the loop, as a socket does."""

    def __init__(self) -> None:
        super().__init__()
        self.written = b""
        self.writes: list[bytes] = []
        self.closing = False
        self.aborted = False
        self.buffered = 0
        self.protocol: asyncio.Protocol | None = None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not self.closing:
            self.written += bytes(data)
            self.writes.append(bytes(data))

    def close(self) -> None:
        if not self.closing and self.protocol is not None:
            asyncio.get_running_loop().call_soon(self.protocol.connection_lost, None)
        self.closing = True

    def abort(self) -> None:
        self.close()
        self.aborted = True

    def is_closing(self) -> bool:
        return self.closing

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 50000), "sockname": ("127.0.0.1", 8000)}.get(name, default)


async def _app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})


class _Server:
    """What uvicorn keeps per server: its state, and the protocol class made for it."""

    def __init__(self, limits: HttpLimits = LIMITS, app: Any = _app) -> None:
        self.state = ServerState()
        self.protocol_class = bounded_protocol(limits)
        self.config = uvicorn.Config(app, log_config=None, lifespan="off")


def _connection(server: _Server) -> tuple[Any, _Transport]:
    protocol = server.protocol_class(config=server.config, server_state=server.state, app_state={})
    transport = _Transport()
    transport.protocol = protocol
    protocol.connection_made(transport)
    return protocol, transport


def test_a_client_that_stops_reading_its_answer_is_disconnected_after_the_body_timeout() -> None:
    async def scenario() -> _Transport:
        protocol, transport = _connection(_Server())
        protocol.data_received(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        protocol.pause_writing()  # the transport's buffer is full: the client reads nothing
        transport.buffered = 1 << 20
        await asyncio.sleep(LIMITS.body_timeout + 0.2)
        return transport

    transport = asyncio.run(scenario())
    assert transport.aborted  # close() would wait for the unread answer to drain, forever


def test_a_client_that_reads_again_in_time_keeps_its_connection() -> None:
    async def scenario() -> _Transport:
        protocol, transport = _connection(_Server(replace(LIMITS, header_timeout=5.0)))
        protocol.data_received(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        await asyncio.sleep(0)  # the app answers
        protocol.pause_writing()
        await asyncio.sleep(LIMITS.body_timeout / 2)
        protocol.resume_writing()
        await asyncio.sleep(LIMITS.body_timeout)
        protocol.data_received(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")  # a next request, before the header timeout
        await asyncio.sleep(0)
        return transport

    transport = asyncio.run(scenario())
    assert not transport.aborted
    assert transport.written.count(b"HTTP/1.1 200") == 2


def test_a_connection_over_the_cap_closes_the_idle_one_and_is_served() -> None:
    async def scenario() -> list[_Transport]:
        server = _Server()
        opened = [_connection(server) for _ in range(LIMITS.max_connections + 1)]
        return [transport for _protocol, transport in opened]

    transports = asyncio.run(scenario())
    assert [t.closing for t in transports] == [True, False, False, False, False]
    assert transports[0].written == b""  # an idle connection is closed without an answer


def _serving(app: Any) -> _Server:
    """A server whose timeouts never cut these tests' connections."""
    return _Server(replace(LIMITS, header_timeout=5.0, body_timeout=5.0), app)


async def _turns(count: int = 5) -> None:
    """Let the loop run the app's task and what it schedules."""
    for _ in range(count):
        await asyncio.sleep(0)


def _answered(app: Any, request: bytes) -> _Transport:
    """What a new connection to ``app`` is sent and written after ``request`` arrives in one read."""

    async def scenario() -> _Transport:
        protocol, transport = _connection(_serving(app))
        protocol.data_received(request)
        await _turns()
        return transport

    return asyncio.run(scenario())


def test_an_answer_goes_out_in_one_write_head_and_body() -> None:
    transport = _answered(_app, b"GET / HTTP/1.1\r\nHost: x\r\n\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert len(transport.writes) == 2  # one per answer, to the two pipelined requests
    assert all(write.startswith(b"HTTP/1.1 200") and write.endswith(b"\r\n\r\nok") for write in transport.writes)


def test_a_body_given_as_a_memoryview_goes_out_with_its_head() -> None:
    async def viewed(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": memoryview(b"ok")})

    transport = _answered(viewed, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert len(transport.writes) == 1
    assert transport.writes[0].startswith(b"HTTP/1.1 200")
    assert transport.writes[0].endswith(b"\r\n\r\nok")


def test_a_streamed_answer_sends_its_head_at_once_and_its_pieces_as_they_come() -> None:
    async def scenario() -> tuple[list[bytes], _Transport]:
        later = asyncio.Event()

        async def streaming(scope: dict[str, Any], receive: Any, send: Any) -> None:
            headers = [(b"content-type", b"text/plain"), (b"transfer-encoding", b"chunked")]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await later.wait()
            await send({"type": "http.response.body", "body": b"late"})

        protocol, transport = _connection(_serving(streaming))
        protocol.data_received(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        await _turns()
        before = list(transport.writes)
        later.set()
        await _turns()
        return before, transport

    before, transport = asyncio.run(scenario())
    assert len(before) == 1
    assert before[0].startswith(b"HTTP/1.1 200")
    assert before[0].endswith(b"\r\n\r\n")
    assert transport.writes[1:] == [b"4\r\nlate\r\n0\r\n\r\n"]


def test_100_continue_goes_out_before_the_body_is_read() -> None:
    async def reading(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await receive()
        await _app(scope, receive, send)

    async def scenario() -> tuple[list[bytes], _Transport]:
        protocol, transport = _connection(_serving(reading))
        head = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\n"
        protocol.data_received(head)
        await _turns()
        before = list(transport.writes)
        protocol.data_received(b"hi")
        await _turns()
        return before, transport

    before, transport = asyncio.run(scenario())
    assert before == [b"HTTP/1.1 100 Continue\r\n\r\n"]
    assert len(transport.writes) == 2
    assert transport.writes[1].startswith(b"HTTP/1.1 200")


def test_a_head_without_its_body_is_written_before_the_connection_closes() -> None:
    async def unfinished(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})

    transport = _answered(unfinished, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert transport.closing
    assert len(transport.writes) == 1
    assert transport.writes[0].startswith(b"HTTP/1.1 200")


def test_the_connection_limits_are_read_from_the_environment_with_documented_defaults() -> None:
    defaults = HttpLimits.from_settings(load_settings({}, env_file=None))
    assert defaults == HttpLimits(header_timeout=10.0, body_timeout=20.0, max_connections=500, max_header_bytes=32768)
    assert load_settings({}, env_file=None).http_keepalive_seconds == 5
    settings = load_settings(
        {
            "HTTP_HEADER_TIMEOUT_SECONDS": "2.5",
            "HTTP_BODY_TIMEOUT_SECONDS": "30",
            "HTTP_KEEPALIVE_SECONDS": "75",
            "HTTP_MAX_CONNECTIONS": "2000",
            "HTTP_MAX_HEADER_BYTES": "16384",
        },
        env_file=None,
    )
    assert HttpLimits.from_settings(settings) == HttpLimits(2.5, 30.0, 2000, 16384)
    assert settings.http_keepalive_seconds == 75


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("HTTP_HEADER_TIMEOUT_SECONDS", "0"),
        ("HTTP_HEADER_TIMEOUT_SECONDS", "nan"),
        ("HTTP_HEADER_TIMEOUT_SECONDS", "soon"),
        ("HTTP_BODY_TIMEOUT_SECONDS", "-1"),
        ("HTTP_BODY_TIMEOUT_SECONDS", "inf"),
        ("HTTP_KEEPALIVE_SECONDS", "0"),
        ("HTTP_KEEPALIVE_SECONDS", "1.5"),
        ("HTTP_MAX_CONNECTIONS", "0"),
        ("HTTP_MAX_CONNECTIONS", "²"),
        ("HTTP_MAX_CONNECTIONS", "1000000"),
        ("HTTP_MAX_HEADER_BYTES", "100"),
    ],
)
def test_a_malformed_connection_limit_stops_the_start_naming_the_variable(name: str, value: str) -> None:
    with pytest.raises(ConfigError, match=f"^{name}: "):
        load_settings({name: value}, env_file=None)


@pytest.mark.parametrize(
    ("soft", "hard", "raised_to", "warned"),
    [
        (1024, 1_048_576, 628, False),  # enough already: left alone
        (256, 1_048_576, 628, False),  # raised to fit 500 connections and the headroom
        (256, 400, 400, True),  # the hard limit is too low: raised as far as it goes, and said so
    ],
)
def test_the_open_file_limit_is_raised_to_fit_the_connection_cap(
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    soft: int,
    hard: int,
    raised_to: int,
    warned: bool,
) -> None:
    import resource

    from kamiyo.web import server

    limits = {"now": (soft, hard)}
    monkeypatch.setattr(resource, "getrlimit", lambda _which: limits["now"])
    monkeypatch.setattr(resource, "setrlimit", lambda _which, value: limits.update(now=value))
    server.raise_open_file_limit(500)
    assert limits["now"] == (max(soft, raised_to), hard)
    assert ("HTTP_MAX_CONNECTIONS=500" in caplog.text) is warned
