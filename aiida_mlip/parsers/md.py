"""Parser of ``mlip.md``: reads only the ``retrieved`` folder (md.npz, md.json, md_keys.json, engine logs).

Outputs, per run ``run_###`` (run order: see :mod:`aiida_mlip.calculations.md`):

* ``trajectories.run_###`` -- ``TrajectoryData`` (the ecosystem type for trajectories: ``get_step_structure``,
  ``get_ase``-style export, ``verdi data core.trajectory``), with the extra arrays ``potential_energy`` and
  ``temperature``;
* ``thermo.run_###`` -- ``ArrayData`` with the thermodynamic series (times, energies, temperature, committee
  deviation), small and cheap to load for analysis;
* ``summary`` -- ``Dict`` with the per-run status (``stopped_early``, ``reason``, ``n_steps_done``, temperature).

A run the engine stopped early (atoms too close, non-finite energies) is a **result**, not a parser failure: the
calculation finishes with exit status 0 and ``summary['n_stopped_early'] > 0``, and a warning is logged. Judging a
model by such runs is the job of ``MdStabilityWorkChain``. Exit codes (30x like ``mlip.evaluate``): 300 missing
output files, 301 element not in a model, 302 unreadable model, 303 unreadable structure file, 304 other engine
failure, 310 corrupt or inconsistent output.
"""
from __future__ import annotations

import numpy as np
from aiida import orm

from aiida_mlip.calculations.md import RESULTS_FILENAME, SUMMARY_FILENAME, MlipMdCalculation, run_key
from aiida_mlip.parsers.engine import ENGINE_EXIT_CODES, EngineJobParser  # noqa: F401  (re-exported)

#: Per-run arrays the engine must write (``run{k}/<name>`` in md.npz).
REQUIRED_RUN_ARRAYS = (
    'step', 'times_fs', 'potential_energy', 'kinetic_energy', 'total_energy', 'temperature', 'positions', 'cells',
    'numbers', 'pbc', 'stopped_early', 'reason', 'n_steps_done',
)
#: Arrays of the ``thermo`` outputs (committee arrays only when present).
THERMO_ARRAYS = (
    'step', 'times_fs', 'potential_energy', 'kinetic_energy', 'total_energy', 'temperature', 'max_force_deviation',
    'energy_std',
)
#: Summary keys copied from the engine's md.json.
SUMMARY_KEYS = (
    'n_runs', 'n_models', 'committee', 'ensemble', 'timestep_fs', 'steps', 'interval', 'seed', 'friction_per_fs',
    'n_stopped_early', 'model_sha256', 'wall_seconds', 'mace_version', 'versions',
)


class MlipMdParser(EngineJobParser):
    """Turn the engine's npz into TrajectoryData/ArrayData per run and a summary; engine failures to 300-304, 310."""

    CALCULATION = MlipMdCalculation

    def check_outputs(self, arrays: dict, summary: dict, keys_info: dict):
        return check_md_arrays(arrays, keys_info, summary)

    def store_outputs(self, arrays: dict, summary: dict, keys_info: dict):
        n_runs = len(arrays['run_temperature'])
        planned = keys_info.get('runs') or [{} for _ in range(n_runs)]
        engine_runs = summary.get('runs') or [{} for _ in range(n_runs)]
        runs = []
        for index in range(n_runs):
            run = {name: arrays[f'run{index}/{name}'] for name in REQUIRED_RUN_ARRAYS}
            for name in ('max_force_deviation', 'energy_std'):
                if f'run{index}/{name}' in arrays:
                    run[name] = arrays[f'run{index}/{name}']
            key = run_key(index)
            self.out(f'trajectories.{key}', trajectory_node(run))
            thermo = orm.ArrayData()
            for name in THERMO_ARRAYS:
                if name in run:
                    thermo.set_array(name, np.asarray(run[name]))
            self.out(f'thermo.{key}', thermo)

            finite = bool(
                np.all(np.isfinite(run['potential_energy'])) and np.all(np.isfinite(run['positions']))
            )
            entry = {
                'key': key,
                'index': index,
                'structure_index': int(arrays['run_structure_index'][index]),
                'structure_key': planned[index].get('structure_key'),
                'temperature': float(arrays['run_temperature'][index]),
                'stopped_early': bool(run['stopped_early']),
                'reason': str(run['reason']),
                'n_steps_done': int(run['n_steps_done']),
                'n_frames': int(len(run['step'])),
                'n_atoms': int(len(run['numbers'])),
                'finite': finite,
                'wall_seconds': engine_runs[index].get('wall_seconds'),
            }
            if 'max_force_deviation' in run and np.any(np.isfinite(run['max_force_deviation'])):
                entry['max_force_deviation'] = float(np.nanmax(run['max_force_deviation']))
            runs.append(entry)

        result = {key: summary[key] for key in SUMMARY_KEYS if key in summary}
        result.update({
            'runs': runs,
            'n_runs': n_runs,
            'n_stopped_early': sum(run['stopped_early'] for run in runs),
            'structure_keys': keys_info.get('structure_keys'),
            'temperatures': keys_info.get('temperatures'),
            'model_keys': keys_info.get('model_keys'),
            'model_uuids': keys_info.get('model_uuids'),
        })  # fmt: skip
        if result['n_stopped_early']:
            stopped = '; '.join(f'{run["key"]} ({run["temperature"]} K): {run["reason"]}'
                                for run in runs if run['stopped_early'])
            self.logger.warning(f'{result["n_stopped_early"]} of {n_runs} MD run(s) stopped early: {stopped}')
        self.out('summary', orm.Dict(result))
        return None


def trajectory_node(run: dict) -> orm.TrajectoryData:
    """A ``TrajectoryData`` of one run's saved frames (positions, cells, pbc, steps, times, energy, temperature)."""
    from ase.data import chemical_symbols

    trajectory = orm.TrajectoryData()
    trajectory.set_trajectory(
        symbols=[chemical_symbols[int(z)] for z in run['numbers']],
        positions=np.asarray(run['positions'], dtype=float),
        stepids=np.asarray(run['step'], dtype=int),
        cells=np.asarray(run['cells'], dtype=float),
        times=np.asarray(run['times_fs'], dtype=float),
        pbc=[bool(p) for p in np.asarray(run['pbc']).reshape(3)],
    )
    trajectory.set_array('potential_energy', np.asarray(run['potential_energy'], dtype=float))
    trajectory.set_array('temperature', np.asarray(run['temperature'], dtype=float))
    return trajectory


def check_md_arrays(arrays: dict, keys_info: dict, summary: dict) -> str | None:
    """Presence and shape checks between the npz, the JSON summary and the runs the job asked for."""
    for name in ('run_temperature', 'run_structure_index'):
        if name not in arrays:
            return f'{RESULTS_FILENAME} has no `{name}` array'
    n_runs = len(arrays['run_temperature'])
    if n_runs == 0:
        return f'{RESULTS_FILENAME} holds no MD run'
    planned = keys_info.get('runs')
    if planned is not None and len(planned) != n_runs:
        return f'{len(planned)} runs were asked for but {RESULTS_FILENAME} holds {n_runs}'
    if summary.get('n_runs', n_runs) != n_runs:
        return f'{SUMMARY_FILENAME} reports {summary.get("n_runs")} runs, {RESULTS_FILENAME} holds {n_runs}'
    for index in range(n_runs):
        missing = [name for name in REQUIRED_RUN_ARRAYS if f'run{index}/{name}' not in arrays]
        if missing:
            return f'run {index}: arrays {", ".join(missing)} missing from {RESULTS_FILENAME}'
        n_frames = len(arrays[f'run{index}/step'])
        n_atoms = len(arrays[f'run{index}/numbers'])
        if n_frames == 0:
            return f'run {index} has no saved frame'
        for name in ('times_fs', 'potential_energy', 'kinetic_energy', 'total_energy', 'temperature'):
            if arrays[f'run{index}/{name}'].shape != (n_frames,):
                return f'run {index}: `{name}` has shape {arrays[f"run{index}/{name}"].shape}, expected ({n_frames},)'
        if arrays[f'run{index}/positions'].shape != (n_frames, n_atoms, 3):
            return f'run {index}: `positions` has shape {arrays[f"run{index}/positions"].shape}, ' \
                   f'expected ({n_frames}, {n_atoms}, 3)'
        if arrays[f'run{index}/cells'].shape != (n_frames, 3, 3):
            return f'run {index}: `cells` has shape {arrays[f"run{index}/cells"].shape}, expected ({n_frames}, 3, 3)'
        ran, asked = float(arrays['run_temperature'][index]), planned[index]['temperature'] if planned else None
        if asked is not None and abs(float(asked) - ran) > 1e-9:
            return f'run {index} ran at {ran} K, {asked} K was asked'
    return None
