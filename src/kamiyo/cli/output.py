"""What the commands print: JSON documents, and rich's tables, colours and progress bars for a person.

Rich draws only for a person at a terminal (``drawn``): in a pipe, with ``NO_COLOR`` set
(https://no-color.org) or on ``TERM=dumb`` the commands print the same information as plain,
stable lines without escape codes, for grep and scripts. Rich is imported when something is
drawn, so ``kamiyo --help`` stays quick.

Every string that comes from the database reaches the terminal through ``kamiyo.scrub.clean``
(credentials redacted, control characters shown as escapes) before it gets here; rich is given
it as ``Text``, never as markup.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence
from types import TracebackType
from typing import IO, TYPE_CHECKING, Any

import orjson

from kamiyo.scrub import scrub

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import Progress as RichProgress

PLAIN_PROGRESS_EVERY_SECONDS = 5.0


def drawn(stream: IO[str]) -> bool:
    """Whether rich may draw on ``stream``: a terminal, no ``NO_COLOR``, not ``TERM=dumb``."""
    if os.environ.get("NO_COLOR") or os.environ.get("TERM") == "dumb":
        return False
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def console(stream: IO[str] | None = None) -> Console:
    """A rich console on ``stream`` (default stdout) that draws: call only when ``drawn(stream)``."""
    from rich.console import Console

    return Console(file=stream or sys.stdout, force_terminal=True, highlight=False, emoji=False, markup=False)


def table(columns: Sequence[str], rows: Sequence[Sequence[str]], *, stream: IO[str] | None = None) -> None:
    """``rows`` as a rich table on a terminal (call only when ``drawn``); each cell is shown as text."""
    from rich.table import Table
    from rich.text import Text

    grid = Table(*columns, header_style="bold", show_edge=False, pad_edge=False)
    for row in rows:
        grid.add_row(*(Text(cell) for cell in row))
    console(stream).print(grid)


# -- JSON ------------------------------------------------------------------------------------------


def print_json(value: Any) -> None:
    print(json_text(value))


def json_text(value: Any) -> str:
    """``value`` as indented JSON for a terminal: every string scrubbed, every non-printable escaped."""
    plain = orjson.loads(orjson.dumps(value, option=orjson.OPT_UTC_Z | orjson.OPT_NON_STR_KEYS))
    text = orjson.dumps(_scrubbed(plain), option=orjson.OPT_INDENT_2).decode()
    # orjson escapes C0 controls; DEL, C1, U+2028 and other non-printables become \uXXXX here (only
    # strings can hold them: the rest of the JSON text is ASCII).
    return "".join(c if c.isprintable() or c == "\n" else _json_escape(c) for c in text)


def _json_escape(char: str) -> str:
    code = ord(char)
    if code < 0x10000:
        return f"\\u{code:04x}"
    code -= 0x10000
    return f"\\u{0xD800 + (code >> 10):04x}\\u{0xDC00 + (code & 0x3FF):04x}"


def _scrubbed(value: Any) -> Any:
    if isinstance(value, str):
        return scrub(value)
    if isinstance(value, dict):
        return {scrub(str(k)): _scrubbed(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_scrubbed(v) for v in value]
    return value


# -- progress --------------------------------------------------------------------------------------


class Progress:
    """Progress of a long command on stderr: rich's bar on a terminal, else a plain line when the
    first step is done and then every ``PLAIN_PROGRESS_EVERY_SECONDS``, e.g.
    ``prune: 1,200 of 5,000 events deleted`` or ``sync: 300 subscriptions, 2 users changed, 150/s``.

    ``total`` None: the bar pulses while the count grows. ``write(line, out)`` prints a report
    line without tearing the bar. A context manager: the bar is removed when it ends.
    """

    def __init__(self, label: str, total: int | None = None, *, unit: str = "", err: IO[str] | None = None) -> None:
        self.label = label
        self.total = total
        self.unit = unit
        self.err = err or sys.stderr
        self._bar: RichProgress | None = None
        self._task: Any = None
        self._last_plain: float | None = None

    def __enter__(self) -> Progress:
        if drawn(self.err):
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            count = MofNCompleteColumn() if self.total is not None else TextColumn("{task.completed:,.0f}")
            self._bar = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                count,
                TextColumn("{task.fields[info]}"),
                TimeElapsedColumn(),
                console=console(self.err),
                transient=True,
                redirect_stdout=False,
                redirect_stderr=False,
            )
            self._bar.start()
            self._task = self._bar.add_task(self.label, total=self.total, info=self.unit)
        return self

    def update(self, done: int, info: str = "") -> None:
        """``done`` steps so far (of ``total``), with ``info`` (counts, a rate) after the unit."""
        described = self.unit + (", " if self.unit and info else "") + info
        if self._bar is not None:
            self._bar.update(self._task, completed=done, info=described)
            return
        now = time.monotonic()
        if self._last_plain is None or now - self._last_plain >= PLAIN_PROGRESS_EVERY_SECONDS:
            self._last_plain = now
            of = f" of {self.total:,}" if self.total is not None else ""
            print(f"{self.label}: {done:,}{of}" + (f" {described}" if described else ""), file=self.err, flush=True)

    def write(self, line: str, out: IO[str]) -> None:
        """``line`` on ``out``; above the bar when ``out`` is a terminal too (the bar's)."""
        if self._bar is not None and getattr(out, "isatty", lambda: False)():
            from rich.text import Text

            self._bar.console.print(Text(line), soft_wrap=True)
            return
        print(line, file=out, flush=True)

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
