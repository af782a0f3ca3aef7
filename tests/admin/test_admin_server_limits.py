"""The console's limits on a real ``kamiyo serve`` (uvicorn on 127.0.0.1): body caps and throttling by address.

- A body past its cap is answered 413 while the client is still sending, the connection is
  closed, and the server's memory stays flat whatever the client meant to send.
- Sign-in throttling counts the client named in ``X-Forwarded-For`` only when the peer is a
  trusted proxy (``FORWARDED_ALLOW_IPS``); from anyone else the header is ignored.
"""

from __future__ import annotations

import contextlib
import socket
import time
from pathlib import Path

import pytest

from admin.app_client import ADMIN_TOKEN
from e2e.harness import KamiyoServer, ServerFactory

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

CHUNK = b"a" * 65536
MIB = 1024 * 1024


def _rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def _chunked_upload(server: KamiyoServer, path: str, total: int) -> tuple[bytes, int, bool]:
    """POST a chunked body of up to ``total`` bytes, reading the answer as it comes.

    Returns the answer's first bytes, how many body bytes were sent before the answer came,
    and whether the server then closed the connection.
    """
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(
            f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/x-www-form-urlencoded\r\n"
            "Transfer-Encoding: chunked\r\n\r\n".encode()
        )
        sock.setblocking(False)
        sent = 0
        answer = b""
        frame = f"{len(CHUNK):x}\r\n".encode() + CHUNK + b"\r\n"
        while sent < total and not answer:
            try:
                sock.sendall(frame)
                sent += len(CHUNK)
            except (BlockingIOError, BrokenPipeError, ConnectionResetError):
                time.sleep(0.01)
            with contextlib.suppress(BlockingIOError):
                answer = sock.recv(4096)
        sock.settimeout(10)
        closed = False
        try:
            while True:
                more = sock.recv(65536)
                if not more:
                    closed = True
                    break
                answer += more
        except ConnectionResetError:
            closed = True  # a reset ends the connection too
        except TimeoutError:
            closed = False
        return answer, sent, closed


def test_an_endless_sign_in_body_is_answered_413_mid_upload_and_memory_stays_flat(servers: ServerFactory) -> None:
    server = servers()
    assert server.process is not None
    before = _rss_bytes(server.process.pid)
    for _ in range(3):
        answer, sent, closed = _chunked_upload(server, "/admin/login", total=200 * MIB)
        assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
        assert b"connection: close" in answer.lower()
        assert sent < 32 * MIB  # answered long before the client would have finished
        assert closed
    grown = _rss_bytes(server.process.pid) - before
    assert grown < 32 * MIB, f"the server grew by {grown / MIB:.0f} MiB"


def test_a_declared_length_over_the_cap_is_refused_before_the_body_is_sent(servers: ServerFactory) -> None:
    server = servers()
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(
            b"POST /admin/login HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/x-www-form-urlencoded\r\n"
            + f"Content-Length: {300 * MIB}\r\n\r\n".encode()
        )
        answer = sock.recv(4096)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]


def _sign_in_status(server: KamiyoServer, token: str, forwarded_for: str) -> int:
    response = server.http.post(
        "/admin/login", data={"token": token}, headers={"X-Forwarded-For": forwarded_for}, follow_redirects=False
    )
    return response.status_code


def test_behind_a_trusted_proxy_each_forwarded_client_is_throttled_on_its_own(servers: ServerFactory) -> None:
    server = servers(ADMIN_SIGNIN_MAX_FAILURES="3", FORWARDED_ALLOW_IPS="127.0.0.1")  # the proxy runs here
    for _ in range(3):
        assert _sign_in_status(server, "a-wrong-guess-000000000", "203.0.113.9") == 401
    assert _sign_in_status(server, ADMIN_TOKEN, "203.0.113.9") == 429
    assert _sign_in_status(server, ADMIN_TOKEN, "198.51.100.4") == 303  # another client behind the same proxy
    assert server.wait_for_log("admin throttled", "client=203.0.113.9")


def test_from_an_untrusted_peer_x_forwarded_for_is_ignored(servers: ServerFactory) -> None:
    server = servers(ADMIN_SIGNIN_MAX_FAILURES="3", FORWARDED_ALLOW_IPS="192.0.2.1")  # some other proxy
    for n in range(3):
        assert _sign_in_status(server, "a-wrong-guess-000000000", f"203.0.113.{n}") == 401
    # Each guess claimed another address; all came from 127.0.0.1, which is what counts.
    assert _sign_in_status(server, ADMIN_TOKEN, "198.51.100.4") == 429
    assert server.wait_for_log("admin throttled", "client=127.0.0.1")
