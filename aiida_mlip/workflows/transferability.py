"""``mlip.transferability``: how much worse a model gets outside the class of configurations it was trained on.

Every class (bulk, surface, liquid, an element, ...) is one labeled dataset. Each is split ONCE (seeded) into a
test set and a training pool shared by all models. A committee is trained per class, one on all classes merged
(``train_all``) and, with ``leave_one_out``, one per class left out (``without_<class>``); or the models are
given. Every model is evaluated on every class's test set in ONE ``mlip.evaluate`` job per test set that carries
all the models (one model load each). The arithmetic (error matrices, out-of-class ratios, leave-one-out ratios,
does the committee spread rise out of class) is :mod:`aiida_mlip.analysis.transferability`; optionally the
in-class and the all-class model are validated per class (``ValidationWorkChain``; DFT once per class).

Every trained model sees the IsolatedAtom frames and the atomic-number table of the whole study, so that it can
be evaluated on every class (mace would otherwise drop an element it never saw in a condensed frame): what it
lacks of an element it never met in a condensed environment is exactly the out-of-class gap being measured.
"""
from __future__ import annotations

import io
import re

import numpy as np
from aiida import orm
from aiida.common import AttributeDict
from aiida.engine import ToContext, WorkChain, calcfunction, if_
from aiida.plugins import CalculationFactory
from ase.data import atomic_numbers

from aiida_mlip.analysis.transferability import committee_errors, transferability_summary
from aiida_mlip.calculations.datasets import merge_datasets, split_dataset, split_indices
from aiida_mlip.calculations.mace_train import isolated_elements, non_isolated_frames
from aiida_mlip.data.dataset import ISOLATED_ATOM, TrainingSet, fingerprint_differences
from aiida_mlip.data.model import MlipModel
from aiida_mlip.protocols import ProtocolMixin
from aiida_mlip.workflows.checks import code_problem, structure_problem
from aiida_mlip.workflows.training import TrainingWorkChain
from aiida_mlip.workflows.training import validate_inputs as training_problem
from aiida_mlip.workflows.validation import REFERENCE_OUTPUTS, ValidationWorkChain
from aiida_mlip.workflows.validation import validate_inputs as validation_problem

MlipEvaluateCalculation = CalculationFactory('mlip.evaluate')

#: Label of the model trained on all classes; prefix of the leave-one-class-out models.
ALL = 'all'
WITHOUT = 'without_'
#: Class and model labels become link labels (no double underscore: it separates namespaces).
LABEL = re.compile(r'^[A-Za-z][A-Za-z0-9]*(_[A-Za-z0-9]+)*$')
EV_TO_MEV = 1000.0
#: Matrix entries (analysis key -> output key, scaled to meV).
MATRIX_OUTPUTS = {
    'energy_mae': 'energy_mae_mev_per_atom', 'energy_rmse': 'energy_rmse_mev_per_atom',
    'forces_mae': 'forces_mae_mev_per_a', 'forces_rmse': 'forces_rmse_mev_per_a',
    'committee_force_std': 'committee_force_std_mev_per_a',
}
#: Heatmaps in ``figures`` (matrix key -> title).
HEATMAPS = {
    'forces_rmse_mev_per_a': ('force RMSE', 'meV/Å'),
    'energy_rmse_mev_per_atom': ('energy RMSE', 'meV/atom'),
    'committee_force_std_mev_per_a': ('committee force std', 'meV/Å'),
}


def model_plan(classes, train_all: bool, leave_one_out: bool) -> dict:
    """``{model label: classes it is trained on}``: one per class, ``all``, ``without_<class>``."""
    plan = {label: (label,) for label in classes}
    if train_all:
        plan[ALL] = tuple(classes)
    if leave_one_out:
        plan.update({f'{WITHOUT}{label}': tuple(c for c in classes if c != label) for label in classes})
    return plan


def unique_plan(plan: dict) -> dict:
    """``{model label: label of the model actually trained}``: equal training classes train once (with two
    classes ``without_a`` is the model of ``b``)."""
    first = {}
    return {label: first.setdefault(frozenset(classes), label) for label, classes in plan.items()}


def split_sizes(n_frames: int, test_fraction: float) -> tuple[int, int]:
    """(test frames, pool frames) of a class with ``n_frames`` non-isolated frames."""
    indices = split_indices(n_frames, {'train': 1.0 - test_fraction, 'test': test_fraction}, 0)
    return len(indices.get('test', [])), len(indices.get('train', []))


def _models_problem(models, datasets) -> str | None:
    keys = set()
    for label, members in models.items():
        if not LABEL.match(label):
            return f'model label `{label}` must be letters/digits joined by single underscores'
        if not hasattr(members, 'items') or not members:
            return f'`models.{label}` must be a namespace of committee members {{"member_0": MlipModel, ...}}'
        for member, model in members.items():
            if not isinstance(model, MlipModel):
                return f'`models.{label}.{member}` must be an MlipModel (mlip.model), got {type(model).__name__}'
            key = f'{label}_{member}'
            if key in keys:
                return f'model keys collide: `{key}` twice; rename the model or the member'
            keys.add(key)
            for name, dataset in datasets.items():
                missing = model.covers(dataset.elements)
                if missing:
                    return (f'model `{label}` (member `{member}`, MlipModel<{model.pk}>, elements '
                            f'{" ".join(model.elements)}) lacks {", ".join(missing)}, which class `{name}` contains: '
                            'it cannot be evaluated on that class; give a model trained with those elements')
    return None


def _training_problem(inputs, datasets, pools) -> str | None:
    """The training of every planned model must be possible: splits, batch size, isolated atoms."""
    training = inputs['training']
    problem = training_problem({**training, 'dataset': next(iter(datasets.values()))}, None)
    if problem:
        return f'training: {problem}'
    element_sets = {frozenset(dataset.elements) for dataset in datasets.values()}
    if len(element_sets) > 1:
        study = set().union(*element_sets)
        isolated = set().union(*(isolated_elements(dataset) for dataset in datasets.values()))
        if study - isolated:
            return (f'the classes differ in elements but no class has an IsolatedAtom frame of '
                    f'{", ".join(sorted(study - isolated))}: every model is trained with the E0 of every element of '
                    'the study so that it can be tested on every class; label the isolated atoms (labeling '
                    '`isolated_atoms`)')
    fractions = training['split_fractions'].get_dict()
    parameters = training['training']['mace']['parameters'].get_dict()
    batch_size = parameters.get('batch_size', 10)
    plan = model_plan(list(datasets), inputs['train_all'].value, inputs['leave_one_out'].value)
    for label, classes in plan.items():
        n_pool = sum(pools[name] for name in classes)
        split = split_indices(n_pool, fractions, 0)
        empty = [name for name, indices in split.items() if not indices]
        if empty:
            return (f'model `{label}` would train on {n_pool} frames (classes {", ".join(classes)} minus their test '
                    f'sets): too few for training.split_fractions {fractions}, the {"/".join(empty)} split is empty')
        if isinstance(batch_size, int) and batch_size > len(split['train']):
            return (f'training batch_size {batch_size} is larger than the {len(split["train"])} training frames of '
                    f'model `{label}`: mace would take no step; lower batch_size or label more frames')
    return None


def _validation_problem(inputs, datasets, labels) -> str | None:
    structures, validation = inputs.get('validation_structures') or {}, inputs.get('validation')
    if bool(structures) != bool(validation):
        return 'validation needs both `validation_structures` {class: StructureData} and `validation` settings'
    if not structures:
        return None
    problem = validation_problem({**validation, 'mlip': {'models': {}}}, None)
    if problem:
        return f'validation: {problem}'
    models = inputs.get('models') or {}
    for name, structure in structures.items():
        if name not in datasets:
            return f'`validation_structures.{name}` is not a class: the classes are {", ".join(sorted(datasets))}'
        problem = structure_problem(f'validation_structures.{name}', structure)
        if problem:
            return problem
        label = name if name in labels else (ALL if ALL in labels else None)
        if label is None:
            return f'`validation_structures.{name}`: no model `{name}` or `{ALL}` to validate on it'
        for member, model in (models.get(label) or {}).items():
            missing = model.covers(structure.get_symbols_set())
            if missing:
                return f'model `{label}` (member `{member}`) lacks {", ".join(missing)} of validation structure `{name}`'
    return None


def validate_inputs(inputs, _):  # noqa: PLR0911  (one list of independent checks)
    """Refuse before any compute: < 2 classes, different DFT settings, uncovered elements, impossible splits."""
    datasets = inputs.get('datasets') or {}
    if len(datasets) < 2:
        return (f'a transferability study needs at least 2 classes in `datasets`, got {len(datasets)}'
                f'{": " + ", ".join(datasets) if datasets else ""}')
    for name in datasets:
        if not LABEL.match(name) or name == ALL or name.startswith(WITHOUT):
            return (f'class label `{name}` must be letters/digits joined by single underscores, and not `{ALL}` '
                    f'or `{WITHOUT}...` (model labels)')
    names = list(datasets)
    for name in names[1:]:
        differences = fingerprint_differences(datasets[names[0]].fingerprint, datasets[name].fingerprint)
        if differences:
            return (f'classes `{names[0]}` and `{name}` were labeled with different DFT settings '
                    f'({"; ".join(differences)}): their errors are not comparable and their frames cannot be merged; '
                    'relabel one class with the settings of the other')
    fraction = inputs['test_fraction'].value
    if not 0.0 < fraction < 1.0:
        return f'test_fraction must be in (0, 1), got {fraction}'
    pools = {}
    for name, dataset in datasets.items():
        n_test, pools[name] = split_sizes(non_isolated_frames(dataset), fraction)
        if not n_test or not pools[name]:
            return (f'class `{name}` has {non_isolated_frames(dataset)} frame(s) besides IsolatedAtom ones: too few '
                    f'for a test set (test_fraction {fraction}) and a training pool')
    models, training = inputs.get('models'), inputs.get('training')
    if models and training:
        return 'give either `models` (evaluate them) or `training` (train them), not both'
    if models:
        problem = _models_problem(models, datasets)
        labels = set(models)
    elif training:
        problem = _training_problem(inputs, datasets, pools)
        labels = set(model_plan(names, inputs['train_all'].value, inputs['leave_one_out'].value))
    else:
        return 'nothing to evaluate: give `models` or `training`'
    if problem:
        return problem
    problem = code_problem(inputs['evaluate'].get('code'), 'mlip.evaluate', 'the evaluation')
    if problem:
        return problem
    return _validation_problem(inputs, datasets, labels)


@calcfunction
def isolated_atom_frames(dataset: TrainingSet, elements: orm.List) -> TrainingSet:
    """The IsolatedAtom frames of ``elements`` in ``dataset``: their E0 lets a model know an element."""
    wanted = set(elements.get_list())
    frames = dataset.to_ase()
    chosen = [i for i, atoms in enumerate(frames)
              if atoms.info.get('config_type') == ISOLATED_ATOM and len(atoms) == 1 and atoms[0].symbol in wanted]
    return dataset.subset(chosen)


@calcfunction
def transferability_matrix(layout: orm.Dict, **results) -> orm.Dict:
    """Every model on every test set from the evaluation jobs: the matrices and their verdicts (meV units).

    ``layout``: ``models`` and ``classes`` (row and column order) and ``keys`` {class: {model: [job model keys]}};
    ``results``: per class ``test_<class>`` (the test set), ``energies_<class>``, ``forces_<class>`` and
    ``summary_<class>`` of its evaluation job.
    """
    layout = layout.get_dict()
    scores = {}
    for name in layout['classes']:
        test = results[f'test_{name}']
        arrays = test.get_arrays()
        job_keys = results[f'summary_{name}']['model_keys']
        energies = results[f'energies_{name}'].get_array('energies')
        forces = results[f'forces_{name}'].get_array('forces')
        for model, keys in layout['keys'][name].items():
            rows = [job_keys.index(key) for key in keys]
            score = committee_errors(energies[rows], forces[rows], arrays['n_atoms'], arrays['energy'],
                                     arrays['forces'])
            scores[(model, name)] = {key: (value * EV_TO_MEV if key in MATRIX_OUTPUTS and value is not None
                                           else value) for key, value in score.items()}
    summary = transferability_summary(scores, layout['models'], layout['classes'])
    for key, output in MATRIX_OUTPUTS.items():
        summary[output] = summary.pop(key)
    summary['n_test_frames'] = {name: int(results[f'test_{name}'].n_frames) for name in layout['classes']}
    summary['committee_size'] = {}
    for keys in layout['keys'].values():
        for model, members in keys.items():
            summary['committee_size'].setdefault(model, len(members))
    summary['units'] = {'energy': 'meV/atom', 'forces': 'meV/Å', 'calibration': 'committee std / force RMSE'}
    return orm.Dict(_finite(summary))


def _finite(value):
    """JSON-safe copy: numpy scalars to Python, NaN to None."""
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return None if not np.isfinite(value) else float(value)
    if isinstance(value, (np.integer, np.bool_)):
        return value.item()
    return value


@calcfunction
def transferability_figures(matrix: orm.Dict) -> dict:
    """Heatmaps (PNG) of the matrices that have values: models as rows, test classes as columns."""
    from aiida_mlip.report.figures import heatmap

    outputs = {}
    for key, (title, unit) in HEATMAPS.items():
        values = matrix[key]
        if any(value is not None for row in values for value in row):
            content = heatmap(values, matrix['models'], matrix['classes'], title, unit)
            name = key.rsplit('_mev', 1)[0] + '_heatmap'
            outputs[name] = orm.SinglefileData(io.BytesIO(content), filename=f'{name}.png')
    return outputs


class TransferabilityWorkChain(ProtocolMixin, WorkChain):
    """Train (or take) a model per class, on all classes and without each class; test every model on every class."""

    _protocol_name = 'transferability'

    @classmethod
    def define(cls, spec):
        super().define(spec)
        spec.input_namespace('datasets', valid_type=TrainingSet, dynamic=True,
                             help='One labeled dataset per class ({class: mlip.dataset}), >= 2, same DFT settings.')
        spec.input_namespace('models', valid_type=MlipModel, dynamic=True, required=False, populate_defaults=False,
                             help='Given models instead of training: {label: {member: mlip.model}}. A label equal '
                                  'to a class is that class\'s in-class model; `all` and `without_<class>` are read '
                                  'as the all-class and leave-one-out models.')
        spec.expose_inputs(TrainingWorkChain, namespace='training', exclude=('dataset', 'evaluate'),
                           namespace_options={'required': False, 'populate_defaults': False,
                                              'help': 'How each model (committee) is trained; the dataset is set '
                                                      'here and the test split is this workflow\'s.'})
        spec.inputs['training'].validator = None  # it needs `dataset`: checked in validate_inputs
        spec.input('train_all', valid_type=orm.Bool, default=lambda: orm.Bool(True),
                   help='Also train one model on all classes merged (label `all`).')
        spec.input('leave_one_out', valid_type=orm.Bool, default=lambda: orm.Bool(False),
                   help='Also train one model per class on all other classes (label `without_<class>`).')
        spec.input('seed', valid_type=orm.Int, default=lambda: orm.Int(1),
                   help='Seed of the per-class test split (made once, shared by all models).')
        spec.input('test_fraction', valid_type=orm.Float, default=lambda: orm.Float(0.2),
                   help='Fraction of each class held out as its test set (IsolatedAtom frames always train).')
        spec.expose_inputs(MlipEvaluateCalculation, namespace='evaluate', exclude=('models', 'structures', 'dataset'),
                           namespace_options={'help': 'Code and options of the evaluation jobs (one per test set, '
                                                      'all models in it); also the MLIP engine of the validation.'})
        spec.input_namespace('validation_structures', valid_type=orm.StructureData, dynamic=True, required=False,
                             populate_defaults=False,
                             help='{class: StructureData}: validate the in-class and the all-class model on it.')
        spec.expose_inputs(ValidationWorkChain, namespace='validation', exclude=('structure', 'mlip'),
                           namespace_options={'required': False, 'populate_defaults': False,
                                              'help': 'Validation settings (properties, thresholds, DFT engine).'})
        spec.inputs['validation'].validator = None  # the models are added at launch
        spec.inputs.validator = validate_inputs
        spec.outline(
            cls.split_classes,
            if_(cls.should_train)(
                cls.train_models,
                cls.inspect_training,
            ),
            cls.evaluate_models,
            cls.inspect_evaluation,
            if_(cls.should_validate)(
                cls.validate_models,
                cls.inspect_validation,
                cls.validate_all_model,
                cls.inspect_validation,
            ),
        )
        spec.output('matrix', valid_type=orm.Dict,
                    help='Rows = models, columns = classes: energy/force MAE and RMSE, committee force std, '
                         'calibration, out_of_class_ratio, uncertainty, leave_one_out (docs/transferability.md).')
        spec.output_namespace('models', valid_type=MlipModel, dynamic=True, help='{model label: {member: model}}.')
        spec.output_namespace('test_sets', valid_type=TrainingSet, dynamic=True,
                              help='The test set of every class (the same for all models).')
        spec.output_namespace('validation', valid_type=orm.Dict, dynamic=True, required=False,
                              help='{class: comparison} of the in-class model (of `all` without one).')
        spec.output_namespace('validation_all', valid_type=orm.Dict, dynamic=True, required=False,
                              help='{class: comparison} of the all-class model, where the class has its own model.')
        spec.output_namespace('figures', valid_type=orm.SinglefileData, dynamic=True,
                              help='PNG heatmaps: forces_rmse_heatmap, energy_rmse_heatmap, committee_force_std_heatmap.')
        spec.exit_code(401, 'ERROR_TRAINING_FAILED', message='Training failed: {failed}')
        spec.exit_code(402, 'ERROR_EVALUATION_FAILED', message='Evaluation failed: {failed}')
        spec.exit_code(403, 'ERROR_VALIDATION_FAILED', message='Validation failed: {failed}')

    @classmethod
    def get_builder_from_protocol(cls, training_code, evaluate_code, datasets, protocol=None, overrides=None,
                                  models=None, validation=None, options=None, **_):
        """Builder for the classes ``datasets`` ({class: mlip.dataset}) with the protocol's settings.

        The training and validation parts use their own protocol of the same name with this protocol's
        ``training``/``validation`` entries (and ``overrides``) on top.

        :param training_code: the ``mlip.mace_train`` code (unused with ``models``).
        :param models: given models {label: {member: MlipModel}}: nothing is trained.
        :param validation: ``structures`` ({class: StructureData}) and the keyword arguments of
            ``ValidationWorkChain.get_builder_from_protocol`` (``pw_code``, ``pseudo_family``, ``dft_overrides``,
            ``md_code``, ...).
        :param options: ``metadata.options`` of the training jobs.
        """
        load = {'train': training_code, 'evaluate': evaluate_code}
        codes = {key: orm.load_code(code) if isinstance(code, (str, int)) else code for key, code in load.items()}
        inputs = cls.get_protocol_inputs(protocol, overrides)
        protocol = protocol or cls.get_default_protocol()
        builder = cls.get_builder()
        builder.datasets = dict(datasets)
        builder.seed = orm.Int(inputs['seed'])
        builder.test_fraction = orm.Float(inputs['test_fraction'])
        builder.train_all = orm.Bool(inputs['train_all'])
        builder.leave_one_out = orm.Bool(inputs['leave_one_out'])
        builder.evaluate.code = codes['evaluate']
        builder.evaluate.metadata = {'options': {'resources': {'num_machines': 1, 'num_mpiprocs_per_machine': 1}}}
        if models is not None:
            builder.models = {label: dict(members) for label, members in models.items()}
        else:
            training = TrainingWorkChain.get_builder_from_protocol(
                codes['train'], TrainingSet(), protocol=protocol, overrides=inputs.get('training'), options=options)
            training = training._inputs(prune=True)  # noqa: SLF001  (a nested builder reused as a namespace)
            for key in ('dataset', 'evaluate'):
                training.pop(key, None)
            builder.training = training
        if validation:
            validation = dict(validation)
            structures = dict(validation.pop('structures'))
            nested = ValidationWorkChain.get_builder_from_protocol(
                codes['evaluate'], {}, next(iter(structures.values())), protocol=protocol,
                overrides=inputs.get('validation'), **validation)
            nested = nested._inputs(prune=True)  # noqa: SLF001
            for key in ('structure', 'mlip'):
                nested.pop(key, None)
            builder.validation = nested
            builder.validation_structures = structures
        return builder

    # ---- outline -------------------------------------------------------------------------------------------
    def split_classes(self):
        """One seeded test split per class: the test set every model is scored on, and the training pool.

        Stratified by config type, so a class sampled by volume scans and rattles is tested on rattled frames too.
        """
        fraction = self.inputs.test_fraction.value
        self.ctx.classes = list(self.inputs.datasets)
        self.ctx.pools, self.ctx.test_sets = {}, {}
        for name in self.ctx.classes:
            parts = split_dataset(self.inputs.datasets[name], orm.Dict({'train': 1.0 - fraction, 'test': fraction}),
                                  self.inputs.seed, stratify_by=orm.Str('config_type'),
                                  metadata={'call_link_label': f'split_{name}'})
            self.ctx.pools[name], self.ctx.test_sets[name] = parts['train'], parts['test']
            self.out(f'test_sets.{name}', parts['test'])
            self.report(f'class {name}: {parts["test"].n_frames} test frames, {parts["train"].n_frames} to train on')
        if 'models' in self.inputs:
            self.ctx.models = {label: dict(members) for label, members in self.inputs.models.items()}
            self.ctx.trained = {label: label for label in self.ctx.models}

    def should_train(self):
        return 'models' not in self.inputs

    def _training_set(self, label: str, classes: tuple) -> TrainingSet:
        """The pools of ``classes`` plus the IsolatedAtom frames of elements they lack (from the other classes)."""
        pools = {name: self.ctx.pools[name] for name in classes}
        study = set().union(*(dataset.elements for dataset in self.inputs.datasets.values()))
        known = set().union(*(isolated_elements(pool) for pool in pools.values()))
        parts = dict(pools)
        for name in self.ctx.classes:
            wanted = sorted((study - known) & isolated_elements(self.ctx.pools[name]))
            if name not in classes and wanted:
                parts[f'isolated_{name}'] = isolated_atom_frames(
                    self.ctx.pools[name], orm.List(wanted), metadata={'call_link_label': f'isolated_{name}_for_{label}'})
                known |= set(wanted)
        if len(parts) == 1:
            return next(iter(parts.values()))
        return merge_datasets(**parts, metadata={'call_link_label': f'training_set_{label}'})

    def train_models(self):
        """One TrainingWorkChain per distinct training set, all launched together."""
        plan = model_plan(self.ctx.classes, self.inputs.train_all.value, self.inputs.leave_one_out.value)
        self.ctx.trained = unique_plan(plan)
        study = sorted({atomic_numbers[e] for dataset in self.inputs.datasets.values() for e in dataset.elements})
        futures = {}
        for label in sorted(set(self.ctx.trained.values()), key=list(plan).index):
            inputs = AttributeDict(self.exposed_inputs(TrainingWorkChain, namespace='training'))
            inputs.dataset = self._training_set(label, plan[label])
            parameters = inputs.training.mace.parameters.get_dict()
            parameters.setdefault('atomic_numbers', '[' + ','.join(str(z) for z in study) + ']')
            inputs.training.mace.parameters = orm.Dict(parameters)
            inputs.metadata = {'call_link_label': f'train_{label}'}
            futures[f'train_{label}'] = self.submit(TrainingWorkChain, **inputs)
            self.report(f'model {label}: TrainingWorkChain<{futures[f"train_{label}"].pk}> on '
                        f'{inputs.dataset.n_frames} frames of {", ".join(plan[label])}')
        aliases = {label: trained for label, trained in self.ctx.trained.items() if label != trained}
        if aliases:
            self.report(f'same training data, trained once: {aliases}')
        return ToContext(**futures)

    def inspect_training(self):
        failed, self.ctx.models = [], {}
        for label in sorted(set(self.ctx.trained.values())):
            node = self.ctx[f'train_{label}']
            if not node.is_finished_ok:
                failed.append(f'{label} (TrainingWorkChain<{node.pk}> exit {node.exit_status})')
                continue
            self.ctx.models[label] = dict(node.outputs.models)
        if failed:
            return self.exit_codes.ERROR_TRAINING_FAILED.format(failed=', '.join(failed))
        for label, trained in self.ctx.trained.items():
            self.ctx.models[label] = self.ctx.models[trained]
        return None

    def evaluate_models(self):
        """ONE evaluation job per test set with every distinct model that knows the class's elements."""
        for label, members in self.ctx.models.items():
            for member, model in members.items():
                self.out(f'models.{label}.{member}', model)
        self.ctx.model_keys = {}
        futures = {}
        for name in self.ctx.classes:
            test = self.ctx.test_sets[name]
            models, self.ctx.model_keys[name] = {}, {}
            for label, members in self.ctx.models.items():
                trained = self.ctx.trained[label]
                if any(model.covers(test.elements) for model in members.values()):
                    self.report(f'model {label} lacks elements of class {name}: not evaluated there')
                    continue
                keys = [f'{trained}_{member}' for member in sorted(members)]
                models.update({key: members[member] for key, member in zip(keys, sorted(members))})
                self.ctx.model_keys[name][label] = keys
            inputs = AttributeDict(self.exposed_inputs(MlipEvaluateCalculation, namespace='evaluate'))
            inputs.models = models
            inputs.dataset = test
            inputs.metadata = {**inputs.get('metadata', {}), 'call_link_label': f'evaluate_{name}'}
            futures[f'evaluate_{name}'] = self.submit(MlipEvaluateCalculation, **inputs)
            self.report(f'class {name}: MlipEvaluateCalculation<{futures[f"evaluate_{name}"].pk}> with '
                        f'{len(models)} models on {test.n_frames} frames')
        return ToContext(**futures)

    def _model_order(self) -> list:
        labels = list(self.ctx.models)
        order = [name for name in self.ctx.classes if name in labels] + ([ALL] if ALL in labels else [])
        order += [f'{WITHOUT}{name}' for name in self.ctx.classes if f'{WITHOUT}{name}' in labels]
        return order + sorted(set(labels) - set(order))

    def inspect_evaluation(self):
        failed = [f'{name} (MlipEvaluateCalculation<{self.ctx[f"evaluate_{name}"].pk}> exit '
                  f'{self.ctx[f"evaluate_{name}"].exit_status}: {self.ctx[f"evaluate_{name}"].exit_message})'
                  for name in self.ctx.classes if not self.ctx[f'evaluate_{name}'].is_finished_ok]
        if failed:
            return self.exit_codes.ERROR_EVALUATION_FAILED.format(failed=', '.join(failed))
        results = {}
        for name in self.ctx.classes:
            node = self.ctx[f'evaluate_{name}']
            results.update({f'test_{name}': self.ctx.test_sets[name], f'energies_{name}': node.outputs.energies,
                            f'forces_{name}': node.outputs.forces, f'summary_{name}': node.outputs.summary})
        layout = orm.Dict({'models': self._model_order(), 'classes': self.ctx.classes, 'keys': self.ctx.model_keys})
        matrix = transferability_matrix(layout, **results, metadata={'call_link_label': 'matrix'})
        self.out('matrix', matrix)
        for name, node in transferability_figures(matrix, metadata={'call_link_label': 'figures'}).items():
            self.out(f'figures.{name}', node)
        for model, entry in matrix['out_of_class_ratio']['forces_rmse'].items():
            if entry['ratio'] is not None:
                self.report(f'model {model}: force RMSE {entry["in_class"]:.1f} meV/Å in class, '
                            f'{entry["out_of_class_mean"]:.1f} out of class (x{entry["ratio"]:.2f})')
        uncertainty = matrix['uncertainty']
        if uncertainty['n_evaluated']:
            self.report(f'committee spread rises out of class: {uncertainty["rises"]}')
        return None

    def should_validate(self):
        return bool(self.inputs.get('validation_structures'))

    def _validation_inputs(self, name: str, label: str, reference: dict | None) -> AttributeDict:
        inputs = AttributeDict(self.exposed_inputs(ValidationWorkChain, namespace='validation'))
        inputs.structure = self.inputs.validation_structures[name]
        mlip = AttributeDict(self.exposed_inputs(MlipEvaluateCalculation, namespace='evaluate'))
        mlip.models = self.ctx.models[label]
        inputs.mlip = mlip
        if reference:
            inputs.reference = {**inputs.get('reference', {}), **reference}
        inputs.metadata = {'call_link_label': f'validate_{label}_on_{name}'}
        return inputs

    def validate_models(self):
        """Per class the in-class model (`all` if the class has none); this run computes the DFT reference."""
        self.ctx.validations, futures = {}, {}
        for name in self.inputs.validation_structures:
            label = name if name in self.ctx.models else ALL
            futures[f'validation_{name}'] = self.submit(ValidationWorkChain, **self._validation_inputs(name, label, None))
            self.ctx.validations[f'validation_{name}'] = ('validation', name)
            self.report(f'validation of model {label} on class {name}: '
                        f'ValidationWorkChain<{futures[f"validation_{name}"].pk}>')
        return ToContext(**futures)

    def validate_all_model(self):
        """The all-class model on the classes that have their own model, with the DFT reference of the first run."""
        futures = {}
        if ALL not in self.ctx.models:
            return None
        properties = self.inputs.validation.properties.get_list() if 'properties' in self.inputs.validation else []
        for name in self.inputs.validation_structures:
            if name not in self.ctx.models:
                continue
            first = self.ctx[f'validation_{name}']
            dft = first.outputs['dft'] if 'dft' in first.outputs else {}
            reference = {port: dft[port] for prop in properties for port in REFERENCE_OUTPUTS.get(prop, {})
                         if port in dft}
            futures[f'validation_all_{name}'] = self.submit(ValidationWorkChain,
                                                            **self._validation_inputs(name, ALL, reference))
            self.ctx.validations[f'validation_all_{name}'] = ('validation_all', name)
            self.report(f'validation of model all on class {name} (DFT reused): '
                        f'ValidationWorkChain<{futures[f"validation_all_{name}"].pk}>')
        return ToContext(**futures)

    def inspect_validation(self):
        failed = []
        pending, self.ctx.validations = self.ctx.validations, {}  # the next step adds its own
        for key, (output, name) in pending.items():
            node = self.ctx[key]
            if not node.is_finished_ok:
                failed.append(f'{key} (ValidationWorkChain<{node.pk}> exit {node.exit_status})')
                continue
            self.out(f'{output}.{name}', node.outputs.comparison)
        if failed:
            return self.exit_codes.ERROR_VALIDATION_FAILED.format(failed=', '.join(failed))
        return None
