"""MaceTrainCalculation with the real mace_run_train on a Si dataset labeled with the real pw.x.

Checked: a tiny model trains and predicts; metrics and learning curve are parsed from mace's own files; bad
options and impossible fine-tuning are refused before any CalcJob node exists; a diverging run ends with 320;
naive fine-tuning and a restart from checkpoints run for real; parser exit codes on synthetic retrieved folders.
"""
import io
import math

import numpy as np
import pytest
from aiida import engine, orm
from aiida.common.links import LinkType

from aiida_mlip.calculations.mace_train import MaceTrainCalculation, mace_parameters_problem
from aiida_mlip.data.dataset import TrainingSet
from aiida_mlip.data.model import MlipModel
from aiida_mlip.parsers.mace_train import MaceTrainParser, first_divergence, parse_error_tables

from .conftest import count_calcjobs
from .fixtures_mlip import (  # noqa: F401
    TINY_PARAMETERS, mlip_codes, si_dataset, si_splits, train_builder, trained, untrained_si_ge,
)

pytestmark = [pytest.mark.pw, pytest.mark.mace]

TINY_EPOCHS = TINY_PARAMETERS['max_num_epochs']


def test_training_produces_a_usable_model(trained, si_splits):
    results, node = trained
    assert node.is_finished_ok, (node.exit_status, node.exit_message)
    model = results['model']
    assert isinstance(model, MlipModel) and model.is_stored
    assert model.elements == ['Si'] and model.origin == 'trained'
    assert len(model.sha256) == 64 and model.verify() == model.sha256
    assert model.r_max == pytest.approx(4.0) and model.dtype == 'float32'
    assert model.base.attributes.get('mace_version') == '0.3.16'
    assert model.creator.pk == node.pk  # provenance: the model's creator is the training job

    metrics = results['metrics'].get_dict()
    for split in ('train', 'valid', 'test'):
        for key in ('rmse_e_per_atom', 'rmse_f', 'rmse_stress'):
            assert math.isfinite(metrics[split][key]) and metrics[split][key] >= 0, (split, key)
    assert metrics['units']['rmse_f'] == 'meV/Å'
    assert 0 <= metrics['best_epoch'] < TINY_EPOCHS and metrics['epochs_completed'] == TINY_EPOCHS
    assert math.isfinite(metrics['valid_at_best_epoch']['rmse_f'])

    curve = results['learning_curve']
    epochs = curve.get_array('epoch')
    assert len(epochs) >= 1 and list(epochs) == list(range(-1, TINY_EPOCHS))
    assert np.all(np.isfinite(curve.get_array('valid_loss')))
    assert np.all(np.isfinite(curve.get_array('train_loss')[1:]))
    # Training lowers the validation loss compared with the untrained model.
    assert curve.get_array('valid_loss')[1:].min() < curve.get_array('valid_loss')[0]

    # The stored file loads with torch and predicts a finite energy, through the verified copy.
    from ase.build import bulk
    from mace.calculators import MACECalculator

    with model.open_verified() as path:
        calculator = MACECalculator(model_paths=str(path), device='cpu', default_dtype='float32')
        atoms = bulk('Si', 'diamond', a=5.43)
        atoms.calc = calculator
        energy = atoms.get_potential_energy()
    assert math.isfinite(energy)
    reference = [f for f in si_splits['train'].to_ase() if len(f) == 2 and f.info['config_type'] == 'volume']
    # Same energy scale as the DFT (eV, E0 of the isolated atom included); 10 epochs of a tiny model do not learn
    # the ~5 eV/atom cohesive energy, so only the scale is checked, the accuracy is in `metrics`.
    assert abs(energy / 2 - reference[0].info['REF_energy'] / 2) < 8.0


def test_job_folder_holds_the_data_not_paths(trained):
    _, node = trained
    retrieved = node.outputs.retrieved
    names = retrieved.base.repository.list_object_names()
    assert {'model.model', 'logs', 'results', 'checkpoints', 'mace.out', 'mace.err'} <= set(names)
    checkpoints = retrieved.base.repository.list_object_names('checkpoints')
    assert checkpoints and all(name.endswith('.pt') for name in checkpoints)
    command = node.base.repository.get_object_content('_aiidasubmit.sh')
    assert "'-m' 'mace.cli.run_train'" in command and "'--train_file=train.xyz'" in command
    assert "'--device=cpu'" in command and "'--energy_key=REF_energy'" in command
    assert 'export OMP_NUM_THREADS=' in command
    # The isolated atom is in train.xyz (it defines E0), not in valid.xyz.
    assert 'IsolatedAtom' in node.base.repository.get_object_content('train.xyz')
    assert 'IsolatedAtom' not in node.base.repository.get_object_content('valid.xyz')


def test_unknown_option_is_refused_before_any_process(mlip_codes, si_splits):
    before = count_calcjobs()
    message = r'unknown MACE option `num_chanels` \(did you mean `num_channels`\?\)'
    with pytest.raises(ValueError, match=message):  # already when the builder receives the parameters
        train_builder(mlip_codes['mace_train'], si_splits, parameters={'num_chanels': 8})
    inputs = {'code': mlip_codes['mace_train'], 'train': si_splits['train'],
              'parameters': orm.Dict({'num_chanels': 8, 'batch_size': 2})}
    with pytest.raises(ValueError, match=message):  # and when a process is launched with plain inputs
        engine.run_get_node(MaceTrainCalculation, **inputs)
    assert count_calcjobs() == before


@pytest.mark.parametrize('parameters, message', [
    ({'train_file': 'x.xyz'}, 'cannot be set in parameters'),
    ({'device': 'cuda'}, 'metadata.options.device'),
    ({'max_num_epochs': 'many'}, "invalid int value: 'many'"),
    ({'statistics_file': 'stats.json'}, 'names a file on the submitting machine'),
    ({'--seed': 3}, 'without the leading dashes'),
    ({'batch_size': 50}, 'batch_size 50 is larger than'),
])
def test_bad_parameters_are_refused(mlip_codes, si_splits, parameters, message):
    before = count_calcjobs()
    with pytest.raises(ValueError, match=message):
        engine.run_get_node(train_builder(mlip_codes['mace_train'], si_splits, parameters=parameters))
    assert count_calcjobs() == before


def test_parameter_check_matches_mace_parser():
    assert mace_parameters_problem({'num_channels': 8, 'max_L': 0, 'swa': True, 'keep_checkpoints': True}) is None
    assert 'invalid choice' in mace_parameters_problem({'default_dtype': 'float16'})
    assert 'max_L must be non-negative' in mace_parameters_problem({'num_channels': 8, 'max_L': -1})
    assert 'flag without value' in mace_parameters_problem({'keep_checkpoints': 'yes'})


def ge_dataset(n_frames=6, with_isolated=False):
    """Tiny unstored Ge(+Si) set with made-up labels: only for refusals, which never run anything."""
    from ase import Atoms
    from ase.build import bulk

    frames = []
    for index in range(n_frames):
        atoms = bulk('Ge', 'diamond', a=5.66 + 0.01 * index)
        atoms[0].symbol = 'Si' if index % 2 else 'Ge'
        atoms.info['REF_energy'] = -200.0 - index
        atoms.arrays['REF_forces'] = np.zeros((2, 3))
        frames.append(atoms)
    if with_isolated:
        for symbol, energy in (('Si', -100.0), ('Ge', -200.0)):
            atom = Atoms(symbol, cell=[10, 10, 10], pbc=False)
            atom.info.update(REF_energy=energy, config_type='IsolatedAtom')
            frames.append(atom)
    return TrainingSet.from_ase(frames)


def test_naive_finetuning_cannot_add_an_element(mlip_codes, trained):
    foundation = trained[0]['model']
    builder = MaceTrainCalculation.get_builder()
    builder.code = mlip_codes['mace_train']
    builder.train = ge_dataset()
    builder.parameters = orm.Dict({'batch_size': 2, 'max_num_epochs': 1})
    builder.foundation_model = foundation
    builder.finetune = orm.Str('naive')
    before = count_calcjobs()
    with pytest.raises(ValueError, match=r'naive fine-tuning cannot add elements.*contains Ge'):
        engine.run_get_node(builder)
    assert count_calcjobs() == before


def test_multihead_needs_replay_and_two_elements(mlip_codes, trained, si_splits):
    foundation = trained[0]['model']
    builder = train_builder(mlip_codes['mace_train'], si_splits, foundation_model=foundation,
                            finetune=orm.Str('multihead'))
    with pytest.raises(ValueError, match='needs replay data'):
        engine.run_get_node(builder)
    builder.replay_dataset = si_splits['test']
    with pytest.raises(ValueError, match='at least 2 elements'):
        engine.run_get_node(builder)
    builder = train_builder(mlip_codes['mace_train'], si_splits, finetune=orm.Str('naive'))
    with pytest.raises(ValueError, match='without a `foundation_model`'):
        engine.run_get_node(builder)


def test_e0s_must_cover_the_elements(mlip_codes):
    builder = MaceTrainCalculation.get_builder()
    builder.code = mlip_codes['mace_train']
    builder.train = ge_dataset()
    builder.parameters = orm.Dict({'batch_size': 2})
    builder.e0s = orm.Dict({'Si': -100.0})
    with pytest.raises(ValueError, match='e0s has no energy for Ge'):
        engine.run_get_node(builder)
    builder.e0s = orm.Dict({'Si': -100.0, 'Ge': -200.0})
    builder.parameters = orm.Dict({'batch_size': 2, 'E0s': 'average'})
    with pytest.raises(ValueError, match='either as the `e0s` input or as `E0s`'):
        engine.run_get_node(builder)


def test_code_for_another_plugin_is_refused(pw_code, si_splits):
    builder = train_builder(pw_code, si_splits)
    with pytest.raises(ValueError, match='needs a python code for `mlip.mace_train`'):
        engine.run_get_node(builder)


def dry_run(builder, directory):
    """prepare_for_submission only: the job folder and script, nothing stored, nothing run.

    AiiDA writes dry runs to ``submit_test/`` in the current directory: run it from ``directory``.
    """
    import contextlib
    import pathlib

    builder.metadata.dry_run = True
    with contextlib.chdir(directory):
        _, node = engine.run_get_node(builder)
    folder = pathlib.Path(node.dry_run_info['folder'])
    return folder, (folder / node.dry_run_info['script_filename']).read_text()


def test_e0s_input_and_multihead_command_line(mlip_codes, si_splits, untrained_si_ge, tmp_path):
    import hashlib

    builder = train_builder(mlip_codes['mace_train'], si_splits, e0s=orm.Dict({'Si': -101.5}))
    folder, script = dry_run(builder, tmp_path)
    assert "'--E0s={14: -101.5}'" in script
    assert 'IsolatedAtom' not in (folder / 'train.xyz').read_text()  # it would override the given E0s
    assert "config_type=test" in (folder / 'test.xyz').read_text()

    foundation = MlipModel.from_file(untrained_si_ge).store()
    builder = train_builder(mlip_codes['mace_train'], si_splits, foundation_model=foundation,
                            finetune=orm.Str('multihead'), replay_dataset=si_splits['valid'])
    folder, script = dry_run(builder, tmp_path)
    assert "'--multiheads_finetuning=True'" in script and "'--pt_train_file=replay.xyz'" in script
    assert "'--foundation_model=foundation.model'" in script and '--E0s' not in script  # E0 from IsolatedAtom
    assert hashlib.sha256((folder / 'foundation.model').read_bytes()).hexdigest() == foundation.sha256
    assert 'IsolatedAtom' in (folder / 'train.xyz').read_text()


def test_diverging_training_ends_with_nan_exit_code(mlip_codes, si_splits):
    builder = train_builder(mlip_codes['mace_train'], si_splits, parameters={'lr': 1e6, 'max_num_epochs': 1})
    results, node = engine.run_get_node(builder)
    assert node.exit_status == MaceTrainCalculation.exit_codes.ERROR_NAN_LOSS.status, node.exit_message
    assert 'model' not in results  # a NaN model is not offered as a result
    assert 'learning_curve' in results  # ... but what happened is kept
    assert 'NaN' in node.exit_message


def test_naive_finetuning_and_restart_run_for_real(mlip_codes, trained, si_splits):
    first_results, first_node = trained
    foundation = first_results['model']
    # Naive fine-tuning of the trained Si model on the same Si data (mace: --foundation_model, no multihead).
    builder = train_builder(mlip_codes['mace_train'], si_splits, foundation_model=foundation,
                            finetune=orm.Str('naive'))
    fixed_by_foundation = ('model', 'num_channels', 'max_L', 'r_max', 'num_interactions')
    builder.parameters = orm.Dict({key: value for key, value in {**TINY_PARAMETERS, 'max_num_epochs': 2}.items()
                                   if key not in fixed_by_foundation})
    results, node = engine.run_get_node(builder)
    assert node.is_finished_ok, (node.exit_status, node.exit_message)
    command = node.base.repository.get_object_content('_aiidasubmit.sh')
    assert "'--foundation_model=foundation.model'" in command and "'--multiheads_finetuning=False'" in command
    tuned = results['model']
    assert tuned.sha256 != foundation.sha256 and tuned.elements == ['Si']
    assert tuned.r_max == foundation.r_max  # the foundation's architecture is kept
    log = node.outputs.retrieved.base.repository.get_object_content(
        [f'logs/{n}' for n in node.outputs.retrieved.base.repository.list_object_names('logs')
         if not n.endswith('_debug.log')][0])
    assert 'Using foundation model foundation.model as initial checkpoint' in log

    # Restart from the first run's retrieved checkpoints: training continues at the checkpoint's epoch.
    best = first_results['metrics']['best_epoch']  # the checkpoint mace kept is that of the best epoch
    builder = train_builder(mlip_codes['mace_train'], si_splits, parameters={'max_num_epochs': best + 2},
                            restart_folder=first_node.outputs.retrieved)
    results, node = engine.run_get_node(builder)
    assert node.is_finished_ok, (node.exit_status, node.exit_message)
    assert "'--restart_latest'" in node.base.repository.get_object_content('_aiidasubmit.sh')
    epochs = results['learning_curve'].get_array('epoch')
    assert list(epochs) == [-1, best, best + 1]  # resumed at the checkpoint's epoch, not from epoch 0


# ---- parser exit codes on synthetic retrieved folders (no training needed) -----------------------------------
def parse_synthetic(localhost, files: dict, exit_status=None):
    """Run MaceTrainParser on a CalcJobNode whose `retrieved` holds ``files`` ({path: bytes})."""
    node = orm.CalcJobNode(computer=localhost, process_type='aiida.calculations:mlip.mace_train')
    node.set_option('resources', {'num_machines': 1})
    node.store()
    if exit_status is not None:
        node.set_exit_status(exit_status)
    retrieved = orm.FolderData()
    for path, content in files.items():
        retrieved.base.repository.put_object_from_filelike(io.BytesIO(content), path)
    retrieved.base.links.add_incoming(node, link_type=LinkType.CREATE, link_label='retrieved')
    retrieved.store()
    results, calcfunction = MaceTrainParser.parse_from_node(node, store_provenance=False)
    return results, calcfunction.exit_status, calcfunction.exit_message


def retrieved_files(node, skip=()):
    retrieved = node.outputs.retrieved
    files = {}
    for top in retrieved.base.repository.list_object_names():
        children = (retrieved.base.repository.list_object_names(top)
                    if retrieved.base.repository.get_object(top).file_type.name == 'DIRECTORY' else None)
        for path in ([f'{top}/{c}' for c in children] if children is not None else [top]):
            if path not in skip:
                files[path] = retrieved.base.repository.get_object_content(path, mode='rb')
    return files


def test_parser_walltime_exit_code_keeps_checkpoints(localhost, trained):
    files = retrieved_files(trained[1], skip=('model.model',))
    codes = MaceTrainCalculation.exit_codes
    results, status, message = parse_synthetic(localhost, files, codes.ERROR_SCHEDULER_OUT_OF_WALLTIME.status)
    assert status == codes.ERROR_OUT_OF_WALLTIME.status
    assert 'restart with `restart_folder`' in message and '1 checkpoint(s)' in message
    assert 'learning_curve' in results


def test_parser_missing_log_missing_model_and_exception(localhost, trained):
    codes = MaceTrainCalculation.exit_codes
    assert parse_synthetic(localhost, {'mace.out': b''})[1] == codes.ERROR_OUTPUT_LOG_MISSING.status
    files = retrieved_files(trained[1], skip=('model.model',))
    assert parse_synthetic(localhost, files)[1] == codes.ERROR_NO_MODEL_WRITTEN.status
    traceback = b'Traceback (most recent call last):\n  File "x", line 1\nRuntimeError: out of memory\n'
    _, status, message = parse_synthetic(localhost, {'mace.err': traceback})
    assert status == codes.ERROR_MACE_EXCEPTION.status and 'RuntimeError: out of memory' in message


def test_error_table_and_nan_detection_from_mace_text():
    log = '\n'.join([
        '2026-01-01 00:00:00.000 INFO: Epoch 0: head: Default, loss=     nan, RMSE_E_per_atom=     nan meV',
        '2026-01-01 00:00:00.000 INFO: Error-table on TRAIN and VALID:',
        '+---------------+---------------------+------------------+-------------------+',
        '|  config_type  | RMSE E / meV / atom | RMSE F / meV / A | relative F RMSE % |',
        '+---------------+---------------------+------------------+-------------------+',
        '| train_Default |          131.5      |        201.9     |         17.76     |',
        '| valid_Default |            nan      |         58.0     |         10.58     |',
        '+---------------+---------------------+------------------+-------------------+',
        '2026-01-01 00:00:00.000 INFO: Done',
    ])
    tables = parse_error_tables(log)
    assert tables['train_valid']['train_Default'] == {'rmse_e_per_atom': 131.5, 'rmse_f': 201.9, 'rel_rmse_f': 17.76}
    assert math.isnan(tables['train_valid']['valid_Default']['rmse_e_per_atom'])
    assert first_divergence([], log) == 0
    assert first_divergence([{'mode': 'opt', 'epoch': 3, 'loss': float('inf')}]) == 3
    assert first_divergence([{'mode': 'eval', 'epoch': None, 'loss': 1.0, 'rmse_f': 0.1}]) is None
