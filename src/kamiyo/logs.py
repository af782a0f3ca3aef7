"""The service's log: one line per event worth telling, as text (the default) or as JSON.

- ``text``: ``time level logger message``, the line operators and the runbook grep.
- ``json`` (``LOG_FORMAT=json``): one object per line with ``time`` (ISO 8601, UTC), ``level``,
  ``logger``, ``message`` and the line's fields as keys (``event``, ``type``, ``reason``...), for a
  log aggregator. A call gives its fields as data with a mapping argument
  (``log.info("webhook %(outcome)s event=%(event)s", {"outcome": ..., "event": ...})``), the text
  being made from them; for a call with positional arguments, an argument whose place in the
  constant format reads ``key=%s`` is the field ``key`` (``key=%s->%s``: ``key_from`` and
  ``key_to``).

Every line is cleaned as it is formatted (``scrub.clean``): credentials are replaced and every
non-printable character is escaped, so no field an attacker controls (a path, an event type)
can forge a line or carry a secret out. In text, a traceback follows its line, each of its lines
indented: a line that starts in the first column is always the start of a record. A JSON line is
never longer than ``PIPE_BUF``: its longest strings are cut until it fits (``"truncated": true``).
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import queue
import re
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from typing import Any, TextIO

import orjson

from kamiyo.scrub import clean

LOG_FORMATS = ("text", "json")
# PIPE_BUF on Linux: one write of at most this many bytes to a pipe is never interleaved with another.
_ATOMIC_WRITE = 4096


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

    def format(self, record: logging.LogRecord) -> str:
        if record.exc_info or record.exc_text or record.stack_info:
            return super().format(record)
        # A line alone (nearly every one): the same text as the base class makes, in one step.
        record.message = message = clean(record.getMessage())
        record.asctime = stamp = self.formatTime(record, self.datefmt)
        return f"{stamp} {record.levelname} {record.name} {message}"

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = clean(record.message)
        return super().formatMessage(record)

    def formatException(self, ei: Any) -> str:
        return "\n".join("    " + clean(line) for line in super().formatException(ei).splitlines())

    def formatStack(self, stack_info: str) -> str:
        return "\n".join("    " + clean(line) for line in stack_info.splitlines())


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, then the record's fields.

    Strings are cleaned as in text (the same ``scrub.clean``), so a decoded value is the text
    line's value; the line holds no raw control character or line break, and is never longer than
    ``PIPE_BUF`` with its newline."""

    def __init__(self) -> None:
        super().__init__()
        self._second = -1
        self._text = ""

    def format(self, record: logging.LogRecord) -> str:
        second = int(record.created)
        if second != self._second:
            self._text, self._second = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)), second
        millis = int((record.created - second) * 1000)
        line: dict[str, Any] = {
            "time": f"{self._text}.{millis:03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": clean(record.getMessage()),
        }
        for key, value in record_fields(record).items():
            name = _keys.get(key)
            if name is None:
                name = _key(key)
            line[name] = _value(value)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            line["exception"] = "\n".join(clean(part) for part in record.exc_text.splitlines())
        if record.stack_info:
            line["stack"] = "\n".join(clean(part) for part in record.stack_info.splitlines())
        return _fit(line)


_RESERVED = frozenset({"time", "level", "logger", "message", "exception", "stack", "truncated"})
_keys: dict[Any, str] = {}


def _key(key: Any) -> str:
    """A field's key in the line: cleaned, and ``key_`` when the line's own keys have it."""
    name = clean(str(key))
    name = name + "_" if name in _RESERVED else name
    if len(_keys) < 10_000:
        _keys[key] = name
    return name


# One %-conversion of a format string: its mapping key, and its type (``%`` for a literal ``%%``).
_CONVERSION = re.compile(r"%(?:\(([^)]*)\))?[-#0 +]*(?:\*|\d+)?(?:\.(?:\*|\d+))?[hlL]?([diouxXeEfFgGcrsa%])")
_KEYED = re.compile(r"(\w+)=$")
_names: dict[str, tuple[str | None, ...]] = {}


def record_fields(record: logging.LogRecord) -> Mapping[str, Any]:
    """The fields of a record: its mapping argument, or the positional arguments the format names."""
    args = record.args
    if isinstance(args, dict) or isinstance(args, Mapping):  # noqa: SIM101 - a dict without the ABC's check
        return args
    if not args or not isinstance(record.msg, str):
        return {}
    names = _names.get(record.msg)
    if names is None:
        names = _positional_names(record.msg)
        if len(_names) < 10_000:
            _names[record.msg] = names
    if len(names) != len(args):
        return {}
    return {name: value for name, value in zip(names, args, strict=True) if name is not None}


def _positional_names(message: str) -> tuple[str | None, ...]:
    """For each positional conversion of ``message``, the ``key`` of a ``key=%s`` before it, or None."""
    names: list[str | None] = []
    end = 0
    for match in _CONVERSION.finditer(message):
        if match.group(2) == "%":
            end = match.end()
            continue
        before = message[end : match.start()]
        keyed = _KEYED.search(before)
        if before == "->" and names and names[-1] is not None:  # key=%s->%s: a change, from and to
            key = names[-1]
            names[-1] = key + "_from"
            names.append(key + "_to")
        else:
            names.append(keyed.group(1) if keyed else None)
        end = match.end()
    return tuple(names)


def _value(value: Any) -> Any:
    """A field's value as JSON: numbers, booleans and null as they are, anything else as cleaned text."""
    if type(value) is str:
        return clean(value)
    if value is None or isinstance(value, bool | float):
        return value
    if isinstance(value, int) and -(2**63) <= value < 2**64:
        return value
    return clean(str(value))


_CUT = "…"
_CUT_BYTES = len(_CUT.encode())
_KEPT = ("time", "level")  # never cut
_SHORTEST = 64  # characters a cut string keeps at least


def _fit(line: dict[str, Any]) -> str:
    """``line`` as JSON of at most ``_ATOMIC_WRITE`` bytes with its newline.

    Its long strings (the message, a field, a traceback) are cut, each in proportion to its size,
    down to no less than ``_SHORTEST`` characters; a line of many fields that is still too long then
    keeps only the record's own keys."""
    text = orjson.dumps(line)
    if len(text) < _ATOMIC_WRITE:
        return text.decode()
    line["truncated"] = True
    while True:
        text = orjson.dumps(line)
        excess = len(text) + 1 - _ATOMIC_WRITE
        if excess <= 0:
            return text.decode()
        long = [key for key, value in line.items() if isinstance(value, str) and len(value) > _SHORTEST + 1]
        long = [key for key in long if key not in _KEPT]
        if not long:
            kept = {key: line[key] for key in ("time", "level", "logger", "message", "truncated")}
            return orjson.dumps(kept).decode() if len(line) > len(kept) else text.decode()
        sizes = {key: len(orjson.dumps(line[key])) - 2 for key in long}
        total = sum(sizes.values())
        for key in long:
            value = line[key]
            # Its share of the excess in bytes, as characters at its bytes per character; at least
            # two, so that the mark's one never leaves it as long as it was. An uneven value (wide
            # characters at its end) may need another round.
            remove = ((excess * sizes[key] // total + _CUT_BYTES) * len(value)) // sizes[key] + 2
            line[key] = value[: max(_SHORTEST, len(value) - remove)] + _CUT


_FORMATTERS: dict[str, logging.Formatter] = {"text": _Formatter(), "json": JsonFormatter()}
_current_format = "text"


def current_log_format() -> str:
    """The format ``configure_logging`` set last (a child process logs as its parent does)."""
    return _current_format


def configure_logging(level: str = "INFO", *, background: bool = False, log_format: str = "text") -> None:
    """Log to stderr in ``log_format`` (text or json). ``background`` (the server) formats and
    writes on a thread of its own.

    On the server, writing and flushing a line per delivery on the event loop cost it more than
    verifying the delivery; the background writer takes that off the loop and writes a burst of
    lines with one flush. Every line is still written, in order, and all of them before exit.
    """
    global _current_format
    formatter = _FORMATTERS[log_format]
    _current_format = log_format
    # The line formats use none of these: the logging HOWTO's "Optimization" switches, which spare
    # every record a walk up the stack (the caller's file and line) and three look-ups.
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    handler: logging.Handler = BackgroundHandler(sys.stderr) if background else logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
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
