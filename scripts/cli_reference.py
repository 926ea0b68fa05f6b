"""Write docs/cli.md, the reference of every `aiida-mlip` command, from the click commands themselves.

Run it after adding or changing a command; tests/test_cli_reference.py fails while docs/cli.md is out of date.

    .venv/bin/python scripts/cli_reference.py           # rewrite docs/cli.md
    .venv/bin/python scripts/cli_reference.py --check   # exit 1 (and say so) if docs/cli.md is out of date
"""
from __future__ import annotations

import argparse
import pathlib
import sys

import click

TARGET = pathlib.Path(__file__).resolve().parents[1] / 'docs' / 'cli.md'
#: Fixed wrapping width, so the text does not depend on the terminal it is generated in.
WIDTH = 100
PROGRAM = 'aiida-mlip'

HEADER = f"""# `{PROGRAM}` command reference

Generated from the click commands by `scripts/cli_reference.py`: do not edit by hand, run
`.venv/bin/python scripts/cli_reference.py` after changing a command (`tests/test_cli_reference.py` fails while this
file is out of date). Every command takes `-h/--help`; `-p/--profile` goes before the command
(`{PROGRAM} -p PROFILE query models -e Si`). Bad input is refused before any work with exit code 2, like `verdi`.
"""


def _context(command: click.Command, name: str, parent: click.Context | None = None) -> click.Context:
    """The context click would make for ``command`` (its context_settings, e.g. ``-h``), at a fixed width."""
    settings = {**command.context_settings, 'terminal_width': WIDTH, 'max_content_width': WIDTH}
    return click.Context(command, info_name=name, parent=parent, **settings)


def walk(command: click.Command, context: click.Context):
    """(context, command) for ``command`` and every subcommand below it, depth first, subcommands sorted by name."""
    yield context, command
    if isinstance(command, click.Group):
        for name in command.list_commands(context):
            sub = command.get_command(context, name)
            if sub is None or getattr(sub, 'hidden', False):
                continue
            yield from walk(sub, _context(sub, name, context))


def render(root: click.Command | None = None) -> str:
    """The Markdown text of docs/cli.md for the ``aiida-mlip`` group (or ``root``)."""
    if root is None:
        from aiida_mlip.cli import cli as root
    entries = list(walk(root, _context(root, PROGRAM)))
    lines = [HEADER, '## Commands', '']
    for ctx, command in entries:
        path = ctx.command_path
        anchor = path.replace(' ', '-')
        summary = command.get_short_help_str(limit=WIDTH)
        lines.append(f'- [`{path}`](#{anchor}){": " + summary if summary else ""}')
    for ctx, command in entries:
        path = ctx.command_path
        lines += ['', f'<a id="{path.replace(" ", "-")}"></a>', f'## `{path}`', '', '```text',
                  command.get_help(ctx).rstrip(), '```']
    return '\n'.join(lines) + '\n'


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--check', action='store_true', help='only compare: exit 1 if the file is out of date')
    parser.add_argument('--output', type=pathlib.Path, default=TARGET, help=f'file to write (default {TARGET})')
    args = parser.parse_args(argv)
    text = render()
    current = args.output.read_text() if args.output.is_file() else None
    if args.check:
        if current != text:
            print(f'{args.output} is out of date: run .venv/bin/python scripts/cli_reference.py', file=sys.stderr)
            return 1
        return 0
    if current != text:
        args.output.write_text(text)
        print(f'wrote {args.output}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
