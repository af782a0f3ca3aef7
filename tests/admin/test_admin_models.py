"""The admin API's models: every answer is exactly what its model describes, and the schema
generated from the models states every bound, enum and required field of ``admin_input.py``."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest
from pydantic import BaseModel
from sqlalchemy import update

from admin.app_client import ADMIN_TOKEN, AppClient, Console
from admin.events import UNMAPPED_PRICE, customer_created, subscription_created
from e2e.harness import wait_until
from kamiyo import synthetic
from kamiyo.db.engine import make_engine
from kamiyo.db.migrate import upgrade
from kamiyo.db.models import users_table
from kamiyo.domain.outcomes import (
    CustomerOutcome,
    InvoiceOutcome,
    LinkResult,
    Outcome,
    SubscriptionOutcome,
    UserChange,
)
from kamiyo.operations.overrides import set_override
from kamiyo.operations.replay import ReplayResult, UserStateChange
from kamiyo.operations.users import StateView
from kamiyo.web import admin_input as bounds
from kamiyo.web.admin import ENDPOINTS, openapi_schema
from kamiyo.web.admin_input import BadRequest
from kamiyo.web.admin_models import DeliveriesAnswer, ReplayAnswer, ReplayBody, parse_body
from kamiyo.web.admin_queries import MARKS
from kamiyo.web.app import create_app
from support import make_settings

ANN = "ann@example.com"


def _as_described(model: type[BaseModel], data: Any) -> None:
    """``data`` validates against ``model``, and the model, dumped again, gives back every field:
    nothing in the answer is missing from the model or typed otherwise."""
    assert model.model_validate(data).model_dump(mode="json", exclude_unset=True) == data


@pytest.fixture
def console(database_url: str) -> Iterator[Console]:
    """The console on a fresh SQLite file or PostgreSQL database."""
    settings = make_settings(database_url, admin_token=ADMIN_TOKEN)
    engine = make_engine(settings)
    upgrade(engine)
    with AppClient(create_app(settings, engine=engine, run_worker=False)) as client:
        yield Console(client, engine, settings)
    engine.dispose()


@pytest.fixture
def busy(console: Console) -> Console:
    """An inbox with an applied, a failed, an ignored and a duplicate delivery, an override, and
    an audited replay."""
    console.deliver(customer_created(ANN, "cus_ann"))
    console.deliver(subscription_created("cus_ann"))
    failed = subscription_created("cus_ann", UNMAPPED_PRICE)
    console.deliver(failed)
    console.deliver(synthetic.event("charge.refunded", {"id": "ch_1", "object": "charge", "customer": "cus_ann"}))
    console.drain()
    console.deliver(failed)  # a duplicate, counted per minute (written at most once a second)
    wait_until(
        lambda: console.get("/admin/api/deliveries").json()["counts"]["duplicate"] == 1, what="the duplicate counted"
    )
    set_override(
        console.engine,
        email=ANN,
        tier="pro",
        reason="refund dispute",
        expires_at=datetime.now(UTC) + timedelta(days=1),
        actor="carol",
        tiers=console.settings.price_tiers,
    )
    replayed = console.post("/admin/api/replay", {"event_id": failed["id"], "reason": "after the fix"})
    assert replayed.status_code == 200, replayed.text
    with console.engine.begin() as connection:  # the runbook's Option 5: a tier edited by hand (drift)
        connection.execute(update(users_table).where(users_table.c.email == ANN).values(subscription_tier="free"))
    console.failed_id = failed["id"]  # type: ignore[attr-defined]
    return console


def test_every_answer_of_every_route_is_exactly_what_its_model_describes(busy: Console) -> None:
    failed_id: str = busy.failed_id  # type: ignore[attr-defined]
    calls = {
        "/admin/api/openapi.json": {},
        "/admin/api/health": {},
        "/admin/api/chart": {"hours": "2"},
        "/admin/api/deliveries": {},
        "/admin/api/parked": {},
        "/admin/api/overrides": {},
        "/admin/api/users": {"email": ANN},
        "/admin/api/audit": {"since": "1h"},
    }
    for endpoint in (api.operation for api in ENDPOINTS):
        if endpoint.method == "POST":
            response = busy.post(endpoint.path, {"failed": True, "dry_run": True})
        elif "{event_id}" in endpoint.path:
            response = busy.get(endpoint.path.replace("{event_id}", failed_id))
        else:
            response = busy.get(endpoint.path, params=calls[endpoint.path])
        assert response.status_code == 200, (endpoint.path, response.text)
        if endpoint.answer.__name__ != "OpenApiAnswer":  # the schema itself: an open document
            _as_described(endpoint.answer, response.json())
    deliveries = busy.get("/admin/api/deliveries").json()["deliveries"]
    assert {entry["kind"] for entry in deliveries} == {"event", "count"}  # both kinds were checked
    assert busy.get("/admin/api/audit").json()["entries"]
    user = busy.get("/admin/api/users", params={"email": ANN}).json()
    assert all(user[key] for key in ("override", "drift", "subscriptions", "recent_events")), user


def test_a_replays_user_changes_are_what_the_answer_model_describes() -> None:
    state = StateView("free", None), StateView("pro", "active")
    result = ReplayResult("evt_1", "invoice.paid", "failed", "applied", "tier free -> pro", None, [], False)
    result = dataclasses.replace(result, changes=[UserStateChange(ANN, *state)])
    answer = {"dry_run": False, "limit": 100, "results": [result]}
    _as_described(ReplayAnswer, orjson.loads(orjson.dumps(answer)))


def test_an_events_outcome_object_is_part_of_the_answer_models() -> None:
    entry = {
        "kind": "event",
        "id": 1,
        "event_id": "evt_1",
        "type": "invoice.paid",
        "mark": "applied",
        "attempts": 1,
        "object_id": None,
        "customer": None,
        "at": 1.0,
        "received_at": None,
        "processed_at": None,
        "replayed_at": None,
        "error": None,
        "outcome": Outcome(
            subscription=SubscriptionOutcome("sub_1", "active", "pro", stored=True),
            invoice=InvoiceOutcome("in_1", "paid", "subscription_create", 1, "sub_1"),
            customer=CustomerOutcome("cus_1", LinkResult.LINKED, user_id=1, linked_by="email"),
            users=(UserChange(1, ANN, "free", "pro", None, "active", "subscription sub_1 active"),),
            note="a fact",
        ).to_json(),
    }
    answer = {
        "deliveries": [entry],
        "counts": {},
        "types": [],
        "filters": {"status": None, "type": None, "customer": None},
    }
    _as_described(DeliveriesAnswer, answer)


# -- the schema -----------------------------------------------------------------------------


def _operation(method: str, path: str) -> dict[str, Any]:
    operation: dict[str, Any] = openapi_schema()["paths"][path][method]
    return operation


def _parameter(method: str, path: str, name: str) -> dict[str, Any]:
    [found] = [p for p in _operation(method, path).get("parameters", []) if p["name"] == name]
    return found


@pytest.mark.parametrize(
    ("path", "name", "default", "maximum"),
    [
        ("/admin/api/chart", "hours", bounds.CHART_DEFAULT, bounds.CHART_MAX),
        ("/admin/api/deliveries", "limit", bounds.DELIVERIES_DEFAULT, bounds.DELIVERIES_MAX),
        ("/admin/api/parked", "limit", bounds.PARKED_DEFAULT, bounds.PARKED_MAX),
        ("/admin/api/overrides", "limit", bounds.OVERRIDES_DEFAULT, bounds.OVERRIDES_MAX),
        ("/admin/api/audit", "limit", bounds.AUDIT_DEFAULT, bounds.AUDIT_MAX),
    ],
)
def test_the_schema_states_each_lists_default_and_bounds(path: str, name: str, default: int, maximum: int) -> None:
    parameter = _parameter("get", path, name)
    assert parameter["schema"] == {"type": "integer", "minimum": 1, "maximum": maximum, "default": default}
    assert parameter["required"] is False


def test_the_schema_states_every_text_bound_enum_and_required_field() -> None:
    text = {"type": "string", "maxLength": bounds.MAX_TEXT, "pattern": bounds.TEXT_PATTERN}
    assert _parameter("get", "/admin/api/deliveries", "customer")["schema"] == text
    assert _parameter("get", "/admin/api/deliveries", "status")["schema"] == {"type": "string", "enum": list(MARKS)}
    event_type = {"type": "string", "maxLength": bounds.MAX_ID, "pattern": bounds.TYPE_PATTERN}
    assert _parameter("get", "/admin/api/deliveries", "type")["schema"] == event_type
    email = _parameter("get", "/admin/api/users", "email")
    assert (email["required"], email["schema"]) == (True, {**text, "minLength": 1})
    since = _parameter("get", "/admin/api/audit", "since")["schema"]
    assert (since["maxLength"], since["pattern"]) == (bounds.MAX_SINCE, bounds.SINCE_PATTERN)
    event_id = _parameter("get", "/admin/api/deliveries/{event_id}", "event_id")
    assert (event_id["in"], event_id["required"]) == ("path", True)
    assert event_id["schema"] == {"type": "string", "maxLength": bounds.MAX_ID, "pattern": bounds.EVENT_ID_PATTERN}

    body = openapi_schema()["components"]["schemas"]["ReplayBody"]
    assert body["additionalProperties"] is False
    props = body["properties"]
    assert (props["reason"]["anyOf"][0]["maxLength"], props["reason"]["anyOf"][0]["pattern"]) == (
        bounds.MAX_REASON,
        bounds.WORDS_PATTERN,
    )
    assert (props["limit"]["minimum"], props["limit"]["maximum"], props["limit"]["default"]) == (
        1,
        bounds.REPLAY_MAX,
        bounds.REPLAY_DEFAULT,
    )
    assert props["event_id"]["type"] == "string"  # may be left out, never null
    assert props["failed"]["type"] == props["dry_run"]["type"] == "boolean"
    assert len(body["allOf"]) == 2  # an id alone or a selection; a reason unless dry_run


@pytest.mark.parametrize(
    ("method", "path", "codes"),
    [
        ("post", "/admin/api/replay", {"400", "401", "403", "404", "413"}),
        ("get", "/admin/api/deliveries/{event_id}", {"400", "401", "404"}),
        ("get", "/admin/api/users", {"400", "401", "404"}),
        ("get", "/admin/api/deliveries", {"400", "401"}),
    ],
)
def test_the_schema_documents_each_error_answer_with_the_error_model(method: str, path: str, codes: set[str]) -> None:
    responses = _operation(method, path)["responses"]
    assert codes <= set(responses)
    for code in codes:
        assert responses[code]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ErrorAnswer"}
    error = openapi_schema()["components"]["schemas"]["ErrorAnswer"]
    assert error["required"] == ["error"]
    assert {"error", "field", "reason"} == set(error["properties"])


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b'{"failed": true, "dry_run": true, "limit": 10.0}', {"failed": True, "dry_run": True, "limit": 10}),
        (b'{"event_id": "evt_1\\n", "reason": "why"}', {"event_id": "evt_1", "reason": "why"}),
        (b'{"type": "invoice.paid", "reason": "why\\n"}', {"type": "invoice.paid", "reason": "why"}),
        (b'{"since": "2h\\n", "dry_run": true}', {"since": "2h", "dry_run": True}),
    ],
)
def test_a_whole_float_is_a_whole_number_and_a_patterns_final_newline_is_dropped(
    body: bytes, expected: dict[str, Any]
) -> None:
    """As JSON Schema reads them: 10.0 is an integer, and a pattern's $ matches before a final newline."""
    parsed = parse_body(ReplayBody, body)
    assert parsed.model_dump(include=set(expected)) == expected


def test_an_empty_replay_body_is_read_as_an_empty_object_and_refused_for_selecting_nothing() -> None:
    with pytest.raises(BadRequest) as refused:
        parse_body(ReplayBody, b"")
    assert (refused.value.field, str(refused.value)) == (
        "event_id",
        "event_id is missing: replay needs an event id, or failed, type or since",
    )


@pytest.mark.parametrize(
    ("path", "params", "answer"),
    [
        (
            "/admin/api/deliveries",
            {"limit": "501"},
            {"error": "limit must be at most 500", "field": "limit", "reason": "must be at most 500"},
        ),
        (
            "/admin/api/deliveries",
            {"status": "weird"},
            {
                "error": "status must be one of applied, pending, failed, ignored, duplicate, rejected",
                "field": "status",
                "reason": "must be one of applied, pending, failed, ignored, duplicate, rejected",
            },
        ),
        (
            "/admin/api/chart",
            {"hours": "1.5"},
            {"error": "hours must be a whole number", "field": "hours", "reason": "must be a whole number"},
        ),
        ("/admin/api/users", {}, {"error": "email is required", "field": "email", "reason": "is required"}),
        (
            "/admin/api/deliveries/evt_bad-id",
            {},
            {
                "error": "event_id must be a Stripe event id (evt_...)",
                "field": "event_id",
                "reason": "must be a Stripe event id (evt_...)",
            },
        ),
    ],
)
def test_a_malformed_query_or_path_is_a_400_whose_json_names_the_field_and_the_reason(
    console: Console, path: str, params: dict[str, str], answer: dict[str, str]
) -> None:
    response = console.get(path, params=params)
    assert (response.status_code, response.json()) == (400, answer)
