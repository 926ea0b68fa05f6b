"""Active learning by committee: the pure selection logic, the validators, and ONE real iteration.

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

from aiida_mlip.analysis import selection as sel
from aiida_mlip.workflows.active_learning import ActiveLearningWorkChain

from .conftest import TEST_FAMILY, TEST_PW_OVERRIDES, count_calcjobs
from .fixtures_mlip import mlip_codes, si_dataset  # noqa: F401  (fixtures)


def si_frames(count, rattle=0.1, seed=0, strains=(0.0,)):
    rng = np.random.default_rng(seed)
    frames = []
    for index in range(count):
        atoms = bulk('Si', 'diamond', a=5.43, cubic=True)
        strain = strains[index % len(strains)]
        atoms.set_cell(atoms.cell * (1 + strain), scale_atoms=True)
        atoms.positions += rng.normal(0, rattle, atoms.positions.shape)
        frames.append((atoms.numbers, atoms.positions, atoms.cell.array, atoms.pbc))
    return frames


# ---- pure selection logic (aiida_mlip.analysis.selection) ======================================================
# ---- trust window -------------------------------------------------------------------------------------------


@pytest.mark.parametrize('window, message', [
    ([0.3, 0.2], 'lo < hi'), ([0.2, 0.2], 'lo < hi'), ([-0.1, 0.2], '0 <= lo'), ([0.1], 'two numbers'),
    ([0.1, float('nan')], 'finite'), (['a', 0.2], 'two numbers'),
])
def test_trust_window_problems(window, message):
    assert message in sel.trust_window_problem(window)


def test_trust_window_ok():
    assert sel.trust_window_problem([0.0, 0.2]) is None


def test_classify_frames_bounds_inclusive_and_invalid():
    deviations = [0.0, 0.049, 0.05, 0.1, 0.2, 0.2001, 3.0, np.nan, np.inf]
    classes = sel.classify_frames(deviations, 0.05, 0.2)
    assert list(classes) == ['below', 'below', 'window', 'window', 'window', 'above', 'above', 'invalid', 'invalid']


def test_classify_frames_energy_flag_only_lifts_frames_below_the_window():
    deviations = [0.01, 0.01, 0.1, 0.5]
    energy = [0.02, 0.001, 0.5, 0.5]  # eV/atom
    classes = sel.classify_frames(deviations, 0.05, 0.2, energy_std_per_atom=energy, energy_threshold=0.015)
    assert list(classes) == ['window', 'below', 'window', 'above']
    with pytest.raises(ValueError, match='energy_std_per_atom'):
        sel.classify_frames(deviations, 0.05, 0.2, energy_threshold=0.015)


def test_classify_frames_refuses_bad_window():
    with pytest.raises(ValueError, match='lo < hi'):
        sel.classify_frames([0.1], 0.2, 0.1)


# ---- descriptor ------------------------------------------------------------------------------------------------


def test_descriptor_is_invariant_to_rotation_permutation_and_supercell():
    atoms = bulk('Si', 'diamond', a=5.43, cubic=True)
    atoms.positions += np.random.default_rng(1).normal(0, 0.05, atoms.positions.shape)
    reference = sel.frame_descriptors([(atoms.numbers, atoms.positions, atoms.cell.array, atoms.pbc)])[0]

    rotated = atoms.copy()
    rotated.rotate(37, 'z', rotate_cell=True)
    permuted = atoms[np.random.default_rng(2).permutation(len(atoms))]
    supercell = atoms * (2, 1, 1)
    for other in (rotated, permuted, supercell):
        descriptor = sel.frame_descriptors([(other.numbers, other.positions, other.cell.array, other.pbc)])[0]
        np.testing.assert_allclose(descriptor, reference, atol=1e-8)


def test_descriptor_sees_volume_and_element_pairs():
    si = bulk('Si', 'diamond', a=5.43)
    compressed = bulk('Si', 'diamond', a=5.43 * 0.97)
    sic = bulk('SiC', 'zincblende', a=4.36)
    descriptors = sel.frame_descriptors([(a.numbers, a.positions, a.cell.array, a.pbc) for a in (si, compressed, sic)])
    assert descriptors.shape[0] == 3
    n_grid = len(np.arange(0.0, sel.DEFAULT_R_MAX + 0.5 * sel.DEFAULT_SPACING, sel.DEFAULT_SPACING))
    assert descriptors.shape[1] == 3 * n_grid  # channels C-C, C-Si, Si-Si
    assert np.linalg.norm(descriptors[0] - descriptors[1]) > 0.1
    assert np.all(descriptors[0][:2 * n_grid] == 0)  # no carbon in pure Si


# ---- farthest-point sampling ---------------------------------------------------------------------------------


def test_fps_is_seeded_and_spreads():
    points = np.array([[0.0], [0.1], [0.2], [5.0], [5.1], [10.0]])
    first = sel.farthest_point_sampling(points, 3, seed=4)
    assert first == sel.farthest_point_sampling(points, 3, seed=4)
    assert len(set(first)) == 3
    # whatever the start, the three picks cover the three clusters
    for seed in range(10):
        picks = sel.farthest_point_sampling(points, 3, seed=seed)
        clusters = {0 if points[i, 0] < 1 else 1 if points[i, 0] < 6 else 2 for i in picks}
        assert clusters == {0, 1, 2}


def test_fps_never_picks_duplicates_and_handles_edges():
    points = np.array([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [2.0, 0.0]])
    assert sorted(sel.farthest_point_sampling(points, 4, seed=0)) in ([0, 3], [1, 3], [2, 3])
    assert sel.farthest_point_sampling(points, 0, seed=0) == []
    assert sel.farthest_point_sampling(np.zeros((0, 2)), 3, seed=0) == []
    with pytest.raises(ValueError):
        sel.farthest_point_sampling(points, -1, seed=0)


# ---- selection -----------------------------------------------------------------------------------------------


def test_select_candidates_only_from_the_window_and_capped():
    frames = si_frames(40, strains=(-0.03, 0.0, 0.03))
    descriptors = sel.frame_descriptors(frames)
    rng = np.random.default_rng(3)
    deviations = rng.uniform(0.0, 0.5, 40)
    deviations[5] = np.nan
    result = sel.select_candidates(deviations, descriptors, 0.1, 0.3, max_candidates=6, seed=7)
    assert len(result['selected']) == 6
    assert set(result['selected']) <= set(result['window_indices'])
    for index in result['selected']:
        assert 0.1 <= deviations[index] <= 0.3
    counts = result['counts']
    assert sum(counts.values()) == 40 and counts['invalid'] == 1
    assert counts['window'] == int(np.sum((deviations >= 0.1) & (deviations <= 0.3)))
    assert result['candidate_fraction'] == pytest.approx(counts['window'] / 40)
    assert result['untrusted_fraction'] == pytest.approx((counts['above'] + 1) / 40)
    # seeded: same inputs, same picks; another seed may start elsewhere
    again = sel.select_candidates(deviations, descriptors, 0.1, 0.3, max_candidates=6, seed=7)
    assert again['selected'] == result['selected']


def test_select_candidates_prefers_diverse_frames():
    """Ten near-copies of one frame and two distinct frames, all in the window: 3 picks take one of each."""
    base = si_frames(1, rattle=0.05, seed=1)[0]
    copies = [(base[0], base[1] + 1e-4 * k, base[2], base[3]) for k in range(10)]
    distinct = si_frames(2, rattle=0.05, seed=2, strains=(-0.05, 0.05))
    descriptors = sel.frame_descriptors(copies + distinct)
    result = sel.select_candidates(np.full(12, 0.15), descriptors, 0.1, 0.2, max_candidates=3, seed=0)
    assert {10, 11} <= set(result['selected'])
    assert len([i for i in result['selected'] if i < 10]) == 1


def test_select_candidates_with_nothing_in_the_window():
    descriptors = sel.frame_descriptors(si_frames(4))
    result = sel.select_candidates([0.01, 0.02, 0.03, 0.5], descriptors, 0.1, 0.3, max_candidates=2, seed=0)
    assert result['selected'] == [] and result['counts']['window'] == 0
    with pytest.raises(ValueError, match='max_candidates'):
        sel.select_candidates([0.2], descriptors[:1], 0.1, 0.3, max_candidates=0, seed=0)


# ---- stop rule -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize('counts, status', [
    ({'below': 100}, 'converged'),                                   # no uncertain frame
    ({'below': 97, 'window': 2, 'above': 1}, 'converged'),           # 2 % and 1 % < 5 %
    ({'below': 90, 'window': 10}, 'continue'),
    ({'below': 90, 'window': 2, 'above': 8}, 'continue'),            # few candidates, but the MD runs away
    ({'below': 50, 'above': 40, 'invalid': 10}, 'stalled'),          # nothing trustworthy to label
    ({}, 'stalled'),
])
def test_exploration_verdict(counts, status):
    assert sel.exploration_verdict(counts, 0.05)['status'] == status


def test_exploration_verdict_zero_fraction_never_converges_with_candidates():
    assert sel.exploration_verdict({'below': 999, 'window': 1}, 0.0)['status'] == 'continue'
    assert sel.exploration_verdict({'below': 1000}, 0.0)['status'] == 'converged'
    with pytest.raises(ValueError):
        sel.exploration_verdict({'below': 1}, 1.5)


# ---- calibration ---------------------------------------------------------------------------------------------


def test_max_force_error_per_frame():
    predicted = np.zeros((5, 3))
    reference = np.zeros((5, 3))
    reference[1] = [3.0, 4.0, 0.0]   # frame 0 (atoms 0-1): 5
    reference[4] = [0.0, 0.0, -2.0]  # frame 1 (atoms 2-4): 2
    np.testing.assert_allclose(sel.max_force_error(predicted, reference, [2, 3]), [5.0, 2.0])
    with pytest.raises(ValueError, match='n_atoms'):
        sel.max_force_error(predicted, reference, [2, 2])


def test_calibration_summary_spearman_needs_enough_frames():
    few = sel.calibration_summary([0.1, 0.2, 0.3], [0.1, 0.3, 0.2])
    assert few['spearman'] is None and 'fewer than 5' in few['spearman_note']
    assert few['calibration_curve']['counts'] == [1, 1, 1]

    rng = np.random.default_rng(0)
    deviation = rng.uniform(0.05, 0.3, 40)
    error = 2.0 * deviation + rng.normal(0, 0.01, 40)  # ranks agree, committee over-confident by 2x
    many = sel.calibration_summary(deviation, error)
    assert many['spearman'] > 0.9
    assert many['median_error_over_deviation'] == pytest.approx(2.0, rel=0.1)
    assert many['fraction_error_above_deviation'] == 1.0
    assert len(many['calibration_curve']['bin_mean_std']) == sel.DEFAULT_CALIBRATION_BINS
    assert np.all(np.diff(many['calibration_curve']['bin_rmse']) > 0)

    constant = sel.calibration_summary([0.1] * 6, [0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
    assert constant['spearman'] is None and 'constant' in constant['spearman_note']
    assert sel.calibration_summary([], [])['n_frames'] == 0


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
    assert builder.training.committee_size.value == 4                  # DOMAIN.md: committee of ~4
    assert builder.trust_window.get_list() == [0.20, 0.60]             # DOMAIN.md: flag at 0.20 eV/Å
    assert builder.energy_threshold.value == pytest.approx(0.015)      # DOMAIN.md: 0.015 eV/atom
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
    assert np.isfinite(record['test_errors']['forces_rmse'])

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
    for model in results['models'].values():
        train = model.creator.inputs.train
        assert train.creator.process_label == 'split_dataset'
        assert train.creator.inputs.dataset.uuid == si_dataset.uuid
    assert results['iterations']['iteration_1']['retrained'] is False
