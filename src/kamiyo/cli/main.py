"""The ``kamiyo`` command line: a Click group that adds each command group's module.

Each module (serve.py, db.py, events.py, replay.py, users.py, audit.py, sync.py, prune.py,
trigger.py, doctor.py, completion.py) holds its commands with their options and help; what they
need beyond Click is imported when they run, so ``kamiyo --help`` stays quick. Exit codes:
cli/invocation.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import click

from kamiyo import __version__
from kamiyo.cli import audit, completion, db, doctor, events, prune, replay, serve, sync, trigger, users
from kamiyo.cli.completion import COMPLETE_VAR
from kamiyo.cli.confirm import NotConfirmed
from kamiyo.cli.invocation import INTERRUPTED, PROBLEM, USAGE, ArgumentProblem, ConfigurationProblem
from kamiyo.errors import KamiyoError


class _Kamiyo(click.Group):
    """The root group: turns what a command returns or raises into the process's exit code
    (cli/invocation.py), the same under ``main`` and under Click's test runner."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            code = super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except ArgumentProblem as exc:
            code = _fail(f"{exc.command}: error: {exc}", USAGE)
        except ConfigurationProblem as exc:
            code = _fail(f"kamiyo: configuration error: {exc}", USAGE)
        except NotConfirmed as exc:
            code = _fail(f"kamiyo: {exc}", exc.exit_code)
        except KamiyoError as exc:
            code = _fail(f"kamiyo: {exc}", PROBLEM)
        except KeyboardInterrupt:
            code = _fail("", INTERRUPTED)
        except Exception as exc:
            from kamiyo.db.errors import describe, is_database_fault

            if not is_database_fault(exc):
                raise
            code = _fail(f"kamiyo: the database failed: {describe(exc)}", PROBLEM)
        raise click.exceptions.Exit(int(code or 0))


def _fail(message: str, code: int) -> int:
    click.echo(message, err=True)
    return code


@click.group(
    cls=_Kamiyo,
    help="Stripe webhooks in, subscription tiers out. Settings come from the environment and .env.",
    context_settings={"help_option_names": ["-h", "--help"]},
)
@click.version_option(__version__, prog_name="kamiyo", message="%(prog)s %(version)s")
def kamiyo() -> None:
    pass


for command in (
    serve.serve,
    serve.worker,
    db.db,
    events.events,
    replay.replay,
    users.users,
    audit.audit,
    sync.sync_command,
    sync.backfill_command,
    prune.prune,
    trigger.trigger,
    doctor.doctor,
    doctor.incident_report_command,
    completion.completion,
):
    kamiyo.add_command(command)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``kamiyo`` with ``argv`` (default: the process's arguments); return the exit code.

    As argparse did, a usage error Click finds (an unknown option, a missing argument) raises
    ``SystemExit(2)`` after printing the usage; everything else comes back as the exit code.
    """
    try:
        code = kamiyo.main(
            args=list(argv) if argv is not None else None,
            prog_name="kamiyo",
            complete_var=COMPLETE_VAR,
            standalone_mode=False,
        )
    except click.ClickException as exc:
        exc.show()
        raise SystemExit(exc.exit_code) from None
    except click.Abort:
        return INTERRUPTED
    return int(code or 0)
