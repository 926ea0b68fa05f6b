"""Tests for aiida_mlip.analysis.metrics with hand-computed answers."""

import ast
import math
from pathlib import Path

import numpy as np
import pytest

from aiida_mlip.analysis import metrics as m

ANALYSIS_DIR = Path(m.__file__).parent


def test_analysis_package_has_no_aiida_or_torch_imports():
    """The analysis package must stay pure (numpy/scipy/ase only)."""
    offenders = []
    for path in sorted(ANALYSIS_DIR.glob('*.py')):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or '']
            else:
                continue
            for name in names:
                if name.split('.')[0] in {'aiida', 'torch', 'mace'}:
                    offenders.append(f'{path.name}: {name}')
    assert offenders == []


def test_error_metrics_hand_computed():
    result = m.error_metrics([1, 2, 3], [1, 2, 5])
    assert result['mae'] == pytest.approx(2 / 3)
    assert result['rmse'] == pytest.approx(math.sqrt(4 / 3))
    assert result['max_abs'] == pytest.approx(2.0)
    assert result['count'] == 3
    # ref mean 8/3; SS_tot = (25 + 4 + 49)/9 = 78/9; SS_res = 4
    assert result['r2'] == pytest.approx(1 - 4 / (78 / 9))


def test_error_metrics_flattens_any_shape():
    pred = np.array([[1.0, -1.0], [0.5, 0.0]])
    ref = np.zeros((2, 2))
    result = m.error_metrics(pred, ref)
    assert result['count'] == 4
    assert result['mae'] == pytest.approx(2.5 / 4)
    assert result['rmse'] == pytest.approx(math.sqrt(2.25 / 4))


def test_error_metrics_r2_undefined_for_constant_reference():
    assert m.error_metrics([1, 2], [1, 1])['r2'] is None
    assert m.error_metrics([1, 1], [1, 1])['r2'] == 1.0


@pytest.mark.parametrize(
    'pred, ref, match',
    [
        ([1, np.nan], [1, 2], 'non-finite'),
        ([1, 2], [1, np.inf], 'non-finite'),
        ([1, 2, 3], [1, 2], 'shape'),
        ([], [], 'empty'),
    ],
)
def test_error_metrics_bad_input(pred, ref, match):
    with pytest.raises(ValueError, match=match):
        m.error_metrics(pred, ref)


def test_energy_per_atom_metrics():
    # errors: 2 eV / 2 atoms = 1 eV/atom, -3 eV / 3 atoms = -1 eV/atom
    result = m.energy_per_atom_metrics([12.0, 0.0], [10.0, 3.0], [2, 3])
    assert result['mae'] == pytest.approx(1.0)
    assert result['rmse'] == pytest.approx(1.0)
    with pytest.raises(ValueError, match='length mismatch'):
        m.energy_per_atom_metrics([1.0, 2.0], [1.0, 2.0], [1])
    with pytest.raises(ValueError, match='positive integers'):
        m.energy_per_atom_metrics([1.0], [1.0], [0])


def test_force_metrics_component_wise():
    pred = [np.array([[1.0, 0.0, 0.0]]), np.array([[0.0, 0.0, 0.0], [0.0, 2.0, 0.0]])]
    ref = [np.zeros((1, 3)), np.zeros((2, 3))]
    result = m.force_metrics(pred, ref)
    assert result['count'] == 9
    assert result['mae'] == pytest.approx(3.0 / 9)
    assert result['rmse'] == pytest.approx(math.sqrt(5.0 / 9))
    assert result['max_abs'] == pytest.approx(2.0)


def test_force_metrics_bad_shapes():
    with pytest.raises(ValueError, match='reference force arrays'):
        m.force_metrics([np.zeros((1, 3))], [])
    with pytest.raises(ValueError, match='expected \\(n_atoms, 3\\)'):
        m.force_metrics([np.zeros((2, 2))], [np.zeros((2, 2))])
    with pytest.raises(ValueError, match='structure 0'):
        m.force_metrics([np.zeros((2, 3))], [np.zeros((3, 3))])


def test_stress_metrics_voigt_and_tensor_equivalent():
    tensor = np.array([[1.0, 0.2, 0.0], [0.2, 2.0, 0.0], [0.0, 0.0, 3.0]])
    voigt = np.array([1.0, 2.0, 3.0, 0.0, 0.0, 0.2])
    # 3x3 vs Voigt of same stress: zero error; shear not double-counted -> count 6
    result = m.stress_metrics([tensor], [voigt])
    assert result['mae'] == pytest.approx(0.0)
    assert result['count'] == 6
    shifted = m.stress_metrics([tensor + 0.6 * np.eye(3)], [voigt])
    assert shifted['mae'] == pytest.approx(0.3)
    with pytest.raises(ValueError, match='non-symmetric'):
        m.stress_metrics([np.arange(9.0).reshape(3, 3)], [voigt])
    with pytest.raises(ValueError, match='expected'):
        m.stress_metrics([np.zeros(5)], [voigt])


def test_grouped_metrics():
    result = m.grouped_metrics([1.0, 2.0, 10.0, np.array([1.0, 1.0])], [1.0, 3.0, 7.0, np.array([0.0, 0.0])],
                               ['bulk', 'bulk', 'surface', 'surface'])
    assert list(result) == ['bulk', 'surface']
    assert result['bulk']['mae'] == pytest.approx(0.5)
    assert result['bulk']['count'] == 2
    assert result['surface']['mae'] == pytest.approx(5.0 / 3)
    assert result['surface']['count'] == 3
    with pytest.raises(ValueError, match='length mismatch'):
        m.grouped_metrics([1.0], [1.0], ['a', 'b'])


def test_per_element_force_metrics():
    pred = [np.array([[1.0, 0, 0], [0, 0, 0]]), np.array([[0, 0, 3.0]])]
    ref = [np.zeros((2, 3)), np.zeros((1, 3))]
    symbols = [['O', 'H'], ['H']]
    result = m.per_element_force_metrics(pred, ref, symbols)
    assert sorted(result) == ['H', 'O']
    assert result['O']['mae'] == pytest.approx(1.0 / 3)
    assert result['H']['count'] == 6
    assert result['H']['max_abs'] == pytest.approx(3.0)
    with pytest.raises(ValueError, match='symbols'):
        m.per_element_force_metrics(pred, ref, [['O'], ['H']])


def test_spearman():
    x = np.linspace(0, 1, 20)
    assert m.spearman(x, np.exp(5 * x)) == pytest.approx(1.0)
    assert m.spearman(x, -(x**3)) == pytest.approx(-1.0)
    # ties: ranks [1, 2.5, 2.5, 4] vs [1, 2, 3, 4] -> Pearson of ranks
    expected = np.corrcoef([1, 2.5, 2.5, 4], [1, 2, 3, 4])[0, 1]
    assert m.spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(expected)
    assert expected < 1.0
    with pytest.raises(ValueError, match='constant'):
        m.spearman([1, 1, 1], [1, 2, 3])
    with pytest.raises(ValueError, match='at least 2'):
        m.spearman([1], [1])
    with pytest.raises(ValueError, match='non-finite'):
        m.spearman([1, np.nan], [1, 2])


def test_calibration_curve_equal_count_bins():
    std = np.array([0.4, 0.1, 0.3, 0.2])
    err = np.array([4.0, 1.0, -3.0, 2.0])
    result = m.calibration_curve(std, err, n_bins=2)
    assert result['counts'] == [2, 2]
    assert result['bin_mean_std'] == pytest.approx([0.15, 0.35])
    assert result['bin_rmse'] == pytest.approx([math.sqrt(2.5), math.sqrt(12.5)])


def test_calibration_curve_of_calibrated_gaussian():
    rng = np.random.default_rng(0)
    std = rng.uniform(0.5, 1.0, 20000)
    err = rng.normal(0.0, std)
    result = m.calibration_curve(std, err, n_bins=5)
    assert sum(result['counts']) == 20000
    np.testing.assert_allclose(result['bin_rmse'], result['bin_mean_std'], rtol=0.05)
    assert np.all(np.diff(result['bin_rmse']) > 0)


def test_calibration_curve_bad_input():
    with pytest.raises(ValueError, match='at least n_bins'):
        m.calibration_curve([0.1, 0.2], [0.1, 0.2], n_bins=3)
    with pytest.raises(ValueError, match='non-negative'):
        m.calibration_curve([-0.1, 0.2], [0.1, 0.2], n_bins=1)
    with pytest.raises(ValueError, match='true_error'):
        m.calibration_curve([0.1, 0.2], [0.1], n_bins=1)
