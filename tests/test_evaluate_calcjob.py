"""``mlip.evaluate``: the real CalcJob on localhost with tiny real MACE models, its validator, parser and fan-in."""
from __future__ import annotations

import json

import numpy as np
import pytest

from tests.conftest import count_calcjobs
from tests.evaluate_fixtures import (  # noqa: F401  (fixtures are used by name)
    evaluate_code, make_structures, mlip_models, rattled_si, si_structures, tiny_mace_files,
)

pytestmark = pytest.mark.mace


def _in_process(model_paths, atoms_list, batch_size=8):
    """The engine called directly (same model files, same structures): the reference for the CalcJob."""
    from aiida_mlip.engine.evaluate import evaluate, load_models

    return evaluate(load_models(model_paths), atoms_list, batch_size=batch_size)


def _run(code, models, **inputs):
    from aiida.engine import run_get_node

    from aiida_mlip.calculations.evaluate import MlipEvaluateCalculation

    builder = MlipEvaluateCalculation.get_builder()
    builder.code = code
    builder.models = models
    for name, value in inputs.items():
        setattr(builder, name, value)
    builder.metadata.options.max_wallclock_seconds = 600
    _, node = run_get_node(builder)
    return node


def test_single_model_matches_engine_and_maps_back(evaluate_code, mlip_models, si_structures, tiny_mace_files):
    from aiida_mlip.calculations.evaluate import split_outputs

    model = {'tiny': mlip_models['seed1']}
    node = _run(evaluate_code, model, structures=si_structures)
    assert node.is_finished_ok, (node.exit_status, node.exit_message)

    summary = node.outputs.summary.get_dict()
    keys = sorted(si_structures)
    assert summary['keys'] == keys
    assert summary['n_structures'] == 6 and summary['n_models'] == 1
    assert summary['model_keys'] == ['tiny']
    assert summary['model_sha256'] == [mlip_models['seed1'].sha256]
    assert summary['wall_seconds'] > 0
    assert 'committee' not in node.outputs

    # ONE job folder with ONE structure file holding every structure, in sorted-key order.
    retrieved = node.outputs.retrieved
    assert json.loads(retrieved.base.repository.get_object_content('structure_keys.json'))['keys'] == keys
    names = set(retrieved.base.repository.list_object_names())
    assert {'results.npz', 'results.json', 'engine.err', '_scheduler-stderr.txt'} <= names
    assert retrieved.base.repository.get_object_content('engine.exit_code').strip() == '0'

    atoms_sorted = [si_structures[key].get_ase() for key in keys]
    reference = _in_process([tiny_mace_files[0]], atoms_sorted)
    energies = node.outputs.energies.get_array('energies')
    assert energies.shape == (1, 6)
    np.testing.assert_allclose(energies, reference['energies'], atol=1e-5, rtol=0)
    forces = node.outputs.forces.get_array('forces')
    np.testing.assert_allclose(forces, np.concatenate(reference['forces'], axis=1), atol=1e-5, rtol=0)
    np.testing.assert_allclose(node.outputs.stresses.get_array('stresses'), reference['stresses'], atol=1e-6, rtol=0)

    # Fan-in: every key gets the numbers of ITS structure (evaluated alone, in-process).
    per_key = split_outputs(node.outputs)
    assert list(per_key) == keys
    for key, structure in si_structures.items():
        alone = _in_process([tiny_mace_files[0]], [structure.get_ase()], batch_size=1)
        assert per_key[key]['n_atoms'] == len(structure.sites)
        assert per_key[key]['energy'] == pytest.approx(float(alone['energies'][0, 0]), abs=1e-4)
        np.testing.assert_allclose(per_key[key]['forces'], alone['forces'][0][0], atol=1e-4)
        assert per_key[key]['stress'].shape == (3, 3)
        assert 'energy_std' not in per_key[key]


def test_committee_on_dataset(evaluate_code, mlip_models, tiny_mace_files):
    from aiida import orm

    from aiida_mlip.calculations.evaluate import split_outputs
    from aiida_mlip.data.dataset import TrainingSet

    frames = rattled_si(5, seed=99, sizes=(2, 8))
    dataset = TrainingSet.from_ase(frames).store()
    node = _run(evaluate_code, mlip_models, dataset=dataset, compute_stress=orm.Bool(False), batch_size=orm.Int(2))
    assert node.is_finished_ok, (node.exit_status, node.exit_message)

    summary = node.outputs.summary.get_dict()
    assert summary['keys'] == list(range(5)) and summary['source'] == 'dataset'
    assert summary['n_models'] == 2 and summary['model_keys'] == ['seed1', 'seed2']
    assert 'stresses' not in node.outputs

    reference = _in_process(tiny_mace_files, frames)
    np.testing.assert_allclose(node.outputs.energies.get_array('energies'), reference['energies'], atol=1e-5, rtol=0)

    committee = node.outputs.committee
    energy_std = committee.get_array('energy_std')
    max_dev = committee.get_array('max_force_deviation')
    assert energy_std.shape == (5,) and max_dev.shape == (5,)
    assert np.all(np.isfinite(energy_std)) and np.all(energy_std > 0)
    assert np.all(np.isfinite(max_dev)) and np.all(max_dev > 0)
    np.testing.assert_allclose(energy_std, reference['energy_std'], atol=1e-5)
    np.testing.assert_allclose(max_dev, reference['max_force_deviation'], atol=1e-5)
    assert summary['max_energy_std'] == pytest.approx(float(energy_std.max()))

    per_frame = split_outputs(node.outputs)
    assert list(per_frame) == [0, 1, 2, 3, 4]
    for index in range(5):
        assert per_frame[index]['energies'].shape == (2,)
        assert per_frame[index]['energy_std'] == pytest.approx(float(energy_std[index]), abs=1e-9)
        assert per_frame[index]['max_force_deviation'] == pytest.approx(float(max_dev[index]), abs=1e-6)
        assert per_frame[index]['stress'] is None


def test_missing_element_refused_before_any_node(evaluate_code, mlip_models, si_structures):
    from aiida import orm
    from ase.build import bulk

    structures = dict(si_structures)
    structures['z_ge'] = orm.StructureData(ase=bulk('Ge', 'diamond', a=5.66))
    before = count_calcjobs()
    with pytest.raises(ValueError) as excinfo:
        _run(evaluate_code, mlip_models, structures=structures)
    assert count_calcjobs() == before
    message = str(excinfo.value)
    assert 'Ge' in message and 'seed1' in message and 'z_ge' in message


def test_validator_messages(mlip_models, si_structures):
    from aiida import orm

    from aiida_mlip.calculations.evaluate import validate_inputs
    from aiida_mlip.data.dataset import TrainingSet

    dataset = TrainingSet.from_ase(rattled_si(2, seed=3))
    assert validate_inputs({'models': mlip_models, 'structures': si_structures}) is None
    assert validate_inputs({'models': mlip_models, 'dataset': dataset}) is None
    assert 'at least one model' in validate_inputs({'models': {}, 'structures': si_structures})
    assert 'not both' in validate_inputs({'models': mlip_models, 'structures': si_structures, 'dataset': dataset})
    assert 'nothing to evaluate' in validate_inputs({'models': mlip_models, 'structures': {}})
    assert 'nothing to evaluate' in validate_inputs({'models': mlip_models})
    message = validate_inputs({'models': mlip_models, 'structures': si_structures, 'threads': orm.Int(0)})
    assert 'threads' in message
    message = validate_inputs({'models': mlip_models, 'structures': si_structures, 'dtype': orm.Str('float16')})
    assert 'dtype' in message

    # The same element check is public for WorkChains that expose the calculation without `structures`.
    from ase.build import bulk

    from aiida_mlip.calculations.evaluate import check_models_cover

    assert check_models_cover(mlip_models, si_structures) is None
    message = check_models_cover(mlip_models, {'ge': orm.StructureData(ase=bulk('Ge', 'diamond', a=5.66))})
    assert 'Ge (in ge)' in message and 'seed1' in message and 'seed2' in message
    alloy = orm.StructureData(cell=[[5.43, 0, 0], [0, 5.43, 0], [0, 0, 5.43]])
    alloy.append_atom(position=(0, 0, 0), symbols=('Si', 'Ge'), weights=(0.5, 0.5), name='SiGe')
    assert 'alloy' in validate_inputs({'models': mlip_models, 'structures': {'alloy': alloy}})


def test_split_results_pure():
    from aiida_mlip.calculations.evaluate import split_results

    n_atoms = np.array([2, 1, 3])
    energies = np.array([[1.0, 2.0, 3.0], [1.2, 2.0, 2.8]])
    forces = np.arange(2 * 6 * 3, dtype=float).reshape(2, 6, 3)
    stresses = np.ones((2, 3, 3, 3))
    result = split_results({'energies': energies, 'forces': forces, 'n_atoms': n_atoms, 'stresses': stresses},
                           keys=['x', 'y', 'z'])
    assert list(result) == ['x', 'y', 'z']
    assert result['x']['energy'] == pytest.approx(1.1)
    assert result['x']['energy_std'] == pytest.approx(0.1)
    assert result['y']['energy_std'] == 0.0
    np.testing.assert_array_equal(result['y']['forces_per_model'], forces[:, 2:3])
    np.testing.assert_array_equal(result['z']['forces'], forces[:, 3:6].mean(axis=0))
    assert result['z']['n_atoms'] == 3 and result['z']['stress'].shape == (3, 3)
    assert result['z']['max_force_deviation'] == pytest.approx(9 * np.sqrt(3))  # models differ by 18 per component
    single = split_results({'energies': energies[:1], 'forces': forces[:1], 'n_atoms': n_atoms})
    assert list(single) == [0, 1, 2] and 'energy_std' not in single[0] and single[0]['stress'] is None
    with pytest.raises(ValueError, match='keys'):
        split_results({'energies': energies, 'forces': forces, 'n_atoms': n_atoms}, keys=['a'])
    with pytest.raises(ValueError, match='inconsistent'):
        split_results({'energies': energies, 'forces': forces[:, :5], 'n_atoms': n_atoms})


# ---- parser exit codes on hand-made retrieved folders (no job needed) --------------------------------------------

def _parse(localhost, files: dict):
    """Run the parser on a CalcJobNode whose ``retrieved`` folder holds ``files`` (name -> bytes)."""
    import io

    from aiida import orm
    from aiida.common.links import LinkType

    from aiida_mlip.parsers.evaluate import MlipEvaluateParser

    node = orm.CalcJobNode(computer=localhost, process_type='aiida.calculations:mlip.evaluate')
    node.set_option('resources', {'num_machines': 1, 'num_mpiprocs_per_machine': 1})
    node.store()
    retrieved = orm.FolderData()
    for name, content in files.items():
        retrieved.base.repository.put_object_from_filelike(io.BytesIO(content), name)
    retrieved.base.links.add_incoming(node, link_type=LinkType.CREATE, link_label='retrieved')
    retrieved.store()
    _, calcfunction = MlipEvaluateParser.parse_from_node(node, store_provenance=False)
    return calcfunction.exit_status, calcfunction.exit_message or ''


def test_parser_exit_codes(localhost):
    import io

    err = b'some torch warning\nERROR: elements not supported by the model: model 0 [Si] lacks Ge (structures 3)\n'
    status, message = _parse(localhost, {'engine.err': err, 'engine.exit_code': b'2\n'})
    assert status == 301 and 'Ge' in message

    # Without the exit status file the ERROR line still classifies the failure.
    err = b'ERROR: cannot read structures structures.extxyz: ValueError: bad line\n'
    assert _parse(localhost, {'engine.err': err})[0] == 303
    assert _parse(localhost, {'engine.err': b'ERROR: cannot read model m.model: EOFError\n',
                              'engine.exit_code': b'3'})[0] == 302
    status, message = _parse(localhost, {'engine.err': b'Traceback...\nRuntimeError: boom\n', 'engine.exit_code': b'1'})
    assert status == 304 and 'boom' in message

    status, message = _parse(localhost, {'engine.err': b'', 'engine.exit_code': b'0'})
    assert status == 300 and 'results.npz' in message

    buffer = io.BytesIO()
    np.savez(buffer, energies=np.zeros((1, 2)), forces=np.zeros((1, 3, 3)), n_atoms=np.array([1, 1]))
    files = {'results.npz': buffer.getvalue(), 'results.json': b'{"n_structures": 2, "n_models": 1}',
             'engine.exit_code': b'0'}
    status, message = _parse(localhost, files)
    assert status == 310 and 'forces' in message
    assert _parse(localhost, {**files, 'results.npz': b'PK\x03\x04garbage'})[0] == 310

    buffer = io.BytesIO()
    np.savez(buffer, energies=np.array([[np.nan, 1.0]]), forces=np.zeros((1, 2, 3)), n_atoms=np.array([1, 1]))
    assert _parse(localhost, {**files, 'results.npz': buffer.getvalue()})[0] == 311
