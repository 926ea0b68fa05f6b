"""Transferability analysis: how much worse a model is outside the class it was trained on.

A transferability study trains one model per configuration class (e.g. bulk, surface,
liquid) and tests every model on every class. The results are arranged in a matrix with
models as rows and test classes as columns; the "diagonal" entry of a model is the test
class with the same label as its training class (matched by label, so the matrix need not be
square or ordered). The out-of-class ratio ``mean(off-diagonal) / diagonal`` of each row
summarises the loss of accuracy away from the training distribution (ratio > 1 = worse
out of class). Applied to committee deviations instead of errors, the same ratio tests
whether the model's uncertainty estimate *rises* out of class, which is the premise of
uncertainty-driven active learning. Values are in whatever units the caller uses (e.g.
force RMSE in eV/Å); missing (model, test) combinations are NaN and are ignored.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np

from aiida_mlip.analysis.metrics import energy_per_atom_metrics, error_metrics

__all__ = [
    'committee_errors',
    'error_matrix',
    'leave_one_out_ratio',
    'out_of_class_ratio',
    'transferability_summary',
    'uncertainty_rises_out_of_class',
]


def error_matrix(
    results: Mapping[tuple[Hashable, Hashable], float],
    model_order: Sequence[Hashable] | None = None,
    test_order: Sequence[Hashable] | None = None,
) -> tuple[list, list, np.ndarray]:
    """Arrange ``{(model_class, test_class): value}`` into a 2D array.

    :param results: mapping from (training class of the model, test class) to a finite value.
    :param model_order: optional row order; default is sorted model labels.
    :param test_order: optional column order; default is sorted test labels.
    :returns: ``(model_labels, test_labels, matrix)`` where ``matrix[i, j]`` is the value for
        ``(model_labels[i], test_labels[j])`` and NaN where no result was given.
    :raises ValueError: on empty input, malformed keys, non-finite values, or an explicit order
        that misses or duplicates labels.
    """
    if not results:
        raise ValueError('results is empty')
    for key, value in results.items():
        if not isinstance(key, tuple) or len(key) != 2:
            raise ValueError(f'result keys must be (model_class, test_class) tuples, got {key!r}')
        if not np.isfinite(float(value)):
            raise ValueError(f'result for {key!r} is not finite: {value!r}')
    models_present = {key[0] for key in results}
    tests_present = {key[1] for key in results}

    def _order(given, present, what):
        if given is None:
            return sorted(present, key=str)
        given = list(given)
        if len(set(given)) != len(given):
            raise ValueError(f'{what} contains duplicate labels')
        missing = present - set(given)
        if missing:
            raise ValueError(f'{what} misses labels present in results: {sorted(missing, key=str)}')
        return given

    model_labels = _order(model_order, models_present, 'model_order')
    test_labels = _order(test_order, tests_present, 'test_order')
    matrix = np.full((len(model_labels), len(test_labels)), np.nan)
    row = {label: i for i, label in enumerate(model_labels)}
    col = {label: j for j, label in enumerate(test_labels)}
    for (model, test), value in results.items():
        matrix[row[model], col[test]] = float(value)
    return model_labels, test_labels, matrix


def _check_matrix(matrix, model_labels, test_labels) -> np.ndarray:
    array = np.asarray(matrix, dtype=float)
    if array.ndim != 2:
        raise ValueError(f'matrix must be 2D, got shape {array.shape}')
    if array.shape != (len(model_labels), len(test_labels)):
        raise ValueError(
            f'matrix shape {array.shape} does not match {len(model_labels)} model and {len(test_labels)} test labels'
        )
    if len(set(test_labels)) != len(test_labels) or len(set(model_labels)) != len(model_labels):
        raise ValueError('labels must be unique')
    if np.any(np.isinf(array)):
        raise ValueError('matrix contains infinite values')
    return array


def out_of_class_ratio(matrix, model_labels: Sequence[Hashable], test_labels: Sequence[Hashable]) -> dict:
    """Per model: mean out-of-class value divided by the in-class (diagonal) value.

    For model row ``i`` the in-class value is the column whose test label equals
    ``model_labels[i]``; the out-of-class mean is the mean over all other non-NaN columns.

    :returns: ``{model_label: {'in_class', 'out_of_class_mean', 'ratio'}}``; entries are
        ``None`` when undefined (no matching test label, NaN/zero diagonal, no other column).
    :raises ValueError: on shape/label mismatches or infinite values.
    """
    array = _check_matrix(matrix, model_labels, test_labels)
    col = {label: j for j, label in enumerate(test_labels)}
    output = {}
    for i, model in enumerate(model_labels):
        j = col.get(model)
        in_class = None if j is None or np.isnan(array[i, j]) else float(array[i, j])
        others = [array[i, k] for k in range(array.shape[1]) if k != j and not np.isnan(array[i, k])]
        out_mean = float(np.mean(others)) if others else None
        ratio = None
        if in_class is not None and out_mean is not None and in_class != 0:
            ratio = out_mean / in_class
        output[model] = {'in_class': in_class, 'out_of_class_mean': out_mean, 'ratio': ratio}
    return output


def uncertainty_rises_out_of_class(
    deviation_matrix,
    model_labels: Sequence[Hashable],
    test_labels: Sequence[Hashable],
    min_ratio: float = 1.0,
) -> dict:
    """Check that committee deviation is larger out of class than in class, per model.

    :param deviation_matrix: mean committee deviation (e.g. force std in eV/Å), rows = models
        (by training class), columns = test classes.
    :param min_ratio: a model "rises" when ``out_of_class_mean / in_class > min_ratio``.
    :returns: dict with ``per_model`` (``{label: {'in_class', 'out_of_class_mean', 'ratio',
        'rises'}}``, ``rises`` is ``None`` when the ratio is undefined), ``rises`` (True when
        every model with a defined ratio rises and at least one ratio is defined) and
        ``n_evaluated`` (models with a defined ratio).
    :raises ValueError: on shape/label mismatch, negative deviations or ``min_ratio <= 0``.
    """
    if not np.isfinite(min_ratio) or min_ratio <= 0:
        raise ValueError(f'min_ratio must be positive, got {min_ratio}')
    array = _check_matrix(deviation_matrix, model_labels, test_labels)
    if np.any(array[~np.isnan(array)] < 0):
        raise ValueError('committee deviations must be non-negative')
    per_model = out_of_class_ratio(array, model_labels, test_labels)
    evaluated = 0
    all_rise = True
    for entry in per_model.values():
        if entry['ratio'] is None:
            entry['rises'] = None
            continue
        evaluated += 1
        entry['rises'] = bool(entry['ratio'] > min_ratio)
        all_rise = all_rise and entry['rises']
    return {'per_model': per_model, 'rises': bool(evaluated > 0 and all_rise), 'n_evaluated': evaluated}


def committee_errors(energies, forces, n_atoms, reference_energies, reference_forces) -> dict:
    """Errors of a committee's mean prediction on one test set, and the committee's own spread there.

    :param energies: (M, N) total energies of M members on N frames.
    :param forces: (M, A, 3) forces of M members, the frames' atoms concatenated (A = sum of ``n_atoms``).
    :param reference_energies: (N,) reference (DFT) total energies; ``reference_forces``: (A, 3).
    :returns: ``energy_mae``/``energy_rmse`` per atom, ``forces_mae``/``forces_rmse`` per component (of the
        committee mean), ``committee_force_std`` (root mean square over components of the members' standard
        deviation: directly comparable with ``forces_rmse``, for a calibrated committee the two are close;
        None for one model), ``n_frames``, ``n_models``. Units are those of the inputs.
    :raises ValueError: on inconsistent shapes or non-finite values.
    """
    energies = np.asarray(energies, dtype=float)
    forces = np.asarray(forces, dtype=float)
    n_atoms = np.asarray(n_atoms, dtype=int)
    if energies.ndim != 2 or forces.ndim != 3 or forces.shape[2] != 3:
        raise ValueError(f'energies must be (M, N) and forces (M, A, 3), got {energies.shape} and {forces.shape}')
    if forces.shape[:2] != (energies.shape[0], int(n_atoms.sum())) or len(n_atoms) != energies.shape[1]:
        raise ValueError(f'inconsistent shapes: energies {energies.shape}, forces {forces.shape}, '
                         f'{len(n_atoms)} frames with {int(n_atoms.sum())} atoms')
    reference_forces = np.asarray(reference_forces, dtype=float)
    mean_forces = forces.mean(axis=0)
    energy = energy_per_atom_metrics(energies.mean(axis=0), reference_energies, n_atoms)
    force = error_metrics(mean_forces, reference_forces)
    spread = None
    if energies.shape[0] > 1:
        spread = float(np.sqrt(np.mean(forces.std(axis=0) ** 2)))
    return {
        'energy_mae': energy['mae'], 'energy_rmse': energy['rmse'],
        'forces_mae': force['mae'], 'forces_rmse': force['rmse'],
        'committee_force_std': spread, 'n_frames': int(len(n_atoms)), 'n_models': int(energies.shape[0]),
    }


def leave_one_out_ratio(matrix, model_labels: Sequence[Hashable], test_labels: Sequence[Hashable],
                        prefix: str = 'without_', reference: Hashable = 'all') -> dict:
    """Per left-out class: error of the model trained without it over the error of a model that saw it.

    The row ``f'{prefix}{class}'`` is the model trained on every class but ``class``; the model that saw the
    class is ``reference`` (trained on all classes: the same data plus the class) or, without such a row,
    the in-class model (row label = class).

    :returns: ``{class: {'left_out', 'seen', 'seen_by', 'ratio'}}`` for every class with a leave-one-out row
        (``ratio`` None where undefined).
    """
    array = _check_matrix(matrix, model_labels, test_labels)
    row = {label: i for i, label in enumerate(model_labels)}
    output = {}
    for j, test in enumerate(test_labels):
        left_out_row = row.get(f'{prefix}{test}')
        if left_out_row is None:
            continue
        seen_by = reference if reference in row else (test if test in row else None)
        left_out = None if np.isnan(array[left_out_row, j]) else float(array[left_out_row, j])
        seen = None if seen_by is None or np.isnan(array[row[seen_by], j]) else float(array[row[seen_by], j])
        ratio = left_out / seen if left_out is not None and seen else None
        output[test] = {'left_out': left_out, 'seen': seen, 'seen_by': seen_by, 'ratio': ratio}
    return output


#: The per-(model, test class) scores arranged as matrices by :func:`transferability_summary`.
MATRIX_KEYS = ('energy_mae', 'energy_rmse', 'forces_mae', 'forces_rmse', 'committee_force_std')


def transferability_summary(scores: Mapping[tuple[Hashable, Hashable], dict], model_order: Sequence[Hashable],
                            test_order: Sequence[Hashable], min_ratio: float = 1.0) -> dict:
    """The whole study from ``{(model, test class): committee_errors(...)}``: matrices and their verdicts.

    :returns: ``models``, ``classes``, one matrix (list of rows, None where missing) per key of
        :data:`MATRIX_KEYS`, ``calibration`` (committee_force_std / forces_rmse per cell),
        ``out_of_class_ratio`` (forces and energy RMSE, per model), ``uncertainty`` (does the committee
        spread rise out of class: :func:`uncertainty_rises_out_of_class` on the spread matrix, and whether
        the true force error rises too) and ``leave_one_out`` (:func:`leave_one_out_ratio` on forces and
        energy RMSE).
    """
    models, classes = list(model_order), list(test_order)
    matrices = {}
    for key in MATRIX_KEYS:
        values = {pair: score[key] for pair, score in scores.items() if score.get(key) is not None}
        matrices[key] = (error_matrix(values, models, classes)[2] if values
                         else np.full((len(models), len(classes)), np.nan))
    with np.errstate(divide='ignore', invalid='ignore'):
        calibration = np.where(matrices['forces_rmse'] > 0,
                               matrices['committee_force_std'] / matrices['forces_rmse'], np.nan)
    summary = {'models': models, 'classes': classes}
    summary.update({key: _rows(matrix) for key, matrix in matrices.items()})
    summary['calibration'] = _rows(calibration)
    summary['out_of_class_ratio'] = {
        'forces_rmse': out_of_class_ratio(matrices['forces_rmse'], models, classes),
        'energy_rmse': out_of_class_ratio(matrices['energy_rmse'], models, classes),
    }
    uncertainty = {'per_model': {}, 'rises': False, 'n_evaluated': 0}
    if not np.all(np.isnan(matrices['committee_force_std'])):
        uncertainty = uncertainty_rises_out_of_class(matrices['committee_force_std'], models, classes, min_ratio)
    error_ratios = summary['out_of_class_ratio']['forces_rmse']
    for model, entry in uncertainty['per_model'].items():
        error_ratio = error_ratios[model]['ratio']
        entry['error_ratio'] = error_ratio
        entry['error_rises'] = None if error_ratio is None else bool(error_ratio > min_ratio)
    uncertainty['min_ratio'] = float(min_ratio)
    summary['uncertainty'] = uncertainty
    summary['leave_one_out'] = {
        'forces_rmse': leave_one_out_ratio(matrices['forces_rmse'], models, classes),
        'energy_rmse': leave_one_out_ratio(matrices['energy_rmse'], models, classes),
    }
    return summary


def _rows(matrix: np.ndarray) -> list:
    """Nested lists with None for NaN (JSON has no NaN)."""
    return [[None if np.isnan(value) else float(value) for value in row] for row in matrix]
