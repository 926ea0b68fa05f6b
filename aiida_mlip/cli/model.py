"""``aiida-mlip model``: import a MACE model file, fetch a named foundation model from the cache, list and show."""
from __future__ import annotations

import click

from aiida_mlip.cli.root import BadInput, cli, load_profile_from_context


@cli.group('model')
def model():
    """MACE model files stored as `mlip.model` nodes (sha256-pinned)."""


def load_model(identifier: str):
    """The model named by pk, UUID, label or sha256 prefix; BadInput (exit 2) when none or several match."""
    from aiida_mlip.data.model import MlipModel

    try:
        return MlipModel.find(identifier)
    except ValueError as exception:
        raise BadInput(str(exception)) from None


@model.command('import')
@click.argument('file', type=click.Path(exists=True, dir_okay=False))
@click.option('-L', '--label', required=True, help='Label of the new node.')
@click.option('-D', '--description', default='', help='Description of the new node.')
@click.option('--origin', type=click.Choice(['imported', 'foundation']), default='imported', show_default=True,
              help='`foundation` for a copy of a named foundation model (see `aiida-mlip model foundations`).')
@click.option('--foundation-name', default=None, help='Registry name of the foundation model this file is.')
@click.option('--source', default=None, help='Where the file came from (URL or path; default: the absolute path).')
@click.option('--sha256', 'expected_sha256', default=None, help='Refuse the file unless it has this sha256.')
@click.pass_context
def model_import(ctx, file, label, description, origin, foundation_name, source, expected_sha256):
    """Store a MACE `.model` FILE as an `mlip.model` node (the same file is stored only once)."""
    load_profile_from_context(ctx)
    from aiida_mlip.data.foundations import FOUNDATION_MODELS, resolve_name
    from aiida_mlip.data.model import MlipModel, sha256_of_file

    if foundation_name is not None:
        try:
            foundation_name = resolve_name(foundation_name)
        except ValueError as exception:
            raise BadInput(str(exception)) from exception
        origin = 'foundation'
        source = source or FOUNDATION_MODELS[foundation_name]['url']
    existing = MlipModel.find_by_sha256(sha256_of_file(file))
    if existing is not None and expected_sha256 in (None, existing.sha256):
        click.echo(f'exists: {existing} (label `{existing.label}`): not imported again')
        return
    try:
        node = MlipModel.from_file(file, origin=origin, source=source, foundation_name=foundation_name,
                                   expected_sha256=expected_sha256, label=label, description=description)
    except ValueError as exception:
        raise BadInput(str(exception)) from exception
    node.store()
    click.echo(f'imported: {node} (label `{node.label}`)')


@model.command('fetch')
@click.argument('name')
@click.option('--allow-download', is_flag=True, help='Download the file if it is not cached (needs a network).')
@click.option('--cache-dir', type=click.Path(file_okay=False), default=None,
              help='Cache folder (default: $AIIDA_MLIP_CACHE, else mace-torch\'s ~/.cache/mace).')
@click.pass_context
def model_fetch(ctx, name, allow_download, cache_dir):
    """Store the named foundation model NAME from the cache (sha256-pinned) as an `mlip.model` node."""
    load_profile_from_context(ctx)
    from aiida_mlip.data.foundations import FoundationModelUnavailable, load_foundation

    try:
        node = load_foundation(name, cache_dir=cache_dir, allow_download=allow_download)
    except (FoundationModelUnavailable, ValueError) as exception:
        raise BadInput(str(exception)) from exception
    click.echo(f'foundation: {node}')


@model.command('foundations')
@click.option('--cache-dir', type=click.Path(file_okay=False), default=None, help='Cache folder to look in.')
def model_foundations(cache_dir):
    """List the named foundation models, their URLs and whether their file is cached."""
    from aiida_mlip.data.foundations import FOUNDATION_MODELS, cache_path

    for name, entry in FOUNDATION_MODELS.items():
        path = cache_path(name, cache_dir)
        state = 'cached' if path.is_file() else 'missing'
        click.echo(f'{name:<20} {entry["mace_name"]:<14} {entry["license"]:<4} {state:<8} {entry["url"]}')


@model.command('list')
@click.option('-e', '--element', 'elements', multiple=True, help='Only models covering this element (repeatable).')
@click.option('--origin', type=click.Choice(['trained', 'imported', 'foundation']), default=None)
@click.pass_context
def model_list(ctx, elements, origin):
    """List the `mlip.model` nodes: pk, label, origin, elements, r_max, dtype, sha256 prefix."""
    load_profile_from_context(ctx)
    from aiida import orm

    from aiida_mlip.data.model import MlipModel

    filters = {'attributes.origin': origin} if origin else {}
    query = orm.QueryBuilder().append(MlipModel, filters=filters, project='*').order_by({MlipModel: {'id': 'asc'}})
    rows = [node for (node,) in query.iterall() if not set(elements) - set(node.elements)]
    if not rows:
        click.echo('no models')
        return
    click.echo(f'{"pk":>6}  {"label":<24} {"origin":<10} {"elements":<20} {"r_max":>5}  {"dtype":<8} sha256')
    for node in rows:
        click.echo(f'{node.pk:>6}  {node.label[:24]:<24} {node.origin:<10} {",".join(node.elements)[:20]:<20} '
                   f'{node.r_max:>5.2f}  {node.dtype or "?":<8} {node.sha256[:12]}')


@model.command('show')
@click.argument('identifier')
@click.option('--verify', is_flag=True, help='Re-hash the stored file and compare it with the pinned sha256.')
@click.pass_context
def model_show(ctx, identifier, verify):
    """Attributes and provenance of the model IDENTIFIER (pk, UUID, label or sha256 prefix)."""
    load_profile_from_context(ctx)
    from aiida_mlip.data.model import ModelIntegrityError

    node = load_model(identifier)
    click.echo(f'pk {node.pk}  uuid {node.uuid}  label `{node.label}`')
    for key, value in sorted(node.base.attributes.all.items()):
        click.echo(f'  {key:<16} {value}')
    creator = node.creator
    if creator is not None:
        click.echo(f'  {"created by":<16} {creator.process_label}<{creator.pk}> (exit status {creator.exit_status})')
    if verify:
        try:
            node.verify()
        except ModelIntegrityError as exception:
            raise BadInput(str(exception)) from exception
        click.echo(f'  {"verified":<16} sha256 of the stored file matches')
