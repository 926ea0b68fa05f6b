"""``aiida-mlip report PK -o DIR``: the HTML report (index.html + PNG figures) of a workflow node."""
from __future__ import annotations

import pathlib

import click

from aiida_mlip.cli.root import BadInput, cli, load_profile_from_context


@cli.command('report')
@click.argument('identifier', metavar='PK')
@click.option('-o', '--output', 'directory', required=True, type=click.Path(file_okay=False, path_type=pathlib.Path),
              help='Folder for index.html and its figures (created if missing).')
@click.option('-f', '--force', is_flag=True,
              help='Write into a non-empty folder that does not hold a previous report (its other files stay).')
@click.pass_context
def report(ctx, identifier, directory, force):
    """Write an HTML report of the workflow PK (pk or UUID): errors, parity plots, learning curves, validation,
    transferability and a provenance summary, as far as the node and its called processes have them."""
    load_profile_from_context(ctx)
    from aiida import orm
    from aiida.common.exceptions import MultipleObjectsError, NotExistent

    from aiida_mlip.report.html import node_ref, previous_report_files, write_report

    try:
        node = orm.load_node(identifier)
    except (NotExistent, MultipleObjectsError, ValueError) as exception:
        raise BadInput(f'no node with pk or UUID `{identifier}`: {exception}') from exception
    if directory.exists() and any(directory.iterdir()) and previous_report_files(directory) is None and not force:
        raise BadInput(f'{directory} is not empty and holds no previous report: choose another folder or --force')
    try:
        index = write_report(node, directory)
    except ValueError as exception:
        raise BadInput(str(exception)) from exception
    n_figures = len(previous_report_files(index.parent)) - 1
    click.echo(f'report of {node_ref(node)}: {index} ({n_figures} figures)')
