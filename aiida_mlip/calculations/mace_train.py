"""``mlip.mace_train``: train or fine-tune a MACE model with mace-torch's ``mace_run_train`` on any computer.

The training data are written from the ``mlip.dataset`` input nodes into the job folder (``train.xyz`` ...), a
foundation model is copied from its ``mlip.model`` node after re-checking its sha256, and the command line is
``<python> -m mace.cli.run_train --name=model --train_file=train.xyz ... <parameters>``. Nothing on the submitting
machine's disk is referenced, so the job runs the same on ``localhost`` or on a cluster.

Inputs are checked before any process node exists: the ``parameters`` against mace-torch's own argument parser
(unknown or mistyped options are named, with a suggestion), options this calculation sets itself are refused, and
fine-tuning is checked against the foundation model's elements.
"""
from __future__ import annotations

import contextlib
import difflib
import functools
import io
import warnings

from aiida import orm
from aiida.common import datastructures
from aiida.engine import CalcJob

from aiida_mlip.data.dataset import ISOLATED_ATOM, TrainingSet
from aiida_mlip.data.model import MlipModel, ModelIntegrityError

#: File and run names inside the job folder.
NAME = 'model'
TRAIN_FILE, VALID_FILE, TEST_FILE = 'train.xyz', 'valid.xyz', 'test.xyz'
REPLAY_FILE, FOUNDATION_FILE = 'replay.xyz', 'foundation.model'
STDOUT, STDERR = 'mace.out', 'mace.err'
CHECKPOINTS_DIR = 'checkpoints'

FINETUNE_MODES = ('naive', 'multihead')
DEVICES = ('cpu', 'cuda', 'mps', 'xpu')

#: Options this calculation sets itself; they are refused in ``parameters`` with the reason.
CONTROLLED_OPTIONS = {
    'name': 'the run name is fixed to `model` so that the parser finds its files',
    'train_file': 'training data come from the `train` input (a mlip.dataset node)',
    'valid_file': 'validation data come from the `valid` input',
    'test_file': 'test data come from the `test` input',
    'pt_train_file': 'replay data come from the `replay_dataset` input',
    'foundation_model': 'the foundation model comes from the `foundation_model` input (a mlip.model node)',
    'multiheads_finetuning': 'set by the `finetune` input (`naive` or `multihead`)',
    'restart_latest': 'set when the `restart_folder` input is given',
    'energy_key': 'labels are written under REF_energy/REF_forces/REF_stress',
    'forces_key': 'labels are written under REF_energy/REF_forces/REF_stress',
    'stress_key': 'labels are written under REF_energy/REF_forces/REF_stress',
    'device': 'use the `metadata.options.device` option',
    'work_dir': 'the job folder is the working directory',
    'model_dir': 'the job folder layout is fixed so that the parser finds the files',
    'log_dir': 'the job folder layout is fixed so that the parser finds the files',
    'checkpoints_dir': 'the job folder layout is fixed so that the parser finds the files',
    'results_dir': 'the job folder layout is fixed so that the parser finds the files',
    'downloads_dir': 'nothing is downloaded at run time',
    'config': 'give the options in `parameters`, not in a file',
}

#: Options given unless ``parameters`` sets them (plotting fails on CPU-only installs and costs time).
DEFAULT_PARAMETERS = {'plot': False}


@functools.lru_cache(maxsize=1)
def _mace_arg_parser():
    # On import mace prints a notice about cuequivariance, and e3nn warns that it loads its own constants file with
    # torch.load(weights_only=False), which mace forces: noise in `aiida-mlip campaign validate`, not for the user.
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter('ignore', UserWarning)
        from mace.tools.arg_parser import build_default_arg_parser

    return build_default_arg_parser()


def _mace_actions() -> dict:
    """Option name (no dashes) -> argparse action of mace_run_train."""
    return {
        option[2:]: action
        for option, action in _mace_arg_parser()._option_string_actions.items()  # noqa: SLF001
        if option.startswith('--')
    }


def mace_argv(parameters: dict) -> list[str]:
    """Command-line arguments of ``mace_run_train`` for a dict of options without the leading dashes.

    Flags that take no value (``keep_checkpoints``, ``restart_latest``, ``save_cpu``, ...) are passed when their
    value is True and omitted when False; list values go to options taking several values; dicts are written as
    Python literals (mace reads ``E0s``, ``heads``, ``config_type_weights`` with ``ast.literal_eval``).
    """
    actions = _mace_actions()
    argv = []
    for key, value in parameters.items():
        action = actions.get(key)
        if action is None:
            raise ValueError(unknown_option_message(key, actions))
        if action.nargs == 0:
            if not isinstance(value, bool):
                raise ValueError(f'MACE option `{key}` is a flag without value: give True (pass it) or False (omit it)')
            if value:
                argv.append(f'--{key}')
        elif isinstance(value, (list, tuple)) and action.nargs in ('+', '*'):
            argv.extend([f'--{key}', *[str(item) for item in value]])
        elif isinstance(value, bool):
            argv.append(f'--{key}={value}')
        elif value is None:
            continue
        else:
            argv.append(f'--{key}={value}')
    return argv


def unknown_option_message(key: str, actions: dict | None = None) -> str:
    actions = actions if actions is not None else _mace_actions()
    close = difflib.get_close_matches(key, list(actions), n=1, cutoff=0.6)
    hint = f' (did you mean `{close[0]}`?)' if close else ''
    return f'unknown MACE option `{key}`{hint}: not an option of mace_run_train (mace-torch)'


def mace_parameters_problem(parameters: dict) -> str | None:
    """Why mace-torch would refuse these options, or None. Uses mace's own argument parser and argument checks."""
    import argparse

    if not isinstance(parameters, dict):
        return 'parameters must be a dictionary of mace_run_train options'
    actions = _mace_actions()
    for key in parameters:
        if key.startswith('-'):
            return f'MACE option `{key}`: give option names without the leading dashes (`{key.lstrip("-")}`)'
        if key in CONTROLLED_OPTIONS:
            return f'MACE option `{key}` cannot be set in parameters: {CONTROLLED_OPTIONS[key]}'
        if key not in actions:
            return unknown_option_message(key, actions)
        if key.endswith('_file') or key.endswith('_dir'):
            return (f'MACE option `{key}` names a file on the submitting machine: data and models are passed as '
                    'AiiDA nodes so that they are uploaded with the job')
    try:
        argv = mace_argv(parameters)
    except ValueError as exception:
        return str(exception)
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            args = _mace_arg_parser().parse_args([f'--name={NAME}', f'--train_file={TRAIN_FILE}', *argv])
    except SystemExit:
        lines = [line for line in stderr.getvalue().splitlines() if line.strip()]
        detail = lines[-1].split('error:', 1)[-1].strip() if lines else 'rejected by the argument parser'
        return f'mace_run_train refuses the parameters: {detail}'
    try:
        from mace.tools import check_args

        with contextlib.redirect_stdout(io.StringIO()):
            check_args(args)
    except (AssertionError, ValueError, argparse.ArgumentError) as exception:
        return f'mace_run_train refuses the combination of parameters: {exception}'
    return None


def non_isolated_frames(dataset) -> int:
    return dataset.n_frames - (dataset.config_types or {}).get(ISOLATED_ATOM, 0)


def isolated_elements(dataset) -> set[str]:
    """Elements with an IsolatedAtom frame in the dataset (single-atom frames of that config type)."""
    import numpy as np
    from ase.data import chemical_symbols

    if not (dataset.config_types or {}).get(ISOLATED_ATOM):
        return set()
    arrays = dataset.get_arrays()
    offsets = np.concatenate([[0], np.cumsum(arrays['n_atoms'])[:-1]])
    return {chemical_symbols[int(arrays['numbers'][offset])]
            for offset, n_atoms, config in zip(offsets, arrays['n_atoms'], arrays['config_type'])
            if config == ISOLATED_ATOM and n_atoms == 1}


def e0s_choice(train, e0s=None, parameters: dict | None = None) -> tuple[str, str | None]:
    """How the isolated-atom energies are chosen: (source, ``--E0s`` value or None). First match wins:

    1. the ``e0s`` input ({element: eV}) -> ``--E0s={Z: eV}``; IsolatedAtom frames are left out of train.xyz;
    2. ``E0s`` in parameters ('average', 'foundation', 'estimated', ...) -> passed as given; IsolatedAtom frames
       are left out of train.xyz so that mace uses the given choice;
    3. IsolatedAtom frames in ``train`` for every element -> mace reads them from train.xyz (no ``--E0s``);
    4. otherwise ``--E0s=average`` (least-squares fit of per-element energies to the training energies).
    """
    from ase.data import atomic_numbers

    parameters = parameters or {}
    if e0s is not None:
        values = {atomic_numbers[element]: float(energy) for element, energy in sorted(e0s.items())}
        return 'input', str(values)
    if 'E0s' in parameters:
        return 'parameters', None
    if train.elements and set(train.elements) <= isolated_elements(train):
        return 'isolated_atoms', None
    return 'average', 'average'


# ---- validators -------------------------------------------------------------------------------------------------
def validate_parameters(node, _):
    if node is None:
        return None
    return mace_parameters_problem(node.get_dict())


def validate_inputs(inputs, _):  # noqa: C901, PLR0911, PLR0912  (one list of independent checks)
    """Checks that need several inputs; each returns the first problem found."""
    from ase.data import chemical_symbols

    train = inputs.get('train')
    if train is None:
        return None
    code = inputs.get('code')
    if code is not None and code.default_calc_job_plugin not in (None, 'mlip.mace_train'):
        return (f'code `{code.full_label}` runs `{code.default_calc_job_plugin}`, but MaceTrainCalculation needs a '
                'python code for `mlip.mace_train` (see aiida_mlip.setup.environment.ensure_mlip_codes)')
    parameters = inputs['parameters'].get_dict() if 'parameters' in inputs else {}
    foundation = inputs.get('foundation_model')
    finetune = inputs.get('finetune')
    replay = inputs.get('replay_dataset')
    e0s = inputs.get('e0s')
    mode = finetune.value if finetune is not None else ('naive' if foundation is not None else None)

    if non_isolated_frames(train) == 0:
        return 'the train dataset holds only IsolatedAtom frames: there is nothing to fit'
    for key in ('valid', 'test'):
        dataset = inputs.get(key)
        if dataset is not None and non_isolated_frames(dataset) == 0:
            return f'the {key} dataset holds only IsolatedAtom frames (they are left out of {key}.xyz)'

    batch_size = parameters.get('batch_size', 10)
    n_train = non_isolated_frames(train)
    if 'valid' not in inputs:
        n_train = int(n_train * (1.0 - float(parameters.get('valid_fraction', 0.1))))
    if isinstance(batch_size, int) and batch_size > n_train:
        return (f'batch_size {batch_size} is larger than the {n_train} training frames: mace drops incomplete '
                'batches, so no training step would be taken; lower batch_size or add data')

    if e0s is not None:
        if 'E0s' in parameters:
            return 'give the isolated-atom energies either as the `e0s` input or as `E0s` in parameters, not both'
        e0s_dict = e0s.get_dict()
        unknown = sorted(key for key in e0s_dict if key not in chemical_symbols[1:])
        if unknown:
            return f'e0s keys must be element symbols, got {unknown}'
        missing = sorted(set(train.elements) - set(e0s_dict))
        if missing:
            return f'e0s has no energy for {", ".join(missing)}, which the train dataset contains'
    elif 'E0s' not in parameters:
        isolated = isolated_elements(train)
        if isolated and not set(train.elements) <= isolated:
            missing = sorted(set(train.elements) - isolated)
            return (f'the train dataset has IsolatedAtom frames for {", ".join(sorted(isolated))} but not for '
                    f'{", ".join(missing)}: mace would use an incomplete E0 table; label the missing isolated atoms '
                    'or give the `e0s` input')

    seen = set(train.elements) | set(foundation.elements if foundation is not None else [])
    for key in ('valid', 'test'):
        dataset = inputs.get(key)
        if dataset is not None:
            unseen = sorted(set(dataset.elements) - seen)
            if unseen:
                return (f'the {key} dataset contains {", ".join(unseen)}, absent from the train dataset'
                        f'{" and the foundation model" if foundation is not None else ""}: the model cannot learn it')

    if foundation is None:
        if finetune is not None:
            return '`finetune` was given without a `foundation_model` to fine-tune'
        if replay is not None:
            return '`replay_dataset` is only used for multihead fine-tuning of a `foundation_model`'
        return None

    if mode not in FINETUNE_MODES:
        return f'finetune must be one of {FINETUNE_MODES}, got `{mode}`'
    try:
        foundation.verify()  # a changed file is refused before a CalcJob node exists
    except ModelIntegrityError as exception:
        return f'foundation_model: {exception}'
    if 'r_max' in parameters and abs(float(parameters['r_max']) - foundation.r_max) > 1e-6:
        return (f'r_max {parameters["r_max"]} differs from the foundation model\'s r_max {foundation.r_max}; '
                'fine-tuning always uses the foundation\'s cutoff: drop r_max from parameters')
    if mode == 'naive':
        if replay is not None:
            return '`replay_dataset` is only used with finetune=`multihead`; naive fine-tuning takes no replay data'
        missing = foundation.covers(train.elements)
        if missing:
            return (f'naive fine-tuning cannot add elements the foundation model lacks: the train dataset contains '
                    f'{", ".join(missing)}, the foundation model {foundation.pk} covers only '
                    f'{", ".join(foundation.elements)}; use a foundation that covers them or train from scratch')
    else:
        if replay is None:
            return ('multihead fine-tuning needs replay data from the foundation\'s domain: give `replay_dataset` '
                    '(written as --pt_train_file); the Materials Project replay set cannot be downloaded here')
        if len(foundation.elements) < 2:
            return (f'multihead fine-tuning needs a foundation model with at least 2 elements; '
                    f'foundation model {foundation.pk} has only {", ".join(foundation.elements)}: use naive fine-tuning')
        if e0s is None and str(parameters.get('E0s', '')).lower() == 'average':
            return 'multihead fine-tuning cannot use E0s=average (mace refuses it): give `e0s` or IsolatedAtom frames'
        if e0s is None and 'E0s' not in parameters and not set(train.elements) <= isolated_elements(train):
            return ('multihead fine-tuning cannot use average E0s (mace refuses it): give the `e0s` input, label the '
                    'isolated atoms, or set E0s to `foundation` in parameters')
    return None


def validate_device(value, _):
    return None if value in DEVICES else f'device must be one of {DEVICES}, got `{value}`'


def validate_restart_folder(node, _):
    if isinstance(node, orm.FolderData):
        names = [name for name in _list_checkpoints(node)]
        if not names:
            return (f'restart_folder FolderData<{node.pk}> holds no checkpoint (`checkpoints/*.pt`): nothing to '
                    'continue from')
    return None


def _list_checkpoints(folder: orm.FolderData) -> list[str]:
    """Relative paths of ``*.pt`` checkpoint files in a FolderData (under ``checkpoints/`` or at the top)."""
    repository = folder.base.repository
    found = []
    for directory in (CHECKPOINTS_DIR, ''):
        try:
            names = repository.list_object_names(directory or None)
        except (FileNotFoundError, NotADirectoryError):
            continue
        found += [f'{directory}/{name}' if directory else name for name in names if name.endswith('.pt')]
    return found


class MaceTrainCalculation(CalcJob):
    """Train (or fine-tune) a MACE model with mace-torch's ``mace_run_train`` on labeled ``mlip.dataset`` nodes."""

    @classmethod
    def define(cls, spec):
        super().define(spec)
        options = spec.inputs['metadata']['options']
        options['resources'].default = {'num_machines': 1, 'num_mpiprocs_per_machine': 1}
        options['withmpi'].default = False
        options['environment_variables'].default = {'OMP_NUM_THREADS': '1'}
        spec.input('metadata.options.parser_name', valid_type=str, default='mlip.mace_train')
        spec.input('metadata.options.device', valid_type=str, default='cpu', validator=validate_device,
                   help='Torch device of the training run (`--device`).')
        spec.input('metadata.options.retrieve_checkpoints', valid_type=bool, default=True,
                   help='Retrieve `checkpoints/*.pt`, so that a run stopped by the walltime can be continued from '
                        'the `retrieved` folder; set False for large models and restart from the `remote_folder`.')

        spec.input('train', valid_type=TrainingSet, help='Training frames (IsolatedAtom frames define E0s).')
        spec.input('valid', valid_type=TrainingSet, required=False,
                   help='Validation frames; without them mace holds out `valid_fraction` (0.1) of `train`.')
        spec.input('test', valid_type=TrainingSet, required=False,
                   help='Test frames, evaluated once after training.')
        spec.input('parameters', valid_type=orm.Dict, validator=validate_parameters,
                   help='mace_run_train options without the leading dashes, e.g. {"model": "MACE", "num_channels": 8, '
                        '"max_L": 0, "r_max": 4.0, "max_num_epochs": 20, "batch_size": 5, "default_dtype": '
                        '"float32", "seed": 1}. Checked against mace-torch\'s own argument parser.')
        spec.input('e0s', valid_type=orm.Dict, required=False,
                   help='Isolated-atom energies {element: eV}; default: the IsolatedAtom frames of `train`, else '
                        '`E0s` of parameters, else "average".')
        spec.input('foundation_model', valid_type=MlipModel, required=False,
                   help='Model to fine-tune (copied into the job after its sha256 is re-checked).')
        spec.input('finetune', valid_type=orm.Str, required=False,
                   help='`naive` (default with a foundation model; cannot add elements) or `multihead` (needs '
                        '`replay_dataset` and a foundation with >= 2 elements).')
        spec.input('replay_dataset', valid_type=TrainingSet, required=False,
                   help='Replay frames for multihead fine-tuning (written as --pt_train_file).')
        spec.input('restart_folder', valid_type=(orm.RemoteData, orm.FolderData), required=False,
                   validator=validate_restart_folder,
                   help='Folder with `checkpoints/*.pt` of an earlier run (its `remote_folder` or `retrieved`): '
                        'training continues from the latest checkpoint (--restart_latest). Keep `seed` equal: the '
                        'checkpoint names contain it.')
        spec.inputs.validator = validate_inputs

        spec.output('model', valid_type=MlipModel, required=False,
                    help='The trained model (the stage-two/SWA model when SWA was used).')
        spec.output('metrics', valid_type=orm.Dict, required=False,
                    help='Final errors per split from mace\'s error tables (meV/atom, meV/Å, meV/Å³) and the '
                         'validation errors at the best epoch.')
        spec.output('learning_curve', valid_type=orm.ArrayData, required=False,
                    help='Per evaluation: epoch, mean training loss, validation loss and errors.')
        spec.default_output_node = 'metrics'

        spec.exit_code(300, 'ERROR_RETRIEVED_FOLDER_UNREADABLE',
                       message='The retrieved folder could not be read.')
        spec.exit_code(301, 'ERROR_OUTPUT_LOG_MISSING',
                       message='The retrieved folder holds no mace training log (logs/model_run-*.log).')
        spec.exit_code(305, 'ERROR_MACE_EXCEPTION',
                       message='mace_run_train stopped with an exception: {exception}')
        spec.exit_code(310, 'ERROR_NO_MODEL_WRITTEN',
                       message='mace_run_train finished without writing the model file {filename}.')
        spec.exit_code(311, 'ERROR_MODEL_UNREADABLE',
                       message='The model file written by mace could not be read as a MACE model: {exception}')
        spec.exit_code(320, 'ERROR_NAN_LOSS',
                       message='The training diverged: NaN/inf loss or errors at epoch {epoch} (lower lr, check data).')
        spec.exit_code(400, 'ERROR_OUT_OF_WALLTIME',
                       message='The job ran out of walltime after epoch {epoch}; {checkpoints} checkpoint(s) retrieved: '
                               'restart with `restart_folder`.')

    def prepare_for_submission(self, folder):
        """Write the data files and the foundation model into the job folder and build the command line."""
        parameters = {**DEFAULT_PARAMETERS, **self.inputs.parameters.get_dict()}
        train = self.inputs.train
        e0s = self.inputs.get('e0s')
        source, e0s_value = e0s_choice(train, e0s.get_dict() if e0s is not None else None, parameters)
        keep_isolated = source == 'isolated_atoms'

        arguments = {
            'name': NAME, 'train_file': TRAIN_FILE,
            'energy_key': 'REF_energy', 'forces_key': 'REF_forces', 'stress_key': 'REF_stress',
            'device': self.inputs.metadata.options.device,
        }
        self._write_frames(folder, TRAIN_FILE, train, keep_isolated)
        for key, filename in (('valid', VALID_FILE), ('test', TEST_FILE)):
            if key in self.inputs:
                # mace reports test errors per config_type: one config_type gives one overall `test` row.
                self._write_frames(folder, filename, self.inputs[key], keep_isolated=False,
                                   config_type='test' if key == 'test' else None)
                arguments[f'{key}_file'] = filename
        if e0s_value is not None:
            arguments['E0s'] = e0s_value

        local_copy_list, remote_copy_list = [], []
        if 'foundation_model' in self.inputs:
            self.inputs.foundation_model.write_verified(folder.get_abs_path(FOUNDATION_FILE))
            arguments['foundation_model'] = FOUNDATION_FILE
            mode = self.inputs.finetune.value if 'finetune' in self.inputs else 'naive'
            arguments['multiheads_finetuning'] = mode == 'multihead'
            if mode == 'multihead':
                self._write_frames(folder, REPLAY_FILE, self.inputs.replay_dataset, keep_isolated=False)
                arguments['pt_train_file'] = REPLAY_FILE

        if 'restart_folder' in self.inputs:
            restart = self.inputs.restart_folder
            arguments['restart_latest'] = True
            if isinstance(restart, orm.RemoteData):
                if restart.computer.uuid != self.node.computer.uuid:
                    raise ValueError(f'restart_folder RemoteData<{restart.pk}> is on computer '
                                     f'`{restart.computer.label}`, not on `{self.node.computer.label}`')
                remote_copy_list.append((restart.computer.uuid, f'{restart.get_remote_path()}/{CHECKPOINTS_DIR}',
                                         CHECKPOINTS_DIR))
            else:
                subfolder = folder.get_subfolder(CHECKPOINTS_DIR, create=True)
                for relative in _list_checkpoints(restart):
                    with restart.base.repository.open(relative, 'rb') as handle:
                        subfolder.create_file_from_filelike(handle, relative.split('/')[-1], mode='wb')

        codeinfo = datastructures.CodeInfo()
        codeinfo.code_uuid = self.inputs.code.uuid
        codeinfo.cmdline_params = ['-m', 'mace.cli.run_train', *mace_argv({**arguments, **parameters})]
        codeinfo.stdout_name = STDOUT
        codeinfo.stderr_name = STDERR

        calcinfo = datastructures.CalcInfo()
        calcinfo.codes_info = [codeinfo]
        calcinfo.local_copy_list = local_copy_list
        calcinfo.remote_copy_list = remote_copy_list
        calcinfo.retrieve_list = [
            STDOUT, STDERR, f'{NAME}.model', f'{NAME}_stagetwo.model', 'logs', 'results',
        ]
        if self.inputs.metadata.options.retrieve_checkpoints:
            calcinfo.retrieve_list.append((f'{CHECKPOINTS_DIR}/*.pt', '.', 2))
        return calcinfo

    @staticmethod
    def _write_frames(folder, filename: str, dataset, keep_isolated: bool, config_type: str | None = None) -> int:
        """Write a dataset as extxyz into the job folder (IsolatedAtom frames only where they define E0s).

        With ``config_type`` every frame gets that config type (the original one is kept as ``dataset_config_type``).
        """
        from ase.io import write

        frames = [frame for frame in dataset.to_ase()
                  if keep_isolated or frame.info.get('config_type') != ISOLATED_ATOM]
        if config_type is not None:
            for frame in frames:
                frame.info['dataset_config_type'] = frame.info.get('config_type')
                frame.info['config_type'] = config_type
        with folder.open(filename, 'w') as handle:
            write(handle, frames, format='extxyz')
        return len(frames)
