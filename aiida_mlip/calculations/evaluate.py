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

import json
from typing import Any, Dict, Mapping, Optional, Sequence

import numpy as np
from aiida import orm
from aiida.common import datastructures
from aiida.engine import CalcJob

from aiida_mlip.data.dataset import TrainingSet
from aiida_mlip.data.model import MlipModel

#: Files of the job folder (names are part of the parser contract).
STRUCTURES_FILENAME = 'structures.extxyz'
KEYS_FILENAME = 'structure_keys.json'
RESULTS_FILENAME = 'results.npz'
SUMMARY_FILENAME = 'results.json'
STDOUT_FILENAME = 'engine.out'
STDERR_FILENAME = 'engine.err'
EXIT_CODE_FILENAME = 'engine.exit_code'
MODEL_FILENAME = 'model_{index:03d}.model'
ENGINE_MODULE = 'aiida_mlip.engine.evaluate'
DTYPES = ('float32', 'float64')


def model_filename(index: int) -> str:
    """Name of the ``index``-th model (sorted ``models`` keys) in the job folder."""
    return MODEL_FILENAME.format(index=index)


def _structure_attributes(structure: orm.StructureData) -> dict:
    """The raw attributes (cell, pbc1-3, kinds, sites): one read, much cheaper than ``.sites``/``get_ase()``."""
    return structure.base.attributes.all


def _kind_symbols(attributes: dict) -> dict:
    """kind name -> element symbol; ValueError for alloy/vacancy kinds, which an MLIP cannot evaluate."""
    symbols = {}
    for kind in attributes.get('kinds', []):
        if len(kind['symbols']) != 1 or abs(sum(kind['weights']) - 1.0) > 1e-6:
            raise ValueError(f'kind `{kind["name"]}` is an alloy or has vacancies ({kind["symbols"]}, '
                             f'weights {kind["weights"]}): an MLIP needs one element per site')
        symbols[kind['name']] = kind['symbols'][0]
    return symbols


def structure_to_atoms(structure: orm.StructureData):
    """Bare ``ase.Atoms`` (numbers, positions, cell, pbc; no tags, no info) from the node attributes."""
    from ase import Atoms

    attributes = _structure_attributes(structure)
    symbols = _kind_symbols(attributes)
    sites = attributes.get('sites', [])
    return Atoms(
        symbols=[symbols[site['kind_name']] for site in sites],
        positions=[site['position'] for site in sites] if sites else np.zeros((0, 3)),
        cell=attributes['cell'],
        pbc=[attributes['pbc1'], attributes['pbc2'], attributes['pbc3']],
    )


def check_models_cover(models: Mapping[str, Any], structures: Optional[Mapping[str, Any]] = None,
                       dataset: Optional[TrainingSet] = None) -> Optional[str]:
    """Error message if a structure (or dataset frame) has an element some model was not trained on, else None.

    Also refuses structures without atoms and alloy/vacancy kinds. Public so that WorkChains that expose
    ``MlipEvaluateCalculation`` without ``structures`` can run the same check on the cells they make.
    """
    where: Dict[str, list] = {}  # element -> structure keys that contain it (for the message)
    for key in sorted(structures or {}):
        structure = structures[key]
        if not isinstance(structure, orm.StructureData):
            return f'`structures.{key}` must be a StructureData, got {type(structure).__name__}'
        attributes = _structure_attributes(structure)
        if not attributes.get('sites'):
            return f'`structures.{key}` has no atoms'
        try:
            elements = set(_kind_symbols(attributes).values())
        except ValueError as exception:
            return f'`structures.{key}`: {exception}'
        for element in elements:
            where.setdefault(element, []).append(key)
    if dataset is not None:
        for element in dataset.elements:
            where.setdefault(element, []).append('dataset')

    problems = []
    for key in sorted(models):
        model = models[key]
        missing = model.covers(where)
        if missing:
            details = []
            for element in missing:
                keys = where[element]
                shown = ', '.join(keys[:5]) + (', ...' if len(keys) > 5 else '')
                details.append(f'{element} (in {shown})')
            problems.append(
                f'model `{key}` (MlipModel<{model.pk}>, elements {" ".join(model.elements)}) '
                f'does not cover {"; ".join(details)}'
            )
    if problems:
        return 'elements missing from the model: ' + ' | '.join(problems)
    return None


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
    if not models:
        return 'at least one model is required in `models` (one = single model, several = committee)'
    for key, model in models.items():
        if not isinstance(model, MlipModel):
            return f'`models.{key}` must be an MlipModel (mlip.model), got {type(model).__name__}'

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

    for name in ('batch_size', 'threads'):
        if name in value and int(value[name].value) < 1:
            return f'`{name}` must be >= 1, got {value[name].value}'
    if value.get('dtype') is not None and value['dtype'].value not in DTYPES:
        return f'`dtype` must be one of {DTYPES}, got {value["dtype"].value!r}'
    return None


class MlipEvaluateCalculation(CalcJob):
    """Evaluate many structures with one MLIP (or a committee of several) in one job and one model load."""

    _DEFAULT_BATCH_SIZE = 8

    @classmethod
    def define(cls, spec):
        super().define(spec)
        spec.input_namespace(
            'models', valid_type=MlipModel, dynamic=True, required=True,
            help='MLIP models by key: one = single model, several = committee (mean/std over models). '
                 'Rows of the per-model output arrays follow the sorted keys.',
        )  # fmt: skip
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
        spec.input('dtype', valid_type=orm.Str, required=False,
                   help="'float32' or 'float64'; default: the dtype the model was stored with.")
        spec.input(
            'threads', valid_type=orm.Int, default=lambda: orm.Int(1),
            help='torch threads, also exported as OMP_NUM_THREADS/MKL_NUM_THREADS in the job. Never more than the '
                 'cores the job really has: oversubscribed OpenMP made MACE inference ~15x slower.',
        )  # fmt: skip
        spec.inputs.validator = validate_inputs

        options = spec.inputs['metadata']['options']
        options['resources'].default = {'num_machines': 1, 'num_mpiprocs_per_machine': 1}
        options['withmpi'].default = False
        options['parser_name'].default = 'mlip.evaluate'
        options['input_filename'].default = STRUCTURES_FILENAME
        options['output_filename'].default = RESULTS_FILENAME

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

        spec.exit_code(300, 'ERROR_MISSING_OUTPUT_FILES',
                       message='The engine did not write its output files: {message}')
        spec.exit_code(301, 'ERROR_MISSING_ELEMENT',
                       message='A structure contains an element a model was not trained on: {message}')
        spec.exit_code(302, 'ERROR_UNREADABLE_MODEL', message='A model file could not be read: {message}')
        spec.exit_code(303, 'ERROR_UNREADABLE_STRUCTURES', message='The structure file could not be read: {message}')
        spec.exit_code(304, 'ERROR_ENGINE_FAILED', message='The evaluation engine failed: {message}')
        spec.exit_code(310, 'ERROR_OUTPUT_CORRUPT', message='The output files are corrupt or inconsistent: {message}')
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

    def prepare_for_submission(self, folder):
        """Write ONE extxyz with every structure and the sha256-verified model files; run the engine once."""
        import ase.io

        frames = self._frames(self.inputs)
        keys = self.structure_keys(self.inputs)
        with folder.open(STRUCTURES_FILENAME, 'w') as handle:
            ase.io.write(handle, frames, format='extxyz')
        model_keys = sorted(self.inputs.models)
        with folder.open(KEYS_FILENAME, 'w') as handle:
            json.dump(
                {
                    'keys': keys,
                    'source': 'structures' if self.inputs.get('structures') else 'dataset',
                    'model_keys': model_keys,
                    'model_uuids': [self.inputs.models[key].uuid for key in model_keys],
                    'model_sha256': [self.inputs.models[key].sha256 for key in model_keys],
                },
                handle,
            )

        model_files = []
        for index, key in enumerate(model_keys):
            name = model_filename(index)
            # write_verified re-hashes the repository content and the written copy against the pinned sha256
            self.inputs.models[key].write_verified(folder.get_abs_path(name))
            model_files.append(name)

        threads = int(self.inputs.threads.value)
        params = ['-m', ENGINE_MODULE, '--models', *model_files, '--structures', STRUCTURES_FILENAME,
                  '--output', RESULTS_FILENAME, '--summary', SUMMARY_FILENAME,
                  '--batch-size', str(int(self.inputs.batch_size.value)), '--threads', str(threads)]  # fmt: skip
        if 'dtype' in self.inputs:
            params += ['--dtype', self.inputs.dtype.value]
        if not self.inputs.compute_stress.value:
            params.append('--no-stress')

        codeinfo = datastructures.CodeInfo()
        codeinfo.code_uuid = self.inputs.code.uuid
        codeinfo.cmdline_params = params
        codeinfo.stdout_name = STDOUT_FILENAME
        codeinfo.stderr_name = STDERR_FILENAME
        codeinfo.withmpi = self.inputs.metadata.options.withmpi

        calcinfo = datastructures.CalcInfo()
        calcinfo.codes_info = [codeinfo]
        calcinfo.local_copy_list = []
        calcinfo.remote_copy_list = []
        # After the computer's and the code's prepend text (which only default OMP_NUM_THREADS), before the run.
        calcinfo.prepend_text = '\n'.join(
            [f'export OMP_NUM_THREADS={threads}', f'export MKL_NUM_THREADS={threads}',
             'export OMP_WAIT_POLICY=PASSIVE']
        )  # fmt: skip
        # The engine's exit status classifies failures; only exact right after the run line (no user append_text).
        if not self.inputs.metadata.options.get('append_text'):
            calcinfo.append_text = f'echo $? > {EXIT_CODE_FILENAME}'
        calcinfo.retrieve_list = [
            RESULTS_FILENAME, SUMMARY_FILENAME, KEYS_FILENAME, STDOUT_FILENAME, STDERR_FILENAME, EXIT_CODE_FILENAME,
        ] + [name for name in (self.node.get_option('scheduler_stdout'), self.node.get_option('scheduler_stderr'))
             if name]  # fmt: skip
        return calcinfo


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
