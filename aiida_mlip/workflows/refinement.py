"""``mlip.refinement``: validation-driven refinement -- train, validate against DFT, add data where it fails, repeat.

One iteration::

    TrainingWorkChain (committee, from scratch on the current dataset, scored on its test split)
         (iteration 0 only: with it, a ValidationWorkChain without a model per structure computes the DFT reference,
         so the training and the reference's pw.x share the machine instead of taking turns)
      -> ValidationWorkChain per structure (the DFT reference reused: no pw.x runs for any validation)
      -> PASSED on every structure: stop.  Budget spent (iterations or DFT labels): stop, FAILED is the result.
      -> targeted_cells (calcfunction, policy in aiida_mlip.analysis.refinement): each failed property section
         becomes new cells around the validated structure -- EOS: volumes off the validation grid, the failing side
         first; elastic: strains in random directions near the validation's magnitudes; phonons: rattled
         supercells; MD: frames of the model's own MD at and above the validation temperature, picked by
         committee deviation. Never the validation's own cells, so a pass is out of sample.
      -> DftLabelingWorkChain (same DFT settings as the dataset) -> merge_datasets -> next iteration.

Every iteration is an output (``iterations.iteration_N``: frames trained on, DFT labels added, test errors, the
verdict and its errors per check), and ``summary`` lists them side by side: validation error against DFT labels used.
"""
from __future__ import annotations

from aiida import orm
from aiida.common import AttributeDict
from aiida.engine import ToContext, WorkChain, calcfunction, if_, while_
from aiida.plugins import DataFactory

from aiida_mlip.analysis.md import repetitions_for
from aiida_mlip.analysis.refinement import (
    SECTIONS, allocate_cells, eos_failing_side, failed_sections, md_target_temperatures,
)
from aiida_mlip.calculations.datasets import extend_splits, merge_datasets
from aiida_mlip.calculations.engine_job import EVALUATE_OPTIONS_HELP, scheduler_options
from aiida_mlip.calculations.mace_train import mace_parameters_problem
from aiida_mlip.calculations.md import MlipMdCalculation
from aiida_mlip.calculations.refinement import PHONON_CELLS, targeted_cells
from aiida_mlip.calculations.sampling import make_supercell
from aiida_mlip.protocols import ProtocolMixin, protocol_file
from aiida_mlip.workflows.active_learning import labeling_fingerprint_problem, select_md_frames
from aiida_mlip.workflows.checks import code_problem, elements_of, structures_problem
from aiida_mlip.workflows.labeling import DftLabelingWorkChain, family_problem
from aiida_mlip.workflows.loop_helpers import md_run_outputs, test_errors
from aiida_mlip.workflows.training import TrainingWorkChain
from aiida_mlip.workflows.validation import (
    REFERENCE_OUTPUTS, ValidationWorkChain, collect_references, submit_references,
)

TrainingSet = DataFactory('mlip.dataset')
MlipModel = DataFactory('mlip.model')

#: Labeling inputs the workflow sets itself (the seed dataset already holds the isolated atoms).
LABELING_PORTS_SET_BY_WORKFLOW = ('structures', 'config_types', 'structure_overrides', 'isolated_atoms',
                                  'isolated_atom_box')
#: Validation inputs the workflow sets itself.
VALIDATION_PORTS_SET_BY_WORKFLOW = ('structure', 'mlip', 'dft', 'md_code')
#: Settings of the targeted cells (the ``targets`` input): the protocol file's defaults, the one source of them.
DEFAULT_TARGETS = protocol_file('refinement')['default_inputs']['targets']
#: How every later iteration trains: from the previous committee (or from scratch), with these mace options.
DEFAULT_RETRAIN = protocol_file('refinement')['default_inputs']['retrain']
RETRAIN_STARTS = ('previous', 'scratch')


def numeric_entries(values: dict) -> dict:
    """The numbers of a comparison section, one level of nesting flattened (``cij_error_percent.C44``)."""
    def number(value):
        return isinstance(value, (int, float)) and not isinstance(value, bool)

    entries = {key: value for key, value in values.items() if number(value)}
    for key, nested in values.items():
        if isinstance(nested, dict):
            entries.update({f'{key}.{name}': value for name, value in nested.items() if number(value)})
    return entries


@calcfunction
def summarize_iteration(parameters: orm.Dict, dataset, **nodes) -> orm.Dict:
    """The record of one iteration, from the nodes it summarises: ``test_metrics`` and ``comparison_<label>``."""
    params = parameters.get_dict()
    comparisons = {key.removeprefix('comparison_'): node.get_dict() for key, node in nodes.items()
                   if key.startswith('comparison_')}
    record = {
        **params,
        'n_dft_labels': dataset.n_frames,
        'test_errors': test_errors(nodes['test_metrics'].get_dict()) if 'test_metrics' in nodes else None,
        'passed': all(c['verdict']['passed'] for c in comparisons.values()) if comparisons else None,
        'validation': {label: {
            'passed': comparison['verdict']['passed'],
            'failed': comparison['verdict']['failed'],
            'checks': comparison['verdict']['checks'],
            'errors': {section: numeric_entries(values)
                       for section, values in comparison.items() if section in SECTIONS and isinstance(values, dict)},
        } for label, comparison in comparisons.items()},
    }
    return orm.Dict(record)


@calcfunction
def summarize_refinement(parameters: orm.Dict, **iterations) -> orm.Dict:
    """All iterations side by side: DFT labels used against each validation error (the report's plot)."""
    records = [iterations[key].get_dict() for key in sorted(iterations, key=lambda k: int(k.rsplit('_', 1)[1]))]
    history = {}
    for record in records:
        for label, validation in record['validation'].items():
            for section, errors in validation['errors'].items():
                for key, value in errors.items():
                    history.setdefault(label, {}).setdefault(f'{section}.{key}', []).append(value)
    return orm.Dict({
        **parameters.get_dict(),
        'n_iterations': len(records) - 1,
        'dft_labels': [record['n_dft_labels'] for record in records],
        'passed_per_iteration': [record['passed'] for record in records],
        'test_forces_rmse_mev_per_a': [(record['test_errors'] or {}).get('forces_rmse_mev_per_a')
                                       for record in records],
        'errors_vs_labels': history,
    })


def settings_of(value, name: str, known: dict) -> tuple:
    """(the Dict's content, or None without one; the problem if it has keys ``known`` has not)."""
    if value is None:
        return None, None
    given = value.get_dict()
    unknown = sorted(set(given) - set(known))
    return given, (f'{name}: unknown key(s) {unknown}; known: {sorted(known)}' if unknown else None)


def validate_targets(value, _=None):
    """The ``targets`` settings: known keys, non-negative counts, a valid MD trust window."""
    targets, problem = settings_of(value, 'targets', DEFAULT_TARGETS)
    if problem or targets is None:
        return problem
    counts = targets.get('cells_per_check', {})
    bad = {key: count for key, count in counts.items()
           if key not in SECTIONS or not isinstance(count, int) or isinstance(count, bool) or count < 0}
    if bad:
        return f'targets.cells_per_check: sections {list(SECTIONS)} with integer counts >= 0, got {bad}'
    if targets.get('phonon_cell', 'commensurate') not in PHONON_CELLS:
        return f"targets.phonon_cell must be one of {', '.join(PHONON_CELLS)}; got {targets['phonon_cell']!r}"
    if not isinstance(targets.get('md_min_atoms', 1), int) or targets.get('md_min_atoms', 1) < 1:
        return f'targets.md_min_atoms must be an integer >= 1, got {targets["md_min_atoms"]!r}'
    for key in ('eos_deviatoric', 'elastic_rattle', 'phonon_rattle'):
        if key in targets and not 0 <= float(targets[key]) <= 0.2:
            return f'targets.{key} must lie in [0, 0.2] (a strain or Å), got {targets[key]}'
    window = targets.get('md_trust_window', DEFAULT_TARGETS['md_trust_window'])
    if len(window) != 2 or not 0 <= float(window[0]) < float(window[1]):
        return f'targets.md_trust_window must be [lo, hi] eV/Å with 0 <= lo < hi, got {window}'
    return None


def reference_by_label(nodes: dict) -> dict:
    """``{label__port: node}`` (the ``reference`` output of a refinement) as ``{label: {port: node}}``."""
    reference = {}
    for key, node in nodes.items():
        label, _, port = key.rpartition('__')
        reference.setdefault(label, {})[port] = node
    return reference


def missing_reference(reference: dict, properties: list, relax: bool) -> list:
    """The DFT results a validation would still have to compute, given ``reference`` (port -> node)."""
    ports = [port for name in properties for port in REFERENCE_OUTPUTS.get(name, {})]
    return [port for port in ports + (['relaxed_structure'] if relax else []) if port not in reference]


def validate_retrain(value, _=None):
    """``start`` is previous or scratch, ``epoch_fraction`` in (0, 1], ``mace`` holds mace_run_train options."""
    retrain, problem = settings_of(value, 'retrain', DEFAULT_RETRAIN)
    if problem or retrain is None:
        return problem
    if retrain.get('start', 'previous') not in RETRAIN_STARTS:
        return f'retrain.start must be one of {list(RETRAIN_STARTS)}, got {retrain["start"]!r}'
    fraction = retrain.get('epoch_fraction', 1.0)
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
        return f'retrain.epoch_fraction must be a number in (0, 1], got {fraction!r}'
    problem = mace_parameters_problem(retrain.get('mace', {}))
    return f'retrain.mace: {problem}' if problem else None


def validate_inputs(inputs, ctx=None):
    """Everything that can be checked before compute is spent."""
    required = ('dataset', 'structures', 'training', 'labeling', 'validation', 'evaluate_code')
    if ctx is not None and any(name not in ctx for name in required):
        return None  # exposed inside another workflow with some ports excluded
    if int(inputs['max_iterations'].value) < 0:
        return f'max_iterations must be >= 0, got {inputs["max_iterations"].value}'
    if int(inputs['max_new_labels'].value) < 1:
        return f'max_new_labels must be >= 1, got {inputs["max_new_labels"].value}'
    structures = dict(inputs['structures'])
    problem = structures_problem(structures)
    if problem:
        return problem
    dataset = inputs['dataset']
    missing = sorted(elements_of(structures.values()) - set(dataset.elements))
    if missing:
        return (f'the structures contain {", ".join(missing)}, absent from the dataset (elements '
                f'{", ".join(dataset.elements)}): a model trained on it cannot be validated there')
    problem = code_problem(inputs['evaluate_code'], 'mlip.evaluate', 'the validation')
    if problem:
        return problem
    properties = inputs['validation']['properties'].get_list()
    if 'md_stability' in properties and 'md_code' not in inputs:
        return 'the validation includes md_stability: give `md_code` (an `mlip.md` code)'
    if 'md_code' in inputs:
        problem = code_problem(inputs['md_code'], 'mlip.md', 'the MD stability check and its targeted MD')
        if problem:
            return problem
    known_ports = {port for ports in REFERENCE_OUTPUTS.values() for port in ports} | {'relaxed_structure'}
    for label, ports in reference_by_label(dict(inputs.get('reference', {}))).items():
        if label not in structures:
            return f'reference: `{label}` is not one of the structures {sorted(structures)}'
        unknown = sorted(set(ports) - known_ports)
        if unknown:
            return f'reference: unknown result(s) {unknown} for `{label}`; known: {sorted(known_ports)}'
    labeling = inputs['labeling']
    problem = code_problem(labeling['pw_base']['pw'].get('code'), 'quantumespresso.pw', 'DFT labeling')
    if problem:
        return problem
    problem = family_problem(labeling['pseudo_family'].value, elements_of(structures.values()))
    if problem:
        return problem
    return labeling_fingerprint_problem(dataset, labeling)


class RefinementWorkChain(ProtocolMixin, WorkChain):
    """Train, validate against DFT, and add DFT labels where the validation fails, until it passes."""

    _protocol_name = 'refinement'

    @classmethod
    def define(cls, spec):
        super().define(spec)
        spec.input('dataset', valid_type=TrainingSet,
                   help='Seed labels (with the isolated atoms), labeled with the same DFT settings as `labeling`.')
        spec.input_namespace('structures', valid_type=orm.StructureData, dynamic=True,
                             help='The structures the model is validated on, by label (e.g. one per material class).')
        spec.expose_inputs(TrainingWorkChain, namespace='training', exclude=('dataset',),
                           namespace_options={'help': 'Training of every iteration (from scratch on the current '
                                                      'dataset); without `evaluate` the `evaluate_code` scores it.'})
        spec.inputs['training'].validator = None  # it needs `dataset`, set every iteration
        spec.expose_inputs(DftLabelingWorkChain, namespace='labeling', exclude=LABELING_PORTS_SET_BY_WORKFLOW,
                           namespace_options={'help': 'DFT labeling of the targeted cells; also the DFT engine of '
                                                      'the validation reference (same settings as the dataset).'})
        spec.expose_inputs(ValidationWorkChain, namespace='validation', exclude=VALIDATION_PORTS_SET_BY_WORKFLOW,
                           namespace_options={'help': 'Properties and thresholds of the validation; a complete '
                                                      '`reference` skips the DFT reference entirely.'})
        spec.inputs['validation'].validator = None
        spec.input('evaluate_code', valid_type=orm.AbstractCode,
                   help='The `mlip.evaluate` code of the validation and of the test-split scoring.')
        spec.input('md_code', valid_type=orm.AbstractCode, required=False,
                   help='The `mlip.md` code: the md_stability check and the targeted MD of a failed one.')
        spec.input('evaluate_options', valid_type=orm.Dict, required=False, help=EVALUATE_OPTIONS_HELP)
        spec.input('max_iterations', valid_type=orm.Int, default=lambda: orm.Int(3),
                   help='Largest number of refinement iterations (label -> retrain -> validate) after the first '
                        'validation; 0 validates the seed model only.')
        spec.input('max_new_labels', valid_type=orm.Int, default=lambda: orm.Int(60),
                   help='Budget of new DFT labels over all iterations; an iteration never exceeds what is left.')
        spec.input('targets', valid_type=orm.Dict, default=lambda: orm.Dict(DEFAULT_TARGETS),
                   validator=validate_targets,
                   help='Targeted cells: `cells_per_check` (section -> count per iteration), `eos_deviatoric` '
                        '(strain), `elastic_rattle`, `phonon_rattle` (Å), `phonon_cell` (`commensurate`, `conventional` or `supercell`), '
                        '`md_factors` (x the highest validation '
                        'temperature), `md_steps`, `md_interval`, `md_min_atoms` (the MD cell), `md_trust_window` (eV/Å).')
        spec.input('seed', valid_type=orm.Int, default=lambda: orm.Int(1),
                   help='Seed of the targeted cells and MD (iteration i uses seed + i).')
        spec.input('retrain', valid_type=orm.Dict, default=lambda: orm.Dict(DEFAULT_RETRAIN), validator=validate_retrain,
                   help='Training of every iteration after the first: `start` `previous` (each member goes on from '
                        'its previous model, naive fine-tuning, for `epoch_fraction` of the training\'s epochs) or '
                        '`scratch`; `mace`: options that replace the training\'s for these runs. The splits are kept: '
                        'the new labels join them.')
        spec.input_namespace('reference', valid_type=orm.Data, dynamic=True, required=False,
                             help='DFT reference already computed, as `<structure label>__<port>` (the `reference` '
                                  'output of a refinement, or a ValidationWorkChain\'s `dft` outputs): those pw.x '
                                  'runs are skipped in every iteration.')
        spec.inputs.validator = validate_inputs
        spec.outline(
            cls.setup,
            cls.run_training,
            cls.inspect_training,
            cls.run_validation,
            cls.inspect_validation,
            while_(cls.should_refine)(
                if_(cls.should_run_md)(
                    cls.run_targeted_md,
                    cls.inspect_targeted_md,
                ),
                cls.make_targets,
                cls.run_labeling,
                cls.inspect_labeling,
                cls.run_training,
                cls.inspect_training,
                cls.run_validation,
                cls.inspect_validation,
            ),
            cls.results,
        )
        spec.output_namespace('models', valid_type=MlipModel, dynamic=True,
                              help='The final committee (`member_0` ...), trained on `dataset`.')
        spec.output('dataset', valid_type=TrainingSet, help='The final dataset: seed frames and every targeted label.')
        spec.output('test_metrics', valid_type=orm.Dict, required=False, help='Test-split errors of the final model.')
        spec.output_namespace('validation', valid_type=orm.Dict, dynamic=True,
                              help='The final ValidationWorkChain comparison per structure label.')
        spec.output_namespace('reference', valid_type=orm.Data, dynamic=True,
                              help='The DFT reference of the validation (computed once), per structure label.')
        spec.output_namespace('iterations', valid_type=orm.Dict, dynamic=True,
                              help='`iteration_N`: frames, DFT labels, test errors, verdict and errors per check.')
        spec.output('summary', valid_type=orm.Dict,
                    help='passed, stop reason, iterations, DFT labels per iteration against each validation error.')
        spec.exit_code(401, 'ERROR_TRAINING_FAILED', message='Training failed (iteration {iteration}): {reason}')
        spec.exit_code(402, 'ERROR_EXPLORATION_FAILED', message='The targeted MD failed (iteration {iteration}): '
                                                                '{reason}')
        spec.exit_code(403, 'ERROR_LABELING_FAILED', message='Labeling the targeted cells failed (iteration '
                                                             '{iteration}): {reason}')
        spec.exit_code(404, 'ERROR_VALIDATION_FAILED', message='The validation workflow failed (iteration '
                                                               '{iteration}): {reason}')

    @classmethod
    def get_builder_from_protocol(cls, dataset, structures, training_code, evaluate_code, pw_code, md_code=None,
                                  protocol=None, overrides=None, pseudo_family=None, options=None, **kwargs):
        """A builder from ``aiida_mlip/protocols/refinement.yaml``.

        :param dataset: the seed ``mlip.dataset`` (with isolated atoms), labeled like ``pw_code`` will label.
        :param structures: the structures to validate on (a StructureData, a list or a dict label -> structure).
        :param overrides: top-level inputs (``max_iterations``, ``max_new_labels``, ``targets``, ``seed``) and,
            under ``training`` / ``labeling`` / ``validation``, the overrides of those workflows' builders.
        :param options: ``metadata.options`` of the pw.x jobs; ``kwargs`` go to the labeling builder.
        """
        training_code, evaluate_code, pw_code = (orm.load_code(code) if isinstance(code, str) else code
                                                 for code in (training_code, evaluate_code, pw_code))
        if isinstance(structures, orm.StructureData):
            structures = {'structure': structures}
        elif not isinstance(structures, dict):
            structures = {f'structure_{index:03d}': s for index, s in enumerate(structures)}
        inputs = cls.get_protocol_inputs(protocol, overrides)
        protocols = inputs['sub_protocols']
        reference = next(iter(structures.values()))

        training = TrainingWorkChain.get_builder_from_protocol(
            training_code, dataset, protocol=protocols['training'], overrides=inputs.get('training'),
            evaluate_code=evaluate_code)
        labeling = DftLabelingWorkChain.get_builder_from_protocol(
            pw_code, structures, protocol=protocols['labeling'], overrides=inputs.get('labeling'),
            pseudo_family=pseudo_family, options=options, **kwargs)
        validation = ValidationWorkChain.get_builder_from_protocol(
            evaluate_code, {}, reference, protocol=protocols['validation'], overrides=inputs.get('validation'))

        training.pop('dataset', None)
        for name in LABELING_PORTS_SET_BY_WORKFLOW:
            labeling.pop(name, None)
        for name in VALIDATION_PORTS_SET_BY_WORKFLOW:
            validation.pop(name, None)
        builder = cls.get_builder()
        builder.dataset = dataset
        builder.structures = structures
        builder.training = training
        builder.labeling = labeling
        builder.validation = validation
        builder.evaluate_code = evaluate_code
        if md_code is not None:
            builder.md_code = orm.load_code(md_code) if isinstance(md_code, str) else md_code
        builder.max_iterations = orm.Int(inputs['max_iterations'])
        builder.max_new_labels = orm.Int(inputs['max_new_labels'])
        builder.targets = orm.Dict(inputs['targets'])
        builder.retrain = orm.Dict(inputs['retrain'])
        builder.seed = orm.Int(inputs['seed'])
        return builder

    # ---- outline -------------------------------------------------------------------------------------------------
    def setup(self):
        self.ctx.iteration = 0
        self.ctx.dataset = self.inputs.dataset
        self.ctx.new_labels = 0
        self.ctx.passed = False
        self.ctx.stop_reason = None
        self.ctx.reference = reference_by_label(dict(self.inputs.get('reference', {})))
        self.ctx.records = {}
        self.ctx.md_candidates = {}
        self.ctx.targets = {**DEFAULT_TARGETS, **self.inputs.targets.get_dict()}

    def run_training(self):
        """A TrainingWorkChain on the current dataset: from scratch first, then as ``retrain`` says, on the splits of
        the previous iteration extended by the new labels."""
        inputs = AttributeDict(self.exposed_inputs(TrainingWorkChain, namespace='training'))
        inputs.dataset = self.ctx.dataset
        start = 'from scratch'
        if self.ctx.iteration > 0:
            inputs.splits = self.ctx.splits
            retrain = {**DEFAULT_RETRAIN, **self.inputs.retrain.get_dict()}
            if retrain['start'] == 'previous':
                inputs.initial_models = self.ctx.models
                parameters = inputs.training.mace.parameters.get_dict()
                epochs = max(1, round(retrain['epoch_fraction'] * parameters.get('max_num_epochs', 2048)))
                parameters = {**parameters, 'max_num_epochs': epochs, **retrain.get('mace', {})}
                inputs.training = AttributeDict({**inputs.training, 'mace': AttributeDict(
                    {**inputs.training.mace, 'parameters': orm.Dict(parameters)})})
                start = 'from the previous committee'
        if not inputs.get('evaluate'):
            inputs.evaluate = {'code': self.inputs.evaluate_code, 'metadata': {'options': self._evaluate_options()}}
        inputs.metadata = {'call_link_label': f'training_{self.ctx.iteration}'}
        futures = self._submit_references() if self.ctx.iteration == 0 else {}
        node = self.submit(TrainingWorkChain, **inputs)
        self.report(f'iteration {self.ctx.iteration}: TrainingWorkChain<{node.pk}> on {self.ctx.dataset.n_frames} '
                    f'frames, {start}')
        return ToContext(training=node, **futures)

    def _submit_references(self) -> dict:
        """A ValidationWorkChain without a model per structure whose DFT reference is not given: it needs no model,
        so it runs with the first training; on a small machine the reference's long jobs (the relaxation, then a
        phonon supercell) no longer hold the training back, nor wait for it."""
        inputs_by_label = {label: self._validation_inputs(label, with_model=False)
                           for label in sorted(self.inputs.structures)}
        return submit_references(self, {label: inputs for label, inputs in inputs_by_label.items() if 'dft' in inputs},
                                 'with the first training')

    def _collect_references(self):
        """The ``dft`` outputs of the reference workflows of iteration 0, or the exit code of the first that failed."""
        references, failed = collect_references(self.ctx, sorted(self.inputs.structures))
        if failed:
            return self.exit_codes.ERROR_VALIDATION_FAILED.format(iteration=self.ctx.iteration,
                                                                 reason=f'DFT reference of {failed[0]}')
        for label, reference in references.items():
            self.ctx.reference[label] = {**self.ctx.reference.get(label, {}), **reference}
        return None

    def inspect_training(self):
        node = self.ctx.training
        failure = self._collect_references()
        if failure is None and (not node.is_finished_ok or 'models' not in node.outputs):
            failure = self.exit_codes.ERROR_TRAINING_FAILED.format(
                iteration=self.ctx.iteration, reason=f'{node.process_label}<{node.pk}> exit {node.exit_status}: '
                                                     f'{node.exit_message}')
        if failure is not None:
            self._attach_outputs()
            return failure
        self.ctx.models = {key: node.outputs.models[key] for key in sorted(node.outputs.models)}
        self.ctx.splits = {name: node.outputs.split[name] for name in node.outputs.split}
        self.ctx.test_metrics = node.outputs.test_metrics if 'test_metrics' in node.outputs else None
        return None

    def _evaluate_options(self) -> dict:
        return scheduler_options(self.inputs.get('evaluate_options'))

    def _validation_inputs(self, label: str, with_model: bool = True) -> AttributeDict:
        """ValidationWorkChain inputs on ``structures[label]``: with its reference known, no DFT job runs; without
        the model, only the DFT reference (and nothing if that is known)."""
        inputs = AttributeDict(self.exposed_inputs(ValidationWorkChain, namespace='validation'))
        inputs.structure = self.inputs.structures[label]
        if with_model:
            inputs.mlip = {'code': self.inputs.evaluate_code, 'models': self.ctx.models,
                           'metadata': {'options': self._evaluate_options()}}
            if 'md_code' in self.inputs:
                inputs.md_code = self.inputs.md_code
        reference = {**dict(inputs.get('reference', {})), **self.ctx.reference.get(label, {})}
        if reference:
            inputs.reference = reference
        relax = inputs.get('relax', orm.Bool(False)).value
        properties = inputs.get('properties', orm.List(['eos', 'elastic', 'phonons'])).get_list()
        if missing_reference(reference, properties, relax):
            inputs.dft = self.exposed_inputs(DftLabelingWorkChain, namespace='labeling')
        inputs.metadata = {'call_link_label': f'validation_{label}_{self.ctx.iteration}'}
        return inputs

    def run_validation(self):
        """One ValidationWorkChain per structure; the DFT reference of iteration 0 is reused afterwards."""
        futures = {}
        for label in sorted(self.inputs.structures):
            inputs = self._validation_inputs(label)
            node = self.submit(ValidationWorkChain, **inputs)
            reused = 'computes the DFT reference' if 'dft' in inputs else 'DFT reference reused'
            self.report(f'iteration {self.ctx.iteration}: ValidationWorkChain<{node.pk}> on `{label}` ({reused})')
            futures[f'validation_{label}'] = node
        return ToContext(**futures)

    def inspect_validation(self):
        """Keep the DFT reference, record the iteration, and decide whether to go on."""
        comparisons = {}
        for label in sorted(self.inputs.structures):
            node = self.ctx[f'validation_{label}']
            if 'dft' in node.outputs:
                self.ctx.reference[label] = {**self.ctx.reference.get(label, {}),
                                             **{port: node.outputs.dft[port] for port in node.outputs.dft}}
            if not node.is_finished_ok or 'comparison' not in node.outputs:
                self._attach_outputs()
                return self.exit_codes.ERROR_VALIDATION_FAILED.format(
                    iteration=self.ctx.iteration, reason=f'{node.process_label}<{node.pk}> exit {node.exit_status}: '
                                                         f'{node.exit_message}')
            comparisons[label] = node.outputs.comparison
        self.ctx.comparisons = comparisons
        self.ctx.passed = all(c['verdict']['passed'] for c in comparisons.values())
        nodes = {f'comparison_{label}': node for label, node in comparisons.items()}
        if self.ctx.test_metrics is not None:
            nodes['test_metrics'] = self.ctx.test_metrics
        parameters = orm.Dict({'iteration': self.ctx.iteration, 'new_labels_total': self.ctx.new_labels})
        record = summarize_iteration(parameters, self.ctx.dataset, **nodes,
                                     metadata={'call_link_label': f'summarize_{self.ctx.iteration}'})
        self.ctx.records[f'iteration_{self.ctx.iteration}'] = record
        self.out(f'iterations.iteration_{self.ctx.iteration}', record)
        failed = {label: c['verdict']['failed'] for label, c in comparisons.items() if not c['verdict']['passed']}
        self.report(f'iteration {self.ctx.iteration}: {"PASSED" if self.ctx.passed else "FAILED"} on '
                    f'{self.ctx.dataset.n_frames} frames{"" if self.ctx.passed else f": {failed}"}')
        return None

    def _budget_left(self) -> int:
        return self.inputs.max_new_labels.value - self.ctx.new_labels

    def should_refine(self) -> bool:
        if self.ctx.passed:
            self.ctx.stop_reason = f'passed in iteration {self.ctx.iteration}'
            return False
        if self.ctx.iteration >= self.inputs.max_iterations.value:
            self.ctx.stop_reason = f'max_iterations ({self.inputs.max_iterations.value}) reached'
            return False
        if self._budget_left() <= 0:
            self.ctx.stop_reason = f'max_new_labels ({self.inputs.max_new_labels.value}) spent'
            return False
        self.ctx.iteration += 1
        self.ctx.plans = self._plans()
        if not any(self.ctx.plans.values()):
            self.ctx.stop_reason = 'no failed check that new data could address'
            return False
        return True

    def _plans(self) -> dict:
        """Per structure label: section -> number of new cells, within the label budget left."""
        plans, budget = {}, self._budget_left()
        for label, comparison in sorted(self.ctx.comparisons.items()):
            sections = failed_sections(comparison['verdict'])
            if 'md_stability' in sections and ('md_code' not in self.inputs or len(self.ctx.models) < 2):
                self.report(f'`{label}`: md_stability failed, but the targeted MD needs an `md_code` and a committee '
                            'of >= 2 (a committee deviation): no MD frames targeted')
                sections.remove('md_stability')
            plans[label] = allocate_cells(sections, self.ctx.targets['cells_per_check'], budget)
            budget -= sum(plans[label].values())
        return plans

    def should_run_md(self) -> bool:
        return any('md_stability' in plan for plan in self.ctx.plans.values())

    def run_targeted_md(self):
        """ONE MlipMdCalculation with the committee at and above the validation temperature, per failing structure."""
        temperatures = md_target_temperatures(self.inputs.validation.md_stability.temperatures.get_list()
                                              if 'temperatures' in self.inputs.validation.get('md_stability', {})
                                              else [300.0], self.ctx.targets['md_factors'])
        structures = {}
        for label, plan in self.ctx.plans.items():
            if 'md_stability' not in plan:
                continue
            structure = self._validated_structure(label)
            repetitions = repetitions_for(len(structure.sites), int(self.ctx.targets['md_min_atoms']))
            if repetitions > 1:
                structure = make_supercell(structure, orm.List([repetitions] * 3),
                                           metadata={'call_link_label': f'md_cell_{label}_{self.ctx.iteration}'})
            structures[label] = structure
        inputs = {
            'code': self.inputs.md_code, 'models': self.ctx.models, 'structures': structures,
            'temperatures': orm.List(temperatures), 'steps': orm.Int(self.ctx.targets['md_steps']),
            'interval': orm.Int(self.ctx.targets['md_interval']), 'ensemble': orm.Str('nvt'),
            'seed': orm.Int(self.inputs.seed.value + self.ctx.iteration),
            'metadata': {'call_link_label': f'targeted_md_{self.ctx.iteration}', 'options': self._evaluate_options()},
        }
        node = self.submit(MlipMdCalculation, **inputs)
        self.report(f'iteration {self.ctx.iteration}: MlipMdCalculation<{node.pk}> at {temperatures} K for MD targets')
        return ToContext(targeted_md=node)

    def inspect_targeted_md(self):
        """Pick the MD frames by committee deviation (trust window, farthest-point sampling)."""
        node = self.ctx.targeted_md
        if not node.is_finished_ok:
            self._attach_outputs()
            return self.exit_codes.ERROR_EXPLORATION_FAILED.format(
                iteration=self.ctx.iteration, reason=f'{node.process_label}<{node.pk}> exit {node.exit_status}: '
                                                     f'{node.exit_message}')
        runs = md_run_outputs(node)
        count = sum(plan.get('md_stability', 0) for plan in self.ctx.plans.values())
        parameters = orm.Dict({'trust_window': self.ctx.targets['md_trust_window'], 'max_candidates': count,
                               'seed': self.inputs.seed.value + self.ctx.iteration, 'min_candidate_fraction': 0.0,
                               'descriptor_r_max': 5.0})
        result = select_md_frames(parameters, node.outputs.summary, **runs,
                                  metadata={'call_link_label': f'select_md_{self.ctx.iteration}'})
        self.ctx.md_candidates = {key: value for key, value in result.items() if key.startswith('candidate_')}
        self.report(f'iteration {self.ctx.iteration}: {len(self.ctx.md_candidates)} MD frame(s) picked by committee '
                    f'deviation of {result["selection"]["n_frames"]}')
        return None

    def _validated_structure(self, label: str) -> orm.StructureData:
        """The structure the validation computed its properties on: the DFT-relaxed one when it relaxed."""
        return self.ctx.reference.get(label, {}).get('relaxed_structure') or self.inputs.structures[label]

    def _cell_plan(self, label: str, counts: dict) -> dict:
        """The settings of ``targeted_cells`` for one structure: counts and what the validation's cells were."""
        targets, plan = self.ctx.targets, {'seed': self.inputs.seed.value * 1000 + self.ctx.iteration}
        validation = self.inputs.validation
        if counts.get('eos'):
            reference = self.ctx.reference[label]
            curve, structure = reference['eos_curve'], self._validated_structure(label)
            volume = structure.get_cell_volume() / len(structure.sites)  # the curve's volumes are per atom
            dft_volumes = curve.get_array('volumes')
            side = 'both'
            outputs = self.ctx[f'validation_{label}'].outputs
            mlip_curve = outputs.mlip['eos_curve'] if 'mlip' in outputs and 'eos_curve' in outputs.mlip else None
            if mlip_curve is not None and len(mlip_curve.get_array('volumes')) == len(dft_volumes) and \
                    (abs(mlip_curve.get_array('volumes') - dft_volumes) < 1e-6).all():
                side = eos_failing_side(dft_volumes, mlip_curve.get_array('energies'), curve.get_array('energies'))
            plan['eos'] = {'count': counts['eos'], 'side': side, 'deviatoric': targets['eos_deviatoric'],
                           'validation_strains': [float(v / volume - 1.0) for v in dft_volumes]}
        if counts.get('elastic'):
            magnitudes = validation.elastic.strain_magnitudes.get_list() if 'strain_magnitudes' in validation.get(
                'elastic', {}) else [0.01]
            plan['elastic'] = {'count': counts['elastic'], 'validation_magnitudes': magnitudes,
                               'rattle': targets['elastic_rattle']}
        if counts.get('phonons'):
            matrix = validation.phonons.supercell_matrix.get_list() if 'supercell_matrix' in validation.get(
                'phonons', {}) else [2, 2, 2]
            plan['phonons'] = {'count': counts['phonons'], 'supercell_matrix': matrix,
                               'rattle': targets['phonon_rattle'], 'cell': targets['phonon_cell']}
        return plan

    def make_targets(self):
        """The targeted cells of every failing structure (calcfunction) and the MD frames picked before."""
        self.ctx.new_cells, self.ctx.new_config_types = {}, {}
        for label, counts in sorted(self.ctx.plans.items()):
            cells = targeted_cells(self._validated_structure(label), orm.Dict(self._cell_plan(label, counts)),
                                   metadata={'call_link_label': f'targets_{label}_{self.ctx.iteration}'})
            for key, structure in sorted(cells.items()):
                self._add_cell(f'{label}_{key}', structure, f'refine_{key.rsplit("_", 1)[0]}')
            self.report(f'iteration {self.ctx.iteration}: `{label}` failed {list(counts)} -> {counts}')
        for key, structure in sorted(self.ctx.md_candidates.items()):
            self._add_cell(f'md_{key}', structure, 'refine_md')
        self.ctx.md_candidates = {}

    def _add_cell(self, key: str, structure, config_type: str):
        name = f'iter{self.ctx.iteration:02d}_{key}'
        self.ctx.new_cells[name] = structure
        self.ctx.new_config_types[name] = config_type

    def run_labeling(self):
        """DftLabelingWorkChain on the targeted cells (the settings of the dataset)."""
        inputs = AttributeDict(self.exposed_inputs(DftLabelingWorkChain, namespace='labeling'))
        inputs.structures = self.ctx.new_cells
        inputs.config_types = orm.Dict(self.ctx.new_config_types)
        inputs.isolated_atoms = orm.Bool(False)
        inputs.metadata = {'call_link_label': f'label_{self.ctx.iteration}'}
        node = self.submit(DftLabelingWorkChain, **inputs)
        self.report(f'iteration {self.ctx.iteration}: DftLabelingWorkChain<{node.pk}> for {len(self.ctx.new_cells)} '
                    'targeted cell(s)')
        return ToContext(labeling=node)

    def inspect_labeling(self):
        """Merge the new labels into the dataset (calcfunction: provenance from every PwCalculation)."""
        node = self.ctx.labeling
        if not node.is_finished_ok or 'dataset' not in node.outputs:
            self._attach_outputs()
            return self.exit_codes.ERROR_LABELING_FAILED.format(
                iteration=self.ctx.iteration, reason=f'{node.process_label}<{node.pk}> exit {node.exit_status}: '
                                                     f'{node.exit_message}')
        labeled = node.outputs.dataset
        self.ctx.new_labels += len(self.ctx.new_cells)
        self.ctx.dataset = merge_datasets(dataset_0=self.ctx.dataset, dataset_1=labeled,
                                          metadata={'call_link_label': f'merge_{self.ctx.iteration}'})
        self.ctx.splits = extend_splits(self.inputs.training.split_fractions,
                                        orm.Int(self.inputs.seed.value + self.ctx.iteration), labeled,
                                        **self.ctx.splits, metadata={'call_link_label': f'splits_{self.ctx.iteration}'})
        self.report(f'iteration {self.ctx.iteration}: {labeled.n_frames} new label(s), dataset now '
                    f'{self.ctx.dataset.n_frames} frames ({self.ctx.new_labels} of {self.inputs.max_new_labels.value} '
                    'targeted labels used)')
        return None

    def results(self):
        self._attach_outputs()
        self.report(f'{"PASSED" if self.ctx.passed else "FAILED"} after {self.ctx.iteration} refinement iteration(s): '
                    f'{self.ctx.stop_reason}; {self.ctx.new_labels} targeted DFT labels, dataset '
                    f'{self.ctx.dataset.n_frames} frames')

    def _attach_outputs(self):
        """Final models, dataset, reference and summary; also on failure, so that what was computed stays reachable."""
        if self.ctx.get('outputs_attached'):
            return
        self.ctx.outputs_attached = True
        for key, model in (self.ctx.get('models') or {}).items():
            self.out(f'models.{key}', model)
        self.out('dataset', self.ctx.dataset)
        if self.ctx.get('test_metrics') is not None:
            self.out('test_metrics', self.ctx.test_metrics)
        for label, comparison in (self.ctx.get('comparisons') or {}).items():
            self.out(f'validation.{label}', comparison)
        for label, reference in self.ctx.reference.items():
            for port, node in reference.items():
                self.out(f'reference.{label}__{port}', node)
        parameters = orm.Dict({
            'passed': bool(self.ctx.passed), 'stop_reason': self.ctx.stop_reason or 'a sub-workflow failed',
            'max_iterations': self.inputs.max_iterations.value, 'max_new_labels': self.inputs.max_new_labels.value,
            'new_labels': self.ctx.new_labels, 'seed_frames': self.inputs.dataset.n_frames,
        })
        self.out('summary', summarize_refinement(parameters, **self.ctx.records,
                                                 metadata={'call_link_label': 'summarize'}))
