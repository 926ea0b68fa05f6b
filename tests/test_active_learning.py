"""Active learning by committee: the validators and ONE real iteration (the pure selection logic:
tests/analysis/test_selection.py).

The real iteration (``mlip.active_learning``, protocol ``fast``): a committee of 3 tiny MACE models trained on the
session's pw.x-labeled Si dataset, ONE exploration MD (Si2 at -2/+2 % volume, 300 and 600 K, 30 steps), the window
filter + farthest-point selection of 3 frames, their pw.x labels, the merge, the calibration of the committee on the
new labels, and no final retrain (``retrain_at_end`` False) to keep the test short.

Why the trust window [1e-3, 50] eV/Å makes the selection testable: the step-0 frame of every run is the ideal
diamond cell (strained isotropically), where every force vanishes by symmetry for every model, so its committee
deviation is ~0 and must be classified *below* the window; every later frame is thermally displaced. The test
recomputes the classification from the MD's own thermo arrays and checks the workflow's counts and picks against it.
"""
import numpy as np
import pytest
from aiida import engine, orm
from ase.build import bulk

from aiida_mlip.workflows.active_learning import ActiveLearningWorkChain

from .conftest import TEST_FAMILY, TEST_PW_OVERRIDES, count_calcjobs
from .fixtures_mlip import mlip_codes, si_dataset  # noqa: F401  (fixtures)
from .test_finetune import PW_PROCESS_TYPE, pw_ancestors


# ---- the workflow: builders and validators (no compute) ------------------------------------------------------

LO, HI = 1e-3, 50.0


def hand_made_dataset(fingerprint=None):
    """A tiny Si dataset made by hand (no DFT): enough for the validators."""
    from aiida_mlip.data.dataset import TrainingSet

    frames = []
    for index, a in enumerate((5.35, 5.43, 5.50)):
        atoms = bulk('Si', 'diamond', a=a)
        atoms.info['REF_energy'] = -10.0 - 0.01 * index
        atoms.arrays['REF_forces'] = np.zeros((2, 3))
        frames.append(atoms)
    return TrainingSet.from_ase(frames, fingerprint=fingerprint or {}).store()


def si2_cell():
    return orm.StructureData(ase=bulk('Si', 'diamond', a=5.43))


def al_builder(codes, pw_code, dataset, protocol='fast', structures=None, **overrides):
    defaults = {
        'training': {'committee_size': 3, 'split_fractions': {'train': 0.7, 'valid': 0.15, 'test': 0.15},
                     'mace': {'max_num_epochs': 5}},
        'labeling': {'pw_base': TEST_PW_OVERRIDES},
        'exploration': {'temperatures': [300.0, 600.0], 'strains': [-0.02, 0.02], 'steps': 30, 'interval': 5},
        'trust_window': [LO, HI],
        'max_candidates_per_iteration': 3,
        'min_candidate_fraction': 0.05,
        'max_iterations': 1,
        'retrain_at_end': False,
    }
    for key, value in overrides.items():
        defaults[key] = value
    return ActiveLearningWorkChain.get_builder_from_protocol(
        dataset, structures or {'si2': si2_cell()}, codes['mace_train'], codes['evaluate'], codes['md'], pw_code,
        protocol=protocol, overrides=defaults, pseudo_family=TEST_FAMILY,
    )


def test_protocols_cite_the_domain_thresholds(mlip_codes, pw_code, pseudo_family):  # noqa: F811
    assert set(ActiveLearningWorkChain.get_available_protocols()) == {'fast', 'balanced', 'stringent'}
    builder = ActiveLearningWorkChain.get_builder_from_protocol(
        hand_made_dataset(), [si2_cell()], mlip_codes['mace_train'], mlip_codes['evaluate'], mlip_codes['md'],
        pw_code, protocol='balanced', pseudo_family=TEST_FAMILY)
    assert builder.training.committee_size.value == 4                  # docs/sources.md: committee of ~4
    assert builder.trust_window.get_list() == [0.20, 0.60]             # docs/sources.md: flag at 0.20 eV/Å
    assert builder.energy_threshold.value == pytest.approx(0.015)      # docs/sources.md: 0.015 eV/atom
    assert builder.exploration.strains.get_list() == [-0.05, 0.0, 0.05]
    assert builder.exploration.temperatures.get_list() == [300.0, 600.0, 900.0]
    assert 'structures' not in builder.labeling
    assert builder.training.evaluate.code.uuid == mlip_codes['evaluate'].uuid


@pytest.mark.parametrize('window, message', [
    ([0.3, 0.3], 'trust_window must satisfy 0 <= lo < hi'),
    ([0.5, 0.2], 'trust_window must satisfy 0 <= lo < hi'),
    ([-0.1, 0.2], 'trust_window must satisfy 0 <= lo < hi'),
])
def test_bad_trust_window_is_refused_before_any_calcjob(
        mlip_codes, pw_code, pseudo_family, window, message):  # noqa: F811
    builder = al_builder(mlip_codes, pw_code, hand_made_dataset())
    builder.trust_window = orm.List(window)
    before = count_calcjobs()
    with pytest.raises(ValueError, match=message):
        engine.run(builder)
    assert count_calcjobs() == before


def test_committee_of_two_is_refused_before_any_calcjob(mlip_codes, pw_code, pseudo_family):  # noqa: F811
    builder = al_builder(mlip_codes, pw_code, hand_made_dataset())
    builder.training.committee_size = orm.Int(2)
    before = count_calcjobs()
    with pytest.raises(ValueError, match=r'committee_size is 2: .* committee_size >= 3'):
        engine.run(builder)
    assert count_calcjobs() == before


def test_element_missing_from_the_seed_data_and_other_dft_are_refused(mlip_codes, pw_code, pseudo_family):  # noqa: F811
    sic = orm.StructureData(ase=bulk('SiC', 'zincblende', a=4.36))
    builder = al_builder(mlip_codes, pw_code, hand_made_dataset(), structures={'sic': sic})
    before = count_calcjobs()
    with pytest.raises(ValueError, match='contain C, absent from the seed dataset'):
        engine.run(builder)
    builder = al_builder(mlip_codes, pw_code, hand_made_dataset({'ecutwfc': 45.0, 'ecutrho': 360.0}))
    with pytest.raises(ValueError, match=r'ecutwfc: 20.0 \(labeling\) != 45.0 \(dataset\)'):
        engine.run(builder)
    assert count_calcjobs() == before


# ---- ONE real iteration ------------------------------------------------------------------------------------


@pytest.fixture(scope='module')
def one_iteration(mlip_codes, pw_code, si_dataset):  # noqa: F811
    builder = al_builder(mlip_codes, pw_code, si_dataset)
    return engine.run_get_node(builder)


def _called(node, label):
    return node.base.links.get_outgoing(link_label_filter=label).one().node


@pytest.mark.pw
@pytest.mark.mace
def test_one_iteration_selects_inside_the_window(one_iteration):
    results, node = one_iteration
    assert node.is_finished_ok, node.exit_message
    record = results['iterations']['iteration_1'].get_dict()
    assert record['status'] == 'continue'
    md = _called(node, 'explore_1')
    assert md.process_type == 'aiida.calculations:mlip.md'
    assert len(md.inputs.models) == 3
    assert md.outputs.summary['n_runs'] == 4  # 2 strained cells x 2 temperatures in ONE calculation

    # Recompute the window classification from the MD's own arrays.
    deviation = {key: md.outputs.thermo[key].get_array('max_force_deviation') for key in md.outputs.thermo}
    everything = np.concatenate([deviation[key] for key in sorted(deviation)])
    assert record['n_explored_frames'] == len(everything)
    expected = {'below': int(np.sum(everything < LO)), 'window': int(np.sum((everything >= LO) & (everything <= HI))),
                'above': int(np.sum(everything > HI)), 'invalid': int(np.sum(~np.isfinite(everything)))}
    assert record['counts'] == expected
    assert record['candidate_fraction'] == pytest.approx(expected['window'] / len(everything))
    # step 0 is the ideal (strained) diamond cell: zero forces by symmetry, hence below the window
    for key in deviation:
        assert deviation[key][0] < LO
    assert expected['below'] >= 4 and expected['window'] >= 3

    selected = record['selected']
    assert record['n_selected'] == len(selected) == 3
    assert len({(s['run'], s['frame']) for s in selected}) == 3
    for entry in selected:
        value = deviation[entry['run']][entry['frame']]
        assert LO <= value <= HI
        assert entry['max_force_deviation'] == pytest.approx(value)
        assert entry['step'] > 0
    # the candidate structures are the trajectory frames
    select = _called(node, 'select_1')
    for entry in selected:
        structure = select.outputs[entry['key']]
        frame = md.outputs.trajectories[entry['run']].get_array('positions')[entry['frame']]
        np.testing.assert_allclose(structure.get_ase().positions, frame, atol=1e-8)


@pytest.mark.pw
@pytest.mark.mace
def test_one_iteration_labels_merges_and_calibrates(one_iteration, si_dataset):  # noqa: F811
    results, node = one_iteration
    record = results['iterations']['iteration_1'].get_dict()
    dataset = results['dataset']
    assert record['n_labeled'] == 3
    assert record['dataset_size'] == si_dataset.n_frames
    assert dataset.n_frames == record['dataset_size_after'] == si_dataset.n_frames + 3
    assert dataset.config_types.get('active_learning_1') == 3
    assert np.isfinite(record['test_errors']['forces_rmse_mev_per_a'])

    # final dataset -> merge calcfunction -> seed dataset + the labeling's dataset -> the new frames' PwCalculations
    merge = dataset.creator
    assert merge.process_label == 'merge_datasets'
    assert merge.inputs.dataset_0.uuid == si_dataset.uuid
    labeled = merge.inputs.dataset_1
    assert labeled.creator.process_label == 'collect_labeled_frames'
    select = _called(node, 'select_1')
    md = _called(node, 'explore_1')
    for uuid in dataset.source_uuids[-3:]:
        pw = orm.load_node(uuid)
        assert pw.process_type == 'aiida.calculations:quantumespresso.pw'
        candidate = pw.inputs.structure
        assert candidate.creator.uuid == select.uuid  # ... <- the selection <- the MD trajectories <- the committee
    assert {link.node.creator.uuid for link in select.base.links.get_incoming().all()
            if link.link_label.startswith('trajectory_')} == {md.uuid}
    # EVERY PwCalculation of the run is a new frame of the final dataset, and the final dataset has every
    # PwCalculation behind its frames (seed + new) in its provenance
    run_pw = {n.uuid for n in node.called_descendants if n.process_type == PW_PROCESS_TYPE}
    assert len(run_pw) == 3 and run_pw == set(dataset.source_uuids[-3:])  # one pw.x per candidate, no restart
    assert set(dataset.source_uuids) == set(si_dataset.source_uuids) | run_pw
    assert set(dataset.source_uuids) <= pw_ancestors(dataset)

    # calibration: 3 frames are too few for a rank correlation; the curve and deviations are there
    assert record['calibration_spearman'] is None
    assert 'fewer than 5' in record['calibration_spearman_note']
    assert sum(record['calibration_curve']['counts']) == 3
    calibration = _called(node, 'calibration_1').outputs.result.get_dict()
    md_deviation = [entry['max_force_deviation'] for entry in record['selected']]
    # the evaluation of the same committee on the same positions reproduces the deviation recorded by the MD
    np.testing.assert_allclose(calibration['deviation'], md_deviation, rtol=1e-3, atol=1e-5)
    assert all(np.isfinite(calibration['true_max_force_error']))


@pytest.mark.pw
@pytest.mark.mace
def test_one_iteration_without_final_retrain_keeps_the_seed_committee(one_iteration, si_dataset):  # noqa: F811
    results, node = one_iteration
    trainings = [n for n in node.called if n.process_label == 'TrainingWorkChain']
    assert len(trainings) == 1  # retrain_at_end False: no training on the merged dataset
    summary = results['summary'].get_dict()
    assert summary['models_trained_on_final_dataset'] is False
    assert summary['converged'] is False and 'max_iterations (1) reached' in summary['stop_reason']
    assert sorted(results['models']) == ['member_0', 'member_1', 'member_2']
    for model in results['models'].values():  # final models -> the dataset they were trained on -> every pw.x
        train = model.creator.inputs.train
        assert train.creator.process_label == 'split_dataset'
        assert train.creator.inputs.dataset.uuid == si_dataset.uuid
        assert set(si_dataset.source_uuids) <= pw_ancestors(model)
    assert results['iterations']['iteration_1']['retrained'] is False


def test_report_of_the_iteration(one_iteration, tmp_path):
    from .test_report import check_report_of

    check_report_of(one_iteration[1], tmp_path, {'Summary', 'Test-set errors', 'Parity plots and error histograms',
                                                 'Learning curves', 'Provenance'})
