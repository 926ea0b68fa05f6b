"""Molecular-dynamics sanity analysis for MLIP stability tests.

An MLIP can have small test-set errors and still fail in MD: atoms collapse onto each other
(holes in the potential at short range), the total energy drifts in NVE (non-smooth or
non-conservative forces), or the temperature runs away. This module computes the
corresponding indicators from trajectory numbers and turns them into a verdict. Units: time
in fs, energies in eV, distances in Å, temperatures in K, energy drift in meV/atom/ps (the
customary unit; well-behaved NVE runs of conservative MLIPs typically drift 0.1-1
meV/atom/ps or less). Periodic distances use the minimum-image convention via
``ase.geometry``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

__all__ = [
    'DEFAULT_MD_THRESHOLDS',
    'energy_drift_mev_per_atom_per_ps',
    'md_verdict',
    'minimum_distance',
    'radial_distribution',
    'repetitions_for',
    'temperature_statistics',
]

#: Default thresholds of :func:`md_verdict`:
#: ``min_distance_angstrom`` — any interatomic distance below this (Å) means atoms collapsed
#: (physical bonds are > ~0.7 Å even for H2, and > ~1.5 Å for most solids);
#: ``drift_mev_per_atom_per_ps`` — upper bound on |NVE energy drift| (literature: 0.1-1);
#: ``temperature_rel_deviation`` — allowed |mean T - target| / target.
DEFAULT_MD_THRESHOLDS = {
    'min_distance_angstrom': 1.0,
    'drift_mev_per_atom_per_ps': 1.0,
    'temperature_rel_deviation': 0.5,
}


def _finite_1d(values, name: str) -> np.ndarray:
    array = np.asarray(values, dtype=float)
    if array.ndim != 1:
        raise ValueError(f'{name} must be one-dimensional, got shape {array.shape}')
    if not np.all(np.isfinite(array)):
        raise ValueError(f'{name} contains non-finite values (NaN/inf), the trajectory probably blew up')
    return array


def energy_drift_mev_per_atom_per_ps(times_fs, total_energies_ev, n_atoms: int) -> float:
    """Signed linear drift of the total (conserved) energy, in meV/atom/ps.

    The slope of a least-squares line through ``E_total(t)`` (eV vs fs) is converted by
    ``x 1000 meV/eV x 1000 fs/ps / n_atoms``. A linear fit is robust to the bounded
    oscillations of the total energy in a correct velocity-Verlet NVE run, so what remains is
    the systematic drift. Only meaningful for NVE (thermostats do not conserve this energy).

    :raises ValueError: with fewer than 3 points, mismatched lengths, non-finite values,
        non-increasing times or ``n_atoms < 1``.
    """
    times = _finite_1d(times_fs, 'times_fs')
    energies = _finite_1d(total_energies_ev, 'total_energies_ev')
    if times.size != energies.size:
        raise ValueError(f'got {times.size} times but {energies.size} energies')
    if times.size < 3:
        raise ValueError(f'need at least 3 points to fit an energy drift, got {times.size}')
    if np.any(np.diff(times) <= 0):
        raise ValueError('times_fs must be strictly increasing')
    if int(n_atoms) != n_atoms or n_atoms < 1:
        raise ValueError(f'n_atoms must be a positive integer, got {n_atoms}')
    slope_ev_per_fs = np.polyfit(times - times[0], energies - energies[0], 1)[0]
    return float(slope_ev_per_fs * 1.0e6 / n_atoms)


def temperature_statistics(temperatures) -> dict:
    """Mean, standard deviation, min, max (K) and count of a temperature series.

    :raises ValueError: on empty, non-finite or negative temperatures.
    """
    temps = _finite_1d(temperatures, 'temperatures')
    if temps.size == 0:
        raise ValueError('temperatures is empty')
    if np.any(temps < 0):
        raise ValueError('temperatures must be non-negative (K)')
    return {
        'mean': float(temps.mean()),
        'std': float(temps.std()),
        'min': float(temps.min()),
        'max': float(temps.max()),
        'count': int(temps.size),
    }


def _cell_and_pbc(cell, pbc) -> tuple[np.ndarray, np.ndarray]:
    cell = np.asarray(cell, dtype=float)
    if cell.shape != (3, 3) or not np.all(np.isfinite(cell)):
        raise ValueError(f'cell must be a finite 3x3 matrix (rows = lattice vectors), got shape {cell.shape}')
    pbc = np.broadcast_to(np.asarray(pbc, dtype=bool), (3,)).copy()
    if pbc.any() and abs(np.linalg.det(cell[pbc] @ cell[pbc].T)) < 1e-12:
        raise ValueError('periodic lattice vectors are degenerate (zero length or linearly dependent)')
    return cell, pbc


def minimum_distance(positions, cell, pbc=True) -> float:
    """Smallest interatomic distance (Å) under the minimum-image convention.

    Includes the distance between an atom and its own periodic images (the shortest lattice
    vector), so a one-atom periodic cell is handled too. A very small value is the typical
    signature of an MLIP letting atoms collapse.

    :param positions: Cartesian positions in Å, shape ``(n_atoms, 3)``.
    :param cell: 3x3 cell in Å, rows are lattice vectors.
    :param pbc: bool or 3 bools.
    :raises ValueError: on bad shapes, non-finite values or a single non-periodic atom.
    """
    from ase.geometry import get_distances, minkowski_reduce

    pos = np.asarray(positions, dtype=float)
    if pos.ndim != 2 or pos.shape[1] != 3 or pos.shape[0] == 0:
        raise ValueError(f'positions must have shape (n_atoms, 3), got {pos.shape}')
    if not np.all(np.isfinite(pos)):
        raise ValueError('positions contain non-finite values')
    cell, pbc = _cell_and_pbc(cell, pbc)
    candidates = []
    if pos.shape[0] > 1:
        _, dist = get_distances(pos, cell=cell, pbc=pbc)
        candidates.append(float(dist[np.triu_indices(pos.shape[0], k=1)].min()))
    if pbc.any():
        reduced, _ = minkowski_reduce(cell, pbc=pbc)
        candidates.append(float(np.linalg.norm(reduced[pbc], axis=1).min()))
    if not candidates:
        raise ValueError('a single atom without periodic boundaries has no interatomic distance')
    return min(candidates)


def radial_distribution(positions_list, cell, r_max: float, n_bins: int) -> dict:
    """Radial distribution function g(r) averaged over frames of a fully periodic system.

    g(r) is the pair-distance histogram normalised by the ideal-gas expectation
    ``N (N-1) / 2 * shell_volume / V`` of each frame, so it tends to 1 at large r for a liquid.
    Used to compare the structure of MLIP and reference MD (e.g. first-peak position).

    :param positions_list: sequence of ``(n_atoms, 3)`` Cartesian positions in Å (frames).
    :param cell: 3x3 cell in Å (rows = lattice vectors), or one cell per frame (NPT).
    :param r_max: largest distance in Å; must not exceed half the smallest perpendicular cell
        width, beyond which the minimum-image convention misses pairs.
    :param n_bins: number of histogram bins on ``[0, r_max]``.
    :returns: dict with ``r`` (bin centres, Å), ``g`` and ``edges`` (Å), as lists.
    :raises ValueError: on bad shapes, ``r_max`` too large, or fewer than 2 atoms.
    """
    from ase.geometry import get_distances

    frames = [np.asarray(frame, dtype=float) for frame in positions_list]
    if not frames:
        raise ValueError('positions_list is empty')
    cells = np.asarray(cell, dtype=float)
    if cells.shape == (3, 3):
        cells = np.broadcast_to(cells, (len(frames), 3, 3))
    if cells.shape != (len(frames), 3, 3):
        raise ValueError(f'cell must be 3x3 or one 3x3 cell per frame, got shape {cells.shape}')
    if int(n_bins) != n_bins or n_bins < 1:
        raise ValueError(f'n_bins must be a positive integer, got {n_bins}')
    if not np.isfinite(r_max) or r_max <= 0:
        raise ValueError(f'r_max must be positive, got {r_max}')
    edges = np.linspace(0.0, float(r_max), int(n_bins) + 1)
    shell_volumes = 4.0 / 3.0 * np.pi * (edges[1:] ** 3 - edges[:-1] ** 3)
    histogram = np.zeros(int(n_bins))
    expected = np.zeros(int(n_bins))
    for index, (pos, frame_cell) in enumerate(zip(frames, cells)):
        if pos.ndim != 2 or pos.shape[1] != 3 or pos.shape[0] < 2:
            raise ValueError(f'frame {index}: positions must have shape (n_atoms >= 2, 3), got {pos.shape}')
        if not np.all(np.isfinite(pos)):
            raise ValueError(f'frame {index}: positions contain non-finite values')
        frame_cell, _ = _cell_and_pbc(frame_cell, True)
        volume = abs(np.linalg.det(frame_cell))
        widths = [
            volume / np.linalg.norm(np.cross(frame_cell[(k + 1) % 3], frame_cell[(k + 2) % 3])) for k in range(3)
        ]
        if r_max > 0.5 * min(widths) + 1e-12:
            raise ValueError(
                f'r_max = {r_max} Å exceeds half the smallest cell width ({0.5 * min(widths):.4f} Å) in frame {index}'
            )
        n_atoms = pos.shape[0]
        _, dist = get_distances(pos, cell=frame_cell, pbc=True)
        pair_distances = dist[np.triu_indices(n_atoms, k=1)]
        histogram += np.histogram(pair_distances, bins=edges)[0]
        expected += 0.5 * n_atoms * (n_atoms - 1) * shell_volumes / volume
    g = histogram / expected
    return {'r': (0.5 * (edges[1:] + edges[:-1])).tolist(), 'g': g.tolist(), 'edges': edges.tolist()}


def md_verdict(
    min_distance: float | None,
    drift: float | None,
    temperatures: Sequence[float] | None,
    target: float | None,
    thresholds: Mapping[str, float] | None = None,
) -> dict:
    """Combine MD indicators into a stable / unstable verdict with human-readable reasons.

    :param min_distance: smallest interatomic distance over the trajectory (Å), or None to skip.
    :param drift: NVE energy drift in meV/atom/ps (sign ignored), or None to skip (e.g. NVT).
    :param temperatures: temperature series in K, or None to skip.
    :param target: target temperature in K (needed for the temperature check).
    :param thresholds: overrides of :data:`DEFAULT_MD_THRESHOLDS` (unknown keys are an error).
    :returns: dict with ``stable`` (bool), ``reasons`` (list of str, empty when stable),
        ``thresholds`` used and ``checks`` (the evaluated numbers).
    :raises ValueError: on unknown threshold keys or invalid values.
    """
    used = dict(DEFAULT_MD_THRESHOLDS)
    if thresholds:
        unknown = set(thresholds) - set(used)
        if unknown:
            raise ValueError(f'unknown threshold keys {sorted(unknown)}; allowed: {sorted(used)}')
        used.update({key: float(value) for key, value in thresholds.items()})
    for key, value in used.items():
        if not np.isfinite(value) or value <= 0:
            raise ValueError(f'threshold {key} must be positive, got {value}')

    reasons: list[str] = []
    checks: dict = {}
    if min_distance is not None:
        checks['min_distance_angstrom'] = float(min_distance)
        if not np.isfinite(min_distance):
            reasons.append('minimum interatomic distance is not finite')
        elif min_distance < used['min_distance_angstrom']:
            reasons.append(
                f'atoms collapsed: minimum distance {min_distance:.3f} Å < {used["min_distance_angstrom"]} Å'
            )
    if drift is not None:
        checks['drift_mev_per_atom_per_ps'] = float(drift)
        if not np.isfinite(drift):
            reasons.append('energy drift is not finite')
        elif abs(drift) > used['drift_mev_per_atom_per_ps']:
            reasons.append(
                f'energy drift |{drift:.3f}| meV/atom/ps > {used["drift_mev_per_atom_per_ps"]} meV/atom/ps'
            )
    if temperatures is not None:
        temps = np.asarray(temperatures, dtype=float).ravel()
        if temps.size == 0:
            raise ValueError('temperatures is empty')
        if not np.all(np.isfinite(temps)):
            reasons.append('temperature series contains non-finite values (trajectory blew up)')
        else:
            stats = temperature_statistics(temps)
            checks['temperature'] = stats
            if target is not None:
                if not np.isfinite(target) or target <= 0:
                    raise ValueError(f'target temperature must be positive, got {target}')
                deviation = abs(stats['mean'] - target) / target
                checks['temperature_rel_deviation'] = float(deviation)
                if deviation > used['temperature_rel_deviation']:
                    reasons.append(
                        f'mean temperature {stats["mean"]:.1f} K deviates {100 * deviation:.0f} % from target '
                        f'{target} K (limit {100 * used["temperature_rel_deviation"]:.0f} %)'
                    )
    return {'stable': not reasons, 'reasons': reasons, 'thresholds': used, 'checks': checks}


def repetitions_for(n_atoms: int, min_atoms: int) -> int:
    """The smallest n with n^3 * n_atoms >= min_atoms: the cell repeated n x n x n along its own vectors."""
    n = 1
    while n ** 3 * n_atoms < min_atoms:
        n += 1
    return n
