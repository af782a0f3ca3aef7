"""What a log line costs per format, in one process: the webhook's lines (a delivery accepted, an
event applied), as ``kamiyo serve``'s inbox process writes them.

    .venv/bin/python bench/log_formats.py [--repeat 7] [--lines 20000]

Two measures per formatter, each the fastest of ``--repeat`` runs:

- ``format``: microseconds to format one record (what the background log thread does per line);
- ``logged``: CPU microseconds per line of ``--lines`` ``log.info`` calls through kamiyo's
  ``BackgroundHandler`` writing to /dev/null, the calling thread and the log thread together
  (process CPU time, flush included): the whole cost of a line to the process that logs it.

Formatters: ``text`` (LOG_FORMAT=text), ``json`` (LOG_FORMAT=json: kamiyo.logs.JsonFormatter,
orjson by hand, fields, scrubbing, PIPE_BUF); and, when python-json-logger is installed (it is
not a dependency: ``pip install python-json-logger`` to compare), its ``JsonFormatter`` and
``OrjsonFormatter`` as they come (time, level, logger, message: no fields, no scrubbing, no
escaping, no length bound), the least the library would cost before doing what kamiyo needs.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
import timeit
from collections.abc import Callable

from kamiyo.logs import BackgroundHandler, JsonFormatter, _Formatter

EVENT_ID = "evt_1QzH7kLkdIwHu7ix3tZ2Vb9C"
TYPE = "customer.subscription.updated"
DETAIL = "user_id=42 tier=pro status=active"


def _formatters() -> dict[str, Callable[[], logging.Formatter]]:
    made: dict[str, Callable[[], logging.Formatter]] = {"text": _Formatter, "json": JsonFormatter}
    try:
        from pythonjsonlogger.json import JsonFormatter as LibraryJson
        from pythonjsonlogger.orjson import OrjsonFormatter as LibraryOrjson
    except ImportError:
        print("python-json-logger not installed: its formatters are left out")
        return made
    renamed = {"asctime": "time", "levelname": "level", "name": "logger"}
    fields = "{asctime}{levelname}{name}{message}"
    made["python-json-logger json"] = lambda: LibraryJson(fields, style="{", rename_fields=renamed)
    made["python-json-logger orjson"] = lambda: LibraryOrjson(fields, style="{", rename_fields=renamed)
    return made


def _records() -> list[logging.LogRecord]:
    """The delivery's line (fields as a mapping) and the applied event's (positional fields)."""
    accepted = logging.LogRecord(
        "kamiyo.webhook",
        logging.INFO,
        __file__,
        1,
        "webhook %(outcome)s event=%(event)s type=%(type)s",
        ({"outcome": "accepted", "event": EVENT_ID, "type": TYPE},),
        None,
    )
    applied = logging.LogRecord(
        "kamiyo.worker",
        logging.INFO,
        __file__,
        1,
        "webhook event applied event=%s type=%s %s",
        (EVENT_ID, TYPE, DETAIL),
        None,
    )
    return [accepted, applied]


def _format_us(formatter: logging.Formatter, repeat: int, number: int) -> float:
    records = _records()

    def run() -> None:
        for record in records:
            formatter.format(record)

    return min(timeit.repeat(run, number=number, repeat=repeat)) / number / len(records) * 1e6


def _logged_us(formatter: logging.Formatter, repeat: int, lines: int) -> float:
    best = float("inf")
    with open(os.devnull, "w", encoding="utf-8") as sink:
        for _ in range(repeat):
            handler = BackgroundHandler(sink)
            handler.setFormatter(formatter)
            log = logging.Logger("kamiyo.webhook")
            log.addHandler(handler)
            log.propagate = False
            started = time.process_time()
            for _ in range(lines // 2):
                log.info(
                    "webhook %(outcome)s event=%(event)s type=%(type)s",
                    {"outcome": "accepted", "event": EVENT_ID, "type": TYPE},
                )
                log.info("webhook event applied event=%s type=%s %s", EVENT_ID, TYPE, DETAIL)
            handler.flush()
            best = min(best, time.process_time() - started)
            handler.close()
    return best / lines * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--lines", type=int, default=20_000)
    args = parser.parse_args()
    logging._srcfile = None  # as kamiyo.logs.configure_logging sets it
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    print(f"{'formatter':<28}{'format µs/line':>16}{'logged CPU µs/line':>20}")
    for name, make in _formatters().items():
        formatted = _format_us(make(), args.repeat, args.lines // 2)
        logged = _logged_us(make(), args.repeat, args.lines)
        print(f"{name:<28}{formatted:>16.2f}{logged:>20.2f}")


if __name__ == "__main__":
    main()
