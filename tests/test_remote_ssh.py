"""The pipeline on a remote computer: pw.x labeling, MACE training and MLIP evaluation through a real SSH transport.

An sshd on 127.0.0.1 is started by the test (tests/ssh_fixtures.py: own keys, own config, nothing in ``$HOME``);
the computer is ``core.ssh`` + ``core.direct`` with its work directory in a temporary folder, and the codes are
made with the same helpers ``aiida-mlip setup`` uses (``ensure_pw_code``, ``ensure_mlip_codes`` take a computer).
Every file goes up and comes back over SFTP. The parsers read only ``retrieved``: after the run the remote work
directory is deleted and every calculation is parsed again from its node, giving the same outputs.
"""
import shutil
import time

import numpy as np
import pytest
from aiida import engine, orm

from .conftest import TEST_FAMILY, TEST_PW_OVERRIDES, require_pw
from .ssh_fixtures import home_ssh_state, ssh_computer, ssh_server  # noqa: F401  (fixtures)

pytestmark = [pytest.mark.pw, pytest.mark.mace]

#: Tiny MACE for three frames split 1/1/1 (the `fast` protocol otherwise): a transport test, not an accuracy test.
MACE_OVERRIDES = {'max_num_epochs': 4, 'batch_size': 1, 'valid_batch_size': 1, 'seed': 1}


@pytest.fixture(scope='module')
def remote_run(ssh_computer, ssh_server, pseudo_family):  # noqa: F811
    """Label three rattled Si2 cells, train a tiny MACE on them and evaluate it on the test split, all over SSH."""
    require_pw()
    from ase.build import bulk

    from aiida_mlip.calculations.sampling import rattle_structure
    from aiida_mlip.setup.environment import ensure_mlip_codes, ensure_pw_code
    from aiida_mlip.workflows.labeling import DftLabelingWorkChain
    from aiida_mlip.workflows.training import TrainingWorkChain

    home_before = home_ssh_state()
    pw_code = ensure_pw_code(ssh_computer)
    codes = ensure_mlip_codes(ssh_computer)
    si2 = orm.StructureData(ase=bulk('Si', 'diamond', a=5.43))
    cells = rattle_structure(si2, orm.Float(0.08), orm.Int(3), orm.Int(5))
    timings = {}

    start = time.perf_counter()
    builder = DftLabelingWorkChain.get_builder_from_protocol(
        pw_code, dict(cells), protocol='fast', pseudo_family=TEST_FAMILY, overrides={'pw_base': TEST_PW_OVERRIDES},
    )
    labeling_results, labeling = engine.run_get_node(builder)
    timings['labeling'] = time.perf_counter() - start
    assert labeling.is_finished_ok, labeling.exit_message

    start = time.perf_counter()
    builder = TrainingWorkChain.get_builder_from_protocol(
        codes['mace_train'], labeling_results['dataset'], protocol='fast', evaluate_code=codes['evaluate'],
        overrides={'split_fractions': {'train': 0.34, 'valid': 0.33, 'test': 0.33}, 'mace': MACE_OVERRIDES},
    )
    training_results, training = engine.run_get_node(builder)
    timings['training_and_evaluation'] = time.perf_counter() - start
    print(f'remote (SSH) run timings: {timings}')
    return {
        'labeling': labeling, 'dataset': labeling_results['dataset'], 'training': training,
        'training_results': training_results, 'home_before': home_before, 'timings': timings,
    }


def calcjobs(*workflows) -> list:
    return [node for workflow in workflows for node in workflow.called_descendants
            if isinstance(node, orm.CalcJobNode)]


def test_labeling_training_and_evaluation_finish_on_the_ssh_computer(
        remote_run, ssh_computer, ssh_server):  # noqa: F811
    labeling, training = remote_run['labeling'], remote_run['training']
    assert labeling.is_finished_ok and training.is_finished_ok, training.exit_message
    dataset = remote_run['dataset']
    assert dataset.n_frames == 3 and dataset.elements == ['Si']

    jobs = calcjobs(labeling, training)
    plugins = sorted(job.process_type.rsplit(':', 1)[-1] for job in jobs)
    assert plugins == ['mlip.evaluate', 'mlip.mace_train'] + ['quantumespresso.pw'] * 3
    for job in jobs:
        assert job.is_finished_ok, (job.process_label, job.exit_status, job.exit_message)
        assert job.computer.uuid == ssh_computer.uuid
        assert job.get_transport().__class__.__name__ == 'SshTransport'
        remote = job.outputs.remote_folder.get_remote_path()
        assert remote.startswith(ssh_computer.get_workdir())
    assert ssh_server.accepted_logins() >= 1  # the files really went through the test's sshd

    results = remote_run['training_results']
    model = results['models']['member_0']
    assert model.creator.computer.uuid == ssh_computer.uuid and len(model.sha256) == 64
    metrics = results['test_metrics'].get_dict()
    assert metrics['n_frames'] == 1 and np.isfinite(metrics['forces_mev_per_a']['rmse'])
    # Lineage crosses the remote: the model's training set points at the pw.x runs on the SSH computer.
    for uuid in model.creator.inputs.train.source_uuids:
        assert orm.load_node(uuid).computer.uuid == ssh_computer.uuid


def test_parsers_read_only_the_retrieved_files(remote_run, ssh_computer):  # noqa: F811
    """Delete the remote work directory, parse every job again from its node: the same outputs come back."""
    from aiida.plugins import ParserFactory

    shutil.rmtree(ssh_computer.get_workdir())
    jobs = calcjobs(remote_run['labeling'], remote_run['training'])
    for job in jobs:
        parser = ParserFactory(job.get_option('parser_name'))
        results, parse = parser.parse_from_node(job, store_provenance=False)
        assert parse.is_finished_ok, (job.process_label, parse.exit_status, parse.exit_message)
        plugin = job.process_type.rsplit(':', 1)[-1]
        if plugin == 'quantumespresso.pw':
            assert results['output_parameters']['energy'] == pytest.approx(job.outputs.output_parameters['energy'])
            assert np.allclose(results['output_trajectory'].get_array('forces'),
                               job.outputs.output_trajectory.get_array('forces'))
        elif plugin == 'mlip.mace_train':
            assert results['model'].sha256 == job.outputs.model.sha256
            assert results['metrics']['best_epoch'] == job.outputs.metrics['best_epoch']
        else:
            assert np.array_equal(results['energies'].get_array('energies'),
                                  job.outputs.energies.get_array('energies'))
            assert np.array_equal(results['forces'].get_array('forces'), job.outputs.forces.get_array('forces'))


def test_nothing_was_written_to_home_ssh(remote_run):
    assert home_ssh_state() == remote_run['home_before']
