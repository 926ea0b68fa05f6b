"""Parser of ``mlip.relax``: reads only the ``retrieved`` folder (relaxed.npz, relax.json, relax_keys.json, logs).

Outputs: ``relaxed_structures`` (StructureData, same keys as the input ``structures``) and ``summary`` (Dict, per key:
energy, converged, n_steps, residual_fmax, ...). Any structure that did not reach ``fmax`` gives exit code 501
``ERROR_NOT_CONVERGED`` after every output is attached. Engine failures: 300-304; corrupt output: 310.
"""
from __future__ import annotations

import numpy as np
from aiida import orm

from aiida_mlip.calculations.relax import RESULTS_FILENAME, MlipRelaxCalculation
from aiida_mlip.parsers.engine import EngineJobParser

REQUIRED_ARRAYS = ('n_atoms', 'atomic_numbers', 'positions', 'cells', 'pbc', 'energies', 'forces', 'stresses',
                   'converged', 'n_steps', 'residual_fmax')
SUMMARY_KEYS = ('n_models', 'committee', 'fmax', 'steps', 'relax_cell', 'optimizer', 'cell_filter', 'model_sha256',
                'relax_seconds', 'wall_seconds', 'mace_version', 'versions', 'threads')


class MlipRelaxParser(EngineJobParser):
    """Relaxed cells to StructureData per key, a summary; 501 when a structure did not converge."""

    CALCULATION = MlipRelaxCalculation

    def check_outputs(self, arrays: dict, summary: dict, keys_info: dict):
        missing = [name for name in REQUIRED_ARRAYS if name not in arrays]
        if missing:
            return f'arrays {", ".join(missing)} missing from {RESULTS_FILENAME}'
        n_struct = len(arrays['n_atoms'])
        keys = keys_info.get('keys')
        if keys is not None and len(keys) != n_struct:
            return f'{len(keys)} structures were sent but {RESULTS_FILENAME} holds {n_struct}'
        n_total = int(arrays['n_atoms'].sum())
        for name in ('atomic_numbers', 'positions', 'forces'):
            if len(arrays[name]) != n_total:
                return f'`{name}` has {len(arrays[name])} rows, expected {n_total} atoms'
        for name in ('cells', 'pbc', 'energies', 'stresses', 'converged', 'n_steps', 'residual_fmax'):
            if len(arrays[name]) != n_struct:
                return f'`{name}` has {len(arrays[name])} rows, expected {n_struct} structures'
        if not (np.all(np.isfinite(arrays['positions'])) and np.all(np.isfinite(arrays['energies']))
                and np.all(np.isfinite(arrays['cells']))):
            return 'non-finite positions, cells or energies in the relaxed structures'
        return None

    def store_outputs(self, arrays: dict, summary: dict, keys_info: dict):
        from ase import Atoms

        n_struct = len(arrays['n_atoms'])
        keys = keys_info.get('keys') or [f'structure_{i:05d}' for i in range(n_struct)]
        offsets = np.concatenate([[0], np.cumsum(arrays['n_atoms'])])
        engine_rows = summary.get('structures') or [{} for _ in range(n_struct)]
        per_key = {}
        for index, key in enumerate(keys):
            start, stop = int(offsets[index]), int(offsets[index + 1])
            atoms = Atoms(numbers=arrays['atomic_numbers'][start:stop], positions=arrays['positions'][start:stop],
                          cell=arrays['cells'][index], pbc=arrays['pbc'][index])
            self.out(f'relaxed_structures.{key}', orm.StructureData(ase=atoms))
            forces = arrays['forces'][start:stop]
            per_key[key] = {
                'energy': float(arrays['energies'][index]),
                'converged': bool(arrays['converged'][index]),
                'n_steps': int(arrays['n_steps'][index]),
                'residual_fmax': float(arrays['residual_fmax'][index]),
                'max_force': float(np.sqrt((forces**2).sum(axis=1)).max()) if len(forces) else 0.0,
                'stress': np.asarray(arrays['stresses'][index], dtype=float).tolist(),
                'volume_initial': engine_rows[index].get('volume_initial'),
                'volume_final': engine_rows[index].get('volume_final'),
            }
        not_converged = [key for key, row in per_key.items() if not row['converged']]
        result = {name: summary[name] for name in SUMMARY_KEYS if name in summary}
        result.update({
            'structures': per_key,
            'n_structures': n_struct,
            'n_converged': n_struct - len(not_converged),
            'all_converged': not not_converged,
            'model_keys': keys_info.get('model_keys'),
            'model_uuids': keys_info.get('model_uuids'),
        })  # fmt: skip
        self.out('summary', orm.Dict(result))
        if not_converged:
            detail = '; '.join(f'{key}: residual {per_key[key]["residual_fmax"]:.4g} eV/Å after '
                               f'{per_key[key]["n_steps"]} steps' for key in not_converged)
            return self.exit_codes.ERROR_NOT_CONVERGED.format(message=detail)
        return None
