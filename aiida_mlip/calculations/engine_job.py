"""Shared part of the CalcJobs that run an :mod:`aiida_mlip.engine` module (``mlip.evaluate``, ``mlip.md``).

An engine job writes ONE extxyz with every structure, the sha256-verified model files and a JSON file with the keys
of the job (which rows/runs belong to which input), and runs ``<python> -m <engine module> --models ... --threads N``
once; the job script records the engine's exit status in ``engine.exit_code`` (the parsers,
:class:`aiida_mlip.parsers.engine.EngineJobParser`, map it to exit codes 300-304; 310 is corrupt output).

:class:`EngineCalcJob` defines the shared inputs (``models``, ``threads``, ``dtype``; ``code`` comes from
``CalcJob``), the options, the exit codes and the job folder; a subclass adds its own ports and says what differs:
:meth:`EngineCalcJob.engine_frames`, :meth:`EngineCalcJob.job_keys`, :meth:`EngineCalcJob.engine_arguments`.
The input checks shared by the calculations and the workflows that expose them are functions here.
"""
from __future__ import annotations

import json
from typing import Any, Dict, List, Mapping, Optional

import numpy as np
from aiida import orm
from aiida.common import datastructures
from aiida.engine import CalcJob

from aiida_mlip.data.model import MlipModel, ModelIntegrityError

#: Files every engine job writes or retrieves (names are part of the parser contract).
STDOUT_FILENAME = 'engine.out'
STDERR_FILENAME = 'engine.err'
EXIT_CODE_FILENAME = 'engine.exit_code'
MODEL_FILENAME = 'model_{index:03d}.model'
DTYPES = ('float32', 'float64')
THREADS_HELP = (
    'torch threads, also exported as OMP_NUM_THREADS/MKL_NUM_THREADS in the job. Never more than the cores the job '
    'really has: oversubscribed OpenMP made MACE inference ~15x slower.'
)


#: ``metadata.options`` that describe where and how long a job runs, not its files: what one engine job's options
#: hand on to another job of the same model (evaluate -> relax, MD).
SCHEDULER_OPTION_KEYS = ('resources', 'max_wallclock_seconds', 'queue_name', 'account', 'qos', 'withmpi',
                         'custom_scheduler_commands', 'max_memory_kb')
EVALUATE_OPTIONS_HELP = ('`metadata.options` of every job that runs a model (evaluate, relax, MD): resources, '
                         '`max_wallclock_seconds`, `queue_name`, `account`, ...; default: one process, no limit '
                         'but the computer\'s.')


def scheduler_options(options: Optional[Mapping[str, Any]]) -> Dict[str, Any]:
    """The scheduler part of ``options`` (a dict, an ``orm.Dict`` or None), to hand to another engine job."""
    options = options.get_dict() if isinstance(options, orm.Dict) else dict(options or {})
    return {key: options[key] for key in SCHEDULER_OPTION_KEYS if key in options}


def model_filename(index: int) -> str:
    """Name of the ``index``-th model (sorted ``models`` keys) in the job folder."""
    return MODEL_FILENAME.format(index=index)


# ---- structures ----------------------------------------------------------------------------------------------------

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


# ---- input checks (shared with the workflows that expose the calculations) ---------------------------------------

def models_type_problem(models: Mapping[str, Any]) -> Optional[str]:
    """At least one model, every one an ``MlipModel`` whose stored file still has its pinned sha256; else the message.

    The hash is checked here, at launch, so that a changed file is refused before a CalcJob node exists (the job
    folder re-checks it when the file is written).
    """
    if not models:
        return 'at least one model is required in `models` (one = single model, several = committee)'
    for key, model in models.items():
        if not isinstance(model, MlipModel):
            return f'`models.{key}` must be an MlipModel (mlip.model), got {type(model).__name__}'
        try:
            model.verify()
        except ModelIntegrityError as exception:
            return f'`models.{key}`: {exception}'
    return None


def check_models_cover(models: Mapping[str, Any], structures: Optional[Mapping[str, Any]] = None,
                       dataset=None) -> Optional[str]:
    """Error message if a structure (or dataset frame) has an element some model was not trained on, else None.

    Also refuses structures without atoms and alloy/vacancy kinds. Public so that WorkChains that expose an engine
    calculation without its structure ports can run the same check on the cells they make.
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


def _value(node):
    return node.value if isinstance(node, orm.BaseType) else node


def engine_options_problem(threads=None, dtype=None) -> Optional[str]:
    """``threads >= 1`` and ``dtype`` in :data:`DTYPES` (nodes or plain values; None is skipped)."""
    if threads is not None and int(_value(threads)) < 1:
        return f'`threads` must be >= 1, got {_value(threads)}'
    if dtype is not None and _value(dtype) not in DTYPES:
        return f'`dtype` must be one of {DTYPES}, got {_value(dtype)!r}'
    return None


# ---- the CalcJob -------------------------------------------------------------------------------------------------

class EngineCalcJob(CalcJob):
    """One job that runs an engine module over every structure with every model, each model loaded once.

    Subclasses set the class attributes below and implement :meth:`engine_frames`, :meth:`job_keys` and
    :meth:`engine_arguments`.
    """

    #: ``python -m`` module of the engine
    ENGINE_MODULE: str
    #: ``parser_name`` default
    PARSER_NAME: str
    #: what exit code 304 calls the engine ('evaluation', 'MD')
    ENGINE_LABEL = 'engine'
    #: help of the ``models`` namespace
    MODELS_HELP = 'MLIP models by key: one = single model, several = committee.'
    #: job folder files (the structures the engine reads, its results, the keys of the job)
    STRUCTURES_FILENAME: str
    RESULTS_FILENAME: str
    SUMMARY_FILENAME: str
    KEYS_FILENAME: str
    #: further engine outputs to retrieve
    EXTRA_RETRIEVE: tuple = ()

    @classmethod
    def define(cls, spec):
        super().define(spec)
        spec.input_namespace('models', valid_type=MlipModel, dynamic=True, required=True, help=cls.MODELS_HELP)
        spec.input('dtype', valid_type=orm.Str, required=False,
                   help="'float32' or 'float64'; default: the dtype the model was stored with.")
        spec.input('threads', valid_type=orm.Int, default=lambda: orm.Int(1), help=THREADS_HELP)

        options = spec.inputs['metadata']['options']
        options['resources'].default = {'num_machines': 1, 'num_mpiprocs_per_machine': 1}
        options['withmpi'].default = False
        options['parser_name'].default = cls.PARSER_NAME
        options['input_filename'].default = cls.STRUCTURES_FILENAME
        options['output_filename'].default = cls.RESULTS_FILENAME

        spec.exit_code(300, 'ERROR_MISSING_OUTPUT_FILES',
                       message='The engine did not write its output files: {message}')
        spec.exit_code(301, 'ERROR_MISSING_ELEMENT',
                       message='A structure contains an element a model was not trained on: {message}')
        spec.exit_code(302, 'ERROR_UNREADABLE_MODEL', message='A model file could not be read: {message}')
        spec.exit_code(303, 'ERROR_UNREADABLE_STRUCTURES', message='The structure file could not be read: {message}')
        spec.exit_code(304, 'ERROR_ENGINE_FAILED', message=f'The {cls.ENGINE_LABEL} engine failed: {{message}}')
        spec.exit_code(310, 'ERROR_OUTPUT_CORRUPT', message='The output files are corrupt or inconsistent: {message}')

    # ---- what the subclasses say ----------------------------------------------------------------------------------
    def engine_frames(self) -> list:
        """Bare ``ase.Atoms`` for the structure file, in the order the engine will use."""
        raise NotImplementedError

    def job_keys(self) -> dict:
        """What the rows/runs of the results belong to (written to ``KEYS_FILENAME`` with the model keys)."""
        raise NotImplementedError

    def engine_arguments(self) -> List[str]:
        """Command-line arguments of the engine besides ``--models``, ``--threads`` and ``--dtype``."""
        raise NotImplementedError

    # ---- the job folder --------------------------------------------------------------------------------------------
    def prepare_for_submission(self, folder):
        """Write ONE extxyz with every structure, the keys and the sha256-verified model files; run the engine once."""
        import ase.io

        with folder.open(self.STRUCTURES_FILENAME, 'w') as handle:
            ase.io.write(handle, self.engine_frames(), format='extxyz')

        models = self.inputs.models
        model_keys = sorted(models)
        with folder.open(self.KEYS_FILENAME, 'w') as handle:
            json.dump(
                {
                    **self.job_keys(),
                    'model_keys': model_keys,
                    'model_uuids': [models[key].uuid for key in model_keys],
                    'model_sha256': [models[key].sha256 for key in model_keys],
                },
                handle,
            )
        model_files = []
        for index, key in enumerate(model_keys):
            name = model_filename(index)
            # write_verified re-hashes the repository content and the written copy against the pinned sha256
            models[key].write_verified(folder.get_abs_path(name))
            model_files.append(name)

        threads = int(self.inputs.threads.value)
        params = ['-m', self.ENGINE_MODULE, '--models', *model_files, *self.engine_arguments(),
                  '--threads', str(threads)]  # fmt: skip
        if 'dtype' in self.inputs:
            params += ['--dtype', self.inputs.dtype.value]

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
            self.RESULTS_FILENAME, self.SUMMARY_FILENAME, *self.EXTRA_RETRIEVE, self.KEYS_FILENAME, STDOUT_FILENAME,
            STDERR_FILENAME, EXIT_CODE_FILENAME,
        ] + [name for name in (self.node.get_option('scheduler_stdout'), self.node.get_option('scheduler_stderr'))
             if name]  # fmt: skip
        return calcinfo
