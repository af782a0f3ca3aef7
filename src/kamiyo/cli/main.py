"""The ``kamiyo`` command line: a Click group that adds each command group's module.

Each module (serve.py, db.py, events.py, replay.py, users.py, audit.py, sync.py, prune.py,
trigger.py, doctor.py, completion.py) holds its commands with their options and help; what they
need beyond Click is imported when they run, so ``kamiyo --help`` stays quick. Exit codes:
cli/invocation.py.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import click

from kamiyo import __version__
from kamiyo.cli import audit, completion, db, doctor, events, prune, replay, serve, sync, trigger, users
from kamiyo.cli.completion import COMPLETE_VAR
from kamiyo.cli.confirm import NotConfirmed
from kamiyo.cli.invocation import INTERRUPTED, PROBLEM, USAGE, ArgumentProblem, ConfigurationProblem
from kamiyo.errors import KamiyoError


@click.group(
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
    except (click.Abort, KeyboardInterrupt):
        return INTERRUPTED
    except ArgumentProblem as exc:
        print(f"{exc.command}: error: {exc}", file=sys.stderr)
        return USAGE
    except ConfigurationProblem as exc:
        print(f"kamiyo: configuration error: {exc}", file=sys.stderr)
        return USAGE
    except NotConfirmed as exc:
        print(f"kamiyo: {exc}", file=sys.stderr)
        return exc.exit_code
    except KamiyoError as exc:
        print(f"kamiyo: {exc}", file=sys.stderr)
        return PROBLEM
    except Exception as exc:
        from kamiyo.db.errors import describe, is_database_fault

        if not is_database_fault(exc):
            raise
        print(f"kamiyo: the database failed: {describe(exc)}", file=sys.stderr)
        return PROBLEM
    return int(code or 0)
