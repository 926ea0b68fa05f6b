"""``aiida-mlip query``: provenance of models (lineage, models covering elements, validation results).

Tables for people, ``--json`` for scripts; both come from :mod:`aiida_mlip.query`.
"""
from __future__ import annotations

import json

import click

from aiida_mlip.cli.root import BadInput, cli, load_profile_from_context

JSON_OPTION = click.option('--json', 'as_json', is_flag=True, help='Print the result as JSON instead of tables.')


@cli.group('query')
def query():
    """Provenance queries: what a model was trained on, which models cover elements, how a model validated."""


def _echo_json(value):
    click.echo(json.dumps(value, indent=2, default=str))


def _table(rows, headers) -> str:
    from tabulate import tabulate

    return tabulate(rows, headers=headers, tablefmt='plain', disable_numparse=True)


def _model(ctx, identifier: str):
    load_profile_from_context(ctx)
    from aiida_mlip.cli.model import load_model

    return load_model(identifier)


def _short(values, limit: int = 40) -> str:
    text = ','.join(str(value) for value in values)
    return text if len(text) <= limit else text[:limit - 3] + '...'


@query.command('lineage')
@click.argument('model_identifier', metavar='MODEL')
@JSON_OPTION
@click.pass_context
def query_lineage(ctx, model_identifier, as_json):
    """Training, datasets, every PwCalculation and the foundation chain of MODEL (pk, UUID, label or sha256 prefix)."""
    model = _model(ctx, model_identifier)
    from aiida_mlip.query import lineage

    result = lineage(model)
    if as_json:
        _echo_json(result.to_dict())
        return
    record = result.model
    label = f' `{record.label}`' if record.label else ''
    click.echo(f'Model {record.pk}{label}: origin {record.origin}, elements {",".join(record.elements)}, '
               f'r_max {record.r_max}, {record.dtype}, sha256 {(record.sha256 or "?")[:12]}')
    if not result.training_calculations:
        where = f' ({record.foundation_name})' if record.foundation_name else ''
        click.echo(f'Not trained in this database{where}: source {record.source}')
        return
    attempts = ', '.join(f'{p} (exit {p.exit_status})' for p in result.training_calculations)
    click.echo(f'Training:  {attempts}')
    if result.workflows:
        click.echo(f'Run by:    {" <- ".join(str(p) for p in result.workflows)}')
    chain = ' -> '.join(f'{m.pk} ({m.foundation_name or m.origin}{", " + m.label if m.label else ""})'
                        for m in result.foundations)
    click.echo(f'Foundation chain: {record.pk} -> {chain}' if chain else
               'Foundation chain: none (trained from scratch)')

    click.echo(f'\nDatasets ({len(result.datasets)})')
    rows = [[d.pk, ','.join(d.roles) or f'source (depth {d.depth})', d.n_frames, ','.join(d.elements),
             _short(f'{k}:{v}' for k, v in sorted(d.config_types.items())), d.pseudo_family,
             f'{d.ecutwfc}/{d.ecutrho}' if d.ecutwfc else '', d.creator or '-'] for d in result.datasets]
    click.echo(_table(rows, ['pk', 'role', 'frames', 'elements', 'config types', 'family', 'ecut (Ry)', 'created by']))

    pw = result.pw_calculations
    n_frames = sum(p.n_frames for p in pw)
    click.echo(f'\nPwCalculations ({len(pw)}, labeling {n_frames} frames of the training inputs)')
    rows = []
    for p in pw:
        if p.kpoints_mesh:
            kpoints = 'x'.join(str(k) for k in p.kpoints_mesh)
        else:
            kpoints = f'{p.n_kpoints} pts'
        rows.append([p.pk, p.uuid[:8], p.formula, p.ecutwfc, p.ecutrho, kpoints, ','.join(p.pseudo_families) or '?',
                     ','.join(p.roles), p.exit_status])
    click.echo(_table(rows, ['pk', 'uuid', 'formula', 'ecutwfc', 'ecutrho', 'k-mesh', 'pseudo family', 'in',
                             'exit']))
    md5s = sorted({(kind, md5) for p in pw for kind, md5 in p.pseudo_md5s.items()})
    if md5s:
        click.echo('UPF files: ' + ', '.join(f'{kind} md5 {md5}' for kind, md5 in md5s))
    if result.other_sources:
        click.echo(f'Other label sources: {", ".join(str(p) for p in result.other_sources)}')
    if result.n_frames_without_source:
        click.echo(f'Frames without a source in this database: {result.n_frames_without_source}')


@query.command('models')
@click.option('-e', '--elements', required=True, help='Comma-separated element symbols, e.g. `Si,Ge`.')
@click.option('--exact', is_flag=True, help='Only models with exactly these elements.')
@JSON_OPTION
@click.pass_context
def query_models(ctx, elements, exact, as_json):
    """The `mlip.model` nodes whose elements include (with --exact: are) the given ones."""
    from ase.data import chemical_symbols

    symbols = [symbol.strip() for symbol in elements.split(',') if symbol.strip()]
    unknown = [symbol for symbol in symbols if symbol not in chemical_symbols[1:]]
    if unknown or not symbols:
        raise BadInput(f'--elements needs element symbols separated by commas, e.g. Si,Ge; not {unknown or elements!r}')
    load_profile_from_context(ctx)
    from aiida_mlip.query import models_covering

    records = models_covering(symbols, exact=exact)
    if as_json:
        _echo_json([record.to_dict() for record in records])
        return
    if not records:
        click.echo(f'no model covers {",".join(symbols)}')
        return
    rows = [[r.pk, r.label, r.origin, ','.join(r.elements), r.r_max, r.dtype, r.foundation_name or '',
             (r.sha256 or '')[:12], r.ctime[:19]] for r in records]
    click.echo(_table(rows, ['pk', 'label', 'origin', 'elements', 'r_max', 'dtype', 'foundation', 'sha256',
                             'created']))


@query.command('validation')
@click.argument('model_identifier', metavar='MODEL')
@JSON_OPTION
@click.pass_context
def query_validation(ctx, model_identifier, as_json):
    """The ValidationWorkChains run on MODEL (pk, UUID, label or sha256 prefix) and their verdicts."""
    model = _model(ctx, model_identifier)
    from aiida_mlip.query import validation_results

    records = validation_results(model)
    if as_json:
        _echo_json([record.to_dict() for record in records])
        return
    if not records:
        click.echo(f'no ValidationWorkChain has used model {model.pk}')
        return
    rows = []
    for r in records:
        verdict = {True: 'PASSED', False: 'FAILED', None: '-'}[r.passed]
        checks = f'{sum(r.checks.values())}/{len(r.checks)}' if r.checks else '-'
        rows.append([r.process.pk, r.process.process_state, r.process.exit_status, r.structure_formula,
                     ','.join(r.properties), r.port, len(r.models), verdict, checks, r.caller or '-'])
    click.echo(_table(rows, ['pk', 'state', 'exit', 'structure', 'properties', 'port', 'models', 'verdict',
                             'checks', 'called by']))
    for r in records:
        for reason in r.failed:
            click.echo(f'  {r.process.pk}: {reason}')
