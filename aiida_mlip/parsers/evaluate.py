"""Parser of ``mlip.evaluate``: reads only the ``retrieved`` folder (results.npz, results.json, engine logs)."""
from __future__ import annotations

import numpy as np
from aiida import orm

from aiida_mlip.calculations.evaluate import RESULTS_FILENAME, SUMMARY_FILENAME, MlipEvaluateCalculation
from aiida_mlip.parsers.engine import ENGINE_EXIT_CODES, ERROR_PATTERNS, EngineJobParser  # noqa: F401  (re-exported)

#: Summary keys copied from the engine's results.json.
SUMMARY_KEYS = (
    'n_structures', 'n_models', 'n_atoms_total', 'committee', 'compute_stress', 'batch_size', 'dtype', 'threads',
    'model_sha256', 'eval_seconds', 'wall_seconds', 'mace_version', 'versions',
)


class MlipEvaluateParser(EngineJobParser):
    """Turn the engine's npz into ArrayData outputs; map engine failures to exit codes 301-304, 300, 310, 311."""

    CALCULATION = MlipEvaluateCalculation

    def check_outputs(self, arrays: dict, summary: dict, keys_info: dict):
        return _check_arrays(arrays, keys_info.get('keys'), summary, keys_info.get('model_keys'))

    def store_outputs(self, arrays: dict, summary: dict, keys_info: dict):
        n_models, n_struct = arrays['energies'].shape
        committee = n_models > 1
        keys = keys_info.get('keys', list(range(n_struct)))

        bad = [name for name in ('energies', 'forces', 'stresses')
               if name in arrays and not np.all(np.isfinite(arrays[name]))]
        if bad:
            rows = np.where(~np.isfinite(arrays['energies']).all(axis=0))[0].tolist()
            shown = ', '.join(str(keys[i]) for i in rows[:10])
            return self.exit_codes.ERROR_NON_FINITE_RESULTS.format(
                message=f'non-finite values in {", ".join(bad)}' + (f' (structures {shown})' if shown else '')
            )

        n_atoms = arrays['n_atoms']
        energies = _array_node(
            energies=arrays['energies'],
            energy_mean=arrays.get('energy_mean', arrays['energies'].mean(axis=0)),
            energy_std=arrays.get('energy_std') if committee else None,
            n_atoms=n_atoms,
        )
        forces = _array_node(
            forces=arrays['forces'],
            forces_mean=arrays.get('forces_mean', arrays['forces'].mean(axis=0)),
            forces_std=arrays.get('forces_std') if committee else None,
            n_atoms=n_atoms,
            atomic_numbers=arrays.get('atomic_numbers'),
        )
        self.out('energies', energies)
        self.out('forces', forces)
        if 'stresses' in arrays:
            self.out('stresses', _array_node(
                stresses=arrays['stresses'],
                stress_mean=arrays.get('stress_mean', arrays['stresses'].mean(axis=0)),
                stress_std=arrays.get('stress_std') if committee else None,
                pbc=arrays.get('pbc'),
            ))  # fmt: skip
        if committee:
            stress_std = arrays.get('stress_std')
            self.out('committee', _array_node(
                energy_std=arrays['energy_std'],
                energy_std_per_atom=arrays['energy_std'] / np.maximum(n_atoms, 1),
                max_force_deviation=arrays['max_force_deviation'],
                stress_std_max=None if stress_std is None else np.abs(stress_std).reshape(n_struct, 9).max(axis=1),
            ))  # fmt: skip

        result = {key: summary[key] for key in SUMMARY_KEYS if key in summary}
        result.update({
            'keys': keys,
            'source': keys_info.get('source'),
            'model_keys': keys_info.get('model_keys'),
            'model_uuids': keys_info.get('model_uuids'),
        })  # fmt: skip
        if committee:
            result['max_energy_std'] = float(arrays['energy_std'].max())
            result['max_force_deviation'] = float(arrays['max_force_deviation'].max())
        self.out('summary', orm.Dict(result))
        return None


def _array_node(**arrays) -> orm.ArrayData:
    node = orm.ArrayData()
    for name, value in arrays.items():
        if value is not None:
            node.set_array(name, np.asarray(value))
    return node


def _check_arrays(arrays: dict, keys, summary: dict, model_keys=None) -> str | None:
    """Shape and count checks between the npz, the JSON summary and the structure keys of the job."""
    for name in ('energies', 'forces', 'n_atoms'):
        if name not in arrays:
            return f'{RESULTS_FILENAME} has no `{name}` array'
    energies, forces, n_atoms = arrays['energies'], arrays['forces'], arrays['n_atoms']
    if energies.ndim != 2:
        return f'`energies` has shape {energies.shape}, expected (models, structures)'
    n_models, n_struct = energies.shape
    if n_atoms.shape != (n_struct,):
        return f'`n_atoms` has shape {n_atoms.shape}, expected ({n_struct},)'
    if forces.shape != (n_models, int(n_atoms.sum()), 3):
        return f'`forces` has shape {forces.shape}, expected ({n_models}, {int(n_atoms.sum())}, 3)'
    if 'stresses' in arrays and arrays['stresses'].shape != (n_models, n_struct, 3, 3):
        return f'`stresses` has shape {arrays["stresses"].shape}, expected ({n_models}, {n_struct}, 3, 3)'
    if n_models > 1 and any(name not in arrays for name in ('energy_std', 'max_force_deviation')):
        return 'committee statistics missing from the npz'
    if model_keys is not None and len(model_keys) != n_models:
        return f'{n_models} models evaluated but {len(model_keys)} were written to the job'
    if keys is not None and len(keys) != n_struct:
        return f'{n_struct} structures evaluated but {len(keys)} were written to the job'
    if summary.get('n_structures', n_struct) != n_struct or summary.get('n_models', n_models) != n_models:
        return (f'{SUMMARY_FILENAME} reports {summary.get("n_structures")} structures / {summary.get("n_models")} '
                f'models, the npz has {n_struct} / {n_models}')
    return None
