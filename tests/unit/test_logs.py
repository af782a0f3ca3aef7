"""The server's background log writer: every line, in order, written before the process ends."""

from __future__ import annotations

import io
import logging
import subprocess
import sys
import threading
import time

from kamiyo.logs import BackgroundHandler, configure_logging


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
