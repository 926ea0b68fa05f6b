"""``mlip.evaluate``: energies, forces and stresses of many structures with one MLIP or a committee, in ONE job.

All structures go into one ``structures.extxyz`` and all models into the job folder; the job runs
``<python> -m aiida_mlip.engine.evaluate`` (:mod:`aiida_mlip.engine.evaluate`), which loads each model once and
evaluates the cells in batches. Starting one process per structure costs seconds of imports, model loading,
polling and retrieval per single point where the model itself needs milliseconds (docs/performance.md), so
workflows (EOS, elastic, phonons, active learning) send all their cells of one property to one calculation and
map the rows back with :func:`split_results` / :func:`split_outputs`.

Structure order: with ``structures`` the rows follow the **sorted** namespace keys (plain string sort: zero-pad
numbered keys, ``cell_007``), with ``dataset`` the frame order. The order is written to ``structure_keys.json``
and returned as ``summary['keys']``.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Sequence

import numpy as np
from aiida import orm

from aiida_mlip.calculations.engine_job import (  # noqa: F401  (re-exported: workflows import them from here)
    DTYPES, EXIT_CODE_FILENAME, MODEL_FILENAME, STDERR_FILENAME, STDOUT_FILENAME, EngineCalcJob, check_models_cover,
    engine_options_problem, model_filename, models_type_problem, structure_to_atoms,
)
from aiida_mlip.data.dataset import TrainingSet

#: Files of the job folder (names are part of the parser contract).
STRUCTURES_FILENAME = 'structures.extxyz'
KEYS_FILENAME = 'structure_keys.json'
RESULTS_FILENAME = 'results.npz'
SUMMARY_FILENAME = 'results.json'
ENGINE_MODULE = 'aiida_mlip.engine.evaluate'


def validate_inputs(value, ctx=None) -> Optional[str]:
    """Refuse impossible evaluations before any CalcJob node exists.

    At least one model; exactly one of ``structures`` / ``dataset``; at least one structure; every element of
    every structure known to every model (the message names the missing elements, the model and the structures).
    """
    # When the calculation is exposed in a WorkChain with some of these ports excluded, their checks move there
    # (see check_models_cover).
    if ctx is not None and any(name not in ctx for name in ('models', 'structures', 'dataset')):
        return None

    models = value.get('models') or {}
    problem = models_type_problem(models)
    if problem:
        return problem

    has_structures = bool(value.get('structures'))
    has_dataset = value.get('dataset') is not None
    if has_structures and has_dataset:
        return 'give either `structures` or `dataset`, not both'
    if not has_structures and not has_dataset:
        return 'nothing to evaluate: give a non-empty `structures` namespace (StructureData) or a `dataset`'
    if has_dataset and not value['dataset'].n_frames:
        return '`dataset` has no frames: nothing to evaluate'

    message = check_models_cover(models, structures=value.get('structures'), dataset=value.get('dataset'))
    if message:
        return message

    if 'batch_size' in value and int(value['batch_size'].value) < 1:
        return f'`batch_size` must be >= 1, got {value["batch_size"].value}'
    return engine_options_problem(threads=value.get('threads'), dtype=value.get('dtype'))


class MlipEvaluateCalculation(EngineCalcJob):
    """Evaluate many structures with one MLIP (or a committee of several) in one job and one model load."""

    _DEFAULT_BATCH_SIZE = 8
    ENGINE_MODULE = ENGINE_MODULE
    PARSER_NAME = 'mlip.evaluate'
    ENGINE_LABEL = 'evaluation'
    MODELS_HELP = ('MLIP models by key: one = single model, several = committee (mean/std over models). '
                   'Rows of the per-model output arrays follow the sorted keys.')
    STRUCTURES_FILENAME = STRUCTURES_FILENAME
    RESULTS_FILENAME = RESULTS_FILENAME
    SUMMARY_FILENAME = SUMMARY_FILENAME
    KEYS_FILENAME = KEYS_FILENAME

    @classmethod
    def define(cls, spec):
        super().define(spec)
        spec.input_namespace(
            'structures', valid_type=orm.StructureData, dynamic=True, required=False,
            help='Structures to evaluate, by key; results follow the sorted keys. Exclusive with `dataset`.',
        )  # fmt: skip
        spec.input(
            'dataset', valid_type=TrainingSet, required=False,
            help='Evaluate every frame of an mlip.dataset (in frame order). Exclusive with `structures`.',
        )  # fmt: skip
        spec.input('batch_size', valid_type=orm.Int, default=lambda: orm.Int(8),
                   help='Structures per model call (memory vs. speed; results do not depend on it).')
        spec.input('compute_stress', valid_type=orm.Bool, default=lambda: orm.Bool(True),
                   help='Also compute the stress (cell gradient); only meaningful for periodic cells.')
        spec.inputs.validator = validate_inputs

        spec.output('energies', valid_type=orm.ArrayData,
                    help="'energies' (M, N) per model [eV], 'energy_mean' (N,), 'energy_std' (N,, committees), "
                         "'n_atoms' (N,).")
        spec.output('forces', valid_type=orm.ArrayData,
                    help="'forces' (M, total atoms, 3) per model [eV/Å], 'forces_mean', 'forces_std' (committees), "
                         "'n_atoms' (split rows with it), 'atomic_numbers'.")
        spec.output('stresses', valid_type=orm.ArrayData, required=False,
                    help="'stresses' (M, N, 3, 3) [eV/Å^3, ASE sign], 'stress_mean', 'stress_std' (committees), "
                         "'pbc' (N, 3); absent when compute_stress is False.")
        spec.output('committee', valid_type=orm.ArrayData, required=False,
                    help="Committees only (M > 1), per structure: 'energy_std', 'energy_std_per_atom', "
                         "'max_force_deviation', and 'stress_std_max' with stress.")
        spec.output('summary', valid_type=orm.Dict,
                    help='n_structures, n_models, keys (row order), model_keys, wall/eval seconds, versions, ...')
        spec.default_output_node = 'summary'

        spec.exit_code(311, 'ERROR_NON_FINITE_RESULTS',
                       message='The model returned non-finite energies, forces or stresses: {message}')

    # ---- helpers shared with workflows ---------------------------------------------------------------
    @staticmethod
    def structure_keys(inputs: Mapping[str, Any]) -> list:
        """Row order of the outputs: sorted ``structures`` keys, or frame indices of ``dataset``."""
        if inputs.get('structures'):
            return sorted(inputs['structures'])
        return list(range(inputs['dataset'].n_frames))

    @staticmethod
    def _frames(inputs) -> list:
        """Bare ase.Atoms (positions, numbers, cell, pbc; no labels) in output row order."""
        from ase import Atoms

        if inputs.get('structures'):
            return [structure_to_atoms(inputs['structures'][key]) for key in sorted(inputs['structures'])]
        arrays = inputs['dataset'].get_arrays()
        offsets = np.concatenate([[0], np.cumsum(arrays['n_atoms'])])
        return [
            Atoms(
                numbers=arrays['numbers'][offsets[i] : offsets[i + 1]],
                positions=arrays['positions'][offsets[i] : offsets[i + 1]],
                cell=arrays['cells'][i],
                pbc=arrays['pbc'][i],
            )
            for i in range(len(arrays['n_atoms']))
        ]

    # ---- the job folder (EngineCalcJob.prepare_for_submission) ---------------------------------------
    def engine_frames(self) -> list:
        return self._frames(self.inputs)

    def job_keys(self) -> dict:
        return {
            'keys': self.structure_keys(self.inputs),
            'source': 'structures' if self.inputs.get('structures') else 'dataset',
        }

    def engine_arguments(self) -> list:
        arguments = ['--structures', STRUCTURES_FILENAME, '--output', RESULTS_FILENAME, '--summary', SUMMARY_FILENAME,
                     '--batch-size', str(int(self.inputs.batch_size.value))]  # fmt: skip
        if not self.inputs.compute_stress.value:
            arguments.append('--no-stress')
        return arguments


# ---- mapping rows back to structures (pure numpy; used by property workflows for fan-in) ----------------------

#: Array names per output node (the same names as the engine's npz).
OUTPUT_ARRAYS = {
    'energies': ('energies', 'energy_mean', 'energy_std', 'n_atoms'),
    'forces': ('forces', 'forces_mean', 'forces_std', 'n_atoms', 'atomic_numbers'),
    'stresses': ('stresses', 'stress_mean', 'stress_std', 'pbc'),
    'committee': ('energy_std', 'energy_std_per_atom', 'max_force_deviation', 'stress_std_max'),
}


def split_results(arrays: Mapping[str, np.ndarray], keys: Optional[Sequence] = None) -> Dict[Any, Dict[str, Any]]:
    """Map the flat result arrays back to one dict per structure, keyed by ``keys`` (default: row indices).

    ``arrays`` uses the engine's npz names: required ``energies`` (M, N), ``forces`` (M, total_atoms, 3),
    ``n_atoms`` (N,); optional ``stresses`` (M, N, 3, 3), ``pbc`` and the committee arrays. Each structure gets::

        energy        float   mean over models (the single model's value for M = 1) [eV]
        energies      (M,)    per model
        forces        (n, 3)  mean over models [eV/Å];   forces_per_model (M, n, 3)
        stress        (3, 3) or None (mean; ASE sign, eV/Å^3);  stresses_per_model (M, 3, 3) or None
        n_atoms       int
        # committees (M > 1) only:
        energy_std    float;  forces_std (n, 3);  max_force_deviation float;  stress_std (3, 3) or None
    """
    energies = np.asarray(arrays['energies'], dtype=float)
    if energies.ndim == 1:
        energies = energies[None, :]
    n_models, n_struct = energies.shape
    n_atoms = np.asarray(arrays['n_atoms'], dtype=int)
    forces = np.asarray(arrays['forces'], dtype=float)
    if forces.ndim == 2:
        forces = forces[None]
    if len(n_atoms) != n_struct or forces.shape[:2] != (n_models, int(n_atoms.sum())):
        raise ValueError(
            f'inconsistent arrays: energies {energies.shape}, n_atoms {n_atoms.shape} (sum {int(n_atoms.sum())}), '
            f'forces {forces.shape}'
        )
    keys = list(range(n_struct)) if keys is None else list(keys)
    if len(keys) != n_struct:
        raise ValueError(f'{len(keys)} keys for {n_struct} structures')
    if len(set(keys)) != len(keys):
        raise ValueError('keys are not unique')
    stresses = arrays.get('stresses')
    stresses = None if stresses is None else np.asarray(stresses, dtype=float)
    committee = n_models > 1
    offsets = np.concatenate([[0], np.cumsum(n_atoms)])

    results = {}
    for index, key in enumerate(keys):
        rows = slice(offsets[index], offsets[index + 1])
        per_model_forces = forces[:, rows]
        entry = {
            'n_atoms': int(n_atoms[index]),
            'energy': float(energies[:, index].mean()),
            'energies': energies[:, index].copy(),
            'forces': per_model_forces.mean(axis=0),
            'forces_per_model': per_model_forces.copy(),
            'stress': None if stresses is None else stresses[:, index].mean(axis=0),
            'stresses_per_model': None if stresses is None else stresses[:, index].copy(),
        }
        if committee:
            forces_std = per_model_forces.std(axis=0)
            entry['energy_std'] = float(energies[:, index].std())
            entry['forces_std'] = forces_std
            entry['max_force_deviation'] = float(np.sqrt((forces_std**2).sum(axis=-1)).max()) if len(forces_std) else 0.0
            entry['stress_std'] = None if stresses is None else stresses[:, index].std(axis=0)
        results[key] = entry
    return results


def arrays_from_outputs(outputs) -> tuple:
    """``(arrays, keys)`` from the outputs of an ``MlipEvaluateCalculation`` (node.outputs, or a dict of them)."""

    def get(name):
        try:
            return outputs[name]
        except (KeyError, AttributeError):
            return getattr(outputs, name, None)

    arrays: Dict[str, np.ndarray] = {}
    for name in ('energies', 'forces', 'stresses'):
        node = get(name)
        if node is None:
            continue
        for array_name in node.get_arraynames():
            arrays.setdefault(array_name, node.get_array(array_name))
    summary = get('summary')
    keys = summary['keys'] if summary is not None else None
    return arrays, keys


def split_outputs(outputs) -> Dict[Any, Dict[str, Any]]:
    """:func:`split_results` on the outputs of a finished calculation: ``{structure key: results}``."""
    arrays, keys = arrays_from_outputs(outputs)
    return split_results(arrays, keys)
