"""The operator console (``/admin``) and the JSON admin API it uses (``/admin/api/...``).

``create_app`` adds these routes only when ``KAMIYO_ADMIN_TOKEN`` is set; without it every
``/admin`` path is a plain 404. With it, every ``/admin`` path checks the token before anything
else (``admin_auth.py``): a request without the right one gets 401 and one log line,
``admin unauthorized reason=... method=... path=... client=...`` (never the token). Unknown
``/admin`` paths answer 401 too, so nobody learns which routes exist without the token.

Handlers are thin: read the query or JSON body, call ``operations/`` (overrides, replay, users,
audit) or ``admin_queries.py`` (deliveries, chart) in the thread pool, answer JSON. The API is
described by ``ENDPOINTS``, from which both the routes and the OpenAPI schema are built, so the
two cannot drift apart. The page is one HTML document with its CSS and JS inline (allowed by
hash in its Content-Security-Policy): no CDN, no other asset.
"""

from __future__ import annotations

import base64
import hashlib
import html
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cache
from pathlib import Path
from string import Template
from typing import Any
from urllib.parse import parse_qs

import orjson
from sqlalchemy import Engine
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from kamiyo import __version__
from kamiyo.config import Settings
from kamiyo.diagnosis.incident_report import parse_time
from kamiyo.errors import KamiyoError
from kamiyo.operations.audit import list_audit
from kamiyo.operations.overrides import active_overrides
from kamiyo.operations.replay import replay_events
from kamiyo.operations.users import show_user
from kamiyo.telemetry.webhook_health import HealthReport, parked_reasons
from kamiyo.web.admin_auth import (
    ACTOR_HEADER,
    CSRF_HEADER,
    SESSION_COOKIE,
    AdminAuth,
    Operator,
    Refusal,
    clean_actor,
)
from kamiyo.web.admin_queries import MARKS, count_by, delivery, delivery_chart, event_types, recent_deliveries

log = logging.getLogger("kamiyo.admin")

ADMIN_PREFIX = "/admin"
API_PREFIX = "/admin/api"
_STATIC = Path(__file__).with_name("admin_static")
_MAX_FORM_BYTES = 4096
_MAX_JSON_BYTES = 16 * 1024
_ALL_METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
_COMMON_HEADERS = {
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}
_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="kamiyo admin"'}
_DUMP_OPTIONS = orjson.OPT_NAIVE_UTC | orjson.OPT_UTC_Z | orjson.OPT_NON_STR_KEYS


class _BadRequest(Exception):
    """A malformed admin request: answered 400 with the message."""


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


def _json(status: int, body: Any, headers: Mapping[str, str] | None = None) -> Response:
    return Response(
        orjson.dumps(body, option=_DUMP_OPTIONS), status_code=status, media_type="application/json", headers=headers
    )


def _client(request: Request) -> str:
    return request.client.host if request.client else "-"


def _query_int(request: Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query_params.get(name, "").strip()
    if not raw:
        return default
    if not raw.isdigit() or not low <= int(raw) <= high:
        raise _BadRequest(f"{name} must be a whole number from {low} to {high}")
    return int(raw)


def _query_text(request: Request, name: str) -> str | None:
    value = request.query_params.get(name, "").strip()
    return value[:320] or None


async def _json_body(request: Request) -> dict[str, Any]:
    body = await request.body()
    if len(body) > _MAX_JSON_BYTES:
        raise _BadRequest(f"body over {_MAX_JSON_BYTES} bytes")
    try:
        data = orjson.loads(body or b"{}")
    except orjson.JSONDecodeError:
        raise _BadRequest("body is not JSON") from None
    if not isinstance(data, dict):
        raise _BadRequest("body must be a JSON object")
    return data


async def _form(request: Request) -> dict[str, str]:
    """A small urlencoded form (the sign-in and sign-out forms); no multipart needed."""
    body = await request.body()
    if len(body) > _MAX_FORM_BYTES:
        raise _BadRequest("form too large")
    fields = parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True, max_num_fields=10)
    return {key: values[0] for key, values in fields.items()}


# -- the API handlers -----------------------------------------------------------------------


async def _health(ctx: _Context, _request: Request, _op: Operator) -> Response:
    report = await run_in_threadpool(ctx.health_report)
    return _json(200, report.to_json())


async def _chart(ctx: _Context, request: Request, _op: Operator) -> Response:
    hours = _query_int(request, "hours", 24, 1, 168)
    return _json(200, await run_in_threadpool(delivery_chart, ctx.engine, hours=hours))


async def _deliveries(ctx: _Context, request: Request, _op: Operator) -> Response:
    status = _query_text(request, "status")
    if status is not None and status not in MARKS:
        raise _BadRequest(f"status must be one of {', '.join(MARKS)}")
    filters = {"status": status, "type": _query_text(request, "type"), "customer": _query_text(request, "customer")}
    limit = _query_int(request, "limit", 100, 1, 500)

    def read() -> dict[str, Any]:
        entries = recent_deliveries(
            ctx.engine, status=status, event_type=filters["type"], customer=filters["customer"], limit=limit
        )
        return {
            "deliveries": entries,
            "counts": count_by(entries),
            "types": event_types(ctx.engine),
            "filters": filters,
        }

    return _json(200, await run_in_threadpool(read))


async def _delivery(ctx: _Context, request: Request, _op: Operator) -> Response:
    event_id = request.path_params["event_id"]
    found = await run_in_threadpool(delivery, ctx.engine, event_id)
    if found is None:
        return _json(404, {"error": f"no event {event_id} in the inbox"})
    return _json(200, found)


async def _replay(ctx: _Context, request: Request, op: Operator) -> Response:
    body = await _json_body(request)
    event_id = body.get("event_id")
    failed = body.get("failed", False)
    event_type = body.get("type")
    since_text = body.get("since")
    dry_run = body.get("dry_run", False)
    reason = body.get("reason")
    for name, value in (("event_id", event_id), ("type", event_type), ("since", since_text), ("reason", reason)):
        if value is not None and not isinstance(value, str):
            raise _BadRequest(f"{name} must be a string")
    if not isinstance(failed, bool) or not isinstance(dry_run, bool):
        raise _BadRequest("failed and dry_run must be true or false")
    if not dry_run and not (reason or "").strip():
        raise _BadRequest("a reason is required to replay (it goes to the audit log)")
    since = parse_time(since_text, now=datetime.now(UTC)) if since_text else None
    results = await run_in_threadpool(
        lambda: replay_events(
            ctx.engine,
            event_id=event_id or None,
            failed=failed,
            event_type=event_type or None,
            since=since,
            dry_run=dry_run,
            actor=op.audit_name,
            reason=reason,
            settings=ctx.settings,
        )
    )
    log.info(
        "admin replay actor=%s event=%s failed=%s type=%s dry_run=%s results=%d",
        op.audit_name,
        event_id or "-",
        failed,
        event_type or "-",
        dry_run,
        len(results),
    )
    return _json(200, {"dry_run": dry_run, "results": results})


async def _parked(ctx: _Context, _request: Request, _op: Operator) -> Response:
    reasons = await run_in_threadpool(parked_reasons, ctx.engine, limit=50)
    return _json(200, {"total": sum(r.count for r in reasons), "reasons": reasons})


async def _overrides(ctx: _Context, _request: Request, _op: Operator) -> Response:
    def read() -> Any:
        with ctx.engine.connect().execution_options(readonly=True) as connection:
            return active_overrides(connection)

    return _json(200, {"overrides": await run_in_threadpool(read)})


async def _user(ctx: _Context, request: Request, _op: Operator) -> Response:
    email = _query_text(request, "email")
    if email is None:
        raise _BadRequest("email is required")

    def read() -> Any:
        with ctx.engine.connect().execution_options(readonly=True) as connection:
            return show_user(connection, email, tiers=ctx.settings.price_tiers)

    report = await run_in_threadpool(read)
    if report is None:
        return _json(404, {"error": f"no user {email}"})
    return _json(200, report)


async def _audit(ctx: _Context, request: Request, _op: Operator) -> Response:
    since_text = _query_text(request, "since")
    since = parse_time(since_text, now=datetime.now(UTC)) if since_text else None
    limit = _query_int(request, "limit", 200, 1, 1000)

    def read() -> Any:
        with ctx.engine.connect().execution_options(readonly=True) as connection:
            return list_audit(connection, since=since, limit=limit)

    return _json(200, {"entries": await run_in_threadpool(read)})


async def _openapi(_ctx: _Context, _request: Request, _op: Operator) -> Response:
    return _json(200, openapi_schema())


# -- the API's description: routes and OpenAPI schema from one table ------------------------

_OBJ: dict[str, Any] = {"type": "object"}
_ERROR = {"type": "object", "properties": {"error": {"type": "string"}}, "required": ["error"]}


def _param(
    name: str, description: str, *, where: str = "query", schema: dict[str, Any] | None = None
) -> dict[str, Any]:
    return {
        "name": name,
        "in": where,
        "required": where == "path",
        "description": description,
        "schema": schema or {"type": "string"},
    }


_DELIVERY_ENTRY = {
    "type": "object",
    "description": "kind=event: one stored event; kind=count: duplicate or rejected deliveries counted in one minute",
    "properties": {
        "kind": {"type": "string", "enum": ["event", "count"]},
        "mark": {"type": "string", "enum": list(MARKS)},
        "event_id": {"type": "string"},
        "type": {"type": "string", "nullable": True},
        "customer": {"type": "string", "nullable": True},
        "attempts": {"type": "integer"},
        "received_at": {"type": "string", "format": "date-time"},
        "error": {"type": "string", "nullable": True},
        "count": {"type": "integer"},
        "reason": {"type": "string", "nullable": True},
        "minute": {"type": "string", "format": "date-time"},
    },
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
        "Current webhook health: every check of GET /api/v1/payments/webhook/health (always 200 here)",
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
        parameters=(_param("hours", "how far back (1..168, default 24)", schema={"type": "integer"}),),
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
                "deliveries": {"type": "array", "items": _DELIVERY_ENTRY},
                "counts": {"type": "object", "additionalProperties": {"type": "integer"}},
                "types": {"type": "array", "items": {"type": "string"}},
                "filters": _OBJ,
            },
        },
        parameters=(
            _param("status", "outcome", schema={"type": "string", "enum": list(MARKS)}),
            _param("type", "event type, e.g. customer.subscription.updated"),
            _param("customer", "customer id (cus_...), object id, or a user's email"),
            _param("limit", "at most this many (1..500, default 100)", schema={"type": "integer"}),
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
                "error": {"type": "string", "nullable": True},
                "detail": {"type": "string", "nullable": True},
                "payload": {"type": "string", "description": "indented JSON, secret values redacted"},
            },
        },
        parameters=(_param("event_id", "Stripe event id (evt_...)", where="path"),),
        errors=(404,),
    ),
    Endpoint(
        "POST",
        "/admin/api/replay",
        _replay,
        "Replay events (like `kamiyo replay`): one by id, --failed, by type, since; audited unless dry_run",
        {"type": "object", "properties": {"dry_run": {"type": "boolean"}, "results": {"type": "array", "items": _OBJ}}},
        body={
            "type": "object",
            "properties": {
                "event_id": {"type": "string"},
                "failed": {"type": "boolean", "description": "every parked failure"},
                "type": {"type": "string"},
                "since": {"type": "string", "description": "2h, 1d, ISO 8601 or Unix seconds"},
                "dry_run": {"type": "boolean", "description": "show what would be replayed; change nothing"},
                "reason": {"type": "string", "description": "required unless dry_run; recorded in the audit log"},
            },
        },
        errors=(400, 403),
        extra={
            "description": "Cookie-authenticated calls (the console) must send X-CSRF-Token. "
            "Bearer callers may name themselves for the audit log in X-Kamiyo-Actor."
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
    ),
    Endpoint(
        "GET",
        "/admin/api/overrides",
        _overrides,
        "Manual overrides in force, with their reason and expiry (soonest to expire first)",
        {"type": "object", "properties": {"overrides": {"type": "array", "items": _OBJ}}},
    ),
    Endpoint(
        "GET",
        "/admin/api/users",
        _user,
        "One user, as `kamiyo users show EMAIL` shows it",
        _OBJ,
        parameters=({**_param("email", "the user's email"), "required": True},),
        errors=(400, 404),
    ),
    Endpoint(
        "GET",
        "/admin/api/audit",
        _audit,
        "The audit log of manual actions, newest first (like `kamiyo audit`)",
        {"type": "object", "properties": {"entries": {"type": "array", "items": _OBJ}}},
        parameters=(
            _param("since", "2h, 1d, ISO 8601 or Unix seconds"),
            _param("limit", "at most this many (1..1000, default 200)", schema={"type": "integer"}),
        ),
        errors=(400,),
    ),
)


@cache
def openapi_schema() -> dict[str, Any]:
    """The OpenAPI 3.1 description of the admin API, built from ``ENDPOINTS``."""
    paths: dict[str, dict[str, Any]] = {}
    for endpoint in ENDPOINTS:
        responses: dict[str, Any] = {
            "200": {"description": "OK", "content": {"application/json": {"schema": endpoint.response}}},
            "401": {"description": "no or wrong admin token", "content": {"application/json": {"schema": _ERROR}}},
        }
        for code in endpoint.errors:
            responses[str(code)] = {"description": "error", "content": {"application/json": {"schema": _ERROR}}}
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
            "description": "The JSON API behind the operator console at /admin. Enabled by KAMIYO_ADMIN_TOKEN.",
        },
        "components": {
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "description": "KAMIYO_ADMIN_TOKEN"},
                "session": {"type": "apiKey", "in": "cookie", "name": SESSION_COOKIE},
            }
        },
        "security": [{"bearer": []}, {"session": []}],
        "paths": paths,
    }


# -- the page -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Document:
    template: Template
    fixed: dict[str, str]  # the inline CSS and JS: ours, inserted as they are
    csp: str


def _csp_hash(source: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(source.encode()).digest()).decode() + "'"


@cache
def _documents() -> dict[str, _Document]:
    """The console and sign-in pages, CSS and JS inline, each allowed by its hash alone."""
    css = (_STATIC / "console.css").read_text(encoding="utf-8")
    js = (_STATIC / "console.js").read_text(encoding="utf-8")
    base = "default-src 'none'; img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
    return {
        "console": _Document(
            Template((_STATIC / "console.html").read_text(encoding="utf-8")),
            {"css": css, "js": js},
            f"{base}; style-src {_csp_hash(css)}; script-src {_csp_hash(js)}; connect-src 'self'",
        ),
        "login": _Document(
            Template((_STATIC / "login.html").read_text(encoding="utf-8")),
            {"css": css},
            f"{base}; style-src {_csp_hash(css)}",
        ),
    }


def _page(name: str, status: int = 200, headers: Mapping[str, str] | None = None, **values: str) -> Response:
    """A page; ``values`` (an operator's name, an error) are HTML-escaped."""
    document = _documents()[name]
    body = document.template.substitute(document.fixed, **{k: html.escape(v) for k, v in values.items()})
    return Response(
        body,
        status_code=status,
        media_type="text/html; charset=utf-8",
        headers={"Content-Security-Policy": document.csp, **(headers or {})},
    )


# -- authentication at the door -------------------------------------------------------------


def admin_routes(settings: Settings, state: Mapping[str, Any]) -> list[BaseRoute]:
    """Every ``/admin`` route; only call when ``settings.admin_token`` is set."""
    if not settings.admin_token:
        raise KamiyoError("admin_routes needs KAMIYO_ADMIN_TOKEN")
    token = settings.admin_token
    auth = AdminAuth(token)
    ctx = _Context(settings, state)

    def refuse(request: Request, reason: str, *, status: int = 401) -> Response:
        # The path is all that is logged of the request; a token pasted into it is masked too.
        path = request.url.path.replace(token, "[token]")[:200]
        word = "unauthorized" if status == 401 else "forbidden"
        log.warning(
            "admin %s reason=%s method=%s path=%s client=%s", word, reason, request.method, path, _client(request)
        )
        if request.url.path.startswith(API_PREFIX):
            message = (
                "unauthorized: send Authorization: Bearer <KAMIYO_ADMIN_TOKEN>, or sign in at /admin"
                if status == 401
                else f"forbidden: {reason}"
            )
            return _json(status, {"error": message}, {**_COMMON_HEADERS, **(_CHALLENGE if status == 401 else {})})
        error = {"bad_token": "That token is not right.", "expired_session": "Your session expired."}.get(reason, "")
        if status == 403:
            error = "That form was not sent by this console (CSRF check failed)."
        return _page("login", status, {**_COMMON_HEADERS, **(_CHALLENGE if status == 401 else {})}, error=error)

    def identify(request: Request) -> Operator | Refusal:
        return auth.authenticate(
            request.headers.get("authorization"),
            request.cookies.get(SESSION_COOKIE),
            time.time(),
            actor_header=request.headers.get(ACTOR_HEADER),
        )

    async def csrf_ok(request: Request) -> bool:
        """The session's CSRF token came along: in the header (the page's fetch) or the form (sign-out)."""
        sent = request.headers.get(CSRF_HEADER)
        if sent is None and request.headers.get("content-type", "").startswith("application/x-www-form-urlencoded"):
            sent = (await _form(request)).get("csrf")
        return auth.csrf_matches(request.cookies[SESSION_COOKIE], sent)

    def guarded(handlers: dict[str, Handler], *, changes: set[str]) -> Callable[[Request], Awaitable[Response]]:
        """``handlers`` by method, behind the token check (and the CSRF check for ``changes``)."""

        async def endpoint(request: Request) -> Response:
            operator = identify(request)
            if isinstance(operator, Refusal):
                return refuse(request, operator.reason)
            method = "GET" if request.method == "HEAD" else request.method
            handler = handlers.get(method)
            if handler is None:
                allow = ", ".join(sorted(handlers))
                return _json(405, {"error": f"method not allowed: {allow}"}, {**_COMMON_HEADERS, "Allow": allow})
            try:
                if method in changes and operator.via == "session" and not await csrf_ok(request):
                    return refuse(request, "csrf", status=403)
                response = await handler(ctx, request, operator)
            except (_BadRequest, KamiyoError) as exc:
                response = _json(400, {"error": str(exc)})
            response.headers.update(_COMMON_HEADERS)
            return response

        return endpoint

    async def page(_ctx: _Context, _request: Request, op: Operator) -> Response:
        return _page("console", csrf=op.csrf or "", actor=op.actor)

    async def logout(_ctx: _Context, _request: Request, op: Operator) -> Response:
        log.info("admin signed out actor=%s", op.audit_name)
        response = RedirectResponse(ADMIN_PREFIX, status_code=303)
        response.delete_cookie(SESSION_COOKIE, path=ADMIN_PREFIX, secure=True, httponly=True, samesite="strict")
        return response

    async def unknown(_ctx: _Context, request: Request, _op: Operator) -> Response:
        return _json(404, {"error": f"no admin route {request.url.path}"})

    async def login(request: Request) -> Response:
        """Sign-in: the form's token (never a cookie or header) decides; a match sets the session."""
        if request.method not in ("POST", "GET", "HEAD"):
            return _json(405, {"error": "method not allowed: GET, POST"}, {**_COMMON_HEADERS, "Allow": "GET, POST"})
        if request.method != "POST":
            if isinstance(identify(request), Operator):
                return RedirectResponse(ADMIN_PREFIX, status_code=303, headers=_COMMON_HEADERS)
            return refuse(request, "missing")
        try:
            form = await _form(request)
        except _BadRequest:
            return refuse(request, "bad_form")
        candidate = form.get("token", "")
        if not candidate:
            return refuse(request, "missing")
        if not auth.token_matches(candidate):
            return refuse(request, "bad_token")
        actor = clean_actor(form.get("name"), "console")
        log.info("admin signed in actor=console:%s client=%s", actor, _client(request))
        response = RedirectResponse(ADMIN_PREFIX, status_code=303, headers=_COMMON_HEADERS)
        response.set_cookie(
            SESSION_COOKIE,
            auth.new_session(actor, time.time()),
            max_age=auth.session_seconds,
            path=ADMIN_PREFIX,
            secure=True,
            httponly=True,
            samesite="strict",
        )
        return response

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
    # Last: any other /admin path is refused without the token, and 404 with it.
    routes.append(
        Route(ADMIN_PREFIX + "/{rest:path}", guarded(_every_method(unknown), changes=set()), methods=_ALL_METHODS)
    )
    log.info("operator console on at %s (KAMIYO_ADMIN_TOKEN is set)", ADMIN_PREFIX)
    return routes


def _every_method(handler: Handler) -> dict[str, Handler]:
    return {method: handler for method in _ALL_METHODS if method != "HEAD"}
