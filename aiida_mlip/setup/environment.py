"""Idempotent creation of the AiiDA profile, the local computers (direct, SLURM) and the codes this project runs.

Every function returns what exists when it already does, so ``aiida-mlip setup`` is safe to rerun.
"""
from __future__ import annotations

import dataclasses
import os
import pathlib
import shutil
import sys

#: Open MPI refuses to start as root without these; harmless elsewhere.
OPENMPI_ROOT_LINES = ('export OMPI_ALLOW_RUN_AS_ROOT=1', 'export OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1')
#: Jobs of the local ``core.direct`` computer run below the engine's priority: with more jobs than cores, the runner
#: that submits, polls, retrieves and parses them got only its share of a core, and finished pw.x runs waited for
#: retrieval while others computed (seen: 16 finished labels waiting, the runner at 8 % of a core, 10 pw.x running).
LOCAL_JOB_NICE_LINES = ('renice -n 10 -p $$ > /dev/null 2>&1 || true',)
#: Code prepend: one OpenMP thread per MPI rank (2-core machines over-subscribe otherwise), passive waiting.
THREAD_LINES = ('export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}', 'export OMP_WAIT_POLICY=PASSIVE')

DEFAULT_PROFILE = 'aiida-mlip'
DEFAULT_EMAIL = 'aiida-mlip@localhost'


@dataclasses.dataclass
class PostgresServer:
    """A PostgreSQL server and a role allowed to create databases (``verdi presto --use-postgres`` defaults)."""

    host: str = '127.0.0.1'
    port: int = 5432
    user: str = 'postgres'
    password: str | None = None

    def connect(self):
        """aiida-core's PostgreSQL helper, connected; a ConnectionError saying where when the server does not answer."""
        from aiida.manage.external.postgres import Postgres

        dsn = {'host': self.host, 'port': self.port, 'user': self.user, 'password': self.password,
               'connect_timeout': 5}
        postgres = Postgres(dbinfo=dsn, interactive=False, quiet=True, try_sudo=False)
        if not postgres.is_connected:
            raise ConnectionError(
                f'PostgreSQL does not answer on {self.host}:{self.port} as user `{self.user}` '
                '(is the server running, and does its pg_hba.conf let this user in?)'
            )
        return postgres

    def create_database(self, name: str, profile_name: str) -> dict:
        """Create database ``name`` owned by a new role of the same name: the ``core.psql_dos`` storage config.

        Refuses an existing database (it may hold another profile's data) instead of renaming it silently.
        """
        import secrets

        from aiida.manage.configuration.settings import AiiDAConfigDir

        postgres = self.connect()
        if postgres.db_exists(name):
            raise ValueError(f'PostgreSQL database `{name}` exists already: choose another --db-name, or drop it '
                             f'(`dropdb -h {self.host} -p {self.port} -U {self.user} {name}`) if it is unused')
        password = secrets.token_hex(15)
        if not postgres.dbuser_exists(name):
            postgres.create_dbuser(name, password)
        elif not postgres.can_user_authenticate(name, password):
            raise ValueError(f'PostgreSQL role `{name}` exists with another password: choose another --db-name')
        try:
            postgres.create_db(name, name)  # aiida-core's command: UTF8 with the en_US.UTF-8 locale
        except Exception as exception:  # noqa: BLE001  (psycopg error class depends on the connection mode)
            if 'locale' not in str(exception):
                raise
            postgres.execute(f'CREATE DATABASE "{name}" OWNER "{name}" ENCODING \'UTF8\' TEMPLATE template0')
        return {
            'database_hostname': self.host,
            'database_port': self.port,
            'database_name': name,
            'database_username': name,
            'database_password': password,
            'repository_uri': (AiiDAConfigDir.get() / 'repository' / profile_name).as_uri(),
        }

    def drop_database(self, name: str) -> None:
        """Drop database ``name`` and its role (what :meth:`create_database` made), if they exist."""
        postgres = self.connect()
        if postgres.db_exists(name):
            postgres.drop_db(name)
        if postgres.dbuser_exists(name):
            postgres.drop_dbuser(name)


@dataclasses.dataclass
class RabbitmqServer:
    """A RabbitMQ server (the AMQP defaults of aiida-core: guest@127.0.0.1:5672)."""

    host: str = '127.0.0.1'
    port: int = 5672
    username: str = 'guest'
    password: str = 'guest'
    virtual_host: str = ''

    def broker_config(self) -> dict:
        """The ``core.rabbitmq`` broker config, after a connection probe; ConnectionError when nothing answers."""
        from aiida.brokers.rabbitmq.defaults import detect_rabbitmq_config

        try:
            return detect_rabbitmq_config(host=self.host, port=self.port, username=self.username,
                                          password=self.password, virtual_host=self.virtual_host)
        except ConnectionError:
            raise ConnectionError(
                f'RabbitMQ does not answer on amqp://{self.username}@{self.host}:{self.port}/{self.virtual_host} '
                '(is rabbitmq-server running, are user and password right?)'
            ) from None


def default_database_name(profile_name: str) -> str:
    """The PostgreSQL database (and role) of a profile, named like ``verdi presto`` does."""
    return f'aiida-{profile_name}'


def ensure_profile(name: str = DEFAULT_PROFILE, broker: str | None = 'core.zeromq', storage: str = 'core.sqlite_dos',
                   postgres: PostgresServer | None = None, database: str | None = None,
                   rabbitmq: RabbitmqServer | None = None):
    """Load profile ``name``, creating it (SQLite + ZeroMQ by default, like ``verdi presto``) when missing.

    ``storage='core.psql_dos'`` creates the database ``database`` (default :func:`default_database_name`) on
    ``postgres``; ``broker='core.rabbitmq'`` connects to ``rabbitmq``. Both servers are probed before anything
    is written, so an unreachable service leaves no half-made profile. An existing profile is loaded as it is.

    :returns: (profile, created)
    :raises ConnectionError: a service does not answer. ValueError: the database exists already.
    """
    from aiida.manage.configuration import create_profile, get_config, load_profile
    from aiida.plugins import BrokerFactory

    config = get_config(create=True)
    if name in config.profile_names:
        return load_profile(name, allow_switch=True), False

    broker_config = None
    if broker == 'core.zeromq':
        broker_config = BrokerFactory(broker).get_default_config()
    elif broker == 'core.rabbitmq':
        broker_config = (rabbitmq or RabbitmqServer()).broker_config()
    storage_config = {}
    if storage == 'core.psql_dos':
        postgres = postgres or PostgresServer()
        storage_config = postgres.create_database(database or default_database_name(name), name)
    try:
        profile = create_profile(
            config,
            name=name,
            email=DEFAULT_EMAIL,
            storage_backend=storage,
            storage_config=storage_config,
            broker_backend=broker,
            broker_config=broker_config,
        )
    except Exception:
        if storage == 'core.psql_dos':  # do not leave an orphan database behind
            postgres.drop_database(storage_config['database_name'])
        raise
    config.set_option('runner.poll.interval', 1, scope=profile.name)
    config.set_default_profile(profile.name, overwrite=True)
    config.store()
    return load_profile(profile.name, allow_switch=True), True


def _merge_lines(text: str, lines) -> str:
    existing = [line for line in (text or '').splitlines() if line.strip()]
    return '\n'.join(existing + [line for line in lines if line not in existing])


#: ``aiida-mlip setup --scheduler``: name -> aiida-core scheduler plugin and the label of its local computer.
SCHEDULERS = {'direct': 'core.direct', 'slurm': 'core.slurm'}
COMPUTER_LABELS = {'core.direct': 'localhost', 'core.slurm': 'localhost-slurm'}


def ensure_localhost(label: str | None = None, workdir: str | None = None, scheduler: str = 'core.direct'):
    """Return the ``core.local`` computer ``label`` with ``scheduler``, creating and configuring it if needed.

    ``core.direct`` (label ``localhost``) runs jobs as plain processes; ``core.slurm`` (label ``localhost-slurm``)
    submits them with ``sbatch`` to a SLURM cluster reached from this machine (``scripts/slurm_local.sh`` starts
    a one-node one). An existing computer of that label with another scheduler is refused, not changed.

    Its commands run in a plain ``bash``, not aiida-core's default login shell (``bash -l``): the engine runs one
    command per scheduler poll (every second here), and a login shell reads the profile files each time (pyenv,
    conda and module hooks: 0.18 CPU-s per command on the development machine, on the cores pw.x runs on). The jobs
    need no login environment: the codes are absolute paths and the submission script sets what they need.
    """
    from aiida import orm
    from aiida.common.exceptions import NotExistent
    from aiida.manage import get_manager

    if scheduler not in COMPUTER_LABELS:
        raise ValueError(f'scheduler `{scheduler}` is not supported here: choose one of {sorted(COMPUTER_LABELS)}')
    label = label or COMPUTER_LABELS[scheduler]
    try:
        computer = orm.load_computer(label)
    except NotExistent:
        if workdir is None:
            config_dir = pathlib.Path(get_manager().get_config().dirpath)
            workdir = str(config_dir / 'scratch' / get_manager().get_profile().name)
        computer = orm.Computer(
            label=label,
            hostname='localhost',
            description=f'Local machine ({scheduler}), set up by aiida-mlip',
            transport_type='core.local',
            scheduler_type=scheduler,
            workdir=workdir,
        ).store()
    if computer.scheduler_type != scheduler or computer.transport_type != 'core.local':
        raise ValueError(f'computer `{label}` exists with {computer.transport_type} + {computer.scheduler_type}, '
                         f'not core.local + {scheduler}: choose another label or remove it (`verdi computer delete`)')
    if not computer.is_configured:
        computer.configure(safe_interval=0, use_login_shell=False)
    computer.set_minimum_job_poll_interval(1)
    if computer.get_default_mpiprocs_per_machine() is None:
        computer.set_default_mpiprocs_per_machine(1)
    lines = OPENMPI_ROOT_LINES + (LOCAL_JOB_NICE_LINES if scheduler == 'core.direct' else ())
    prepend = _merge_lines(computer.get_prepend_text(), lines)
    if prepend != computer.get_prepend_text():
        computer.set_prepend_text(prepend)
    return computer


def slurm_partitions(timeout: float = 20.0) -> dict:
    """Partitions of the SLURM cluster this machine reaches: name -> {'default', 'available', 'max_time'}.

    The probe ``aiida-mlip setup --scheduler slurm`` runs before it creates anything, so that a computer is never
    made for a cluster that does not answer. ``sinfo`` reads the same configuration (``SLURM_CONF`` or
    ``/etc/slurm/slurm.conf``) as the ``sbatch``/``squeue`` that aiida-core's ``core.slurm`` runs later.

    :raises ConnectionError: ``sinfo`` is missing or the controller does not answer.
    """
    import subprocess

    start_hint = '`bash scripts/slurm_local.sh start` installs and starts a one-node cluster on this machine'
    if shutil.which('sinfo') is None:
        raise ConnectionError(f'sinfo not found: no SLURM client here ({start_hint})')
    named = os.environ.get('SLURM_CONF')
    if named and not pathlib.Path(named).is_file():  # sinfo would retry for 60 s before saying so
        raise ConnectionError(f'SLURM_CONF names {named}, which does not exist ({start_hint})')
    try:
        result = subprocess.run(['sinfo', '-h', '-o', '%P|%a|%l'], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise ConnectionError(f'SLURM did not answer within {timeout:.0f} s (sinfo; {start_hint})') from None
    if result.returncode != 0 or not result.stdout.strip():
        raise ConnectionError(f'SLURM does not answer: {result.stderr.strip() or "sinfo printed nothing"} '
                              f'({start_hint})')
    partitions = {}
    for line in result.stdout.split():
        name, available, max_time = line.split('|')
        partitions[name.rstrip('*')] = {'default': name.endswith('*'), 'available': available,
                                        'max_time': max_time}
    return partitions


def ensure_installed_code(label: str, computer, executable: str, plugin: str, description: str, with_mpi=None):
    """Return the installed code ``label@computer``, creating it if needed."""
    from aiida import orm
    from aiida.common.exceptions import NotExistent

    try:
        return orm.load_code(f'{label}@{computer.label}')
    except NotExistent:
        pass
    return orm.InstalledCode(
        label=label,
        computer=computer,
        filepath_executable=executable,
        default_calc_job_plugin=plugin,
        description=description,
        prepend_text='\n'.join(THREAD_LINES),
        with_mpi=with_mpi,
    ).store()


def find_pw_executable() -> str:
    """Absolute path of pw.x (the Debian package installs /usr/bin/pw.x)."""
    path = shutil.which('pw.x')
    if path is None:
        raise FileNotFoundError('pw.x not found on PATH: install it with `apt-get install quantum-espresso`')
    return path


def ensure_pw_code(computer, label: str = 'pw', executable: str | None = None):
    """The pw.x code, run serially by default (``withmpi`` False) as fits a small local machine."""
    return ensure_installed_code(
        label, computer, executable or find_pw_executable(), 'quantumespresso.pw',
        'Quantum ESPRESSO pw.x', with_mpi=False,
    )


def python_executable() -> str:
    """The interpreter of this environment: the MLIP engine codes run ``python -m aiida_mlip.engine...`` with it."""
    return os.environ.get('AIIDA_MLIP_PYTHON', sys.executable)


#: The MLIP plugins and the labels of the python codes that run them (one code per plugin, same interpreter).
MLIP_CODES = {
    'mace_train': ('mace-train', 'mlip.mace_train', 'python running mace_run_train (mace-torch) for MaceTrainCalculation'),
    'evaluate': ('mlip-evaluate', 'mlip.evaluate', 'python running aiida_mlip.engine for MlipEvaluateCalculation'),
    'md': ('mlip-md', 'mlip.md', 'python running aiida_mlip.engine.md for MlipMdCalculation'),
    'relax': ('mlip-relax', 'mlip.relax', 'python running aiida_mlip.engine.relax for MlipRelaxCalculation'),
}


def ensure_mlip_codes(computer, executable: str | None = None) -> dict:
    """The python codes of the MLIP plugins on ``computer``: ``{'mace_train', 'evaluate', 'md', 'relax'}`` -> code.

    Both run ``executable`` (default :func:`python_executable`, this environment's interpreter, which has
    mace-torch and aiida_mlip installed); serial (``withmpi`` False), one OpenMP thread unless the job sets more.
    """
    executable = executable or python_executable()
    return {
        key: ensure_installed_code(label, computer, executable, plugin, description, with_mpi=False)
        for key, (label, plugin, description) in MLIP_CODES.items()
    }
