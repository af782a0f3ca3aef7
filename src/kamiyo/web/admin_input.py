"""What an admin request carries, read with bounds: its body, its form, its query parameters.

- A body is streamed with a running cap: a declared ``Content-Length`` over the cap is refused
  before a byte is read, and reading stops the moment the bytes received pass it
  (``BodyTooLarge``: 413, and the connection is closed). Nothing buffers more than the cap.
- Forms are small urlencoded forms with at most ``MAX_FORM_FIELDS`` fields.
- Numbers are ASCII digits within bounds, texts are bounded and free of control characters.

Every malformed input is a ``BadRequest`` (400 with its message).
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import parse_qs

import orjson
from starlette.requests import Request

from kamiyo.errors import KamiyoError
from kamiyo.operations.inputs import parse_count

MAX_FORM_FIELDS = 10
# A text input: no C0 or C1 control character, DEL, or line/paragraph separator. The OpenAPI
# schema states the same pattern, so what it calls valid is what the API accepts.
TEXT_PATTERN = "^[^\\u0000-\\u001f\\u007f-\\u009f\\u2028\\u2029]*$"
_TEXT = re.compile(TEXT_PATTERN)
# The same, with at least one character that is not a space (a reason).
WORDS_PATTERN = (
    "^[^\\u0000-\\u001f\\u007f-\\u009f\\u2028\\u2029]*"
    "[^\\s\\u0000-\\u001f\\u007f-\\u009f\\u2028\\u2029]"
    "[^\\u0000-\\u001f\\u007f-\\u009f\\u2028\\u2029]*$"
)
_CONTENT_LENGTH = re.compile(r"[0-9]{1,18}")


class BadRequest(KamiyoError):
    """A malformed admin request: answered 400 with the message."""


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


async def read_json_object(request: Request, cap: int) -> dict[str, Any]:
    """A JSON object body (an empty body is ``{}``)."""
    body = await read_body(request, cap)
    try:
        data = orjson.loads(body or b"{}")
    except orjson.JSONDecodeError:
        raise BadRequest("body is not JSON") from None
    if not isinstance(data, dict):
        raise BadRequest("body must be a JSON object")
    return data


def query_count(request: Request, name: str, default: int, low: int, high: int) -> int:
    """A whole-number query parameter from ``low`` to ``high`` (``default`` when absent)."""
    raw = request.query_params.get(name)
    if raw is None:
        return default
    try:
        return parse_count(raw, name, low=low, high=high)
    except KamiyoError as exc:
        raise BadRequest(str(exc)) from None


def query_text(request: Request, name: str, max_length: int) -> str | None:
    """A text query parameter; None when absent, "" when empty (which a pattern may refuse)."""
    value = request.query_params.get(name)
    return None if value is None else checked_text(value, name, max_length) or ""


def checked_text(value: Any, name: str, max_length: int) -> str | None:
    """``value`` as a bounded text without control characters; None when absent or empty."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise BadRequest(f"{name} must be a string")
    if len(value) > max_length:
        raise BadRequest(f"{name} is longer than {max_length} characters")
    if _TEXT.search(value) is None:  # as JSON Schema matches a pattern: a search, whose $ may precede one newline
        raise BadRequest(f"{name} must not contain control characters")
    return value.removesuffix("\n") or None
