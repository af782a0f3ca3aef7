"""The webhook endpoint as a plain ASGI app, driven message by message (what uvicorn sends it)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import orjson
import pytest

from kamiyo import synthetic
from kamiyo.telemetry.metrics import WebhookMetrics
from kamiyo.web.webhook import WebhookEndpoint
from kamiyo.webhooks.envelope import Envelope
from kamiyo.webhooks.inbox import inbox_row
from support import make_settings, signed


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
    endpoint: WebhookEndpoint, method: str, headers: dict[str, str], chunks: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    scope = {
        "type": "http",
        "method": method,
        "path": "/api/v1/payments/webhook",
        "headers": [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()],
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
