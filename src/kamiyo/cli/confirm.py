"""Asking before a bulk write from the command line: ``replay`` of a selection, ``sync``, ``prune``.

On a terminal the command says what it is about to do (how many events, which scope) and waits
for ``y``; ``--yes`` answers for a script. Without a terminal and without ``--yes`` it refuses
(exit 2): a cron job or a pasted command never writes in bulk by accident. A dry run never asks,
and neither does a replay of one event by id, nor the runbook's ``sync_all_subscriptions()``
(a deliberate call from Python).
"""

from __future__ import annotations

import sys
from typing import IO

from kamiyo.errors import KamiyoError


class NotConfirmed(KamiyoError):
    """The operator did not confirm: ``exit_code`` 2 without a terminal (no ``--yes``), 1 when answered no."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def confirm(what: str, *, yes: bool, stdin: IO[str] | None = None, stderr: IO[str] | None = None) -> None:
    """Go ahead with ``what`` (e.g. "replay 12 events (--failed)") only if the operator agrees.

    Raises ``NotConfirmed`` otherwise."""
    if yes:
        return
    stdin = stdin or sys.stdin
    stderr = stderr or sys.stderr
    if not stdin.isatty():
        raise NotConfirmed(f"about to {what}: not a terminal, so nobody can confirm; add --yes to go ahead", 2)
    stderr.write(f"About to {what}. Go ahead? [y/N] ")
    stderr.flush()
    answer = stdin.readline()
    if answer.strip().lower() not in ("y", "yes"):
        raise NotConfirmed("not confirmed: nothing was changed", 1)
