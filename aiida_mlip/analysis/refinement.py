"""Validation-driven refinement policy: which new cells a failed validation check asks for.

Pure functions, no AiiDA. A validation verdict names the checks that failed; each failed property section is
turned into targeted cells around the validated structure, chosen so that they are never the validation's own
cells (the pass that follows is then out of sample):

* ``eos``: isotropic volumes OFF the validation's volume grid -- midpoints between its points and points beyond its
  range -- the failing side first (the side where the model's energies deviate most from DFT), every second one
  with a small deviatoric strain;
* ``elastic``: homogeneous strains in random directions of the 6-dimensional Voigt space (never along one
  component, as the validation's are), magnitudes between half and one and a half times the validation's largest,
  with small rattles so that the labels also hold the forces of the internal relaxation;
* ``phonons``: Gaussian rattles of every atom (phonopy displaces one atom at a time) of the smallest cells in which
  the phonons of the validation supercell's q-points repeat: force constants from an n x n x n supercell are fixed
  by the dynamical matrices at its commensurate q-points, so a model right there is right on the whole band path;
* ``md_stability``: frames of the model's own MD at and above the validation temperature, picked by committee
  deviation (the workflow runs the MD; this module only says at which temperatures).
"""
from __future__ import annotations

from fractions import Fraction
from math import gcd, lcm

import numpy as np

#: The property sections of a validation comparison that the refinement knows how to target, in priority order.
SECTIONS = ('eos', 'elastic', 'phonons', 'md_stability')
#: A random elastic direction whose largest component holds more than this share of its norm is drawn again: it
#: would be (nearly) one of the validation's single-component strains.
MAX_DOMINANT_COMPONENT = 0.9
#: Two volume strains closer than this count as the same cell.
VOLUME_TOLERANCE = 1e-6


def failed_sections(verdict: dict) -> list[str]:
    """Property sections with at least one failed check (``verdict['checks']`` keys are ``section.key``)."""
    failed = {key.split('.', 1)[0] for key, passed in (verdict.get('checks') or {}).items() if not passed}
    return [section for section in SECTIONS if section in failed]


def allocate_cells(sections, cells_per_check: dict, budget: int) -> dict:
    """New cells per failed section: each section's count, handed out one at a time in turn until ``budget``.

    Round robin, so that a small remaining budget still targets every failed property.
    """
    wanted = {section: int(cells_per_check.get(section, 0)) for section in sections}
    given = {section: 0 for section in sections}
    remaining = max(int(budget), 0)
    while remaining > 0 and any(given[s] < wanted[s] for s in sections):
        for section in sections:
            if remaining and given[section] < wanted[section]:
                given[section] += 1
                remaining -= 1
    return {section: count for section, count in given.items() if count}


def eos_failing_side(volumes, model_energies, reference_energies) -> str:
    """``'compressed'``, ``'expanded'`` or ``'both'``: where the model's E(V) deviates most from DFT's.

    Both curves on the same volumes (eV per cell); the constant offset between the two levels is removed at the
    middle volume. A side whose mean absolute deviation is at least 1.5 times the other's is the failing side.
    """
    volumes = np.asarray(volumes, dtype=float)
    order = np.argsort(volumes)
    volumes = volumes[order]
    deviation = np.asarray(model_energies, dtype=float)[order] - np.asarray(reference_energies, dtype=float)[order]
    middle = len(volumes) // 2
    deviation = np.abs(deviation - deviation[middle])
    low, high = deviation[:middle].mean() if middle else 0.0, deviation[middle + 1:].mean() if middle + 1 < len(
        volumes) else 0.0
    if low >= 1.5 * high and low > 0:
        return 'compressed'
    if high >= 1.5 * low and high > 0:
        return 'expanded'
    return 'both'


def alternate(first: list, second: list) -> list:
    """first[0], second[0], first[1], second[1], ...; the rest of the longer list at the end."""
    merged = []
    for index in range(max(len(first), len(second))):
        merged.extend(items[index] for items in (first, second) if index < len(items))
    return merged


def eos_target_strains(validation_strains, count: int, side: str = 'both') -> list[float]:
    """``count`` relative volume changes off the validation grid ``validation_strains``.

    Per side of the scan: half a step beyond its end, the midpoints between its points, then further out (1 and
    1.5 steps). The failing ``side`` comes first (``'both'``: the sides alternate); none is a validation volume.
    """
    grid = np.sort(np.asarray(validation_strains, dtype=float))
    if len(grid) < 2:
        raise ValueError(f'the validation volume grid needs at least 2 points, got {grid.tolist()}')
    step = float(np.min(np.diff(grid)))
    beyond_low = [grid[0] - step * k / 2 for k in (1, 2, 3)]
    beyond_high = [grid[-1] + step * k / 2 for k in (1, 2, 3)]
    midpoints = list((grid[:-1] + grid[1:]) / 2)
    low_mid = [m for m in midpoints if m < 0][::-1]
    high_mid = [m for m in midpoints if m >= 0]

    # One point just beyond the end of the scan, then the midpoints of that side, then further out.
    compressed = beyond_low[:1] + low_mid + beyond_low[1:]
    expanded = beyond_high[:1] + high_mid + beyond_high[1:]
    if side == 'compressed':
        ordered = compressed + expanded
    elif side == 'expanded':
        ordered = expanded + compressed
    else:
        ordered = alternate(compressed, expanded)
    targets = []
    for strain in ordered:
        if strain > -0.5 and all(abs(strain - value) > VOLUME_TOLERANCE for value in list(grid) + targets):
            targets.append(float(strain))
    return targets[:count]


def random_elastic_strains(validation_magnitudes, count: int, rng: np.random.Generator) -> list[list[float]]:
    """``count`` Voigt strains (engineering shears) in random directions, never along a single component.

    Magnitudes (the norm of the strain vector) uniform in [0.5, 1.5] x the validation's largest magnitude: close to
    the validation's strains, but not at them.
    """
    largest = float(np.max(np.abs(validation_magnitudes)))
    strains = []
    while len(strains) < count:
        direction = rng.normal(size=6)
        direction /= np.linalg.norm(direction)
        if np.max(np.abs(direction)) > MAX_DOMINANT_COMPONENT:
            continue
        strains.append((direction * largest * rng.uniform(0.5, 1.5)).tolist())
    return strains


def deviatoric_strain(magnitude: float, rng: np.random.Generator) -> list[float]:
    """A volume-conserving (to first order) Voigt strain of norm ``magnitude``: diagonal part traceless."""
    vector = rng.normal(size=6)
    vector[:3] -= vector[:3].mean()
    return (vector / np.linalg.norm(vector) * magnitude).tolist()


def md_target_temperatures(validation_temperatures, factors=(1.0, 1.5)) -> list[float]:
    """Temperatures of the targeted MD: the validation's highest temperature times each factor."""
    highest = float(max(validation_temperatures))
    return [highest * float(factor) for factor in factors]


def commensurate_qpoint_stars(lattice, scaled_positions, numbers, supercell_diagonal, symprec: float = 1e-3) -> list:
    """``(q, multiplicity)`` of every symmetry star of q-points, Gamma excluded, at which a ``diag(n1, n2, n3)``
    supercell computes the phonons exactly (q = (k1/n1, k2/n2, k3/n3), fractional in the reciprocal basis of
    ``lattice``), the largest stars (the most weight in the DOS) first."""
    import spglib

    diagonal = [int(n) for n in supercell_diagonal]
    if len(diagonal) != 3 or min(diagonal) < 1:
        raise ValueError(f'a supercell diagonal needs 3 positive integers, got {list(supercell_diagonal)}')
    mapping, grid = spglib.get_ir_reciprocal_mesh(diagonal, (lattice, scaled_positions, numbers), is_shift=[0, 0, 0],
                                                  symprec=symprec)
    representatives, counts = np.unique(mapping, return_counts=True)
    stars = [((grid[index] / np.array(diagonal)).tolist(), int(count))
             for index, count in zip(representatives, counts) if np.any(grid[index] != 0)]
    return sorted(stars, key=lambda star: -star[1])


def qpoint_supercell_matrix(qpoint) -> np.ndarray | None:
    """The smallest supercell (integer rows in units of the primitive vectors) in which a phonon at ``qpoint``
    repeats, i.e. ``q . R`` is an integer for every supercell vector R: ``N`` primitive cells for q of order N.

    With q = p/N and a component p_i prime to N: rows ``e_j - c_j e_i`` (c_j p_i = p_j mod N) and ``N e_i``.
    ``None`` when no component is prime to N (e.g. q = (1/2, 1/3, 0)); Gamma gives the identity.
    """
    fractions = [Fraction(float(x)).limit_denominator(1000) % 1 for x in qpoint]
    order = lcm(*(fraction.denominator for fraction in fractions))
    numerators = [int(fraction * order) for fraction in fractions]
    if order == 1:
        return np.eye(3, dtype=int)
    pivot = next((i for i, p in enumerate(numerators) if gcd(p, order) == 1), None)
    if pivot is None:
        return None
    inverse = pow(numerators[pivot], -1, order)
    matrix = np.eye(3, dtype=int)
    for j in range(3):
        if j == pivot:
            matrix[j, pivot] = order
        else:
            matrix[j, pivot] = -((numerators[j] * inverse) % order)
    return matrix
