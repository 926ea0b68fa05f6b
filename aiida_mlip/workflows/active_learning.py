"""``mlip.active_learning``: active learning by committee (docs/sources.md, "Active learning by committee").

One iteration composes the existing building blocks, every step an AiiDA process so that each new label can be
traced back to the MD frame and the committee that asked for it::

    TrainingWorkChain (committee of N >= 3 MACE models on the current dataset, scored on its test split)
      -> ONE MlipMdCalculation: NVT with the committee for every starting cell (x volume strain) x temperature
      -> select_md_frames (calcfunction): trust window on the per-frame max force deviation, farthest-point
         sampling for diversity (aiida_mlip.analysis.selection) -> candidate StructureData + selection Dict
      -> DftLabelingWorkChain (pw.x) on the candidates
      -> merge_datasets (calcfunction): current dataset + new frames
      -> ONE MlipEvaluateCalculation: the committee that selected the frames on their new DFT labels
      -> committee_calibration (calcfunction): Spearman(deviation, true max force error) and calibration curve
      -> TrainingWorkChain on the merged dataset (skipped after the last iteration if retrain_at_end is False)

The loop stops when the exploration is converged (fewer than ``min_candidate_fraction`` of the explored frames
inside the window, and fewer than that beyond it: see :func:`aiida_mlip.analysis.selection.exploration_verdict`)
or after ``max_iterations`` explorations. A converged exploration in the first iteration -- no candidates at all --
is a normal stop with exit status 0: the seed committee is already confident everywhere the exploration went.
"""
from __future__ import annotations

import math

import numpy as np
from aiida import orm
from aiida.common import AttributeDict
from aiida.engine import ToContext, WorkChain, calcfunction, if_, while_
from aiida.plugins import DataFactory

from aiida_mlip.analysis.selection import (
    BELOW, CLASSES, DEFAULT_CALIBRATION_BINS, DEFAULT_R_MAX, INVALID, MIN_CALIBRATION_FRAMES, WINDOW,
    atoms_descriptors, calibration_summary, exploration_verdict, max_force_error, select_candidates,
    trust_window_problem,
)
from aiida_mlip.calculations.datasets import merge_datasets
from aiida_mlip.calculations.evaluate import MlipEvaluateCalculation, check_models_cover
from aiida_mlip.calculations.md import MlipMdCalculation
from aiida_mlip.calculations.sampling import scale_volume
from aiida_mlip.protocols import ProtocolMixin
from aiida_mlip.workflows.checks import code_problem, elements_of, structures_problem
from aiida_mlip.workflows.labeling import DftLabelingWorkChain, family_problem, load_pseudo_family
from aiida_mlip.workflows.loop_helpers import md_run_outputs, test_errors
from aiida_mlip.workflows.training import TrainingWorkChain
from aiida_mlip.workflows.training import validate_inputs as validate_training_inputs

TrainingSet = DataFactory('mlip.dataset')
MlipModel = DataFactory('mlip.model')

#: docs/sources.md: committees of ~4; with fewer than 3 members a standard deviation is too noisy to rank frames.
MIN_COMMITTEE_SIZE = 3
#: Labeling inputs the workflow sets itself (keys only known at run time; the seed data already hold any E0s).
LABELING_PORTS_SET_BY_WORKFLOW = ('structures', 'config_types', 'structure_overrides', 'isolated_atoms',
                                  'isolated_atom_box')
#: MD inputs the workflow sets itself.
MD_PORTS_SET_BY_WORKFLOW = ('code', 'models', 'structure', 'structures', 'seed', 'ensemble', 'remote_folder')
#: Settings of the seed dataset's DFT fingerprint that the labeling inputs must reproduce (merge_datasets refuses
#: datasets labeled differently, so a mismatch is refused before any compute is spent).
FINGERPRINT_SYSTEM_KEYS = ('ecutwfc', 'ecutrho', 'occupations', 'smearing', 'degauss', 'nspin')


def _value(node):
    return node.value if isinstance(node, orm.BaseType) else node


def _finite_or_none(value):
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def validate_training(value, _=None):
    """The exposed TrainingWorkChain inputs (without the dataset): a committee of at least 3 members."""
    if value is None or 'committee_size' not in value:
        return None
    size = int(value['committee_size'].value)
    if size < MIN_COMMITTEE_SIZE:
        return (f'training.committee_size is {size}: active learning by committee needs committee_size >= '
                f'{MIN_COMMITTEE_SIZE} (docs/sources.md: ~4) to estimate a deviation per frame')
    return None


def validate_structures(value, _=None):
    return structures_problem(dict(value or {}))


def _equal(first, second) -> bool:
    if isinstance(first, (int, float)) and isinstance(second, (int, float)):
        return math.isclose(float(first), float(second), rel_tol=1e-9, abs_tol=1e-12)
    return first == second


def labeling_fingerprint_problem(dataset, labeling) -> str | None:
    """Would frames labeled with ``labeling`` inputs merge with ``dataset``? Compares what both sides know."""
    fingerprint = dataset.fingerprint or {}
    if not fingerprint or 'ecutwfc' not in fingerprint:
        return None  # not a DFT-labeled dataset (e.g. made by hand): merge_datasets will judge
    pw_base = labeling.get('pw_base', {})
    parameters = pw_base['pw']['parameters'].get_dict() if 'parameters' in pw_base.get('pw', {}) else {}
    system = parameters.get('SYSTEM', {})
    differences = []
    for key in FINGERPRINT_SYSTEM_KEYS:
        ours = system.get(key, 1 if key == 'nspin' else None)
        if key in fingerprint and not _equal(ours, fingerprint.get(key)):
            differences.append(f'{key}: {ours!r} (labeling) != {fingerprint.get(key)!r} (dataset)')
    distance = pw_base.get('kpoints_distance')
    if 'kpoints_distance' in fingerprint and fingerprint['kpoints_distance'] is not None:
        ours = _value(distance) if distance is not None else None
        if not _equal(ours, fingerprint['kpoints_distance']):
            differences.append(f'kpoints_distance: {ours!r} (labeling) != {fingerprint["kpoints_distance"]!r} '
                               '(dataset)')
    family = labeling.get('pseudo_family')
    if family is not None and fingerprint.get('pseudos'):
        try:
            group = load_pseudo_family(family.value)
        except ValueError:
            group = None  # reported by the family check
        if group is not None:
            for element, md5 in fingerprint['pseudos'].items():
                if element in group.elements and group.get_pseudo(element).md5 != md5:
                    differences.append(f'pseudopotential of {element} differs from the one of the dataset')
    if differences:
        return ('the labeling settings differ from the DFT settings of the seed dataset, so the new frames could '
                f'not be merged with it: {"; ".join(differences)}')
    return None


def validate_inputs(inputs, ctx=None):
    """Everything that can be checked before compute is spent."""
    required = ('dataset', 'structures', 'training', 'labeling', 'exploration', 'evaluate', 'md_code',
                'trust_window')
    if ctx is not None and any(name not in ctx for name in required):
        return None  # exposed inside another workflow with some ports excluded
    problem = trust_window_problem(inputs['trust_window'].get_list())
    if problem:
        return problem
    if int(inputs['max_candidates_per_iteration'].value) < 1:
        return f'max_candidates_per_iteration must be >= 1, got {inputs["max_candidates_per_iteration"].value}'
    fraction = float(inputs['min_candidate_fraction'].value)
    if not 0 <= fraction <= 1:
        return f'min_candidate_fraction must lie in [0, 1], got {fraction}'
    if int(inputs['max_iterations'].value) < 1:
        return f'max_iterations must be >= 1, got {inputs["max_iterations"].value}'
    if 'energy_threshold' in inputs and not float(inputs['energy_threshold'].value) > 0:
        return f'energy_threshold (eV/atom) must be > 0, got {inputs["energy_threshold"].value}'
    if not float(inputs['descriptor_r_max'].value) > 0:
        return f'descriptor_r_max must be > 0 Å, got {inputs["descriptor_r_max"].value}'
    strains = inputs['exploration'].get('strains')
    if strains is not None:
        values = strains.get_list()
        if not values or any(isinstance(s, bool) or not isinstance(s, (int, float)) or not -1 < s < 1
                             for s in values):
            return f'exploration.strains must be a non-empty list of volume strains in (-1, 1), got {values}'

    dataset = inputs['dataset']
    problem = validate_training_inputs({**inputs['training'], 'dataset': dataset}, None)
    if problem:
        return f'training: {problem}'
    structures = dict(inputs['structures'])
    missing = sorted(elements_of(structures.values()) - set(dataset.elements))
    if missing:
        return (f'the starting structures contain {", ".join(missing)}, absent from the seed dataset (elements '
                f'{", ".join(dataset.elements)}): the committee cannot explore an element it was never trained on')

    problem = code_problem(inputs['md_code'], 'mlip.md', 'the exploration MD')
    if problem:
        return problem
    problem = code_problem(inputs['evaluate'].get('code'), 'mlip.evaluate', 'the calibration')
    if problem:
        return problem
    labeling = inputs['labeling']
    problem = code_problem(labeling['pw_base']['pw'].get('code'), 'quantumespresso.pw', 'DFT labeling')
    if problem:
        return problem
    problem = family_problem(labeling['pseudo_family'].value, elements_of(structures.values()))
    if problem:
        return problem
    return labeling_fingerprint_problem(dataset, labeling)


# ---- calcfunctions: every number the loop decides on is a node with a creator --------------------------------


def _run_frames(summary: dict, runs: dict):
    """Flatten the saved MD frames of all runs: per frame (run entry, frame index, arrays)."""
    frames = []
    for run in summary['runs']:
        key = run['key']
        trajectory, thermo = runs[f'trajectory_{key}'], runs[f'thermo_{key}']
        names = thermo.get_arraynames()
        positions = trajectory.get_array('positions')
        cells = trajectory.get_array('cells')
        steps = thermo.get_array('step')
        n = len(positions)
        deviation = thermo.get_array('max_force_deviation') if 'max_force_deviation' in names else np.full(n, np.nan)
        energy_std = thermo.get_array('energy_std') if 'energy_std' in names else np.full(n, np.nan)
        symbols = trajectory.symbols
        pbc = list(trajectory.pbc) if trajectory.pbc is not None else [True, True, True]
        for index in range(n):
            frames.append({
                'run': run, 'frame': index, 'step': int(steps[index]), 'symbols': symbols, 'pbc': pbc,
                'positions': positions[index], 'cell': cells[index], 'deviation': float(deviation[index]),
                'energy_std_per_atom': float(energy_std[index]) / len(symbols),
            })
    return frames


@calcfunction
def select_md_frames(parameters: orm.Dict, summary: orm.Dict, **runs) -> dict:
    """Candidates for DFT from the saved frames of an ``mlip.md`` committee run (one calcfunction, all runs).

    ``parameters``: ``trust_window`` [lo, hi] (eV/Å), ``max_candidates``, ``seed``, ``min_candidate_fraction``,
    ``descriptor_r_max`` (Å), optional ``energy_threshold`` (eV/atom). ``runs``: ``trajectory_run_###`` and
    ``thermo_run_###`` of the MD calculation. Returns ``selection`` (Dict: counts per class, candidate fraction,
    verdict, per-run statistics, the selected frames with their deviations) and ``candidate_###`` StructureData in
    pick order (see :func:`aiida_mlip.analysis.selection.select_candidates`).
    """
    from ase import Atoms

    params = parameters.get_dict()
    info = summary.get_dict()
    lo, hi = (float(v) for v in params['trust_window'])
    frames = _run_frames(info, runs)
    deviations = np.array([f['deviation'] for f in frames])
    energy_threshold = params.get('energy_threshold')
    energy = np.array([f['energy_std_per_atom'] for f in frames]) if energy_threshold is not None else None
    atoms = [Atoms(symbols=f['symbols'], positions=f['positions'], cell=f['cell'], pbc=f['pbc']) for f in frames]
    descriptors = atoms_descriptors(atoms, r_max=float(params['descriptor_r_max']))
    result = select_candidates(deviations, descriptors, lo, hi, int(params['max_candidates']), int(params['seed']),
                               energy_std_per_atom=energy, energy_threshold=energy_threshold)
    verdict = exploration_verdict(result['counts'], float(params['min_candidate_fraction']))

    outputs, selected = {}, []
    for position, index in enumerate(result['selected']):
        frame = frames[index]
        key = f'candidate_{position:03d}'
        outputs[key] = orm.StructureData(ase=atoms[index])
        selected.append({
            'key': key, 'run': frame['run']['key'], 'frame': frame['frame'], 'step': frame['step'],
            'temperature': frame['run']['temperature'], 'structure_key': frame['run'].get('structure_key'),
            'max_force_deviation': _finite_or_none(frame['deviation']),
            'energy_std_per_atom': _finite_or_none(frame['energy_std_per_atom']),
        })
    per_run = []
    for run in info['runs']:
        values = np.array([f['deviation'] for f, c in zip(frames, result['classes']) if f['run'] is run])
        classes = [c for f, c in zip(frames, result['classes']) if f['run'] is run]
        finite = values[np.isfinite(values)]
        per_run.append({
            'run': run['key'], 'structure_key': run.get('structure_key'), 'temperature': run['temperature'],
            'n_frames': len(values), 'stopped_early': bool(run.get('stopped_early')), 'reason': run.get('reason'),
            'counts': {name: classes.count(name) for name in CLASSES},
            'max_force_deviation': None if not finite.size else {
                'min': float(finite.min()), 'median': float(np.median(finite)), 'max': float(finite.max())},
        })
    outputs['selection'] = orm.Dict({
        'trust_window': [lo, hi],
        'energy_threshold': energy_threshold,
        'max_candidates': int(params['max_candidates']),
        'seed': int(params['seed']),
        'min_candidate_fraction': float(params['min_candidate_fraction']),
        'n_frames': result['n_frames'],
        'counts': result['counts'],
        'candidate_fraction': result['candidate_fraction'],
        'untrusted_fraction': result['untrusted_fraction'],
        'n_selected': len(selected),
        'selected': selected,
        'verdict': verdict,
        'runs': per_run,
        'descriptor': {'kind': 'gaussian-smeared pair distances per atom and element pair',
                       'r_max': float(params['descriptor_r_max'])},
    })
    return outputs


@calcfunction
def committee_calibration(reference, forces: orm.ArrayData, committee: orm.ArrayData,
                          parameters: orm.Dict) -> orm.Dict:
    """Committee deviation vs true max force error on freshly labeled frames (``reference``, an ``mlip.dataset``).

    ``forces``/``committee`` are the outputs of the ``mlip.evaluate`` run of the committee on ``reference``.
    ``parameters``: ``n_bins``, ``min_frames``. See :func:`aiida_mlip.analysis.selection.calibration_summary`.
    """
    params = parameters.get_dict()
    arrays = reference.get_arrays()
    errors = max_force_error(forces.get_array('forces_mean'), arrays['forces'], arrays['n_atoms'])
    deviation = committee.get_array('max_force_deviation')
    return orm.Dict(calibration_summary(deviation, errors, n_bins=int(params['n_bins']),
                                        min_frames=int(params['min_frames'])))


def _errors(metrics: dict | None) -> dict | None:
    """The headline numbers of a TrainingWorkChain ``test_metrics`` Dict, with the committee's Spearman on it."""
    if metrics is None:
        return None
    return {**test_errors(metrics),
            'committee_spearman_on_test': (metrics.get('committee') or {}).get('spearman_deviation_vs_error')}


@calcfunction
def summarize_iteration(parameters: orm.Dict, selection: orm.Dict, explored_dataset, **nodes) -> orm.Dict:
    """The record of one iteration (``iterations.iteration_N``), built from the nodes it summarises.

    ``nodes`` (all optional): ``test_metrics`` (of the exploring committee), ``labeled`` (new frames), ``merged``
    (dataset after the merge), ``quality_report`` (of the labeling), ``calibration``, ``retrained_test_metrics``.
    """
    params = parameters.get_dict()
    sel = selection.get_dict()
    calibration = nodes['calibration'].get_dict() if 'calibration' in nodes else None
    quality = nodes['quality_report'].get_dict() if 'quality_report' in nodes else None
    record = {
        'iteration': params['iteration'],
        'status': sel['verdict']['status'],
        'reason': sel['verdict']['reason'],
        'dataset_size': explored_dataset.n_frames,
        'test_errors': _errors(nodes['test_metrics'].get_dict() if 'test_metrics' in nodes else None),
        'trust_window': sel['trust_window'],
        'n_explored_frames': sel['n_frames'],
        'counts': sel['counts'],
        'candidate_fraction': sel['candidate_fraction'],
        'untrusted_fraction': sel['untrusted_fraction'],
        'n_selected': sel['n_selected'],
        'selected': sel['selected'],
        'n_labeled': nodes['labeled'].n_frames if 'labeled' in nodes else 0,
        'dropped_by_labeling': quality.get('dropped') if quality else None,
        'dataset_size_after': nodes['merged'].n_frames if 'merged' in nodes else explored_dataset.n_frames,
        'calibration_spearman': calibration.get('spearman') if calibration else None,
        'calibration_spearman_note': calibration.get('spearman_note') if calibration else None,
        'calibration_curve': calibration.get('calibration_curve') if calibration else None,
        'calibration_median_error_over_deviation': calibration.get('median_error_over_deviation')
        if calibration else None,
        'retrained': 'retrained_test_metrics' in nodes,
        'retrained_test_errors': _errors(nodes['retrained_test_metrics'].get_dict())
        if 'retrained_test_metrics' in nodes else None,
    }
    return orm.Dict(record)


@calcfunction
def summarize_active_learning(parameters: orm.Dict, **iterations) -> orm.Dict:
    """Overview of the whole run from the iteration records: stop reason, labels added, candidate fractions."""
    params = parameters.get_dict()
    records = [iterations[key].get_dict() for key in sorted(iterations, key=lambda k: int(k.rsplit('_', 1)[1]))]
    return orm.Dict({
        **params,
        'n_iterations': len(records),
        'n_labeled_total': sum(record['n_labeled'] for record in records),
        'candidate_fractions': [record['candidate_fraction'] for record in records],
        'dataset_sizes': [records[0]['dataset_size']] + [record['dataset_size_after'] for record in records]
        if records else [],
        'calibration_spearman': [record['calibration_spearman'] for record in records],
        'test_forces_rmse_mev_per_a': [(record['test_errors'] or {}).get('forces_rmse_mev_per_a')
                                       for record in records],
    })


class ActiveLearningWorkChain(ProtocolMixin, WorkChain):
    """Active learning by committee: train, explore with MD, label the uncertain frames with DFT, retrain."""

    _protocol_name = 'active_learning'

    @classmethod
    def define(cls, spec):
        super().define(spec)
        spec.input('dataset', valid_type=TrainingSet,
                   help='Seed labeled dataset (docs/sources.md: 50-100 frames), labeled with the same DFT settings as '
                        '`labeling`.')
        spec.input_namespace('structures', valid_type=orm.StructureData, dynamic=True, validator=validate_structures,
                             help='Starting cells of the exploration MD, by key.')
        spec.expose_inputs(
            TrainingWorkChain, namespace='training', exclude=('dataset',),
            namespace_options={'validator': validate_training,
                               'help': 'TrainingWorkChain inputs (committee_size >= 3); without `evaluate` the '
                                       'top-level `evaluate` inputs score the test split.'},
        )
        spec.expose_inputs(
            DftLabelingWorkChain, namespace='labeling', exclude=LABELING_PORTS_SET_BY_WORKFLOW,
            namespace_options={'help': 'DftLabelingWorkChain inputs for the candidates (same DFT as the seed data).'},
        )
        spec.expose_inputs(
            MlipMdCalculation, namespace='exploration', exclude=MD_PORTS_SET_BY_WORKFLOW,
            namespace_options={'help': 'Exploration MD (Langevin NVT): temperatures, steps, interval, timestep_fs, '
                                       'friction, threads, metadata.'},
        )
        spec.input('exploration.strains', valid_type=orm.List, required=False,
                   help='Isotropic volume strains (e.g. [-0.05, 0, 0.05]) applied to every starting cell; without '
                        'it the cells are used as given. Include 0 to keep the unstrained cell.')
        spec.input('md_code', valid_type=orm.AbstractCode, help='The `mlip.md` code of the exploration MD.')
        spec.expose_inputs(
            MlipEvaluateCalculation, namespace='evaluate', exclude=('models', 'structures', 'dataset', 'remote_folder'),
            namespace_options={'help': '`mlip.evaluate` code and options: calibration on the new labels (and the '
                                       'test split when `training.evaluate` is not given).'},
        )
        spec.input('trust_window', valid_type=orm.List,
                   help='[lo, hi] of the max force deviation in eV/Å, 0 <= lo < hi: frames inside are labeled, '
                        'below lo already known, above hi discarded as unphysical (docs/sources.md flag: 0.20 eV/Å).')
        spec.input('energy_threshold', valid_type=orm.Float, required=False,
                   help='Also label frames below lo whose committee energy std exceeds this (eV/atom; docs/sources.md: '
                        '0.015).')
        spec.input('max_candidates_per_iteration', valid_type=orm.Int, default=lambda: orm.Int(20),
                   help='At most this many frames (farthest-point sampled) are labeled per iteration.')
        spec.input('min_candidate_fraction', valid_type=orm.Float, default=lambda: orm.Float(0.05),
                   help='Converged when the fraction of explored frames inside the window (and beyond it) falls '
                        'below this.')
        spec.input('max_iterations', valid_type=orm.Int, default=lambda: orm.Int(5),
                   help='Largest number of explore-label-retrain iterations.')
        spec.input('retrain_at_end', valid_type=orm.Bool, default=lambda: orm.Bool(True),
                   help='Retrain after the last labeling; False leaves `models` trained without the last labels '
                        '(`dataset` has them).')
        spec.input('seed', valid_type=orm.Int, default=lambda: orm.Int(1),
                   help='Seed of the candidate sampling and of the MD (iteration i explores with seed + i).')
        spec.input('descriptor_r_max', valid_type=orm.Float, default=lambda: orm.Float(DEFAULT_R_MAX),
                   help='Cutoff (Å) of the pair-distance descriptor of the diversity selection.')
        spec.inputs.validator = validate_inputs

        spec.outline(
            cls.setup,
            cls.run_training,
            cls.inspect_training,
            while_(cls.should_explore)(
                cls.run_exploration,
                cls.inspect_exploration,
                if_(cls.has_candidates)(
                    cls.run_labeling,
                    cls.inspect_labeling,
                    cls.run_calibration,
                    cls.inspect_calibration,
                    if_(cls.should_retrain)(
                        cls.run_training,
                        cls.inspect_training,
                    ),
                ),
                cls.finish_iteration,
            ),
            cls.results,
        )

        spec.output_namespace('models', valid_type=MlipModel, dynamic=True,
                              help='The final committee (`member_0` ...).')
        spec.output('dataset', valid_type=TrainingSet, help='The final dataset: seed frames + every new label.')
        spec.output_namespace('iterations', valid_type=orm.Dict, dynamic=True,
                              help='`iteration_N`: dataset size, test errors, counts per class, candidate fraction, '
                                   'selected frames, calibration Spearman and curve, retrained test errors.')
        spec.output('summary', valid_type=orm.Dict, required=False,
                    help='converged, stop reason, number of iterations and labels, per-iteration fractions.')

        spec.exit_code(401, 'ERROR_TRAINING_FAILED', message='Training the committee failed (iteration {iteration}): '
                                                             '{reason}')
        spec.exit_code(402, 'ERROR_EXPLORATION_FAILED', message='The exploration MD failed (iteration {iteration}): '
                                                                '{reason}')
        spec.exit_code(403, 'ERROR_LABELING_FAILED', message='Labeling the candidates failed (iteration {iteration}): '
                                                             '{reason}')
        spec.exit_code(404, 'ERROR_CALIBRATION_FAILED', message='The calibration evaluation failed (iteration '
                                                                '{iteration}): {reason}')
        spec.exit_code(510, 'ERROR_EXPLORATION_UNTRUSTED', message='Iteration {iteration}: {reason}')

    @classmethod
    def get_builder_from_protocol(cls, dataset, structures, training_code, evaluate_code, md_code, pw_code,
                                  protocol=None, overrides=None, pseudo_family=None, options=None, **kwargs):
        """A builder from ``aiida_mlip/protocols/active_learning.yaml``.

        :param dataset: the seed ``mlip.dataset``.
        :param structures: starting cells (list or dict of StructureData).
        :param training_code, evaluate_code, md_code, pw_code: codes of plugins ``mlip.mace_train``,
            ``mlip.evaluate``, ``mlip.md`` and ``quantumespresso.pw`` (labels or nodes).
        :param overrides: top-level inputs, ``exploration``, and under ``training`` / ``labeling`` the overrides of
            ``TrainingWorkChain`` / ``DftLabelingWorkChain.get_builder_from_protocol`` (same protocol name).
        :param pseudo_family: label of the pseudo family (required offline), as for the labeling.
        :param options: ``metadata.options`` of the pw.x jobs; ``kwargs`` go to the labeling builder.
        """
        codes = [orm.load_code(code) if isinstance(code, str) else code
                 for code in (training_code, evaluate_code, md_code, pw_code)]
        training_code, evaluate_code, md_code, pw_code = codes
        if not isinstance(structures, dict):
            structures = {f'structure_{index:03d}': s for index, s in enumerate(structures)}
        inputs = cls.get_protocol_inputs(protocol, overrides)
        protocol = protocol or cls.get_default_protocol()

        training = TrainingWorkChain.get_builder_from_protocol(
            training_code, dataset, protocol=protocol, overrides=inputs.get('training'), evaluate_code=evaluate_code)
        training.pop('dataset', None)
        labeling = DftLabelingWorkChain.get_builder_from_protocol(
            pw_code, structures, protocol=protocol, overrides=inputs.get('labeling'), pseudo_family=pseudo_family,
            options=options, **kwargs)
        for name in LABELING_PORTS_SET_BY_WORKFLOW:
            labeling.pop(name, None)

        builder = cls.get_builder()
        builder.dataset = dataset
        builder.structures = structures
        builder.training = training
        builder.labeling = labeling
        builder.md_code = md_code
        builder.evaluate.code = evaluate_code
        exploration = dict(inputs['exploration'])
        builder.exploration.temperatures = orm.List([float(t) for t in exploration.pop('temperatures')])
        strains = exploration.pop('strains', None)
        if strains:
            builder.exploration.strains = orm.List([float(s) for s in strains])
        for name, value in exploration.items():
            builder.exploration[name] = orm.Int(value) if name in ('steps', 'interval', 'threads') else orm.Float(value)
        builder.trust_window = orm.List([float(v) for v in inputs['trust_window']])
        if inputs.get('energy_threshold') is not None:
            builder.energy_threshold = orm.Float(inputs['energy_threshold'])
        builder.max_candidates_per_iteration = orm.Int(inputs['max_candidates_per_iteration'])
        builder.min_candidate_fraction = orm.Float(inputs['min_candidate_fraction'])
        builder.max_iterations = orm.Int(inputs['max_iterations'])
        builder.retrain_at_end = orm.Bool(inputs['retrain_at_end'])
        builder.seed = orm.Int(inputs['seed'])
        if inputs.get('descriptor_r_max') is not None:
            builder.descriptor_r_max = orm.Float(inputs['descriptor_r_max'])
        return builder

    # ---- outline -------------------------------------------------------------------------------------------------
    def setup(self):
        """Starting cells (volume-strained in the graph when asked for) and the loop state."""
        self.ctx.iteration = 0
        self.ctx.dataset = self.inputs.dataset
        self.ctx.converged = False
        self.ctx.stop_reason = None
        self.ctx.outputs_attached = False
        self.ctx.records = {}
        cells = {}
        strains = self.inputs.exploration.get('strains')
        for key, structure in sorted(self.inputs.structures.items()):
            if strains is None:
                cells[key] = structure
                continue
            strained = scale_volume(structure, strains, metadata={'call_link_label': f'strain_{key}'})
            for index, name in enumerate(sorted(strained)):
                cells[f'{key}_v{index:02d}'] = strained[name]
        self.ctx.cells = cells
        self.report(f'{len(cells)} starting cell(s) x {len(self.inputs.exploration.temperatures)} temperature(s); '
                    f'trust window {self.inputs.trust_window.get_list()} eV/Å')

    def run_training(self):
        """A TrainingWorkChain on the current dataset (iteration 0: the seed dataset)."""
        inputs = AttributeDict(self.exposed_inputs(TrainingWorkChain, namespace='training'))
        inputs.dataset = self.ctx.dataset
        if not inputs.get('evaluate'):
            inputs.evaluate = AttributeDict(self.exposed_inputs(MlipEvaluateCalculation, namespace='evaluate'))
        inputs.metadata = {**inputs.get('metadata', {}), 'call_link_label': f'training_{self.ctx.iteration}'}
        node = self.submit(TrainingWorkChain, **inputs)
        self.report(f'launched TrainingWorkChain<{node.pk}> on {self.ctx.dataset.n_frames} frames')
        return ToContext(training=node)

    def inspect_training(self):
        node = self.ctx.training
        if not node.is_finished_ok or 'models' not in node.outputs:
            self._attach_outputs()
            return self.exit_codes.ERROR_TRAINING_FAILED.format(
                iteration=self.ctx.iteration, reason=f'TrainingWorkChain<{node.pk}> exit {node.exit_status}: '
                                                     f'{node.exit_message}')
        self.ctx.models = {key: node.outputs.models[key] for key in sorted(node.outputs.models)}
        self.ctx.test_metrics = node.outputs.test_metrics if 'test_metrics' in node.outputs else None
        self.ctx.trained_on = self.ctx.dataset
        if self.ctx.iteration > 0:
            self.ctx.retrained_test_metrics = self.ctx.test_metrics
        return None

    def should_explore(self):
        return not self.ctx.converged and self.ctx.iteration < self.inputs.max_iterations.value

    def run_exploration(self):
        """ONE MlipMdCalculation: every starting cell x temperature with the committee."""
        self.ctx.iteration += 1
        self.ctx.explored_with = {'models': self.ctx.models, 'test_metrics': self.ctx.test_metrics,
                                  'dataset': self.ctx.trained_on}
        for name in ('labeled', 'merged', 'quality_report', 'calibration', 'retrained_test_metrics', 'candidates'):
            self.ctx.pop(name, None)
        inputs = AttributeDict(self.exposed_inputs(MlipMdCalculation, namespace='exploration'))
        inputs.code = self.inputs.md_code
        inputs.models = self.ctx.models
        inputs.structures = self.ctx.cells
        inputs.seed = orm.Int(self.inputs.seed.value + self.ctx.iteration)
        inputs.ensemble = orm.Str('nvt')
        inputs.metadata = {**inputs.get('metadata', {}), 'call_link_label': f'explore_{self.ctx.iteration}'}
        node = self.submit(MlipMdCalculation, **inputs)
        self.report(f'iteration {self.ctx.iteration}: launched MlipMdCalculation<{node.pk}> with a committee of '
                    f'{len(self.ctx.models)}')
        return ToContext(exploration=node)

    def inspect_exploration(self):
        """Select the candidates (calcfunction) and decide: converged, stalled or continue."""
        node = self.ctx.exploration
        if not node.is_finished_ok:
            self._attach_outputs()
            return self.exit_codes.ERROR_EXPLORATION_FAILED.format(
                iteration=self.ctx.iteration, reason=f'MlipMdCalculation<{node.pk}> exit {node.exit_status}: '
                                                     f'{node.exit_message}')
        runs = md_run_outputs(node)
        parameters = {
            'trust_window': self.inputs.trust_window.get_list(),
            'max_candidates': self.inputs.max_candidates_per_iteration.value,
            'seed': self.inputs.seed.value + self.ctx.iteration,
            'min_candidate_fraction': self.inputs.min_candidate_fraction.value,
            'descriptor_r_max': self.inputs.descriptor_r_max.value,
        }
        if 'energy_threshold' in self.inputs:
            parameters['energy_threshold'] = self.inputs.energy_threshold.value
        result = select_md_frames(orm.Dict(parameters), node.outputs.summary, **runs,
                                  metadata={'call_link_label': f'select_{self.ctx.iteration}'})
        selection = result['selection']
        self.ctx.selection = selection
        self.ctx.candidates = {key: value for key, value in result.items() if key.startswith('candidate_')}
        verdict = selection['verdict']
        counts = selection['counts']
        self.report(f'iteration {self.ctx.iteration}: {selection["n_frames"]} frames, {counts[BELOW]} below / '
                    f'{counts[WINDOW]} inside / {counts["above"]} above the window ({counts[INVALID]} invalid); '
                    f'{len(self.ctx.candidates)} selected; {verdict["status"]}: {verdict["reason"]}')
        if verdict['status'] == 'converged':
            self.ctx.converged = True
            self.ctx.stop_reason = verdict['reason']
            self.ctx.candidates = {}
        elif verdict['status'] == 'stalled':
            self.ctx.stop_reason = verdict['reason']
            self.finish_iteration()
            self._attach_outputs()
            return self.exit_codes.ERROR_EXPLORATION_UNTRUSTED.format(iteration=self.ctx.iteration,
                                                                      reason=verdict['reason'])
        return None

    def has_candidates(self):
        return bool(self.ctx.candidates)

    def run_labeling(self):
        """DftLabelingWorkChain on the candidates (all pw.x runs concurrently)."""
        inputs = AttributeDict(self.exposed_inputs(DftLabelingWorkChain, namespace='labeling'))
        prefix = f'iter{self.ctx.iteration:02d}'
        inputs.structures = {f'{prefix}_{key}': structure for key, structure in self.ctx.candidates.items()}
        inputs.config_types = orm.Dict({key: f'active_learning_{self.ctx.iteration}' for key in inputs.structures})
        inputs.isolated_atoms = orm.Bool(False)
        inputs.metadata = {**inputs.get('metadata', {}), 'call_link_label': f'label_{self.ctx.iteration}'}
        node = self.submit(DftLabelingWorkChain, **inputs)
        self.report(f'iteration {self.ctx.iteration}: launched DftLabelingWorkChain<{node.pk}> for '
                    f'{len(inputs.structures)} candidate(s)')
        return ToContext(labeling=node)

    def inspect_labeling(self):
        """Merge the new frames into the dataset (calcfunction: dataset <- merge <- new frames <- PwCalculations)."""
        node = self.ctx.labeling
        if not node.is_finished_ok or 'dataset' not in node.outputs:
            self._attach_outputs()
            return self.exit_codes.ERROR_LABELING_FAILED.format(
                iteration=self.ctx.iteration, reason=f'DftLabelingWorkChain<{node.pk}> exit {node.exit_status}: '
                                                     f'{node.exit_message}')
        self.ctx.labeled = node.outputs.dataset
        self.ctx.quality_report = node.outputs.quality_report
        self.ctx.merged = merge_datasets(dataset_0=self.ctx.dataset, dataset_1=self.ctx.labeled,
                                         metadata={'call_link_label': f'merge_{self.ctx.iteration}'})
        self.ctx.dataset = self.ctx.merged
        self.report(f'iteration {self.ctx.iteration}: {self.ctx.labeled.n_frames} new frame(s), dataset now '
                    f'{self.ctx.dataset.n_frames} frames')
        return None

    def run_calibration(self):
        """ONE MlipEvaluateCalculation: the committee that selected the frames, on their new DFT labels."""
        inputs = AttributeDict(self.exposed_inputs(MlipEvaluateCalculation, namespace='evaluate'))
        inputs.models = self.ctx.explored_with['models']
        inputs.dataset = self.ctx.labeled
        problem = check_models_cover(inputs.models, dataset=inputs.dataset)
        if problem:  # cannot happen with the element check of the validator; stated rather than crashing
            raise ValueError(problem)
        inputs.metadata = {**inputs.get('metadata', {}), 'call_link_label': f'calibrate_{self.ctx.iteration}'}
        node = self.submit(MlipEvaluateCalculation, **inputs)
        self.report(f'iteration {self.ctx.iteration}: launched MlipEvaluateCalculation<{node.pk}> (calibration)')
        return ToContext(calibration_job=node)

    def inspect_calibration(self):
        node = self.ctx.calibration_job
        if not node.is_finished_ok or 'committee' not in node.outputs:
            self._attach_outputs()
            return self.exit_codes.ERROR_CALIBRATION_FAILED.format(
                iteration=self.ctx.iteration, reason=f'MlipEvaluateCalculation<{node.pk}> exit {node.exit_status}: '
                                                     f'{node.exit_message}')
        parameters = orm.Dict({'n_bins': DEFAULT_CALIBRATION_BINS, 'min_frames': MIN_CALIBRATION_FRAMES})
        self.ctx.calibration = committee_calibration(
            self.ctx.labeled, node.outputs.forces, node.outputs.committee, parameters,
            metadata={'call_link_label': f'calibration_{self.ctx.iteration}'})
        spearman = self.ctx.calibration['spearman']
        shown = f'{spearman:.2f}' if spearman is not None else f'n/a ({self.ctx.calibration["spearman_note"]})'
        self.report(f'iteration {self.ctx.iteration}: calibration Spearman {shown}')
        return None

    def should_retrain(self):
        return self.ctx.iteration < self.inputs.max_iterations.value or self.inputs.retrain_at_end.value

    def finish_iteration(self):
        """Record the iteration as ``iterations.iteration_N`` (a calcfunction of the nodes it summarises)."""
        nodes = {}
        if self.ctx.explored_with['test_metrics'] is not None:
            nodes['test_metrics'] = self.ctx.explored_with['test_metrics']
        for name in ('labeled', 'merged', 'quality_report', 'calibration', 'retrained_test_metrics'):
            if self.ctx.get(name) is not None:
                nodes[name] = self.ctx[name]
        record = summarize_iteration(
            orm.Dict({'iteration': self.ctx.iteration}), self.ctx.selection, self.ctx.explored_with['dataset'],
            **nodes, metadata={'call_link_label': f'summarize_{self.ctx.iteration}'})
        key = f'iteration_{self.ctx.iteration}'
        self.ctx.records[key] = record
        self.out(f'iterations.{key}', record)
        if not self.ctx.converged and self.ctx.iteration >= self.inputs.max_iterations.value:
            self.ctx.stop_reason = f'max_iterations ({self.inputs.max_iterations.value}) reached'

    def results(self):
        self._attach_outputs()
        self.report(f'{"converged" if self.ctx.converged else "not converged"} after {self.ctx.iteration} '
                    f'iteration(s): {self.ctx.stop_reason}; final dataset {self.ctx.dataset.n_frames} frames')

    def _attach_outputs(self):
        """Final models, dataset and summary; also on failure, so that what was computed stays reachable."""
        if self.ctx.get('outputs_attached'):
            return
        self.ctx.outputs_attached = True
        for key, model in (self.ctx.get('models') or {}).items():
            self.out(f'models.{key}', model)
        self.out('dataset', self.ctx.dataset)
        trained_on = self.ctx.get('trained_on')
        retrained_last = trained_on is not None and trained_on.uuid == self.ctx.dataset.uuid
        parameters = orm.Dict({
            'converged': bool(self.ctx.converged),
            'stop_reason': self.ctx.stop_reason,
            'trust_window': self.inputs.trust_window.get_list(),
            'min_candidate_fraction': self.inputs.min_candidate_fraction.value,
            'max_iterations': self.inputs.max_iterations.value,
            'final_dataset_size': self.ctx.dataset.n_frames,
            'models_trained_on_final_dataset': bool(retrained_last),
        })
        self.out('summary', summarize_active_learning(parameters, **self.ctx.records,
                                                      metadata={'call_link_label': 'summarize'}))
