"""Model-vs-DFT comparisons and the verdict (analysis/validation.py) on hand-computed cases; pure Python."""
import math

import numpy as np
import pytest
import yaml

from aiida_mlip.analysis.validation import (
    CHECKS, common_grid_dos, compare_eos, compare_elastic_results, compare_phonons, percent_error, verdict,
)
from aiida_mlip.protocols import PROTOCOL_DIR

PROTOCOLS = yaml.safe_load((PROTOCOL_DIR / 'validation.yaml').read_text(encoding='utf-8'))
ALL_THRESHOLDS = {'v0_error_percent': 2.0, 'b0_error_percent': 10.0, 'cij_error_percent': 10.0,
                  'elastic_error_percent': 50.0, 'phonon_mae_thz': 0.5, 'dos_spearman': 0.9,
                  'md_drift_mev_per_atom_ps': 1.0}


def cubic_elastic(c11, c12, c44, bulk, shear, extra=None):
    """An elastic workflow output of a cubic crystal, constants written out by hand."""
    tensor = np.zeros((6, 6))
    tensor[:3, :3] = c12
    np.fill_diagonal(tensor[:3, :3], c11)
    np.fill_diagonal(tensor[3:, 3:], c44)
    constants = {'C11': c11, 'C22': c11, 'C33': c11, 'C12': c12, 'C13': c12, 'C23': c12,
                 'C44': c44, 'C55': c44, 'C66': c44, **(extra or {})}
    return {'elastic_tensor_gpa': tensor.tolist(), 'constants_gpa': constants, 'bulk_modulus_vrh_gpa': bulk,
            'shear_modulus_vrh_gpa': shear, 'born_stable': True}


def test_percent_error_is_positive_when_the_model_is_above_the_reference():
    assert percent_error(110.0, 100.0) == pytest.approx(10.0)
    assert percent_error(90.0, 100.0) == pytest.approx(-10.0)
    assert percent_error(-90.0, -100.0) == pytest.approx(10.0)  # above a negative reference: still positive


def test_compare_eos_hand_made_fits():
    model = {'v0': 41.0, 'b0_gpa': 90.0, 'b0_prime': 4.5}
    reference = {'v0': 40.0, 'b0_gpa': 100.0, 'b0_prime': 4.0}
    result = compare_eos(model, reference)
    assert result['v0_error_percent'] == pytest.approx(2.5)
    assert result['b0_error_percent'] == pytest.approx(-10.0)
    assert result['b0_prime_error'] == pytest.approx(0.5)
    assert (result['v0_model'], result['v0_reference']) == (41.0, 40.0)
    assert (result['b0_model_gpa'], result['b0_reference_gpa']) == (90.0, 100.0)
    assert result['warnings'] == []


def test_compare_eos_names_the_engine_of_each_fit_warning():
    model = {'v0': 41.0, 'b0_gpa': 90.0, 'b0_prime': 4.5, 'warnings': ['the minimum V0 = 41 lies in the outermost']}
    result = compare_eos(model, {'v0': 40.0, 'b0_gpa': 100.0, 'b0_prime': 4.0, 'warnings': []})
    assert result['warnings'] == ['model: the minimum V0 = 41 lies in the outermost']


def test_compare_elastic_results_per_constant_errors():
    reference = cubic_elastic(100.0, 50.0, 40.0, bulk=80.0, shear=40.0, extra={'C16': 8.0})
    model = cubic_elastic(110.0, 45.0, 30.0, bulk=88.0, shear=30.0, extra={'C14': 3.0})
    result = compare_elastic_results(model, reference)
    percent = result['cij_error_percent']
    assert percent['C11'] == pytest.approx(10.0)    # (110 - 100) / 100
    assert percent['C12'] == pytest.approx(-10.0)   # (45 - 50) / 50
    assert percent['C44'] == pytest.approx(-25.0)   # (30 - 40) / 40
    assert result['cij_error_gpa']['C11'] == pytest.approx(10.0)
    assert result['cij_error_gpa']['C12'] == pytest.approx(-5.0)
    assert result['cij_error_gpa']['C44'] == pytest.approx(-10.0)
    for name in ('C14', 'C16'):  # in one output only: not compared
        assert name not in percent and name not in result['cij_error_gpa']
    assert set(percent) == set(reference['constants_gpa']) - {'C16'}
    assert result['bulk_modulus_error_percent'] == pytest.approx(10.0)
    assert result['shear_modulus_error_percent'] == pytest.approx(-25.0)
    assert result['rel_error_percent']['C44'] == pytest.approx(-25.0)  # the tensor comparison agrees


@pytest.mark.parametrize('model_clamped, reference_clamped, passed', [
    (False, False, True), (True, True, True), (True, False, False), (False, True, False)])
def test_relaxed_ion_against_clamped_ion_is_a_failed_check(model_clamped, reference_clamped, passed):
    model = {**cubic_elastic(100.0, 50.0, 40.0, bulk=66.7, shear=35.0), 'clamped_ion': model_clamped}
    reference = {**cubic_elastic(100.0, 50.0, 40.0, bulk=66.7, shear=35.0), 'clamped_ion': reference_clamped}
    judged = verdict({'elastic': compare_elastic_results(model, reference)}, ALL_THRESHOLDS)
    assert judged['checks']['elastic.ion_relaxation_mismatch'] is passed
    assert 'elastic.ion_relaxation_mismatch' not in verdict(
        {'elastic': compare_elastic_results(cubic_elastic(1.0, 0.5, 0.4, 1.0, 1.0),
                                            cubic_elastic(1.0, 0.5, 0.4, 1.0, 1.0))}, ALL_THRESHOLDS)['checks']


def test_constants_below_five_percent_of_the_largest_are_judged_in_gpa_only():
    reference = cubic_elastic(100.0, 4.9, 5.0, bulk=36.6, shear=22.0)
    model = cubic_elastic(100.0, 7.9, 6.0, bulk=38.6, shear=22.6)
    result = compare_elastic_results(model, reference)
    assert 'C12' not in result['cij_error_percent']                   # 4.9 < 5 % of 100
    assert result['cij_error_gpa']['C12'] == pytest.approx(3.0)
    assert result['cij_error_percent']['C44'] == pytest.approx(20.0)  # 5.0 is exactly 5 %: judged
    assert result['cij_error_percent']['C11'] == pytest.approx(0.0)
    judged = verdict({'elastic': result}, {'cij_error_percent': 10.0})
    assert 'elastic.cij_error_percent.C12' not in judged['checks']
    assert judged['checks']['elastic.cij_error_percent.C44'] is False


def test_undefined_modulus_fails_instead_of_being_skipped():
    reference = cubic_elastic(100.0, 50.0, 40.0, bulk=80.0, shear=40.0)
    model = cubic_elastic(100.0, 100.0, 40.0, bulk=None, shear=None)  # C11 = C12: Reuss undefined
    result = compare_elastic_results(model, reference)
    assert math.isnan(result['bulk_modulus_error_percent'])
    judged = verdict({'elastic': result}, {'elastic_error_percent': 50.0})
    assert judged['checks']['elastic.bulk_modulus_error_percent'] is False
    assert judged['passed'] is False


def test_common_grid_dos_spans_both_and_is_zero_outside_each():
    grid, dos_a, dos_b = common_grid_dos([0.0, 1.0, 2.0], [1.0, 1.0, 1.0], [1.0, 2.0, 3.0], [2.0, 2.0, 2.0], points=4)
    np.testing.assert_allclose(grid, [0.0, 1.0, 2.0, 3.0])
    np.testing.assert_allclose(dos_a, [1.0, 1.0, 1.0, 0.0])
    np.testing.assert_allclose(dos_b, [0.0, 2.0, 2.0, 2.0])


def test_compare_phonons_hand_made_bands_dos_and_imaginary_modes():
    reference = np.array([[0.0, 1.0, 2.0], [1.0, 2.0, 3.0]])
    model = np.array([[0.0, 1.3, 2.0], [1.0, 2.0, 3.3]])
    frequencies = np.arange(5.0)
    result = compare_phonons(model, reference, (frequencies, 4.0 - frequencies), (frequencies, frequencies),
                             {'has_imaginary': True}, {'has_imaginary': False})
    assert result['mae_thz'] == pytest.approx(0.1)             # two errors of 0.3 among six frequencies
    assert result['max_abs_thz'] == pytest.approx(0.3)
    assert result['band_centre_shift_percent'] == pytest.approx(100.0 * (1.6 - 1.5) / 1.5)
    assert result['dos_spearman'] == pytest.approx(-1.0)       # falling vs rising DOS
    assert result['imaginary_mismatch'] is True
    same = compare_phonons(model, reference, (frequencies, frequencies), (frequencies, frequencies),
                           {'has_imaginary': False}, {'has_imaginary': False})
    assert same['dos_spearman'] == pytest.approx(1.0)
    assert same['imaginary_mismatch'] is False
    assert 'dos_spearman' not in compare_phonons(model, reference)


@pytest.mark.parametrize('value, passed', [(2.0, True), (2.0 + 1e-9, False), (-2.0, True), (-2.5, False),
                                           (-1.5, True), (0.0, True)])
def test_abs_max_at_the_threshold_passes_and_negative_errors_are_judged_by_magnitude(value, passed):
    judged = verdict({'eos': {'v0_error_percent': value}}, ALL_THRESHOLDS)
    assert judged['checks'] == {'eos.v0_error_percent': passed}
    assert judged['passed'] is passed
    assert len(judged['failed']) == (0 if passed else 1)


@pytest.mark.parametrize('value, passed', [(0.89, False), (0.9, True), (0.95, True), (-0.95, False)])
def test_min_kind(value, passed):
    judged = verdict({'phonons': {'dos_spearman': value}}, ALL_THRESHOLDS)
    assert judged['checks'] == {'phonons.dos_spearman': passed}


@pytest.mark.parametrize('section, key', [('phonons', 'imaginary_mismatch'), ('md_stability', 'unstable')])
def test_false_kind_fails_on_true(section, key):
    failing = verdict({section: {key: True}}, ALL_THRESHOLDS)
    assert failing['checks'] == {f'{section}.{key}': False} and failing['passed'] is False
    assert failing['failed'] == [f'{section}.{key} = True']
    assert verdict({section: {key: False}}, {})['checks'] == {f'{section}.{key}': True}  # needs no threshold


def test_each_check_uses_its_own_threshold():
    comparison = {'elastic': {'cij_error_percent': {'C11': 20.0}, 'bulk_modulus_error_percent': 20.0,
                              'shear_modulus_error_percent': -60.0},
                  'phonons': {'mae_thz': 0.4},
                  'md_stability': {'drift_mev_per_atom_ps': -1.2},
                  'eos': {'b0_error_percent': 9.0}}
    checks = verdict(comparison, ALL_THRESHOLDS)['checks']
    assert checks == {
        'elastic.cij_error_percent.C11': False,        # 20 > cij_error_percent 10
        'elastic.bulk_modulus_error_percent': True,    # 20 <= elastic_error_percent 50
        'elastic.shear_modulus_error_percent': False,  # |-60| > 50
        'phonons.mae_thz': True,                       # 0.4 <= 0.5
        'md_stability.drift_mev_per_atom_ps': False,   # |-1.2| > 1.0
        'eos.b0_error_percent': True,                  # 9 <= 10
    }


def test_each_elastic_constant_is_its_own_check_and_failures_name_check_and_value():
    comparison = {'elastic': {'cij_error_percent': {'C11': 10.0, 'C12': -10.0, 'C44': -25.0}}}
    judged = verdict(comparison, ALL_THRESHOLDS)
    assert judged['checks'] == {'elastic.cij_error_percent.C11': True, 'elastic.cij_error_percent.C12': True,
                                'elastic.cij_error_percent.C44': False}
    assert judged['failed'] == ['elastic.cij_error_percent.C44 = -25 (|value| > 10.0)']
    drift = verdict({'md_stability': {'drift_mev_per_atom_ps': 1.5}}, ALL_THRESHOLDS)['failed']
    assert drift == ['md_stability.drift_mev_per_atom_ps = 1.5 (|value| > 1.0)']
    spearman = verdict({'phonons': {'dos_spearman': 0.89}}, ALL_THRESHOLDS)['failed']
    assert spearman == ['phonons.dos_spearman = 0.89 (< 0.9)']


def test_model_failed_section_is_a_failed_check_with_its_reason():
    judged = verdict({'eos': {'model_failed': 'no minimum in E(V)'}, 'phonons': {'mae_thz': 0.1}}, ALL_THRESHOLDS)
    assert judged['checks'] == {'eos.model_failed': False, 'phonons.mae_thz': True}
    assert judged['passed'] is False
    assert len(judged['failed']) == 1 and 'eos.model_failed' in judged['failed'][0]
    assert 'no minimum in E(V)' in judged['failed'][0]


def test_missing_threshold_key_skips_the_check():
    comparison = {'phonons': {'mae_thz': 5.0, 'dos_spearman': 0.95}}
    judged = verdict(comparison, {'dos_spearman': 0.9})
    assert judged['checks'] == {'phonons.dos_spearman': True}
    assert verdict({'elastic': {'cij_error_percent': {'C11': 99.0}}}, {'elastic_error_percent': 50.0})['passed'] is None


def test_none_values_are_skipped():
    comparison = {'phonons': {'dos_spearman': None}, 'md_stability': {'drift_mev_per_atom_ps': None},
                  'elastic': {'cij_error_percent': {'C11': None, 'C44': 5.0}}}
    assert verdict(comparison, ALL_THRESHOLDS)['checks'] == {'elastic.cij_error_percent.C44': True}


@pytest.mark.parametrize('section, key', [('eos', 'v0_error_percent'), ('phonons', 'dos_spearman'),
                                          ('md_stability', 'drift_mev_per_atom_ps')])
def test_nan_fails(section, key):
    judged = verdict({section: {key: float('nan')}}, ALL_THRESHOLDS)
    assert judged['checks'] == {f'{section}.{key}': False} and judged['passed'] is False
    assert judged['failed'] == [f'{section}.{key} = nan (not a finite number)']
    cij = verdict({'elastic': {'cij_error_percent': {'C44': float('nan')}}}, ALL_THRESHOLDS)
    assert cij['checks'] == {'elastic.cij_error_percent.C44': False}


def test_nothing_to_judge_gives_passed_none():
    assert verdict({}, ALL_THRESHOLDS) == {'passed': None, 'checks': {}, 'failed': []}
    assert verdict({'md_stability': {'reasons': []}}, ALL_THRESHOLDS)['passed'] is None


def test_all_checks_passing_gives_passed_true():
    comparison = {'eos': {'v0_error_percent': 0.1, 'b0_error_percent': -1.0},
                  'phonons': {'mae_thz': 0.1, 'dos_spearman': 0.99, 'imaginary_mismatch': False},
                  'md_stability': {'unstable': False, 'drift_mev_per_atom_ps': 0.2}}
    judged = verdict(comparison, ALL_THRESHOLDS)
    assert judged['passed'] is True and len(judged['checks']) == 7 and judged['failed'] == []


def test_every_threshold_of_a_check_is_in_the_protocol_defaults():
    """Under any protocol every check has its limit: none is skipped for want of a threshold."""
    defaults = PROTOCOLS['default_inputs']['thresholds']
    assert {key for _, _, kind, key in CHECKS if kind != 'false'} == set(defaults)
    for name, protocol in PROTOCOLS['protocols'].items():
        assert set(protocol.get('thresholds', {})) <= set(defaults), name


def test_accurate_protocol_judges_the_hand_made_tensor():
    accurate = {**PROTOCOLS['default_inputs']['thresholds'], **PROTOCOLS['protocols']['accurate']['thresholds']}
    assert accurate['cij_error_percent'] == 10.0 and accurate['v0_error_percent'] == 0.5
    reference = cubic_elastic(100.0, 50.0, 40.0, bulk=80.0, shear=40.0)
    model = cubic_elastic(105.0, 52.0, 35.0, bulk=83.0, shear=37.0)  # +5, +4, -12.5 %; moduli +3.75, -7.5 %
    judged = verdict({'elastic': compare_elastic_results(model, reference)}, accurate)
    assert len(judged['checks']) == 9 + 2
    assert {name for name, passed in judged['checks'].items() if not passed} == {
        f'elastic.cij_error_percent.{name}' for name in ('C44', 'C55', 'C66')}
