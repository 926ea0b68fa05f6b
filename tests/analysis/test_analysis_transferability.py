"""Tests for the cross-class transferability matrix helpers."""

import numpy as np
import pytest

from aiida_mlip.analysis.transferability import error_matrix, out_of_class_ratio, uncertainty_rises_out_of_class

RESULTS = {
    ('bulk', 'bulk'): 0.05,
    ('bulk', 'surface'): 0.15,
    ('bulk', 'liquid'): 0.25,
    ('surface', 'bulk'): 0.08,
    ('surface', 'surface'): 0.04,
    ('surface', 'liquid'): 0.12,
    ('liquid', 'bulk'): 0.10,
    ('liquid', 'liquid'): 0.05,
}


def test_error_matrix_layout_and_missing_entries():
    models, tests, matrix = error_matrix(RESULTS)
    assert models == ['bulk', 'liquid', 'surface']
    assert tests == ['bulk', 'liquid', 'surface']
    assert matrix[models.index('bulk'), tests.index('liquid')] == 0.25
    assert matrix[models.index('surface'), tests.index('bulk')] == 0.08
    assert np.isnan(matrix[models.index('liquid'), tests.index('surface')])
    assert np.count_nonzero(np.isnan(matrix)) == 1


def test_error_matrix_explicit_order_and_errors():
    models, tests, matrix = error_matrix(RESULTS, model_order=['surface', 'bulk', 'liquid', 'all'],
                                         test_order=['liquid', 'surface', 'bulk'])
    assert models[-1] == 'all' and np.all(np.isnan(matrix[-1]))
    assert matrix[0, 0] == 0.12
    with pytest.raises(ValueError, match='misses labels'):
        error_matrix(RESULTS, model_order=['bulk'])
    with pytest.raises(ValueError, match='empty'):
        error_matrix({})
    with pytest.raises(ValueError, match='not finite'):
        error_matrix({('a', 'a'): float('nan')})
    with pytest.raises(ValueError, match='tuples'):
        error_matrix({'a': 1.0})


def test_out_of_class_ratio_matches_by_label():
    models, tests, matrix = error_matrix(RESULTS, test_order=['surface', 'liquid', 'bulk'])
    ratios = out_of_class_ratio(matrix, models, tests)
    assert ratios['bulk']['in_class'] == 0.05
    assert ratios['bulk']['out_of_class_mean'] == pytest.approx(0.20)
    assert ratios['bulk']['ratio'] == pytest.approx(4.0)
    assert ratios['surface']['ratio'] == pytest.approx(0.10 / 0.04)
    assert ratios['liquid']['ratio'] == pytest.approx(2.0)  # NaN (liquid, surface) ignored


def test_out_of_class_ratio_undefined_and_bad_shapes():
    matrix = np.array([[1.0, 2.0], [3.0, 4.0]])
    ratios = out_of_class_ratio(matrix, ['mixed', 'a'], ['a', 'b'])
    assert ratios['mixed']['ratio'] is None and ratios['mixed']['in_class'] is None
    assert ratios['mixed']['out_of_class_mean'] == pytest.approx(1.5)
    assert ratios['a']['ratio'] == pytest.approx(4.0 / 3.0)
    with pytest.raises(ValueError, match='does not match'):
        out_of_class_ratio(matrix, ['a'], ['a', 'b'])
    with pytest.raises(ValueError, match='unique'):
        out_of_class_ratio(matrix, ['a', 'b'], ['a', 'a'])


def test_uncertainty_rises_out_of_class():
    labels = ['bulk', 'surface']
    rising = np.array([[0.01, 0.05], [0.04, 0.02]])
    result = uncertainty_rises_out_of_class(rising, labels, labels)
    assert result['rises'] is True
    assert result['n_evaluated'] == 2
    assert result['per_model']['bulk']['ratio'] == pytest.approx(5.0)
    assert result['per_model']['surface']['rises'] is True

    flat_for_surface = np.array([[0.01, 0.05], [0.02, 0.02]])
    result = uncertainty_rises_out_of_class(flat_for_surface, labels, labels)
    assert result['rises'] is False
    assert result['per_model']['bulk']['rises'] is True
    assert result['per_model']['surface']['rises'] is False

    assert uncertainty_rises_out_of_class(rising, labels, labels, min_ratio=3.0)['rises'] is False
    with pytest.raises(ValueError, match='non-negative'):
        uncertainty_rises_out_of_class(-rising, labels, labels)
    # no model with a matching test class -> nothing evaluated -> not a confirmation
    assert uncertainty_rises_out_of_class(rising, ['x', 'y'], labels)['rises'] is False
