"""The log of a real ``kamiyo serve`` under hostile input: no field a client controls can forge a
line or carry a raw control character into one. Each record starts with ``time level logger``;
only a traceback's lines (indented) may follow it."""

from __future__ import annotations

import ast
import re
import socket
from pathlib import Path

import pytest

from e2e.harness import WEBHOOK_PATH, KamiyoServer, ServerFactory
from kamiyo import synthetic

pytestmark = [pytest.mark.slow, pytest.mark.timeout(60)]

ADMIN_TOKEN = "test-admin-token-0123456789abcdef"
RECORD = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4} (DEBUG|INFO|WARNING|ERROR|CRITICAL) [\w.]+ ")
FORGED = "2030-01-01T00:00:00+0000 INFO kamiyo.webhook webhook accepted event=evt_forged type=customer.created"
# Characters that end a line or drive a terminal: none may reach the log raw.
RAW = ("\x1b", "\x85", "\u2028", "\u2029", "\r", "\x00", "\x7f")


@pytest.fixture(scope="module")
def server(module_servers: ServerFactory) -> KamiyoServer:
    return module_servers("sqlite", KAMIYO_ADMIN_TOKEN=ADMIN_TOKEN)


@pytest.fixture
def log_start(server: KamiyoServer) -> int:
    """Where this test's part of the shared server's log begins."""
    return len(server.log())


def assert_log_well_formed(server: KamiyoServer, start: int) -> list[str]:
    log = server.log()
    text = log[start:]
    if start and log[start - 1] != "\n":  # the writer was in the middle of a line then
        text = text.partition("\n")[2]
    lines = text.split("\n")
    for line in lines:
        assert line == "" or RECORD.match(line) or line.startswith("    "), f"a line that is no record: {line!r}"
        for char in RAW:
            assert char not in line, f"raw {char!r} in {line!r}"
    assert not any(line.startswith(FORGED[:24]) for line in lines)
    return lines


@pytest.mark.parametrize(
    "event_type",
    [
        pytest.param("customer.created\n" + FORGED, id="newline"),
        pytest.param("customer.created\r\n" + FORGED, id="crlf"),
        pytest.param("customer.created\u2028" + FORGED, id="line-separator"),
        pytest.param("customer.created\x85" + FORGED, id="nel"),
        pytest.param("customer.created\x1b[2K\x1b[1G" + FORGED, id="terminal-escapes"),
    ],
)
def test_a_signed_event_whose_type_carries_a_forged_line_is_logged_on_one_line(
    server: KamiyoServer, log_start: int, event_type: str
) -> None:
    event = synthetic.event("customer.created", synthetic.customer(customer_id="cus_logs", email="logs@x.io"))
    event["type"] = event_type
    response = server.deliver(event)
    assert response.status_code == 200, response.text  # a type nobody handles: stored as ignored
    (line,) = server.wait_for_log(f"event={event['id']}")
    assert RECORD.match(line)
    assert "type=customer.created\\" in line  # the separator, escaped and visible
    assert_log_well_formed(server, log_start)


def _raw_request(server: KamiyoServer, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(request)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


@pytest.mark.parametrize(
    "value",
    [
        pytest.param(b"t=1,v1=\xc2\x85" + FORGED.encode(), id="nel"),
        pytest.param(b"t=1,v1=\xe2\x80\xa8" + FORGED.encode(), id="line-separator"),
        pytest.param("t=1,v1=\u0085".encode("latin-1") + FORGED.encode(), id="latin-1-nel"),
    ],
)
def test_a_signature_header_holding_line_breaks_is_refused_and_logged_on_one_line(
    server: KamiyoServer, log_start: int, value: bytes
) -> None:
    body = b'{"id":"evt_1"}'
    answer = _raw_request(
        server,
        b"POST " + WEBHOOK_PATH.encode() + b" HTTP/1.1\r\nHost: kamiyo\r\nConnection: close\r\n"
        b"Content-Length: %d\r\nStripe-Signature: " % len(body) + value + b"\r\n\r\n" + body,
    )
    assert answer.startswith(b"HTTP/1.1 400 ")
    server.wait_for_log("webhook rejected reason=malformed")
    assert_log_well_formed(server, log_start)


@pytest.mark.parametrize(
    "path",
    [
        pytest.param(b"/admin/%1B%5B31mred", id="escape"),
        pytest.param(b"/admin/%C2%85" + FORGED.replace(" ", "%20").encode(), id="nel"),
        pytest.param(b"/admin/%E2%80%A8" + FORGED.replace(" ", "%20").encode(), id="line-separator"),
        pytest.param(b"/admin/%0A" + FORGED.replace(" ", "%20").encode(), id="newline"),
        pytest.param(WEBHOOK_PATH.encode() + b"/%1B%C2%85%E2%80%A8", id="under-the-webhook"),
    ],
)
def test_a_path_holding_control_characters_cannot_forge_or_corrupt_a_line(
    server: KamiyoServer, log_start: int, path: bytes
) -> None:
    """The admin routes log the path of a request without the token (401); the webhook logs none."""
    before = len(server.log_lines("admin unauthorized"))
    answer = _raw_request(server, b"GET " + path + b" HTTP/1.1\r\nHost: kamiyo\r\nConnection: close\r\n\r\n")
    assert answer.startswith((b"HTTP/1.1 401 ", b"HTTP/1.1 404 ", b"HTTP/1.1 405 "))
    if answer.startswith(b"HTTP/1.1 401 "):
        server.wait_for_log("admin unauthorized", count=before + 1)
    assert_log_well_formed(server, log_start)


# -- the log calls themselves ------------------------------------------------------------------

SOURCE = Path(__file__).resolve().parents[2] / "src" / "kamiyo"
WEBHOOK_PATH_MODULES = [
    "web/webhook.py",
    "web/server.py",
    "webhooks/signature.py",
    "webhooks/envelope.py",
    "webhooks/inbox.py",
    "webhooks/inbox_process.py",
    "reconcile/backfill.py",
]
LEVELS = {"debug", "info", "warning", "error", "exception", "critical", "log"}


@pytest.mark.parametrize("module", WEBHOOK_PATH_MODULES)
def test_every_log_call_on_the_webhook_path_passes_its_fields_as_arguments(module: str) -> None:
    """A message is a constant format string: fields go in as %s arguments (cleaned as the line is
    formatted), never pasted into the format itself, where a % in them would also break the line."""
    tree = ast.parse((SOURCE / module).read_text(), module)
    calls = [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr in LEVELS
        and isinstance(node.func.value, ast.Name)
        and node.func.value.id.endswith("log")
    ]
    assert calls or module.endswith(("signature.py", "envelope.py"))
    for call in calls:
        message = call.args[1] if call.func.attr == "log" else call.args[0]
        where = f"{module}:{call.lineno}: the message is built, not a constant format"
        assert isinstance(message, ast.Constant), where
        assert isinstance(message.value, str), where
