"""Error statistics for comparing MLIP predictions with reference (DFT) labels.

All functions take plain numbers / numpy arrays and return plain Python dicts of
floats (JSON-serialisable, so a workflow can store them directly). Units are whatever
the caller passes in (eV, eV/atom, eV/Å, GPa ...); the functions never convert units,
except :func:`energy_per_atom_metrics`, which divides total energies by the number of
atoms so that structures of different size are comparable. Non-finite values (NaN, inf)
raise ``ValueError`` instead of silently propagating, because a NaN in a prediction
usually means a broken model or parser and must not be averaged away. Also provided:
grouping helpers (per configuration type, per chemical element), Spearman rank
correlation and a binned calibration curve for committee (ensemble) uncertainties.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import numpy as np

__all__ = [
    'calibration_curve',
    'energy_per_atom_metrics',
    'error_metrics',
    'force_metrics',
    'grouped_metrics',
    'per_element_force_metrics',
    'spearman',
    'stress_metrics',
]


def _finite_array(values, name: str) -> np.ndarray:
    """Return ``values`` as a float array, raising ``ValueError`` on non-numeric or non-finite data."""
    try:
        array = np.asarray(values, dtype=float)
    except (TypeError, ValueError) as exc:
        raise ValueError(f'{name} must be numeric array-like: {exc}') from exc
    if not np.all(np.isfinite(array)):
        n_bad = int(np.count_nonzero(~np.isfinite(array)))
        raise ValueError(f'{name} contains {n_bad} non-finite value(s) (NaN or inf)')
    return array


def error_metrics(predicted, reference) -> dict:
    """Return MAE, RMSE, R², max absolute error and count of ``predicted - reference``.

    Arrays of any (identical) shape are flattened, so the metrics are per scalar
    component, in the units of the inputs. ``r2`` is the coefficient of determination
    ``1 - SS_res / SS_tot`` computed against the mean of the reference; it is ``None``
    when the reference has zero variance (undefined) unless the prediction is exact,
    in which case it is 1.0.

    :raises ValueError: on shape mismatch, empty input or NaN/inf values.
    """
    pred = _finite_array(predicted, 'predicted')
    ref = _finite_array(reference, 'reference')
    if pred.shape != ref.shape:
        raise ValueError(f'predicted shape {pred.shape} does not match reference shape {ref.shape}')
    pred = pred.ravel()
    ref = ref.ravel()
    if pred.size == 0:
        raise ValueError('cannot compute error metrics of empty arrays')

    diff = pred - ref
    abs_diff = np.abs(diff)
    ss_res = float(np.sum(diff**2))
    ss_tot = float(np.sum((ref - ref.mean()) ** 2))
    if ss_tot > 0.0:
        r2 = 1.0 - ss_res / ss_tot
    elif ss_res == 0.0:
        r2 = 1.0
    else:
        r2 = None
    return {
        'mae': float(abs_diff.mean()),
        'rmse': float(np.sqrt(np.mean(diff**2))),
        'r2': None if r2 is None else float(r2),
        'max_abs': float(abs_diff.max()),
        'count': int(pred.size),
    }


def energy_per_atom_metrics(pred_energies, ref_energies, n_atoms) -> dict:
    """Error metrics of total energies after dividing each by its number of atoms.

    Energies in eV give metrics in eV/atom. Per-atom normalisation is the standard way to
    compare energies of structures of different size (a 1 meV/atom error in a 100-atom cell
    is a 100 meV total-energy error).

    :raises ValueError: on length mismatch or non-positive atom counts.
    """
    pred = _finite_array(pred_energies, 'pred_energies')
    ref = _finite_array(ref_energies, 'ref_energies')
    natoms = _finite_array(n_atoms, 'n_atoms')
    if pred.ndim != 1 or ref.ndim != 1 or natoms.ndim != 1:
        raise ValueError('pred_energies, ref_energies and n_atoms must be one-dimensional')
    if not pred.shape == ref.shape == natoms.shape:
        raise ValueError(
            f'length mismatch: {pred.size} predicted, {ref.size} reference energies, {natoms.size} atom counts'
        )
    if np.any(natoms <= 0) or np.any(natoms != np.round(natoms)):
        raise ValueError('n_atoms must contain positive integers')
    return error_metrics(pred / natoms, ref / natoms)


def _check_force_lists(pred_forces_list, ref_forces_list) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Validate two lists of (n_i, 3) force arrays and return them as float arrays."""
    if len(pred_forces_list) != len(ref_forces_list):
        raise ValueError(
            f'got {len(pred_forces_list)} predicted but {len(ref_forces_list)} reference force arrays'
        )
    if len(pred_forces_list) == 0:
        raise ValueError('no force arrays given')
    preds, refs = [], []
    for index, (pred, ref) in enumerate(zip(pred_forces_list, ref_forces_list)):
        pred = _finite_array(pred, f'predicted forces of structure {index}')
        ref = _finite_array(ref, f'reference forces of structure {index}')
        if pred.ndim != 2 or pred.shape[1] != 3:
            raise ValueError(f'predicted forces of structure {index} have shape {pred.shape}, expected (n_atoms, 3)')
        if pred.shape != ref.shape:
            raise ValueError(
                f'structure {index}: predicted forces shape {pred.shape} != reference shape {ref.shape}'
            )
        preds.append(pred)
        refs.append(ref)
    return preds, refs


def force_metrics(pred_forces_list, ref_forces_list) -> dict:
    """Component-wise force error metrics over a list of structures.

    Each list entry is an ``(n_atoms_i, 3)`` array (eV/Å); all Cartesian components of all
    atoms of all structures are pooled, which is the convention used in MLIP papers
    (force MAE/RMSE "per component").

    :raises ValueError: on list-length or per-structure shape mismatches.
    """
    preds, refs = _check_force_lists(pred_forces_list, ref_forces_list)
    return error_metrics(np.concatenate(preds), np.concatenate(refs))


def _stress_to_voigt_array(stress, name: str) -> np.ndarray:
    """Convert a 3x3 or Voigt-6 stress to a Voigt-6 vector (xx, yy, zz, yz, xz, xy)."""
    array = _finite_array(stress, name)
    if array.shape == (6,):
        return array
    if array.shape == (3, 3):
        if not np.allclose(array, array.T, rtol=1e-6, atol=1e-8 * max(1.0, np.abs(array).max())):
            raise ValueError(f'{name} is a non-symmetric 3x3 tensor')
        return np.array([array[0, 0], array[1, 1], array[2, 2], array[1, 2], array[0, 2], array[0, 1]])
    raise ValueError(f'{name} has shape {array.shape}, expected (3, 3) or Voigt (6,)')


def stress_metrics(pred_stresses, ref_stresses) -> dict:
    """Error metrics over the six independent stress components of a list of structures.

    Each entry may be a symmetric 3x3 tensor or a Voigt 6-vector (xx, yy, zz, yz, xz, xy);
    both are reduced to the 6 independent components so that shear components are not
    double-counted. Units are those of the inputs (typically GPa or eV/Å³).

    :raises ValueError: on length mismatch, wrong shapes or non-symmetric tensors.
    """
    if len(pred_stresses) != len(ref_stresses):
        raise ValueError(f'got {len(pred_stresses)} predicted but {len(ref_stresses)} reference stresses')
    if len(pred_stresses) == 0:
        raise ValueError('no stresses given')
    pred = [_stress_to_voigt_array(s, f'predicted stress {i}') for i, s in enumerate(pred_stresses)]
    ref = [_stress_to_voigt_array(s, f'reference stress {i}') for i, s in enumerate(ref_stresses)]
    return error_metrics(np.array(pred), np.array(ref))


def grouped_metrics(pred, ref, keys: Sequence[Hashable]) -> dict:
    """Error metrics computed separately for every distinct value of ``keys``.

    ``pred[i]``, ``ref[i]`` and ``keys[i]`` describe item ``i`` (e.g. one structure and its
    ``config_type``); items may be scalars or arrays (e.g. per-structure forces), in which
    case all components within a group are pooled. Used to show whether a model is much
    worse on some classes of configurations (surfaces, high temperature ...) than others.

    :returns: ``{key: error_metrics(...)}`` with keys in order of first appearance.
    :raises ValueError: on length mismatch or empty input.
    """
    if not len(pred) == len(ref) == len(keys):
        raise ValueError(f'length mismatch: {len(pred)} predicted, {len(ref)} reference, {len(keys)} keys')
    if len(keys) == 0:
        raise ValueError('no items given')
    groups: dict = {}
    for index, key in enumerate(keys):
        p = _finite_array(pred[index], f'predicted item {index}')
        r = _finite_array(ref[index], f'reference item {index}')
        if p.shape != r.shape:
            raise ValueError(f'item {index}: predicted shape {p.shape} != reference shape {r.shape}')
        groups.setdefault(key, ([], []))
        groups[key][0].append(p.ravel())
        groups[key][1].append(r.ravel())
    return {key: error_metrics(np.concatenate(p), np.concatenate(r)) for key, (p, r) in groups.items()}


def per_element_force_metrics(pred_forces_list, ref_forces_list, symbols_list) -> dict:
    """Component-wise force error metrics separately for each chemical element.

    ``symbols_list[i]`` is the list of chemical symbols of structure ``i`` (length
    ``n_atoms_i``). Forces in eV/Å. Element-resolved errors show whether a model is poorly
    trained for a minority species that a pooled metric would hide.

    :returns: ``{symbol: error_metrics(...)}`` with symbols sorted alphabetically.
    :raises ValueError: on any length/shape mismatch.
    """
    preds, refs = _check_force_lists(pred_forces_list, ref_forces_list)
    if len(symbols_list) != len(preds):
        raise ValueError(f'got {len(symbols_list)} symbol lists for {len(preds)} structures')
    pooled: dict[str, tuple[list, list]] = {}
    for index, (pred, ref, symbols) in enumerate(zip(preds, refs, symbols_list)):
        symbols = list(symbols)
        if len(symbols) != pred.shape[0]:
            raise ValueError(f'structure {index}: {len(symbols)} symbols but {pred.shape[0]} force rows')
        symbols_array = np.array(symbols, dtype=object)
        for symbol in dict.fromkeys(symbols):
            mask = symbols_array == symbol
            pooled.setdefault(symbol, ([], []))
            pooled[symbol][0].append(pred[mask])
            pooled[symbol][1].append(ref[mask])
    return {
        symbol: error_metrics(np.concatenate(pooled[symbol][0]), np.concatenate(pooled[symbol][1]))
        for symbol in sorted(pooled)
    }


def spearman(x, y) -> float:
    """Spearman rank correlation coefficient between two 1D samples (dimensionless, [-1, 1]).

    Ties receive their average rank (``scipy.stats.spearmanr``). Rank correlation is used
    where only the ordering matters, e.g. whether a larger committee deviation goes with a
    larger true error, or whether two phonon DOS curves have the same shape.

    :raises ValueError: on length mismatch, fewer than 2 points, NaN, or a constant input
        (for which the correlation is undefined).
    """
    from scipy.stats import spearmanr

    x = _finite_array(x, 'x').ravel()
    y = _finite_array(y, 'y').ravel()
    if x.size != y.size:
        raise ValueError(f'x has {x.size} values but y has {y.size}')
    if x.size < 2:
        raise ValueError('spearman needs at least 2 points')
    if np.all(x == x[0]) or np.all(y == y[0]):
        raise ValueError('spearman correlation is undefined for a constant input')
    return float(spearmanr(x, y).statistic)


def calibration_curve(predicted_std, true_error, n_bins: int = 10) -> dict:
    """Binned calibration of a predicted uncertainty against the observed error.

    Samples are sorted by ``predicted_std`` (e.g. committee standard deviation of the force
    or energy) and split into ``n_bins`` bins of (nearly) equal count. For each bin the mean
    predicted std and the RMSE of ``true_error`` (signed or absolute prediction error, same
    units as the std) are returned. For a well-calibrated Gaussian uncertainty
    ``bin_rmse ≈ bin_mean_std``; ``bin_rmse`` growing with ``bin_mean_std`` at least means
    the uncertainty ranks errors correctly, which is what active learning relies on.

    :returns: dict with lists ``bin_mean_std``, ``bin_rmse`` and ``counts``.
    :raises ValueError: on length mismatch, negative std, ``n_bins < 1`` or fewer samples
        than bins.
    """
    std = _finite_array(predicted_std, 'predicted_std').ravel()
    err = _finite_array(true_error, 'true_error').ravel()
    if std.size != err.size:
        raise ValueError(f'predicted_std has {std.size} values but true_error has {err.size}')
    if int(n_bins) != n_bins or n_bins < 1:
        raise ValueError(f'n_bins must be a positive integer, got {n_bins}')
    n_bins = int(n_bins)
    if std.size < n_bins:
        raise ValueError(f'need at least n_bins={n_bins} samples, got {std.size}')
    if np.any(std < 0):
        raise ValueError('predicted_std must be non-negative')
    order = np.argsort(std, kind='stable')
    bin_mean_std, bin_rmse, counts = [], [], []
    for indices in np.array_split(order, n_bins):
        bin_mean_std.append(float(std[indices].mean()))
        bin_rmse.append(float(np.sqrt(np.mean(err[indices] ** 2))))
        counts.append(int(indices.size))
    return {'bin_mean_std': bin_mean_std, 'bin_rmse': bin_rmse, 'counts': counts}
