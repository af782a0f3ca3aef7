"""The operator console (``/admin``) and the JSON admin API it uses (``/admin/api/...``).

``create_app`` adds these routes only when an admin token is configured (``KAMIYO_ADMIN_TOKEN``
or ``KAMIYO_ADMIN_TOKENS``); without one every ``/admin`` path is a plain 404. With one, every
``/admin`` path checks the credentials before anything else (``admin_auth.py``, sessions in
``admin_sessions.py``, sign-in throttling in ``admin_throttle.py``): a request without them
gets 401 and one log line, ``admin unauthorized reason=... method=... path=... client=...``
(never a token); too many wrong tokens from one address get 429 with ``Retry-After``. Unknown
``/admin`` paths answer 401 too, so nobody learns which routes exist without a token.

Handlers are thin: validate the query, path or JSON body through its model (``admin_models.py``,
the bounds from ``admin_input.py``; a body is streamed with a running cap, 413 past it, before
it is parsed; a malformed input is a 400 naming the field and the reason), call ``operations/``
(overrides, replay, users, audit) or ``admin_queries.py`` (deliveries, chart) in the thread
pool, answer JSON in which every string has been through the scrubber (``kamiyo.scrub``). Every
list has a default and a maximum size. The API is described by ``ENDPOINTS``, from which both
the routes and the OpenAPI schema (``admin_openapi.py``, from the models) are built, so the two
cannot drift apart; the schema states every bound, and what it calls valid the API accepts. The
console and sign-in pages (HTML, inline CSS and JS, their Content-Security-Policy) are
assembled in ``admin_page.py``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from functools import cache
from typing import Any

import orjson
from pydantic import BaseModel
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
from kamiyo.web.admin_input import BadRequest, BodyTooLarge, read_body, read_form
from kamiyo.web.admin_models import (
    AuditAnswer,
    AuditQuery,
    ChartAnswer,
    ChartQuery,
    DeliveriesAnswer,
    DeliveriesQuery,
    DeliveryAnswer,
    DeliveryPath,
    HealthAnswer,
    OpenApiAnswer,
    OverridesAnswer,
    OverridesQuery,
    ParkedAnswer,
    ParkedQuery,
    ReplayAnswer,
    ReplayBody,
    UserAnswer,
    UserQuery,
    parse_body,
    parse_query,
    since_time,
)
from kamiyo.web.admin_openapi import Operation, openapi_document
from kamiyo.web.admin_page import console_page, login_page
from kamiyo.web.admin_queries import (
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
    """One admin API operation: its handler, and how the schema describes it."""

    handler: Handler
    operation: Operation


def _endpoint(
    method: str, path: str, handler: Handler, summary: str, answer: type[BaseModel], **described: Any
) -> Endpoint:
    """An ``Endpoint`` whose operation id is its handler's name; ``described``: the rest of its
    ``Operation`` (query, path_params, body, errors, description)."""
    operation_id = handler.__name__.strip("_")
    return Endpoint(handler, Operation(method, path, operation_id, summary, answer, **described))


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


def _refused(exc: KamiyoError) -> Response:
    """A 400: the message, and for a malformed input the field and the reason."""
    answer: dict[str, Any] = {"error": str(exc)}
    if isinstance(exc, BadRequest) and exc.reason is not None:
        answer.update(field=exc.field, reason=exc.reason)
    return _json(400, answer)


def _client(request: Request) -> str:
    """The client's address: the peer, or X-Forwarded-For's client when uvicorn trusts the peer as a proxy."""
    return request.client.host if request.client else "-"


# -- the API handlers -----------------------------------------------------------------------


async def _health(ctx: _Context, _request: Request, _op: Operator) -> Response:
    report = await run_in_threadpool(ctx.health_report)
    return _json(200, report.to_json())


async def _chart(ctx: _Context, request: Request, _op: Operator) -> Response:
    query = parse_query(ChartQuery, request.query_params)
    return _json(200, await run_in_threadpool(delivery_chart, ctx.engine, hours=query.hours))


async def _deliveries(ctx: _Context, request: Request, _op: Operator) -> Response:
    query = parse_query(DeliveriesQuery, request.query_params)
    status, event_type, customer = query.status, query.type, query.customer or None
    filters = {"status": status, "type": event_type, "customer": customer}

    def read() -> dict[str, Any]:
        entries = recent_deliveries(
            ctx.engine, status=status, event_type=event_type, customer=customer, limit=query.limit
        )
        types = event_types(ctx.engine)
        return {"deliveries": entries, "counts": count_by(entries), "types": types, "filters": filters}

    return _json(200, await run_in_threadpool(read))


async def _delivery(ctx: _Context, request: Request, _op: Operator) -> Response:
    event_id = parse_query(DeliveryPath, request.path_params).event_id
    found = await run_in_threadpool(delivery, ctx.engine, event_id)
    if found is None:
        return _json(404, {"error": f"no event {event_id} in the inbox"})
    return _json(200, found)


async def _replay(ctx: _Context, request: Request, op: Operator) -> Response:
    body = parse_body(ReplayBody, await read_body(request, ctx.settings.admin_max_json_bytes))
    event_id, event_type, dry_run = body.event_id, body.type, body.dry_run
    if event_id is not None and not await run_in_threadpool(is_stored, ctx.engine, event_id):
        return _json(404, {"error": f"no event {event_id} in the inbox"})
    since = since_time(body.since)
    results = await run_in_threadpool(
        lambda: replay_events(
            ctx.engine,
            event_id=event_id,
            failed=body.failed,
            event_type=event_type,
            since=since,
            dry_run=dry_run,
            actor=op.audit_name,
            reason=body.reason,
            settings=ctx.settings,
            limit=body.limit,
            claimed_by=op.claimed,
        )
    )
    log.info(
        "admin replay actor=%s claimed=%s event=%s failed=%s type=%s dry_run=%s limit=%d results=%d",
        op.audit_name,
        op.claimed or "-",
        event_id or "-",
        body.failed,
        event_type or "-",
        dry_run,
        body.limit,
        len(results),
    )
    return _json(200, {"dry_run": dry_run, "limit": body.limit, "results": results})


async def _parked(ctx: _Context, request: Request, _op: Operator) -> Response:
    query = parse_query(ParkedQuery, request.query_params)
    reasons = await run_in_threadpool(parked_reasons, ctx.engine, limit=query.limit)
    return _json(200, {"total": sum(r.count for r in reasons), "reasons": reasons})


async def _overrides(ctx: _Context, request: Request, _op: Operator) -> Response:
    query = parse_query(OverridesQuery, request.query_params)

    def read() -> Any:
        with ctx.engine.connect().execution_options(readonly=True) as connection:
            return active_overrides(connection, limit=query.limit)

    return _json(200, {"overrides": await run_in_threadpool(read)})


async def _user(ctx: _Context, request: Request, _op: Operator) -> Response:
    email = parse_query(UserQuery, request.query_params).email
    if not email:  # only a final newline, which a pattern match drops
        raise BadRequest.of_field("email", "must not be empty")

    def read() -> Any:
        with ctx.engine.connect().execution_options(readonly=True) as connection:
            return show_user(connection, email, tiers=ctx.settings.price_tiers)

    report = await run_in_threadpool(read)
    if report is None:
        return _json(404, {"error": f"no user {email}"})
    return _json(200, report)


async def _audit(ctx: _Context, request: Request, _op: Operator) -> Response:
    query = parse_query(AuditQuery, request.query_params)
    since = since_time(query.since)

    def read() -> Any:
        with ctx.engine.connect().execution_options(readonly=True) as connection:
            return list_audit(connection, since=since, limit=query.limit)

    return _json(200, {"entries": await run_in_threadpool(read)})


async def _openapi(_ctx: _Context, _request: Request, _op: Operator) -> Response:
    return _json(200, openapi_schema(), ours=True)


# -- the API: routes and OpenAPI schema from one table ---------------------------------------

ENDPOINTS: tuple[Endpoint, ...] = (
    _endpoint("GET", "/admin/api/openapi.json", _openapi, "This schema", OpenApiAnswer),
    _endpoint(
        "GET",
        "/admin/api/health",
        _health,
        "Current webhook health: every check of GET /api/v1/payments/webhook/health, with details (always 200 here)",
        HealthAnswer,
    ),
    _endpoint(
        "GET",
        "/admin/api/chart",
        _chart,
        "Deliveries and failures per 15 minutes: received, duplicate, rejected, failed (parked)",
        ChartAnswer,
        query=ChartQuery,
        errors=(400,),
    ),
    _endpoint(
        "GET",
        "/admin/api/deliveries",
        _deliveries,
        "Recent deliveries, newest first: stored events, and duplicate/rejected deliveries per minute",
        DeliveriesAnswer,
        query=DeliveriesQuery,
        errors=(400,),
    ),
    _endpoint(
        "GET",
        "/admin/api/deliveries/{event_id}",
        _delivery,
        "One stored event: outcome, error, detail, and its payload pretty-printed with secrets redacted",
        DeliveryAnswer,
        path_params=DeliveryPath,
        errors=(400, 404),
    ),
    _endpoint(
        "POST",
        "/admin/api/replay",
        _replay,
        "Replay events (like `kamiyo replay`): one by id, or failed/type/since, at most `limit`; "
        "audited unless dry_run",
        ReplayAnswer,
        body=ReplayBody,
        errors=(400, 403, 404, 413),
        description="Cookie-authenticated calls (the console) must send X-CSRF-Token. The audit log names "
        "the admin token's name; a name sent in X-Kamiyo-Actor is recorded beside it as a claim. "
        "The JSON body is at most ADMIN_MAX_JSON_BYTES (default 16 KiB): 413 past it.",
    ),
    _endpoint(
        "GET",
        "/admin/api/parked",
        _parked,
        "Parked failures grouped by reason (the error class), most frequent first",
        ParkedAnswer,
        query=ParkedQuery,
        errors=(400,),
    ),
    _endpoint(
        "GET",
        "/admin/api/overrides",
        _overrides,
        "Manual overrides in force, with their reason and expiry (soonest to expire first)",
        OverridesAnswer,
        query=OverridesQuery,
        errors=(400,),
    ),
    _endpoint(
        "GET",
        "/admin/api/users",
        _user,
        "One user, as `kamiyo users show EMAIL` shows it",
        UserAnswer,
        query=UserQuery,
        errors=(400, 404),
    ),
    _endpoint(
        "GET",
        "/admin/api/audit",
        _audit,
        "The audit log of manual actions, newest first (like `kamiyo audit`)",
        AuditAnswer,
        query=AuditQuery,
        errors=(400,),
    ),
)


@cache
def openapi_schema() -> dict[str, Any]:
    """The OpenAPI 3.1 description of the admin API, built from ``ENDPOINTS`` and their models."""
    return openapi_document(
        (endpoint.operation for endpoint in ENDPOINTS),
        info={
            "title": "kamiyo admin API",
            "version": __version__,
            "description": "The JSON API behind the operator console at /admin. Enabled by KAMIYO_ADMIN_TOKEN "
            "(shared) or KAMIYO_ADMIN_TOKENS (one per operator). Every string in an answer has been through "
            "the scrubber: credential-shaped values read [redacted].",
        },
        security={
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "an admin token (KAMIYO_ADMIN_TOKEN or one of KAMIYO_ADMIN_TOKENS)",
                },
                "session": {"type": "apiKey", "in": "cookie", "name": SESSION_COOKIE},
            }
        },
    )


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
                response = _refused(exc)
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
        by_path.setdefault(api.operation.path, {})[api.operation.method] = api.handler
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
