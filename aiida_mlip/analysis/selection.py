"""Candidate selection and uncertainty calibration for active learning by committee (pure numpy/ASE, no AiiDA).

The loop of :class:`aiida_mlip.workflows.active_learning.ActiveLearningWorkChain` (docs/sources.md, "Active learning by
committee") explores with MD driven by a committee, and every saved frame carries the committee's **max force
deviation** ``max_i |sigma_F,i|`` (eV/Å; the largest per-atom norm of the standard deviation of the members'
forces). This module decides which frames go to DFT:

1. **Trust window** (:func:`classify_frames`): a frame with deviation ``< lo`` is already described by the committee
   (``below``), one in ``[lo, hi]`` is a candidate (``window``), one ``> hi`` is discarded (``above``): when the
   members disagree by that much the MD has left the region where the model is meaningful, the geometry is usually
   unphysical, and a DFT label of it teaches nothing useful (it may not even converge). Frames with a non-finite
   deviation (a blown-up trajectory) are ``invalid``. Optionally an energy criterion flags frames below ``lo`` whose
   committee energy standard deviation per atom exceeds ``energy_threshold`` (docs/sources.md: 0.015 eV/atom).
2. **Diversity** (:func:`farthest_point_sampling` on :func:`frame_descriptors`): consecutive MD frames are
   correlated, so the in-window frames are thinned to ``max_candidates`` by greedy farthest-point sampling in a
   simple structural descriptor, the Gaussian-smeared pair-distance distribution per atom (one channel per element
   pair, distances up to ``r_max``). It is invariant to rotations, translations and permutations, sees volume
   changes and local distortions, and costs one neighbour list per frame. The first point is drawn with
   ``numpy.random.default_rng(seed)``, every later one is the frame farthest from all chosen ones (ties: lowest
   index), so the same inputs always give the same selection. Frames identical to a chosen one (distance ~0, e.g.
   the step-0 frame of the same cell at two temperatures) are never chosen twice.
3. **Stop rule** (:func:`exploration_verdict`): converged when the fraction of explored frames inside the window
   (the *candidate fraction*) falls below ``min_fraction`` -- and the fraction beyond the window does too, because
   a committee whose MD runs away above ``hi`` is not converged either. With no frame in the window but many above
   it the loop cannot progress (``stalled``).

:func:`calibration_summary` checks the committee afterwards on the freshly labeled frames (docs/sources.md: ensembles can
be over-confident out of distribution): Spearman rank correlation between the deviation and the true max force
error, and a binned calibration curve.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np

from aiida_mlip.analysis.metrics import calibration_curve, spearman

__all__ = [
    'BELOW', 'WINDOW', 'ABOVE', 'INVALID', 'CLASSES',
    'classify_frames', 'pair_distance_descriptor', 'frame_descriptors', 'atoms_descriptors', 'farthest_point_sampling',
    'select_candidates', 'exploration_verdict', 'max_force_error', 'calibration_summary', 'trust_window_problem',
]

BELOW, WINDOW, ABOVE, INVALID = 'below', 'window', 'above', 'invalid'
CLASSES = (BELOW, WINDOW, ABOVE, INVALID)

#: Descriptor defaults: distances up to 5 Å (first and second neighbour shells of most solids), 0.1 Å smearing
#: (thermal spread of bond lengths at a few hundred K), 0.05 Å grid.
DEFAULT_R_MAX = 5.0
DEFAULT_SIGMA = 0.1
DEFAULT_SPACING = 0.05
#: Descriptor distance below which two frames count as the same structure (never selected twice).
DUPLICATE_TOLERANCE = 1e-6

#: Fewest frames for which a Spearman coefficient is reported. With n frames even a perfect rank agreement has
#: the exact two-sided p-value 2/n!: 0.33 (n=3), 0.083 (n=4), 0.017 (n=5); below 5 frames it is noise.
MIN_CALIBRATION_FRAMES = 5
DEFAULT_CALIBRATION_BINS = 5


def trust_window_problem(window) -> Optional[str]:
    """Why ``window`` is not a valid ``[lo, hi]`` trust window in eV/Å (``0 <= lo < hi``, finite), or None."""
    values = list(window) if window is not None else []
    if len(values) != 2:
        return f'trust_window must be two numbers [lo, hi] in eV/Å, got {values}'
    try:
        lo, hi = (float(v) for v in values)
    except (TypeError, ValueError):
        return f'trust_window must be two numbers [lo, hi] in eV/Å, got {values}'
    if any(isinstance(v, bool) for v in values) or not (math.isfinite(lo) and math.isfinite(hi)):
        return f'trust_window must be two finite numbers [lo, hi] in eV/Å, got {values}'
    if not 0 <= lo < hi:
        return f'trust_window must satisfy 0 <= lo < hi (eV/Å), got lo = {lo:g}, hi = {hi:g}'
    return None


def classify_frames(deviations, lo: float, hi: float, energy_std_per_atom=None,
                    energy_threshold: Optional[float] = None) -> np.ndarray:
    """Class of every frame: ``below``, ``window``, ``above`` or ``invalid`` (see the module docstring).

    :param deviations: max force deviation per frame (eV/Å).
    :param lo, hi: the trust window (eV/Å), ``0 <= lo < hi``; both bounds belong to the window.
    :param energy_std_per_atom: committee energy standard deviation per atom and frame (eV/atom), optional.
    :param energy_threshold: frames below ``lo`` but with ``energy_std_per_atom > energy_threshold`` are candidates.
    """
    problem = trust_window_problem([lo, hi])
    if problem:
        raise ValueError(problem)
    deviations = np.asarray(deviations, dtype=float).ravel()
    classes = np.full(deviations.shape, BELOW, dtype=object)
    finite = np.isfinite(deviations)
    classes[finite & (deviations >= lo) & (deviations <= hi)] = WINDOW
    classes[finite & (deviations > hi)] = ABOVE
    if energy_threshold is not None:
        if energy_std_per_atom is None:
            raise ValueError('energy_threshold needs energy_std_per_atom')
        energy = np.asarray(energy_std_per_atom, dtype=float).ravel()
        if energy.shape != deviations.shape:
            raise ValueError(f'{energy.size} energy deviations for {deviations.size} force deviations')
        finite &= np.isfinite(energy)
        classes[(classes == BELOW) & finite & (energy > float(energy_threshold))] = WINDOW
    classes[~finite] = INVALID
    return classes


def pair_distance_descriptor(numbers, positions, cell, pbc, pairs: Sequence[tuple], r_max: float = DEFAULT_R_MAX,
                             sigma: float = DEFAULT_SIGMA, spacing: float = DEFAULT_SPACING) -> np.ndarray:
    """Gaussian-smeared distribution of interatomic distances per atom, one channel per element pair.

    ``pairs`` lists the channels as sorted tuples of atomic numbers ``(Z1, Z2)`` with ``Z1 <= Z2``; a pair of the
    frame absent from ``pairs`` raises. Each ordered neighbour pair within ``r_max`` (periodic images included)
    adds a unit Gaussian of width ``sigma`` at its distance; the sum is divided by the number of atoms, so cells of
    different size (a primitive cell and its supercell) have the same descriptor.
    """
    from ase import Atoms
    from ase.neighborlist import neighbor_list

    atoms = Atoms(numbers=numbers, positions=positions, cell=cell, pbc=pbc)
    grid = np.arange(0.0, r_max + 0.5 * spacing, spacing)
    channel = {tuple(pair): index for index, pair in enumerate(pairs)}
    descriptor = np.zeros((len(pairs), len(grid)))
    if len(atoms) > 1 or any(atoms.pbc):
        first, second, distances = neighbor_list('ijd', atoms, r_max)
        z = atoms.numbers
        for i, j, d in zip(first, second, distances):
            key = (min(z[i], z[j]), max(z[i], z[j]))
            if key not in channel:
                raise ValueError(f'element pair {key} is not among the descriptor channels {list(pairs)}')
            descriptor[channel[key]] += np.exp(-0.5 * ((grid - d) / sigma) ** 2)
    return (descriptor / max(len(atoms), 1)).ravel()


def frame_descriptors(frames, r_max: float = DEFAULT_R_MAX, sigma: float = DEFAULT_SIGMA,
                      spacing: float = DEFAULT_SPACING) -> np.ndarray:
    """Descriptors (n_frames, n_features) of ``frames``: tuples ``(numbers, positions, cell, pbc)``.

    The channels are all element pairs that occur in any frame, so frames of different compositions share one space.
    """
    frames = list(frames)
    elements = sorted({int(z) for numbers, *_ in frames for z in numbers})
    pairs = [(a, b) for index, a in enumerate(elements) for b in elements[index:]]
    if not frames:
        return np.zeros((0, 0))
    return np.array([pair_distance_descriptor(n, p, c, b, pairs, r_max, sigma, spacing) for n, p, c, b in frames])


def atoms_descriptors(atoms_list, r_max: float = DEFAULT_R_MAX, sigma: float = DEFAULT_SIGMA,
                      spacing: float = DEFAULT_SPACING) -> np.ndarray:
    """:func:`frame_descriptors` of a list of ``ase.Atoms``."""
    return frame_descriptors([(a.numbers, a.positions, a.cell.array, a.pbc) for a in atoms_list], r_max, sigma,
                             spacing)


def farthest_point_sampling(descriptors, count: int, seed, tolerance: float = DUPLICATE_TOLERANCE) -> list:
    """Indices of up to ``count`` mutually distant rows of ``descriptors`` (greedy max-min, Euclidean).

    The first index is drawn with ``numpy.random.default_rng(seed)`` (an int or a sequence of ints, e.g.
    ``[seed, volume index]``); each next one maximises the distance to the
    nearest already chosen row (ties: the lowest index). Rows within ``tolerance`` of a chosen row are never chosen,
    so fewer than ``count`` indices come back when the rows hold fewer distinct structures. Returned in pick order.
    """
    descriptors = np.asarray(descriptors, dtype=float)
    n = len(descriptors)
    if count < 0:
        raise ValueError(f'count must be >= 0, got {count}')
    if n == 0 or count == 0:
        return []
    descriptors = descriptors.reshape(n, -1)
    rng = np.random.default_rng(seed)
    chosen = [int(rng.integers(n))]
    nearest = np.linalg.norm(descriptors - descriptors[chosen[0]], axis=1)
    while len(chosen) < min(count, n):
        candidate = int(np.argmax(nearest))
        if nearest[candidate] <= tolerance:
            break
        chosen.append(candidate)
        nearest = np.minimum(nearest, np.linalg.norm(descriptors - descriptors[candidate], axis=1))
    return chosen


def select_candidates(deviations, descriptors, lo: float, hi: float, max_candidates: int, seed: int,
                      energy_std_per_atom=None, energy_threshold: Optional[float] = None) -> dict:
    """Window filter, then farthest-point sampling of the in-window frames down to ``max_candidates``.

    :returns: dict with ``classes`` (array per frame), ``counts`` (per class), ``n_frames``, ``candidate_fraction``
        (in-window / all frames), ``untrusted_fraction`` ((above + invalid) / all frames), ``window_indices`` and
        ``selected`` (frame indices in pick order, a subset of ``window_indices``).
    """
    if int(max_candidates) < 1:
        raise ValueError(f'max_candidates must be >= 1, got {max_candidates}')
    classes = classify_frames(deviations, lo, hi, energy_std_per_atom, energy_threshold)
    n_frames = len(classes)
    descriptors = np.asarray(descriptors, dtype=float).reshape(n_frames, -1) if n_frames else np.zeros((0, 0))
    window = np.flatnonzero(classes == WINDOW)
    picked = farthest_point_sampling(descriptors[window], int(max_candidates), seed) if len(window) else []
    counts = {name: int(np.count_nonzero(classes == name)) for name in CLASSES}
    return {
        'classes': classes,
        'counts': counts,
        'n_frames': n_frames,
        'candidate_fraction': counts[WINDOW] / n_frames if n_frames else 0.0,
        'untrusted_fraction': (counts[ABOVE] + counts[INVALID]) / n_frames if n_frames else 0.0,
        'window_indices': [int(i) for i in window],
        'selected': [int(window[i]) for i in picked],
    }


def exploration_verdict(counts: dict, min_fraction: float) -> dict:
    """``{'status': 'converged' | 'continue' | 'stalled', 'reason': str}`` from the class counts of one exploration.

    * ``converged``: nothing uncertain at all, or both the candidate fraction and the fraction beyond the window
      below ``min_fraction`` (the loop stops normally; frames still in the window are not labeled);
    * ``stalled``: no frame inside the window but at least ``min_fraction`` beyond it (or invalid): there is nothing
      trustworthy to label and exploring again with the same committee cannot help;
    * ``continue``: label the selected candidates and retrain.
    """
    if not 0 <= min_fraction <= 1:
        raise ValueError(f'min_fraction must lie in [0, 1], got {min_fraction}')
    n_frames = sum(int(counts.get(name, 0)) for name in CLASSES)
    n_window = int(counts.get(WINDOW, 0))
    n_untrusted = int(counts.get(ABOVE, 0)) + int(counts.get(INVALID, 0))
    if n_frames == 0:
        return {'status': 'stalled', 'reason': 'the exploration saved no frame'}
    window_fraction, untrusted_fraction = n_window / n_frames, n_untrusted / n_frames
    if n_window == 0 and n_untrusted == 0:
        return {'status': 'converged', 'reason': f'all {n_frames} explored frames are below the trust window'}
    if window_fraction < min_fraction and untrusted_fraction < min_fraction:
        return {'status': 'converged',
                'reason': f'{window_fraction:.1%} of the explored frames inside the trust window and '
                          f'{untrusted_fraction:.1%} beyond it, both below {min_fraction:.1%}'}
    if n_window == 0:
        return {'status': 'stalled',
                'reason': f'no frame inside the trust window but {untrusted_fraction:.1%} of the {n_frames} explored '
                          'frames beyond it (or non-finite): nothing trustworthy to label; lower the exploration '
                          'temperatures or strains, raise the upper bound of the window, or add seed data'}
    return {'status': 'continue',
            'reason': f'{n_window} of {n_frames} explored frames ({window_fraction:.1%}) inside the trust window'}


def max_force_error(predicted_forces, reference_forces, n_atoms) -> np.ndarray:
    """Per frame the largest per-atom norm of ``predicted - reference`` forces (eV/Å): the quantity the committee's
    max force deviation estimates. Forces are (total_atoms, 3) in frame order, ``n_atoms`` per frame."""
    predicted = np.asarray(predicted_forces, dtype=float)
    reference = np.asarray(reference_forces, dtype=float)
    if predicted.shape != reference.shape:
        raise ValueError(f'predicted forces {predicted.shape} vs reference {reference.shape}')
    offsets = np.concatenate([[0], np.cumsum(np.asarray(n_atoms, dtype=int))])
    if offsets[-1] != len(predicted):
        raise ValueError(f'n_atoms sums to {offsets[-1]} but there are {len(predicted)} force rows')
    norms = np.linalg.norm(predicted - reference, axis=1)
    return np.array([norms[offsets[i]:offsets[i + 1]].max() for i in range(len(offsets) - 1)])


def calibration_summary(deviations, true_errors, n_bins: int = DEFAULT_CALIBRATION_BINS,
                        min_frames: int = MIN_CALIBRATION_FRAMES) -> dict:
    """How well the committee deviation predicts the true max force error on labeled frames.

    :returns: ``n_frames``; ``spearman`` (rank correlation, or None with ``spearman_note`` when there are fewer than
        ``min_frames`` frames or an input is constant); ``calibration_curve`` (``bin_mean_std``, ``bin_rmse``,
        ``counts`` of :func:`aiida_mlip.analysis.metrics.calibration_curve` with ``min(n_bins, n_frames)`` bins);
        ``median_error_over_deviation`` (> 1: the committee is over-confident) and
        ``fraction_error_above_deviation``; the per-frame arrays as lists.
    """
    deviations = np.asarray(deviations, dtype=float).ravel()
    true_errors = np.asarray(true_errors, dtype=float).ravel()
    if deviations.shape != true_errors.shape:
        raise ValueError(f'{deviations.size} deviations for {true_errors.size} errors')
    n = int(deviations.size)
    result = {
        'n_frames': n,
        'deviation': [float(v) for v in deviations],
        'true_max_force_error': [float(v) for v in true_errors],
        'spearman': None,
        'spearman_note': None,
        'calibration_curve': None,
        'median_error_over_deviation': None,
        'fraction_error_above_deviation': None,
    }
    if n == 0:
        result['spearman_note'] = 'no labeled frame'
        return result
    if n < min_frames:
        result['spearman_note'] = f'{n} frame(s): fewer than {min_frames}, a rank correlation would be noise'
    else:
        try:
            result['spearman'] = spearman(deviations, true_errors)
        except ValueError as exception:  # constant input
            result['spearman_note'] = str(exception)
    result['calibration_curve'] = calibration_curve(deviations, true_errors, n_bins=min(int(n_bins), n))
    positive = deviations > 0
    if positive.any():
        result['median_error_over_deviation'] = float(np.median(true_errors[positive] / deviations[positive]))
    result['fraction_error_above_deviation'] = float(np.mean(true_errors > deviations))
    return result
