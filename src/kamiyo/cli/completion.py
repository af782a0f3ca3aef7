"""``kamiyo completion bash|zsh|fish``: print the shell's completion script (Click's)."""

from __future__ import annotations

import click

from kamiyo.cli.invocation import OK

COMPLETE_VAR = "_KAMIYO_COMPLETE"


@click.command(
    short_help="print the shell completion script (bash, zsh, fish)",
    help='print the completion script for SHELL; e.g. in ~/.bashrc: eval "$(kamiyo completion bash)"',
)
@click.argument("shell", type=click.Choice(("bash", "zsh", "fish")))
@click.pass_context
def completion(context: click.Context, shell: str) -> int:
    from click.shell_completion import get_completion_class

    root = context.find_root()
    complete = get_completion_class(shell)
    assert complete is not None  # the three shells Click ships
    script = complete(root.command, {}, root.info_name or "kamiyo", COMPLETE_VAR).source()
    click.echo(script)
    return OK
