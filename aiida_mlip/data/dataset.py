"""``mlip.dataset``: labeled frames (structures with DFT energy, forces and stress) as one AiiDA node.

The frames live in the node repository as one ``frames.npz`` (ragged per-atom arrays are concatenated and
split by ``n_atoms``); what a query needs is in attributes: frame count, elements, config types, the UUID
of the calculation that labeled each frame, and the fingerprint of the DFT settings. Units: energy eV,
forces eV/Å, stress eV/Å³ in the ASE sign convention (positive = tensile; QE prints the opposite sign).
"""
from __future__ import annotations

import hashlib
import io
import json

import numpy as np
from aiida import orm

#: Keys mace-torch reads from an extxyz file (``--energy_key`` etc.); it also takes E0s from frames of this type.
ENERGY_KEY, FORCES_KEY, STRESS_KEY = 'REF_energy', 'REF_forces', 'REF_stress'
ISOLATED_ATOM = 'IsolatedAtom'
DEFAULT_CONFIG_TYPE = 'Default'

#: Fingerprint keys that change the physics of a label; datasets may be merged only when these agree.
PHYSICAL_FINGERPRINT_KEYS = (
    'functional', 'ecutwfc', 'ecutrho', 'kpoints_distance', 'occupations', 'smearing', 'degauss', 'nspin',
)

_ARRAY_NAMES = ('n_atoms', 'numbers', 'positions', 'cells', 'pbc', 'energy', 'forces', 'stress', 'config_type')


def fingerprint_differences(first: dict, second: dict) -> list[str]:
    """Human-readable list of the physical settings in which two DFT fingerprints disagree.

    Pseudopotentials are compared per element present in both, so a Si set and a Ge set labeled with the same
    family are compatible while a Si set labeled with another Si file is not.
    """
    first, second = first or {}, second or {}
    differences = [
        f'{key}: {first.get(key)!r} != {second.get(key)!r}'
        for key in PHYSICAL_FINGERPRINT_KEYS
        if first.get(key) != second.get(key)
    ]
    pseudos_a, pseudos_b = first.get('pseudos', {}), second.get('pseudos', {})
    differences += [
        f'pseudopotential of {element}: {pseudos_a[element]} != {pseudos_b[element]}'
        for element in sorted(set(pseudos_a) & set(pseudos_b))
        if pseudos_a[element] != pseudos_b[element]
    ]
    return differences


def fingerprint_hash(fingerprint: dict) -> str:
    """Short stable hash of the physical part of a fingerprint (pseudos included)."""
    physical = {key: fingerprint.get(key) for key in PHYSICAL_FINGERPRINT_KEYS}
    physical['pseudos'] = fingerprint.get('pseudos', {})
    return hashlib.sha256(json.dumps(physical, sort_keys=True, default=str).encode()).hexdigest()[:16]


class TrainingSet(orm.Data):
    """Labeled frames for training and testing interatomic potentials, with where each label came from."""

    _FILENAME = 'frames.npz'

    def __init__(self, arrays: dict | None = None, fingerprint: dict | None = None, sources: list | None = None,
                 **kwargs):
        super().__init__(**kwargs)
        if arrays is not None:
            self._set_arrays(arrays, fingerprint or {}, sources)

    # ---- construction -------------------------------------------------------------------------------
    @classmethod
    def from_ase(cls, atoms_list, fingerprint: dict | None = None, sources: list | None = None,
                 energy_key=ENERGY_KEY, forces_key=FORCES_KEY, stress_key=STRESS_KEY):
        """Build from ASE ``Atoms`` carrying labels in ``info``/``arrays`` (mace-torch keys by default).

        ``sources`` gives per frame the UUID of the calculation that produced its label (``None`` if unknown).
        """
        if not atoms_list:
            raise ValueError('a dataset needs at least one frame')
        arrays = {name: [] for name in _ARRAY_NAMES}
        for index, atoms in enumerate(atoms_list):
            if energy_key not in atoms.info:
                raise ValueError(f'frame {index} has no `{energy_key}` label')
            n_atoms = len(atoms)
            forces = atoms.arrays.get(forces_key)
            stress = atoms.info.get(stress_key)
            arrays['n_atoms'].append(n_atoms)
            arrays['numbers'].append(atoms.numbers)
            arrays['positions'].append(atoms.positions)
            arrays['cells'].append(np.asarray(atoms.cell))
            arrays['pbc'].append(atoms.pbc)
            arrays['energy'].append(float(atoms.info[energy_key]))
            arrays['forces'].append(np.full((n_atoms, 3), np.nan) if forces is None else np.asarray(forces))
            arrays['stress'].append(np.full((3, 3), np.nan) if stress is None else _full_stress(stress))
            arrays['config_type'].append(str(atoms.info.get('config_type', DEFAULT_CONFIG_TYPE)))
        joined = {
            'n_atoms': np.array(arrays['n_atoms'], dtype=int),
            'numbers': np.concatenate(arrays['numbers']).astype(int),
            'positions': np.concatenate(arrays['positions']).astype(float),
            'cells': np.array(arrays['cells'], dtype=float),
            'pbc': np.array(arrays['pbc'], dtype=bool),
            'energy': np.array(arrays['energy'], dtype=float),
            'forces': np.concatenate(arrays['forces']).astype(float),
            'stress': np.array(arrays['stress'], dtype=float),
            'config_type': np.array(arrays['config_type'], dtype=str),
        }
        return cls(arrays=joined, fingerprint=fingerprint, sources=sources)

    def _set_arrays(self, arrays: dict, fingerprint: dict, sources):
        from ase.data import chemical_symbols

        missing = [name for name in _ARRAY_NAMES if name not in arrays]
        if missing:
            raise ValueError(f'missing arrays: {missing}')
        n_frames = len(arrays['n_atoms'])
        if n_frames == 0:
            raise ValueError('a dataset needs at least one frame')
        total = int(np.sum(arrays['n_atoms']))
        for name in ('numbers', 'positions', 'forces'):
            if len(arrays[name]) != total:
                raise ValueError(f'`{name}` has {len(arrays[name])} rows, expected {total} (sum of n_atoms)')
        for name in ('cells', 'pbc', 'energy', 'stress', 'config_type'):
            if len(arrays[name]) != n_frames:
                raise ValueError(f'`{name}` has {len(arrays[name])} entries, expected {n_frames} frames')
        if not np.all(np.isfinite(arrays['energy'])):
            raise ValueError('non-finite energy label')
        sources = list(sources) if sources is not None else [None] * n_frames
        if len(sources) != n_frames:
            raise ValueError(f'{len(sources)} sources given for {n_frames} frames')

        buffer = io.BytesIO()
        np.savez_compressed(buffer, **{name: np.asarray(arrays[name]) for name in _ARRAY_NAMES})
        buffer.seek(0)
        self.base.repository.put_object_from_filelike(buffer, self._FILENAME)

        config_types, counts = np.unique(arrays['config_type'], return_counts=True)
        attributes = self.base.attributes
        attributes.set('n_frames', n_frames)
        attributes.set('n_atoms_total', total)
        attributes.set('elements', sorted({chemical_symbols[z] for z in np.unique(arrays['numbers'])}))
        attributes.set('config_types', {str(c): int(n) for c, n in zip(config_types, counts)})
        attributes.set('has_forces', bool(np.all(np.isfinite(arrays['forces']))))
        attributes.set('has_stress', bool(np.all(np.isfinite(arrays['stress']))))
        attributes.set('source_uuids', sources)
        attributes.set('fingerprint', fingerprint)
        attributes.set('fingerprint_hash', fingerprint_hash(fingerprint))

    # ---- properties --------------------------------------------------------------------------------
    @property
    def n_frames(self) -> int:
        return self.base.attributes.get('n_frames')

    def __len__(self):
        return self.n_frames

    @property
    def elements(self) -> list[str]:
        return self.base.attributes.get('elements')

    @property
    def fingerprint(self) -> dict:
        return self.base.attributes.get('fingerprint')

    @property
    def source_uuids(self) -> list:
        return self.base.attributes.get('source_uuids')

    @property
    def config_types(self) -> dict:
        return self.base.attributes.get('config_types')

    def get_arrays(self) -> dict:
        """All arrays (see the module docstring for their units)."""
        with self.base.repository.open(self._FILENAME, 'rb') as handle:
            with np.load(handle) as npz:
                return {name: npz[name] for name in npz.files}

    # ---- conversion -----------------------------------------------------------------------------
    def to_ase(self, energy_key=ENERGY_KEY, forces_key=FORCES_KEY, stress_key=STRESS_KEY) -> list:
        """Frames as ASE ``Atoms`` with labels under mace-torch's keys and ``config_type``/``source_uuid``."""
        from ase import Atoms

        arrays = self.get_arrays()
        offsets = np.concatenate([[0], np.cumsum(arrays['n_atoms'])])
        frames = []
        for index, source in enumerate(self.source_uuids):
            atom_slice = slice(offsets[index], offsets[index + 1])
            atoms = Atoms(
                numbers=arrays['numbers'][atom_slice],
                positions=arrays['positions'][atom_slice],
                cell=arrays['cells'][index],
                pbc=arrays['pbc'][index],
            )
            atoms.info[energy_key] = float(arrays['energy'][index])
            atoms.info['config_type'] = str(arrays['config_type'][index])
            if source:
                atoms.info['source_uuid'] = source
            forces = arrays['forces'][atom_slice]
            if np.all(np.isfinite(forces)):
                atoms.arrays[forces_key] = forces.copy()
            stress = arrays['stress'][index]
            if np.all(np.isfinite(stress)):
                atoms.info[stress_key] = stress.copy()
            frames.append(atoms)
        return frames

    def write_extxyz(self, path_or_handle, **kwargs) -> int:
        """Write the frames as extended XYZ for ``mace_run_train``; returns the number of frames written."""
        from ase.io import write

        frames = self.to_ase(**kwargs)
        write(path_or_handle, frames, format='extxyz')
        return len(frames)

    def subset(self, indices) -> 'TrainingSet':
        """A new unstored dataset with the given frames (same fingerprint); used by the split calcfunction."""
        indices = [int(i) for i in indices]
        arrays = self.get_arrays()
        offsets = np.concatenate([[0], np.cumsum(arrays['n_atoms'])])
        per_atom = np.concatenate([np.arange(offsets[i], offsets[i + 1]) for i in indices]) if indices else []
        chosen = {
            name: arrays[name][per_atom] if name in ('numbers', 'positions', 'forces') else arrays[name][indices]
            for name in _ARRAY_NAMES
        }
        return TrainingSet(arrays=chosen, fingerprint=self.fingerprint, sources=[self.source_uuids[i] for i in indices])


def _full_stress(stress) -> np.ndarray:
    """3x3 stress from a 3x3, flat 9 or Voigt-6 (xx, yy, zz, yz, xz, xy) array."""
    stress = np.asarray(stress, dtype=float)
    if stress.shape == (3, 3):
        return stress
    if stress.shape == (9,):
        return stress.reshape(3, 3)
    if stress.shape == (6,):
        xx, yy, zz, yz, xz, xy = stress
        return np.array([[xx, xy, xz], [xy, yy, yz], [xz, yz, zz]])
    raise ValueError(f'stress of shape {stress.shape} is neither 3x3, 9 nor Voigt 6')


def concatenate_arrays(array_sets: list[dict]) -> dict:
    """Join the arrays of several datasets frame-wise (used by the merge calcfunction)."""
    return {name: np.concatenate([arrays[name] for arrays in array_sets]) for name in _ARRAY_NAMES}
