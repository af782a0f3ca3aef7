"""What every command shares: its settings, and the errors that end it with an exit code.

Exit codes, the same for every command:

    0    done, nothing wrong found
    1    the command found a problem (doctor unhealthy, drift, a failed replay, a skipped
         subscription) or a runtime error (the database unreachable, an unknown user or event)
    2    a usage or configuration error (an option out of its bounds, a malformed setting, a bulk
         write without --yes and without a terminal)
    130  interrupted (Ctrl-C)
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Concatenate, ParamSpec, TypeVar

import click

from kamiyo.errors import KamiyoError

if TYPE_CHECKING:
    from kamiyo.config import Settings

OK, PROBLEM, USAGE, INTERRUPTED = 0, 1, 2, 130

P = ParamSpec("P")
R = TypeVar("R")


class ArgumentProblem(KamiyoError):
    """An argument out of its bounds: exit 2, printed as ``kamiyo COMMAND: error: ...``."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        context = click.get_current_context(silent=True)
        self.command = context.command_path if context is not None else "kamiyo"


class ConfigurationProblem(KamiyoError):
    """The settings do not load: exit 2."""


def argument(read: Callable[..., R], *args: Any, **kwargs: Any) -> R:
    """``read(*args, **kwargs)``, its refusal a usage error."""
    try:
        return read(*args, **kwargs)
    except KamiyoError as exc:
        raise ArgumentProblem(str(exc)) from None


def bounded(value: int | None, name: str, high: int) -> int | None:
    """``value`` when it lies in 1..``high`` (or is None), else a usage error."""
    if value is not None and not 1 <= value <= high:
        raise ArgumentProblem(f"{name} must be a whole number from 1 to {high}")
    return value


def load() -> Settings:
    """The settings from the environment and .env, with logging configured from them."""
    from kamiyo.config import load_settings

    try:
        settings = load_settings()
    except KamiyoError as exc:
        raise ConfigurationProblem(str(exc)) from None
    from kamiyo.logs import configure_logging

    configure_logging(settings.log_level, log_format=settings.log_format)
    return settings


def with_settings(command: Callable[Concatenate[Settings, P], R]) -> Callable[P, R]:
    """Call ``command`` with the settings first: loaded after parsing, so ``--help`` and a usage
    error need neither a configuration nor the database libraries."""

    @functools.wraps(command)
    def run(*args: P.args, **kwargs: P.kwargs) -> R:
        return command(load(), *args, **kwargs)

    return run


json_option = click.option("--json", "as_json", is_flag=True, help="print one JSON document (shape: README)")
by_option = click.option("--by", help="who, for the audit log (default: the OS user)")
reason_option = click.option("--reason", help="why, for the audit log")
yes_option = click.option("--yes", is_flag=True, help="do not ask for confirmation (required without a terminal)")
