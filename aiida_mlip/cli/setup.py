"""``aiida-mlip setup``: profile, computer, codes and pseudopotential family; idempotent, safe to rerun."""
from __future__ import annotations

import os
import pathlib

import click

from aiida_mlip.cli.root import BadInput, cli

DEFAULT_FAMILY = 'PBE-QE-local'
BROKERS = {'zeromq': 'core.zeromq', 'rabbitmq': 'core.rabbitmq', 'none': None}
STORAGES = {'sqlite': 'core.sqlite_dos', 'psql': 'core.psql_dos'}


def _install_pseudos(directories, label: str, functional: str, picks: dict) -> None:
    from aiida_mlip.setup.pseudos import install_family, scan_upf_files, select_pseudos

    try:
        infos = scan_upf_files(directories)
        selection = select_pseudos(infos, functional, picks)
        family, created = install_family(label, selection, functional)
    except (FileNotFoundError, ValueError) as exception:
        raise BadInput(str(exception)) from exception
    state = 'created' if created else 'exists'
    click.echo(f'pseudo family `{family.label}` ({functional}, {state}): {len(family.elements)} elements')
    for element in sorted(family.elements):
        wfc, rho = family.get_recommended_cutoffs(elements=(element,), unit='Ry')
        source = family.base.extras.get('cutoff_sources', {}).get(element, '')
        filename = selection[element].path.name if element in selection else family.get_pseudo(element).filename
        click.echo(f'  {element:<3} {filename:<40} ecutwfc {wfc:5.1f} Ry  ecutrho {rho:6.1f} Ry  ({source})')


@cli.group('setup', invoke_without_command=True)
@click.option('--profile-name', default='aiida-mlip', show_default=True,
              help='Name of the profile to create when -p/--profile names none.')
@click.option('--storage', type=click.Choice(sorted(STORAGES)), default='sqlite', show_default=True,
              help='Storage of a new profile: SQLite needs no service; psql creates a PostgreSQL database '
                   '(core.psql_dos), what many daemon workers and large projects need (docs/production.md).')
@click.option('--db-host', default='127.0.0.1', show_default=True, help='PostgreSQL host (with --storage psql).')
@click.option('--db-port', type=int, default=5432, show_default=True, help='PostgreSQL port.')
@click.option('--db-user', default='postgres', show_default=True,
              help='PostgreSQL role allowed to create databases; the profile gets a role of its own.')
@click.option('--db-password', default=None, envvar='AIIDA_MLIP_DB_PASSWORD',
              help='Password of --db-user (none with trust or peer authentication).')
@click.option('--db-name', default=None,
              help='Database (and role) to create for the profile. Default: aiida-PROFILE_NAME.')
@click.option('--broker', type=click.Choice(sorted(BROKERS)), default='zeromq', show_default=True,
              help='Message broker of a new profile: the embedded ZeroMQ broker needs no service; rabbitmq '
                   'is the production broker (docs/production.md: disable its consumer_timeout).')
@click.option('--broker-host', default='127.0.0.1', show_default=True, help='RabbitMQ host (with --broker rabbitmq).')
@click.option('--broker-port', type=int, default=5672, show_default=True, help='RabbitMQ AMQP port.')
@click.option('--broker-user', default='guest', show_default=True, help='RabbitMQ user.')
@click.option('--broker-password', default='guest', show_default=True, envvar='AIIDA_MLIP_BROKER_PASSWORD',
              help='RabbitMQ password.')
@click.option('--broker-vhost', default='', help='RabbitMQ virtual host (default: the server\'s default).')
@click.option('--pw', 'pw_executable', type=click.Path(dir_okay=False), default=None,
              help='pw.x executable (default: pw.x on PATH, /usr/bin/pw.x from the Debian package).')
@click.option('--pseudo-family', default=DEFAULT_FAMILY, show_default=True,
              help='Label of the PBE family built from the Debian quantum-espresso-data folders.')
@click.option('--no-pseudos', is_flag=True, help='Do not build the default pseudopotential family.')
@click.option('--scheduler', type=click.Choice(['direct', 'slurm']), default='direct', show_default=True,
              help='Scheduler of the local computer the codes go on: direct runs jobs as processes (`localhost`); '
                   'slurm submits them with sbatch to the SLURM cluster this machine reaches (`localhost-slurm`, '
                   '`bash scripts/slurm_local.sh start` starts a one-node one; docs/production.md).')
@click.pass_context
def setup(ctx, profile_name, storage, db_host, db_port, db_user, db_password, db_name, broker, broker_host,
          broker_port, broker_user, broker_password, broker_vhost, pw_executable, pseudo_family, no_pseudos,
          scheduler):
    """Create (or reuse) the profile, the `localhost` computer (`localhost-slurm` with --scheduler slurm) and
    the codes.

    With -p/--profile an existing profile is used as it is. Otherwise a profile (SQLite + ZeroMQ like
    `verdi presto` by default; `--storage psql --broker rabbitmq` for production) is created in the
    configuration folder of AIIDA_PATH, which must then be set: this command never writes into your home
    folder by accident. The services are probed first: when PostgreSQL or RabbitMQ do not answer, nothing
    is created. With --scheduler slurm the cluster is probed (sinfo) before anything is created.
    """
    if ctx.invoked_subcommand is not None:
        return
    from aiida_mlip.setup import environment
    from aiida_mlip.setup.pseudos import DEFAULT_PSEUDO_DIRS

    partitions = None
    if scheduler == 'slurm':
        try:
            partitions = environment.slurm_partitions()
        except ConnectionError as exception:
            raise BadInput(str(exception)) from exception

    existing = ctx.obj.get('profile')
    if existing:
        from aiida_mlip.cli.root import load_profile_from_context

        profile = load_profile_from_context(ctx)
        click.echo(f'profile `{profile.name}`: using the existing profile')
    else:
        if not os.environ.get('AIIDA_PATH'):
            raise BadInput(
                'AIIDA_PATH is not set: set it to a project folder (e.g. `export AIIDA_PATH=$PWD/.aiida`) '
                'or pass -p PROFILE to use an existing profile'
            )
        try:
            profile, created = environment.ensure_profile(
                profile_name, broker=BROKERS[broker], storage=STORAGES[storage],
                postgres=environment.PostgresServer(db_host, db_port, db_user, db_password), database=db_name,
                rabbitmq=environment.RabbitmqServer(broker_host, broker_port, broker_user, broker_password,
                                                   broker_vhost),
            )
        except (ConnectionError, ValueError) as exception:
            raise BadInput(str(exception)) from exception
        click.echo(f'profile `{profile.name}`: {"created" if created else "exists"} '
                   f'(storage {profile.storage_backend}, broker {profile.process_control_backend})')
    try:
        computer = environment.ensure_localhost(scheduler=environment.SCHEDULERS[scheduler])
    except ValueError as exception:
        raise BadInput(str(exception)) from exception
    click.echo(f'computer `{computer.label}`: ready ({computer.transport_type}, {computer.scheduler_type})')
    if partitions is not None:
        described = ', '.join(f'{name}{" (default)" if info["default"] else ""} {info["available"]} '
                              f'max {info["max_time"]}' for name, info in partitions.items())
        click.echo(f'SLURM partitions: {described}; jobs go to the default partition unless '
                   'metadata.options.queue_name names another')
    try:
        code = environment.ensure_pw_code(computer, executable=pw_executable)
    except FileNotFoundError as exception:
        raise BadInput(str(exception)) from exception
    click.echo(f'code `{code.full_label}`: {code.get_executable()}')
    for code in environment.ensure_mlip_codes(computer).values():
        click.echo(f'code `{code.full_label}`: {code.get_executable()} ({code.default_calc_job_plugin})')
    if not no_pseudos:
        directories = [d for d in DEFAULT_PSEUDO_DIRS if d.is_dir()]
        if not directories:
            click.echo('no Debian pseudopotential folder found: install quantum-espresso-data, '
                       'or run `aiida-mlip setup pseudos --from DIR`', err=True)
        else:
            _install_pseudos(directories, pseudo_family, 'PBE', {})


@setup.command('pseudos')
@click.option('--from', 'directories', multiple=True, type=click.Path(file_okay=False, path_type=pathlib.Path),
              help='Folder of UPF files (searched recursively, .upf.gz too); repeatable. '
                   'Default: the folders of the Debian quantum-espresso-data package.')
@click.option('--label', default=DEFAULT_FAMILY, show_default=True, help='Label of the family to create.')
@click.option('--functional', default='PBE', show_default=True, help='Keep only files of this functional.')
@click.option('--pick', 'picks', multiple=True, metavar='EL=FILENAME',
              help='Force the file used for an element, e.g. --pick Si=Si.pbe-rrkj.UPF; repeatable.')
@click.pass_context
def setup_pseudos(ctx, directories, label, functional, picks):
    """Build a pseudopotential family with recommended cutoffs from a folder of UPF files.

    One file per element is kept (scalar-relativistic; with suggested cutoffs; pslibrary 1.x first), files of
    other functionals are left out and a --pick of another functional is refused. Cutoffs are the
    `Suggested minimum cutoff` lines of each file, else a default by pseudopotential type (docs/labeling.md).
    """
    from aiida_mlip.cli.root import load_profile_from_context
    from aiida_mlip.setup.pseudos import DEFAULT_PSEUDO_DIRS

    load_profile_from_context(ctx)
    try:
        picks = dict(pick.split('=', 1) for pick in picks)
    except ValueError as exception:
        raise BadInput('--pick takes ELEMENT=FILENAME') from exception
    _install_pseudos(directories or [d for d in DEFAULT_PSEUDO_DIRS if d.is_dir()], label, functional, picks)
