"""Compare properties computed by a model with the same properties computed by DFT, and judge them.

Pure functions on plain dicts and arrays (the outputs of the property workflows), no AiiDA. Each
``compare_*`` returns errors; :func:`verdict` applies thresholds (see ``protocols/validation.yaml`` and
docs/validation.md for their sources) and says which checks failed and why.
"""
from __future__ import annotations

import math

import numpy as np

from aiida_mlip.analysis.elastic import compare_elastic
from aiida_mlip.analysis.phonons import band_centre_shift_percent, compare_band_frequencies, dos_spearman


def percent_error(model: float, reference: float) -> float:
    """Signed relative error in percent: positive when the model is above the reference (also for a negative one)."""
    return 100.0 * (model - reference) / abs(reference)


def compare_eos(model: dict, reference: dict) -> dict:
    """V0 and B0 (and B0') errors between two Birch-Murnaghan fits (``fit_birch_murnaghan`` dicts).

    ``warnings`` carries the fits' own (a minimum near the edge of the scan), named by engine: a fit that had
    to extrapolate makes its V0 and B0 errors less certain, which the reader of a verdict should see.
    """
    return {
        'v0_model': model['v0'], 'v0_reference': reference['v0'],
        'v0_error_percent': percent_error(model['v0'], reference['v0']),
        'b0_model_gpa': model['b0_gpa'], 'b0_reference_gpa': reference['b0_gpa'],
        'b0_error_percent': percent_error(model['b0_gpa'], reference['b0_gpa']),
        'b0_prime_error': model['b0_prime'] - reference['b0_prime'],
        'warnings': [f'model: {warning}' for warning in model.get('warnings', [])]
        + [f'reference: {warning}' for warning in reference.get('warnings', [])],
    }


#: A constant whose reference is smaller than this fraction of the largest reference constant is not judged in
#: percent: a few GPa off a near-zero constant would be hundreds of percent and say nothing about the model.
CIJ_PERCENT_FLOOR = 0.05


def compare_named_constants(model: dict, reference: dict) -> dict:
    """Signed errors of the named constants (``constants_gpa``: C11, C12, C44, ...) present in both.

    ``cij_error_gpa`` has every common constant; ``cij_error_percent`` only those whose reference magnitude is
    at least :data:`CIJ_PERCENT_FLOOR` of the largest reference constant.
    """
    common = [name for name in reference if name in model]
    largest = max((abs(reference[name]) for name in common), default=0.0)
    return {
        'cij_error_gpa': {name: model[name] - reference[name] for name in common},
        'cij_error_percent': {name: percent_error(model[name], reference[name]) for name in common
                              if largest > 0 and abs(reference[name]) >= CIJ_PERCENT_FLOOR * largest},
    }


def modulus_error_percent(model, reference) -> float:
    """Percent error of a VRH modulus; NaN (a failed check) when either is undefined (singular tensor)."""
    if model is None or reference is None:
        return float('nan')
    return percent_error(model, reference)


def compare_elastic_results(model: dict, reference: dict) -> dict:
    """Cij errors (GPa and %, tensor entries and named constants) and moduli errors of two elastic outputs.

    Per named constant (``constants_gpa``): ``cij_error_gpa`` (model - reference) and ``cij_error_percent``,
    the latter without the constants below :data:`CIJ_PERCENT_FLOOR` of the largest reference constant.
    ``ion_relaxation_mismatch`` (a failed check) when one tensor is relaxed-ion and the other clamped-ion.
    """
    result = compare_elastic(np.array(model['elastic_tensor_gpa']), np.array(reference['elastic_tensor_gpa']))
    result.update(compare_named_constants(model['constants_gpa'], reference['constants_gpa']))
    result['bulk_modulus_error_percent'] = modulus_error_percent(model['bulk_modulus_vrh_gpa'],
                                                                 reference['bulk_modulus_vrh_gpa'])
    result['shear_modulus_error_percent'] = modulus_error_percent(model['shear_modulus_vrh_gpa'],
                                                                  reference['shear_modulus_vrh_gpa'])
    kinds = model.get('clamped_ion'), reference.get('clamped_ion')
    if None not in kinds:  # a relaxed-ion C against a clamped-ion one differs by physics, not by model error
        result['ion_relaxation_mismatch'] = kinds[0] != kinds[1]
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


#: (comparison section, key, kind, threshold key): 'abs_max' fails when |value| > threshold, 'min' when
#: value < threshold, 'false' when the value is True (a mismatch or an instability). A dict value (one entry per
#: elastic constant) is one check per entry, named ``section.key.entry``.
CHECKS = (
    ('eos', 'v0_error_percent', 'abs_max', 'v0_error_percent'),
    ('eos', 'b0_error_percent', 'abs_max', 'b0_error_percent'),
    ('elastic', 'cij_error_percent', 'abs_max', 'cij_error_percent'),
    ('elastic', 'bulk_modulus_error_percent', 'abs_max', 'elastic_error_percent'),
    ('elastic', 'shear_modulus_error_percent', 'abs_max', 'elastic_error_percent'),
    ('elastic', 'ion_relaxation_mismatch', 'false', None),
    ('phonons', 'mae_thz', 'abs_max', 'phonon_mae_thz'),
    ('phonons', 'dos_spearman', 'min', 'dos_spearman'),
    ('phonons', 'imaginary_mismatch', 'false', None),
    ('md_stability', 'drift_mev_per_atom_ps', 'abs_max', 'md_drift_mev_per_atom_ps'),
    ('md_stability', 'unstable', 'false', None),
)


def judge(value, kind: str, limit=None) -> tuple[bool, str]:
    """(passed, what was wrong) of one value; a non-finite number fails whatever the kind."""
    if kind == 'false':
        return not value, f'{value}'
    if not math.isfinite(value):
        return False, f'{value} (not a finite number)'
    if kind == 'abs_max':
        return abs(value) <= limit, f'{value:.4g} (|value| > {limit})'
    return value >= limit, f'{value:.4g} (< {limit})'


def verdict(comparison: dict, thresholds: dict) -> dict:
    """Pass/fail of every check present in ``comparison`` against ``thresholds``, with reasons.

    A check is skipped when its value is None or its threshold is not in ``thresholds`` (the workflow refuses
    unknown threshold names at input time, so a typo cannot skip one). ``passed`` is None when nothing was judged.
    """
    checks, reasons = {}, []
    for section, values in comparison.items():
        if isinstance(values, dict) and values.get('model_failed'):
            checks[f'{section}.model_failed'] = False
            reasons.append(f'{section}.model_failed: the model could not produce it ({values["model_failed"]})')
    for section, key, kind, threshold_key in CHECKS:
        value = comparison.get(section, {}).get(key)
        if value is None or (threshold_key is not None and threshold_key not in thresholds):
            continue
        entries = {f'{section}.{key}.{name}': entry for name, entry in value.items()} if isinstance(value, dict) \
            else {f'{section}.{key}': value}
        for name, entry in entries.items():
            if entry is None:
                continue
            passed, detail = judge(entry, kind, thresholds.get(threshold_key))
            checks[name] = passed
            if not passed:
                reasons.append(f'{name} = {detail}')
    return {'passed': all(checks.values()) if checks else None, 'checks': checks, 'failed': reasons}
