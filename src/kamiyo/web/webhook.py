"""POST /api/v1/payments/webhook as a plain ASGI app: read the raw bytes, verify, store, answer.

It is the hot path, so it speaks ASGI directly instead of going through Starlette's request,
routing and middleware objects, which would cost the event loop more than the endpoint's own
work (docs/PERFORMANCE.md). The app (web/app.py) hands it every request for this path, whatever
the method.
Error classes become status codes here and nowhere else.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import orjson

from kamiyo.config import Settings
from kamiyo.domain.modes import ignored_livemode, other_mode_detail
from kamiyo.domain.outcomes import InboxStatus
from kamiyo.domain.rules import HANDLED_TYPES
from kamiyo.errors import PayloadTooLarge, WebhookRejected
from kamiyo.telemetry.metrics import PROBE_EVENT_PREFIX, WebhookMetrics
from kamiyo.webhooks.envelope import read_envelope
from kamiyo.webhooks.inbox import Inbox
from kamiyo.webhooks.signature import PROBE_HEADER, is_probe, verify_signature

log = logging.getLogger("kamiyo.webhook")
WEBHOOK_PATH = "/api/v1/payments/webhook"

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

_JSON = (b"content-type", b"application/json")
_WANTED = (b"stripe-signature", b"content-length", PROBE_HEADER.encode())  # the headers read below
_MAX_DIGITS = 18  # a Content-Length longer than this is larger than any body we take
_ALLOW = (b"allow", b"POST")
# The statuses a delivery is stored with, as plain strings: each travels in a message to the inbox
# process, where a plain string is taken as it is (an enum member would be looked up again).
_PENDING, _IGNORED = InboxStatus.PENDING.value, InboxStatus.IGNORED.value


class ClientGone(Exception):
    """The client disconnected before its whole body arrived: there is nobody to answer."""


class WebhookEndpoint:
    """The endpoint as an ASGI app. ``writer`` is looked up per request: it exists once the
    lifespan has started."""

    def __init__(self, settings: Settings, metrics: WebhookMetrics | None, writer: Callable[[], Inbox]) -> None:
        self._secrets = settings.webhook_secrets
        self._tolerance = settings.signature_tolerance
        self._max_body = settings.max_body_bytes
        self._mode = settings.stripe_mode
        # The ``livemode`` of the events this service ignores (Stripe's other mode); None: none.
        self._ignored_livemode = ignored_livemode(settings.stripe_mode)
        self._metrics = metrics
        self._writer = writer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["method"] != "POST":
            await _answer(send, 405, {"error": "method not allowed: POST required"}, _ALLOW)
            return
        started = time.perf_counter()
        try:
            status, body = await self._deliver(scope, receive, started)
        except ClientGone:
            log.warning(
                "webhook rejected reason=%(reason)s: the connection closed before the whole body arrived "
                "(the client left, or HTTP_BODY_TIMEOUT_SECONDS passed)",
                {"reason": "disconnected"},
            )
            return
        except Exception as exc:
            log.exception(
                "webhook failed reason=%(reason)s: %(error)s", {"reason": "internal", "error": exc.__class__.__name__}
            )
            self._count_rejection("internal", started)
            status, body = 500, {"error": "internal error; retry later", "reason": "internal"}
        await _answer(send, status, body)

    async def _deliver(self, scope: Scope, receive: Receive, started: float) -> tuple[int, dict[str, Any]]:
        if not self._secrets:
            log.error(
                "webhook rejected reason=%(reason)s: STRIPE_WEBHOOK_SECRET is not set (Stripe will retry)",
                {"reason": "not_configured"},
            )
            self._count_rejection("not_configured", started)
            return 503, {"error": "webhook secret not configured", "reason": "not_configured"}
        headers = _headers(scope)
        try:
            body = await _read_body(receive, headers.get("content-length"), self._max_body)
            verify_signature(
                headers.get("stripe-signature"), body, self._secrets, tolerance=self._tolerance, now=time.time()
            )
            envelope, _event = read_envelope(body)
        except WebhookRejected as exc:
            if exc.reason == "invalid_signature":
                log.warning(
                    "webhook rejected reason=%(reason)s: Webhook validation failed: %(error)s",
                    {"reason": exc.reason, "error": str(exc)},
                )
            else:
                log.warning("webhook rejected reason=%(reason)s: %(error)s", {"reason": exc.reason, "error": str(exc)})
            # doctor's unsigned ping is not a delivery: it stays out of the failure counts. Only an
            # unsigned request can be one, so a delivery never pays for this check.
            if exc.reason != "missing_signature" or not is_probe(
                headers.get(PROBE_HEADER), self._secrets, tolerance=self._tolerance, now=time.time()
            ):
                self._count_rejection(exc.reason, started)
            return exc.status_code, {"error": str(exc), "reason": exc.reason}

        status = _PENDING if envelope.type in HANDLED_TYPES else _IGNORED
        detail = None
        if envelope.livemode is self._ignored_livemode:
            # Answered 2xx like any event (Stripe stops retrying), stored as ignored: it changes no user.
            status, detail = _IGNORED, other_mode_detail(envelope.livemode, self._mode)
        counted = not envelope.event_id.startswith(PROBE_EVENT_PREFIX)
        try:
            new = await self._writer().store_event(envelope, body, status=status, counted=counted, detail=detail)
        except Exception as exc:  # noqa: BLE001 - storage down: Stripe must retry, so not 2xx
            log.error(
                "webhook not stored event=%(event)s type=%(type)s: %(error)s",
                {"event": envelope.event_id, "type": envelope.type, "error": exc.__class__.__name__},
            )
            self._count_rejection("internal", started, envelope.type)
            return 503, {"error": "event could not be stored; retry later", "reason": "internal"}
        if self._metrics is not None and counted:
            self._metrics.delivery_received(
                envelope.type, time.perf_counter() - started, ignored=new and status == _IGNORED
            )
        return 200, {"received": True, "id": envelope.event_id, "duplicate": not new}

    def _count_rejection(self, reason: str, started: float, event_type: str = "") -> None:
        if self._metrics is not None:
            self._metrics.delivery_rejected(reason, time.perf_counter() - started)
            self._writer().count_rejection(reason, event_type)


def _headers(scope: Scope) -> dict[str, str]:
    """The headers this endpoint reads, decoded as HTTP/1.1 carries them (latin-1, as Starlette does).
    A repeated header keeps its first value."""
    wanted: dict[str, str] = {}
    for name, value in scope["headers"]:
        if name in _WANTED:
            wanted.setdefault(name.decode("latin-1"), value.decode("latin-1"))
    return wanted


def _declared_length(value: str | None) -> int | None:
    """A Content-Length as a number, or None when it is not one (the server frames the body
    anyway, and the running count below still caps it). Only ASCII digits count ("²".isdigit()
    is true, and int() refuses it); more digits than any body can have mean "too large"."""
    if value is None or not (value.isascii() and value.isdigit()):
        return None
    digits = value.lstrip("0") or "0"
    return int(digits) if len(digits) <= _MAX_DIGITS else 10**_MAX_DIGITS


async def _read_body(receive: Receive, declared: str | None, limit: int) -> bytes:
    length = _declared_length(declared)
    if length is not None and length > limit:
        shown = f"{length}" if length < 10**_MAX_DIGITS else f"over {10**_MAX_DIGITS - 1}"
        raise PayloadTooLarge(f"body of {shown} bytes is over the {limit}-byte limit")
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"body is over the {limit}-byte limit")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def _answer(send: Send, status: int, body: dict[str, Any], *extra: tuple[bytes, bytes]) -> None:
    content = orjson.dumps(body)
    headers = [_JSON, (b"content-length", b"%d" % len(content)), *extra]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": content})
