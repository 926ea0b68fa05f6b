"""A PostgreSQL + RabbitMQ profile with a 2-worker daemon for the production tests, and the driver that runs in it.

The pytest process keeps aiida-core's temporary test profile loaded, so everything on the production profile
happens in other processes: ``verdi -p NAME ...``, the daemon, and this module run as a script
(``python -m tests.production_fixtures ACTION ...``) to build and submit work. The test process only watches
the database with plain SQL (cheap polling, no second profile in one interpreter).

Every profile lives in its own temporary AIIDA_PATH with its own database; the fixture stops the daemon,
deletes the profile, drops database and role and removes the profile's RabbitMQ queue and exchanges, also
when a test fails.
"""
from __future__ import annotations

import json
import os
import pathlib
import secrets
import shutil
import signal
import subprocess
import sys
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
BIN = pathlib.Path(sys.executable).parent
PW_PROCESS_TYPE = 'aiida.calculations:quantumespresso.pw'
COUNTED_PW = 'pw-counted'


# ---- services ---------------------------------------------------------------------------------------------------

def services_problem() -> str | None:
    """Why the local PostgreSQL or RabbitMQ cannot be used, or None."""
    from aiida_mlip.setup.environment import PostgresServer, RabbitmqServer

    try:
        PostgresServer().connect()
        RabbitmqServer().broker_config()
    except ConnectionError as exception:
        return str(exception)
    return None


def require_services():
    """PostgreSQL and RabbitMQ run on CI (like pw.x): CI fails without them, a developer machine skips."""
    import pytest

    problem = services_problem()
    if problem:
        if os.environ.get('CI'):
            pytest.fail(f'production services missing on CI: {problem}')
        pytest.skip(f'production services not available: {problem}')


# ---- the profile, seen from outside -----------------------------------------------------------------------------

class ProductionProfile:
    """A ``core.psql_dos`` + ``core.rabbitmq`` profile in its own AIIDA_PATH, driven through subprocesses."""

    def __init__(self, folder: pathlib.Path):
        self.folder = folder
        self.name = f'mlip-prod-{secrets.token_hex(4)}'
        self.aiida_path = folder / 'config'
        self.pw_log = folder / 'pw_runs.log'
        self.env = {key: value for key, value in os.environ.items() if key not in ('AIIDA_MLIP_PROFILE',)}
        self.env.update(AIIDA_PATH=str(self.aiida_path), PYTHONPATH=str(ROOT), OMP_NUM_THREADS='1',
                        OMP_WAIT_POLICY='PASSIVE', PATH=f'{BIN}{os.pathsep}{os.environ.get("PATH", "")}')
        self.storage = None

    def _run(self, *command, check=True, timeout=600) -> subprocess.CompletedProcess:
        result = subprocess.run(command, capture_output=True, text=True, env=self.env, cwd=self.folder,
                                timeout=timeout)
        if check and result.returncode != 0:
            raise RuntimeError(f'{" ".join(map(str, command))} failed ({result.returncode}):\n'
                               f'{result.stdout[-3000:]}\n{result.stderr[-3000:]}')
        return result

    def setup(self) -> str:
        """`aiida-mlip setup --storage psql --broker rabbitmq` (the command under test), then the counted pw.x code."""
        result = self._run(BIN / 'aiida-mlip', 'setup', '--profile-name', self.name, '--storage', 'psql',
                           '--broker', 'rabbitmq')
        config = json.loads((self.aiida_path / '.aiida' / 'config.json').read_text())
        self.storage = config['profiles'][self.name]['storage']['config']
        # circus answers slowly on a loaded machine: the default 2 s makes `verdi daemon restart` fail
        self.verdi('config', 'set', 'daemon.timeout', '30')
        self.driver('counted-code', str(self.pw_log))
        return result.stdout

    def verdi(self, *args, **kwargs) -> subprocess.CompletedProcess:
        return self._run(BIN / 'verdi', '-p', self.name, *args, **kwargs)

    def driver(self, *args, timeout=600) -> dict:
        """Run an ACTION of this module inside the profile; its last stdout line is JSON."""
        result = self._run(sys.executable, '-m', 'tests.production_fixtures', self.name, *args, timeout=timeout)
        return json.loads(result.stdout.strip().splitlines()[-1])

    def driver_background(self, *args) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, '-m', 'tests.production_fixtures', self.name, *args],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=self.env,
                                cwd=self.folder)

    # -- daemon --
    def start_daemon(self, workers: int = 2):
        self.verdi('daemon', 'start', str(workers))

    def stop_daemon(self):
        self.verdi('daemon', 'stop', check=False, timeout=120)

    def daemon_pids(self) -> list[int]:
        """The circus arbiter and its children: the workers and circus' stats process (not the pw.x jobs, which
        the scheduler owns: they are no children of the arbiter)."""
        import psutil

        pid_file = self.aiida_path / '.aiida' / 'daemon' / f'circus-{self.name}.pid'
        if not pid_file.exists():
            return []
        try:
            arbiter = psutil.Process(int(pid_file.read_text().split()[0]))
            return [arbiter.pid] + [child.pid for child in arbiter.children()]
        except (psutil.NoSuchProcess, ValueError):
            return []

    def worker_pids(self) -> list[int]:
        import psutil

        return [pid for pid in self.daemon_pids()[1:] if 'worker' in ' '.join(psutil.Process(pid).cmdline())]

    def kill_daemon(self) -> list[int]:
        """SIGKILL the arbiter first (it would respawn workers), then its children: a crash, no clean shutdown."""
        pids = self.daemon_pids()
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return pids

    # -- database --
    def sql(self, query: str, parameters=()) -> list[tuple]:
        import psycopg

        config = self.storage
        with psycopg.connect(host=config['database_hostname'], port=config['database_port'],
                             dbname=config['database_name'], user=config['database_username'],
                             password=config['database_password']) as connection:
            return connection.execute(query, parameters).fetchall()

    def count_pw(self, state: str = 'finished', after: int = 0) -> int:
        return self.sql('SELECT count(*) FROM db_dbnode WHERE process_type = %s AND id > %s '
                        "AND attributes->>'process_state' = %s", (PW_PROCESS_TYPE, after, state))[0][0]

    def max_pk(self) -> int:
        return self.sql('SELECT coalesce(max(id), 0) FROM db_dbnode')[0][0]

    def states(self, pks) -> dict:
        """{(process_state, exit_status): count} of the nodes ``pks``."""
        rows = self.sql("SELECT attributes->>'process_state', attributes->>'exit_status', count(*) FROM db_dbnode "
                        'WHERE id = ANY(%s) GROUP BY 1, 2', (list(pks),))
        return {(state, status): count for state, status, count in rows}

    def wait_terminated(self, pks, timeout: float) -> dict:
        """Poll until every node of ``pks`` is finished, excepted or killed; the state counts."""
        deadline = time.monotonic() + timeout
        while True:
            states = self.states(pks)
            if sum(count for (state, _), count in states.items() if state in ('finished', 'excepted', 'killed')) \
                    == len(pks):
                return states
            if time.monotonic() > deadline:
                raise TimeoutError(f'not all of {len(pks)} processes terminated in {timeout} s: {states}')
            time.sleep(0.5)

    def pw_runs(self) -> list[tuple[str, str]]:
        """(start|end, job folder) lines written around every real pw.x execution of the counted code."""
        if not self.pw_log.exists():
            return []
        return [tuple(line.split(' ', 1)) for line in self.pw_log.read_text().splitlines() if line.strip()]

    @property
    def prefix(self) -> str:
        """What AiiDA's RabbitMQ broker prefixes to the profile's queue and exchanges."""
        config = json.loads((self.aiida_path / '.aiida' / 'config.json').read_text())
        return f'aiida-{config["profiles"][self.name]["PROFILE_UUID"]}'

    @property
    def launch_queue(self) -> str:
        return f'{self.prefix}.process.queue'

    # -- teardown --
    def delete(self):
        """Stop the daemon, delete the profile, drop database and role, remove the RabbitMQ queue and exchanges."""
        from aiida_mlip.setup.environment import PostgresServer

        if (self.aiida_path / '.aiida' / 'config.json').exists():
            self.stop_daemon()
            self.kill_daemon()  # whatever did not stop
            config = json.loads((self.aiida_path / '.aiida' / 'config.json').read_text())
            uuid = config.get('profiles', {}).get(self.name, {}).get('PROFILE_UUID')
            self._run(BIN / 'verdi', 'profile', 'delete', '--force', '--delete-data', self.name, check=False,
                      timeout=120)
            if uuid:
                delete_rabbitmq_entities(f'aiida-{uuid}')
        if self.storage:
            PostgresServer().drop_database(self.storage['database_name'])
        shutil.rmtree(self.aiida_path, ignore_errors=True)


def delete_rabbitmq_entities(prefix: str):
    """AiiDA leaves a profile's durable task queue and its exchanges on the server: remove them."""
    import asyncio

    import aio_pika

    async def delete():
        connection = await aio_pika.connect('amqp://guest:guest@127.0.0.1:5672/')
        async with connection:
            channel = await connection.channel()
            await channel.queue_delete(f'{prefix}.process.queue')
            for exchange in ('messages', 'tasks'):
                await channel.exchange_delete(f'{prefix}.{exchange}')

    asyncio.run(delete())


def rabbitmq_queue_message_count(name: str) -> int | None:
    """Messages waiting in queue ``name`` of the local server; None when the queue does not exist."""
    import asyncio

    import aio_pika
    from aiormq.exceptions import ChannelNotFoundEntity

    async def probe():
        connection = await aio_pika.connect('amqp://guest:guest@127.0.0.1:5672/')
        async with connection:
            channel = await connection.channel()
            try:
                queue = await channel.declare_queue(name, passive=True)
            except ChannelNotFoundEntity:
                return None
            return queue.declaration_result.message_count

    return asyncio.run(probe())


# ---- the driver: runs INSIDE the production profile ----------------------------------------------------------------

#: Cheap DFT for the daemon tests (Si, fixed occupations): each pw.x of Si2 well under a second.
TINY_DFT = {'kpoints_distance': 1.0, 'pw': {'parameters': {'SYSTEM': {'ecutwfc': 12.0, 'ecutrho': 48.0}}}}
FAMILY = 'PBE-QE-local'  # what `aiida-mlip setup` builds


def _counted_code(log: str):
    """pw.x wrapped by lines that log every real execution (start and end, with the job folder)."""
    from aiida import orm
    from aiida.common.exceptions import NotExistent

    from aiida_mlip.setup.environment import THREAD_LINES, ensure_localhost, find_pw_executable

    try:
        return orm.load_code(f'{COUNTED_PW}@localhost')
    except NotExistent:
        pass
    return orm.InstalledCode(
        label=COUNTED_PW, computer=ensure_localhost(), filepath_executable=find_pw_executable(),
        default_calc_job_plugin='quantumespresso.pw', with_mpi=False,
        description='pw.x that logs each execution (production tests)',
        prepend_text='\n'.join([*THREAD_LINES, f'echo "start $PWD" >> {log}']),
        append_text=f'echo "end $PWD" >> {log}',
    ).store()


def _labeling_builder(structures: dict, dft: dict, **overrides):
    from aiida import orm
    from aiida_quantumespresso.common.types import ElectronicType

    from aiida_mlip.workflows.labeling import DftLabelingWorkChain

    builder = DftLabelingWorkChain.get_builder_from_protocol(
        f'{COUNTED_PW}@localhost', structures, protocol='fast', pseudo_family=FAMILY,
        overrides={'pw_base': dft, **overrides}, electronic_type=ElectronicType.INSULATOR,
    )
    builder.conv_thr_per_atom = orm.Float(1e-7)
    return builder


def _si(atoms_count: int, scale: float = 1.0, rattle: float = 0.0, seed: int = 0):
    from aiida import orm
    from ase.build import bulk

    atoms = bulk('Si', 'diamond', a=5.43 * scale, cubic=atoms_count == 8)
    if rattle:
        atoms.rattle(rattle, seed=seed)
    return orm.StructureData(ase=atoms)


def _wait(node, poll: float = 1.0):
    while not node.is_terminated:
        time.sleep(poll)
    return node


def action_frames(pk: str) -> dict:
    """Per structure key of labeling ``pk`` (or of the one labeling of campaign ``pk``): the PwCalculations that
    ran for it (pk, state, exit status, cache source, job folder)."""
    from aiida import orm
    from aiida.common.links import LinkType

    labeling = orm.load_node(int(pk))
    models = []
    if labeling.process_label == 'CampaignWorkChain':
        models = sorted(labeling.outputs.models) if 'models' in labeling.outputs else []
        labeling = next(node for node in labeling.called if node.process_label == 'DftLabelingWorkChain')
    frames = {}
    for link in labeling.base.links.get_outgoing(link_type=LinkType.CALL_WORK).all():
        frames[link.link_label.removeprefix('label_')] = [
            {'pk': calc.pk, 'uuid': calc.uuid, 'state': calc.process_state.value, 'exit_status': calc.exit_status,
             'sealed': calc.is_sealed, 'cached_from': calc.base.extras.get('_aiida_cached_from', None),
             'remote_folder': 'remote_folder' in calc.outputs, 'folder': calc.get_remote_workdir()}
            for calc in link.node.called if calc.process_type == PW_PROCESS_TYPE
        ]
    dataset = labeling.outputs.dataset if 'dataset' in labeling.outputs else None
    finished = [calc for calcs in frames.values() for calc in calcs if calc['state'] == 'finished']
    return {'labeling': labeling.pk, 'ok': labeling.is_finished_ok, 'frames': frames, 'models': models,
            'unsealed': [calc['pk'] for calc in finished if not calc['sealed']],
            'uuids': {key: calc['uuid'] for key, calcs in frames.items() for calc in calcs
                      if calc['state'] == 'finished' and calc['exit_status'] == 0},
            'no_remote_folder': sorted(key for key, calcs in frames.items()
                                       if any(c['state'] == 'finished' and not c['remote_folder'] for c in calcs)),
            'dropped': sorted(labeling.outputs.quality_report['dropped']) if 'quality_report' in labeling.outputs
            else None,
            'salvaged': sorted(key for key, warnings in labeling.outputs.quality_report['warnings'].items()
                               if any('remote_folder output is missing' in warning for warning in warnings))
            if 'quality_report' in labeling.outputs else None,
            'n_frames': dataset.n_frames if dataset else 0,
            'energies': [frame.info['REF_energy'] for frame in dataset.to_ase()] if dataset else []}


def action_rerun(pk: str) -> dict:
    """Submit the same labeling again (its restart builder: the very input nodes) to the daemon; its pk."""
    from aiida import orm
    from aiida.engine import submit

    return {'pk': submit(orm.load_node(int(pk)).get_builder_restart()).pk}


def action_labeling(count: str) -> dict:
    """Submit ONE labeling of ``count`` distinct rattled Si2 to the daemon; its pk."""
    from aiida.engine import submit

    structures = {f'si2_{index}': _si(2, rattle=0.05, seed=500 + index) for index in range(int(count))}
    return {'pk': submit(_labeling_builder(structures, TINY_DFT)).pk}


def action_load(count: str) -> dict:
    """Submit ``count`` one-structure labelings of distinct rattled Si2 to the daemon; their pks."""
    from aiida.engine import submit

    builder = _labeling_builder({'si2': _si(2)}, TINY_DFT)  # one builder: its shared inputs are stored once
    pks = []
    for index in range(int(count)):
        builder.structures = {'si2': _si(2, rattle=0.05, seed=1000 + index)}
        pks.append(submit(builder).pk)
    return {'pks': pks}


def main(argv):
    from aiida import load_profile

    profile, action, *args = argv
    load_profile(profile)
    if action == 'counted-code':
        result = {'code': _counted_code(*args).full_label}
    else:
        result = {'frames': action_frames, 'rerun': action_rerun, 'labeling': action_labeling,
                  'load': action_load}[action](*args)
    print(json.dumps(result), flush=True)


if __name__ == '__main__':
    main(sys.argv[1:])


@pytest.fixture(scope='module')
def production_profile(tmp_path_factory):
    """A fresh PostgreSQL + RabbitMQ profile made by `aiida-mlip setup`, daemon with 2 workers; always torn down."""
    from .conftest import require_pw

    require_pw()
    require_services()
    profile = ProductionProfile(tmp_path_factory.mktemp('production'))
    queue = None
    try:
        start = time.perf_counter()
        profile.setup_output = profile.setup()
        queue = profile.launch_queue
        profile.start_daemon(2)
        profile.setup_seconds = time.perf_counter() - start
        yield profile
    finally:
        profile.delete()
    # Nothing of the profile survives: no database, no role, no queue.
    from aiida_mlip.setup.environment import PostgresServer

    postgres = PostgresServer().connect()
    database = f'aiida-{profile.name}'
    assert not postgres.db_exists(database) and not postgres.dbuser_exists(database)
    assert queue is None or rabbitmq_queue_message_count(queue) is None
