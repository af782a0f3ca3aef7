"""The bounds of every admin input, in one place, and the reading of a request's body and form.

- The bounds (patterns, lengths, list sizes with their defaults) are the constants below; the
  request models (``admin_models.py``) use them, and so the OpenAPI schema states them.
- A body is streamed with a running cap: a declared ``Content-Length`` over the cap is refused
  before a byte is read, and reading stops the moment the bytes received pass it
  (``BodyTooLarge``: 413, and the connection is closed). Nothing buffers more than the cap.
  Only then is it parsed (the models parse JSON bodies).
- Forms are small urlencoded forms with at most ``MAX_FORM_FIELDS`` fields.

Every malformed input is a ``BadRequest`` (400 with its message, and the field and the reason
when one field is at fault).
"""

from __future__ import annotations

import re
from urllib.parse import parse_qs

from starlette.requests import Request

from kamiyo.errors import KamiyoError
from kamiyo.web.admin_queries import MAX_LIMIT

MAX_FORM_FIELDS = 10
# A text input: no C0 or C1 control character, DEL, or line/paragraph separator. Patterns are
# matched as JSON Schema matches them (a search, with Python's re), so what the schema calls
# valid is what the API accepts.
TEXT_PATTERN = "^[^\\u0000-\\u001f\\u007f-\\u009f\\u2028\\u2029]*$"
# The same, with at least one character that is not a space (a reason).
WORDS_PATTERN = (
    "^[^\\u0000-\\u001f\\u007f-\\u009f\\u2028\\u2029]*"
    "[^\\s\\u0000-\\u001f\\u007f-\\u009f\\u2028\\u2029]"
    "[^\\u0000-\\u001f\\u007f-\\u009f\\u2028\\u2029]*$"
)
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
# What a value that misses a pattern must be, in words: the reason a 400 gives.
PATTERN_HINTS = {
    TEXT_PATTERN: "text without control characters",
    WORDS_PATTERN: "words (not only spaces) without control characters",
    EVENT_ID_PATTERN: "a Stripe event id (evt_...)",
    TYPE_PATTERN: "an event type",
    SINCE_PATTERN: "now, 2h, 1d, Unix seconds or an ISO 8601 time",
}
MAX_TEXT = 320  # an email, a customer id, an object id
MAX_ID = 255  # an event id, an event type
MAX_SINCE = 64
MAX_REASON = 1000
# Each list's default and maximum size.
DELIVERIES_DEFAULT, DELIVERIES_MAX = 100, MAX_LIMIT
AUDIT_DEFAULT, AUDIT_MAX = 200, 1000
PARKED_DEFAULT, PARKED_MAX = 50, 200
OVERRIDES_DEFAULT, OVERRIDES_MAX = 200, 1000
REPLAY_DEFAULT, REPLAY_MAX = 100, 1000
CHART_DEFAULT, CHART_MAX = 24, 168

_CONTENT_LENGTH = re.compile(r"[0-9]{1,18}")


class BadRequest(KamiyoError):
    """A malformed admin request: answered 400 with the message, and the field and the reason
    when one field is at fault (the message is then ``"<field> <reason>"``)."""

    def __init__(self, message: str, *, field: str | None = None, reason: str | None = None) -> None:
        super().__init__(message)
        self.field = field
        self.reason = reason

    @classmethod
    def of_field(cls, field: str | None, reason: str) -> BadRequest:
        return cls(f"{field} {reason}" if field else reason, field=field, reason=reason)


class BodyTooLarge(Exception):
    """A body over its cap: answered 413, and the connection closed."""

    def __init__(self, cap: int) -> None:
        super().__init__(f"body over {cap} bytes")
        self.cap = cap


async def read_body(request: Request, cap: int) -> bytes:
    """The request's body, at most ``cap`` bytes; read once, then kept for the handler."""
    kept: bytes | None = getattr(request.state, "body", None)
    if kept is not None:
        return kept
    declared = request.headers.get("content-length")
    if declared is not None:
        if not _CONTENT_LENGTH.fullmatch(declared.strip()):
            raise BadRequest("Content-Length is not a number")
        if int(declared) > cap:
            raise BodyTooLarge(cap)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > cap:
            raise BodyTooLarge(cap)
        chunks.append(chunk)
    body = b"".join(chunks)
    request.state.body = body
    return body


async def read_form(request: Request, cap: int) -> dict[str, str]:
    """A small urlencoded form (sign-in, sign-out): the first value of each field."""
    body = await read_body(request, cap)
    try:
        fields = parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True, max_num_fields=MAX_FORM_FIELDS)
    except ValueError:  # more fields than max_num_fields
        raise BadRequest(f"a form has at most {MAX_FORM_FIELDS} fields") from None
    return {key: values[0] for key, values in fields.items()}
