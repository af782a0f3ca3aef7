"""The few fields of a Stripe event the inbox indexes, read from the verified raw body."""

from __future__ import annotations

import re
from typing import Any, NamedTuple

import orjson

from kamiyo.errors import PayloadError

# What Stripe's event ids look like: ``evt_``, then letters, digits and underscores, 255 characters
# in all. Anything else could not be looked up again by id (``evt_a/b/../c`` in a URL, say), and a
# control character in one would reach every place that prints it.
_EVENT_ID = re.compile(r"evt_[A-Za-z0-9_]{1,251}")


def is_event_id(value: object) -> bool:
    """True when ``value`` is shaped like a Stripe event id."""
    return isinstance(value, str) and _EVENT_ID.fullmatch(value) is not None


class Envelope(NamedTuple):
    """Immutable; a tuple because one is made per delivery (cheaper to build than a frozen dataclass)."""

    event_id: str
    type: str
    api_version: str | None
    created: int
    livemode: bool
    object_id: str | None


def read_envelope(body: bytes) -> tuple[Envelope, dict[str, Any]]:
    """Parse ``body`` as a Stripe event; raise PayloadError naming what is wrong."""
    try:
        event = orjson.loads(body)  # also rejects bodies that are not UTF-8
    except orjson.JSONDecodeError as exc:
        raise PayloadError(f"body is not a JSON Stripe event: {exc}") from None
    if not isinstance(event, dict):
        raise PayloadError("body is not a JSON Stripe event: expected an object")
    event_id, event_type, created = event.get("id"), event.get("type"), event.get("created")
    if not isinstance(event_id, str) or _EVENT_ID.fullmatch(event_id) is None:
        raise PayloadError(
            "body is not a JSON Stripe event: missing or invalid id (expected evt_ and letters, digits or "
            "underscores, 255 characters at most)"
        )
    # NUL is refused here: PostgreSQL text cannot hold it, and the insert would fail as a 5xx.
    if not isinstance(event_type, str) or not 0 < len(event_type) <= 255 or "\x00" in event_type:
        raise PayloadError("body is not a JSON Stripe event: missing or invalid type")
    # orjson reads integers up to 2**64 - 1; the column (and SQLite) hold at most 2**63 - 1.
    if not isinstance(created, int) or isinstance(created, bool) or not 0 <= created < 2**63:
        raise PayloadError("body is not a JSON Stripe event: missing or invalid created")
    data = event.get("data")
    obj = data.get("object") if isinstance(data, dict) else None
    if not isinstance(obj, dict):
        raise PayloadError("body is not a JSON Stripe event: missing data.object")
    api_version = event.get("api_version")
    obj_id = obj.get("id")
    envelope = Envelope(
        event_id=event_id,
        type=event_type,
        api_version=api_version if _storable(api_version, 64) else None,
        created=created,
        livemode=event.get("livemode") is True,
        object_id=obj_id if _storable(obj_id, 255) else None,
    )
    return envelope, event


def _storable(value: object, max_length: int) -> bool:
    return isinstance(value, str) and len(value) <= max_length and "\x00" not in value
