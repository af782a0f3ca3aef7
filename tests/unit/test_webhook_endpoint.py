"""The webhook endpoint as a plain ASGI app, driven message by message (what uvicorn sends it)."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import orjson
import pytest

from kamiyo import synthetic
from kamiyo.telemetry.metrics import WebhookMetrics
from kamiyo.web.webhook import WebhookEndpoint
from kamiyo.webhooks.envelope import Envelope
from kamiyo.webhooks.inbox import inbox_row
from kamiyo.webhooks.signature import PROBE_HEADER, probe_header
from support import SECRET, make_settings, signed


class _Writer:
    def __init__(self) -> None:
        self.stored: list[dict[str, Any]] = []
        self.rejections: list[str] = []

    async def store_event(
        self, envelope: Envelope, body: bytes, *, status: str, counted: bool = True, detail: str | None = None
    ) -> bool:
        row = inbox_row(envelope, body, status=status, detail=detail)
        new = all(r["stripe_event_id"] != row["stripe_event_id"] for r in self.stored)
        self.stored.append(row)
        return new

    def count_rejection(self, reason: str, event_type: str = "") -> None:
        self.rejections.append(reason)


def _call(
    endpoint: WebhookEndpoint,
    method: str,
    headers: dict[str, str],
    chunks: list[dict[str, Any]],
    raw_headers: list[tuple[bytes, bytes]] | None = None,
) -> list[dict[str, Any]]:
    scope = {
        "type": "http",
        "method": method,
        "path": "/api/v1/payments/webhook",
        "headers": [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
        + (raw_headers or []),
    }
    incoming = list(chunks)
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return incoming.pop(0) if incoming else {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(endpoint(scope, receive, send))
    return sent


def _endpoint(metrics: WebhookMetrics | None = None, **settings: Any) -> tuple[WebhookEndpoint, _Writer]:
    writer = _Writer()
    return WebhookEndpoint(make_settings("sqlite://", **settings), metrics, lambda: writer), writer


def _answer(sent: list[dict[str, Any]]) -> tuple[int, dict[str, str], dict[str, Any]]:
    start, body = sent
    headers = {k.decode(): v.decode() for k, v in start["headers"]}
    assert int(headers["content-length"]) == len(body["body"])
    return start["status"], headers, orjson.loads(body["body"])


def test_a_body_in_several_chunks_is_verified_whole_and_stored_once() -> None:
    endpoint, writer = _endpoint()
    event = synthetic.event("customer.created", synthetic.customer(customer_id="cus_1", email="ann@example.com"))
    body, headers = signed(event)
    chunks = [
        {"type": "http.request", "body": body[:100], "more_body": True},
        {"type": "http.request", "body": body[100:500], "more_body": True},
        {"type": "http.request", "body": body[500:], "more_body": False},
    ]
    status, answer_headers, answer = _answer(_call(endpoint, "POST", headers, chunks))
    assert (status, answer) == (200, {"received": True, "id": event["id"], "duplicate": False})
    assert answer_headers["content-type"] == "application/json"
    assert [row["payload"].encode() for row in writer.stored] == [body]


@pytest.mark.parametrize("method", ["GET", "HEAD", "PUT", "DELETE"])
def test_other_methods_get_405_naming_post(method: str) -> None:
    endpoint, writer = _endpoint()
    status, headers, _answer_body = _answer(_call(endpoint, method, {}, []))
    assert (status, headers["allow"]) == (405, "POST")
    assert writer.stored == []


def test_a_client_that_leaves_before_its_body_arrived_gets_no_answer_and_nothing_is_stored(
    caplog: pytest.LogCaptureFixture,
) -> None:
    endpoint, writer = _endpoint()
    body, headers = signed(
        synthetic.event("customer.created", synthetic.customer(customer_id="cus_1", email="ann@example.com"))
    )
    with caplog.at_level(logging.WARNING, "kamiyo.webhook"):
        sent = _call(endpoint, "POST", headers, [{"type": "http.request", "body": body[:50], "more_body": True}])
    assert sent == []
    assert writer.stored == []
    assert "webhook rejected reason=disconnected" in caplog.text


def test_an_unexpected_error_answers_500_in_json_and_is_counted_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    class Broken(WebhookMetrics):
        def delivery_received(self, event_type: str, seconds: float, *, ignored: bool) -> None:
            raise RuntimeError("boom")

    metrics = Broken()
    endpoint, writer = _endpoint(metrics)
    body, headers = signed(
        synthetic.event("customer.created", synthetic.customer(customer_id="cus_1", email="ann@example.com"))
    )
    with caplog.at_level(logging.ERROR, "kamiyo.webhook"):
        status, _headers, answer = _answer(
            _call(endpoint, "POST", headers, [{"type": "http.request", "body": body, "more_body": False}])
        )
    assert (status, answer["reason"]) == (500, "internal")
    assert writer.rejections == ["internal"]
    assert "webhook failed reason=internal: RuntimeError" in caplog.text


def test_a_declared_length_over_the_limit_is_refused_before_reading() -> None:
    endpoint, writer = _endpoint(max_body_bytes=1000)
    status, _headers, answer = _answer(_call(endpoint, "POST", {"content-length": "5000"}, []))
    assert (status, answer["reason"]) == (413, "too_large")
    assert writer.stored == []


@pytest.mark.parametrize(
    ("mode", "livemode", "stored"),
    [
        ("live", False, ("ignored", "test-mode event ignored: this service takes live-mode events only (STRIPE_MODE)")),
        ("live", True, ("pending", None)),
        ("test", True, ("ignored", "live-mode event ignored: this service takes test-mode events only (STRIPE_MODE)")),
        ("test", False, ("pending", None)),
        (None, True, ("pending", None)),
        (None, False, ("pending", None)),
    ],
)
def test_an_event_of_the_other_stripe_mode_is_answered_200_and_stored_as_ignored_with_the_reason(
    mode: str | None, livemode: bool, stored: tuple[str, str | None]
) -> None:
    endpoint, writer = _endpoint(stripe_mode=mode)
    event = synthetic.event("customer.created", synthetic.customer(customer_id="cus_1", email=None), livemode=livemode)
    body, headers = signed(event)
    status, _headers, answer = _answer(_call(endpoint, "POST", headers, [{"type": "http.request", "body": body}]))
    assert (status, answer) == (200, {"received": True, "id": event["id"], "duplicate": False})
    [row] = writer.stored
    assert (row["status"], row["detail"]) == stored


def _customer_delivery() -> tuple[bytes, dict[str, str]]:
    return signed(synthetic.event("customer.created", synthetic.customer(customer_id="cus_1", email="a@example.com")))


@pytest.mark.parametrize(
    ("declared", "status"),
    [
        pytest.param(b"\xb2", 200, id="superscript-two-latin-1"),
        pytest.param("²".encode(), 200, id="superscript-two-utf-8"),
        pytest.param("٣".encode(), 200, id="arabic-indic-three"),
        pytest.param("１２".encode(), 200, id="fullwidth-digits"),
        pytest.param(b"-1", 200, id="negative"),
        pytest.param(b" 12", 200, id="space"),
        pytest.param(b"1e9", 200, id="exponent"),
        pytest.param(b"", 200, id="empty"),
        pytest.param(b"9" * 5000, 413, id="5000-digits"),
        pytest.param(b"9" * 19, 413, id="19-digits"),
        pytest.param(b"0" * 30 + b"1", 200, id="zero-padded"),
    ],
)
def test_no_content_length_value_makes_the_endpoint_answer_500(declared: bytes, status: int) -> None:
    """A value that is not plain ASCII digits is ignored (the server frames the body and the running
    count caps it); too many digits for any body is 413. "²".isdigit() is true and int() refuses it."""
    endpoint, writer = _endpoint()
    body, headers = _customer_delivery()
    chunks = [{"type": "http.request", "body": body, "more_body": False}]
    answered, _headers, answer = _answer(_call(endpoint, "POST", headers, chunks, [(b"content-length", declared)]))
    assert answered == status, answer
    assert len(writer.stored) == (1 if status == 200 else 0)


def _unsigned_ping(extra: dict[str, str]) -> tuple[int, WebhookMetrics, _Writer]:
    metrics = WebhookMetrics()
    endpoint, writer = _endpoint(metrics)
    chunks = [{"type": "http.request", "body": b'{"type":"ping"}', "more_body": False}]
    status, _headers, answer = _answer(_call(endpoint, "POST", extra, chunks))
    assert answer["reason"] == "missing_signature"
    return status, metrics, writer


def test_a_client_claiming_to_be_doctor_by_user_agent_is_counted_as_a_failed_delivery() -> None:
    status, metrics, writer = _unsigned_ping({"User-Agent": "kamiyo-doctor/1"})
    assert status == 400
    assert writer.rejections == ["missing_signature"]
    metrics.flush()
    assert metrics.registry.get_sample_value("webhook_failures_total", {"reason": "missing_signature"}) == 1


def test_doctors_ping_marked_with_the_secret_is_answered_but_not_counted() -> None:
    status, metrics, writer = _unsigned_ping({PROBE_HEADER: probe_header(SECRET, int(time.time()))})
    assert status == 400
    assert writer.rejections == []
    metrics.flush()
    assert metrics.registry.get_sample_value("webhook_failures_total", {"reason": "missing_signature"}) in (None, 0)


@pytest.mark.parametrize(
    "mark",
    [
        pytest.param(lambda: probe_header("whsec_test_someone_else_000000000", int(time.time())), id="other-secret"),
        pytest.param(lambda: probe_header(SECRET, int(time.time()) - 301), id="stale"),
    ],
)
def test_a_probe_mark_made_without_the_secret_or_too_long_ago_is_counted(mark: Any) -> None:
    _status, _metrics, writer = _unsigned_ping({PROBE_HEADER: mark()})
    assert writer.rejections == ["missing_signature"]


def test_a_signed_delivery_with_a_probe_mark_is_still_a_delivery() -> None:
    """The mark only ever spares an unsigned request: a delivery's own failures are always counted."""
    metrics = WebhookMetrics()
    endpoint, writer = _endpoint(metrics)
    body, headers = signed(
        synthetic.event("customer.created", synthetic.customer(customer_id="cus_1", email="a@example.com")),
        "whsec_test_someone_else_000000000",
    )
    headers[PROBE_HEADER] = probe_header(SECRET, int(time.time()))
    chunks = [{"type": "http.request", "body": body, "more_body": False}]
    status, _headers, answer = _answer(_call(endpoint, "POST", headers, chunks))
    assert (status, answer["reason"]) == (400, "invalid_signature")
    assert writer.rejections == ["invalid_signature"]
