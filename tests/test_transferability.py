"""TransferabilityWorkChain for real: Si and Ge classes labeled with pw.x, committees of 2 tiny MACE models per class
and on both classes, every model on every class's test set (one evaluation job per test set), leave-one-class-out
(with two classes `without_si` is the Ge model: trained once), and the EOS validation of the Si and the all-class
model against pw.x (the DFT EOS computed once). Bad input is refused before any CalcJob.
"""
import math

import numpy as np
import pytest
from aiida import engine, orm
from aiida.common.links import LinkType

from aiida_mlip.data.dataset import TrainingSet
from aiida_mlip.data.model import MlipModel
from aiida_mlip.workflows.transferability import TransferabilityWorkChain, model_plan, unique_plan

from .conftest import TEST_FAMILY, TEST_PW_OVERRIDES, count_calcjobs
from .fixtures_mlip import mlip_codes, si_dataset, write_untrained_mace  # noqa: F401  (fixtures)

PW_PROCESS_TYPE = 'aiida.calculations:quantumespresso.pw'
EVALUATE_PROCESS_TYPE = 'aiida.calculations:mlip.evaluate'


def test_model_plan_and_aliases():
    plan = model_plan(['a', 'b'], train_all=True, leave_one_out=True)
    assert plan == {'a': ('a',), 'b': ('b',), 'all': ('a', 'b'), 'without_a': ('b',), 'without_b': ('a',)}
    assert unique_plan(plan) == {'a': 'a', 'b': 'b', 'all': 'all', 'without_a': 'b', 'without_b': 'a'}
    three = unique_plan(model_plan(['a', 'b', 'c'], train_all=False, leave_one_out=True))
    assert three == {'a': 'a', 'b': 'b', 'c': 'c', 'without_a': 'without_a', 'without_b': 'without_b',
                     'without_c': 'without_c'}


# ---- bad input: refused before any CalcJob --------------------------------------------------------------------
def fake_class(element, a, fingerprint, n_frames=6, isolated=False):
    """Frames with made-up labels: enough for the validators, which never look at the numbers."""
    from ase import Atoms
    from ase.build import bulk

    frames = []
    for index in range(n_frames):
        atoms = bulk(element, 'diamond', a=a * (1 + 0.01 * index))
        atoms.info['REF_energy'] = -100.0 - index
        atoms.arrays['REF_forces'] = np.zeros((2, 3))
        frames.append(atoms)
    if isolated:
        atom = Atoms(element, cell=[10.0] * 3, pbc=True)
        atom.info.update({'REF_energy': -50.0, 'config_type': 'IsolatedAtom'})
        atom.arrays['REF_forces'] = np.zeros((1, 3))
        frames.append(atom)
    return TrainingSet.from_ase(frames, fingerprint=fingerprint)


FINGERPRINT = {'functional': 'PBE', 'ecutwfc': 20.0, 'ecutrho': 160.0, 'kpoints_distance': 0.6}


def test_bad_input_is_refused_before_compute(mlip_codes, pw_code, pseudo_family, tmp_path):  # noqa: F811
    from ase.build import bulk

    si, ge = fake_class('Si', 5.43, FINGERPRINT), fake_class('Ge', 5.66, FINGERPRINT)
    before = count_calcjobs()

    def run(datasets, **kwargs):
        builder = TransferabilityWorkChain.get_builder_from_protocol(
            mlip_codes['mace_train'], mlip_codes['evaluate'], datasets, protocol='fast', **kwargs)
        engine.run(builder)

    with pytest.raises(ValueError, match='at least 2 classes in `datasets`, got 1: si'):
        run({'si': si})
    other = fake_class('Ge', 5.66, {**FINGERPRINT, 'ecutwfc': 40.0})
    with pytest.raises(ValueError, match=r"classes `si` and `ge` were labeled with different DFT settings "
                                         r"\(ecutwfc: 20.0 != 40.0\)"):
        run({'si': si, 'ge': other})
    with pytest.raises(ValueError, match='no class has an IsolatedAtom frame of Ge, Si'):
        run({'si': si, 'ge': ge})
    si_only = MlipModel.from_file(write_untrained_mace(tmp_path / 'si.model')).store()
    with pytest.raises(ValueError, match=r'model `si` \(member `member_0`, MlipModel<\d+>, elements Si\) lacks Ge, '
                                         r'which class `ge` contains'):
        run({'si': si, 'ge': ge}, models={'si': {'member_0': si_only}})
    with pytest.raises(ValueError, match='too few for a test set'):
        run({'si': si, 'ge': fake_class('Ge', 5.66, FINGERPRINT, n_frames=1)})
    complete = {name: fake_class(name.capitalize(), a, FINGERPRINT, isolated=True)
                for name, a in (('si', 5.43), ('ge', 5.66))}
    with pytest.raises(ValueError, match=r'batch_size 8 is larger than the 3 training frames of model `si`'):
        run(complete, overrides={'training': {'mace': {'batch_size': 8}}})
    cell = orm.StructureData(ase=bulk('Si', 'diamond', a=5.43))
    with pytest.raises(ValueError, match=r"validation: no DFT engine \(`dft`\) and no complete `reference`"):
        run(complete, validation={'structures': {'si': cell}})
    with pytest.raises(ValueError, match='`validation_structures.sige` is not a class'):
        run(complete, validation={'structures': {'sige': cell}, 'pw_code': pw_code, 'pseudo_family': TEST_FAMILY})
    assert count_calcjobs() == before


# ---- one real study --------------------------------------------------------------------------------------------
@pytest.fixture(scope='module')
def ge_class(pw_code, pseudo_family):
    """Ge2 at two volumes and four rattles, plus the isolated Ge atom: 7 pw.x single points."""
    from ase.build import bulk

    from aiida_mlip.calculations.sampling import rattle_structure, scale_volume
    from aiida_mlip.workflows.labeling import DftLabelingWorkChain

    ge2 = orm.StructureData(ase=bulk('Ge', 'diamond', a=5.66))
    structures = {f'volume_{i}': s for i, s in enumerate(scale_volume(ge2, orm.List([-0.04, 0.04])).values())}
    structures.update({f'rattle_{i}': s for i, s in enumerate(
        rattle_structure(ge2, orm.Float(0.08), orm.Int(4), orm.Int(7)).values())})
    builder = DftLabelingWorkChain.get_builder_from_protocol(
        pw_code, structures, protocol='fast', pseudo_family=TEST_FAMILY,
        overrides={'pw_base': TEST_PW_OVERRIDES, 'isolated_atoms': True})
    results, node = engine.run_get_node(builder)
    assert node.is_finished_ok, node.exit_message
    return results['dataset']


@pytest.fixture(scope='module')
def study(si_dataset, ge_class, mlip_codes, pw_code, pseudo_family):  # noqa: F811
    from ase.build import bulk

    builder = TransferabilityWorkChain.get_builder_from_protocol(
        mlip_codes['mace_train'], mlip_codes['evaluate'], {'si': si_dataset, 'ge': ge_class}, protocol='fast',
        overrides={'leave_one_out': True},
        validation={'structures': {'si': orm.StructureData(ase=bulk('Si', 'diamond', a=5.45))}, 'pw_code': pw_code,
                    'pseudo_family': TEST_FAMILY, 'dft_overrides': {'pw_base': TEST_PW_OVERRIDES}})
    results, node = engine.run_get_node(builder)
    print(f'\nTransferabilityWorkChain<{node.pk}>: {(node.mtime - node.ctime).total_seconds():.0f} s wall')
    matrix = results['matrix'].get_dict() if 'matrix' in results else {}
    for key in ('forces_rmse_mev_per_a', 'energy_rmse_mev_per_atom', 'committee_force_std_mev_per_a', 'calibration'):
        print(key, dict(zip(matrix.get('models', []), matrix.get(key, []))))
    print('out_of_class_ratio', matrix.get('out_of_class_ratio'))
    print('uncertainty', matrix.get('uncertainty'))
    print('leave_one_out', matrix.get('leave_one_out'))
    return results, node


def test_matrix_is_complete_and_finite(study):
    results, node = study
    assert node.is_finished_ok, (node.exit_status, node.exit_message)
    matrix = results['matrix'].get_dict()
    models = ['si', 'ge', 'all', 'without_si', 'without_ge']
    assert matrix['models'] == models and matrix['classes'] == ['si', 'ge']
    for key in ('energy_mae_mev_per_atom', 'energy_rmse_mev_per_atom', 'forces_mae_mev_per_a',
                'forces_rmse_mev_per_a', 'committee_force_std_mev_per_a', 'calibration'):
        assert np.array(matrix[key], dtype=float).shape == (5, 2), key
        assert all(value is not None and math.isfinite(value) and value >= 0 for row in matrix[key] for value in row)
    rmse = dict(zip(models, matrix['forces_rmse_mev_per_a']))
    assert rmse['without_si'] == rmse['ge'] and rmse['without_ge'] == rmse['si']  # the same (aliased) models
    assert matrix['committee_size'] == dict.fromkeys(models, 2)
    assert matrix['n_test_frames'] == {'si': results['test_sets']['si'].n_frames, 'ge': 2}

    ratios = matrix['out_of_class_ratio']['forces_rmse']
    assert set(ratios) == set(models)
    for model in ('si', 'ge'):
        assert ratios[model]['ratio'] > 0 and ratios[model]['in_class'] == rmse[model][models.index(model)]
    assert ratios['all']['ratio'] is None  # no class is called `all`
    uncertainty = matrix['uncertainty']
    assert uncertainty['n_evaluated'] == 2 and isinstance(uncertainty['rises'], bool)
    assert uncertainty['rises'] == all(uncertainty['per_model'][m]['ratio'] > 1 for m in ('si', 'ge'))
    left_out = matrix['leave_one_out']['forces_rmse']
    assert set(left_out) == {'si', 'ge'}
    assert left_out['si']['seen_by'] == 'all' and left_out['si']['left_out'] == rmse['ge'][0]
    assert left_out['si']['ratio'] == pytest.approx(rmse['ge'][0] / rmse['all'][0])
    with results['figures']['forces_rmse_heatmap'].open(mode='rb') as handle:
        assert handle.read(8) == b'\x89PNG\r\n\x1a\n'
    assert {'energy_rmse_heatmap', 'committee_force_std_heatmap'} <= set(results['figures'])


def test_one_evaluation_job_per_test_set_and_provenance(study, si_dataset, ge_class):  # noqa: F811
    results, node = study
    called = {link.link_label: link.node for link in node.base.links.get_outgoing(link_type=LinkType.CALL_CALC).all()}
    evaluations = {label: n for label, n in called.items() if n.process_type == EVALUATE_PROCESS_TYPE}
    assert sorted(evaluations) == ['evaluate_ge', 'evaluate_si']
    trained = {label: {member: model.uuid for member, model in members.items()}
               for label, members in results['models'].items()}
    assert trained['without_si'] == trained['ge'] and trained['without_ge'] == trained['si']
    distinct = {uuid for label in ('si', 'ge', 'all') for uuid in trained[label].values()}
    assert len(distinct) == 6
    for name, evaluation in evaluations.items():
        assert {model.uuid for model in evaluation.inputs.models.values()} == distinct  # all models, one job
        assert evaluation.inputs.dataset.uuid == results['test_sets'][name.split('_')[1]].uuid
    for members in results['models'].values():
        for model in members.values():
            assert model.elements == ['Ge', 'Si']  # every model knows both elements (shared isolated atoms)
    workflows = [link.link_label for link in node.base.links.get_outgoing(link_type=LinkType.CALL_WORK).all()]
    assert sorted(label for label in workflows if label.startswith('train_')) == ['train_all', 'train_ge', 'train_si']

    # matrix <- transferability_matrix <- evaluation outputs <- evaluation jobs <- models <- ... <- pw.x
    matrix = results['matrix']
    assert matrix.creator.process_label == 'transferability_matrix'
    query = orm.QueryBuilder().append(orm.Node, filters={'id': matrix.pk}, tag='matrix')
    query.append(orm.CalcJobNode, with_descendants='matrix', project='uuid', filters={'process_type': {
        'in': [PW_PROCESS_TYPE, EVALUATE_PROCESS_TYPE, 'aiida.calculations:mlip.mace_train']}})
    ancestors = set(query.all(flat=True))
    assert {n.uuid for n in evaluations.values()} <= ancestors
    assert set(si_dataset.source_uuids) | set(ge_class.source_uuids) <= ancestors  # every pw.x label


def test_validation_of_the_in_class_and_all_class_models(study):
    results, node = study
    assert sorted(results['validation']) == ['si'] and sorted(results['validation_all']) == ['si']
    for comparison in (results['validation']['si'], results['validation_all']['si']):
        assert 'eos' in comparison.get_dict() and comparison['verdict']['passed'] in (True, False)
    validations = {link.link_label: link.node
                   for link in node.base.links.get_outgoing(link_type=LinkType.CALL_WORK).all()
                   if link.node.process_label == 'ValidationWorkChain'}
    assert sorted(validations) == ['validate_all_on_si', 'validate_si_on_si']
    assert validations['validate_all_on_si'].inputs.reference.eos.uuid == \
        validations['validate_si_on_si'].outputs.dft.eos.uuid  # DFT EOS once
    pw_in_second = [n for n in validations['validate_all_on_si'].called_descendants if n.process_type == PW_PROCESS_TYPE]
    assert not pw_in_second
