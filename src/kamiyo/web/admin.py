"""The operator console (``/admin``) and the JSON admin API it uses (``/admin/api/...``).

``create_app`` adds these routes only when an admin token is configured (``KAMIYO_ADMIN_TOKEN``
or ``KAMIYO_ADMIN_TOKENS``); without one every ``/admin`` path is a plain 404. With one, every
``/admin`` path checks the credentials before anything else (``admin_auth.py``, sessions in
``admin_sessions.py``, sign-in throttling in ``admin_throttle.py``): a request without them
gets 401 and one log line, ``admin unauthorized reason=... method=... path=... client=...``
(never a token); too many wrong tokens from one address get 429 with ``Retry-After``. Unknown
``/admin`` paths answer 401 too, so nobody learns which routes exist without a token.

Handlers are thin: read the query or JSON body with bounds (``admin_input.py``: a body is
streamed with a running cap, 413 past it), call ``operations/`` (overrides, replay, users, audit)
or ``admin_queries.py`` (deliveries, chart) in the thread pool, answer JSON in which every
string has been through the scrubber (``kamiyo.scrub``). Every list has a default and a maximum
size. The API is described by ``ENDPOINTS``, from which both the routes and the OpenAPI schema
are built, so the two cannot drift apart; the schema states every bound, and what it calls
valid the API accepts. The console and sign-in pages (HTML, inline CSS and JS, their
Content-Security-Policy) are assembled in ``admin_page.py``.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cache
from typing import Any

import orjson
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from kamiyo import __version__
from kamiyo.config import Settings
from kamiyo.db.errors import describe
from kamiyo.errors import KamiyoError
from kamiyo.operations.audit import list_audit
from kamiyo.operations.inputs import parse_time
from kamiyo.operations.overrides import active_overrides
from kamiyo.operations.replay import replay_events
from kamiyo.operations.users import show_user
from kamiyo.scrub import scrub
from kamiyo.telemetry.webhook_health import HealthReport, parked_reasons
from kamiyo.web.admin_auth import (
    ACTOR_HEADER,
    CSRF_HEADER,
    SESSION_COOKIE,
    AdminTokens,
    Bearer,
    Operator,
    Refusal,
    clean_actor,
    csrf_matches,
    read_authorization,
)
from kamiyo.web.admin_input import (
    TEXT_PATTERN,
    WORDS_PATTERN,
    BadRequest,
    BodyTooLarge,
    query_count,
    query_text,
    read_form,
    read_json_object,
)
from kamiyo.web.admin_page import console_page, login_page
from kamiyo.web.admin_queries import (
    MARKS,
    MAX_LIMIT,
    count_by,
    delivery,
    delivery_chart,
    event_types,
    is_stored,
    recent_deliveries,
)
from kamiyo.web.admin_sessions import SessionStore
from kamiyo.web.admin_throttle import SignInThrottle

log = logging.getLogger("kamiyo.admin")

ADMIN_PREFIX = "/admin"
API_PREFIX = "/admin/api"
_ALL_METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
_COMMON_HEADERS = {
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}
_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="kamiyo admin"'}
_DUMP_OPTIONS = orjson.OPT_NAIVE_UTC | orjson.OPT_UTC_Z | orjson.OPT_NON_STR_KEYS

# The bounds of every input, stated in the OpenAPI schema and checked by the handlers.
EVENT_ID_PATTERN = "^evt_[A-Za-z0-9_]{1,251}$"
TYPE_PATTERN = "^[A-Za-z0-9_.-]{1,255}$"
# A replay's or the audit's ``since``: now, a duration ago (at most ten years), Unix seconds
# (2000-02 .. 2033-05), or an ISO 8601 date or time of 2001..2029 (days 01-28 of the pattern's
# own; the CLI reads any date). Every string the pattern matches is a time the API accepts.
SINCE_PATTERN = (
    "^(now"
    "|[0-9]{1,8}s|[0-9]{1,6}m|[0-9]{1,4}h|[0-9]{1,3}d|[0-9]{1,2}w"
    "|9[5-9][0-9]{7}|1[0-9]{9}"
    "|20(0[1-9]|[12][0-9])-(0[1-9]|1[0-2])-(0[1-9]|1[0-9]|2[0-8])"
    "(T([01][0-9]|2[0-3]):[0-5][0-9](:[0-5][0-9])?(Z|[+-](0[0-9]|1[0-3]):[0-5][0-9])?)?"
    ")$"
)
MAX_TEXT = 320  # an email, a customer id, an object id
MAX_REASON = 1000
DELIVERIES_DEFAULT, DELIVERIES_MAX = 100, MAX_LIMIT
AUDIT_DEFAULT, AUDIT_MAX = 200, 1000
PARKED_DEFAULT, PARKED_MAX = 50, 200
OVERRIDES_DEFAULT, OVERRIDES_MAX = 200, 1000
REPLAY_DEFAULT, REPLAY_MAX = 100, 1000
CHART_DEFAULT, CHART_MAX = 24, 168
_REPLAY_FIELDS = frozenset({"event_id", "failed", "type", "since", "dry_run", "reason", "limit"})


class _Context:
    """What a handler needs: the settings, and the engine and worker the lifespan made."""

    def __init__(self, settings: Settings, state: Mapping[str, Any]) -> None:
        self.settings = settings
        self._state = state

    @property
    def engine(self) -> Engine:
        engine: Engine = self._state["engine"]
        return engine

    def health_report(self) -> HealthReport:
        """The webhook health with every detail (blocking), as the app's lifespan set it up."""
        report: HealthReport = self._state["health_report"]()
        return report


Handler = Callable[[_Context, Request, Operator], Awaitable[Response]]


@dataclass(frozen=True)
class Endpoint:
    """One admin API operation: its route and its OpenAPI description."""

    method: str
    path: str
    handler: Handler
    summary: str
    response: dict[str, Any]
    parameters: tuple[dict[str, Any], ...] = ()
    body: dict[str, Any] | None = None
    errors: tuple[int, ...] = ()
    tags: tuple[str, ...] = ("admin",)
    extra: dict[str, Any] = field(default_factory=dict)


def _scrubbed(value: Any) -> Any:
    """JSON-ready ``value`` with every string (keys too) through the scrubber."""
    if isinstance(value, str):
        return scrub(value)
    if isinstance(value, dict):
        return {scrub(k) if isinstance(k, str) else k: _scrubbed(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_scrubbed(item) for item in value]
    return value


def _json(status: int, body: Any, headers: Mapping[str, str] | None = None, *, ours: bool = False) -> Response:
    """A JSON answer. Whatever came from the database or a request is scrubbed; ``ours`` (the
    schema, written here) goes out as it is."""
    content = orjson.dumps(body, option=_DUMP_OPTIONS)
    if not ours:
        content = orjson.dumps(_scrubbed(orjson.loads(content)), option=_DUMP_OPTIONS)
    return Response(content, status_code=status, media_type="application/json", headers=headers)


def _client(request: Request) -> str:
    """The client's address: the peer, or X-Forwarded-For's client when uvicorn trusts the peer as a proxy."""
    return request.client.host if request.client else "-"


def _matching(value: str | None, name: str, pattern: str, hint: str) -> str | None:
    """``value`` when it matches the schema's ``pattern`` (as JSON Schema matches: a search), else 400."""
    if value is None:
        return None
    if re.search(pattern, value) is None:
        raise BadRequest(f"{name} must be {hint}")
    return value.removesuffix("\n")  # a pattern's $ also matches before one final newline


def _since(value: str | None) -> datetime | None:
    text = _matching(value, "since", SINCE_PATTERN, "now, 2h, 1d, Unix seconds or an ISO 8601 time")
    return parse_time(text, now=datetime.now(UTC)) if text is not None else None


def _text(value: Any, name: str, max_length: int = MAX_TEXT) -> str | None:
    if value is not None and not isinstance(value, str):
        raise BadRequest(f"{name} must be a string")
    if value is not None and len(value) > max_length:
        raise BadRequest(f"{name} is longer than {max_length} characters")
    return _matching(value, name, TEXT_PATTERN, "text without control characters") or None


# -- the API handlers -----------------------------------------------------------------------


async def _health(ctx: _Context, _request: Request, _op: Operator) -> Response:
    report = await run_in_threadpool(ctx.health_report)
    return _json(200, report.to_json())


async def _chart(ctx: _Context, request: Request, _op: Operator) -> Response:
    hours = query_count(request, "hours", CHART_DEFAULT, 1, CHART_MAX)
    return _json(200, await run_in_threadpool(delivery_chart, ctx.engine, hours=hours))


async def _deliveries(ctx: _Context, request: Request, _op: Operator) -> Response:
    status = request.query_params.get("status")
    if status is not None and status not in MARKS:
        raise BadRequest(f"status must be one of {', '.join(MARKS)}")
    event_type = _matching(query_text(request, "type", 255), "type", TYPE_PATTERN, "an event type")
    customer = _text(request.query_params.get("customer"), "customer")
    limit = query_count(request, "limit", DELIVERIES_DEFAULT, 1, DELIVERIES_MAX)
    filters = {"status": status, "type": event_type, "customer": customer}

    def read() -> dict[str, Any]:
        entries = recent_deliveries(ctx.engine, status=status, event_type=event_type, customer=customer, limit=limit)
        types = event_types(ctx.engine)
        return {"deliveries": entries, "counts": count_by(entries), "types": types, "filters": filters}

    return _json(200, await run_in_threadpool(read))


async def _delivery(ctx: _Context, request: Request, _op: Operator) -> Response:
    event_id = _matching(request.path_params["event_id"], "event_id", EVENT_ID_PATTERN, "a Stripe event id (evt_...)")
    found = await run_in_threadpool(delivery, ctx.engine, event_id or "")
    if found is None:
        return _json(404, {"error": f"no event {event_id} in the inbox"})
    return _json(200, found)


async def _replay(ctx: _Context, request: Request, op: Operator) -> Response:
    body = await read_json_object(request, ctx.settings.admin_max_json_bytes)
    unknown = sorted(set(body) - _REPLAY_FIELDS)
    if unknown:
        raise BadRequest(f"unknown field(s): {', '.join(unknown)[:200]}")
    event_id = body.get("event_id")
    if event_id is not None and not isinstance(event_id, str):
        raise BadRequest("event_id must be a string")
    event_id = _matching(event_id, "event_id", EVENT_ID_PATTERN, "a Stripe event id (evt_...)")
    event_type = body.get("type")
    if event_type is not None and not isinstance(event_type, str):
        raise BadRequest("type must be a string")
    event_type = _matching(event_type, "type", TYPE_PATTERN, "an event type")
    since_text = body.get("since")
    if since_text is not None and not isinstance(since_text, str):
        raise BadRequest("since must be a string")
    since = _since(since_text)
    failed, dry_run = body.get("failed", False), body.get("dry_run", False)
    if not isinstance(failed, bool) or not isinstance(dry_run, bool):
        raise BadRequest("failed and dry_run must be true or false")
    limit = body.get("limit", REPLAY_DEFAULT)
    if isinstance(limit, float) and limit.is_integer():
        limit = int(limit)
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= REPLAY_MAX:
        raise BadRequest(f"limit must be a whole number from 1 to {REPLAY_MAX}")
    reason = body.get("reason")
    if reason is not None and not isinstance(reason, str):
        raise BadRequest("reason must be a string")
    if reason is not None and len(reason) > MAX_REASON:
        raise BadRequest(f"reason is longer than {MAX_REASON} characters")
    if reason is not None and re.search(TEXT_PATTERN, reason) is None:
        raise BadRequest("reason must be text without control characters")
    if not dry_run and not (reason or "").strip():
        raise BadRequest("a reason is required to replay (it goes to the audit log)")
    if event_id is not None and (failed or event_type is not None or since is not None):
        raise BadRequest("replay an event id on its own, or select with failed, type and since")
    if event_id is not None and not await run_in_threadpool(is_stored, ctx.engine, event_id):
        return _json(404, {"error": f"no event {event_id} in the inbox"})
    results = await run_in_threadpool(
        lambda: replay_events(
            ctx.engine,
            event_id=event_id,
            failed=failed,
            event_type=event_type,
            since=since,
            dry_run=dry_run,
            actor=op.audit_name,
            reason=reason,
            settings=ctx.settings,
            limit=limit,
            claimed_by=op.claimed,
        )
    )
    log.info(
        "admin replay actor=%s claimed=%s event=%s failed=%s type=%s dry_run=%s limit=%d results=%d",
        op.audit_name,
        op.claimed or "-",
        event_id or "-",
        failed,
        event_type or "-",
        dry_run,
        limit,
        len(results),
    )
    return _json(200, {"dry_run": dry_run, "limit": limit, "results": results})


async def _parked(ctx: _Context, request: Request, _op: Operator) -> Response:
    limit = query_count(request, "limit", PARKED_DEFAULT, 1, PARKED_MAX)
    reasons = await run_in_threadpool(parked_reasons, ctx.engine, limit=limit)
    return _json(200, {"total": sum(r.count for r in reasons), "reasons": reasons})


async def _overrides(ctx: _Context, request: Request, _op: Operator) -> Response:
    limit = query_count(request, "limit", OVERRIDES_DEFAULT, 1, OVERRIDES_MAX)

    def read() -> Any:
        with ctx.engine.connect().execution_options(readonly=True) as connection:
            return active_overrides(connection, limit=limit)

    return _json(200, {"overrides": await run_in_threadpool(read)})


async def _user(ctx: _Context, request: Request, _op: Operator) -> Response:
    email = _text(request.query_params.get("email"), "email")
    if email is None:
        raise BadRequest("email is required")

    def read() -> Any:
        with ctx.engine.connect().execution_options(readonly=True) as connection:
            return show_user(connection, email, tiers=ctx.settings.price_tiers)

    report = await run_in_threadpool(read)
    if report is None:
        return _json(404, {"error": f"no user {email}"})
    return _json(200, report)


async def _audit(ctx: _Context, request: Request, _op: Operator) -> Response:
    since = _since(query_text(request, "since", 64))
    limit = query_count(request, "limit", AUDIT_DEFAULT, 1, AUDIT_MAX)

    def read() -> Any:
        with ctx.engine.connect().execution_options(readonly=True) as connection:
            return list_audit(connection, since=since, limit=limit)

    return _json(200, {"entries": await run_in_threadpool(read)})


async def _openapi(_ctx: _Context, _request: Request, _op: Operator) -> Response:
    return _json(200, openapi_schema(), ours=True)


# -- the API's description: routes and OpenAPI schema from one table ------------------------

_OBJ: dict[str, Any] = {"type": "object"}
_ERROR = {"type": "object", "properties": {"error": {"type": "string"}}, "required": ["error"]}
_TEXT_SCHEMA: dict[str, Any] = {"type": "string", "maxLength": MAX_TEXT, "pattern": TEXT_PATTERN}
_EVENT_ID = {"type": "string", "maxLength": 255, "pattern": EVENT_ID_PATTERN}
_TYPE = {"type": "string", "maxLength": 255, "pattern": TYPE_PATTERN}
_SINCE: dict[str, Any] = {
    "type": "string",
    "maxLength": 64,
    "pattern": SINCE_PATTERN,
    "description": "now, a duration ago (30m, 2h, 1d, 2w; at most ten years), Unix seconds, "
    "or ISO 8601 (UTC if no zone)",
}
_NULLABLE_STRING = {"type": ["string", "null"]}
# Errors every operation may answer, besides its own.
_COMMON_ERRORS = {
    "401": "no or wrong admin token",
    "405": "method not allowed (the Allow header lists the methods)",
    "429": "too many wrong admin tokens from this address: retry after Retry-After seconds",
    "503": "the database is unavailable",
}


def _param(name: str, description: str, schema: dict[str, Any], *, where: str = "query") -> dict[str, Any]:
    return {"name": name, "in": where, "required": where == "path", "description": description, "schema": schema}


def _count(name: str, what: str, default: int, high: int) -> dict[str, Any]:
    return _param(
        name,
        f"{what} (1..{high}, default {default})",
        {"type": "integer", "minimum": 1, "maximum": high, "default": default},
    )


_DELIVERY_ENTRY = {
    "type": "object",
    "description": "kind=event: one stored event; kind=count: duplicate or rejected deliveries counted in one minute",
    "properties": {
        "kind": {"type": "string", "enum": ["event", "count"]},
        "mark": {"type": "string", "enum": list(MARKS)},
        "event_id": {"type": "string"},
        "type": _NULLABLE_STRING,
        "customer": _NULLABLE_STRING,
        "attempts": {"type": "integer"},
        "received_at": {"type": "string", "format": "date-time"},
        "error": _NULLABLE_STRING,
        "count": {"type": "integer"},
        "reason": _NULLABLE_STRING,
        "minute": {"type": "string", "format": "date-time"},
    },
    "required": ["kind", "mark"],
}

# The replay body: an event id on its own, or a selection (failed, type, since); a reason unless
# it is a dry run. Stated with anyOf/not so that every body the schema allows is one the API runs.
_FAILED_TRUE = {"properties": {"failed": {"const": True}}, "required": ["failed"]}
_REPLAY_BODY: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "event_id": {**_EVENT_ID, "description": "replay this event, on its own"},
        "failed": {"type": "boolean", "description": "every parked failure"},
        "type": {**_TYPE, "description": "events of this type"},
        "since": {**_SINCE, "description": "events received since: " + _SINCE["description"]},
        "dry_run": {"type": "boolean", "description": "show what would be replayed; change nothing"},
        "reason": {
            "type": ["string", "null"],
            "maxLength": MAX_REASON,
            "pattern": WORDS_PATTERN,
            "description": "required unless dry_run; recorded in the audit log",
        },
        "limit": {
            "type": "integer",
            "minimum": 1,
            "maximum": REPLAY_MAX,
            "default": REPLAY_DEFAULT,
            "description": f"at most this many events, oldest first (1..{REPLAY_MAX}, default {REPLAY_DEFAULT})",
        },
    },
    "allOf": [
        {
            "anyOf": [
                {
                    "required": ["event_id"],
                    "not": {"anyOf": [_FAILED_TRUE, {"required": ["type"]}, {"required": ["since"]}]},
                },
                {**_FAILED_TRUE, "not": {"required": ["event_id"]}},
                {"required": ["type"], "not": {"required": ["event_id"]}},
                {"required": ["since"], "not": {"required": ["event_id"]}},
            ]
        },
        {
            "anyOf": [
                {"properties": {"dry_run": {"const": True}}, "required": ["dry_run"]},
                {"properties": {"reason": {"type": "string"}}, "required": ["reason"]},
            ]
        },
    ],
}

ENDPOINTS: tuple[Endpoint, ...] = (
    Endpoint(
        "GET",
        "/admin/api/openapi.json",
        _openapi,
        "This schema",
        _OBJ,
    ),
    Endpoint(
        "GET",
        "/admin/api/health",
        _health,
        "Current webhook health: every check of GET /api/v1/payments/webhook/health, with details (always 200 here)",
        {
            "type": "object",
            "properties": {
                "status": {"type": "string", "enum": ["healthy", "degraded"]},
                "checks": {"type": "array", "items": _OBJ},
                "service": _OBJ,
            },
        },
    ),
    Endpoint(
        "GET",
        "/admin/api/chart",
        _chart,
        "Deliveries and failures per 15 minutes: received, duplicate, rejected, failed (parked)",
        {
            "type": "object",
            "properties": {
                "buckets": {"type": "array", "items": {"type": "string", "format": "date-time"}},
                "bucket_seconds": {"type": "integer"},
                "series": {"type": "object", "additionalProperties": {"type": "array", "items": {"type": "integer"}}},
                "totals": {"type": "object", "additionalProperties": {"type": "integer"}},
            },
        },
        parameters=(_count("hours", "how many hours back", CHART_DEFAULT, CHART_MAX),),
        errors=(400,),
    ),
    Endpoint(
        "GET",
        "/admin/api/deliveries",
        _deliveries,
        "Recent deliveries, newest first: stored events, and duplicate/rejected deliveries per minute",
        {
            "type": "object",
            "properties": {
                "deliveries": {"type": "array", "items": _DELIVERY_ENTRY, "maxItems": DELIVERIES_MAX},
                "counts": {"type": "object", "additionalProperties": {"type": "integer"}},
                "types": {"type": "array", "items": {"type": "string"}},
                "filters": _OBJ,
            },
        },
        parameters=(
            _param("status", "outcome", {"type": "string", "enum": list(MARKS)}),
            _param("type", "event type, e.g. customer.subscription.updated", _TYPE),
            _param("customer", "customer id (cus_...), object id, or a user's email", _TEXT_SCHEMA),
            _count("limit", "at most this many", DELIVERIES_DEFAULT, DELIVERIES_MAX),
        ),
        errors=(400,),
    ),
    Endpoint(
        "GET",
        "/admin/api/deliveries/{event_id}",
        _delivery,
        "One stored event: outcome, error, detail, and its payload pretty-printed with secrets redacted",
        {
            "type": "object",
            "properties": {
                "event_id": {"type": "string"},
                "type": {"type": "string"},
                "mark": {"type": "string", "enum": ["applied", "pending", "failed", "ignored"]},
                "attempts": {"type": "integer"},
                "error": _NULLABLE_STRING,
                "detail": _NULLABLE_STRING,
                "payload": {"type": "string", "description": "indented JSON, secret values redacted"},
            },
        },
        parameters=(_param("event_id", "Stripe event id (evt_...)", _EVENT_ID, where="path"),),
        errors=(400, 404),
    ),
    Endpoint(
        "POST",
        "/admin/api/replay",
        _replay,
        "Replay events (like `kamiyo replay`): one by id, or failed/type/since, at most `limit`; "
        "audited unless dry_run",
        {
            "type": "object",
            "properties": {
                "dry_run": {"type": "boolean"},
                "limit": {"type": "integer"},
                "results": {"type": "array", "items": _OBJ, "maxItems": REPLAY_MAX},
            },
            "required": ["dry_run", "results"],
        },
        body=_REPLAY_BODY,
        errors=(400, 403, 404, 413),
        extra={
            "description": "Cookie-authenticated calls (the console) must send X-CSRF-Token. The audit log names "
            "the admin token's name; a name sent in X-Kamiyo-Actor is recorded beside it as a claim. "
            "The JSON body is at most ADMIN_MAX_JSON_BYTES (default 16 KiB): 413 past it."
        },
    ),
    Endpoint(
        "GET",
        "/admin/api/parked",
        _parked,
        "Parked failures grouped by reason (the error class), most frequent first",
        {
            "type": "object",
            "properties": {
                "total": {"type": "integer"},
                "reasons": {
                    "type": "array",
                    "maxItems": PARKED_MAX,
                    "items": {
                        "type": "object",
                        "properties": {
                            "reason": {"type": "string"},
                            "count": {"type": "integer"},
                            "example": {"type": "string"},
                        },
                    },
                },
            },
        },
        parameters=(_count("limit", "at most this many reasons", PARKED_DEFAULT, PARKED_MAX),),
        errors=(400,),
    ),
    Endpoint(
        "GET",
        "/admin/api/overrides",
        _overrides,
        "Manual overrides in force, with their reason and expiry (soonest to expire first)",
        {"type": "object", "properties": {"overrides": {"type": "array", "items": _OBJ, "maxItems": OVERRIDES_MAX}}},
        parameters=(_count("limit", "at most this many", OVERRIDES_DEFAULT, OVERRIDES_MAX),),
        errors=(400,),
    ),
    Endpoint(
        "GET",
        "/admin/api/users",
        _user,
        "One user, as `kamiyo users show EMAIL` shows it",
        _OBJ,
        parameters=({**_param("email", "the user's email", {**_TEXT_SCHEMA, "minLength": 1}), "required": True},),
        errors=(400, 404),
    ),
    Endpoint(
        "GET",
        "/admin/api/audit",
        _audit,
        "The audit log of manual actions, newest first (like `kamiyo audit`)",
        {"type": "object", "properties": {"entries": {"type": "array", "items": _OBJ, "maxItems": AUDIT_MAX}}},
        parameters=(
            _param("since", "entries from then on: " + _SINCE["description"], _SINCE),
            _count("limit", "at most this many", AUDIT_DEFAULT, AUDIT_MAX),
        ),
        errors=(400,),
    ),
)

_ERROR_TEXT = {
    400: "a malformed or out-of-bounds input (the message says which)",
    403: "a cookie-authenticated change without the page's CSRF token",
    404: "not found",
    413: "request body over its cap",
}


@cache
def openapi_schema() -> dict[str, Any]:
    """The OpenAPI 3.1 description of the admin API, built from ``ENDPOINTS``."""
    paths: dict[str, dict[str, Any]] = {}
    error_content = {"application/json": {"schema": _ERROR}}
    for endpoint in ENDPOINTS:
        responses: dict[str, Any] = {
            "200": {"description": "OK", "content": {"application/json": {"schema": endpoint.response}}}
        }
        for code in endpoint.errors:
            responses[str(code)] = {"description": _ERROR_TEXT[code], "content": error_content}
        for common, text in _COMMON_ERRORS.items():
            responses[common] = {"description": text, "content": error_content}
        operation: dict[str, Any] = {
            "summary": endpoint.summary,
            "operationId": endpoint.handler.__name__.strip("_"),
            "tags": list(endpoint.tags),
            "responses": responses,
            **endpoint.extra,
        }
        if endpoint.parameters:
            operation["parameters"] = list(endpoint.parameters)
        if endpoint.body is not None:
            operation["requestBody"] = {"required": True, "content": {"application/json": {"schema": endpoint.body}}}
        paths.setdefault(endpoint.path, {})[endpoint.method.lower()] = operation
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "kamiyo admin API",
            "version": __version__,
            "description": "The JSON API behind the operator console at /admin. Enabled by KAMIYO_ADMIN_TOKEN "
            "(shared) or KAMIYO_ADMIN_TOKENS (one per operator). Every string in an answer has been through "
            "the scrubber: credential-shaped values read [redacted].",
        },
        "components": {
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "an admin token (KAMIYO_ADMIN_TOKEN or one of KAMIYO_ADMIN_TOKENS)",
                },
                "session": {"type": "apiKey", "in": "cookie", "name": SESSION_COOKIE},
            }
        },
        "security": [{"bearer": []}, {"session": []}],
        "paths": paths,
    }


# -- authentication at the door -------------------------------------------------------------


@dataclass(frozen=True)
class _Throttled:
    """Too many wrong tokens from this address: refused until the window ends."""

    retry_after: int


def admin_routes(settings: Settings, state: Mapping[str, Any]) -> list[BaseRoute]:
    """Every ``/admin`` route; only call when an admin token is configured."""
    if not settings.admin_enabled:
        raise KamiyoError("admin_routes needs KAMIYO_ADMIN_TOKEN or KAMIYO_ADMIN_TOKENS")
    tokens = AdminTokens.from_settings(settings)
    ctx = _Context(settings, state)
    form_cap = settings.admin_max_form_bytes

    def sessions() -> SessionStore:
        return SessionStore(ctx.engine, tokens, seconds=settings.admin_session_seconds)

    def throttle() -> SignInThrottle:
        return SignInThrottle(
            ctx.engine,
            max_failures=settings.admin_signin_max_failures,
            window_seconds=settings.admin_signin_window_seconds,
        )

    def logged_path(request: Request) -> str:
        # The path is all that is logged of the request; a token pasted into it is masked too.
        path = request.url.path[:400]
        for secret in tokens.secrets():
            path = path.replace(secret.decode(), "[token]")
        return path[:200]

    def is_api(request: Request) -> bool:
        return request.url.path.startswith(API_PREFIX)

    def refuse(request: Request, reason: str, *, status: int = 401) -> Response:
        word = "unauthorized" if status == 401 else "forbidden"
        log.warning(
            "admin %s reason=%s method=%s path=%s client=%s",
            word,
            reason,
            request.method,
            logged_path(request),
            _client(request),
        )
        challenge = _CHALLENGE if status == 401 else {}
        if is_api(request):
            message = (
                "unauthorized: send Authorization: Bearer <admin token>, or sign in at /admin"
                if status == 401
                else f"forbidden: {reason}"
            )
            return _json(status, {"error": message}, {**_COMMON_HEADERS, **challenge})
        error = {"bad_token": "That token is not right.", "expired_session": "Your session expired."}.get(reason, "")
        if status == 403:
            error = "That form was not sent by this console (CSRF check failed)."
        return login_page(status, {**_COMMON_HEADERS, **challenge}, error=error)

    def throttled(request: Request, wait: int) -> Response:
        log.warning(
            "admin throttled method=%s path=%s client=%s retry_after=%d",
            request.method,
            logged_path(request),
            _client(request),
            wait,
        )
        headers = {**_COMMON_HEADERS, "Retry-After": str(wait)}
        message = f"too many wrong admin tokens from this address: try again in {wait} s"
        if is_api(request):
            return _json(429, {"error": message}, headers)
        return login_page(429, headers, error=message)

    def too_large(exc: BodyTooLarge) -> Response:
        # Closing the connection stops the client's upload: nothing more of it is read.
        return _json(413, {"error": str(exc)}, {**_COMMON_HEADERS, "Connection": "close"})

    def unavailable(request: Request, exc: SQLAlchemyError) -> Response:
        path = logged_path(request)
        log.error("admin database unavailable method=%s path=%s: %s", request.method, path, describe(exc))
        return _json(503, {"error": "the database is unavailable; try again"}, {**_COMMON_HEADERS, "Retry-After": "5"})

    async def identify(request: Request) -> Operator | Refusal | _Throttled:
        header = read_authorization(request.headers.get("authorization"))
        if isinstance(header, Refusal):
            return header
        if isinstance(header, Bearer):
            client = _client(request)
            wait = await run_in_threadpool(throttle().retry_after, client, time.time())
            if wait:
                return _Throttled(wait)
            name = tokens.match(header.token)
            if name is None:
                await run_in_threadpool(throttle().failed, client, time.time())
                return Refusal("bad_token")
            claimed = clean_actor(request.headers.get(ACTOR_HEADER))
            return Operator("bearer", name, claimed if claimed != name else None)
        cookie = request.cookies.get(SESSION_COOKIE)
        if cookie:
            return await run_in_threadpool(sessions().read, cookie, time.time())
        # Another scheme (a proxy's Basic) proves nothing: without a session it is a refusal.
        return Refusal("bad_scheme" if request.headers.get("authorization") is not None else "missing")

    async def csrf_ok(request: Request, operator: Operator) -> bool:
        """The session's CSRF token came along: in the header (the page's fetch) or the form (sign-out)."""
        sent = request.headers.get(CSRF_HEADER)
        if sent is None and request.headers.get("content-type", "").startswith("application/x-www-form-urlencoded"):
            sent = (await read_form(request, form_cap)).get("csrf")
        cookie = request.cookies.get(SESSION_COOKIE, "")
        return operator.csrf is not None and csrf_matches(cookie, sent)

    def guarded(handlers: dict[str, Handler], *, changes: set[str]) -> Callable[[Request], Awaitable[Response]]:
        """``handlers`` by method, behind the credentials check (and the CSRF check for ``changes``)."""

        async def endpoint(request: Request) -> Response:
            try:
                operator = await identify(request)
                if isinstance(operator, _Throttled):
                    return throttled(request, operator.retry_after)
                if isinstance(operator, Refusal):
                    return refuse(request, operator.reason)
                method = "GET" if request.method == "HEAD" else request.method
                handler = handlers.get(method)
                if handler is None:
                    allow = ", ".join(sorted(handlers))
                    return _json(405, {"error": f"method not allowed: {allow}"}, {**_COMMON_HEADERS, "Allow": allow})
                if method in changes and operator.via == "session" and not await csrf_ok(request, operator):
                    return refuse(request, "csrf", status=403)
                response = await handler(ctx, request, operator)
            except BodyTooLarge as exc:
                return too_large(exc)
            except KamiyoError as exc:  # BadRequest and the operations' refusals
                response = _json(400, {"error": str(exc)})
            except SQLAlchemyError as exc:
                return unavailable(request, exc)
            response.headers.update(_COMMON_HEADERS)
            return response

        return endpoint

    async def page(_ctx: _Context, _request: Request, op: Operator) -> Response:
        shown = op.name if op.claimed is None else f"{op.name} (as {op.claimed})"
        return console_page(csrf=op.csrf or "", actor=shown)

    async def logout(_ctx: _Context, _request: Request, op: Operator) -> Response:
        if op.session_hash is not None:
            await run_in_threadpool(sessions().end, op.session_hash)
        log.info("admin signed out actor=%s claimed=%s", op.audit_name, op.claimed or "-")
        response = RedirectResponse(ADMIN_PREFIX, status_code=303)
        response.delete_cookie(SESSION_COOKIE, path=ADMIN_PREFIX, secure=True, httponly=True, samesite="strict")
        return response

    async def unknown(_ctx: _Context, request: Request, _op: Operator) -> Response:
        return _json(404, {"error": f"no admin route {request.url.path[:200]}"})

    async def sign_in(request: Request) -> Response:
        """The form's token (never a cookie or header) decides; a match starts a session."""
        client = _client(request)
        wait = await run_in_threadpool(throttle().retry_after, client, time.time())
        if wait:
            return throttled(request, wait)
        try:
            form = await read_form(request, form_cap)
        except BadRequest as exc:
            return login_page(400, _COMMON_HEADERS, error=str(exc))
        candidate = form.get("token", "")
        if not candidate:
            return refuse(request, "missing")
        name = tokens.match(candidate)
        if name is None:
            await run_in_threadpool(throttle().failed, client, time.time())
            return refuse(request, "bad_token")
        claimed = clean_actor(form.get("name"))
        claimed = claimed if claimed != name else None
        cookie = await run_in_threadpool(sessions().create, name, claimed, time.time())
        log.info("admin signed in actor=console:%s claimed=%s client=%s", name, claimed or "-", client)
        response = RedirectResponse(ADMIN_PREFIX, status_code=303, headers=_COMMON_HEADERS)
        response.set_cookie(
            SESSION_COOKIE,
            cookie,
            max_age=settings.admin_session_seconds,
            path=ADMIN_PREFIX,
            secure=True,
            httponly=True,
            samesite="strict",
        )
        return response

    async def login(request: Request) -> Response:
        if request.method not in ("POST", "GET", "HEAD"):
            return _json(405, {"error": "method not allowed: GET, POST"}, {**_COMMON_HEADERS, "Allow": "GET, POST"})
        try:
            if request.method != "POST":
                if isinstance(await identify(request), Operator):
                    return RedirectResponse(ADMIN_PREFIX, status_code=303, headers=_COMMON_HEADERS)
                return refuse(request, "missing")
            return await sign_in(request)
        except BodyTooLarge as exc:
            return too_large(exc)
        except SQLAlchemyError as exc:
            return unavailable(request, exc)

    by_path: dict[str, dict[str, Handler]] = {}
    for api in ENDPOINTS:
        by_path.setdefault(api.path, {})[api.method] = api.handler
    routes: list[BaseRoute] = [
        Route(ADMIN_PREFIX, guarded({"GET": page}, changes=set()), methods=_ALL_METHODS, name="admin_console"),
        Route(ADMIN_PREFIX + "/login", login, methods=_ALL_METHODS, name="admin_login"),
        Route(ADMIN_PREFIX + "/logout", guarded({"POST": logout}, changes={"POST"}), methods=_ALL_METHODS),
    ]
    routes += [
        Route(path, guarded(handlers, changes={m for m in handlers if m != "GET"}), methods=_ALL_METHODS)
        for path, handlers in by_path.items()
    ]
    # Last: any other /admin path is refused without a token, and 404 with one.
    routes.append(
        Route(ADMIN_PREFIX + "/{rest:path}", guarded(_every_method(unknown), changes=set()), methods=_ALL_METHODS)
    )
    log.info("operator console on at %s (%d admin token(s))", ADMIN_PREFIX, len(tokens.secrets()))
    return routes


def _every_method(handler: Handler) -> dict[str, Handler]:
    return {method: handler for method in _ALL_METHODS if method != "HEAD"}
