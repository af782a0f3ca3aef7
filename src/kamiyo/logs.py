"""One greppable line per event worth telling: ``time level logger message``.

Every line is cleaned as it is formatted (``scrub.clean``): credentials are replaced and every
non-printable character is escaped, so no field an attacker controls (a path, an event type)
can forge a line or carry a secret out. A traceback follows its line, each of its lines indented:
a line that starts in the first column is always the start of a record.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import queue
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any, TextIO

from kamiyo.scrub import clean


class _Formatter(logging.Formatter):
    """``time level logger message``, cleaned; the time text is made once per second, not once per line."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s", "%Y-%m-%dT%H:%M:%S%z")
        self._second = -1
        self._text = ""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        second = int(record.created)
        if second != self._second:
            self._text, self._second = super().formatTime(record, datefmt), second
        return self._text

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = clean(record.message)
        return super().formatMessage(record)

    def formatException(self, ei: Any) -> str:
        return "\n".join("    " + clean(line) for line in super().formatException(ei).splitlines())

    def formatStack(self, stack_info: str) -> str:
        return "\n".join("    " + clean(line) for line in stack_info.splitlines())


_FORMAT = _Formatter()


def configure_logging(level: str = "INFO", *, background: bool = False) -> None:
    """Log to stderr. ``background`` (the server) formats and writes on a thread of its own.

    On the server, writing and flushing a line per delivery on the event loop cost it more than
    verifying the delivery; the background writer takes that off the loop and writes a burst of
    lines with one flush. Every line is still written, in order, and all of them before exit.
    """
    # The line format uses none of these: the logging HOWTO's "Optimization" switches, which spare
    # every record a walk up the stack (the caller's file and line) and three look-ups.
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    handler: logging.Handler = BackgroundHandler(sys.stderr) if background else logging.StreamHandler(sys.stderr)
    handler.setFormatter(_FORMAT)
    root = logging.getLogger()
    for old in root.handlers:
        if isinstance(old, BackgroundHandler):
            old.close()  # writes what it still holds
    root.handlers[:] = [handler]
    root.setLevel(level)
    # stripe: a line per API request at INFO, and whole response bodies (customers' emails) at DEBUG.
    for noisy in ("uvicorn.access", "alembic.runtime.plugins", "stripe"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


LINGER_SECONDS = 0.005  # how late a line may be written, at most; a flush waits at most as long


class BackgroundHandler(logging.Handler):
    """Queues records; a daemon thread formats them and writes each burst with one flush.

    The queue also carries ``flush``'s events (set once what came before is written) and, last,
    ``None`` (close)."""

    def __init__(self, stream: TextIO) -> None:
        super().__init__()
        self._stream = stream
        self._queue: queue.SimpleQueue[logging.LogRecord | threading.Event | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="kamiyo-log", daemon=True)
        self._thread.start()
        atexit.register(self.close)

    def emit(self, record: logging.LogRecord) -> None:
        self._queue.put(record)

    def flush(self) -> None:
        """Wait until every record queued so far is written."""
        if self._thread.is_alive():
            done = threading.Event()
            self._queue.put(done)
            done.wait(timeout=10)

    def close(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join(timeout=10)
        super().close()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if isinstance(item, logging.LogRecord):
                # Let the rest of the burst arrive first. While this thread sleeps instead of
                # waiting on the queue, a record is queued without waking it: no thread switch
                # per line for the thread that logs (the inbox writer logs one per delivery).
                time.sleep(LINGER_SECONDS)
            lines: list[str] = []
            waiting: list[threading.Event] = []
            while item is not None:
                if isinstance(item, threading.Event):
                    waiting.append(item)
                else:
                    lines.append(self._line(item))
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
            if lines:
                with contextlib.suppress(OSError, ValueError):  # stderr closed: nobody left to tell
                    for piece in _pieces(lines):
                        self._stream.write(piece)
                        self._stream.flush()
            for event in waiting:
                event.set()
            if item is None:
                return

    def _line(self, record: logging.LogRecord) -> str:
        try:
            return self.format(record)
        except Exception as exc:  # noqa: BLE001 - a bad record must not stop the writer
            return f"logging error: {exc.__class__.__name__} formatting a record of {record.name}"


# PIPE_BUF on Linux: one write of at most this many bytes to a pipe is never interleaved with another.
_ATOMIC_WRITE = 4096


def _pieces(lines: list[str]) -> Iterator[str]:
    """The lines, joined into writes of at most ``_ATOMIC_WRITE`` bytes cut only between lines.

    ``kamiyo serve`` and its inbox writer process share one stderr (a pipe under Docker): a line
    must never be cut in two by the other process's write. A single longer line goes out whole.
    """
    piece: list[str] = []
    size = 0
    for line in lines:
        length = len(line.encode("utf-8", "replace")) + 1
        if piece and size + length > _ATOMIC_WRITE:
            yield "\n".join(piece) + "\n"
            piece, size = [], 0
        piece.append(line)
        size += length
    if piece:
        yield "\n".join(piece) + "\n"
