"""``mlip.validation``: the same property workflows with the MLIP and with DFT, compared and judged.

For every chosen property (EOS, elastic tensor, phonons) the property WorkChain runs once with the ``mlip``
engine and once with the ``dft`` engine, unless the DFT result is given as ``reference`` (e.g. the ``dft``
outputs of an earlier validation: DFT is the expensive part, compute it once). With caching enabled for
``quantumespresso.pw`` a rerun reuses identical pw.x runs anyway.

With ``relax`` the structure is first relaxed with DFT (pw.x vc-relax, the labels' settings) and every property of
both engines is computed on the DFT-relaxed structure (output ``dft.relaxed_structure``; given as
``reference.relaxed_structure`` it is reused and no pw.x runs): the validation then sits at the DFT minimum, not at
a cell the user guessed (a guessed cell 2 % off put the DFT V0 on the edge of the scan and C on a compressed cell).

Without ``mlip`` only the DFT side runs (relaxation and reference properties, outputs ``dft.*``, no comparison): the
campaign computes the reference that way while the training data are still being labeled, and passes it on.
"""
from __future__ import annotations

import io
import math

import numpy as np
from aiida import orm
from aiida.common import AttributeDict
from aiida.engine import ToContext, WorkChain, calcfunction, if_
from aiida.plugins import CalculationFactory, WorkflowFactory

from aiida_mlip.analysis.validation import compare_elastic_results, compare_eos, compare_phonons, verdict
from aiida_mlip.calculations.engine_job import scheduler_options
from aiida_mlip.protocols import ProtocolMixin, validation_threshold_names
from aiida_mlip.workflows.labeling import DftLabelingWorkChain
from aiida_mlip.workflows.properties.engine import dft_relax_inputs, dft_relaxed_structure

MlipEvaluateCalculation = CalculationFactory('mlip.evaluate')
PROPERTY_WORKFLOWS = {
    'eos': WorkflowFactory('mlip.eos'),
    'elastic': WorkflowFactory('mlip.elastic'),
    'phonons': WorkflowFactory('mlip.phonons'),
}
#: Per property: the outputs compared and passed as ``reference`` (reference port name -> workflow output).
MdStabilityWorkChain = WorkflowFactory('mlip.md_stability')
#: Model-only checks: no DFT counterpart, the verdict is the model's own.
MODEL_ONLY = {'md_stability': MdStabilityWorkChain}
REFERENCE_OUTPUTS = {
    'eos': {'eos': 'eos', 'eos_curve': 'curve'},
    'elastic': {'elastic': 'elastic'},
    'phonons': {'phonon_bands': 'band_structure', 'phonon_dos': 'dos', 'phonon_summary': 'phonon_summary'},
}
#: The threshold names accepted: those of the protocol file's defaults (docs/validation.md).
THRESHOLD_KEYS = validation_threshold_names()


def bands_arrays(bands: orm.BandsData):
    """(path distances, frequencies (n_q, n_branches), [(distance, label)]) of a BandsData."""
    frequencies = bands.get_bands()
    try:
        kpoints = bands.get_kpoints(cartesian=True)
    except AttributeError:
        kpoints = bands.get_kpoints()
    steps = np.linalg.norm(np.diff(kpoints, axis=0), axis=1)
    distances = np.concatenate([[0.0], np.cumsum(steps)])
    ticks = [(float(distances[index]), label) for index, label in (bands.labels or [])]
    return distances, frequencies, ticks


def _png_node(content: bytes, filename: str) -> orm.SinglefileData:
    return orm.SinglefileData(io.BytesIO(content), filename=filename)


@calcfunction
def compare_properties(thresholds: orm.Dict, model_failures: orm.Dict, **results) -> orm.Dict:
    """Model vs DFT errors per property and the pass/fail verdict; ``results`` are ``mlip_*``/``dft_*`` nodes.

    ``model_failures`` maps a property the model could not produce (e.g. no EOS minimum) to the reason: a
    failed check, not a crash.
    """
    comparison = {name: {'model_failed': reason} for name, reason in model_failures.get_dict().items()}
    if 'mlip_eos' in results and 'dft_eos' in results:
        comparison['eos'] = compare_eos(results['mlip_eos'].get_dict(), results['dft_eos'].get_dict())
    if 'mlip_elastic' in results and 'dft_elastic' in results:
        comparison['elastic'] = compare_elastic_results(results['mlip_elastic'].get_dict(),
                                                        results['dft_elastic'].get_dict())
    if 'mlip_phonon_bands' in results and 'dft_phonon_bands' in results:
        dos = {engine: (results[f'{engine}_phonon_dos'].get_x()[1], results[f'{engine}_phonon_dos'].get_y()[0][1])
               for engine in ('mlip', 'dft') if f'{engine}_phonon_dos' in results}
        summaries = {engine: results[f'{engine}_phonon_summary'].get_dict()
                     for engine in ('mlip', 'dft') if f'{engine}_phonon_summary' in results}
        comparison['phonons'] = compare_phonons(
            results['mlip_phonon_bands'].get_bands(), results['dft_phonon_bands'].get_bands(),
            dos.get('mlip'), dos.get('dft'), summaries.get('mlip'), summaries.get('dft'))
    if 'mlip_md_stability' in results:
        stability = results['mlip_md_stability'].get_dict()
        comparison['md_stability'] = {'unstable': not stability['stable'], 'reasons': stability.get('reasons', []),
                                      'drift_mev_per_atom_ps': stability['drift_mev_per_atom_per_ps']}
    comparison['verdict'] = verdict(comparison, thresholds.get_dict())
    return orm.Dict(_jsonable(comparison))


@calcfunction
def validation_figures(**results) -> dict:
    """PNG figures as nodes: EOS overlay, phonon band overlay, Cij parity (where both engines have the data)."""
    from aiida_mlip.report import figures

    outputs = {}
    if 'mlip_eos_curve' in results and 'dft_eos_curve' in results:
        curves = {engine: (results[f'{engine}_eos_curve'].get_array('volumes'),
                           results[f'{engine}_eos_curve'].get_array('energies')) for engine in ('dft', 'mlip')}
        fits = {engine: results[f'{engine}_eos'].get_dict() for engine in ('dft', 'mlip')}
        outputs['eos_overlay'] = _png_node(figures.eos_overlay(curves, fits), 'eos_overlay.png')
    if 'mlip_phonon_bands' in results and 'dft_phonon_bands' in results:
        distances, dft_bands, ticks = bands_arrays(results['dft_phonon_bands'])
        bands = {'dft': dft_bands, 'mlip': results['mlip_phonon_bands'].get_bands()}
        outputs['phonon_bands'] = _png_node(figures.band_overlay(distances, bands, ticks), 'phonon_bands.png')
    if 'mlip_elastic' in results and 'dft_elastic' in results:
        reference = np.array(results['dft_elastic']['elastic_tensor_gpa'])
        model = np.array(results['mlip_elastic']['elastic_tensor_gpa'])
        mask = np.abs(reference) > 1.0  # the non-zero constants
        outputs['cij_parity'] = _png_node(figures.parity(reference[mask], model[mask], 'Cij', 'GPa'),
                                          'cij_parity.png')
    return outputs


def _jsonable(value):
    """Plain JSON types; NaN and inf become None (the database stores neither; the verdict has judged them)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, (np.floating, np.integer, np.bool_)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def validate_thresholds(thresholds, _):
    """Refuse unknown names (a misspelt threshold would silently skip its check), non-numbers, negative limits."""
    values = thresholds.get_dict()
    unknown = sorted(set(values) - set(THRESHOLD_KEYS))
    if unknown:
        return f'unknown thresholds {unknown}; the known ones are {", ".join(THRESHOLD_KEYS)}'
    for name, limit in values.items():
        if isinstance(limit, bool) or not isinstance(limit, (int, float)) or not math.isfinite(limit):
            return f'threshold `{name}` must be a finite number, got {limit!r}'
        if name == 'dos_spearman' and not -1.0 <= limit <= 1.0:
            return f'threshold `dos_spearman` is a rank correlation and must be in [-1, 1], got {limit}'
        if name != 'dos_spearman' and limit < 0:
            return f'threshold `{name}` must not be negative (errors are judged by magnitude), got {limit}'
    return None


def validate_inputs(inputs, _):
    properties = inputs['properties'].get_list()
    allowed = sorted(PROPERTY_WORKFLOWS) + sorted(MODEL_ONLY)
    unknown = set(properties) - set(allowed)
    if unknown or not properties:
        return f'properties must be a non-empty subset of {allowed}, got {properties}'
    if 'md_stability' in properties and 'md_code' not in inputs and inputs.get('mlip'):
        return 'md_stability needs `md_code` (an `mlip.md` code, created by `aiida-mlip setup`)'
    if not inputs.get('mlip') and not inputs.get('dft'):
        return 'give the `mlip` engine (the model to validate), the `dft` engine (the DFT reference alone), or both'
    reference = inputs.get('reference', {})
    missing = [p for p in properties if p in PROPERTY_WORKFLOWS
               and not all(port in reference for port in REFERENCE_OUTPUTS[p])]
    if missing and not inputs.get('dft'):
        return f'no DFT engine (`dft`) and no complete `reference` for {missing}'
    if inputs['relax'].value and 'relaxed_structure' not in reference and not inputs.get('dft'):
        return '`relax` needs the DFT engine (`dft`) or the DFT-relaxed structure as `reference.relaxed_structure`'
    return None


def submit_references(process, inputs_by_label: dict, when: str) -> dict:
    """From ``process``, one ValidationWorkChain without a model (the DFT reference alone) per label, linked as
    ``reference_<label>``; returns them as futures under those names."""
    futures = {}
    for label, inputs in inputs_by_label.items():
        inputs.metadata = {'call_link_label': f'reference_{label}'}
        node = process.submit(ValidationWorkChain, **inputs)
        process.report(f'DFT reference of `{label}` on {inputs.structure.get_formula()}: ValidationWorkChain<{node.pk}> '
                       f'(no model: DFT only, {when})')
        futures[f'reference_{label}'] = node
    return futures


def collect_references(ctx, labels) -> tuple:
    """Pop the ``reference_<label>`` workflows of :func:`submit_references` from ``ctx``: ({label: {port: node}} of
    those that finished, [failure descriptions of those that did not])."""
    references, failed = {}, []
    for label in labels:
        node = ctx.pop(f'reference_{label}', None)
        if node is None:
            continue
        if not node.is_finished_ok or 'dft' not in node.outputs:
            failed.append(f'`{label}`: {node.process_label}<{node.pk}> exit {node.exit_status}: {node.exit_message}')
            continue
        references[label] = dict(node.outputs.dft)
    return references, failed


class ValidationWorkChain(ProtocolMixin, WorkChain):
    """Validate a model against DFT on equation of state, elastic tensor and phonons of one structure."""

    _protocol_name = 'validation'

    @classmethod
    def define(cls, spec):
        super().define(spec)
        spec.input('structure', valid_type=orm.StructureData, help='The (relaxed) structure to validate on.')
        spec.input('properties', valid_type=orm.List, default=lambda: orm.List(['eos', 'elastic', 'phonons']),
                   help='Which properties to compare: any of eos, elastic, phonons, and md_stability (model only).')
        spec.input('md_code', valid_type=orm.AbstractCode, required=False,
                   help='The `mlip.md` code for md_stability; the models are those of `mlip`.')
        spec.input('thresholds', valid_type=orm.Dict, validator=validate_thresholds,
                   help=f'Pass/fail limits, any of {", ".join(THRESHOLD_KEYS)}; a check without its limit is '
                        'skipped (docs/validation.md gives their sources).')
        spec.expose_inputs(MlipEvaluateCalculation, namespace='mlip', exclude=('structures', 'dataset'),
                           namespace_options={'required': False, 'populate_defaults': False,
                                              'help': 'The model (or committee) and the evaluation code; without '
                                                      'it only the DFT reference is computed (outputs `dft.*`).'})
        spec.expose_inputs(DftLabelingWorkChain, namespace='dft',
                           exclude=('structures', 'config_types', 'isolated_atoms'),
                           namespace_options={'required': False, 'populate_defaults': False,
                                              'help': 'DFT engine; not needed for properties given in `reference`.'})
        spec.input_namespace('reference', required=False, populate_defaults=False,
                             help='DFT results of an earlier run (its `dft` outputs): skips those DFT calculations.')
        for ports in REFERENCE_OUTPUTS.values():
            for port in ports:
                spec.input(f'reference.{port}', valid_type=orm.Data, required=False)
        spec.input('reference.relaxed_structure', valid_type=orm.StructureData, required=False,
                   help='The DFT-relaxed structure of an earlier validation (`dft.relaxed_structure`): with `relax`, '
                        'used instead of a new DFT relaxation.')
        spec.input('relax', valid_type=orm.Bool, default=lambda: orm.Bool(False),
                   help='Relax `structure` with DFT first (positions and cell, pw.x vc-relax with the labels\' '
                        'settings) and compute every property of both engines on the DFT-relaxed structure.')
        spec.input('relax_fmax', valid_type=orm.Float, default=lambda: orm.Float(0.005),
                   help='With `relax`: force threshold (eV/Å) of the DFT relaxation (pw.x forc_conv_thr).')
        for name, workflow in PROPERTY_WORKFLOWS.items():
            spec.expose_inputs(workflow, namespace=name, exclude=('structure', 'dft', 'mlip'),
                               namespace_options={'required': False, 'populate_defaults': True,
                                                  'help': f'Settings of the {name} workflow.'})
            spec.inputs[name].validator = None  # the engine is added at launch, where the workflow validates
        spec.expose_inputs(MdStabilityWorkChain, namespace='md_stability', exclude=('structure', 'mlip'),
                           namespace_options={'required': False, 'populate_defaults': True,
                                              'help': 'Settings of the MD stability check.'})
        spec.inputs['md_stability'].validator = None
        spec.inputs.validator = validate_inputs
        spec.outline(
            if_(cls.should_relax)(cls.run_relax, cls.inspect_relax),
            cls.run_properties, cls.inspect_properties, cls.compare,
        )
        for engine in ('mlip', 'dft'):
            for ports in REFERENCE_OUTPUTS.values():
                for port in ports:
                    spec.output(f'{engine}.{port}', valid_type=orm.Data, required=False)
        spec.output('mlip.md_stability', valid_type=orm.Dict, required=False, help='The MD stability verdict.')
        spec.output('dft.relaxed_structure', valid_type=orm.StructureData, required=False,
                    help='With `relax`: the DFT-relaxed structure every property was computed on.')
        spec.output('comparison', valid_type=orm.Dict, required=False,
                    help='Errors per property and the verdict (passed, failed); absent without `mlip`.')
        spec.output_namespace('figures', valid_type=orm.SinglefileData, dynamic=True, help='PNG figures.')
        spec.exit_code(420, 'ERROR_PROPERTY_FAILED', message='Property workflows failed: {failed}')
        spec.exit_code(421, 'ERROR_RELAX_FAILED', message='The DFT relaxation of the structure failed: {reason}')

    @classmethod
    def get_builder_from_protocol(cls, evaluate_code, models, structure, protocol=None, overrides=None,
                                  pw_code=None, pseudo_family=None, dft_overrides=None, md_code=None, **kwargs):
        """Builder validating ``models`` (an MlipModel, or a dict of them for a committee) on ``structure``.

        :param pw_code: the pw.x code of the DFT engine (omit when all DFT results come as ``reference``).
        :param md_code: the ``mlip.md`` code, needed when the properties include md_stability.
        :param dft_overrides: overrides of ``DftLabelingWorkChain.get_builder_from_protocol`` (e.g. ``pw_base``).
        """
        inputs = cls.get_protocol_inputs(protocol, overrides)
        builder = cls.get_builder()
        builder.structure = structure
        builder.properties = orm.List(inputs['properties'])
        builder.thresholds = orm.Dict(inputs['thresholds'])
        builder.relax = orm.Bool(inputs.get('relax', False))
        builder.mlip.code = orm.load_code(evaluate_code) if isinstance(evaluate_code, str) else evaluate_code
        builder.mlip.models = models if isinstance(models, dict) else {'model': models}
        builder.mlip.metadata = {'options': {'resources': {'num_machines': 1, 'num_mpiprocs_per_machine': 1}}}
        if md_code is not None:
            builder.md_code = orm.load_code(md_code) if isinstance(md_code, str) else md_code
        for key, value in inputs.get('md_stability', {}).items():
            builder.md_stability[key] = orm.List(value) if isinstance(value, list) else (
                orm.Float(value) if isinstance(value, float) else orm.Int(value))
        for name in PROPERTY_WORKFLOWS:
            for key, value in inputs.get(name, {}).items():
                builder[name][key] = orm.List(value) if isinstance(value, list) else (
                    orm.Float(value) if isinstance(value, float) else orm.Int(value))
        if pw_code is not None:
            dft = DftLabelingWorkChain.get_builder_from_protocol(
                pw_code, [structure], protocol=protocol, pseudo_family=pseudo_family, overrides=dft_overrides,
                **kwargs)
            inputs_dft = dft._inputs(prune=True)  # noqa: SLF001  (a nested builder is reused as a namespace)
            for key in ('structures', 'isolated_atoms', 'config_types'):
                inputs_dft.pop(key, None)
            builder.dft = inputs_dft
        return builder

    def _needs_dft(self, name: str) -> bool:
        reference = self.inputs.get('reference', {})
        return not all(port in reference for port in REFERENCE_OUTPUTS[name])

    def should_relax(self) -> bool:
        return self.inputs.relax.value

    def run_relax(self):
        """One pw.x vc-relax of ``structure``, unless the DFT-relaxed structure came as ``reference``."""
        if 'relaxed_structure' in self.inputs.get('reference', {}):
            return None
        from aiida_quantumespresso.workflows.pw.base import PwBaseWorkChain

        inputs = dft_relax_inputs(self.exposed_inputs(DftLabelingWorkChain, namespace='dft'), self.inputs.structure,
                                  True, self.inputs.relax_fmax.value, 100)
        inputs.metadata = {'call_link_label': 'relax_dft'}
        node = self.submit(PwBaseWorkChain, **inputs)
        self.report(f'launched PwBaseWorkChain<{node.pk}> to relax positions and cell with DFT')
        return ToContext(relaxation=node)

    def inspect_relax(self):
        """The DFT-relaxed structure becomes the validated one (output ``dft.relaxed_structure``)."""
        reference = self.inputs.get('reference', {})
        if 'relaxed_structure' in reference:
            structure = reference['relaxed_structure']
        else:
            structure, reason = dft_relaxed_structure(self.ctx.relaxation, self.report)
            if structure is None:
                return self.exit_codes.ERROR_RELAX_FAILED.format(reason=reason)
        self.ctx.structure = structure
        self.out('dft.relaxed_structure', structure)
        volumes = [s.get_cell_volume() / len(s.sites) for s in (self.inputs.structure, structure)]
        self.report(f'validated structure: the DFT-relaxed one, volume {volumes[0]:.3f} -> {volumes[1]:.3f} Å³/atom')
        return None

    def has_model(self) -> bool:
        """False in the reference-only mode (no `mlip` engine): the DFT side alone runs."""
        return bool(self.inputs.get('mlip'))

    @property
    def validated_structure(self) -> orm.StructureData:
        """The DFT-relaxed structure with ``relax``, else the input ``structure``."""
        return self.ctx.get('structure') or self.inputs.structure

    def run_properties(self):
        """Every property with the MLIP engine, and with DFT where no reference was given; all concurrently."""
        futures = {}
        if 'md_stability' in self.inputs.properties.get_list() and self.has_model():
            inputs = AttributeDict(self.exposed_inputs(MdStabilityWorkChain, namespace='md_stability'))
            inputs.structure = self.validated_structure
            inputs.mlip = {'code': self.inputs.md_code, 'models': self.inputs.mlip.models,
                           'metadata': {'options': scheduler_options(self.inputs.mlip.get('metadata', {}).get('options'))}}
            inputs.metadata = {'call_link_label': 'md_stability_mlip'}
            futures['md_stability_mlip'] = self.submit(MdStabilityWorkChain, **inputs)
        for name in self.inputs.properties.get_list():
            if name in MODEL_ONLY:
                continue
            workflow = PROPERTY_WORKFLOWS[name]
            engines = (['mlip'] if self.has_model() else []) + (['dft'] if self._needs_dft(name) else [])
            for engine in engines:
                inputs = AttributeDict(self.exposed_inputs(workflow, namespace=name))
                inputs.structure = self.validated_structure
                inputs[engine] = self.inputs[engine]
                inputs.metadata = {'call_link_label': f'{name}_{engine}'}
                futures[f'{name}_{engine}'] = self.submit(workflow, **inputs)
                self.report(f'launched {workflow.__name__}<{futures[f"{name}_{engine}"].pk}> ({engine})')
        return ToContext(**futures)

    def inspect_properties(self):
        """Collect each engine's results (from the runs or the reference) under ``mlip.*`` and ``dft.*``."""
        self.ctx.results, failed, self.ctx.model_failures = {}, [], {}
        if 'md_stability_mlip' in self.ctx:
            node = self.ctx.md_stability_mlip
            if node.is_finished_ok:
                self.ctx.results['mlip_md_stability'] = node.outputs.stability
                self.out('mlip.md_stability', node.outputs.stability)
            else:
                failed.append(f'md_stability ({node.process_label}<{node.pk}> exit {node.exit_status})')
        for name in self.inputs.properties.get_list():
            if name in MODEL_ONLY:
                continue
            for engine in ('mlip', 'dft') if self.has_model() else ('dft',):
                key = f'{name}_{engine}'
                if key not in self.ctx:
                    for port in REFERENCE_OUTPUTS[name]:
                        self.ctx.results[f'{engine}_{port}'] = self.inputs.reference[port]
                    continue
                node = self.ctx[key]
                if engine == 'mlip' and node.exit_status is not None and 500 <= node.exit_status < 600:
                    self.ctx.model_failures[name] = f'{node.process_label}<{node.pk}>: {node.exit_message}'
                    continue
                if not node.is_finished_ok:
                    failed.append(f'{key} ({node.process_label}<{node.pk}> exit {node.exit_status})')
                    continue
                for port, output in REFERENCE_OUTPUTS[name].items():
                    self.ctx.results[f'{engine}_{port}'] = node.outputs[output]
        for key, node in self.ctx.results.items():
            engine, port = key.split('_', 1)
            if port == 'md_stability':
                continue
            self.out(f'{engine}.{port}', node)
        if failed:
            return self.exit_codes.ERROR_PROPERTY_FAILED.format(failed=', '.join(failed))
        return None

    def compare(self):
        if not self.has_model():
            self.report('no model given: the DFT reference alone was computed (outputs `dft.*`)')
            return
        comparison = compare_properties(self.inputs.thresholds, orm.Dict(self.ctx.model_failures), **self.ctx.results,
                                        metadata={'call_link_label': 'compare'})
        self.out('comparison', comparison)
        figures = validation_figures(**self.ctx.results, metadata={'call_link_label': 'figures'})
        for name, node in figures.items():
            self.out(f'figures.{name}', node)
        result = comparison['verdict']
        self.report(f'validation {"PASSED" if result["passed"] else "FAILED"}: {result["failed"] or "all checks"}')
