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
from aiida_mlip.analysis.refinement import failed_sections
from aiida_mlip.workflows.finetune import next_sampling, select_md_frames

from .conftest import count_calcjobs
from .fixtures_mlip import (  # noqa: F401  (fixtures)
    diamond, finetune_builder, finetuned, mlip_codes, pw_ancestors, si_dataset, si_splits, trained, untrained_si_ge,
    write_untrained_mace,
)

PW_PROCESS_TYPE = 'aiida.calculations:quantumespresso.pw'


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


def md_trajectory(amplitudes, seed=0):
    """A TrajectoryData of Si2 frames (step 0 = the ideal cell) displaced by the given amplitudes (Å)."""
    atoms = diamond().get_ase()
    rng = np.random.default_rng(seed)
    directions = rng.normal(size=(len(amplitudes), len(atoms), 3))
    positions = np.array([atoms.positions + a * d / np.linalg.norm(d) for a, d in zip(amplitudes, directions)])
    trajectory = orm.TrajectoryData()
    trajectory.set_trajectory(list(atoms.get_chemical_symbols()), positions, stepids=np.arange(len(amplitudes)) * 5,
                              cells=np.array([atoms.cell.array] * len(amplitudes)))
    return trajectory


def test_diverse_selection_uses_the_shared_descriptor_and_spreads(aiida_profile):
    """`diverse` = farthest-point sampling in aiida_mlip.analysis.selection's descriptor: seeded, never step 0,
    never the same frame twice, and it reaches the far frame that a random pick of 2 out of 8 would usually miss."""
    amplitudes = [0.0, 0.02, 0.021, 0.022, 0.023, 0.024, 0.025, 0.3]  # seven near-copies and one distorted frame
    runs = {'run_000': md_trajectory(amplitudes, 1), 'run_001': md_trajectory([0.0, 0.02, 0.021, 0.35], 2)}
    summary = orm.Dict({'runs': [{'key': 'run_000', 'structure_key': 'volume_00'},
                                 {'key': 'run_001', 'structure_key': 'volume_01'}]})
    settings = orm.Dict({'frames_per_volume': 2, 'selection': 'diverse', 'seed': 3})
    picked = select_md_frames(settings, summary, **runs)
    again = select_md_frames(settings, summary, **runs)
    assert sorted(picked) == ['volume_00_frame_00', 'volume_00_frame_01', 'volume_01_frame_00', 'volume_01_frame_01']
    for key, structure in picked.items():
        np.testing.assert_allclose(structure.get_ase().positions, again[key].get_ase().positions)
    for volume, trajectory in (('volume_00', runs['run_000']), ('volume_01', runs['run_001'])):
        chosen = [picked[f'{volume}_frame_{n:02d}'].get_ase().positions for n in range(2)]
        frames = trajectory.get_array('positions')
        indices = [int(np.argmin([np.abs(frame - p).max() for frame in frames])) for p in chosen]
        assert 0 not in indices and len(set(indices)) == 2  # step 0 is not a candidate; no frame twice
        assert len(frames) - 1 in indices  # the distorted frame is always among the two farthest-point picks


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


# ---- one real iteration (the `finetuned` fixture of fixtures_mlip.py, shared with test_query.py) ------------------
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
    # final model -> the dataset it was trained on (its split) -> EVERY PwCalculation of the labeling
    assert training.inputs.train.creator.process_label == 'split_dataset'
    assert training.inputs.train.creator.inputs.dataset.uuid == dataset.uuid
    labelings = [n for n in node.called if n.process_label == 'DftLabelingWorkChain']
    assert len(labelings) == 1
    labeling_pw = {n.uuid for n in labelings[0].called_descendants if n.process_type == PW_PROCESS_TYPE}
    assert len(labeling_pw) == 6 and labeling_pw == set(dataset.source_uuids)  # one pw.x per frame, no restart
    model_pw = pw_ancestors(model)
    assert labeling_pw <= model_pw
    # fine-tuned model -> its foundation -> the foundation's own pw.x labels (the `trained` fixture's dataset)
    foundation_pw = pw_ancestors(foundation)
    assert foundation_pw and foundation_pw <= model_pw
    assert model_pw == labeling_pw | foundation_pw  # nothing else: the EOS reference pw.x runs are not training data
    # the from-scratch model: the same dataset, no foundation
    scratch = results['scratch_model'].creator
    assert scratch.inputs.train.creator.inputs.dataset.uuid == dataset.uuid and 'foundation_model' not in scratch.inputs
    assert labeling_pw <= pw_ancestors(results['scratch_model'])
    # Each labeled frame came out of the sampling MD: structure <- select_md_frames <- MlipMdCalculation.
    md_runs = [n for n in node.called_descendants if n.process_type == 'aiida.calculations:mlip.md']
    assert len(md_runs) == 1 and md_runs[0].outputs.summary['n_runs'] == 3  # ONE MD job: 3 volumes x 1 T
    assert md_runs[0].inputs.models.foundation.uuid == foundation.uuid
    for uuid in labeling_pw:
        select = orm.load_node(uuid).inputs.structure.creator
        assert select.process_label == 'select_md_frames'
        trajectories = [link.node for link in select.base.links.get_incoming().all()
                        if isinstance(link.node, orm.TrajectoryData)]
        assert trajectories and {t.creator.uuid for t in trajectories} == {md_runs[0].uuid}


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
