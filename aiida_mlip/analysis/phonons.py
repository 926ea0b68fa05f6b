"""Phonon analysis on frequency arrays: imaginary-mode detection and model-vs-reference comparison.

The workflows compute phonons with phonopy elsewhere; this module only works on the
resulting numbers (numpy only). Frequencies are in THz and follow the phonopy convention:
an imaginary frequency ``i|w|`` (negative eigenvalue of the dynamical matrix, i.e. a
dynamical instability) is reported as the negative real number ``-|w|``. Band arrays have
shape ``(n_qpoints, n_bands)``; phonopy's band structure gives one such array per path
segment, and lists of segments are stacked automatically. Comparisons sort the bands at each
q-point before comparing so that band crossings/ordering differences between the model and
the reference do not create spurious errors.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    'IMAGINARY_THRESHOLD_THZ',
    'band_centre_shift_percent',
    'compare_band_frequencies',
    'dos_spearman',
    'find_imaginary_modes',
]

#: Frequencies (THz) below this value are counted as imaginary modes. Not zero, because the
#: three acoustic modes at and near Gamma are zero only up to numerical noise (finite
#: displacements, incomplete acoustic sum rule, interpolation), which routinely shows up as
#: tiny negative values of order -0.01 THz; genuine instabilities are usually much larger.
IMAGINARY_THRESHOLD_THZ = -0.05


def _band_array(frequencies, name: str) -> np.ndarray:
    """Convert (n_q, n_bands) data, or a list of such segments, to one finite 2D array."""
    if isinstance(frequencies, (list, tuple)) and len(frequencies) > 0:
        pieces = [np.asarray(piece, dtype=float) for piece in frequencies]
        if all(piece.ndim == 2 for piece in pieces):
            n_bands = {piece.shape[1] for piece in pieces}
            if len(n_bands) != 1:
                raise ValueError(f'{name}: path segments have different numbers of bands {sorted(n_bands)}')
            array = np.vstack(pieces)
        else:
            array = np.asarray(frequencies, dtype=float)
    else:
        array = np.asarray(frequencies, dtype=float)
    if array.ndim == 1:
        array = array[np.newaxis, :]
    if array.ndim != 2 or array.size == 0:
        raise ValueError(f'{name} must have shape (n_qpoints, n_bands), got {array.shape}')
    if not np.all(np.isfinite(array)):
        raise ValueError(f'{name} contains non-finite values')
    return array


def find_imaginary_modes(frequencies, qpoints=None, threshold: float = IMAGINARY_THRESHOLD_THZ) -> dict:
    """Detect imaginary (negative, in phonopy convention) phonon modes.

    :param frequencies: THz, shape ``(n_qpoints, n_bands)`` or a list of such path segments.
    :param qpoints: optional ``(n_qpoints, 3)`` q-point coordinates (reciprocal lattice units);
        if given, the coordinates of the unstable q-points are returned too.
    :param threshold: THz, must be <= 0; modes strictly below it are imaginary.
    :returns: dict with ``has_imaginary`` (bool), ``count`` (number of (q, band) entries below
        threshold), ``min_frequency`` (THz, the most negative value of all modes),
        ``qpoint_indices`` (sorted indices of q-points with at least one imaginary mode) and,
        if ``qpoints`` was given, ``qpoints`` (their coordinates).
    :raises ValueError: on malformed input or a positive threshold.
    """
    if not np.isfinite(threshold) or threshold > 0:
        raise ValueError(f'threshold must be a finite value <= 0 THz, got {threshold}')
    freqs = _band_array(frequencies, 'frequencies')
    mask = freqs < threshold
    q_indices = np.flatnonzero(mask.any(axis=1))
    result = {
        'has_imaginary': bool(mask.any()),
        'count': int(mask.sum()),
        'min_frequency': float(freqs.min()),
        'qpoint_indices': [int(i) for i in q_indices],
    }
    if qpoints is not None:
        q = _band_array(qpoints, 'qpoints')
        if q.shape != (freqs.shape[0], 3):
            raise ValueError(f'qpoints must have shape ({freqs.shape[0]}, 3), got {q.shape}')
        result['qpoints'] = q[q_indices].tolist()
    return result


def compare_band_frequencies(freq_model, freq_ref) -> dict:
    """MAE, RMSE and max absolute difference (THz) between model and reference bands.

    Both arrays must have the same shape ``(n_qpoints, n_bands)`` (same q-points). Bands are
    sorted by frequency at each q-point before the element-wise comparison.

    :raises ValueError: on shape mismatch or non-finite values.
    """
    model = np.sort(_band_array(freq_model, 'freq_model'), axis=1)
    ref = np.sort(_band_array(freq_ref, 'freq_ref'), axis=1)
    if model.shape != ref.shape:
        raise ValueError(f'freq_model shape {model.shape} does not match freq_ref shape {ref.shape}')
    diff = model - ref
    return {
        'mae_thz': float(np.mean(np.abs(diff))),
        'rmse_thz': float(np.sqrt(np.mean(diff**2))),
        'max_abs_thz': float(np.max(np.abs(diff))),
    }


def dos_spearman(dos_model, dos_ref) -> float:
    """Spearman rank correlation between two phonon DOS curves on the same frequency grid.

    A shape similarity measure (1 = same ordering of DOS values) insensitive to the overall
    normalisation of the DOS, which differs between codes/settings.

    :raises ValueError: on length mismatch, negative DOS, or constant curves.
    """
    from .metrics import spearman

    model = np.asarray(dos_model, dtype=float).ravel()
    ref = np.asarray(dos_ref, dtype=float).ravel()
    if model.size != ref.size:
        raise ValueError(f'DOS curves have different lengths ({model.size} vs {ref.size}); use the same grid')
    if np.any(model < -1e-12) or np.any(ref < -1e-12):
        raise ValueError('DOS values must be non-negative')
    return spearman(model, ref)


def band_centre_shift_percent(freq_model, freq_ref) -> float:
    """Signed relative shift (%) of the mean phonon frequency of the model vs the reference.

    The band centre is the arithmetic mean of all (q-point, band) frequencies in THz — on a
    uniform q-mesh this is the first moment of the phonon DOS. A positive value means the
    model is stiffer than the reference on average.

    :raises ValueError: on shape mismatch or a non-positive reference centre.
    """
    model = _band_array(freq_model, 'freq_model')
    ref = _band_array(freq_ref, 'freq_ref')
    if model.shape != ref.shape:
        raise ValueError(f'freq_model shape {model.shape} does not match freq_ref shape {ref.shape}')
    centre_ref = float(ref.mean())
    if centre_ref <= 0:
        raise ValueError(f'reference band centre must be positive, got {centre_ref} THz')
    return float(100.0 * (model.mean() - centre_ref) / centre_ref)
