"""Jobs through a real SLURM: the one-node cluster of scripts/slurm_local.sh, aiida-core's ``core.slurm`` scheduler.

Each job is checked in SLURM's own record (the jobcomp file slurmctld writes, tests/slurm_fixtures.py), not only in
AiiDA: the state SLURM gave it and the time limit SLURM enforced, set from ``metadata.options.max_wallclock_seconds``
(SLURM counts time limits in minutes, rounded up). The walltime test lets SLURM kill a job at its real time limit:
slurmctld checks limits every 30 s, so a 1-minute limit ends the job 60-90 s after it started. That job is handed to
the engine's event loop first and waits in SLURM while the labelings (local, direct, over SSH) run, so the module
costs the longest of them, not their sum: the tests that need it come after the labelings. So does a training job
that SLURM ends at its limit and that continues from its checkpoint in a second job.
"""
import asyncio
import math
import os
import pathlib
import subprocess
import sys
import time

import pytest
from aiida import engine, orm

from .conftest import TEST_FAMILY, TEST_PW_OVERRIDES, require_pw
from .fixtures_mlip import TINY_PARAMETERS, freeze_training_at_a_checkpoint
from .fixtures_mlip import si_dataset, si_splits  # noqa: F401  (fixtures)
from .slurm_fixtures import record_seconds, slurm_cluster, slurm_computer  # noqa: F401  (fixtures)
from .ssh_fixtures import make_ssh_computer, ssh_server  # noqa: F401  (fixture)

SCRIPT = pathlib.Path(sys.executable).with_name('aiida-mlip')
#: The labeling's pw.x time limit: 300 s becomes SLURM's TimeLimit=5 (minutes).
LABEL_WALLTIME = 300
#: Epochs of the training that SLURM's time limit interrupts (a few seconds each for the tiny model).
TRAINING_EPOCHS = 12


def pw_jobs(workflow) -> list:
    plugin = 'aiida.calculations:quantumespresso.pw'
    return [node for node in workflow.called_descendants if node.process_type == plugin]


def label_si2(code, options=None):
    from ase.build import bulk

    from aiida_mlip.workflows.labeling import DftLabelingWorkChain

    si2 = orm.StructureData(ase=bulk('Si', 'diamond', a=5.43 * 0.97))
    builder = DftLabelingWorkChain.get_builder_from_protocol(
        code, {'si2': si2}, protocol='fast', pseudo_family=TEST_FAMILY, overrides={'pw_base': TEST_PW_OVERRIDES},
        options=options,
    )
    start = time.perf_counter()
    results, node = engine.run_get_node(builder)
    return results, node, time.perf_counter() - start


@pytest.fixture(scope='module')
def walltime_job(slurm_computer, pseudo_family):  # noqa: F811
    """A PwCalculation that sleeps past its 1-minute SLURM limit, submitted to this process's runner (no daemon): it
    runs on the event loop of whatever the tests run next. The sleep is before pw.x (prepend_text): what is tested is
    SLURM's limit, and the job costs no CPU while it waits."""
    require_pw()
    from aiida.manage import get_manager
    from ase.build import bulk

    from aiida_mlip.setup.environment import ensure_pw_code

    code = ensure_pw_code(slurm_computer)
    si2 = orm.StructureData(ase=bulk('Si', 'diamond', a=5.43))
    kpoints = orm.KpointsData()
    kpoints.set_kpoints_mesh([2, 2, 2])
    builder = code.get_builder()
    builder.structure = si2
    builder.kpoints = kpoints
    builder.pseudos = pseudo_family.get_pseudos(structure=si2)
    builder.parameters = orm.Dict({'CONTROL': {'calculation': 'scf'},
                                   'SYSTEM': {'ecutwfc': 20.0, 'ecutrho': 160.0}})
    builder.metadata.options = {'resources': {'num_machines': 1}, 'max_wallclock_seconds': 60, 'withmpi': False,
                                'prepend_text': 'sleep 600'}
    return get_manager().get_runner().submit(builder), time.perf_counter()


def wait_until_terminated(node, timeout: float = 240.0):
    """Turn the runner's event loop until ``node`` ends (the tests' processes run on it; there is no daemon)."""
    from aiida.manage import get_manager

    loop = get_manager().get_runner().loop
    deadline = time.monotonic() + timeout
    while not node.is_terminated:
        assert time.monotonic() < deadline, f'{node.process_label}<{node.pk}> not done after {timeout} s'
        loop.run_until_complete(asyncio.sleep(0.5))


@pytest.fixture(scope='module')
def slurm_and_direct_labels(walltime_job, training_past_its_time_limit, slurm_computer, slurm_cluster, pw_code,  # noqa: F811
                            pseudo_family):
    """The same Si2 label through SLURM and through the direct scheduler (the overhead of one against the other).
    The two jobs that wait for SLURM's time limit are submitted first, so that they wait while these run."""
    require_pw()
    from aiida_mlip.setup.environment import ensure_pw_code

    slurm_pw = ensure_pw_code(slurm_computer)
    slurm = label_si2(slurm_pw, {'max_wallclock_seconds': LABEL_WALLTIME})
    direct = label_si2(pw_code, {'max_wallclock_seconds': LABEL_WALLTIME})
    return slurm, direct


@pytest.mark.pw
def test_pw_label_runs_as_a_slurm_job_recorded_completed_with_its_time_limit(
        slurm_and_direct_labels, slurm_cluster, slurm_computer):  # noqa: F811
    (results, node, seconds), (direct_results, direct_node, direct_seconds) = slurm_and_direct_labels
    assert node.is_finished_ok, node.exit_message
    assert results['dataset'].n_frames == 1
    [job] = pw_jobs(node)
    assert job.is_finished_ok and job.computer.uuid == slurm_computer.uuid
    assert job.computer.scheduler_type == 'core.slurm'

    record = slurm_cluster.record(job.get_job_id())
    assert record['JobState'] == 'COMPLETED', record
    assert record['ExitCode'] == '0:0'
    assert int(record['TimeLimit']) == math.ceil(LABEL_WALLTIME / 60)  # minutes, from max_wallclock_seconds
    assert record['Partition'] == 'debug'
    assert record['WorkDir'] == job.outputs.remote_folder.get_remote_path()
    assert record['Name'] == f'aiida-{job.pk}'

    # Same pw.x, same inputs: the label through SLURM is the label of the direct run.
    assert direct_node.is_finished_ok, direct_node.exit_message
    [direct_job] = pw_jobs(direct_node)
    assert job.outputs.output_parameters['energy'] == pytest.approx(
        direct_job.outputs.output_parameters['energy'], abs=1e-6)
    timings = {
        'slurm_labeling_s': round(seconds, 1), 'direct_labeling_s': round(direct_seconds, 1),
        'slurm_calcjob_s': round((job.mtime - job.ctime).total_seconds(), 1),
        'direct_calcjob_s': round((direct_job.mtime - direct_job.ctime).total_seconds(), 1),
        'slurm_queue_wait_s': record_seconds(record, 'SubmitTime', 'StartTime'),
        'slurm_run_s': record_seconds(record, 'StartTime', 'EndTime'),
    }
    print(f'SLURM vs direct, one Si2 pw.x label: {timings}')


@pytest.fixture(scope='module')
def ssh_slurm_computer(aiida_profile, ssh_server, slurm_cluster, tmp_path_factory):  # noqa: F811
    """The second case: the same cluster reached over SSH (the test sshd of tests/ssh_fixtures.py, ``core.ssh``), as a
    cluster's login node is; ``sbatch`` there finds the cluster through /etc/slurm/slurm.conf."""
    computer = make_ssh_computer(ssh_server, f'ssh-slurm-{ssh_server.port}', 'core.slurm',
                                 tmp_path_factory.mktemp('ssh_slurm'))
    computer.set_minimum_job_poll_interval(0.1)
    return computer


@pytest.mark.pw
def test_pw_label_through_slurm_over_ssh(ssh_slurm_computer, ssh_server, slurm_cluster, pseudo_family):  # noqa: F811
    require_pw()
    from aiida_mlip.setup.environment import ensure_pw_code

    results, node, seconds = label_si2(ensure_pw_code(ssh_slurm_computer), {'max_wallclock_seconds': 120})
    assert node.is_finished_ok, node.exit_message
    [job] = pw_jobs(node)
    assert job.get_transport().__class__.__name__ == 'SshTransport'
    record = slurm_cluster.record(job.get_job_id())
    assert record['JobState'] == 'COMPLETED' and record['TimeLimit'] == '2', record
    assert record['WorkDir'] == job.outputs.remote_folder.get_remote_path()
    assert ssh_server.accepted_logins() >= 1
    print(f'SLURM over SSH, one Si2 pw.x label: {seconds:.1f} s')


#: The campaign's `resources` time limits per kind of job (seconds; SLURM's TimeLimit is in minutes): distinct, so
#: that SLURM's record tells which setting reached which job.
CAMPAIGN_WALLTIMES = {'pw': 240, 'mace_train': 420, 'evaluate': 180}


@pytest.mark.pw
def test_a_campaign_runs_every_job_through_slurm_with_the_time_limit_of_its_resources(slurm_computer, slurm_cluster,  # noqa: F811
                                                                                     pseudo_family):
    """A one-class campaign (pw.x labels, a tiny model, its test-split scoring, an EOS validation against its own DFT)
    with `codes` on the SLURM computer and a `resources` section: every CalcJob is a SLURM job COMPLETED in SLURM's
    record, with the time limit of its kind."""
    require_pw()
    from aiida_mlip.campaigns.builder import build_campaign
    from aiida_mlip.campaigns.schema import check_campaign
    from aiida_mlip.setup.environment import ensure_mlip_codes, ensure_pw_code

    codes = {'pw': ensure_pw_code(slurm_computer), **ensure_mlip_codes(slurm_computer)}
    campaign = check_campaign({
        'name': 'slurm_campaign', 'pseudo_family': TEST_FAMILY,
        'codes': {key: codes[key].full_label for key in ('pw', 'mace_train', 'evaluate', 'md')},
        'resources': {kind: {'max_wallclock_seconds': seconds} for kind, seconds in CAMPAIGN_WALLTIMES.items()},
        'dft': {'ecutwfc': 20.0, 'ecutrho': 160.0, 'kpoints_distance': 0.6},
        'classes': {'silicon': {'materials': [{'formula': 'Si', 'prototype': 'diamond', 'a': 5.45}]}},
        'sampling': {'volumes': [-0.04, 0.04], 'rattle': {'amplitude': 0.06, 'count': 2, 'seed': 7}},
        'training': {'protocol': 'fast', 'split_fractions': {'train': 0.6, 'valid': 0.2, 'test': 0.2},
                     'mace': {'max_num_epochs': 2, 'batch_size': 2, 'valid_batch_size': 2}},
        'validation': {'protocol': 'fast', 'properties': ['eos']},
    }, 'slurm_campaign.yaml')
    start = time.perf_counter()
    results, node = engine.run_get_node(build_campaign(campaign, 'slurm_campaign.yaml'))
    seconds = time.perf_counter() - start
    assert node.is_finished_ok, (node.exit_status, node.exit_message)

    plugins = {'quantumespresso.pw': 'pw', 'mlip.mace_train': 'mace_train', 'mlip.evaluate': 'evaluate'}
    jobs = [job for job in node.called_descendants if isinstance(job, orm.CalcJobNode)]
    kinds = {job.pk: plugins[job.process_type.split(':')[-1]] for job in jobs}
    assert sorted(set(kinds.values())) == ['evaluate', 'mace_train', 'pw'], kinds
    for job in jobs:
        assert job.computer.uuid == slurm_computer.uuid, job
        record = slurm_cluster.record(job.get_job_id())
        limit = math.ceil(CAMPAIGN_WALLTIMES[kinds[job.pk]] / 60)
        assert (record['JobState'], record['TimeLimit']) == ('COMPLETED', str(limit)), (kinds[job.pk], record)
    counts = {kind: list(kinds.values()).count(kind) for kind in CAMPAIGN_WALLTIMES}
    print(f'campaign through SLURM: {len(jobs)} jobs {counts}, {seconds:.0f} s')


@pytest.mark.pw
def test_a_job_past_its_slurm_time_limit_ends_with_the_walltime_exit_code(walltime_job, slurm_cluster):  # noqa: F811
    """SLURM kills the job at its real 1-minute limit; core.slurm's parse_output reads slurmstepd's CANCELLED ... DUE TO
    TIME LIMIT from the job's stderr and the PwCalculation ends with 120 (ERROR_SCHEDULER_OUT_OF_WALLTIME)."""
    job, submitted = walltime_job
    wait_until_terminated(job)
    seconds = time.perf_counter() - submitted

    assert job.exit_status == 120, (job.exit_status, job.exit_message)
    assert job.exit_status == job.process_class.exit_codes.ERROR_SCHEDULER_OUT_OF_WALLTIME.status
    record = slurm_cluster.record(job.get_job_id())
    assert record['JobState'] == 'TIMEOUT', record
    assert record['TimeLimit'] == '1'
    ran = record_seconds(record, 'StartTime', 'EndTime')
    assert 60 <= ran <= 120, record  # killed at the limit (checked every 30 s), long before the sleep's end
    stderr = job.outputs.retrieved.base.repository.get_object_content(job.get_option('scheduler_stderr'))
    assert 'DUE TO TIME LIMIT' in stderr
    print(f'SLURM time limit: job ran {ran:.0f} s of its 60 s limit, AiiDA saw exit 120 {seconds:.0f} s after '
          'submission')


@pytest.fixture(scope='module')
def training_past_its_time_limit(slurm_computer, si_splits):  # noqa: F811
    """A MaceTrainBaseWorkChain on the SLURM computer whose first job freezes at a complete checkpoint and waits for
    SLURM's 1-minute limit (no CPU spent while it waits), submitted to this process's runner like `walltime_job`."""
    from aiida.manage import get_manager

    from aiida_mlip.setup.environment import ensure_mlip_codes
    from aiida_mlip.workflows.mace_train_base import MaceTrainBaseWorkChain

    builder = MaceTrainBaseWorkChain.get_builder()
    builder.mace.code = ensure_mlip_codes(slurm_computer)['mace_train']
    builder.mace.train, builder.mace.valid = si_splits['train'], si_splits['valid']
    builder.mace.parameters = orm.Dict({**TINY_PARAMETERS, 'max_num_epochs': TRAINING_EPOCHS})
    builder.mace.metadata.options = {'resources': {'num_machines': 1, 'num_mpiprocs_per_machine': 1},
                                     'max_wallclock_seconds': 60,
                                     'custom_scheduler_commands': freeze_training_at_a_checkpoint(4)}
    return get_manager().get_runner().submit(builder)


@pytest.mark.pw
@pytest.mark.mace
def test_training_killed_at_its_slurm_time_limit_continues_from_its_checkpoint(training_past_its_time_limit,
                                                                               slurm_cluster):  # noqa: F811
    """SLURM ends the first training job at its limit (TIMEOUT in its record); core.slurm reads that from the job's
    stderr, the parser keeps the checkpoints (exit 400) and the handler continues from them in a second SLURM job."""
    from aiida_mlip.calculations.mace_train import MaceTrainCalculation

    node = training_past_its_time_limit
    wait_until_terminated(node, timeout=300)
    assert node.is_finished_ok, (node.exit_status, node.exit_message)
    killed, *later = sorted((c for c in node.called if c.process_label == 'MaceTrainCalculation'), key=lambda c: c.pk)
    record = slurm_cluster.record(killed.get_job_id())
    assert (record['JobState'], record['TimeLimit']) == ('TIMEOUT', '1'), record
    assert killed.exit_status == MaceTrainCalculation.exit_codes.ERROR_OUT_OF_WALLTIME.status, killed.exit_message
    assert killed.outputs.retrieved.base.repository.list_object_names('checkpoints')
    [resumed] = later
    assert resumed.inputs.restart_folder.uuid == killed.outputs.retrieved.uuid
    assert slurm_cluster.record(resumed.get_job_id())['JobState'] == 'COMPLETED'
    epochs = list(resumed.outputs.learning_curve.get_array('epoch'))
    assert epochs[1] > 0 and epochs[-1] == TRAINING_EPOCHS - 1  # picked up at the checkpoint, ran to the end
    print(f'training through SLURM: killed after {record_seconds(record, "StartTime", "EndTime"):.0f} s of its 60 s '
          f'limit, resumed at epoch {epochs[1]:.0f}')


def test_a_computer_label_taken_by_another_scheduler_is_refused(aiida_profile):
    """``localhost`` is the direct computer: asking for it with SLURM is an error, not a silent change."""
    from aiida_mlip.setup.environment import ensure_localhost

    ensure_localhost()
    with pytest.raises(ValueError, match='exists with core.local \\+ core.direct, not core.local \\+ core.slurm'):
        ensure_localhost('localhost', scheduler='core.slurm')
    with pytest.raises(ValueError, match='not supported here'):
        ensure_localhost(scheduler='core.pbspro')


def run_setup(*args, aiida_path, **env):
    environ = {key: value for key, value in os.environ.items() if key not in ('AIIDA_PATH', 'AIIDA_MLIP_PROFILE')}
    environ.update(AIIDA_PATH=str(aiida_path), **env)
    return subprocess.run([str(SCRIPT), 'setup', *args], capture_output=True, text=True, env=environ, timeout=300)


@pytest.mark.pw
def test_setup_scheduler_slurm_makes_the_slurm_computer_and_codes(slurm_cluster, tmp_path):  # noqa: F811
    require_pw()
    first = run_setup('--scheduler', 'slurm', '--no-pseudos', aiida_path=tmp_path)
    assert first.returncode == 0, first.stderr
    assert 'computer `localhost-slurm`: ready (core.local, core.slurm)' in first.stdout
    assert 'debug (default) up' in first.stdout
    for code in ('pw', 'mace-train', 'mlip-evaluate', 'mlip-md', 'mlip-relax'):
        assert f'code `{code}@localhost-slurm`' in first.stdout, first.stdout
    assert '@localhost`' not in first.stdout  # the direct computer is not touched
    second = run_setup('--scheduler', 'slurm', '--no-pseudos', aiida_path=tmp_path)
    assert second.returncode == 0 and 'profile `aiida-mlip`: exists' in second.stdout, second.stderr


def test_setup_scheduler_slurm_refuses_a_cluster_that_does_not_answer(slurm_cluster, tmp_path):  # noqa: F811
    """No SLURM at the configuration named: a clear error and nothing created (the probe runs first). With the
    cluster up (the fixture), so that it is the configuration, not a missing sinfo, that is refused."""
    missing = tmp_path / 'no-such-slurm.conf'
    result = run_setup('--scheduler', 'slurm', aiida_path=tmp_path / 'config', SLURM_CONF=str(missing))
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert str(missing) in result.stderr and 'slurm_local.sh start' in result.stderr
    assert not (tmp_path / 'config').exists()
