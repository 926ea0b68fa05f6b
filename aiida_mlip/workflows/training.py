"""``mlip.training``: seeded split, a committee of MACE models trained concurrently, scored on the test split."""
from __future__ import annotations

import numpy as np
from aiida import orm
from aiida.common import AttributeDict
from aiida.engine import ToContext, WorkChain, if_
from aiida.plugins import CalculationFactory, DataFactory

from aiida_mlip.calculations.datasets import SPLIT_NAMES, split_dataset
from aiida_mlip.calculations.metrics import prediction_metrics
from aiida_mlip.protocols import ProtocolMixin
from aiida_mlip.workflows.mace_train_base import MaceTrainBaseWorkChain

MlipEvaluateCalculation = CalculationFactory('mlip.evaluate')
TrainingSet = DataFactory('mlip.dataset')
MlipModel = DataFactory('mlip.model')
#: Fewest frames of a validation or test split whose errors are worth reporting without a warning.
MIN_SPLIT_FRAMES = 3
#: eV/Å: forces below this in every frame of a split are the zero forces of symmetric cells.
ZERO_FORCE = 1e-3


def validate_inputs(inputs, _):
    size = inputs['committee_size'].value
    if size < 1:
        return f'committee_size must be >= 1, got {size}'
    fractions = inputs['split_fractions'].get_dict()
    if set(fractions) - set(SPLIT_NAMES) or abs(sum(fractions.values()) - 1) > 1e-6 or min(fractions.values()) < 0:
        return f'split_fractions must map train/valid/test to non-negative fractions summing to 1, got {fractions}'
    if fractions.get('train', 0) <= 0:
        return 'split_fractions needs a positive train fraction'
    if inputs['dataset'].n_frames < 2:
        return f'the dataset has {inputs["dataset"].n_frames} frame(s): too few to train on'
    splits = dict(inputs.get('splits', {}))
    if splits:
        if set(splits) - set(SPLIT_NAMES) or 'train' not in splits:
            return f'splits must name `train` and optionally `valid`, `test`; got {sorted(splits)}'
        counted = sum(node.n_frames for node in splits.values())
        if counted != inputs['dataset'].n_frames:
            return (f'the splits hold {counted} frames, the dataset {inputs["dataset"].n_frames}: they must be a '
                    'partition of `dataset`')
    members = {f'member_{member}' for member in range(size)}
    unknown = sorted(set(inputs.get('initial_models', {})) - members)
    if unknown:
        return f'initial_models: {unknown} are not members of a committee of {size} (member_0 ... member_{size - 1})'
    return None


def split_warnings(name: str, arrays: dict) -> list[str]:
    """Why a validation/test split cannot judge a model: too few frames, or no frame with non-zero forces."""
    warnings = []
    n_frames = len(arrays['n_atoms'])
    if n_frames < MIN_SPLIT_FRAMES:
        warnings.append(f'the {name} split has {n_frames} frame(s) (< {MIN_SPLIT_FRAMES}): its errors mean little; '
                        'label more structures or raise its fraction')
    forces = np.abs(np.nan_to_num(arrays['forces']))
    if forces.size == 0 or forces.max() < ZERO_FORCE:
        warnings.append(f'the {name} split has no frame with non-zero forces (all < {ZERO_FORCE} eV/Å, e.g. only '
                        'volume scans of a symmetric cell): its force errors are zero for any model')
    return warnings


class TrainingWorkChain(ProtocolMixin, WorkChain):
    """Train a MACE model, or a committee of models differing only by seed, on one dataset."""

    _protocol_name = 'training'

    @classmethod
    def define(cls, spec):
        super().define(spec)
        spec.input('dataset', valid_type=TrainingSet, help='All labeled frames; they are split here (seeded).')
        spec.input('split_fractions', valid_type=orm.Dict,
                   default=lambda: orm.Dict({'train': 0.8, 'valid': 0.1, 'test': 0.1}),
                   help='Fractions of train/valid/test (docs/sources.md: 80/10/10). IsolatedAtom frames always train.')
        spec.input('split_group_by', valid_type=orm.Str, required=False,
                   help='Keep whole groups (`config_type` or `composition`) in one split.')
        spec.input('seed', valid_type=orm.Int, default=lambda: orm.Int(1),
                   help='Seed of the split; committee member i trains with seed + i.')
        spec.input('committee_size', valid_type=orm.Int, default=lambda: orm.Int(1),
                   help='Number of models trained with different seeds (docs/sources.md: ~4 for active learning).')
        spec.input_namespace('splits', valid_type=TrainingSet, dynamic=True, required=False, populate_defaults=False,
                             help='`train`, `valid`, `test`: a given partition of `dataset`, used instead of splitting '
                                  'it (a refinement keeps its test set and never scores a model on frames its '
                                  'starting model trained on).')
        spec.input_namespace('initial_models', valid_type=MlipModel, dynamic=True, required=False,
                             populate_defaults=False,
                             help='`member_<i>`: start member i from this model (naive fine-tuning: its architecture, '
                                  'weights, scale and shift) instead of from random weights.')
        spec.expose_inputs(MaceTrainBaseWorkChain, namespace='training',
                           exclude=('mace.train', 'mace.valid', 'mace.test'),
                           namespace_options={'help': 'Inputs of each member\'s MaceTrainBaseWorkChain.'})
        spec.expose_inputs(MlipEvaluateCalculation, namespace='evaluate', exclude=('models', 'structures', 'dataset'),
                           namespace_options={'required': False, 'populate_defaults': False,
                                              'help': 'Evaluate the committee on the test split with this code.'})
        spec.inputs.validator = validate_inputs
        spec.outline(
            cls.split,
            cls.train_committee,
            cls.inspect_committee,
            if_(cls.should_evaluate)(
                cls.evaluate_test,
                cls.inspect_evaluation,
            ),
        )
        spec.output_namespace('models', valid_type=MlipModel, dynamic=True,
                              help='The trained models, `member_0` ... (one per committee member).')
        spec.output_namespace('split', valid_type=TrainingSet, dynamic=True, help='The train/valid/test datasets.')
        spec.output_namespace('training_metrics', valid_type=orm.Dict, dynamic=True,
                              help='mace-torch\'s own final errors per member.')
        spec.output('test_metrics', valid_type=orm.Dict, required=False,
                    help='Errors on the test split (committee mean, members, deviation vs error).')
        spec.exit_code(401, 'ERROR_TRAINING_FAILED', message='Committee members failed to train: {members}')
        spec.exit_code(402, 'ERROR_EVALUATION_FAILED', message='The evaluation on the test split failed: {reason}')

    @classmethod
    def get_builder_from_protocol(cls, code, dataset, protocol=None, overrides=None, evaluate_code=None,
                                  options=None, evaluate_options=None, **_):
        """Builder for ``dataset`` with the protocol's MACE settings; ``evaluate_code`` scores the test split.

        :param code: an InstalledCode of plugin ``mlip.mace_train`` (``aiida-mlip setup`` creates `mace-train`).
        :param overrides: top-level inputs and, under ``mace``, mace_run_train options.
        :param options: ``metadata.options`` of the training jobs (resources, walltime, queue, account).
        :param evaluate_options: ``metadata.options`` of the job that scores the test split.
        """
        if isinstance(code, str):
            code = orm.load_code(code)
        inputs = cls.get_protocol_inputs(protocol, overrides)
        builder = cls.get_builder()
        builder.dataset = dataset
        builder.seed = orm.Int(inputs['seed'])
        builder.committee_size = orm.Int(inputs['committee_size'])
        builder.split_fractions = orm.Dict(inputs['split_fractions'])
        if inputs.get('split_group_by'):
            builder.split_group_by = orm.Str(inputs['split_group_by'])
        builder.training.mace.code = code
        builder.training.mace.parameters = orm.Dict(inputs['mace'])
        resources = {'num_machines': 1, 'num_mpiprocs_per_machine': 1}
        builder.training.mace.metadata.options = {'resources': resources, **(options or {})}
        if inputs.get('max_iterations'):
            builder.training.max_iterations = orm.Int(inputs['max_iterations'])
        if evaluate_code is not None:
            builder.evaluate.code = orm.load_code(evaluate_code) if isinstance(evaluate_code, str) else evaluate_code
            builder.evaluate.metadata = {'options': {'resources': resources, **(evaluate_options or {})}}
        return builder

    def split(self):
        """Seeded split (a calcfunction, so the split itself is provenance), stratified by config type.

        Stratified unless whole groups are kept together: a validation or test split of only volume-scan
        frames of a symmetric cell has zero forces, scores every model's forces as perfect and picks the
        best checkpoint on nothing. Splits that are still too small to mean anything get a WARNING line.
        """
        if self.inputs.get('splits'):
            self.ctx.split = dict(self.inputs.splits)
        elif 'split_group_by' in self.inputs:
            self.ctx.split = split_dataset(self.inputs.dataset, self.inputs.split_fractions, self.inputs.seed,
                                           group_by=self.inputs.split_group_by)
        else:
            self.ctx.split = split_dataset(self.inputs.dataset, self.inputs.split_fractions, self.inputs.seed,
                                           stratify_by=orm.Str('config_type'))
        for name, subset in self.ctx.split.items():
            self.out(f'split.{name}', subset)
            self.report(f'{name}: {subset.n_frames} frames')
            if name != 'train':
                for warning in split_warnings(name, subset.get_arrays()):
                    self.report(f'WARNING: {warning}')

    def train_committee(self):
        """One MaceTrainBaseWorkChain per member, launched together."""
        futures = {}
        for member in range(self.inputs.committee_size.value):
            inputs = AttributeDict(self.exposed_inputs(MaceTrainBaseWorkChain, namespace='training'))
            parameters = inputs.mace.parameters.get_dict()
            parameters['seed'] = self.inputs.seed.value + member
            inputs.mace.parameters = orm.Dict(parameters)
            for name in ('train', 'valid', 'test'):
                if name in self.ctx.split:
                    inputs.mace[name] = self.ctx.split[name]
            initial = self.inputs.get('initial_models', {}).get(f'member_{member}')
            if initial is not None:
                inputs.mace.foundation_model = initial
            inputs.metadata = {'call_link_label': f'train_member_{member}'}
            node = self.submit(MaceTrainBaseWorkChain, **inputs)
            start = f'from MlipModel<{initial.pk}>' if initial is not None else 'from scratch'
            self.report(f'launched MaceTrainBaseWorkChain<{node.pk}> for member {member} (seed {parameters["seed"]}, '
                        f'{start})')
            futures[f'member_{member}'] = node
        return ToContext(**futures)

    def inspect_committee(self):
        failed = []
        for member in range(self.inputs.committee_size.value):
            node = self.ctx[f'member_{member}']
            if not node.is_finished_ok or 'model' not in node.outputs:
                failed.append(f'member_{member} (exit {node.exit_status})')
                continue
            self.out(f'models.member_{member}', node.outputs.model)
            if 'metrics' in node.outputs:
                self.out(f'training_metrics.member_{member}', node.outputs.metrics)
        if failed:
            return self.exit_codes.ERROR_TRAINING_FAILED.format(members=', '.join(failed))
        return None

    def should_evaluate(self):
        return bool(self.inputs.get('evaluate')) and 'test' in self.ctx.split

    def evaluate_test(self):
        """ONE evaluation job: every member on the whole test split (one model load each)."""
        inputs = AttributeDict(self.exposed_inputs(MlipEvaluateCalculation, namespace='evaluate'))
        inputs.models = {key: self.ctx[key].outputs.model for key in sorted(self.ctx) if key.startswith('member_')}
        inputs.dataset = self.ctx.split['test']
        inputs.metadata = {**inputs.get('metadata', {}), 'call_link_label': 'evaluate_test'}
        return ToContext(evaluation=self.submit(MlipEvaluateCalculation, **inputs))

    def inspect_evaluation(self):
        node = self.ctx.evaluation
        if not node.is_finished_ok:
            return self.exit_codes.ERROR_EVALUATION_FAILED.format(reason=f'exit {node.exit_status}: {node.exit_message}')
        optional = {name: node.outputs[name] for name in ('stresses', 'committee') if name in node.outputs}
        metrics = prediction_metrics(self.ctx.split['test'], node.outputs.energies, node.outputs.forces, **optional,
                                     metadata={'call_link_label': 'test_metrics'})
        self.out('test_metrics', metrics)
        self.report(f'test forces RMSE {metrics["forces_mev_per_a"]["rmse"]:.1f} meV/Å, '
                    f'energy RMSE {metrics["energy_per_atom_mev"]["rmse"]:.2f} meV/atom')
        return None
