"""What an operator types, read with bounds: times, durations and counts, for the CLI and the admin API alike.

Every number is ASCII digits of bounded length (``str.isdigit`` also accepts ``²`` and other
Unicode digits, which ``int`` then refuses or reads differently); every duration is at most
``MAX_DURATION``; every moment lies between ``EARLIEST`` and ``MAX_AHEAD`` from now. So nothing an
operator or a request sends reaches datetime arithmetic that overflows, or the database as a
number it cannot hold: a bad value is a ``KamiyoError`` with a message (a 400, or the CLI's exit 2).
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

from kamiyo.errors import KamiyoError

EARLIEST = datetime(2000, 1, 1, tzinfo=UTC)
MAX_DURATION = timedelta(days=3660)  # ten years, leap days included
MAX_AHEAD = MAX_DURATION
MAX_TIME_TEXT = 64
UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
# The forms of a time or a duration, as the OpenAPI schema states them too (ASCII only).
DURATION_PATTERN = r"[0-9]{1,9}[ \t]*[smhdw]"
UNIX_PATTERN = r"[0-9]{1,11}"
_DURATION = re.compile(r"([0-9]{1,9})[ \t]*([smhdw])")
_UNIX = re.compile(UNIX_PATTERN)
_HINT = "try 2h, 1d, 2026-11-27T10:00 or Unix seconds"


def parse_duration(text: str) -> timedelta:
    """``30m``, ``24h``, ``7d``, ``2w``: at most ``MAX_DURATION``."""
    found = _DURATION.fullmatch(text.strip()) if len(text) <= MAX_TIME_TEXT else None
    if found is None:
        raise KamiyoError(f"cannot read {_shown(text)} as a duration (try 30m, 24h, 7d)")
    seconds = int(found.group(1)) * UNITS[found.group(2)]
    if seconds > MAX_DURATION.total_seconds():
        raise KamiyoError(f"{_shown(text)} is longer than {MAX_DURATION.days} days")
    return timedelta(seconds=seconds)


def parse_time(text: str, *, now: datetime) -> datetime:
    """``2h`` / ``30m`` / ``1d`` ago, ``now``, Unix seconds, or ISO 8601 (without a zone: UTC).

    The moment must lie between ``EARLIEST`` and ``MAX_AHEAD`` from ``now``; it comes back in UTC.
    """
    raw = text.strip()
    if len(raw) > MAX_TIME_TEXT or not raw.isascii():
        raise KamiyoError(f"cannot read {_shown(text)} as a time ({_HINT})")
    if raw == "now":
        return now
    if _DURATION.fullmatch(raw):
        return _in_range(now - parse_duration(raw), text, now)
    if _UNIX.fullmatch(raw):
        seconds = int(raw)
        if not EARLIEST.timestamp() <= seconds <= (now + MAX_AHEAD).timestamp():
            raise _out_of_range(text)
        return datetime.fromtimestamp(seconds, UTC)
    try:
        moment = datetime.fromisoformat(raw)
        moment = (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).astimezone(UTC)
    except ValueError:
        raise KamiyoError(f"cannot read {_shown(text)} as a time ({_HINT})") from None
    except OverflowError:  # year 1 or 9999 moved across midnight by its offset
        raise _out_of_range(text) from None
    return _in_range(moment, text, now)


def expiry_time(text: str, *, now: datetime) -> datetime:
    """An expiry: a duration from now (``24h``, ``30m``, ``7d``) or a moment (ISO 8601 UTC, Unix seconds)."""
    if _DURATION.fullmatch(text.strip()):
        return now + parse_duration(text)
    return parse_time(text, now=now)


def parse_count(text: str, name: str, *, low: int, high: int) -> int:
    """A whole number from ``low`` to ``high``, written in ASCII digits."""
    raw = text.strip()
    if not (raw.isascii() and raw.isdigit() and len(raw) <= len(str(high))) or not low <= int(raw) <= high:
        raise KamiyoError(f"{name} must be a whole number from {low} to {high}")
    return int(raw)


def _in_range(moment: datetime, text: str, now: datetime) -> datetime:
    if not EARLIEST <= moment <= now + MAX_AHEAD:
        raise _out_of_range(text)
    return moment


def _out_of_range(text: str) -> KamiyoError:
    return KamiyoError(
        f"{_shown(text)} is out of range: times lie between {EARLIEST:%Y-%m-%d} and {MAX_AHEAD.days} days from now"
    )


def _shown(text: str) -> str:
    """The operator's text in an error message: quoted, cut short, with no control character."""
    cut = text if len(text) <= MAX_TIME_TEXT else text[:MAX_TIME_TEXT] + "..."
    return ascii(cut)
