"""Idempotent creation of the AiiDA profile, the ``localhost`` computer and the codes this project runs.

Every function returns what exists when it already does, so ``aiida-mlip setup`` is safe to rerun.
"""
from __future__ import annotations

import os
import pathlib
import shutil
import sys

#: Open MPI refuses to start as root without these; harmless elsewhere.
OPENMPI_ROOT_LINES = ('export OMPI_ALLOW_RUN_AS_ROOT=1', 'export OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1')
#: Code prepend: one OpenMP thread per MPI rank (2-core machines over-subscribe otherwise), passive waiting.
THREAD_LINES = ('export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}', 'export OMP_WAIT_POLICY=PASSIVE')

DEFAULT_PROFILE = 'aiida-mlip'
DEFAULT_EMAIL = 'aiida-mlip@localhost'


def ensure_profile(name: str = DEFAULT_PROFILE, broker: str | None = 'core.zeromq', storage: str = 'core.sqlite_dos',
                   storage_config: dict | None = None):
    """Load profile ``name``, creating it (SQLite + ZeroMQ by default, like ``verdi presto``) when missing.

    :returns: (profile, created)
    """
    from aiida.manage.configuration import create_profile, get_config, load_profile
    from aiida.plugins import BrokerFactory

    config = get_config(create=True)
    if name in config.profile_names:
        return load_profile(name, allow_switch=True), False

    broker_config = BrokerFactory(broker).get_default_config() if broker == 'core.zeromq' else None
    if broker == 'core.rabbitmq':
        from aiida.brokers.rabbitmq.defaults import detect_rabbitmq_config

        broker_config = detect_rabbitmq_config()
    profile = create_profile(
        config,
        name=name,
        email=DEFAULT_EMAIL,
        storage_backend=storage,
        storage_config=storage_config or {},
        broker_backend=broker,
        broker_config=broker_config,
    )
    config.set_option('runner.poll.interval', 1, scope=profile.name)
    config.set_default_profile(profile.name, overwrite=True)
    config.store()
    return load_profile(profile.name, allow_switch=True), True


def _merge_lines(text: str, lines) -> str:
    existing = [line for line in (text or '').splitlines() if line.strip()]
    return '\n'.join(existing + [line for line in lines if line not in existing])


def ensure_localhost(label: str = 'localhost', workdir: str | None = None):
    """Return the ``core.local``/``core.direct`` computer ``label``, creating and configuring it if needed."""
    from aiida import orm
    from aiida.common.exceptions import NotExistent
    from aiida.manage import get_manager

    try:
        computer = orm.load_computer(label)
    except NotExistent:
        if workdir is None:
            config_dir = pathlib.Path(get_manager().get_config().dirpath)
            workdir = str(config_dir / 'scratch' / get_manager().get_profile().name)
        computer = orm.Computer(
            label=label,
            hostname='localhost',
            description='Local machine, set up by aiida-mlip',
            transport_type='core.local',
            scheduler_type='core.direct',
            workdir=workdir,
        ).store()
    if not computer.is_configured:
        computer.configure(safe_interval=0)
    computer.set_minimum_job_poll_interval(1)
    if computer.get_default_mpiprocs_per_machine() is None:
        computer.set_default_mpiprocs_per_machine(1)
    prepend = _merge_lines(computer.get_prepend_text(), OPENMPI_ROOT_LINES)
    if prepend != computer.get_prepend_text():
        computer.set_prepend_text(prepend)
    return computer


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
