"""FineTuningWorkChain: one real iteration of the foundation fine-tuning loop with pw.x and MACE, and its validators.

The foundation is the tiny Si model of the `trained` fixture (no network here: MACE-MP cannot be downloaded), fine-tuned
in naive mode on Si2 (same element: allowed). One iteration: MD at 3 volumes, 2 frames per volume (6 pw.x single
points), 5 epochs of fine-tuning, EOS validation against a DFT reference computed once, and the zero-shot /
fine-tuned / from-scratch comparison.
"""
import math

import numpy as np
import pytest
from aiida import engine, orm
from aiida.common.links import LinkType

from aiida_mlip.data.dataset import TrainingSet
from aiida_mlip.data.model import MlipModel
from aiida_mlip.workflows.finetune import (
    FineTuningWorkChain, farthest_point_indices, failed_sections, next_sampling,
)

from .conftest import TEST_FAMILY, TEST_PW_OVERRIDES, count_calcjobs
from .fixtures_mlip import (  # noqa: F401  (fixtures)
    mlip_codes, si_dataset, si_splits, trained, untrained_si_ge, write_untrained_mace,
)

PW_PROCESS_TYPE = 'aiida.calculations:quantumespresso.pw'


def diamond(element='Si', a=5.45):
    from ase.build import bulk

    return orm.StructureData(ase=bulk(element, 'diamond', a=a))


def finetune_builder(foundation, structure, pw_code, mlip_codes, **overrides):  # noqa: F811
    return FineTuningWorkChain.get_builder_from_protocol(
        foundation, structure, pw_code, mlip_codes['mace_train'], mlip_codes['evaluate'], mlip_codes['md'],
        TEST_FAMILY, protocol='fast', overrides={'labeling': {'pw_base': TEST_PW_OVERRIDES}, **overrides})


# ---- pure functions ------------------------------------------------------------------------------------------
def test_next_sampling_rule():
    volumes, temperatures = [-0.05, 0.0, 0.05], [300.0]
    new_volumes, new_temperatures, frames, reasons = next_sampling(['eos'], volumes, temperatures, 10)
    assert new_volumes == [-0.075, -0.05, 0.05, 0.075] and new_temperatures == [300.0] and frames == 10
    _, new_temperatures, _, _ = next_sampling(['elastic'], volumes, temperatures, 10)
    assert new_temperatures == [300.0, 450.0]
    new_volumes, _, frames, _ = next_sampling(['phonons'], volumes, temperatures, 10)
    assert new_volumes == volumes and frames == 20
    new_volumes, _, frames, reasons = next_sampling([], volumes, temperatures, 10)
    assert new_volumes == volumes and frames == 10 and 'new MD seed' in reasons[0]
    assert failed_sections({'checks': {'eos.v0_error_percent': False, 'phonons.mae_thz': True}}) == ['eos']


def test_farthest_point_sampling_is_seeded_and_spreads():
    features = np.array([[0.0], [0.1], [0.2], [5.0], [10.0]])
    first = farthest_point_indices(features, 3, np.random.default_rng(1))
    assert first == farthest_point_indices(features, 3, np.random.default_rng(1))
    assert {3, 4} <= set(first) or {0, 4} <= set(first)  # the extremes are always reached
    assert farthest_point_indices(features, 9, np.random.default_rng(1)) == [0, 1, 2, 3, 4]


# ---- validators: refused before any CalcJob -------------------------------------------------------------------
@pytest.fixture(scope='module')
def untrained_si(tmp_path_factory):
    return MlipModel.from_file(write_untrained_mace(tmp_path_factory.mktemp('models') / 'si.model')).store()


def test_naive_finetuning_on_a_new_element_is_refused(untrained_si, pw_code, pseudo_family, mlip_codes):  # noqa: F811
    before = count_calcjobs()
    with pytest.raises(ValueError, match=r'naive fine-tuning cannot add elements.*contains Ge'):
        finetune_builder(untrained_si, diamond('Ge', 5.65), pw_code, mlip_codes)
    builder = finetune_builder(untrained_si, diamond(), pw_code, mlip_codes)
    builder.structure = diamond('Ge', 5.65)
    with pytest.raises(ValueError, match=r'contains Ge.*covers only Si'):
        engine.run(builder)
    assert count_calcjobs() == before


def test_multihead_needs_replay_and_two_elements(untrained_si, untrained_si_ge, pw_code, pseudo_family,  # noqa: F811
                                                 mlip_codes):
    before = count_calcjobs()
    builder = finetune_builder(MlipModel.from_file(untrained_si_ge).store(), diamond(), pw_code, mlip_codes)
    builder.finetune_mode = orm.Str('multihead')
    with pytest.raises(ValueError, match='needs `replay_dataset`'):
        engine.run(builder)
    builder = finetune_builder(untrained_si, diamond(), pw_code, mlip_codes)
    builder.finetune_mode = orm.Str('multihead')
    atoms = diamond().get_ase()
    atoms.info['REF_energy'] = -10.0
    builder.replay_dataset = TrainingSet.from_ase([atoms])
    with pytest.raises(ValueError, match='at least 2 elements'):
        engine.run(builder)
    builder = finetune_builder(untrained_si, diamond(), pw_code, mlip_codes)
    builder.frames_per_volume = orm.Int(10)
    with pytest.raises(ValueError, match='saves only 4 frame'):
        engine.run(builder)
    assert count_calcjobs() == before


# ---- one real iteration --------------------------------------------------------------------------------------
@pytest.fixture(scope='module')
def finetuned(trained, pw_code, pseudo_family, mlip_codes):  # noqa: F811
    foundation = trained[0]['model']
    builder = finetune_builder(foundation, diamond(), pw_code, mlip_codes, compare_with_scratch=True)
    results, node = engine.run_get_node(builder)
    print(f'\nFineTuningWorkChain<{node.pk}>: {(node.mtime - node.ctime).total_seconds():.0f} s wall')  # shown with -s
    return foundation, results, node


def test_outputs_and_provenance_reach_foundation_and_pw(finetuned):
    foundation, results, node = finetuned
    assert node.is_finished_ok, (node.exit_status, node.exit_message)
    assert {'model', 'dataset', 'comparison', 'iterations', 'scratch_model'} <= set(results)
    assert list(results['iterations']) == ['iteration_01']
    dataset = results['dataset']
    assert dataset.n_frames == 6  # 3 volumes x 2 frames
    assert sorted(dataset.config_types) == ['md_v+0', 'md_v+30', 'md_v-30']

    model = results['model']
    training = model.creator
    assert training.process_type == 'aiida.calculations:mlip.mace_train'
    assert training.inputs.foundation_model.uuid == foundation.uuid
    assert training.inputs.finetune.value == 'naive'
    query = orm.QueryBuilder().append(orm.Node, filters={'id': model.pk}, tag='model')
    query.append(orm.CalcJobNode, with_descendants='model', filters={'process_type': PW_PROCESS_TYPE}, project='uuid')
    pw_ancestors = set(query.all(flat=True))
    assert len(dataset.source_uuids) == 6 and set(dataset.source_uuids) <= pw_ancestors
    # Each labeled frame came out of the sampling MD: structure <- select_md_frames <- MlipMdCalculation.
    md_runs = [n for n in node.called_descendants if n.process_type == 'aiida.calculations:mlip.md']
    assert len(md_runs) == 1 and md_runs[0].outputs.summary['n_runs'] == 3  # ONE MD job: 3 volumes x 1 T
    assert md_runs[0].inputs.models.foundation.uuid == foundation.uuid


def test_comparison_has_three_models_with_finite_numbers(finetuned):
    _, results, _ = finetuned
    comparison = results['comparison'].get_dict()
    for name in ('zero_shot', 'finetuned', 'scratch'):
        test = comparison[name]['test']
        assert test['n_frames'] >= 1
        for key in ('energy_rmse_mev_per_atom', 'forces_rmse_mev_per_a', 'stress_rmse_mev_per_a3'):
            assert math.isfinite(test[key]) and test[key] >= 0, (name, key, test)
        validation = comparison[name]['validation']
        assert validation['passed'] in (True, False)
        assert 'eos' in validation
        numbers = [v for v in validation['eos'].values() if isinstance(v, float)]
        assert validation['eos'].get('model_failed') or (numbers and all(map(math.isfinite, numbers)))
    assert comparison['n_labels'] == 6 and comparison['n_iterations'] == 1
    iteration = results['iterations']['iteration_01'].get_dict()
    assert iteration['n_new_labels'] == 6 and iteration['validation']['passed'] in (True, False)


def test_dft_reference_is_computed_once(finetuned):
    _, _, node = finetuned
    eos_runs = [n for n in node.called_descendants if n.process_label == 'EquationOfStateWorkChain']
    dft_runs = [n for n in eos_runs
                if any(label.startswith('dft__') for label in n.base.links.get_incoming().all_link_labels())]
    assert len(dft_runs) == 1  # by the zero-shot validation; the fine-tuned and scratch validations reuse it
    assert len(eos_runs) == 4  # mlip: zero-shot, fine-tuned, scratch; dft: once
    validations = {n.base.links.get_incoming(link_type=LinkType.CALL_WORK).one().link_label: n for n in node.called
                   if n.process_label == 'ValidationWorkChain'}
    assert sorted(validations) == ['validate_iteration_01', 'validate_scratch', 'validate_zero_shot']
    reference = validations['validate_zero_shot'].outputs.dft.eos.uuid
    for label in ('validate_iteration_01', 'validate_scratch'):
        assert validations[label].inputs.reference.eos.uuid == reference
    pw_runs = [n for n in node.called_descendants if n.process_type == PW_PROCESS_TYPE]
    eos_points = [n for n in dft_runs[0].called_descendants if n.process_type == PW_PROCESS_TYPE]
    assert len(pw_runs) == 6 + len(eos_points)  # the labels + one DFT EOS scan, nothing else
