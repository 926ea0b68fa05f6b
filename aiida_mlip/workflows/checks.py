"""Input checks shared by the workflows' validators: bad input is refused before any compute is spent."""
from __future__ import annotations

import numpy as np

#: Atoms closer than this (Å) are an input error: no chemistry puts nuclei that close.
MIN_INTERATOMIC_DISTANCE = 0.5


def closest_pair(atoms) -> tuple[float, int, int]:
    """(distance in Å, i, j) of the closest pair of atoms, periodic images included."""
    from ase.neighborlist import neighbor_list

    if len(atoms) < 2 and not any(atoms.pbc):
        return np.inf, 0, 0
    first, second, distances = neighbor_list('ijd', atoms, MIN_INTERATOMIC_DISTANCE * 4, self_interaction=False)
    if len(distances) == 0:
        return np.inf, 0, 0
    index = int(np.argmin(distances))
    return float(distances[index]), int(first[index]), int(second[index])


def structure_problem(key: str, structure) -> str | None:
    """Why ``structure`` cannot be computed, or None."""
    atoms = structure.get_ase()
    if len(atoms) == 0:
        return f'structure `{key}` has no atoms'
    if any(atoms.pbc) and abs(atoms.get_volume()) < 1e-6:
        return f'structure `{key}` has a degenerate cell (volume {atoms.get_volume():.3g} Å³)'
    distance, i, j = closest_pair(atoms)
    if distance < MIN_INTERATOMIC_DISTANCE:
        return (
            f'structure `{key}`: atoms {i} ({atoms[i].symbol}) and {j} ({atoms[j].symbol}) are {distance:.3f} Å apart, '
            f'closer than {MIN_INTERATOMIC_DISTANCE} Å'
        )
    return None


def structures_problem(structures: dict) -> str | None:
    """Validator body for a namespace of structures: non-empty, and each one computable."""
    if not structures:
        return 'no structures given: the structure list is empty'
    for key, structure in structures.items():
        problem = structure_problem(key, structure)
        if problem:
            return problem
    return None


def code_problem(code, plugin: str, what: str) -> str | None:
    """A code whose default plugin is not ``plugin`` is refused (e.g. a python code passed where pw.x is expected)."""
    if code is None:
        return None
    actual = code.default_calc_job_plugin
    if actual != plugin:
        return f'code `{code.full_label}` runs `{actual}`, but {what} needs a `{plugin}` code'
    return None


def elements_of(structures) -> set[str]:
    """All chemical elements in an iterable of StructureData."""
    return {symbol for structure in structures for kind in structure.kinds for symbol in kind.symbols}
