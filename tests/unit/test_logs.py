"""The log: the server's background writer (every line, in order, written before the process
ends), the text line, and LOG_FORMAT=json's one object per line."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from typing import Any, cast

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kamiyo.logs import (
    BackgroundHandler,
    JsonFormatter,
    _Formatter,
    configure_logging,
    current_log_format,
    record_fields,
)
from kamiyo.scrub import clean


class _Stream(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.writes = 0
        self.pieces: list[str] = []
        self.written = threading.Event()

    def write(self, text: str) -> int:
        self.writes += 1
        self.pieces.append(text)
        self.written.set()
        return super().write(text)


def _record(message: str) -> logging.LogRecord:
    return logging.LogRecord("kamiyo.webhook", logging.INFO, __file__, 1, message, None, None)


def test_every_line_is_written_in_order_and_flush_waits_for_them() -> None:
    stream = _Stream()
    handler = BackgroundHandler(stream)
    handler.setFormatter(logging.Formatter("%(message)s"))
    for n in range(500):
        handler.handle(_record(f"webhook accepted event=evt_{n}"))
    handler.flush()
    assert stream.getvalue().splitlines() == [f"webhook accepted event=evt_{n}" for n in range(500)]
    assert stream.writes <= 500  # a burst goes out in fewer writes than lines
    handler.close()


def _held_after_first() -> tuple[logging.Formatter, threading.Lock]:
    """A formatter that stops at the line "first" until the returned lock is released: the lines
    handled meanwhile queue up as one burst behind it."""
    gate = threading.Lock()
    gate.acquire()

    class Held(logging.Formatter):
        def format(self, record: logging.LogRecord) -> str:
            if record.getMessage() == "first":
                with gate:
                    pass
            return record.getMessage()

    return Held(), gate


def test_a_burst_queued_while_the_writer_is_busy_is_written_at_once() -> None:
    stream = _Stream()
    formatter, gate = _held_after_first()
    handler = BackgroundHandler(stream)
    handler.setFormatter(formatter)
    handler.handle(_record("first"))
    for n in range(50):
        handler.handle(_record(f"line {n}"))
    gate.release()
    handler.flush()
    assert stream.getvalue().splitlines() == ["first"] + [f"line {n}" for n in range(50)]
    assert stream.writes == 1
    handler.close()


def test_a_burst_is_written_in_pieces_a_pipe_never_interleaves() -> None:
    """kamiyo serve and its inbox writer process share stderr: no write over PIPE_BUF (4096
    bytes), and every write ends at the end of a line. A longer line goes out whole."""
    stream = _Stream()
    formatter, gate = _held_after_first()
    handler = BackgroundHandler(stream)
    handler.setFormatter(formatter)
    handler.handle(_record("first"))
    lines = [f"webhook accepted event=evt_{n:04d} é" for n in range(400)] + ["x" * 5000, "last"]
    for line in lines:
        handler.handle(_record(line))
    gate.release()
    handler.flush()
    handler.close()
    pieces = stream.pieces
    assert "".join(pieces).splitlines() == ["first", *lines]
    assert len(pieces) > 3
    assert all(piece.endswith("\n") for piece in pieces)
    assert all(len(piece.encode()) <= 4096 for piece in pieces if "x" * 5000 not in piece)


def test_close_writes_what_is_still_queued() -> None:
    stream = _Stream()
    handler = BackgroundHandler(stream)
    handler.setFormatter(logging.Formatter("%(message)s"))
    for n in range(100):
        handler.handle(_record(f"line {n}"))
    handler.close()
    assert len(stream.getvalue().splitlines()) == 100


def test_a_record_that_cannot_be_formatted_does_not_stop_the_writer() -> None:
    stream = _Stream()
    handler = BackgroundHandler(stream)
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler.handle(logging.LogRecord("kamiyo.x", logging.INFO, __file__, 1, "%d apples", ("many",), None))
    handler.handle(_record("next line"))
    handler.flush()
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("logging error: TypeError")
    assert lines[1] == "next line"
    handler.close()


def test_a_process_that_exits_right_after_logging_loses_no_line() -> None:
    program = (
        "import logging; from kamiyo.logs import configure_logging\n"
        "configure_logging('INFO', background=True)\n"
        "log = logging.getLogger('kamiyo.webhook')\n"
        "for n in range(2000): log.info('webhook accepted event=evt_%d', n)\n"
    )
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=60, check=True)
    lines = result.stderr.splitlines()
    assert len(lines) == 2000
    assert lines[-1].endswith("INFO kamiyo.webhook webhook accepted event=evt_1999")


def test_configure_logging_replaces_a_background_handler_after_writing_its_lines() -> None:
    root = logging.getLogger()
    saved, level = root.handlers[:], root.level
    try:
        configure_logging("INFO", background=True)
        [first] = root.handlers
        assert isinstance(first, BackgroundHandler)
        configure_logging("INFO")
        [second] = root.handlers
        assert not isinstance(second, BackgroundHandler)
    finally:
        root.handlers[:] = saved
        root.setLevel(level)


def test_a_line_reads_time_level_logger_message_and_the_time_follows_the_record() -> None:
    stream = io.StringIO()
    root = logging.getLogger()
    saved, level = root.handlers[:], root.level
    try:
        configure_logging("INFO")
        root.handlers[0].setStream(stream)  # type: ignore[attr-defined]
        log = logging.getLogger("kamiyo.webhook")
        for created in (1_800_000_000.2, 1_800_000_000.9, 1_800_000_061.0):
            record = log.makeRecord("kamiyo.webhook", logging.INFO, __file__, 1, "webhook accepted", None, None)
            record.created = created
            log.handle(record)
    finally:
        root.handlers[:] = saved
        root.setLevel(level)

    def stamp(created: float) -> str:
        return time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(created))

    assert stream.getvalue().splitlines() == [
        f"{stamp(1_800_000_000)} INFO kamiyo.webhook webhook accepted",
        f"{stamp(1_800_000_000)} INFO kamiyo.webhook webhook accepted",
        f"{stamp(1_800_000_061)} INFO kamiyo.webhook webhook accepted",
    ]


TEXT = _Formatter()


@settings(max_examples=200, deadline=None)
@given(
    message=st.text(max_size=80),
    value=st.text(max_size=40),
    level=st.sampled_from([logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR]),
    created=st.floats(min_value=0, max_value=4_000_000_000),
)
def test_a_text_line_is_the_standard_format_of_the_cleaned_message(
    message: str, value: str, level: int, created: float
) -> None:
    """Without a traceback the line is made in one step; it must read exactly as logging's own
    ``%(asctime)s %(levelname)s %(name)s %(message)s`` of the cleaned message."""
    record = logging.LogRecord(
        "kamiyo.webhook", level, __file__, 1, message.replace("%", "%%") + " v=%s", (value,), None
    )
    record.created = created
    standard = logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s", "%Y-%m-%dT%H:%M:%S%z")
    expected = standard.formatTime(record, standard.datefmt) + f" {logging.getLevelName(level)} kamiyo.webhook "
    assert TEXT.format(record) == expected + clean(record.getMessage())


def test_a_text_line_with_a_traceback_keeps_it_indented_below() -> None:
    try:
        raise ValueError("bad\nvalue")
    except ValueError:
        record = logging.LogRecord("kamiyo.worker", logging.ERROR, __file__, 1, "failed %s", ("x",), sys.exc_info())
    first, *rest = TEXT.format(record).splitlines()
    assert first.endswith(" ERROR kamiyo.worker failed x")
    assert rest
    assert all(line.startswith("    ") for line in rest)
    assert rest[-2:] == ["    ValueError: bad", "    value"]  # each line of the error indented too


# -- LOG_FORMAT=json ---------------------------------------------------------------------------

JSON = JsonFormatter()
PIPE_BUF = 4096
# Characters that end a line (for str.splitlines or a log shipper) or drive a terminal.
RAW = ("\n", "\r", "\x00", "\x1b", "\x7f", "\x85", "\u2028", "\u2029")


def _json(message: str, *args: Any, name: str = "kamiyo.webhook", exc_info: Any = None) -> dict[str, Any]:
    line = _json_line(message, *args, name=name, exc_info=exc_info)
    return cast(dict[str, Any], json.loads(line))


def _json_line(message: str, *args: Any, name: str = "kamiyo.webhook", exc_info: Any = None) -> str:
    record = logging.LogRecord(name, logging.WARNING, __file__, 1, message, args or None, exc_info)
    record.created = 1_800_000_000.25
    line = JSON.format(record)
    assert len(line.encode()) + 1 <= PIPE_BUF
    assert len(line.splitlines()) == 1
    for char in RAW:
        assert char not in line
    return line


def test_a_json_line_holds_time_level_logger_message_and_the_fields_given_as_a_mapping() -> None:
    line = _json(
        "webhook %(outcome)s event=%(event)s type=%(type)s",
        {"outcome": "accepted", "event": "evt_1", "type": "customer.subscription.updated"},
    )
    assert line == {
        "time": "2027-01-15T08:00:00.250Z",
        "level": "WARNING",
        "logger": "kamiyo.webhook",
        "message": "webhook accepted event=evt_1 type=customer.subscription.updated",
        "outcome": "accepted",
        "event": "evt_1",
        "type": "customer.subscription.updated",
    }


def test_positional_arguments_are_fields_where_the_format_names_them() -> None:
    line = _json(
        "user state changed user_id=%s email=%s tier=%s->%s status=%s->%s 100%% of %d",
        7,
        "a@x.io",
        "free",
        "pro",
        None,
        "active",
        3,
    )
    assert line["message"] == "user state changed user_id=7 email=a@x.io tier=free->pro status=None->active 100% of 3"
    fields = {k: v for k, v in line.items() if k not in ("time", "level", "logger", "message")}
    assert fields == {
        "user_id": 7,
        "email": "a@x.io",
        "tier_from": "free",
        "tier_to": "pro",
        "status_from": None,
        "status_to": "active",
    }


def test_field_values_keep_their_json_type_and_anything_else_is_text() -> None:
    line = _json(
        "worker n=%d ratio=%.1f ok=%s big=%d when=%s",
        2,
        0.5,
        True,
        2**70,
        datetime(2026, 1, 2, tzinfo=UTC),
    )
    assert (line["n"], line["ratio"], line["ok"]) == (2, 0.5, True)
    assert line["big"] == str(2**70)
    assert line["when"] == "2026-01-02 00:00:00+00:00"


def test_a_format_whose_conversions_do_not_match_the_arguments_gives_no_fields() -> None:
    record = logging.LogRecord("kamiyo.x", logging.INFO, __file__, 1, "a=%s b=%s", ("1",), None)
    assert record_fields(record) == {}


def test_a_field_named_like_a_key_of_the_line_does_not_replace_it() -> None:
    line = _json("event %(message)s at %(time)s", {"message": "hello", "time": "soon"})
    assert (line["message"], line["message_"], line["time_"]) == ("event hello at soon", "hello", "soon")
    assert line["time"] == "2027-01-15T08:00:00.250Z"


def test_secrets_are_scrubbed_from_the_message_the_fields_and_a_traceback() -> None:
    secret = "whsec_" + "a1" * 16
    try:
        raise ValueError(f"bad key sk_live_{'9' * 24}")
    except ValueError:
        exc_info = sys.exc_info()
    line = _json_line(
        "webhook rejected reason=%(reason)s: %(error)s",
        {"reason": "invalid_signature", "error": f"secret {secret} Authorization: Bearer abcdefgh"},
        exc_info=exc_info,
    )
    assert secret not in line
    assert "sk_live_9" not in line
    assert "abcdefgh" not in line
    decoded = json.loads(line)
    assert decoded["error"] == "secret [redacted] Authorization: Bearer [redacted]"
    assert "ValueError: bad key [redacted]" in decoded["exception"]
    assert decoded["exception"].startswith("Traceback (most recent call last):\n")


@pytest.mark.parametrize(
    "hostile",
    [
        "customer.created\n2030-01-01T00:00:00Z INFO kamiyo.webhook forged",
        "a\r\nb",
        "a\u2028b\u2029c\x85d",
        "\x1b[2K\x1b[1Gred",
        "nul\x00del\x7f",
        '"},{"level":"CRITICAL',
        "\ud800 lone surrogate",
    ],
)
def test_control_characters_and_quotes_are_escaped_as_in_text_and_the_line_stays_one_valid_object(
    hostile: str,
) -> None:
    line = _json("webhook accepted event=%s type=%s", "evt_1", hostile)
    assert line["type"] == clean(hostile)
    assert line["message"] == "webhook accepted event=evt_1 type=" + clean(hostile)
    assert line["level"] == "WARNING"


def test_printable_unicode_stays_readable() -> None:
    line = _json_line("user created email=%s", "zoë@例え.jp 😀")
    assert "zoë@例え.jp 😀" in line
    assert json.loads(line)["email"] == "zoë@例え.jp 😀"


@pytest.mark.parametrize(
    ("message", "error"),
    [
        ("x" * 10_000, "short"),
        ("short", "y" * 10_000),
        ("é" * 3000, "😀" * 3000),
        ("\x1b" * 2000, '"' * 3000),
        ("x" * 2000, "y" * 2000),
    ],
)
def test_a_long_line_is_cut_to_pipe_buf_as_valid_json_and_says_so(message: str, error: str) -> None:
    line = _json_line("%(message)s error=%(error)s", {"message": message, "error": error})
    decoded = json.loads(line)
    assert decoded["truncated"] is True
    assert len(line.encode()) > PIPE_BUF // 2  # cut to fit, not emptied
    assert decoded["time"] == "2027-01-15T08:00:00.250Z"
    assert decoded["level"] == "WARNING"
    for key in ("message", "error"):
        value = decoded[key]
        if value.endswith("…"):
            assert clean(f"{message} error={error}" if key == "message" else error).startswith(value[:-1])


def test_a_short_field_beside_a_long_one_is_kept_whole() -> None:
    decoded = _json("webhook event=%(event)s error=%(error)s", {"event": "evt_keep", "error": "z" * 9000})
    assert decoded["event"] == "evt_keep"
    assert decoded["error"].endswith("…")


def test_a_line_of_too_many_fields_keeps_the_records_own_keys() -> None:
    decoded = _json("many %(k0)s", {f"k{n}": "v" * 60 for n in range(300)})
    assert set(decoded) == {"time", "level", "logger", "message", "truncated"}


def test_a_line_without_anything_long_is_not_marked_truncated() -> None:
    assert "truncated" not in _json("webhook accepted event=%s", "e" * 1900)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=3000), st.text(max_size=3000), st.dictionaries(st.text(max_size=20), st.text(max_size=300)))
def test_any_line_is_one_valid_json_object_within_pipe_buf(message: str, error: str, extra: dict[str, str]) -> None:
    fields = {**extra, "error": error}
    record = logging.LogRecord("kamiyo.x", logging.ERROR, __file__, 1, "%(error)s", (fields,), None)
    record.msg = "m " + message.replace("%", "%%") + " %(error)s"
    line = JSON.format(record)
    assert len(line.encode()) + 1 <= PIPE_BUF
    assert len(line.splitlines()) == 1
    decoded = json.loads(line)
    assert (decoded["level"], decoded["logger"]) == ("ERROR", "kamiyo.x")
    if "truncated" not in decoded:
        assert decoded["message"] == clean("m " + message + " " + error)
        assert decoded["error"] == clean(error)


def test_configure_logging_json_formats_every_logger_uvicorns_included() -> None:
    stream = io.StringIO()
    root = logging.getLogger()
    saved, level = root.handlers[:], root.level
    try:
        configure_logging("INFO", log_format="json")
        root.handlers[0].setStream(stream)  # type: ignore[attr-defined]
        assert current_log_format() == "json"
        logging.getLogger("uvicorn.error").info("Started server process [%d]", 42)
        logging.getLogger("kamiyo.webhook").info("webhook accepted event=%s", "evt_1")
    finally:
        configure_logging("INFO")
        root.handlers[:] = saved
        root.setLevel(level)
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert (first["logger"], first["message"]) == ("uvicorn.error", "Started server process [42]")
    assert (second["logger"], second["event"]) == ("kamiyo.webhook", "evt_1")


def test_the_default_format_is_text() -> None:
    stream = io.StringIO()
    root = logging.getLogger()
    saved, level = root.handlers[:], root.level
    try:
        configure_logging("INFO")
        root.handlers[0].setStream(stream)  # type: ignore[attr-defined]
        logging.getLogger("kamiyo.webhook").info("webhook %(outcome)s event=%(event)s", {"outcome": "x", "event": "e"})
    finally:
        root.handlers[:] = saved
        root.setLevel(level)
    assert current_log_format() == "text"
    assert stream.getvalue().endswith(" INFO kamiyo.webhook webhook x event=e\n")
