"""Targeted cells of one refinement iteration, as a seeded calcfunction (every new cell has a creator).

The policy (which cells a failed check asks for, and why they are never the validation's own cells) is
:mod:`aiida_mlip.analysis.refinement`; this module only builds the cells from the validated structure.
"""
from __future__ import annotations

import numpy as np
from aiida import orm
from aiida.engine import calcfunction

from aiida_mlip.analysis.refinement import deviatoric_strain, eos_target_strains, random_elastic_strains
from aiida_mlip.calculations.sampling import rattled_copies, strained_copies, volume_scaled_copies


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


def phonon_cells(atoms, plan: dict, rng: np.random.Generator) -> list:
    """Rattled cells (Gaussian, ``rattle`` Å, every atom): not phonopy's one-atom displacements.

    ``cell: conventional`` (the default) rattles the conventional cell when it holds more atoms than ``atoms``
    (diamond Si: 8 atoms, commensurate with Gamma and X, 4-8x cheaper in pw.x than the 16-atom 2x2x2 supercell of
    the primitive cell); otherwise, and with ``cell: supercell``, the validation's phonon supercell.
    """
    from ase.build import make_supercell

    if plan.get('cell', 'conventional') == 'conventional':
        cell = conventional_cell(atoms)
        if len(cell) > len(atoms):
            return rattled_copies(cell, float(plan['rattle']), int(plan['count']), int(rng.integers(2**31)))
    matrix = np.asarray(plan['supercell_matrix'], dtype=int)
    supercell = make_supercell(atoms, np.diag(matrix) if matrix.shape == (3,) else matrix)
    return rattled_copies(supercell, float(plan['rattle']), int(plan['count']), int(rng.integers(2**31)))


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
