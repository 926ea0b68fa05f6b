"""Targeted cells of one refinement iteration, as a seeded calcfunction (every new cell has a creator).

The policy (which cells a failed check asks for, and why they are never the validation's own cells) is
:mod:`aiida_mlip.analysis.refinement`; this module only builds the cells from the validated structure.
"""
from __future__ import annotations

import numpy as np
from aiida import orm
from aiida.engine import calcfunction

from aiida_mlip.analysis.refinement import (commensurate_qpoint_stars, deviatoric_strain, eos_target_strains,
                                            qpoint_supercell_matrix, random_elastic_strains)
from aiida_mlip.calculations.sampling import rattled_copies, strained_copies, volume_scaled_copies

#: The cells a phonon target may rattle (:func:`phonon_cells`).
PHONON_CELLS = ('commensurate', 'conventional', 'supercell')


def eos_cells(atoms, plan: dict, rng: np.random.Generator) -> list:
    """Volumes off the validation grid; every second one also sheared (deviatoric strain of ``deviatoric``)."""
    strains = eos_target_strains(plan['validation_strains'], int(plan['count']), plan.get('side', 'both'))
    cells = volume_scaled_copies(atoms, strains)
    deviatoric = float(plan.get('deviatoric', 0.0))
    for index in range(1, len(cells), 2):
        if deviatoric > 0:
            cells[index] = strained_copies(cells[index], [deviatoric_strain(deviatoric, rng)])[0]
    return cells


def elastic_cells(atoms, plan: dict, rng: np.random.Generator) -> list:
    """Strained cells in random Voigt directions near the validation's magnitudes, rattled by ``rattle`` Å."""
    strains = random_elastic_strains(plan['validation_magnitudes'], int(plan['count']), rng)
    cells = strained_copies(atoms, strains)
    amplitude = float(plan.get('rattle', 0.0))
    if amplitude > 0:
        cells = [rattled_copies(cell, amplitude, 1, int(rng.integers(2**31)))[0] for cell in cells]
    return cells


def conventional_cell(atoms):
    """The conventional standard cell (spglib) of ``atoms``, positions as in ``atoms`` (not idealised)."""
    import spglib
    from ase import Atoms

    lattice, positions, numbers = spglib.standardize_cell(
        (atoms.cell[:], atoms.get_scaled_positions(), atoms.numbers), to_primitive=False, no_idealize=True,
        symprec=1e-3)
    return Atoms(numbers=numbers, cell=lattice, scaled_positions=positions, pbc=True)


def phonon_supercell(atoms, supercell_matrix):
    """The validation's phonon supercell: 3 repetitions or a 3x3 integer matrix."""
    from ase.build import make_supercell

    matrix = np.asarray(supercell_matrix, dtype=int)
    return make_supercell(atoms, np.diag(matrix) if matrix.shape == (3,) else matrix)


def qpoint_cells(atoms, supercell_matrix) -> list:
    """For each symmetry star of the phonon supercell's non-Gamma q-points (largest first), the smallest cell in
    which that phonon repeats (diamond Si, 2x2x2: L and X, 4 atoms each); the supercell itself where the q-points
    of a non-diagonal supercell are not enumerated or no small cell exists."""
    from ase.build import make_supercell, niggli_reduce

    matrix = np.asarray(supercell_matrix, dtype=int)
    diagonal = np.diag(matrix) if matrix.shape == (3, 3) else matrix
    if matrix.shape == (3, 3) and np.any(matrix != np.diag(diagonal)):
        return [phonon_supercell(atoms, matrix)]
    cells = []
    for qpoint, _ in commensurate_qpoint_stars(atoms.cell[:], atoms.get_scaled_positions(), atoms.numbers, diagonal):
        repeat = qpoint_supercell_matrix(qpoint)
        if repeat is None:
            cells.append(phonon_supercell(atoms, diagonal))
            continue
        cell = make_supercell(atoms, repeat)
        niggli_reduce(cell)  # the same lattice in its most compact cell: fewer plane waves per k-point
        cells.append(cell)
    return cells or [phonon_supercell(atoms, diagonal)]


def phonon_cells(atoms, plan: dict, rng: np.random.Generator) -> list:
    """Rattled cells (Gaussian, ``rattle`` Å, every atom): not phonopy's one-atom displacements.

    ``cell: commensurate`` (the default) rattles, in turn, the smallest cells of the validation supercell's q-point
    stars (:func:`qpoint_cells`): a model right at those q-points has the same force constants, hence the same
    bands and DOS, as the DFT. ``cell: conventional`` rattles the conventional cell when it holds more atoms than
    ``atoms`` (diamond Si: 8 atoms, commensurate with Gamma and X only); otherwise, and with ``cell: supercell``,
    the validation's phonon supercell.
    """
    amplitude, count = float(plan['rattle']), int(plan['count'])
    kind = plan.get('cell', 'commensurate')
    if kind == 'commensurate':
        cells = qpoint_cells(atoms, plan['supercell_matrix'])
        return [rattled_copies(cells[index % len(cells)], amplitude, 1, int(rng.integers(2**31)))[0]
                for index in range(count)]
    if kind == 'conventional':
        cell = conventional_cell(atoms)
        if len(cell) > len(atoms):
            return rattled_copies(cell, amplitude, count, int(rng.integers(2**31)))
    return rattled_copies(phonon_supercell(atoms, plan['supercell_matrix']), amplitude, count,
                          int(rng.integers(2**31)))


CELL_MAKERS = {'eos': eos_cells, 'elastic': elastic_cells, 'phonons': phonon_cells}


@calcfunction
def targeted_cells(structure: orm.StructureData, plan: orm.Dict) -> dict:
    """New cells for the failed validation checks: ``<section>_<NNN>`` StructureData, seeded by ``plan['seed']``.

    ``plan``: ``seed`` and, per failed section, the section's cell-maker settings (``count`` and what the
    maker needs: see :data:`CELL_MAKERS`).
    """
    settings = plan.get_dict()
    rng = np.random.default_rng(int(settings['seed']))
    atoms = structure.get_ase()
    outputs = {}
    for section, maker in CELL_MAKERS.items():
        if section in settings and int(settings[section]['count']) > 0:
            for index, cell in enumerate(maker(atoms, settings[section], rng)):
                outputs[f'{section}_{index:03d}'] = orm.StructureData(ase=cell)
    return outputs
