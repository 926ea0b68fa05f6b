"""``mlip.campaign``: one campaign file run end to end: labeling -> training or fine-tuning -> validation -> transferability.

For every material class the base structures are sampled with the seeded sampling calcfunctions (volume scan,
rattles, strains, optional supercell) and labeled by ONE ``DftLabelingWorkChain`` per class. All classes share the
same DFT settings (cutoffs computed once for all elements of the campaign), so their datasets merge: the campaign's
model (a committee, trained from scratch or fine-tuned from a foundation) learns all classes at once and is validated
against DFT on each class's first material. With two or more classes the transferability matrix (per-class models
evaluated on every class) follows. Build the inputs from a campaign file with :mod:`aiida_mlip.campaigns.builder`.
"""
from __future__ import annotations

import time

from aiida import orm
from aiida.common import AttributeDict
from aiida.engine import ToContext, WorkChain, if_

from aiida_mlip.analysis.eos import in_sample_volume_strains
from aiida_mlip.calculations.datasets import merge_datasets
from aiida_mlip.calculations.engine_job import EVALUATE_OPTIONS_HELP, scheduler_options
from aiida_mlip.calculations.sampling import make_supercell, rattle_structure, scale_volume, strain_structure
from aiida_mlip.data.dataset import TrainingSet
from aiida_mlip.data.model import MlipModel
from aiida_mlip.workflows.checks import code_problem, elements_of
from aiida_mlip.workflows.finetune import validation_key_errors
from aiida_mlip.workflows.labeling import DftLabelingWorkChain, family_problem
from aiida_mlip.workflows.loop_helpers import test_errors
from aiida_mlip.workflows.refinement import RefinementWorkChain, missing_reference
from aiida_mlip.workflows.training import TrainingWorkChain
from aiida_mlip.workflows.transferability import TransferabilityWorkChain
from aiida_mlip.workflows.validation import ValidationWorkChain, collect_references, submit_references

PW_PROCESS_TYPE = 'aiida.calculations:quantumespresso.pw'


def validate_inputs(inputs, _):
    """The campaign's classes name given structures, the family covers them, the codes are of the right plugin."""
    campaign = inputs['campaign'].get_dict()
    structures = dict(inputs.get('structures', {}))
    classes = campaign.get('classes') or {}
    if not classes:
        return 'the campaign has no class'
    for label, materials in classes.items():
        if not materials:
            return f'class `{label}` has no material'
        missing = [name for name in materials if name not in structures]
        if missing:
            return f'class `{label}` names materials without a structure: {missing}'
    problem = family_problem(inputs['labeling']['pseudo_family'].value, elements_of(structures.values()))
    if problem:
        return problem
    problem = code_problem(inputs['evaluate_code'], 'mlip.evaluate', 'validation and transferability')
    if problem:
        return problem
    if campaign.get('transferability') and len(classes) < 2:
        return f'transferability needs at least 2 classes, the campaign has {len(classes)}'
    if campaign.get('validation') and 'validation' not in inputs:
        return 'the campaign asks for validation but the `validation` inputs are missing'
    if 'refinement' in inputs:
        if 'validation' not in inputs:
            return 'refinement needs the `validation` inputs: its verdict decides what is labeled next'
        if campaign.get('transferability'):
            return 'refinement and transferability in one campaign are not supported: run them as two campaigns'
    return None


class CampaignWorkChain(WorkChain):
    """Label material classes with one set of DFT settings, train (or fine-tune) one model, validate, compare."""

    @classmethod
    def define(cls, spec):
        super().define(spec)
        spec.input('campaign', valid_type=orm.Dict,
                   help='The normalised campaign: name, classes (label -> material keys), materials (key -> '
                        'sampling), validation and transferability settings (aiida_mlip.campaigns.schema).')
        spec.input_namespace('structures', valid_type=orm.StructureData, dynamic=True,
                             help='Base structure of every material, by material key.')
        spec.expose_inputs(DftLabelingWorkChain, namespace='labeling', exclude=('structures', 'config_types'),
                           namespace_options={'help': 'DFT settings shared by every class (same cutoffs for all '
                                                      'elements) and by the DFT reference of the validation.'})
        spec.expose_inputs(TrainingWorkChain, namespace='training', exclude=('dataset',),
                           namespace_options={'help': 'Training of the campaign model on all classes; with '
                                                      '`training.mace.foundation_model` it is a fine-tuning.'})
        spec.inputs['training'].validator = None  # it needs `dataset`, made by the labeling
        spec.input('evaluate_code', valid_type=orm.AbstractCode,
                   help='The `mlip.evaluate` code of the validation and the transferability matrix.')
        spec.input('md_code', valid_type=orm.AbstractCode, required=False,
                   help='The `mlip.md` code, needed when the validation properties include md_stability.')
        spec.input('evaluate_options', valid_type=orm.Dict, required=False, help=EVALUATE_OPTIONS_HELP)
        spec.expose_inputs(ValidationWorkChain, namespace='validation', exclude=('structure', 'mlip', 'dft', 'md_code'),
                           namespace_options={'required': False, 'populate_defaults': False,
                                              'help': 'Validation settings (properties, thresholds) used per class.'})
        spec.inputs['validation'].validator = None
        spec.input('refinement', valid_type=orm.Dict, required=False,
                   help='Validation-driven refinement instead of one training and one validation: '
                        '`max_iterations`, `max_new_labels`, `targets`, `seed` of RefinementWorkChain.')
        spec.inputs.validator = validate_inputs
        spec.outline(
            cls.sample,
            cls.run_labeling,
            cls.inspect_labeling,
            if_(cls.should_refine)(
                cls.run_refinement,
                cls.inspect_refinement,
            ).else_(
                cls.run_training,
                cls.inspect_training,
                if_(cls.should_compare)(
                    cls.run_validation,
                    cls.inspect_validation,
                ),
            ),
            cls.results,
        )
        spec.output_namespace('datasets', valid_type=TrainingSet, dynamic=True, help='The labels of each class.')
        spec.output_namespace('models', valid_type=MlipModel, dynamic=True,
                              help='The campaign model: committee members `member_0` ...')
        spec.output('test_metrics', valid_type=orm.Dict, required=False, help='Errors on the test split.')
        spec.output_namespace('validation', valid_type=orm.Dict, dynamic=True,
                              help='Per class: the ValidationWorkChain comparison (errors and verdict).')
        spec.output('refinement', valid_type=orm.Dict, required=False,
                    help='The refinement summary: passed, stop reason, DFT labels per iteration against each error.')
        spec.output('transferability', valid_type=orm.Dict, required=False,
                    help='The transferability matrix (rows = models, columns = classes).')
        spec.output('summary', valid_type=orm.Dict,
                    help='Campaign name, classes, pw.x count, DFT settings fingerprint, key numbers, timings.')
        spec.exit_code(401, 'ERROR_LABELING_FAILED', message='The labeling of classes failed: {classes}')
        spec.exit_code(402, 'ERROR_TRAINING_FAILED', message='The training of the campaign model failed: {reason}')
        spec.exit_code(403, 'ERROR_VALIDATION_FAILED', message='The validation of classes failed: {classes}')
        spec.exit_code(404, 'ERROR_TRANSFERABILITY_FAILED', message='The transferability matrix failed: {reason}')
        spec.exit_code(405, 'ERROR_REFINEMENT_FAILED', message='The refinement failed: {reason}')

    # ---- outline -------------------------------------------------------------------------------------------
    def _campaign(self) -> dict:
        return self.inputs.campaign.get_dict()

    def _tick(self, step: str):
        """Wall time of each stage for the summary."""
        now = time.time()
        self.ctx.setdefault('timings', {})
        if 'stage_start' in self.ctx:
            self.ctx.timings[self.ctx.stage] = round(now - self.ctx.stage_start, 1)
        self.ctx.stage, self.ctx.stage_start = step, now

    def sample(self):
        """Candidate cells of every material, made by seeded calcfunctions (each cell has a creator)."""
        self._tick('sampling')
        campaign = self._campaign()
        self.ctx.cells = {label: {} for label in campaign['classes']}
        self.ctx.config_types = {label: {} for label in campaign['classes']}
        for label, names in campaign['classes'].items():
            for name in names:
                cells = self._sample_material(name, campaign['materials'][name]['sampling'])
                for key, (structure, config_type) in cells.items():
                    self.ctx.cells[label][key] = structure
                    self.ctx.config_types[label][key] = config_type
            self.report(f'class `{label}`: {len(self.ctx.cells[label])} cells sampled from {", ".join(names)}')
        self.ctx.comparisons = {}
        self.ctx.warnings = self._in_sample_warnings(campaign)
        for warning in self.ctx.warnings:
            self.report(f'WARNING: {warning}')

    def _in_sample_warnings(self, campaign: dict) -> list[str]:
        """Training on the validation's own cells makes its check in sample: say so (the EOS scan's volumes)."""
        if 'validation' not in self.inputs or 'eos' not in self.inputs.validation.properties.get_list():
            return []
        span, points = self.inputs.validation.eos.volume_range.value, self.inputs.validation.eos.n_points.value
        warnings = []
        for label, names in campaign['classes'].items():
            sampled = campaign['materials'][names[0]]['sampling'].get('volumes', [])
            overlap = in_sample_volume_strains(sampled, span, points)
            if overlap:
                warnings.append(f'class `{label}`: the sampled volume changes {overlap} are points of the validation '
                                f'EOS scan of `{names[0]}` (+-{100 * span:g} %, {points} points): its EOS check is '
                                'in sample; sample volumes off that grid (docs/campaigns.md)')
        return warnings

    def _sample_material(self, name: str, sampling: dict) -> dict:
        structure = self.inputs.structures[name]
        if sampling.get('supercell'):
            structure = make_supercell(structure, orm.List(sampling['supercell']),
                                       metadata={'call_link_label': f'supercell_{name}'})
        cells = {}
        if sampling.get('volumes'):
            scanned = scale_volume(structure, orm.List(sampling['volumes']),
                                   metadata={'call_link_label': f'volumes_{name}'})
            cells.update({f'{name}_volume_{i:02d}': (scanned[key], 'volume') for i, key in enumerate(sorted(scanned))})
        if sampling.get('rattle'):
            rattle = sampling['rattle']
            rattled = rattle_structure(structure, orm.Float(rattle['amplitude']), orm.Int(rattle['count']),
                                       orm.Int(rattle['seed']), metadata={'call_link_label': f'rattle_{name}'})
            cells.update({f'{name}_rattle_{i:02d}': (rattled[key], 'rattle') for i, key in enumerate(sorted(rattled))})
        if sampling.get('strains'):
            strained = strain_structure(structure, orm.List(sampling['strains']),
                                        metadata={'call_link_label': f'strains_{name}'})
            cells.update({f'{name}_strain_{i:02d}': (strained[key], 'strain') for i, key in enumerate(sorted(strained))})
        return cells

    def _evaluate_options(self) -> dict:
        return scheduler_options(self.inputs.get('evaluate_options'))

    def _dft_engine(self) -> AttributeDict:
        """The labels' DFT settings as the validation's DFT engine."""
        dft = AttributeDict(self.exposed_inputs(DftLabelingWorkChain, namespace='labeling'))
        for key in ('isolated_atoms', 'structure_overrides', 'isolated_atom_box'):
            dft.pop(key, None)
        return dft

    def _submit_references(self) -> dict:
        """The DFT reference of every class's validation (relaxation and properties; reference-only
        ValidationWorkChains: no model yet). It needs no model, so it runs while the training data are labeled and
        trained on, and is awaited only with the training: on a small machine its long jobs (the relaxation, then a
        phonon supercell) neither hold the training back nor sit alone on one core at the end. A refinement computes
        it itself, with its first training."""
        campaign = self._campaign()
        if not campaign.get('validation') or 'validation' not in self.inputs or self.should_refine():
            return {}
        inputs_by_label = {}
        for label, names in campaign['classes'].items():
            inputs = AttributeDict(self.exposed_inputs(ValidationWorkChain, namespace='validation'))
            inputs.structure = self.inputs.structures[names[0]]
            inputs.dft = self._dft_engine()
            inputs_by_label[label] = inputs
        return submit_references(self, inputs_by_label, 'concurrently with the labeling')

    def run_labeling(self):
        """One DftLabelingWorkChain per class, all with the same DFT settings, and the validation's DFT reference,
        launched together."""
        self._tick('labeling')
        self.ctx.update(self._submit_references())  # awaited with the training, not with the labels
        futures = {}
        for label, cells in self.ctx.cells.items():
            inputs = AttributeDict(self.exposed_inputs(DftLabelingWorkChain, namespace='labeling'))
            inputs.structures = cells
            inputs.config_types = orm.Dict(self.ctx.config_types[label])
            inputs.metadata = {'call_link_label': f'labeling_{label}'}
            node = self.submit(DftLabelingWorkChain, **inputs)
            self.report(f'labeling `{label}`: DftLabelingWorkChain<{node.pk}> for {len(cells)} cells')
            futures[f'labeling_{label}'] = node
        return ToContext(**futures)

    def inspect_labeling(self):
        failed, self.ctx.datasets = [], {}
        for label in self.ctx.cells:
            node = self.ctx[f'labeling_{label}']
            if not node.is_finished_ok or 'dataset' not in node.outputs:
                failed.append(f'{label} ({node.process_label}<{node.pk}> exit {node.exit_status}: {node.exit_message})')
                continue
            dataset = node.outputs.dataset
            self.ctx.datasets[label] = dataset
            self.out(f'datasets.{label}', dataset)
            self.report(f'class `{label}`: {dataset.n_frames} labeled frames, elements {", ".join(dataset.elements)}')
        if failed:
            return self.exit_codes.ERROR_LABELING_FAILED.format(classes='; '.join(failed))
        return None

    def _is_finetune(self) -> bool:
        return 'foundation_model' in self.inputs.training.training.mace

    def _merged_dataset(self):
        """The labels of all classes in one dataset (they share the DFT settings, so they merge)."""
        datasets = self.ctx.datasets
        if len(datasets) == 1:
            return next(iter(datasets.values()))
        return merge_datasets(**datasets, metadata={'call_link_label': 'merge_classes'})

    def should_refine(self) -> bool:
        return 'refinement' in self.inputs

    def run_refinement(self):
        """RefinementWorkChain on the labels of all classes, validated on each class's first material."""
        self._tick('refinement')
        self.ctx.dataset = self._merged_dataset()
        campaign = self._campaign()
        labeling = self._dft_engine()
        validation = AttributeDict(self.exposed_inputs(ValidationWorkChain, namespace='validation'))
        inputs = AttributeDict({
            **self.inputs.refinement.get_dict(),
            'dataset': self.ctx.dataset,
            'structures': {label: self.inputs.structures[names[0]] for label, names in campaign['classes'].items()},
            'training': self.exposed_inputs(TrainingWorkChain, namespace='training'),
            'labeling': labeling,
            'validation': validation,
            'evaluate_code': self.inputs.evaluate_code,
            'metadata': {'call_link_label': 'refinement'},
        })
        for key, node_type in (('max_iterations', orm.Int), ('max_new_labels', orm.Int), ('seed', orm.Int),
                               ('targets', orm.Dict), ('retrain', orm.Dict)):
            if key in inputs:
                inputs[key] = node_type(inputs[key])
        for key in ('md_code', 'evaluate_options'):
            if key in self.inputs:
                inputs[key] = self.inputs[key]
        node = self.submit(RefinementWorkChain, **inputs)
        self.report(f'refinement: RefinementWorkChain<{node.pk}> from {self.ctx.dataset.n_frames} frames of '
                    f'{len(self.ctx.datasets)} class(es)')
        return ToContext(training=node)

    def inspect_refinement(self):
        """The refined model and its last validation per class; a FAILED verdict is a result, not an error."""
        node = self.ctx.training
        if not node.is_finished_ok:
            return self.exit_codes.ERROR_REFINEMENT_FAILED.format(
                reason=f'{node.process_label}<{node.pk}> exit {node.exit_status}: {node.exit_message}')
        self.ctx.dataset = node.outputs.dataset
        for name, model in node.outputs.models.items():
            self.out(f'models.{name}', model)
        if 'test_metrics' in node.outputs:
            self.out('test_metrics', node.outputs.test_metrics)
        self.ctx.comparisons = dict(node.outputs.validation)
        for label, comparison in self.ctx.comparisons.items():
            self.out(f'validation.{label}', comparison)
        self.out('refinement', node.outputs.summary)
        summary = node.outputs.summary
        self.report(f'refinement: {"PASSED" if summary["passed"] else "FAILED"} ({summary["stop_reason"]}), '
                    f'{summary["new_labels"]} targeted DFT labels')
        return None

    def run_training(self):
        """The campaign model on the labels of all classes (merged: they share the DFT settings)."""
        self._tick('training')
        datasets = self.ctx.datasets
        dataset = self._merged_dataset()
        self.ctx.dataset = dataset
        inputs = AttributeDict(self.exposed_inputs(TrainingWorkChain, namespace='training'))
        inputs.dataset = dataset
        label = 'finetune' if self._is_finetune() else 'training'
        inputs.metadata = {'call_link_label': label}
        node = self.submit(TrainingWorkChain, **inputs)
        what = 'fine-tuning the foundation' if label == 'finetune' else 'training from scratch'
        self.report(f'{what}: TrainingWorkChain<{node.pk}> on {dataset.n_frames} frames of '
                    f'{len(datasets)} class(es), committee of {inputs.committee_size.value}')
        return ToContext(training=node, **{f'reference_{label}': self.ctx[f'reference_{label}']
                                           for label in self._campaign()['classes'] if f'reference_{label}' in self.ctx})

    def inspect_training(self):
        node = self.ctx.training
        if not node.is_finished_ok:
            return self.exit_codes.ERROR_TRAINING_FAILED.format(
                reason=f'{node.process_label}<{node.pk}> exit {node.exit_status}: {node.exit_message}')
        self.ctx.references, failed = collect_references(self.ctx, self._campaign()['classes'])
        if failed:
            return self.exit_codes.ERROR_VALIDATION_FAILED.format(classes=f'DFT reference of {"; ".join(failed)}')
        self.ctx.models = dict(node.outputs.models)
        for name, model in self.ctx.models.items():
            self.out(f'models.{name}', model)
        if 'test_metrics' in node.outputs:
            self.out('test_metrics', node.outputs.test_metrics)
        return None

    def should_compare(self) -> bool:
        campaign = self._campaign()
        return bool(campaign.get('validation') or campaign.get('transferability'))

    def _validation_inputs(self, label: str) -> AttributeDict:
        """Validation of the campaign model on the class's first material; the DFT reference uses the labels'
        settings."""
        campaign = self._campaign()
        inputs = AttributeDict(self.exposed_inputs(ValidationWorkChain, namespace='validation'))
        inputs.structure = self.inputs.structures[campaign['classes'][label][0]]
        inputs.mlip = {'code': self.inputs.evaluate_code, 'models': self.ctx.models,
                       'metadata': {'options': self._evaluate_options()}}
        if 'md_code' in self.inputs:
            inputs.md_code = self.inputs.md_code
        reference = self.ctx.get('references', {}).get(label, {})
        if reference:
            inputs.reference = reference
        relax = inputs.get('relax', orm.Bool(False)).value
        properties = inputs.get('properties', orm.List(['eos', 'elastic', 'phonons'])).get_list()
        if missing_reference(reference, properties, relax):
            inputs.dft = self._dft_engine()
        inputs.metadata = {'call_link_label': f'validation_{label}'}
        return inputs

    def run_validation(self):
        """Validation per class and the transferability matrix, launched together (both only need the labels
        and the campaign model)."""
        self._tick('validation')
        campaign = self._campaign()
        futures = {}
        if campaign.get('validation'):
            for label in campaign['classes']:
                node = self.submit(ValidationWorkChain, **self._validation_inputs(label))
                self.report(f'validation of `{label}` on {campaign["classes"][label][0]}: '
                            f'ValidationWorkChain<{node.pk}>')
                futures[f'validation_{label}'] = node
        if campaign.get('transferability'):
            futures['transferability'] = self._submit_transferability(campaign['transferability'])
        return ToContext(**futures)

    def _submit_transferability(self, settings: dict):
        """Per-class models (the campaign's training settings) scored on every class's test set. Its own test set per
        class replaces the test split: the per-class training splits only into train and valid."""
        training = AttributeDict(self.exposed_inputs(TrainingWorkChain, namespace='training'))
        training.pop('evaluate', None)
        fractions = training.split_fractions.get_dict()
        kept = fractions['train'] + fractions.get('valid', 0.0)
        training.split_fractions = orm.Dict({'train': fractions['train'] / kept,
                                             'valid': fractions.get('valid', 0.0) / kept, 'test': 0.0})
        inputs = AttributeDict({
            'datasets': self.ctx.datasets,
            'training': training,
            'evaluate': {'code': self.inputs.evaluate_code, 'metadata': {'options': self._evaluate_options()}},
            'seed': orm.Int(settings['seed']),
            'test_fraction': orm.Float(settings['test_fraction']),
            'train_all': orm.Bool(settings['train_all']),
            'leave_one_out': orm.Bool(settings['leave_one_out']),
            'metadata': {'call_link_label': 'transferability'},
        })
        if settings.get('validate'):
            validation = self._validation_inputs(next(iter(self.ctx.datasets)))
            inputs.validation_structures = {label: self.inputs.structures[names[0]]
                                            for label, names in self._campaign()['classes'].items()}
            inputs.validation = {key: value for key, value in validation.items()
                                 if key not in ('structure', 'mlip', 'metadata', 'reference')}
            inputs.validation.setdefault('dft', self._dft_engine())
        node = self.submit(TransferabilityWorkChain, **inputs)
        self.report(f'transferability of {len(self.ctx.datasets)} classes: TransferabilityWorkChain<{node.pk}>')
        return node

    def inspect_validation(self):
        campaign = self._campaign()
        failed, self.ctx.comparisons = [], {}
        for label in campaign['classes'] if campaign.get('validation') else []:
            node = self.ctx[f'validation_{label}']
            if not node.is_finished_ok or 'comparison' not in node.outputs:
                failed.append(f'{label} ({node.process_label}<{node.pk}> exit {node.exit_status})')
                continue
            self.ctx.comparisons[label] = node.outputs.comparison
            self.out(f'validation.{label}', node.outputs.comparison)
            verdict = node.outputs.comparison['verdict']
            self.report(f'validation `{label}`: {"PASSED" if verdict["passed"] else "FAILED"} '
                        f'({", ".join(verdict["failed"]) or "all checks"})')
        if 'transferability' in self.ctx:
            node = self.ctx.transferability
            if not node.is_finished_ok or 'matrix' not in node.outputs:
                return self.exit_codes.ERROR_TRANSFERABILITY_FAILED.format(
                    reason=f'{node.process_label}<{node.pk}> exit {node.exit_status}: {node.exit_message}')
            self.out('transferability', node.outputs.matrix)
        if failed:
            return self.exit_codes.ERROR_VALIDATION_FAILED.format(classes=', '.join(failed))
        return None

    def results(self):
        """The summary Dict: what was computed, with which DFT settings, the key numbers, and how long it took."""
        self._tick('done')
        campaign = self._campaign()
        datasets = self.ctx.datasets
        pw_nodes = [node for node in self.node.called_descendants if node.process_type == PW_PROCESS_TYPE]
        n_pw = len(pw_nodes)
        n_pw_cached = sum(1 for node in pw_nodes if node.base.caching.is_created_from_cache)
        system = self.inputs.labeling.pw_base.pw.parameters['SYSTEM']
        summary = {
            'campaign': campaign['name'],
            'classes': {label: {'materials': names, 'n_frames': datasets[label].n_frames,
                                'elements': datasets[label].elements} for label, names in campaign['classes'].items()},
            'n_pw_calculations': n_pw,         # every PwCalculation of the campaign ...
            'n_pw_cached': n_pw_cached,        # ... of which reused from the cache (pw.x did not run)
            'fingerprint_hash': self.ctx.dataset.base.attributes.get('fingerprint_hash'),
            'dft': {'pseudo_family': self.inputs.labeling.pseudo_family.value, 'ecutwfc': system['ecutwfc'],
                    'ecutrho': system['ecutrho'],
                    'kpoints_distance': self.inputs.labeling.pw_base.kpoints_distance.value
                    if 'kpoints_distance' in self.inputs.labeling.pw_base else None},
            'training': {'mode': 'finetune' if self._is_finetune() else 'scratch',
                         'committee_size': self.inputs.training.committee_size.value,
                         'n_frames': self.ctx.dataset.n_frames},
            'timings_s': dict(self.ctx.timings),
            'wall_s': round(time.time() - self.node.ctime.timestamp(), 1),
        }
        if 'test_metrics' in self.ctx.training.outputs:
            summary['test'] = test_errors(self.ctx.training.outputs.test_metrics.get_dict())
        summary['validation'] = {label: validation_key_errors(node.get_dict())
                                 for label, node in self.ctx.comparisons.items()}
        summary['warnings'] = list(self.ctx.warnings)
        if 'refinement' in self.outputs:
            refinement = self.outputs['refinement'].get_dict()
            summary['refinement'] = {key: refinement.get(key) for key in
                                     ('passed', 'stop_reason', 'n_iterations', 'new_labels', 'seed_frames')}
        if 'transferability' in self.ctx and self.ctx.transferability.is_finished_ok:
            matrix = self.ctx.transferability.outputs.matrix.get_dict()
            summary['transferability'] = {key: matrix.get(key) for key in
                                          ('models', 'classes', 'forces_rmse_mev_per_a', 'out_of_class_ratio')}
        self.out('summary', orm.Dict(summary).store())
        self.report(f'campaign `{campaign["name"]}` done in {summary["wall_s"]:.0f} s: '
                    f'{n_pw} pw.x calculations ({n_pw - n_pw_cached} ran, {n_pw_cached} from the cache), '
                    f'timings {summary["timings_s"]}')

