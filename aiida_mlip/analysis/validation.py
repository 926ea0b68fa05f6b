"""Compare properties computed by a model with the same properties computed by DFT, and judge them.

Pure functions on plain dicts and arrays (the outputs of the property workflows), no AiiDA. Each
``compare_*`` returns errors; :func:`verdict` applies thresholds (see ``protocols/validation.yaml`` and
docs/validation.md for their sources) and says which checks failed and why.
"""
from __future__ import annotations

import numpy as np

from aiida_mlip.analysis.elastic import compare_elastic
from aiida_mlip.analysis.phonons import band_centre_shift_percent, compare_band_frequencies, dos_spearman


def percent_error(model: float, reference: float) -> float:
    """Signed relative error in percent."""
    return 100.0 * (model - reference) / reference


def compare_eos(model: dict, reference: dict) -> dict:
    """V0 and B0 (and B0') errors between two Birch-Murnaghan fits (``fit_birch_murnaghan`` dicts)."""
    return {
        'v0_model': model['v0'], 'v0_reference': reference['v0'],
        'v0_error_percent': percent_error(model['v0'], reference['v0']),
        'b0_model_gpa': model['b0_gpa'], 'b0_reference_gpa': reference['b0_gpa'],
        'b0_error_percent': percent_error(model['b0_gpa'], reference['b0_gpa']),
        'b0_prime_error': model['b0_prime'] - reference['b0_prime'],
    }


def compare_elastic_results(model: dict, reference: dict) -> dict:
    """Cij errors (GPa and %) and moduli errors between two elastic workflow outputs."""
    result = compare_elastic(np.array(model['elastic_tensor_gpa']), np.array(reference['elastic_tensor_gpa']))
    result['bulk_modulus_error_percent'] = percent_error(model['bulk_modulus_vrh_gpa'],
                                                         reference['bulk_modulus_vrh_gpa'])
    result['shear_modulus_error_percent'] = percent_error(model['shear_modulus_vrh_gpa'],
                                                          reference['shear_modulus_vrh_gpa'])
    result['born_stable_model'] = bool(model['born_stable'])
    result['born_stable_reference'] = bool(reference['born_stable'])
    return result


def common_grid_dos(frequencies_a, dos_a, frequencies_b, dos_b, points: int = 200):
    """Both DOS interpolated on one frequency grid spanning both (zero outside each one's range)."""
    low = min(np.min(frequencies_a), np.min(frequencies_b))
    high = max(np.max(frequencies_a), np.max(frequencies_b))
    grid = np.linspace(low, high, points)
    return (grid, np.interp(grid, frequencies_a, dos_a, left=0.0, right=0.0),
            np.interp(grid, frequencies_b, dos_b, left=0.0, right=0.0))


def compare_phonons(model_bands, reference_bands, model_dos=None, reference_dos=None, model_summary=None,
                    reference_summary=None) -> dict:
    """Band frequency errors over the path (THz), DOS Spearman correlation, imaginary-mode mismatch.

    Bands are (n_qpoints, n_branches) arrays on the same path; DOS are (frequencies, dos) pairs.
    """
    result = compare_band_frequencies(model_bands, reference_bands)
    result['band_centre_shift_percent'] = band_centre_shift_percent(model_bands, reference_bands)
    if model_dos is not None and reference_dos is not None:
        _, dos_m, dos_r = common_grid_dos(*model_dos, *reference_dos)
        result['dos_spearman'] = dos_spearman(dos_m, dos_r)
    if model_summary is not None and reference_summary is not None:
        result['imaginary_model'] = bool(model_summary['has_imaginary'])
        result['imaginary_reference'] = bool(reference_summary['has_imaginary'])
        result['imaginary_mismatch'] = result['imaginary_model'] != result['imaginary_reference']
    return result


#: (comparison section, key, kind, threshold key): 'abs_max' fails when |value| > threshold,
#: 'min' when value < threshold, 'false' when the value is True (a mismatch or an instability).
CHECKS = (
    ('eos', 'v0_error_percent', 'abs_max', 'v0_error_percent'),
    ('eos', 'b0_error_percent', 'abs_max', 'b0_error_percent'),
    ('elastic', 'bulk_modulus_error_percent', 'abs_max', 'elastic_error_percent'),
    ('elastic', 'shear_modulus_error_percent', 'abs_max', 'elastic_error_percent'),
    ('phonons', 'mae_thz', 'abs_max', 'phonon_mae_thz'),
    ('phonons', 'dos_spearman', 'min', 'dos_spearman'),
    ('phonons', 'imaginary_mismatch', 'false', None),
    ('md_stability', 'unstable', 'false', None),
)


def verdict(comparison: dict, thresholds: dict) -> dict:
    """Pass/fail of every check present in ``comparison`` against ``thresholds``, with reasons."""
    checks, reasons = {}, []
    for section, values in comparison.items():
        if isinstance(values, dict) and values.get('model_failed'):
            checks[f'{section}.model_failed'] = False
            reasons.append(f'{section}: the model could not produce it ({values["model_failed"]})')
    for section, key, kind, threshold_key in CHECKS:
        value = comparison.get(section, {}).get(key)
        if value is None:
            continue
        if kind == 'false':
            passed = not value
            message = f'{section}: {key}'
        else:
            limit = thresholds[threshold_key]
            passed = abs(value) <= limit if kind == 'abs_max' else value >= limit
            relation = '>' if kind == 'abs_max' else '<'
            message = f'{section}: {key} = {value:.3g} {relation} {limit}'
        checks[f'{section}.{key}'] = passed
        if not passed:
            reasons.append(message)
    return {'passed': all(checks.values()) if checks else None, 'checks': checks, 'failed': reasons}
