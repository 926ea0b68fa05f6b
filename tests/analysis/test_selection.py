"""Pure candidate selection and calibration (aiida_mlip.analysis.selection): trust window, pair-distance
descriptor, farthest-point sampling (used by mlip.active_learning and by mlip.finetune's `diverse` selection), stop
rule, calibration summary."""
import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk

from aiida_mlip.analysis import selection as sel


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


def test_atoms_descriptors_equal_frame_descriptors_and_seed_sequences_work():
    frames = si_frames(5, strains=(-0.03, 0.0, 0.03))
    atoms = [Atoms(numbers=n, positions=p, cell=c, pbc=b) for n, p, c, b in frames]
    np.testing.assert_array_equal(sel.atoms_descriptors(atoms), sel.frame_descriptors(frames))
    descriptors = sel.atoms_descriptors(atoms)
    picks = sel.farthest_point_sampling(descriptors, 3, seed=[7, 2])  # finetune seeds with [seed, volume index]
    assert picks == sel.farthest_point_sampling(descriptors, 3, seed=[7, 2]) and len(set(picks)) == 3
