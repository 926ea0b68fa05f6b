"""Seeded, deterministic structure sampling as calcfunctions: every candidate cell has a creator in the graph.

The same inputs (structure, amplitudes, seed) always give the same cells, so caching and reruns agree.
Outputs are named ``structure_000``, ``structure_001``, ... in input order.
"""
from __future__ import annotations

import numpy as np
from aiida import orm
from aiida.engine import calcfunction


def _outputs(atoms_list) -> dict:
    return {f'structure_{index:03d}': orm.StructureData(ase=atoms) for index, atoms in enumerate(atoms_list)}


def rattled_copies(atoms, amplitude: float, count: int, seed: int) -> list:
    """``count`` copies with every Cartesian coordinate displaced by N(0, amplitude²) Å."""
    rng = np.random.default_rng(seed)
    copies = []
    for _ in range(count):
        copy = atoms.copy()
        copy.positions = copy.positions + rng.normal(0.0, amplitude, size=copy.positions.shape)
        copies.append(copy)
    return copies


def strained_copies(atoms, strains) -> list:
    """Copies with cell ``(1 + eps) @ cell``, atoms scaled with it; ``eps`` a 3x3 or Voigt-6 strain."""
    copies = []
    for strain in strains:
        strain = np.asarray(strain, dtype=float)
        if strain.shape == (6,):
            xx, yy, zz, yz, xz, xy = strain
            strain = np.array([[xx, xy / 2, xz / 2], [xy / 2, yy, yz / 2], [xz / 2, yz / 2, zz]])
        if strain.shape != (3, 3):
            raise ValueError(f'a strain must be 3x3 or Voigt-6, got shape {strain.shape}')
        copy = atoms.copy()
        copy.set_cell(np.asarray(atoms.cell) @ (np.eye(3) + strain).T, scale_atoms=True)
        copies.append(copy)
    return copies


def volume_scaled_copies(atoms, volume_strains) -> list:
    """Copies with volume ``V0 * (1 + s)`` for each ``s`` (isotropic scaling, fractional positions kept)."""
    if any(s <= -1 for s in volume_strains):
        raise ValueError(f'volume strains must be > -1, got {list(volume_strains)}')
    factors = [(1.0 + s) ** (1.0 / 3.0) - 1.0 for s in volume_strains]
    return strained_copies(atoms, [np.eye(3) * f for f in factors])


@calcfunction
def rattle_structure(structure: orm.StructureData, amplitude: orm.Float, count: orm.Int, seed: orm.Int) -> dict:
    """Gaussian rattles of ``structure`` (amplitude in Å)."""
    if amplitude.value < 0 or count.value < 1:
        raise ValueError('amplitude must be >= 0 and count >= 1')
    return _outputs(rattled_copies(structure.get_ase(), amplitude.value, count.value, seed.value))


@calcfunction
def scale_volume(structure: orm.StructureData, volume_strains: orm.List) -> dict:
    """Isotropic volume scan: one cell per relative volume change (e.g. -0.06 ... +0.06)."""
    return _outputs(volume_scaled_copies(structure.get_ase(), volume_strains.get_list()))


@calcfunction
def strain_structure(structure: orm.StructureData, strains: orm.List) -> dict:
    """Homogeneous strains (3x3 or Voigt-6 with engineering shears) applied to the cell."""
    return _outputs(strained_copies(structure.get_ase(), strains.get_list()))


@calcfunction
def make_supercell(structure: orm.StructureData, repetitions: orm.List) -> orm.StructureData:
    """Supercell by repetitions (3 integers) or a 3x3 integer matrix."""
    from ase.build import make_supercell as ase_make_supercell

    matrix = np.asarray(repetitions.get_list(), dtype=int)
    matrix = np.diag(matrix) if matrix.shape == (3,) else matrix
    if matrix.shape != (3, 3) or round(abs(np.linalg.det(matrix))) < 1:
        raise ValueError(f'repetitions must be 3 positive integers or a non-singular 3x3 matrix, got {matrix.tolist()}')
    return orm.StructureData(ase=ase_make_supercell(structure.get_ase(), matrix))


@calcfunction
def isolated_atom(element: orm.Str, box: orm.Float) -> orm.StructureData:
    """One atom of ``element`` in a cubic box of side ``box`` Å (periodic, for the E0 reference energy)."""
    from ase import Atoms

    if box.value < 5.0:
        raise ValueError(f'an isolated-atom box of {box.value} Å is too small: use >= 5 Å (10 Å recommended)')
    atoms = Atoms(element.value, positions=[[box.value / 2] * 3],
                  cell=[box.value] * 3, pbc=True)
    return orm.StructureData(ase=atoms)
