"""What an operator types, read with bounds: times, durations and counts (CLI and admin API alike)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from kamiyo.errors import KamiyoError
from kamiyo.operations.inputs import EARLIEST, MAX_DURATION, expiry_time, parse_count, parse_duration, parse_time

NOW = datetime(2026, 11, 28, 9, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2h", NOW - timedelta(hours=2)),
        ("30 m", NOW - timedelta(minutes=30)),
        ("now", NOW),
        ("2026-11-27T08:15", datetime(2026, 11, 27, 8, 15, tzinfo=UTC)),
        ("2026-11-27T10:15:00+02:00", datetime(2026, 11, 27, 8, 15, tzinfo=UTC)),
        ("1764320400", datetime(2025, 11, 28, 9, 0, tzinfo=UTC)),
        (f"{MAX_DURATION.days}d", NOW - MAX_DURATION),
    ],
)
def test_a_time_reads_relative_iso_and_unix_forms(text: str, expected: datetime) -> None:
    assert parse_time(text, now=NOW) == expected


@pytest.mark.parametrize(
    "text",
    [
        "99999999999999",  # Unix seconds in the year 3170000: datetime overflows
        "99999999999d",  # timedelta overflows
        "9999999999w",
        f"{MAX_DURATION.days + 1}d",
        "²",  # str.isdigit says yes, int() says no
        "١٢٣",  # Arabic-Indic digits: int() reads them
        "9" * 5000,
        "0001-01-01T00:00+01:00",  # moved before year 1 by its offset
        "9999-12-31T23:59-01:00",
        "1999-12-31",
        "2040-01-01",
        "yesterday-ish",
        "2026-02-30",
        "",
        "2h\x1b[31m",
    ],
)
def test_a_time_out_of_range_or_unreadable_is_a_clean_error_never_an_overflow(text: str) -> None:
    with pytest.raises(KamiyoError) as caught:
        parse_time(text, now=NOW)
    assert "\x1b" not in str(caught.value)
    assert len(str(caught.value)) < 300


def test_an_expiry_is_a_duration_from_now_or_a_moment_within_ten_years() -> None:
    assert expiry_time("24h", now=NOW) == NOW + timedelta(hours=24)
    assert expiry_time("2026-12-01T00:00", now=NOW) == datetime(2026, 12, 1, tzinfo=UTC)
    for text in ("99999999999d", "3661d", "600w", "99999999999", "²d"):
        with pytest.raises(KamiyoError):
            expiry_time(text, now=NOW)
    assert parse_duration("2w") == timedelta(weeks=2)
    assert NOW - MAX_DURATION > EARLIEST


@pytest.mark.parametrize("text", ["²", "5" * 5000, "-1", "0", "1001", "1e3", " ", "١٠", "10.0", "+5"])
def test_a_count_is_ascii_digits_within_its_bounds(text: str) -> None:
    with pytest.raises(KamiyoError, match="limit must be a whole number from 1 to 1000"):
        parse_count(text, "limit", low=1, high=1000)


def test_a_count_within_bounds_is_read() -> None:
    assert parse_count(" 42 ", "limit", low=1, high=1000) == 42
    assert parse_count("1000", "limit", low=1, high=1000) == 1000
