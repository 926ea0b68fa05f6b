"""Elastic constants from stress-strain data, symmetry projection, averages and stability.

Conventions (used consistently by every function here):

* **Voigt order** ``1..6 = xx, yy, zz, yz, xz, xy`` (array indices 0..5).
* **Strain** in Voigt form uses *engineering* shear strains:
  ``e = (eps_xx, eps_yy, eps_zz, 2 eps_yz, 2 eps_xz, 2 eps_xy)``, so that
  ``sigma_voigt = C @ e`` and the elastic energy density is ``e @ C @ e / 2``.
* **Stress** in Voigt form is ``(s_xx, s_yy, s_zz, s_yz, s_xz, s_xy)`` (no factor 2) with the
  continuum-mechanics sign: positive = tensile, i.e. ``sigma = (1/V) dE/d eps``, so stretching
  a stable crystal gives a positive stress. This is the sign of ASE's ``get_stress()`` (and
  hence of MACE/ASE calculators); Quantum ESPRESSO prints the opposite sign (positive =
  compressive, pressure-like), which ASE negates when reading pw.x output — callers must
  convert QE stresses to this convention before fitting.
* Elastic constants and stresses in **GPa**.

The elastic tensor ``C`` (6x6, GPa) is obtained by a linear least-squares fit of stresses
against applied strains (:func:`fit_elastic_tensor`), optionally projected onto the form
required by the crystal system (:func:`symmetrize_elastic_tensor`, crystal axes assumed in
the standard orientation, unique axis along z), then reduced to polycrystalline bulk/shear
moduli (:func:`voigt_reuss_hill`), checked for mechanical stability (:func:`born_stability`,
positive definiteness of C) and compared against a reference (:func:`compare_elastic`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = [
    'born_stability',
    'compare_elastic',
    'every_atom_at_inversion_centre',
    'fit_elastic_tensor',
    'point_group_rotations',
    'strain_stress_images',
    'strain_to_voigt',
    'stress_to_voigt',
    'symmetry_reduced_components',
    'symmetrize_elastic_tensor',
    'voigt_reuss_hill',
    'voigt_strain_matrices',
    'voigt_to_strain',
    'voigt_to_stress',
]

#: (row, column) index pairs of the 3x3 tensor for Voigt components 0..5.
VOIGT_PAIRS = ((0, 0), (1, 1), (2, 2), (1, 2), (0, 2), (0, 1))

CRYSTAL_SYSTEMS = ('cubic', 'hexagonal', 'tetragonal', 'orthorhombic', 'triclinic')


def _symmetric_3x3(tensor, name: str) -> np.ndarray:
    array = np.asarray(tensor, dtype=float)
    if array.shape != (3, 3):
        raise ValueError(f'{name} must be a 3x3 tensor, got shape {array.shape}')
    if not np.all(np.isfinite(array)):
        raise ValueError(f'{name} contains non-finite values')
    if not np.allclose(array, array.T, rtol=1e-8, atol=1e-10 * max(1.0, float(np.abs(array).max()))):
        raise ValueError(f'{name} must be symmetric')
    return array


def strain_to_voigt(strain) -> np.ndarray:
    """Symmetric 3x3 strain tensor -> Voigt 6-vector with engineering shear (``e4 = 2 eps_yz``)."""
    eps = _symmetric_3x3(strain, 'strain')
    return np.array([eps[0, 0], eps[1, 1], eps[2, 2], 2 * eps[1, 2], 2 * eps[0, 2], 2 * eps[0, 1]])


def stress_to_voigt(stress) -> np.ndarray:
    """Symmetric 3x3 stress tensor -> Voigt 6-vector ``(s_xx, s_yy, s_zz, s_yz, s_xz, s_xy)``."""
    sig = _symmetric_3x3(stress, 'stress')
    return np.array([sig[i, j] for i, j in VOIGT_PAIRS])


def _voigt_vector(vector, name: str) -> np.ndarray:
    array = np.asarray(vector, dtype=float)
    if array.shape != (6,):
        raise ValueError(f'{name} must be a Voigt 6-vector, got shape {array.shape}')
    if not np.all(np.isfinite(array)):
        raise ValueError(f'{name} contains non-finite values')
    return array


def voigt_to_strain(voigt) -> np.ndarray:
    """Voigt strain (engineering shear) -> symmetric 3x3 tensor; inverse of :func:`strain_to_voigt`."""
    e = _voigt_vector(voigt, 'Voigt strain')
    return np.array(
        [
            [e[0], e[5] / 2, e[4] / 2],
            [e[5] / 2, e[1], e[3] / 2],
            [e[4] / 2, e[3] / 2, e[2]],
        ]
    )


def voigt_to_stress(voigt) -> np.ndarray:
    """Voigt stress -> symmetric 3x3 tensor; inverse of :func:`stress_to_voigt`."""
    s = _voigt_vector(voigt, 'Voigt stress')
    return np.array([[s[0], s[5], s[4]], [s[5], s[1], s[3]], [s[4], s[3], s[2]]])


def voigt_strain_matrices(magnitudes: Sequence[float] = (-0.01, -0.005, 0.005, 0.01)) -> list:
    """Set of single-component strains for a stress-strain elastic-constant calculation.

    For each Voigt component ``i`` (0..5) and each magnitude ``m`` the Voigt strain vector with
    ``e_i = m`` (all others zero) is converted to a symmetric 3x3 strain tensor. Shear
    magnitudes are *engineering* strains, so e.g. ``(3, 0.01)`` gives ``eps_yz = eps_zy = 0.005``.
    Apply to a cell as ``cell_new = cell @ (I + eps)`` (rows are lattice vectors). Using
    symmetric +/- magnitudes cancels the leading non-linear error in the fit.

    :returns: list of ``(component_index, magnitude, strain_3x3)`` tuples, 6 x len(magnitudes).
    :raises ValueError: on empty, zero, duplicate or non-finite magnitudes.
    """
    mags = np.asarray(magnitudes, dtype=float).ravel()
    if mags.size == 0:
        raise ValueError('at least one strain magnitude is required')
    if not np.all(np.isfinite(mags)) or np.any(mags == 0):
        raise ValueError('strain magnitudes must be finite and non-zero')
    if np.unique(mags).size != mags.size:
        raise ValueError('strain magnitudes must be distinct')
    if np.any(np.abs(mags) > 0.1):
        raise ValueError('strain magnitudes above 0.1 are outside the linear-elastic regime')
    result = []
    for component in range(6):
        for mag in mags:
            voigt = np.zeros(6)
            voigt[component] = mag
            result.append((component, float(mag), voigt_to_strain(voigt)))
    return result


def fit_elastic_tensor(strains_voigt, stresses_voigt, fit_intercept: bool = True, symmetric: bool = True) -> np.ndarray:
    """Least-squares fit of the 6x6 elastic tensor ``C`` (GPa) from stress-strain pairs.

    Solves ``sigma_n = C @ e_n (+ sigma_0)`` for all ``N`` pairs, with ``e_n`` the Voigt strain
    (engineering shear, dimensionless) and ``sigma_n`` the Voigt stress in GPa, positive =
    tensile (see module docstring; negate QE stresses first). With ``fit_intercept`` a constant
    residual stress ``sigma_0`` of the unstrained reference cell (imperfect relaxation) is fitted
    and discarded instead of biasing ``C``. With ``symmetric`` the result is averaged with its
    transpose, since ``C`` is symmetric for a hyperelastic crystal.

    :raises ValueError: on shape mismatch, non-finite values, or strains that do not span
        all six Voigt components (too few or linearly dependent strain states).
    """
    strains = np.asarray(strains_voigt, dtype=float)
    stresses = np.asarray(stresses_voigt, dtype=float)
    if strains.ndim != 2 or strains.shape[1] != 6:
        raise ValueError(f'strains_voigt must have shape (N, 6), got {strains.shape}')
    if stresses.shape != strains.shape:
        raise ValueError(f'stresses_voigt shape {stresses.shape} does not match strains shape {strains.shape}')
    if not (np.all(np.isfinite(strains)) and np.all(np.isfinite(stresses))):
        raise ValueError('strains and stresses must be finite')
    design = np.hstack([strains, np.ones((strains.shape[0], 1))]) if fit_intercept else strains
    n_unknown = design.shape[1]
    if strains.shape[0] < n_unknown:
        raise ValueError(
            f'need at least {n_unknown} stress-strain pairs (fit_intercept={fit_intercept}), got {strains.shape[0]}'
        )
    rank = np.linalg.matrix_rank(design)
    if rank < n_unknown:
        raise ValueError(
            f'strain set is rank-deficient (rank {rank} < {n_unknown}): strains must span all 6 Voigt components'
            + (' with at least two distinct magnitudes' if fit_intercept else '')
        )
    coefficients, *_ = np.linalg.lstsq(design, stresses, rcond=None)
    c_matrix = coefficients[:6].T  # stresses = strains @ C.T
    if symmetric:
        c_matrix = 0.5 * (c_matrix + c_matrix.T)
    return c_matrix


def _elastic_matrix(C, name: str = 'C') -> np.ndarray:
    array = np.asarray(C, dtype=float)
    if array.shape != (6, 6):
        raise ValueError(f'{name} must be a 6x6 Voigt elastic tensor, got shape {array.shape}')
    if not np.all(np.isfinite(array)):
        raise ValueError(f'{name} contains non-finite values')
    return array


def _basis(entries: dict[tuple[int, int], float]) -> np.ndarray:
    """6x6 basis matrix with given (1-based Voigt) entries, symmetrised."""
    matrix = np.zeros((6, 6))
    for (i, j), value in entries.items():
        matrix[i - 1, j - 1] = value
        matrix[j - 1, i - 1] = value
    return matrix


def _symmetry_bases(crystal_system: str) -> list[np.ndarray]:
    """Basis matrices spanning the allowed elastic tensors of a crystal system (standard setting)."""
    if crystal_system == 'cubic':
        return [
            _basis({(1, 1): 1, (2, 2): 1, (3, 3): 1}),
            _basis({(1, 2): 1, (1, 3): 1, (2, 3): 1}),
            _basis({(4, 4): 1, (5, 5): 1, (6, 6): 1}),
        ]
    if crystal_system == 'hexagonal':  # c along z; C66 = (C11 - C12) / 2
        return [
            _basis({(1, 1): 1, (2, 2): 1, (6, 6): 0.5}),
            _basis({(1, 2): 1, (6, 6): -0.5}),
            _basis({(3, 3): 1}),
            _basis({(1, 3): 1, (2, 3): 1}),
            _basis({(4, 4): 1, (5, 5): 1}),
        ]
    if crystal_system == 'tetragonal':  # Laue class 4/mmm, c along z
        return [
            _basis({(1, 1): 1, (2, 2): 1}),
            _basis({(3, 3): 1}),
            _basis({(1, 2): 1}),
            _basis({(1, 3): 1, (2, 3): 1}),
            _basis({(4, 4): 1, (5, 5): 1}),
            _basis({(6, 6): 1}),
        ]
    if crystal_system == 'orthorhombic':
        pairs = [(1, 1), (2, 2), (3, 3), (1, 2), (1, 3), (2, 3), (4, 4), (5, 5), (6, 6)]
        return [_basis({pair: 1}) for pair in pairs]
    if crystal_system == 'triclinic':
        return [_basis({(i + 1, j + 1): 1}) for i in range(6) for j in range(i, 6)]
    raise ValueError(f'unknown crystal_system {crystal_system!r}; supported: {", ".join(CRYSTAL_SYSTEMS)}')


def symmetrize_elastic_tensor(C, crystal_system: str) -> np.ndarray:
    """Project ``C`` (GPa) onto the form allowed by ``crystal_system``.

    The result is the closest tensor (Frobenius norm over all 36 entries) of the form required
    by the symmetry, assuming the standard orientation (cubic/orthorhombic axes along x, y, z;
    hexagonal and tetragonal c axis along z). For cubic this averages C11,C22,C33 / C12,C13,C23
    (and their transposes) / C44,C55,C66 and zeroes everything else. Hexagonal enforces
    ``C66 = (C11 - C12) / 2``; tetragonal uses the 6-constant Laue class 4/mmm; orthorhombic
    keeps 9 constants; triclinic only symmetrises ``C`` (21 constants). Projection removes
    numerical noise from a fit so that constants can be compared with tabulated values.

    :raises ValueError: for an unknown crystal system or a non-6x6 input.
    """
    c_matrix = _elastic_matrix(C)
    bases = _symmetry_bases(str(crystal_system).lower())
    design = np.array([basis.ravel() for basis in bases]).T
    coefficients, *_ = np.linalg.lstsq(design, c_matrix.ravel(), rcond=None)
    return (design @ coefficients).reshape(6, 6)


def voigt_reuss_hill(C) -> dict:
    """Voigt, Reuss and Hill polycrystalline bulk and shear moduli (GPa) from ``C`` (GPa).

    Voigt (uniform strain) is an upper bound, Reuss (uniform stress, from the compliance
    ``S = C^-1`` in engineering-strain Voigt form) a lower bound; Hill is their mean and is the
    usual estimate compared with experiment::

        K_V = [(C11+C22+C33) + 2(C12+C13+C23)] / 9
        G_V = [(C11+C22+C33) - (C12+C13+C23) + 3(C44+C55+C66)] / 15
        1/K_R = (S11+S22+S33) + 2(S12+S13+S23)
        15/G_R = 4(S11+S22+S33) - 4(S12+S13+S23) + 3(S44+S55+S66)

    :raises ValueError: if ``C`` is not 6x6 or is singular.
    """
    c = _elastic_matrix(C)
    c = 0.5 * (c + c.T)
    if np.linalg.cond(c) > 1e12:
        raise ValueError('elastic tensor is singular; Reuss averages are undefined')
    s = np.linalg.inv(c)
    diag_c = c[0, 0] + c[1, 1] + c[2, 2]
    off_c = c[0, 1] + c[0, 2] + c[1, 2]
    shear_c = c[3, 3] + c[4, 4] + c[5, 5]
    diag_s = s[0, 0] + s[1, 1] + s[2, 2]
    off_s = s[0, 1] + s[0, 2] + s[1, 2]
    shear_s = s[3, 3] + s[4, 4] + s[5, 5]
    bulk_voigt = (diag_c + 2 * off_c) / 9.0
    shear_voigt = (diag_c - off_c + 3 * shear_c) / 15.0
    bulk_reuss = 1.0 / (diag_s + 2 * off_s)
    shear_reuss = 15.0 / (4 * diag_s - 4 * off_s + 3 * shear_s)
    return {
        'bulk_voigt': float(bulk_voigt),
        'bulk_reuss': float(bulk_reuss),
        'bulk_hill': float(0.5 * (bulk_voigt + bulk_reuss)),
        'shear_voigt': float(shear_voigt),
        'shear_reuss': float(shear_reuss),
        'shear_hill': float(0.5 * (shear_voigt + shear_reuss)),
    }


def born_stability(C, tolerance_gpa: float = 0.0) -> dict:
    """General Born mechanical-stability criterion: ``C`` (GPa) must be positive definite.

    The elastic energy ``e @ C @ e / 2`` must be positive for every small strain, i.e. all
    eigenvalues of the (symmetrised) 6x6 Voigt tensor must exceed ``tolerance_gpa``. For cubic
    crystals this is equivalent to ``C11 - C12 > 0``, ``C11 + 2 C12 > 0`` and ``C44 > 0``.

    :returns: dict with ``stable`` (bool), ``min_eigenvalue`` (GPa) and ``reason`` (str).
    :raises ValueError: if ``C`` is not a finite 6x6 matrix.
    """
    c = _elastic_matrix(C)
    asymmetry = float(np.abs(c - c.T).max())
    c_sym = 0.5 * (c + c.T)
    eigenvalues, eigenvectors = np.linalg.eigh(c_sym)
    min_eigenvalue = float(eigenvalues[0])
    stable = bool(min_eigenvalue > tolerance_gpa)
    if stable:
        reason = f'all eigenvalues of C are positive (smallest {min_eigenvalue:.3f} GPa)'
    else:
        labels = ('xx', 'yy', 'zz', 'yz', 'xz', 'xy')
        mode = eigenvectors[:, 0]
        dominant = ', '.join(f'{labels[i]}:{mode[i]:+.2f}' for i in np.argsort(-np.abs(mode))[:3])
        reason = (
            f'C is not positive definite: eigenvalue {min_eigenvalue:.3f} GPa <= {tolerance_gpa} GPa '
            f'(soft strain mode, Voigt components {dominant})'
        )
    if asymmetry > 1e-6 * max(1.0, float(np.abs(c).max())):
        reason += f'; note: C was symmetrised (max asymmetry {asymmetry:.3g} GPa)'
    return {'stable': stable, 'min_eigenvalue': min_eigenvalue, 'reason': reason}


#: (name, row, column) of constants reported by :func:`compare_elastic` (0-based indices).
_COMPARED_CONSTANTS = (
    ('C11', 0, 0),
    ('C22', 1, 1),
    ('C33', 2, 2),
    ('C44', 3, 3),
    ('C55', 4, 4),
    ('C66', 5, 5),
    ('C12', 0, 1),
)
_PRINCIPAL = ((0, 0), (1, 1), (2, 2), (0, 1), (0, 2), (1, 2), (3, 3), (4, 4), (5, 5))


def compare_elastic(C_model, C_ref) -> dict:
    """Compare a model elastic tensor with a reference one (both GPa).

    :returns: dict with

        * ``abs_error_gpa``: 6x6 nested list of ``|C_model - C_ref|``;
        * ``rel_error_percent``: signed ``100 (model - ref) / |ref|`` for the cubic independent
          constants C11, C12, C44 and all diagonal constants C11..C66 (``None`` where the
          reference is zero);
        * ``mae_gpa``: mean absolute error over the 21 independent entries (upper triangle);
        * ``mae_principal_gpa``: mean absolute error over the 9 constants C11, C22, C33, C12,
          C13, C23, C44, C55, C66, which are the non-zero ones for orthorhombic or higher
          symmetry and are not diluted by symmetry-zero entries.
    :raises ValueError: if either input is not a finite 6x6 matrix.
    """
    model = _elastic_matrix(C_model, 'C_model')
    ref = _elastic_matrix(C_ref, 'C_ref')
    abs_error = np.abs(model - ref)
    rel = {}
    for name, i, j in _COMPARED_CONSTANTS:
        rel[name] = None if ref[i, j] == 0 else float(100.0 * (model[i, j] - ref[i, j]) / abs(ref[i, j]))
    rel = {key: rel[key] for key in ('C11', 'C12', 'C44', 'C22', 'C33', 'C55', 'C66')}
    upper = np.triu_indices(6)
    return {
        'abs_error_gpa': abs_error.tolist(),
        'rel_error_percent': rel,
        'mae_gpa': float(abs_error[upper].mean()),
        'mae_principal_gpa': float(np.mean([abs_error[i, j] for i, j in _PRINCIPAL])),
    }


def every_atom_at_inversion_centre(cell, scaled_positions, numbers, symprec: float = 1e-3) -> bool:
    """True if each atom is an inversion centre of the crystal: then no internal relaxation under strain.

    An inversion (rotation -I) through an atom maps the strained crystal onto itself, so the force on that atom,
    odd under inversion, vanishes for any homogeneous strain (fcc, bcc, rocksalt). Diamond (inversion centres at
    the bond midpoints), hcp and zincblende (no inversion) relax internally under shear.
    """
    import spglib

    cell = np.asarray(cell, dtype=float)
    positions = np.asarray(scaled_positions, dtype=float)
    dataset = spglib.get_symmetry_dataset((cell, positions, np.asarray(numbers)), symprec=symprec)
    if dataset is None:
        raise ValueError(f'spglib could not determine the symmetry (symprec {symprec} Å)')
    inversions = [translation for rotation, translation in zip(dataset.rotations, dataset.translations)
                  if np.array_equal(rotation, -np.eye(3, dtype=int))]

    def fixed_by(translation, position) -> bool:
        shift = -position + translation - position
        shift -= np.round(shift)
        return float(np.linalg.norm(shift @ cell)) < symprec

    return all(any(fixed_by(translation, position) for translation in inversions) for position in positions)


def point_group_rotations(cell, scaled_positions, numbers, symprec: float = 1e-3) -> np.ndarray:
    """The crystal's point-group operations as Cartesian rotations (k, 3, 3), each once; rows of ``cell`` are
    the lattice vectors."""
    import spglib

    cell = np.asarray(cell, dtype=float)
    dataset = spglib.get_symmetry_dataset((cell, np.asarray(scaled_positions, dtype=float), np.asarray(numbers)),
                                          symprec=symprec)
    if dataset is None:
        raise ValueError(f'spglib could not determine the symmetry (symprec {symprec} Å)')
    columns = cell.T  # x_cartesian = columns @ x_fractional
    rotations = []
    for rotation in dataset.rotations:
        cartesian = columns @ rotation @ np.linalg.inv(columns)
        if not any(np.allclose(cartesian, known, atol=1e-6) for known in rotations):
            rotations.append(cartesian)
    return np.array(rotations)


def rotated_voigt_strain(voigt, rotation) -> np.ndarray:
    """The engineering Voigt strain ``voigt`` seen in the frame rotated by ``rotation`` (R eps R^T)."""
    return strain_to_voigt(rotation @ voigt_to_strain(voigt) @ rotation.T)


def symmetry_reduced_components(rotations, components=range(6)) -> list[int]:
    """The Voigt components whose unit strains are not a symmetry image of an earlier kept one.

    A component ``j`` is dropped when some point-group rotation maps the unit strain of a kept component onto the
    unit strain of ``j`` exactly: its stress-strain pairs then follow from the kept ones by that rotation
    (:func:`strain_stress_images`), at no loss. Cubic with its axes along x, y, z: xx and yz (2 of 6). Where no
    rotation maps one unit strain onto another (hexagonal, whose 60° rotation mixes xx and yy; triclinic; a cubic
    crystal in a rotated frame) all 6 are kept.
    """
    kept = []
    for component in components:
        unit = np.zeros(6)
        unit[component] = 1.0
        images = [rotated_voigt_strain(np.eye(6)[k], rotation) for k in kept for rotation in rotations]
        if not any(np.allclose(image, unit, atol=1e-8) for image in images):
            kept.append(component)
    return kept


def strain_stress_images(strains_voigt, stresses_voigt, rotations) -> tuple[np.ndarray, np.ndarray]:
    """Every (strain, stress) pair under every point-group rotation (R eps R^T, R sigma R^T): the data a fit of the
    full tensor needs when only :func:`symmetry_reduced_components` were computed. Exact for a crystal with that
    symmetry; the identity image is the pair itself, first."""
    strains = np.atleast_2d(np.asarray(strains_voigt, dtype=float))
    stresses = np.atleast_2d(np.asarray(stresses_voigt, dtype=float))
    identity_first = sorted(rotations, key=lambda rotation: not np.allclose(rotation, np.eye(3)))
    image_strains, image_stresses = [], []
    for rotation in identity_first:
        for strain, stress in zip(strains, stresses, strict=True):
            image_strains.append(rotated_voigt_strain(strain, rotation))
            image_stresses.append(stress_to_voigt(rotation @ voigt_to_stress(stress) @ rotation.T))
    return np.array(image_strains), np.array(image_stresses)
