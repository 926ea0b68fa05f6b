"""``aiida-mlip campaign validate|run|submit FILE``: run a campaign file (workflows/*.yaml) as one CampaignWorkChain."""
from __future__ import annotations

import pathlib

import click

from aiida_mlip.cli.root import BadInput, cli, load_profile_from_context


@cli.group('campaign')
def campaign():
    """Campaign files: labeling -> training or fine-tuning -> validation -> transferability (docs/campaigns.md)."""


def _builder(ctx, file):
    """Check FILE (schema, then what the profile provides) and build; BadInput (exit 2) before anything is stored."""
    from aiida_mlip.campaigns.builder import build_campaign, campaign_cutoffs
    from aiida_mlip.campaigns.schema import CampaignError, load_campaign

    try:
        data = load_campaign(file)
    except CampaignError as exception:
        raise BadInput(f'{len(exception.errors)} problem(s) in the campaign file:\n{exception}') from None
    load_profile_from_context(ctx)
    try:
        builder = build_campaign(data, str(file))
    except CampaignError as exception:
        raise BadInput(f'{len(exception.errors)} problem(s) in the campaign file:\n{exception}') from None
    ecutwfc, ecutrho = campaign_cutoffs(data)
    click.echo(f'campaign `{data["name"]}`: {len(data["classes"])} class(es), elements {", ".join(data["elements"])}; '
               f'DFT `{data["dft"]["protocol"]}` with {data["pseudo_family"]} at {ecutwfc:g}/{ecutrho:g} Ry for all')
    for label, names in data['classes'].items():
        click.echo(f'  {label:<12} {", ".join(names)}')
    return data, builder


def _check_launch(builder):
    """The workchain's own input validation, without storing anything (refusals exit 2)."""
    from aiida_mlip.workflows.campaign import CampaignWorkChain

    problem = CampaignWorkChain.spec().inputs.validate(builder._inputs(prune=True))  # noqa: SLF001
    if problem is not None:
        raise BadInput(f'the campaign cannot start: {problem.message}')


@campaign.command('validate')
@click.argument('file', type=click.Path(dir_okay=False, path_type=pathlib.Path))
@click.pass_context
def campaign_validate(ctx, file):
    """Check FILE against the schema and the profile (family, codes); runs nothing."""
    _, builder = _builder(ctx, file)
    _check_launch(builder)
    click.echo('valid')


def _echo_summary(node):
    summary = node.outputs.summary.get_dict() if 'summary' in node.outputs else {}
    click.echo(f'{node.process_label}<{node.pk}> {node.process_state.value}, exit status {node.exit_status}'
               + (f': {node.exit_message}' if node.exit_message else ''))
    if not summary:
        return
    click.echo(f'  pw.x calculations: {summary["n_pw_calculations"]}; DFT fingerprint {summary["fingerprint_hash"]}; '
               f'wall {summary["wall_s"]:.0f} s; stages {summary["timings_s"]}')
    for label, entry in summary['classes'].items():
        click.echo(f'  class {label:<12} {entry["n_frames"]:>4} frames  {", ".join(entry["materials"])}')
    test = summary.get('test')
    if test:
        click.echo(f'  test split ({test["n_frames"]} frames): forces RMSE {test["forces_rmse_mev_per_a"]:.1f} meV/Å, '
                   f'energy RMSE {test["energy_rmse_mev_per_atom"]:.2f} meV/atom')
    for label, entry in summary.get('validation', {}).items():
        parts = [f'{section} ' + ', '.join(f'{key} {value:.2f}' for key, value in values.items()
                                             if isinstance(value, float))
                 for section, values in entry.items() if isinstance(values, dict)]
        click.echo(f'  validation {label:<8} {"PASSED" if entry["passed"] else "FAILED"}: {"; ".join(parts)}')
    if 'transferability' in summary:
        matrix = summary['transferability']
        click.echo(f'  transferability: models {matrix["models"]} x classes {matrix["classes"]}, forces RMSE '
                   f'(meV/Å) {matrix["forces_rmse_mev_per_a"]}')


def _runner():
    """The profile's runner; without a reachable broker (the embedded ZeroMQ broker runs with the daemon) a runner
    without communicator: the campaign runs the same, only `verdi process kill` cannot reach it (Ctrl-C can)."""
    from aiida.manage import get_manager

    manager = get_manager()
    broker = manager.get_broker()
    if broker is not None and hasattr(broker, 'check_service_reachable') and not broker.check_service_reachable():
        manager.set_runner(manager.create_runner(communicator=None))
    return manager.get_runner()


@campaign.command('run')
@click.argument('file', type=click.Path(dir_okay=False, path_type=pathlib.Path))
@click.pass_context
def campaign_run(ctx, file):
    """Run FILE in this process (blocking); follow it with `verdi process report PK` from another shell."""
    import signal

    from aiida.engine.utils import loop_scope

    _, builder = _builder(ctx, file)
    _check_launch(builder)
    runner = _runner()
    with loop_scope(runner.loop):
        process = runner.instantiate_process(builder)
        click.echo(f'started CampaignWorkChain<{process.node.pk}>: verdi process report {process.node.pk}', err=True)

        def kill(_signal, _frame):
            process.kill(msg_text='killed by the user (campaign run interrupted)')

        previous = signal.signal(signal.SIGINT, kill)
        try:
            process.execute()
        finally:
            signal.signal(signal.SIGINT, previous)
    _echo_summary(process.node)
    click.echo(f'report: aiida-mlip report {process.node.pk} -o reports/{process.node.label}')
    if not process.node.is_finished_ok:
        raise click.exceptions.Exit(1)


@campaign.command('submit')
@click.argument('file', type=click.Path(dir_okay=False, path_type=pathlib.Path))
@click.pass_context
def campaign_submit(ctx, file):
    """Submit FILE to the daemon; follow it with `verdi process list` / `verdi process report PK`."""
    from aiida.engine import submit
    from aiida.engine.daemon.client import get_daemon_client

    _, builder = _builder(ctx, file)
    _check_launch(builder)
    if not get_daemon_client().is_daemon_running:
        raise BadInput('the AiiDA daemon is not running: start it with `verdi daemon start` (or use '
                       '`aiida-mlip campaign run FILE`, which runs in this shell)')
    node = submit(builder)
    click.echo(f'submitted CampaignWorkChain<{node.pk}>: verdi process report {node.pk} ; verdi process list')
