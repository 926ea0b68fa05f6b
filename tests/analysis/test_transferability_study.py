"""The study-level transferability functions: committee errors, leave-one-out ratio, the whole summary."""
import numpy as np
import pytest

from aiida_mlip.analysis.transferability import committee_errors, leave_one_out_ratio, transferability_summary


def test_committee_errors_by_hand():
    # Two frames (1 and 2 atoms), two members. Reference energies 0, forces 0.
    energies = np.array([[1.0, 2.0], [3.0, 2.0]])          # mean: [2, 2] -> per atom [2, 1]
    forces = np.zeros((2, 3, 3))
    forces[0, :, 0] = 1.0                                  # member 0: +1 on x, member 1: 0 -> mean 0.5, std 0.5
    result = committee_errors(energies, forces, [1, 2], [0.0, 0.0], np.zeros((3, 3)))
    assert result['energy_mae'] == pytest.approx(1.5)
    assert result['energy_rmse'] == pytest.approx(np.sqrt((4 + 1) / 2))
    assert result['forces_mae'] == pytest.approx(0.5 / 3)                   # 3 of 9 components off by 0.5
    assert result['forces_rmse'] == pytest.approx(np.sqrt(3 * 0.25 / 9))
    assert result['committee_force_std'] == pytest.approx(np.sqrt(3 * 0.25 / 9))
    assert (result['n_frames'], result['n_models']) == (2, 2)
    single = committee_errors(energies[:1], forces[:1], [1, 2], [0.0, 0.0], np.zeros((3, 3)))
    assert single['committee_force_std'] is None and single['energy_mae'] == pytest.approx(1.0)  # [1, 2/2]


def test_committee_errors_refuses_bad_shapes():
    with pytest.raises(ValueError, match='inconsistent shapes'):
        committee_errors(np.zeros((2, 2)), np.zeros((2, 4, 3)), [1, 2], [0, 0], np.zeros((3, 3)))
    with pytest.raises(ValueError, match=r'\(M, N\)'):
        committee_errors(np.zeros(2), np.zeros((1, 3, 3)), [1, 2], [0, 0], np.zeros((3, 3)))
    with pytest.raises(ValueError, match='non-finite'):
        committee_errors(np.array([[np.nan, 0.0]]), np.zeros((1, 3, 3)), [1, 2], [0, 0], np.zeros((3, 3)))


def test_leave_one_out_ratio_prefers_the_all_class_model():
    models = ['a', 'b', 'all', 'without_a', 'without_b']
    matrix = np.array([
        [1.0, 5.0],
        [6.0, 2.0],
        [1.5, 2.5],
        [9.0, 2.2],
        [1.4, np.nan],
    ])
    result = leave_one_out_ratio(matrix, models, ['a', 'b'])
    assert result['a'] == {'left_out': 9.0, 'seen': 1.5, 'seen_by': 'all', 'ratio': pytest.approx(6.0)}
    assert result['b']['left_out'] is None and result['b']['ratio'] is None
    without_all = leave_one_out_ratio(matrix[[0, 1, 3]], ['a', 'b', 'without_a'], ['a', 'b'])
    assert without_all == {'a': {'left_out': 9.0, 'seen': 1.0, 'seen_by': 'a', 'ratio': pytest.approx(9.0)}}
    assert leave_one_out_ratio(matrix[:3], models[:3], ['a', 'b']) == {}


def _score(forces_rmse, std=None):
    return {'energy_mae': 1.0, 'energy_rmse': 2.0 * forces_rmse, 'forces_mae': forces_rmse / 2,
            'forces_rmse': forces_rmse, 'committee_force_std': std, 'n_frames': 3, 'n_models': 2}


def test_summary_matrices_ratios_and_uncertainty():
    scores = {
        ('a', 'a'): _score(10.0, 5.0), ('a', 'b'): _score(40.0, 20.0),
        ('b', 'a'): _score(30.0, 3.0), ('b', 'b'): _score(10.0, 4.0),
        ('all', 'a'): _score(12.0), ('all', 'b'): _score(11.0),
    }
    summary = transferability_summary(scores, ['a', 'b', 'all'], ['a', 'b'])
    assert summary['models'] == ['a', 'b', 'all'] and summary['classes'] == ['a', 'b']
    assert summary['forces_rmse'] == [[10.0, 40.0], [30.0, 10.0], [12.0, 11.0]]
    assert summary['committee_force_std'][2] == [None, None]          # single model: no spread
    assert summary['calibration'][0] == [pytest.approx(0.5), pytest.approx(0.5)]
    ratios = summary['out_of_class_ratio']['forces_rmse']
    assert ratios['a']['ratio'] == pytest.approx(4.0) and ratios['b']['ratio'] == pytest.approx(3.0)
    assert ratios['all']['ratio'] is None                              # no class called `all`
    uncertainty = summary['uncertainty']
    assert uncertainty['per_model']['a']['ratio'] == pytest.approx(4.0)
    assert uncertainty['per_model']['b']['ratio'] == pytest.approx(0.75)   # b's spread falls out of class
    assert uncertainty['per_model']['b']['error_rises'] is True
    assert uncertainty['rises'] is False and uncertainty['n_evaluated'] == 2
    assert summary['leave_one_out'] == {'forces_rmse': {}, 'energy_rmse': {}}


def test_summary_without_committees_and_with_missing_cells():
    scores = {('a', 'a'): _score(10.0), ('b', 'b'): _score(10.0), ('a', 'b'): _score(25.0)}
    summary = transferability_summary(scores, ['a', 'b'], ['a', 'b'])
    assert summary['forces_rmse'] == [[10.0, 25.0], [None, 10.0]]
    assert summary['uncertainty'] == {'per_model': {}, 'rises': False, 'n_evaluated': 0, 'min_ratio': 1.0}
    assert summary['out_of_class_ratio']['forces_rmse']['b']['ratio'] is None
