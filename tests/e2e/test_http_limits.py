"""A real ``kamiyo serve`` against slow, idle, greedy and oversized clients: every wait and size of
a connection is bounded, and a normal client, and the webhook, still get their answers.

The limits are set low (1.5 s timeouts, 16 connections) so that each test waits seconds, not
minutes; every test has a timeout of its own.
"""

from __future__ import annotations

import contextlib
import socket
import time
import weakref
from collections.abc import Iterator

import orjson
import pytest

from e2e.harness import WEBHOOK_PATH, KamiyoServer, ServerFactory
from kamiyo import synthetic
from kamiyo.web.server import MAX_PIPELINED
from support import signed

pytestmark = [pytest.mark.slow, pytest.mark.timeout(60)]

HEADER_TIMEOUT = 1.5
BODY_TIMEOUT = 1.5
CAP = 16
MAX_BODY = 65536
SLACK = 2.0  # how late a cut may come on a busy machine (2 cores shared by every test run)
MIB = 1024 * 1024


@pytest.fixture(scope="module")
def server(module_servers: ServerFactory) -> KamiyoServer:
    return module_servers(
        "sqlite",
        HTTP_HEADER_TIMEOUT_SECONDS=str(HEADER_TIMEOUT),
        HTTP_BODY_TIMEOUT_SECONDS=str(BODY_TIMEOUT),
        HTTP_KEEPALIVE_SECONDS="5",
        HTTP_MAX_CONNECTIONS=str(CAP),
        HTTP_MAX_HEADER_BYTES="8192",
        WEBHOOK_MAX_BODY_BYTES=str(MAX_BODY),
    )


@pytest.fixture(scope="module")
def capped(module_servers: ServerFactory) -> KamiyoServer:
    """The cap's tests: a header timeout long enough that it never closes a connection they hold."""
    return module_servers("sqlite", HTTP_HEADER_TIMEOUT_SECONDS="30", HTTP_MAX_CONNECTIONS=str(CAP))


@pytest.fixture(autouse=True)
def _no_idle_client(server: KamiyoServer, capped: KamiyoServer) -> None:
    """The harness's own kept-alive client would take one of the few connections."""
    server._reset_http()
    capped._reset_http()


@contextlib.contextmanager
def connections(server: KamiyoServer, count: int) -> Iterator[list[socket.socket]]:
    opened = [connect(server) for _ in range(count)]
    try:
        yield opened
    finally:
        for sock in opened:
            sock.close()


def connect(server: KamiyoServer, timeout: float = HEADER_TIMEOUT + BODY_TIMEOUT + SLACK) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    sock.settimeout(timeout)
    return sock


def read_until_closed(sock: socket.socket) -> tuple[bytes, str]:
    """Everything the server sends until it closes (``eof``/``reset``) or the socket's timeout (``open``)."""
    data = b""
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return data, "eof"
            data += chunk
    except TimeoutError:
        return data, "open"
    except ConnectionResetError:
        return data, "reset"


def closed_now(sock: socket.socket) -> bool:
    """Whether the server has closed ``sock`` (without waiting)."""
    sock.setblocking(False)
    try:
        return sock.recv(65536) == b""
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True
    finally:
        sock.setblocking(True)


# What a read took in past the answer it was reading: the start of the next one, when answers to
# pipelined requests arrive together.
_unread: weakref.WeakKeyDictionary[socket.socket, bytes] = weakref.WeakKeyDictionary()


def read_answer(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 answer with a Content-Length, read off a kept-alive connection; what arrived
    after it is kept for the next call on the same socket."""
    data = _unread.pop(sock, b"")
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"closed before an answer: {data!r}"
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}
    length = int(headers["content-length"])
    while len(rest) < length:
        chunk = sock.recv(65536)
        assert chunk, "closed in the middle of an answer"
        rest += chunk
    if rest[length:]:
        _unread[sock] = rest[length:]
    return int(status_line.split()[1]), headers, rest[:length]


def split_answer(data: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}
    return int(status_line.split()[1]), headers, body


def delivery(customer: str) -> bytes:
    """A whole signed webhook request, as raw bytes."""
    event = synthetic.event("customer.created", synthetic.customer(customer_id=customer, email=f"{customer}@x.io"))
    body, headers = signed(event)
    head = f"POST {WEBHOOK_PATH} HTTP/1.1\r\nHost: kamiyo\r\nContent-Length: {len(body)}\r\n"
    head += "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    return head.encode() + b"\r\n" + body


def trickle(sock: socket.socket, piece: bytes, every: float, until: float) -> None:
    """Send ``piece`` every ``every`` seconds until the server closes or ``until`` seconds pass."""
    deadline = time.monotonic() + until
    while time.monotonic() < deadline:
        time.sleep(every)
        try:
            sock.sendall(piece)
        except OSError:
            return


# -- idle and slow clients ---------------------------------------------------------------------


def test_connections_that_send_nothing_are_closed_after_the_header_timeout(server: KamiyoServer) -> None:
    started = time.monotonic()
    with connections(server, 10) as idle:
        outcomes = [read_until_closed(sock) for sock in idle]
        took = time.monotonic() - started
    assert outcomes == [(b"", "eof")] * 10, outcomes
    assert HEADER_TIMEOUT - 0.2 <= took <= HEADER_TIMEOUT + SLACK


def test_a_head_that_trickles_in_is_cut_at_the_header_timeout_without_an_answer(server: KamiyoServer) -> None:
    with connections(server, 1) as (sock,):
        started = time.monotonic()
        sock.sendall(f"POST {WEBHOOK_PATH} HTTP/1.1\r\nHost: kamiyo\r\n".encode())
        trickle(sock, b"X-Slow: 1\r\n", every=0.3, until=HEADER_TIMEOUT + SLACK)
        data, how = read_until_closed(sock)
        took = time.monotonic() - started
    assert (data, how) in ((b"", "eof"), (b"", "reset"))
    assert took <= HEADER_TIMEOUT + SLACK + 0.5


def test_a_kept_alive_connection_has_the_header_timeout_from_the_end_of_its_last_answer(
    server: KamiyoServer,
) -> None:
    with connections(server, 1) as (sock,):
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: kamiyo\r\n\r\n")
        assert read_answer(sock)[0] == 200
        answered = time.monotonic()
        sock.sendall(b"GET /health HTTP/1.1\r\n")  # its next head starts, and never ends
        trickle(sock, b"X-Slow: 1\r\n", every=0.3, until=HEADER_TIMEOUT + SLACK)
        data, how = read_until_closed(sock)
        took = time.monotonic() - answered
    assert data == b""
    assert how in ("eof", "reset")
    assert HEADER_TIMEOUT - 0.2 <= took <= HEADER_TIMEOUT + SLACK + 0.5


def test_a_webhook_body_that_trickles_in_is_answered_408_and_the_connection_closed(server: KamiyoServer) -> None:
    with connections(server, 1) as (sock,):
        sock.sendall(f"POST {WEBHOOK_PATH} HTTP/1.1\r\nHost: kamiyo\r\nContent-Length: 500\r\n\r\n{{".encode())
        started = time.monotonic()
        trickle(sock, b" ", every=0.3, until=BODY_TIMEOUT + SLACK)
        data, how = read_until_closed(sock)
        took = time.monotonic() - started
    status, headers, body = split_answer(data)
    assert (status, headers["connection"], how) == (408, "close", "eof")
    assert orjson.loads(body)["reason"] == "timeout"
    assert BODY_TIMEOUT - 0.4 <= took <= BODY_TIMEOUT + SLACK + 0.5
    server.wait_for_log("http connection closed reason=body_timeout")


@pytest.mark.parametrize("path", ["/health", "/nowhere"])
def test_a_body_that_trickles_in_to_a_route_that_does_not_read_it_is_cut_too(server: KamiyoServer, path: str) -> None:
    """The answer comes before the body: it closes the connection, so the trickle ends with it."""
    with connections(server, 1) as (sock,):
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: kamiyo\r\nContent-Length: 500\r\n\r\nx".encode())
        trickle(sock, b"x", every=0.3, until=1.0)
        data, how = read_until_closed(sock)
    status, headers, _body = split_answer(data)
    assert status in (200, 404)
    assert headers["connection"] == "close"
    assert how in ("eof", "reset")


def test_a_head_over_the_size_limit_is_answered_431_and_closed(server: KamiyoServer) -> None:
    with connections(server, 1) as (sock,):
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: kamiyo\r\nX-Big: ")
        sent = 0
        with contextlib.suppress(OSError):
            while sent < 4 * MIB:
                sock.sendall(b"a" * 4096)
                sent += 4096
        data, how = read_until_closed(sock)
    assert sent < 4 * MIB  # the server stopped reading long before
    status, headers, body = split_answer(data)
    assert (status, headers["connection"]) == (431, "close")
    assert orjson.loads(body)["reason"] == "headers_too_large"
    assert how in ("eof", "reset")


@pytest.mark.parametrize("size", [12 * 1024, 60 * 1024])
def test_a_head_over_the_size_limit_that_arrives_whole_in_one_write_is_answered_431_too(
    server: KamiyoServer, size: int
) -> None:
    """A head may arrive complete in one read of the socket, never seen incomplete: it is measured."""
    with connections(server, 1) as (sock,):
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: kamiyo\r\nX-Big: " + b"a" * size + b"\r\n\r\n")
        data, how = read_until_closed(sock)
    status, headers, body = split_answer(data)
    assert (status, headers["connection"]) == (431, "close")
    assert orjson.loads(body)["reason"] == "headers_too_large"
    assert how in ("eof", "reset")


def test_a_head_just_under_the_size_limit_is_answered(server: KamiyoServer) -> None:
    with connections(server, 1) as (sock,):
        sock.sendall(
            b"GET /health HTTP/1.1\r\nHost: kamiyo\r\nConnection: close\r\nX-Big: " + b"a" * 7000 + b"\r\n\r\n"
        )
        data, _how = read_until_closed(sock)
    assert split_answer(data)[0] == 200


def test_requests_pipelined_far_ahead_of_their_answers_close_the_connection(server: KamiyoServer) -> None:
    with connections(server, 1) as (sock,):
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: kamiyo\r\n\r\n" * (MAX_PIPELINED * 4))
        data, how = read_until_closed(sock)
    assert data.count(b"HTTP/1.1 200") <= MAX_PIPELINED + 1
    assert how in ("eof", "reset")


# -- early answers close the connection --------------------------------------------------------


def test_a_413_for_a_declared_size_closes_the_connection_and_the_rest_is_never_read(server: KamiyoServer) -> None:
    with connections(server, 1) as (sock,):
        sock.sendall(
            f"POST {WEBHOOK_PATH} HTTP/1.1\r\nHost: kamiyo\r\nContent-Length: {100 * MIB}\r\n\r\n".encode()
            + b"x" * 65536
        )
        data, how = read_until_closed(sock)
        sent = 0
        with contextlib.suppress(OSError):
            while sent < 32 * MIB:
                sock.sendall(b"x" * MIB)
                sent += MIB
    status, headers, body = split_answer(data)
    assert (status, headers["connection"]) == (413, "close")
    assert orjson.loads(body)["reason"] == "too_large"
    assert how in ("eof", "reset")  # reset: the server closed with some of the body unread, as it should
    assert sent < 8 * MIB  # refused (reset) after at most what the kernel's buffers held


def test_a_413_in_the_middle_of_a_chunked_body_closes_the_connection(server: KamiyoServer) -> None:
    with connections(server, 1) as (sock,):
        sock.sendall(f"POST {WEBHOOK_PATH} HTTP/1.1\r\nHost: kamiyo\r\nTransfer-Encoding: chunked\r\n\r\n".encode())
        sent = 0
        chunk = b"%x\r\n%s\r\n" % (16384, b"x" * 16384)
        with contextlib.suppress(OSError):
            while sent < 32 * MIB:
                sock.sendall(chunk)
                sent += len(chunk)
        data, how = read_until_closed(sock)
    status, headers, _body = split_answer(data)
    assert (status, headers["connection"]) == (413, "close")
    assert how in ("eof", "reset")
    assert sent < 8 * MIB


# -- the cap on connections --------------------------------------------------------------------


def test_over_the_cap_the_longest_idle_connections_are_closed_to_let_a_delivery_in(capped: KamiyoServer) -> None:
    with connections(capped, CAP) as idle:
        time.sleep(0.3)  # all accepted
        with connections(capped, 1) as (sock,):
            sock.sendall(delivery("cus_cap_evict"))
            status, _headers, body = read_answer(sock)
        assert (status, orjson.loads(body)["duplicate"]) == (200, False)
        time.sleep(0.2)
        evicted = [n for n, sock in enumerate(idle) if closed_now(sock)]
    assert evicted == [0]  # one, the one idle longest
    capped.wait_for_log("http connection closed reason=evicted")


def test_over_the_cap_with_every_connection_in_a_request_a_new_one_is_refused_at_once(capped: KamiyoServer) -> None:
    with connections(capped, CAP) as busy:
        for sock in busy:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: kamiyo\r\n")  # a head begun: in a request
        time.sleep(0.2)
        with connections(capped, 1) as (refused,):
            started = time.monotonic()
            data, how = read_until_closed(refused)
            took = time.monotonic() - started
    status, headers, body = split_answer(data)
    assert (status, headers["connection"], headers["retry-after"]) == (503, "close", "1")
    assert orjson.loads(body)["reason"] == "overloaded"
    assert how in ("eof", "reset")
    assert took < 1.0
    # The busy connections are gone: the service answers again at once.
    time.sleep(0.2)
    with connections(capped, 1) as (sock,):
        sock.sendall(delivery("cus_cap_after"))
        assert read_answer(sock)[0] == 200


# -- normal clients ----------------------------------------------------------------------------


def test_a_kept_alive_client_gets_every_answer_on_one_connection(server: KamiyoServer) -> None:
    ids = []
    with connections(server, 1) as (sock,):
        for n in range(5):
            sock.sendall(delivery(f"cus_keepalive_{n}"))
            status, headers, body = read_answer(sock)
            assert (status, headers.get("connection")) == (200, None)
            ids.append(orjson.loads(body)["id"])
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: kamiyo\r\n\r\n")
            assert read_answer(sock)[0] == 200
            time.sleep(0.3)
        assert not closed_now(sock)
    assert [server.stored_count(event_id) for event_id in ids] == [1] * 5


def test_a_body_sent_in_pieces_within_the_body_timeout_keeps_the_connection_alive(server: KamiyoServer) -> None:
    """Only an answer given before the whole body arrived closes the connection."""
    with connections(server, 1) as (sock,):
        for n in range(3):
            request = delivery(f"cus_pieces_{n}")
            head, _, body = request.partition(b"\r\n\r\n")
            sock.sendall(head + b"\r\n\r\n" + body[:100])
            time.sleep(0.2)
            sock.sendall(body[100:300])
            time.sleep(0.2)
            sock.sendall(body[300:])
            status, headers, answer = read_answer(sock)
            assert (status, headers.get("connection")) == (200, None), answer
        assert not closed_now(sock)


def test_a_request_pipelined_in_the_read_that_ends_a_body_in_pieces_is_answered_too(server: KamiyoServer) -> None:
    with connections(server, 1) as (sock,):
        head, _, body = delivery("cus_pieces_pipelined").partition(b"\r\n\r\n")
        started = time.monotonic()
        sock.sendall(head + b"\r\n\r\n" + body[:100])
        time.sleep(0.6)  # the last answer's header timeout then ends well after the body's deadline
        sock.sendall(body[100:] + b"GET /health HTTP/1.1\r\nHost: kamiyo\r\n\r\n")
        time.sleep(0.3)  # both answers arrive before the first is read
        first, second = read_answer(sock), read_answer(sock)
        assert (first[0], first[1].get("connection")) == (200, None)
        assert (second[0], second[1].get("connection")) == (200, None)
        # Past the first body's deadline, within the header timeout of the last answer:
        time.sleep(max(0.0, started + BODY_TIMEOUT + 0.15 - time.monotonic()))
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: kamiyo\r\n\r\n")
        assert read_answer(sock)[0] == 200
        time.sleep(0.6)  # a body deadline left behind would have cut the connection by now
        assert not closed_now(sock)


def test_the_webhook_answers_while_the_cap_is_nearly_reached(capped: KamiyoServer) -> None:
    with connections(capped, CAP - 2) as idle:
        time.sleep(0.2)
        with connections(capped, 1) as (sock,):
            for n in range(20):
                sock.sendall(delivery(f"cus_near_cap_{n}"))
                assert read_answer(sock)[0] == 200
        assert not any(closed_now(sock) for sock in idle)  # nobody had to be evicted
