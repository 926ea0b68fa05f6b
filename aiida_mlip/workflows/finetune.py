"""``mlip.finetune``: the foundation fine-tuning loop, from a foundation model to a validated fine-tuned model.

One iteration (docs/sources.md, "Foundation fine-tuning loop"):

1. short NVT MD at every volume x temperature in ONE ``MlipMdCalculation`` (the foundation in iteration 1, the
   latest fine-tuned model afterwards);
2. ``frames_per_volume`` frames per volume, picked by a seeded calcfunction (``random``, or ``diverse``:
   farthest-point sampling in the pair-distance descriptor of :mod:`aiida_mlip.analysis.selection`, the one active
   learning uses), so every labeled cell has a creator;
3. DFT labels for them (``DftLabelingWorkChain``), merged with the labels of earlier iterations;
4. fine-tuning of the *foundation* on all labels so far (``TrainingWorkChain`` with ``foundation_model`` and
   ``finetune`` set in ``training.mace``): the final model's ``MaceTrainCalculation`` has the foundation as input;
5. validation of the fine-tuned model against DFT (``ValidationWorkChain``). The DFT reference is computed ONCE,
   by the validation of the zero-shot foundation that starts with the MD of iteration 1 (with the same DFT
   settings as the labels); every later validation gets it through ``reference`` and runs only MLIP jobs.

If the validation fails and iterations remain, the next iteration samples where it failed
(:func:`next_sampling`). At the end the zero-shot foundation, the fine-tuned model and (``compare_with_scratch``)
a model trained from scratch on the same labels are compared on the same validation and on the same test split.
"""
from __future__ import annotations

import math

import numpy as np
from aiida import orm
from aiida.common import AttributeDict
from aiida.engine import ToContext, WorkChain, calcfunction, if_, while_
from aiida.plugins import CalculationFactory

from aiida_mlip.analysis.refinement import failed_sections
from aiida_mlip.analysis.selection import atoms_descriptors, farthest_point_sampling
from aiida_mlip.calculations.datasets import merge_datasets, split_indices
from aiida_mlip.calculations.md import md_parameters_problem
from aiida_mlip.calculations.metrics import prediction_metrics
from aiida_mlip.calculations.sampling import scale_volume
from aiida_mlip.data.dataset import TrainingSet
from aiida_mlip.data.model import MlipModel
from aiida_mlip.protocols import ProtocolMixin
from aiida_mlip.workflows.checks import code_problem, structure_problem
from aiida_mlip.workflows.labeling import DftLabelingWorkChain, family_problem
from aiida_mlip.workflows.loop_helpers import test_errors
from aiida_mlip.workflows.training import TrainingWorkChain
from aiida_mlip.workflows.validation import MODEL_ONLY, PROPERTY_WORKFLOWS, REFERENCE_OUTPUTS, ValidationWorkChain

MlipMdCalculation = CalculationFactory('mlip.md')
MlipEvaluateCalculation = CalculationFactory('mlip.evaluate')

FINETUNE_MODES = ('naive', 'multihead')
SELECTIONS = ('random', 'diverse')

#: mace_run_train options that the foundation fixes when fine-tuning (mace reads the architecture from the
#: foundation model; ``r_max`` must even be absent, see MaceTrainCalculation's validator). They are dropped from
#: ``training.mace.parameters`` for the fine-tuning runs and kept for the from-scratch model.
FIXED_BY_FOUNDATION = (
    'r_max', 'num_channels', 'max_L', 'num_interactions', 'correlation', 'hidden_irreps', 'MLP_irreps',
    'num_radial_basis', 'num_cutoff_basis', 'max_ell', 'interaction', 'interaction_first', 'radial_MLP',
    'gate', 'distance_transform', 'pair_repulsion',
)

#: Factor by which the volume extremes are widened when an EOS or elastic check fails (next_sampling).
WIDEN_VOLUMES = 1.5
#: Factor of the added temperature when an elastic or MD-stability check fails (next_sampling).
HEAT_FACTOR = 1.5
#: Largest relative volume change the widened MD cells may reach.
MAX_VOLUME_STRAIN = 0.3


# ---- pure helpers (no AiiDA) ----------------------------------------------------------------------------------
def next_sampling(failed: list[str], volumes: list[float], temperatures: list[float], frames_per_volume: int):
    """Sampling of the next iteration, from the sections the validation failed. The rule:

    * ``eos`` or ``elastic`` failed -> MD at the volume extremes: the current extremes and the extremes widened by
      ``WIDEN_VOLUMES`` (e.g. +-5% -> +-5% and +-7.5%; capped at +-``MAX_VOLUME_STRAIN``). The EOS scan
      (+-6-10%) and strained cells live there; the middle volumes are already covered.
    * ``elastic`` or ``md_stability`` failed -> also a temperature ``HEAT_FACTOR`` x the highest one: larger
      displacements, more anharmonic configurations.
    * ``phonons`` failed -> all current volumes again, with twice the frames per volume: phonons probe small
      displacements around equilibrium, where more (not wider) data helps.
    * nothing identifiable (e.g. no check could be evaluated) -> the same sampling again with a new MD seed.

    The MD seed changes every iteration, so repeated settings still give new frames.
    Returns (volumes, temperatures, frames_per_volume, list of reasons).
    """
    volumes = [float(v) for v in volumes]
    temperatures = [float(t) for t in temperatures]
    new_volumes, reasons = [], []
    if {'eos', 'elastic'} & set(failed):
        low, high = min(volumes), max(volumes)
        extremes = [low, high]
        for value in (low, high):
            if value != 0.0:
                extremes.append(float(np.clip(value * WIDEN_VOLUMES, -MAX_VOLUME_STRAIN, MAX_VOLUME_STRAIN)))
        new_volumes += extremes
        reasons.append(f'{"/".join(s for s in ("eos", "elastic") if s in failed)} failed: MD at the volume extremes '
                       f'{sorted(set(extremes))}')
    if {'elastic', 'md_stability'} & set(failed):
        hotter = round(max(temperatures) * HEAT_FACTOR, 1)
        temperatures = temperatures + [hotter]
        reasons.append(f'{"/".join(s for s in ("elastic", "md_stability") if s in failed)} failed: added {hotter} K')
    if 'phonons' in failed:
        new_volumes += volumes
        frames_per_volume *= 2
        reasons.append(f'phonons failed: {frames_per_volume} frames per volume at all volumes')
    if not new_volumes:
        new_volumes = volumes
        if not reasons:
            reasons.append('no specific check failed: the same sampling with a new MD seed')
    return sorted(set(round(v, 6) for v in new_volumes)), temperatures, frames_per_volume, reasons


def volume_key(index: int) -> str:
    return f'volume_{index:02d}'


def config_type_of(volume: float) -> str:
    """config_type of the frames sampled at a relative volume change, e.g. ``md_v-50`` for -5.0 %."""
    return f'md_v{round(volume * 1000):+d}'


def validation_key_errors(comparison: dict) -> dict:
    """The headline numbers of a ValidationWorkChain comparison."""
    keys = {
        'eos': ('v0_error_percent', 'b0_error_percent', 'b0_prime_error', 'warnings', 'model_failed'),
        'elastic': ('cij_error_percent', 'bulk_modulus_error_percent', 'shear_modulus_error_percent', 'mae_gpa',
                    'ion_relaxation_mismatch', 'model_failed'),
        'phonons': ('mae_thz', 'dos_spearman', 'imaginary_mismatch', 'model_failed'),
        'md_stability': ('unstable', 'reasons', 'drift_mev_per_atom_ps'),
    }
    result = {}
    for section, names in keys.items():
        if section in comparison:
            result[section] = {name: comparison[section][name] for name in names if name in comparison[section]}
    verdict = comparison.get('verdict', {})
    result['passed'] = verdict.get('passed')
    result['failed'] = verdict.get('failed', [])
    return result


# ---- calcfunctions --------------------------------------------------------------------------------------------
@calcfunction
def select_md_frames(settings: orm.Dict, summary: orm.Dict, **trajectories) -> dict:
    """Pick ``frames_per_volume`` MD frames per starting cell, pooled over its temperatures (seeded).

    ``settings``: frames_per_volume, selection (random | diverse), seed, prefix. ``summary``: the MD summary
    (its ``runs`` map run keys to starting-cell keys). Step 0 (the unperturbed starting cell) is not a candidate.
    Outputs ``<prefix><cell key>_frame_NN`` StructureData.
    """
    settings = settings.get_dict()
    count, selection, seed = settings['frames_per_volume'], settings['selection'], settings['seed']
    prefix = settings.get('prefix', '')
    pools = {}
    for run in summary['runs']:
        trajectory = trajectories.get(run['key'])
        if trajectory is None:
            continue
        steps = trajectory.get_stepids()
        for index in range(trajectory.numsteps):
            if steps[index] > 0:
                pools.setdefault(run['structure_key'], []).append((run['key'], index))
    outputs = {}
    for position, cell_key in enumerate(sorted(pools)):
        candidates = pools[cell_key]
        if selection == 'diverse':
            descriptors = atoms_descriptors([trajectories[run_key].get_step_structure(index).get_ase()
                                             for run_key, index in candidates])
            chosen = sorted(farthest_point_sampling(descriptors, count, seed=[seed, position]))
        else:
            rng = np.random.default_rng([seed, position])
            chosen = sorted(rng.choice(len(candidates), size=min(count, len(candidates)), replace=False).tolist())
        for number, choice in enumerate(chosen):
            run_key, index = candidates[choice]
            outputs[f'{prefix}{cell_key}_frame_{number:02d}'] = trajectories[run_key].get_step_structure(index)
    return outputs


@calcfunction
def compare_models(settings: orm.Dict, **results) -> orm.Dict:
    """Zero-shot foundation vs fine-tuned vs from-scratch: validation verdicts, key errors and test-split RMSEs.

    ``results``: ``<model>_validation`` (ValidationWorkChain comparisons) and ``test_metrics`` (prediction_metrics
    of ONE evaluation of all models on the same test split; ``settings['test_members']`` maps each member row to
    its model group). ``settings['validation_errors']`` holds why a validation is missing.
    """
    settings = settings.get_dict()
    comparison = {}
    for name in ('zero_shot', 'finetuned', 'scratch'):
        entry = {}
        key = f'{name}_validation'
        if key in results:
            entry['validation'] = validation_key_errors(results[key].get_dict())
        elif name in settings.get('validation_errors', {}):
            entry['validation'] = {'passed': None, 'error': settings['validation_errors'][name]}
        comparison[name] = entry
    if 'test_metrics' in results:
        members = results['test_metrics']['members']
        groups = {}
        for row, group in enumerate(settings['test_members']):
            groups.setdefault(group, []).append(test_errors(members[row]))
        for group, rows in groups.items():
            entry = {key: float(np.mean([row[key] for row in rows])) for key in rows[0] if key != 'n_frames'}
            entry['n_frames'] = rows[0]['n_frames']
            entry['n_models'] = len(rows)
            comparison.setdefault(group, {})['test'] = entry
    comparison = {name: entry for name, entry in comparison.items() if entry}
    for key in ('n_labels', 'n_iterations', 'foundation_uuid'):
        if key in settings:
            comparison[key] = settings[key]
    finetuned, zero_shot = comparison.get('finetuned', {}).get('test'), comparison.get('zero_shot', {}).get('test')
    if finetuned and zero_shot and zero_shot.get('forces_rmse_mev_per_a'):
        comparison['forces_rmse_ratio_finetuned_to_zero_shot'] = (
            finetuned['forces_rmse_mev_per_a'] / zero_shot['forces_rmse_mev_per_a'])
    scratch = comparison.get('scratch', {}).get('test')
    if finetuned and scratch and scratch.get('forces_rmse_mev_per_a'):
        comparison['forces_rmse_ratio_finetuned_to_scratch'] = (
            finetuned['forces_rmse_mev_per_a'] / scratch['forces_rmse_mev_per_a'])
    return orm.Dict(comparison)


# ---- validators ---------------------------------------------------------------------------------------------
def foundation_problem(foundation, structure, mode: str, replay=None) -> str | None:
    """Why ``foundation`` cannot be fine-tuned in ``mode`` on ``structure``, or None (checked before any job)."""
    if mode not in FINETUNE_MODES:
        return f'finetune_mode must be one of {FINETUNE_MODES}, got `{mode}`'
    elements = sorted(structure.get_symbols_set())
    missing = foundation.covers(elements)
    if missing and mode == 'naive':
        return (f'naive fine-tuning cannot add elements the foundation model lacks: the structure contains '
                f'{", ".join(missing)}, the foundation MlipModel<{foundation.pk}> covers only '
                f'{", ".join(foundation.elements)}; use a foundation that covers {", ".join(missing)} or train from '
                'scratch (mlip.training)')
    if missing:
        return (f'the loop samples with the foundation (zero-shot MD), which cannot evaluate '
                f'{", ".join(missing)} (MlipModel<{foundation.pk}> covers {", ".join(foundation.elements)}): '
                'multihead fine-tuning onto new elements needs labels from elsewhere: use mlip.training with '
                'finetune=multihead on them')
    if mode == 'multihead':
        if replay is None:
            return ('multihead fine-tuning needs `replay_dataset` (frames from the foundation\'s domain, written as '
                    '--pt_train_file); the Materials Project replay set cannot be downloaded here')
        if len(foundation.elements) < 2:
            return (f'multihead fine-tuning needs a foundation with at least 2 elements; MlipModel<{foundation.pk}> '
                    f'has only {", ".join(foundation.elements)}: use finetune_mode=naive')
    elif replay is not None:
        return '`replay_dataset` is only used with finetune_mode=multihead'
    return None


def validate_inputs(inputs, _):  # noqa: C901, PLR0911, PLR0912  (one list of independent checks)
    structure, foundation = inputs['structure'], inputs['foundation']
    problem = structure_problem('structure', structure)
    if problem:
        return problem
    problem = foundation_problem(foundation, structure, inputs['finetune_mode'].value, inputs.get('replay_dataset'))
    if problem:
        return problem
    if inputs['selection'].value not in SELECTIONS:
        return f'selection must be one of {SELECTIONS}, got `{inputs["selection"].value}`'
    volumes = inputs['volumes'].get_list()
    if not volumes or any(not isinstance(v, (int, float)) or not -0.5 < v < 0.5 for v in volumes):
        return f'volumes must be relative volume changes in (-0.5, 0.5), e.g. [-0.05, 0, 0.05]; got {volumes}'
    if len(set(volumes)) != len(volumes):
        return f'volumes must be distinct, got {volumes}'
    for name in ('frames_per_volume', 'max_iterations'):
        if inputs[name].value < 1:
            return f'{name} must be >= 1, got {inputs[name].value}'
    problem = md_parameters_problem(temperatures=inputs['temperatures'], steps=inputs['md_steps'],
                                    timestep_fs=inputs['md_timestep_fs'], interval=inputs['md_interval'])
    if problem:
        return problem
    candidates = (inputs['md_steps'].value // inputs['md_interval'].value) * len(inputs['temperatures'].get_list())
    if candidates < inputs['frames_per_volume'].value:
        return (f'the MD saves only {candidates} frame(s) per volume (md_steps // md_interval x temperatures) but '
                f'frames_per_volume is {inputs["frames_per_volume"].value}: run longer MD or save more often')
    for port, plugin, what in (('md_code', 'mlip.md', 'the sampling MD'),
                               ('evaluate_code', 'mlip.evaluate', 'the validation and test evaluation')):
        problem = code_problem(inputs[port], plugin, what)
        if problem:
            return problem
    labeling = inputs['labeling']
    problem = family_problem(labeling['pseudo_family'].value, structure.get_symbols_set())
    if problem:
        return problem
    problem = code_problem(labeling['pw_base']['pw'].get('code'), 'quantumespresso.pw', 'DFT labeling')
    if problem:
        return problem
    properties = inputs['validation']['properties'].get_list()
    allowed = sorted(PROPERTY_WORKFLOWS) + sorted(MODEL_ONLY)
    if not properties or set(properties) - set(allowed):
        return f'validation.properties must be a non-empty subset of {allowed}, got {properties}'
    training = inputs['training']
    if training['committee_size'].value < 1:
        return f'training.committee_size must be >= 1, got {training["committee_size"].value}'
    n_frames = len(volumes) * inputs['frames_per_volume'].value
    fractions = training['split_fractions'].get_dict()
    try:
        split = split_indices(n_frames, fractions, 0)
    except ValueError as exception:
        return f'training.split_fractions: {exception}'
    empty = [name for name, indices in split.items() if not indices]
    if empty:
        return (f'the first iteration labels {n_frames} frames ({len(volumes)} volumes x '
                f'{inputs["frames_per_volume"].value}), '
                f'too few for split fractions {fractions}: the {"/".join(empty)} split would be empty')
    parameters = training['training']['mace']['parameters'].get_dict()
    batch_size = parameters.get('batch_size', 10)
    if isinstance(batch_size, int) and batch_size > len(split.get('train', [])):
        return (f'training batch_size {batch_size} is larger than the {len(split.get("train", []))} training frames of '
                'the first iteration: mace would take no step; lower batch_size or label more frames per volume')
    return None


class FineTuningWorkChain(ProtocolMixin, WorkChain):
    """Fine-tune a foundation model for one material: MD sampling, DFT labels, fine-tuning, validation, repeat."""

    _protocol_name = 'finetune'

    @classmethod
    def define(cls, spec):
        super().define(spec)
        spec.input('foundation', valid_type=MlipModel,
                   help='The foundation model (a local file: `aiida-mlip model import` or `model fetch`).')
        spec.input('structure', valid_type=orm.StructureData, help='The material, at (about) its equilibrium.')
        spec.input('finetune_mode', valid_type=orm.Str, default=lambda: orm.Str('naive'),
                   help='`naive` (continue training the foundation; cannot add elements) or `multihead` (needs '
                        '`replay_dataset` and a foundation with >= 2 elements).')
        spec.input('replay_dataset', valid_type=TrainingSet, required=False,
                   help='Replay frames from the foundation\'s domain for multihead fine-tuning.')
        spec.input('md_code', valid_type=orm.AbstractCode, help='The `mlip.md` code of the sampling MD.')
        spec.input('evaluate_code', valid_type=orm.AbstractCode,
                   help='The `mlip.evaluate` code of the validations and of the test-split comparison.')
        spec.input('volumes', valid_type=orm.List,
                   default=lambda: orm.List([-0.05, -0.025, 0.0, 0.025, 0.05]),
                   help='Relative volume changes of the MD cells (isotropic scaling of `structure`).')
        spec.input('temperatures', valid_type=orm.List, default=lambda: orm.List([300]),
                   help='MD temperatures (K); every volume runs at every temperature, all in ONE MD job.')
        spec.input('md_steps', valid_type=orm.Int, default=lambda: orm.Int(1000), help='MD steps per run.')
        spec.input('md_interval', valid_type=orm.Int, default=lambda: orm.Int(10),
                   help='A frame is saved every `md_interval` steps; saved frames (step > 0) are the candidates.')
        spec.input('md_timestep_fs', valid_type=orm.Float, default=lambda: orm.Float(1.0), help='MD timestep (fs).')
        spec.input('frames_per_volume', valid_type=orm.Int, default=lambda: orm.Int(10),
                   help='Frames labeled per volume and iteration (docs/sources.md: ~10), pooled over the temperatures.')
        spec.input('selection', valid_type=orm.Str, default=lambda: orm.Str('random'),
                   help='`random` (seeded) or `diverse` (seeded farthest-point sampling of the pair-distance '
                        'descriptor of aiida_mlip.analysis.selection).')
        spec.input('max_iterations', valid_type=orm.Int, default=lambda: orm.Int(3),
                   help='Iterations at most; the loop stops as soon as the validation passes.')
        spec.input('compare_with_scratch', valid_type=orm.Bool, default=lambda: orm.Bool(False),
                   help='Also train a model from scratch on the same labels and validate it (comparison.scratch).')
        spec.input('scratch_parameters', valid_type=orm.Dict, required=False,
                   help='mace options of the from-scratch model on top of `training.training.mace.parameters` '
                        '(e.g. more epochs: a model from scratch needs more than a fine-tune).')
        spec.input('seed', valid_type=orm.Int, default=lambda: orm.Int(1),
                   help='Seed of the MD (iteration i uses seed + i - 1) and of the frame selection.')
        spec.expose_inputs(DftLabelingWorkChain, namespace='labeling', exclude=('structures', 'config_types'),
                           namespace_options={'help': 'DFT labeling of the sampled frames; the DFT reference of '
                                                      'the validation uses the same settings.'})
        spec.expose_inputs(TrainingWorkChain, namespace='training',
                           exclude=('dataset', 'training.mace.foundation_model', 'training.mace.finetune',
                                    'training.mace.replay_dataset'),
                           namespace_options={'help': 'Training settings; the workflow sets the foundation, the '
                                                      'fine-tuning mode and the dataset.'})
        spec.inputs['training'].validator = None  # it needs `dataset`: checked in validate_inputs
        spec.expose_inputs(ValidationWorkChain, namespace='validation', exclude=('structure', 'mlip', 'dft', 'md_code'),
                           namespace_options={'help': 'Validation settings (properties, thresholds, per-property '
                                                      'settings, optional DFT `reference`).'})
        spec.inputs['validation'].validator = None  # the models and the DFT engine are added at launch
        spec.inputs.validator = validate_inputs

        spec.outline(
            cls.setup,
            while_(cls.should_iterate)(
                cls.run_md,
                cls.inspect_md,
                cls.run_labeling,
                cls.inspect_labeling,
                cls.run_finetune,
                cls.inspect_finetune,
                cls.run_validation,
                cls.inspect_validation,
            ),
            if_(cls.should_train_scratch)(
                cls.run_scratch,
                cls.inspect_scratch,
            ),
            cls.run_comparison,
            cls.inspect_comparison,
        )
        spec.output('model', valid_type=MlipModel,
                    help='The final fine-tuned model (committee member 0); its creator has the foundation as input.')
        spec.output_namespace('models', valid_type=MlipModel, dynamic=True,
                              help='All committee members of the final fine-tuned model.')
        spec.output('dataset', valid_type=TrainingSet, help='All labels of all iterations.')
        spec.output('scratch_model', valid_type=MlipModel, required=False,
                    help='The model trained from scratch on the same labels (compare_with_scratch).')
        spec.output_namespace('iterations', valid_type=orm.Dict, dynamic=True,
                              help='Per iteration: sampling, labels, validation verdict and errors, next sampling.')
        spec.output('comparison', valid_type=orm.Dict,
                    help='zero_shot / finetuned / scratch: validation verdicts and key errors, test-split RMSEs.')
        spec.exit_code(401, 'ERROR_MD_FAILED', message='The sampling MD failed: {reason}')
        spec.exit_code(402, 'ERROR_LABELING_FAILED', message='The DFT labeling failed: {reason}')
        spec.exit_code(403, 'ERROR_FINETUNING_FAILED', message='The fine-tuning failed: {reason}')
        spec.exit_code(404, 'ERROR_VALIDATION_FAILED',
                       message='The validation of the fine-tuned model failed: {reason}')
        spec.exit_code(405, 'ERROR_REFERENCE_FAILED',
                       message='The DFT reference (zero-shot validation) could not be computed: {reason}')
        spec.exit_code(406, 'ERROR_SCRATCH_TRAINING_FAILED', message='The from-scratch training failed: {reason}')
        spec.exit_code(407, 'ERROR_COMPARISON_FAILED', message='The final comparison failed: {reason}')
        spec.exit_code(410, 'ERROR_NO_MD_FRAMES', message='The MD produced no frame to label: {reason}')

    # ---- builder -------------------------------------------------------------------------------------------
    @classmethod
    def get_builder_from_protocol(cls, foundation, structure, pw_code, mace_train_code, evaluate_code, md_code,
                                  pseudo_family, protocol=None, overrides=None, options=None, **kwargs):
        """A builder for fine-tuning ``foundation`` on ``structure`` with the protocol's settings.

        The labeling, training and validation parts use their own protocol of the same name, with this
        protocol's ``labeling``/``training``/``validation`` entries (and ``overrides``) on top.

        :param foundation: an MlipModel (or its pk/UUID), e.g. from ``aiida-mlip model import FILE``.
        :param pseudo_family: label of the pseudo family (required offline).
        :param overrides: top-level inputs and, under ``labeling``/``training``/``validation``, overrides of those
            sub-protocols (e.g. ``{'labeling': {'pw_base': {...}}, 'training': {'mace': {'max_num_epochs': 5}}}``).
        :param options: ``metadata.options`` of the training jobs.
        :param kwargs: passed on to ``DftLabelingWorkChain.get_builder_from_protocol`` (e.g. ``electronic_type``).
        """
        load = {'pw': pw_code, 'train': mace_train_code, 'evaluate': evaluate_code, 'md': md_code}
        codes = {key: orm.load_code(code) if isinstance(code, str) else code for key, code in load.items()}
        if not isinstance(foundation, MlipModel):
            foundation = orm.load_node(foundation)
        inputs = cls.get_protocol_inputs(protocol, overrides)
        problem = structure_problem('structure', structure) or foundation_problem(
            foundation, structure, inputs['finetune_mode'])
        if problem and 'replay_dataset' not in problem:
            raise ValueError(problem)
        protocol = protocol or cls.get_default_protocol()

        builder = cls.get_builder()
        builder.foundation = foundation
        builder.structure = structure
        builder.md_code = codes['md']
        builder.evaluate_code = codes['evaluate']
        builder.finetune_mode = orm.Str(inputs['finetune_mode'])
        builder.volumes = orm.List(inputs['volumes'])
        builder.temperatures = orm.List(inputs['temperatures'])
        builder.md_steps = orm.Int(inputs['md_steps'])
        builder.md_interval = orm.Int(inputs['md_interval'])
        builder.md_timestep_fs = orm.Float(inputs['md_timestep_fs'])
        builder.frames_per_volume = orm.Int(inputs['frames_per_volume'])
        builder.selection = orm.Str(inputs['selection'])
        builder.max_iterations = orm.Int(inputs['max_iterations'])
        builder.compare_with_scratch = orm.Bool(inputs['compare_with_scratch'])
        builder.seed = orm.Int(inputs['seed'])
        if inputs.get('scratch_parameters'):
            builder.scratch_parameters = orm.Dict(inputs['scratch_parameters'])

        labeling = DftLabelingWorkChain.get_builder_from_protocol(
            codes['pw'], [structure], protocol=protocol, pseudo_family=pseudo_family,
            overrides=inputs.get('labeling'), **kwargs)
        labeling = labeling._inputs(prune=True)  # noqa: SLF001  (a nested builder reused as a namespace)
        for key in ('structures', 'config_types'):
            labeling.pop(key, None)
        builder.labeling = labeling

        # The dataset is made by the loop: an empty placeholder satisfies the builder and is dropped again.
        training = TrainingWorkChain.get_builder_from_protocol(
            codes['train'], TrainingSet(), protocol=protocol, overrides=inputs.get('training'), options=options)
        training = training._inputs(prune=True)  # noqa: SLF001
        training.pop('dataset', None)
        builder.training = training

        validation = ValidationWorkChain.get_builder_from_protocol(
            codes['evaluate'], foundation, structure, protocol=protocol, overrides=inputs.get('validation'))
        validation = validation._inputs(prune=True)  # noqa: SLF001
        for key in ('structure', 'mlip', 'dft', 'md_code'):
            validation.pop(key, None)
        builder.validation = validation
        return builder

    # ---- outline -------------------------------------------------------------------------------------------
    def setup(self):
        self.ctx.iteration = 0
        self.ctx.passed = False
        self.ctx.volumes = [float(v) for v in self.inputs.volumes.get_list()]
        self.ctx.temperatures = [float(t) for t in self.inputs.temperatures.get_list()]
        self.ctx.frames_per_volume = self.inputs.frames_per_volume.value
        self.ctx.md_steps = self.inputs.md_steps.value
        self.ctx.dataset = None
        self.ctx.reference = None
        self.ctx.validation_errors = {}

    def should_iterate(self):
        return not self.ctx.passed and self.ctx.iteration < self.inputs.max_iterations.value

    @property
    def _last_iteration(self) -> bool:
        return self.ctx.iteration >= self.inputs.max_iterations.value

    def _properties(self) -> list[str]:
        return self.inputs.validation.properties.get_list()

    def _reference_ports(self) -> list[str]:
        return [port for name in self._properties() if name in REFERENCE_OUTPUTS for port in REFERENCE_OUTPUTS[name]]

    def _validation_inputs(self, models: dict, label: str, reference: dict | None) -> AttributeDict:
        """ValidationWorkChain inputs for ``models``: with ``reference`` complete, no DFT job runs."""
        inputs = AttributeDict(self.exposed_inputs(ValidationWorkChain, namespace='validation'))
        inputs.structure = self.inputs.structure
        inputs.md_code = self.inputs.md_code
        inputs.mlip = {'code': self.inputs.evaluate_code, 'models': models}
        given = dict(inputs.get('reference', {}))
        given.update(reference or {})
        if given:
            inputs.reference = given
        if any(port not in given for port in self._reference_ports()):
            # The DFT engine of the validation is the labeling's: the reference is computed like the labels.
            dft = AttributeDict(self.exposed_inputs(DftLabelingWorkChain, namespace='labeling'))
            for key in ('isolated_atoms', 'structure_overrides', 'config_types', 'structures'):
                dft.pop(key, None)
            inputs.dft = dft
        inputs.metadata = {'call_link_label': label}
        return inputs

    def run_md(self):
        """ONE MD job for all volumes x temperatures; iteration 1 also starts the zero-shot validation (it
        computes the DFT reference)."""
        self.ctx.iteration += 1
        iteration = self.ctx.iteration
        model_label = 'foundation'
        models = {'foundation': self.inputs.foundation}
        if iteration > 1:
            models, model_label = dict(self.ctx.models), 'fine-tuned model of the previous iteration'
        cells = scale_volume(self.inputs.structure, orm.List(self.ctx.volumes),
                             metadata={'call_link_label': f'volumes_iteration_{iteration:02d}'})
        structures = {volume_key(index): cells[f'structure_{index:03d}'] for index in range(len(self.ctx.volumes))}
        self.ctx.volume_of = {volume_key(index): volume for index, volume in enumerate(self.ctx.volumes)}
        md = self.submit(
            MlipMdCalculation, code=self.inputs.md_code, models=models, structures=structures,
            temperatures=orm.List(self.ctx.temperatures), steps=orm.Int(self.ctx.md_steps),
            interval=self.inputs.md_interval, timestep_fs=self.inputs.md_timestep_fs,
            seed=orm.Int(self.inputs.seed.value + iteration - 1),
            metadata={'call_link_label': f'md_iteration_{iteration:02d}',
                      'options': {'resources': {'num_machines': 1, 'num_mpiprocs_per_machine': 1}}},
        )
        self.report(f'iteration {iteration}: MlipMdCalculation<{md.pk}> with the {model_label}, volumes '
                    f'{self.ctx.volumes} x {self.ctx.temperatures} K, {self.ctx.md_steps} steps')
        if iteration == 1:
            inputs = self._validation_inputs({'foundation': self.inputs.foundation}, 'validate_zero_shot', None)
            zero_shot = self.submit(ValidationWorkChain, **inputs)
            self.ctx.zero_shot_pk = zero_shot.pk
            self.report(f'zero-shot validation of the foundation (computes the DFT reference): '
                        f'ValidationWorkChain<{zero_shot.pk}>')
        return ToContext(md=md)

    def inspect_md(self):
        node = self.ctx.md
        if not node.is_finished_ok:
            return self.exit_codes.ERROR_MD_FAILED.format(reason=f'{node.process_label}<{node.pk}> exit '
                                                                 f'{node.exit_status}: {node.exit_message}')
        trajectories = dict(node.outputs.trajectories)
        settings = orm.Dict({'frames_per_volume': self.ctx.frames_per_volume,
                             'selection': self.inputs.selection.value,
                             'seed': self.inputs.seed.value + self.ctx.iteration - 1,
                             'prefix': f'it{self.ctx.iteration:02d}_'})
        selected = select_md_frames(settings, node.outputs.summary, **trajectories,
                                    metadata={'call_link_label': f'select_iteration_{self.ctx.iteration:02d}'})
        if not selected:
            return self.exit_codes.ERROR_NO_MD_FRAMES.format(
                reason=f'{node.process_label}<{node.pk}> saved no frame after step 0')
        self.ctx.selected = dict(selected)
        stopped = node.outputs.summary.get('n_stopped_early', 0)
        if stopped:
            self.report(f'{stopped} MD run(s) stopped early; their frames up to the stop are candidates')
        self.report(f'selected {len(selected)} frames ({self.inputs.selection.value})')
        return None

    def run_labeling(self):
        inputs = AttributeDict(self.exposed_inputs(DftLabelingWorkChain, namespace='labeling'))
        inputs.structures = self.ctx.selected
        inputs.config_types = orm.Dict({
            key: config_type_of(self.ctx.volume_of[key.split('_frame_')[0].split('_', 1)[1]])
            for key in self.ctx.selected})
        inputs.metadata = {'call_link_label': f'label_iteration_{self.ctx.iteration:02d}'}
        node = self.submit(DftLabelingWorkChain, **inputs)
        self.report(f'DftLabelingWorkChain<{node.pk}>: {len(self.ctx.selected)} frames')
        return ToContext(labeling=node)

    def inspect_labeling(self):
        node = self.ctx.labeling
        if not node.is_finished_ok:
            return self.exit_codes.ERROR_LABELING_FAILED.format(
                reason=f'{node.process_label}<{node.pk}> exit {node.exit_status}: {node.exit_message}')
        new = node.outputs.dataset
        self.ctx.n_new = new.n_frames
        self.ctx.n_dropped = len(node.outputs.quality_report.get('dropped', {}))
        if self.ctx.dataset is None:
            self.ctx.dataset = new
        else:
            self.ctx.dataset = merge_datasets(
                a_previous=self.ctx.dataset, b_new=new,
                metadata={'call_link_label': f'merge_iteration_{self.ctx.iteration:02d}'})
        self.report(f'{new.n_frames} new labels, {self.ctx.dataset.n_frames} in all')
        return None

    def _training_inputs(self, finetune: bool, label: str) -> AttributeDict:
        inputs = AttributeDict(self.exposed_inputs(TrainingWorkChain, namespace='training'))
        inputs.dataset = self.ctx.dataset
        mace = AttributeDict(inputs.training.mace)
        parameters = mace.parameters.get_dict()
        if finetune:
            parameters = {key: value for key, value in parameters.items() if key not in FIXED_BY_FOUNDATION}
            mace.foundation_model = self.inputs.foundation
            mace.finetune = self.inputs.finetune_mode
            if 'replay_dataset' in self.inputs:
                mace.replay_dataset = self.inputs.replay_dataset
            # QE labels and the foundation's references differ by a per-element offset (docs/sources.md, "Foundation fine-tuning loop"): without
            # isolated-atom labels or explicit E0s, mace estimates the E0 shift from the foundation's predictions.
            # mace-torch 0.3.16 cannot do that for a one-element foundation (its E0 table squeezes to a 0-dim tensor:
            # IndexError), which then keeps mace's default (least-squares `average` E0s of the labels).
            if ('E0s' not in parameters and 'e0s' not in mace and not self._has_isolated_atoms()
                    and len(self.inputs.foundation.elements) >= 2):
                parameters['E0s'] = 'estimated'
        elif 'scratch_parameters' in self.inputs:
            parameters.update(self.inputs.scratch_parameters.get_dict())
        mace.parameters = orm.Dict(parameters)
        inputs.training = AttributeDict({**inputs.training, 'mace': mace})
        inputs.metadata = {'call_link_label': label}
        return inputs

    def _has_isolated_atoms(self) -> bool:
        return bool((self.ctx.dataset.config_types or {}).get('IsolatedAtom'))

    def run_finetune(self):
        """Fine-tune the foundation on all labels; in the last allowed iteration train the scratch model alongside."""
        futures = {}
        node = self.submit(TrainingWorkChain,
                           **self._training_inputs(True, f'finetune_iteration_{self.ctx.iteration:02d}'))
        self.report(f'fine-tuning ({self.inputs.finetune_mode.value}): TrainingWorkChain<{node.pk}>')
        futures['finetune'] = node
        if self.inputs.compare_with_scratch.value and self._last_iteration:
            futures['scratch'] = self.submit(TrainingWorkChain, **self._training_inputs(False, 'train_scratch'))
            self.report(f'from scratch on the same labels: TrainingWorkChain<{futures["scratch"].pk}>')
        if self.ctx.iteration == 1:
            futures['zero_shot'] = orm.load_node(self.ctx.zero_shot_pk)
        return ToContext(**futures)

    def inspect_finetune(self):
        node = self.ctx.finetune
        if not node.is_finished_ok:
            return self.exit_codes.ERROR_FINETUNING_FAILED.format(
                reason=f'{node.process_label}<{node.pk}> exit {node.exit_status}: {node.exit_message}')
        self.ctx.models = dict(node.outputs.models)
        if 'scratch' in self.ctx:
            problem = self._check_scratch()
            if problem:
                return problem
        if self.ctx.iteration == 1:
            return self._collect_reference()
        return None

    def _collect_reference(self):
        """The DFT results of the zero-shot validation (also when its MLIP part failed) become the reference."""
        node = self.ctx.zero_shot
        ports = self._reference_ports()
        dft = node.outputs.dft if 'dft' in node.outputs else {}
        missing = [port for port in ports if port not in dft]
        if missing:
            return self.exit_codes.ERROR_REFERENCE_FAILED.format(
                reason=f'{node.process_label}<{node.pk}> exit {node.exit_status} ({node.exit_message}); '
                       f'no DFT {", ".join(missing)}')
        self.ctx.reference = {port: dft[port] for port in ports}
        if 'relaxed_structure' in dft:  # a `relax` validation: later ones validate on it, no new DFT relaxation
            self.ctx.reference['relaxed_structure'] = dft['relaxed_structure']
        if not node.is_finished_ok:
            self.ctx.validation_errors['zero_shot'] = f'{node.process_label}<{node.pk}> exit {node.exit_status}: ' \
                                                      f'{node.exit_message}'
            self.report(f'the zero-shot validation failed ({node.exit_message}); its DFT reference is used anyway')
        return None

    def run_validation(self):
        """Validate the fine-tuned model (DFT reference reused); in the last iteration the final jobs start too."""
        inputs = self._validation_inputs(self.ctx.models, f'validate_iteration_{self.ctx.iteration:02d}',
                                         self.ctx.reference)
        node = self.submit(ValidationWorkChain, **inputs)
        self.report(f'validation of the fine-tuned model: ValidationWorkChain<{node.pk}> (DFT reference reused)')
        futures = {'validation': node}
        if self._last_iteration:  # whatever the verdict, this model and these labels are final
            futures.update(self._submit_final_jobs())
        return ToContext(**futures)

    def inspect_validation(self):
        node = self.ctx.validation
        if not node.is_finished_ok:
            return self.exit_codes.ERROR_VALIDATION_FAILED.format(
                reason=f'{node.process_label}<{node.pk}> exit {node.exit_status}: {node.exit_message}')
        comparison = node.outputs.comparison.get_dict()
        verdict = comparison['verdict']
        self.ctx.passed = bool(verdict.get('passed'))
        self.ctx.final_validation = node
        summary = {
            'iteration': self.ctx.iteration,
            'md_model': 'foundation' if self.ctx.iteration == 1 else 'fine-tuned (previous iteration)',
            'volumes': self.ctx.volumes,
            'temperatures': self.ctx.temperatures,
            'md_steps': self.ctx.md_steps,
            'frames_per_volume': self.ctx.frames_per_volume,
            'n_new_labels': self.ctx.n_new,
            'n_dropped': self.ctx.n_dropped,
            'n_labels': self.ctx.dataset.n_frames,
            'dataset_uuid': self.ctx.dataset.uuid,
            'model_uuid': self.ctx.models['member_0'].uuid,
            'validation_uuid': node.uuid,
            'validation': validation_key_errors(comparison),
        }
        if 'test_metrics' in self.ctx.finetune.outputs:
            summary['test'] = test_errors(self.ctx.finetune.outputs.test_metrics.get_dict())
        if self.ctx.passed:
            self.report(f'iteration {self.ctx.iteration}: validation PASSED')
        elif not self._last_iteration:
            failed = failed_sections(verdict)
            volumes, temperatures, frames, reasons = next_sampling(
                failed, self.ctx.volumes, self.ctx.temperatures, self.ctx.frames_per_volume)
            interval = self.inputs.md_interval.value
            needed = math.ceil(frames / len(temperatures)) * interval
            summary['next'] = {'volumes': volumes, 'temperatures': temperatures, 'frames_per_volume': frames,
                               'md_steps': max(self.ctx.md_steps, needed), 'reasons': reasons}
            self.ctx.volumes, self.ctx.temperatures, self.ctx.frames_per_volume = volumes, temperatures, frames
            self.ctx.md_steps = max(self.ctx.md_steps, needed)
            self.report(f'iteration {self.ctx.iteration}: validation FAILED ({"; ".join(verdict["failed"])}); '
                        f'next: {"; ".join(reasons)}')
        else:
            self.report(f'validation FAILED after {self.ctx.iteration} iteration(s): {"; ".join(verdict["failed"])}')
        self.out(f'iterations.iteration_{self.ctx.iteration:02d}', orm.Dict(summary).store())
        return None

    def should_train_scratch(self):
        return self.inputs.compare_with_scratch.value and 'scratch' not in self.ctx

    def run_scratch(self):
        node = self.submit(TrainingWorkChain, **self._training_inputs(False, 'train_scratch'))
        self.report(f'from scratch on the same labels: TrainingWorkChain<{node.pk}>')
        return ToContext(scratch=node)

    def _check_scratch(self):
        node = self.ctx.scratch
        if not node.is_finished_ok:
            return self.exit_codes.ERROR_SCRATCH_TRAINING_FAILED.format(
                reason=f'{node.process_label}<{node.pk}> exit {node.exit_status}: {node.exit_message}')
        return None

    def inspect_scratch(self):
        return self._check_scratch()

    def _submit_final_jobs(self) -> dict:
        """The scratch model's validation (reference reused) and ONE evaluation of all models on the test split."""
        futures = {}
        if 'scratch' in self.ctx and 'scratch_validation' not in self.ctx:
            inputs = self._validation_inputs(dict(self.ctx.scratch.outputs.models), 'validate_scratch',
                                             self.ctx.reference)
            futures['scratch_validation'] = self.submit(ValidationWorkChain, **inputs)
            self.report(f'validation of the scratch model: ValidationWorkChain<{futures["scratch_validation"].pk}>')
        split = self.ctx.finetune.outputs.split
        if 'test' in split and 'test_evaluation' not in self.ctx:
            groups = {'finetuned': self.ctx.models, 'zero_shot': {'member_0': self.inputs.foundation}}
            if 'scratch' in self.ctx:
                groups['scratch'] = dict(self.ctx.scratch.outputs.models)
            models = {f'{group}_{key}': model for group, members in groups.items() for key, model in members.items()}
            self.ctx.test_members = [key.rsplit('_member_', 1)[0] for key in sorted(models)]
            futures['test_evaluation'] = self.submit(
                MlipEvaluateCalculation, code=self.inputs.evaluate_code, models=models, dataset=split['test'],
                metadata={'call_link_label': 'evaluate_test',
                          'options': {'resources': {'num_machines': 1, 'num_mpiprocs_per_machine': 1}}})
            self.report(f'test split ({split["test"].n_frames} frames): MlipEvaluateCalculation'
                        f'<{futures["test_evaluation"].pk}> for {", ".join(groups)}')
        return futures

    def run_comparison(self):
        """Start the final jobs that are not running yet (the loop stopped early, or scratch was trained after)."""
        return ToContext(**self._submit_final_jobs())

    def inspect_comparison(self):
        results = {'finetuned_validation': self.ctx.final_validation.outputs.comparison}
        zero_shot = orm.load_node(self.ctx.zero_shot_pk)
        if 'comparison' in zero_shot.outputs:
            results['zero_shot_validation'] = zero_shot.outputs.comparison
        if 'scratch_validation' in self.ctx:
            node = self.ctx.scratch_validation
            if node.is_finished_ok:
                results['scratch_validation'] = node.outputs.comparison
            else:
                self.ctx.validation_errors['scratch'] = f'{node.process_label}<{node.pk}> exit {node.exit_status}: ' \
                                                        f'{node.exit_message}'
        settings = {'validation_errors': self.ctx.validation_errors, 'n_labels': self.ctx.dataset.n_frames,
                    'n_iterations': self.ctx.iteration, 'foundation_uuid': self.inputs.foundation.uuid}
        if 'test_evaluation' in self.ctx:
            node = self.ctx.test_evaluation
            if not node.is_finished_ok:
                return self.exit_codes.ERROR_COMPARISON_FAILED.format(
                    reason=f'test evaluation {node.process_label}<{node.pk}> exit {node.exit_status}: '
                           f'{node.exit_message}')
            optional = {name: node.outputs[name] for name in ('stresses', 'committee') if name in node.outputs}
            results['test_metrics'] = prediction_metrics(
                self.ctx.finetune.outputs.split.test, node.outputs.energies, node.outputs.forces, **optional,
                metadata={'call_link_label': 'test_metrics'})
            settings['test_members'] = self.ctx.test_members
        comparison = compare_models(orm.Dict(settings), **results, metadata={'call_link_label': 'compare_models'})
        self.out('comparison', comparison)
        self.out('model', self.ctx.models['member_0'])
        self.out('models', self.ctx.models)
        self.out('dataset', self.ctx.dataset)
        if 'scratch' in self.ctx:
            self.out('scratch_model', self.ctx.scratch.outputs.models['member_0'])
        summary = ', '.join(f'{name} forces RMSE {comparison[name]["test"]["forces_rmse_mev_per_a"]:.1f} meV/Å'
                            for name in ('zero_shot', 'finetuned', 'scratch')
                            if 'forces_rmse_mev_per_a' in comparison.get(name, {}).get('test', {}))
        self.report(f'comparison on the test split: {summary or "no test split"}')
        return None
