"""What each ``/admin/api`` route takes and answers, as pydantic models.

Requests: a model per route's query, path or JSON body. Their bounds are the constants of
``admin_input.py``; patterns are matched with Python's ``re`` as a search, as JSON Schema matches
them. ``parse_query``, ``parse_path`` and ``parse_body`` validate through a model and turn the
first error into a ``BadRequest`` naming the field and the reason (400, never 500).

Answers: a model per route's 200 answer, and ``ErrorAnswer`` for the others. The handlers build
plain data (the operations' dataclasses and dicts) and the answers are not validated on the way
out: these models describe them for the OpenAPI schema, and the tests (schemathesis among them)
hold every answer to them. Objects stay open to fields added later; an event's ``outcome`` is
stated field by field (``OutcomeAnswer``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    JsonValue,
    StrictBool,
    ValidationError,
    model_validator,
)
from pydantic_core import ErrorDetails

from kamiyo.domain.outcomes import LinkResult
from kamiyo.errors import KamiyoError
from kamiyo.operations.inputs import parse_time
from kamiyo.web.admin_input import (
    AUDIT_DEFAULT,
    AUDIT_MAX,
    CHART_DEFAULT,
    CHART_MAX,
    DELIVERIES_DEFAULT,
    DELIVERIES_MAX,
    EVENT_ID_PATTERN,
    MAX_ID,
    MAX_REASON,
    MAX_SINCE,
    MAX_TEXT,
    OVERRIDES_DEFAULT,
    OVERRIDES_MAX,
    PARKED_DEFAULT,
    PARKED_MAX,
    PATTERN_HINTS,
    REPLAY_DEFAULT,
    REPLAY_MAX,
    SINCE_PATTERN,
    TEXT_PATTERN,
    TYPE_PATTERN,
    WORDS_PATTERN,
    BadRequest,
)
from kamiyo.web.admin_queries import EVENT_STATUSES, MARKS, STATS_MARKS

Model = TypeVar("Model", bound=BaseModel)


class _FieldError(ValueError):
    """A model-level check that blames one field."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(reason)
        self.field = field
        self.reason = reason


# -- the pieces the request models are made of -------------------------------------------------


def _matched(value: str) -> str:
    # A pattern's $ also matches before one final newline, as in JSON Schema: that newline is dropped.
    return value.removesuffix("\n")


def _digits(value: Any) -> Any:
    """A query's number: ASCII digits (no sign, no fraction, no underscore)."""
    raw = value.strip() if isinstance(value, str) else ""
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 18):
        raise ValueError("must be a whole number")
    return int(raw)


def _number(value: Any) -> Any:
    """A JSON body's number: a number (10.0 is 10), never a boolean or a string."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError("must be a whole number")
    return value


def _one_of(values: Sequence[str]) -> Callable[[str], str]:
    def check(value: str) -> str:
        if value not in values:
            raise ValueError(f"must be one of {', '.join(values)}")
        return value

    return check


def _valid_since(value: str) -> str:
    try:
        parse_time(value, now=datetime.now(UTC))
    except KamiyoError as exc:
        raise ValueError(f"cannot be read: {exc}") from None
    return value


def _count(default: int, high: int, what: str) -> Any:
    return Field(default, ge=1, le=high, strict=False, description=f"{what} (1..{high}, default {default})")


Count = Annotated[int, BeforeValidator(_digits)]
BodyCount = Annotated[int, BeforeValidator(_number)]
Text = Annotated[str, Field(max_length=MAX_TEXT, pattern=TEXT_PATTERN), AfterValidator(_matched)]
EventId = Annotated[str, Field(max_length=MAX_ID, pattern=EVENT_ID_PATTERN), AfterValidator(_matched)]
EventType = Annotated[str, Field(max_length=MAX_ID, pattern=TYPE_PATTERN), AfterValidator(_matched)]
_SINCE_TEXT = "now, a duration ago (30m, 2h, 1d, 2w; at most ten years), Unix seconds, or ISO 8601 (UTC if no zone)"
Since = Annotated[
    str,
    Field(max_length=MAX_SINCE, pattern=SINCE_PATTERN),
    AfterValidator(_matched),
    AfterValidator(_valid_since),
]
Mark = Annotated[str, AfterValidator(_one_of(MARKS)), Field(json_schema_extra={"enum": list(MARKS)})]


def _not_null(value: Any) -> Any:
    if value is None:
        raise ValueError("must be left out, not null")
    return value


def _left_out_not_null(schema: dict[str, Any]) -> None:
    """A field that may be left out but not sent as null: its schema without the null branch."""
    branches = schema.pop("anyOf")
    schema.pop("default", None)
    [kept] = [branch for branch in branches if branch != {"type": "null"}]
    merged = {**kept, **schema}  # the field's own description wins over its type's
    schema.clear()
    schema.update(merged)


def _optional(description: str) -> Any:
    """An optional body field: absent (None) when left out; null is refused, as the schema says."""
    return Field(None, description=description, json_schema_extra=_left_out_not_null)


def since_time(text: str | None) -> datetime | None:
    """A validated ``Since`` as a UTC time (None when absent)."""
    return parse_time(text, now=datetime.now(UTC)) if text is not None else None


class _Query(BaseModel):
    """Query parameters: unknown ones are ignored, as HTTP clients add their own."""

    model_config = ConfigDict(extra="ignore", regex_engine="python-re", frozen=True)


class ChartQuery(_Query):
    hours: Count = _count(CHART_DEFAULT, CHART_MAX, "how many hours back")


class DeliveriesQuery(_Query):
    status: Mark | None = Field(None, description="outcome")
    type: EventType | None = Field(None, description="event type, e.g. customer.subscription.updated")
    customer: Text | None = Field(None, description="customer id (cus_...), object id, or a user's email")
    limit: Count = _count(DELIVERIES_DEFAULT, DELIVERIES_MAX, "at most this many")


class DeliveryPath(_Query):
    event_id: EventId = Field(description="Stripe event id (evt_...)")


class ParkedQuery(_Query):
    limit: Count = _count(PARKED_DEFAULT, PARKED_MAX, "at most this many reasons")


class OverridesQuery(_Query):
    limit: Count = _count(OVERRIDES_DEFAULT, OVERRIDES_MAX, "at most this many")


class UserQuery(_Query):
    email: Annotated[Text, Field(min_length=1)] = Field(description="the user's email")


class AuditQuery(_Query):
    since: Since | None = Field(None, description="entries from then on: " + _SINCE_TEXT)
    limit: Count = _count(AUDIT_DEFAULT, AUDIT_MAX, "at most this many")


# The replay body's rules across fields, stated in the schema with anyOf/not so that every body
# the schema allows is one the API runs: an event id on its own, or a selection (failed, type,
# since); a reason unless it is a dry run.
_FAILED_TRUE: dict[str, JsonValue] = {"properties": {"failed": {"const": True}}, "required": ["failed"]}
_REPLAY_RULES: list[JsonValue] = [
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
]


class ReplayBody(BaseModel):
    """Replay events (like ``kamiyo replay``): one by id, or a selection."""

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        regex_engine="python-re",
        frozen=True,
        json_schema_extra={"allOf": _REPLAY_RULES},
    )

    event_id: Annotated[EventId | None, BeforeValidator(_not_null)] = _optional("replay this event, on its own")
    failed: StrictBool = Field(False, description="every parked failure")
    type: Annotated[EventType | None, BeforeValidator(_not_null)] = _optional("events of this type")
    since: Annotated[Since | None, BeforeValidator(_not_null)] = _optional("events received since then: " + _SINCE_TEXT)
    dry_run: StrictBool = Field(False, description="show what would be replayed; change nothing")
    reason: Annotated[str, Field(max_length=MAX_REASON, pattern=WORDS_PATTERN), AfterValidator(_matched)] | None = (
        Field(None, description="required unless dry_run; recorded in the audit log")
    )
    limit: BodyCount = Field(
        REPLAY_DEFAULT,
        ge=1,
        le=REPLAY_MAX,
        strict=False,
        description=f"at most this many events, oldest first (1..{REPLAY_MAX}, default {REPLAY_DEFAULT})",
    )

    @model_validator(mode="after")
    def _complete_and_unambiguous(self) -> ReplayBody:
        selects = self.failed or self.type is not None or self.since is not None
        if self.event_id is not None and selects:
            raise _FieldError("event_id", "must be replayed on its own, or select with failed, type and since")
        if self.event_id is None and not selects:
            raise _FieldError("event_id", "is missing: replay needs an event id, or failed, type or since")
        if not self.dry_run and self.reason is None:
            raise _FieldError("reason", "is required to replay (it goes to the audit log)")
        return self


# -- the answers -----------------------------------------------------------------------------

Moment = Annotated[datetime, Field(description="UTC, ISO 8601")]
EventStatus = Annotated[str, Field(json_schema_extra={"enum": list(EVENT_STATUSES)})]


class OutcomeSubscription(BaseModel):
    """The subscription snapshot the event carried."""

    id: str
    status: str
    tier: str
    stored: bool = Field(description="false: the stored snapshot was newer; this one was left aside")


class OutcomeInvoice(BaseModel):
    """The invoice an invoice.* event was about."""

    id: str | None
    status: str | None
    billing_reason: str | None
    attempt_count: int | None
    subscription: str | None


class OutcomeCustomer(BaseModel):
    """The customer the event named, and what became of its link to a user."""

    id: str
    link: LinkResult
    user_id: int | None = Field(description="the user linked after the event, if any")
    linked_by: str | None = Field(description="email or client_reference_id, when this event linked it")


class OutcomeUserChange(BaseModel):
    """A user whose tier or status the event changed, from -> to, and why."""

    user_id: int | None = Field(description="null only for a user a dry run would create")
    email: str
    tier_from: str
    tier_to: str
    status_from: str | None
    status_to: str | None
    why: str


class OutcomeAnswer(BaseModel):
    """What applying an event did, as data (``domain/outcomes.py``, ``Outcome.to_json``). A part is
    left out when the event had nothing of that kind."""

    subscription: OutcomeSubscription | None = _optional("the subscription snapshot the event carried")
    invoice: OutcomeInvoice | None = _optional("the invoice the event was about")
    customer: OutcomeCustomer | None = _optional("the customer the event named and its link to a user")
    users: list[OutcomeUserChange] | None = _optional("the users whose tier or status the event changed")
    note: str | None = _optional("a fact that fits no field above")


Outcome = Annotated[
    OutcomeAnswer | None,
    Field(
        description="what applying the event did, as data; absent or null when it was not applied, or was applied "
        "before outcomes were recorded (detail then says what it did)"
    ),
]


class ErrorAnswer(BaseModel):
    """Every answer that is not 200: what went wrong; for a malformed input, which field and why."""

    error: str
    field: str | None = Field(None, description="the input at fault (a body's field, a query or path parameter)")
    reason: str | None = Field(None, description="what is wrong with it")


class HealthCheck(BaseModel):
    """One check, with the figures it is made of (each check has its own)."""

    model_config = ConfigDict(extra="allow")

    name: str
    status: str
    detail: str


class HealthAnswer(BaseModel):
    status: Literal["healthy", "degraded"]
    checks: list[HealthCheck]
    service: dict[str, Any]


class ChartAnswer(BaseModel):
    start: Moment
    end: Moment
    bucket_seconds: int
    buckets: list[Moment]
    series: dict[str, list[int]] = Field(description="received, duplicate, rejected, failed: one count per bucket")
    totals: dict[str, int]


class EventEntry(BaseModel):
    """One stored event."""

    kind: Literal["event"]
    id: int
    event_id: str
    type: str
    mark: EventStatus
    attempts: int
    object_id: str | None
    customer: str | None
    at: float = Field(description="Unix seconds, for ordering")
    received_at: Moment | None
    processed_at: Moment | None
    replayed_at: Moment | None
    error: str | None
    outcome: Outcome = None


class CountEntry(BaseModel):
    """Duplicate or rejected deliveries counted in one minute (they have no inbox row)."""

    kind: Literal["count"]
    mark: Annotated[str, Field(json_schema_extra={"enum": list(STATS_MARKS)})]
    type: str | None
    reason: str | None
    count: int
    at: float
    minute: Moment


class DeliveryFilters(BaseModel):
    status: str | None
    type: str | None
    customer: str | None


class DeliveriesAnswer(BaseModel):
    deliveries: Annotated[
        list[Annotated[EventEntry | CountEntry, Field(discriminator="kind")]], Field(max_length=DELIVERIES_MAX)
    ]
    counts: dict[str, int]
    types: list[str]
    filters: DeliveryFilters


class DeliveryAnswer(BaseModel):
    """One stored event in full."""

    event_id: str
    type: str
    mark: EventStatus
    attempts: int
    api_version: str | None
    livemode: bool
    source: str
    object_id: str | None
    customer: str | None
    created: Moment | None
    received_at: Moment | None
    processed_at: Moment | None
    replayed_at: Moment | None
    error: str | None
    detail: str | None
    payload: str = Field(description="indented JSON, secret values redacted")
    outcome: Outcome = None


class StateAnswer(BaseModel):
    """A user's tier and subscription status."""

    tier: str
    status: str | None


class UserChangeAnswer(BaseModel):
    email: str
    before: StateAnswer
    after: StateAnswer


class ReplayResultAnswer(BaseModel):
    event_id: str
    type: str
    status_before: str
    status_after: str
    detail: str | None
    error: str | None
    changes: list[UserChangeAnswer] = Field(description="each user's state before and after")
    dry_run: bool
    outcome: Outcome = None


class ReplayAnswer(BaseModel):
    dry_run: bool
    limit: int
    results: Annotated[list[ReplayResultAnswer], Field(max_length=REPLAY_MAX)]


class ParkedReasonAnswer(BaseModel):
    reason: str
    count: int
    example: str


class ParkedAnswer(BaseModel):
    total: int
    reasons: Annotated[list[ParkedReasonAnswer], Field(max_length=PARKED_MAX)]


class OverrideAnswer(BaseModel):
    email: str
    tier: str
    reason: str
    expires_at: Moment | None = Field(description="null: until cleared")
    set_by: str
    set_at: Moment


class OverridesAnswer(BaseModel):
    overrides: Annotated[list[OverrideAnswer], Field(max_length=OVERRIDES_MAX)]


class AuditEntryAnswer(BaseModel):
    id: int
    at: Moment
    action: str
    actor: str
    reason: str | None
    target: str | None
    before: dict[str, Any] | None
    after: dict[str, Any] | None
    claimed_by: str | None


class AuditAnswer(BaseModel):
    entries: Annotated[list[AuditEntryAnswer], Field(max_length=AUDIT_MAX)]


class SubscriptionAnswer(BaseModel):
    id: str
    customer_id: str
    status: str
    tier: str
    price_ids: list[str]
    livemode: bool
    created: int = Field(description="Unix seconds, Stripe's")
    current_period_end: int | None
    cancel_at_period_end: bool
    cancel_at: int | None
    ended_at: int | None
    last_event_id: str = Field(description="the event whose snapshot is stored")
    updated_at: Moment


class UserEventChange(BaseModel):
    """How an event changed this user's tier and status, from its outcome."""

    tier_from: str
    status_from: str | None
    tier_to: str
    status_to: str | None
    why: str


class UserEventAnswer(BaseModel):
    """One of the events that shaped the user (open to what an event's outcome adds)."""

    model_config = ConfigDict(extra="allow")

    event_id: str
    type: str
    status: str
    created: int = Field(description="Unix seconds, Stripe's")
    received_at: Moment
    attempts: int
    detail: str | None = Field(description="what applying it did, in one sentence")
    error: str | None
    changes: list[UserEventChange] | None = Field(
        description="this user's changes by the event, from its outcome ([]: none of theirs); null when it has no "
        "outcome (not applied, or applied before outcomes were recorded: detail says what it did)"
    )


class DriftAnswer(BaseModel):
    """The stored tier/status differs from what the subscriptions and the override derive."""

    email: str
    stored: StateAnswer
    expected: StateAnswer
    explained_by: int | None = Field(description="the audit entry whose `after` is the stored state, if any")


class UserAnswer(BaseModel):
    """One user, as ``kamiyo users show EMAIL`` shows it."""

    email: str
    user_id: int
    tier: str = Field(description="stored: what the application reads")
    status: str | None
    expected: StateAnswer = Field(description="what the subscriptions and the override derive")
    stripe_state: StateAnswer | None = Field(description="what the subscriptions alone give; null without any")
    override: OverrideAnswer | None
    customer_ids: list[str]
    subscriptions: list[SubscriptionAnswer]
    recent_events: list[UserEventAnswer]
    drift: DriftAnswer | None
    audit: list[AuditEntryAnswer]


class OpenApiAnswer(BaseModel):
    """An OpenAPI 3.1 document."""

    openapi: str
    info: dict[str, Any]
    paths: dict[str, Any]


# -- validation ------------------------------------------------------------------------------


def _reason(error: ErrorDetails) -> str:
    """The reason of one pydantic error, in the words the API has always used."""
    kind, ctx = error["type"], error.get("ctx", {})
    if kind in ("int_type", "int_parsing", "int_parsing_size", "int_from_float"):
        return "must be a whole number"
    if kind == "greater_than_equal":
        return f"must be at least {ctx['ge']}"
    if kind == "less_than_equal":
        return f"must be at most {ctx['le']}"
    if kind == "string_type":
        return "must be a string"
    if kind in ("bool_type", "bool_parsing"):
        return "must be true or false"
    if kind == "string_too_long":
        return f"is longer than {ctx['max_length']} characters"
    if kind == "string_too_short":
        return "must not be empty"
    if kind == "string_pattern_mismatch":
        return "must be " + PATTERN_HINTS.get(str(ctx.get("pattern")), "in the form the schema states")
    if kind == "missing":
        return "is required"
    if kind == "extra_forbidden":
        return "is not a field of this body"
    if kind == "json_invalid":
        return "body is not JSON"
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return "body must be a JSON object"
    if kind == "value_error":
        cause = ctx.get("error")
        return str(cause) if cause is not None else error["msg"]
    return error["msg"]


def bad_request(exc: ValidationError) -> BadRequest:
    """The first error of a failed validation, as a 400 naming its field and reason."""
    error = exc.errors(include_url=False, include_input=False)[0]
    cause = error.get("ctx", {}).get("error")
    if isinstance(cause, _FieldError):
        return BadRequest.of_field(cause.field, cause.reason)
    field = ".".join(str(part) for part in error["loc"])[:200] or None
    return BadRequest.of_field(field, _reason(error))


def parse_query(model: type[Model], params: Mapping[str, str]) -> Model:
    """``model`` from a query's parameters (or a route's path parameters), or a 400."""
    try:
        return model.model_validate(dict(params))
    except ValidationError as exc:
        raise bad_request(exc) from None


def parse_body(model: type[Model], body: bytes) -> Model:
    """``model`` from a JSON body (an empty body is ``{}``), or a 400."""
    try:
        return model.model_validate_json(body or b"{}")
    except ValidationError as exc:
        raise bad_request(exc) from None
