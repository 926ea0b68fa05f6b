"""``mlip.md_stability``: is an MLIP stable in molecular dynamics? NVT at several temperatures + an NVE drift run.

A model can have small test errors and still fail in MD: atoms collapse onto each other (holes at short range),
the energy is not conserved (non-smooth or non-conservative forces), or the temperature runs away. docs/sources.md asks
for a timestep of 0.5-1 fs, an NVE energy drift below 0.1-1 meV/atom/ps and no collapse or explosion. This
workflow measures exactly that, with the MLIP engine (model or committee + ``mlip.md`` code):

1. optional supercell (``make_supercell`` calcfunction, in the graph);
2. ONE ``MlipMdCalculation`` (``nvt``): Langevin NVT at every temperature (one model load, one run each);
3. ONE short ``MlipMdCalculation`` (``nve``): velocity-Verlet NVE at the FIRST temperature, launched at the same
   time. A Langevin thermostat does not conserve the total energy, so the drift criterion is measured only in
   NVE; the NVT runs give the collapse/explosion and temperature checks. (Running NVE from the end of the NVT
   equilibration would need a restart from velocities the engine does not save; the NVE run starts from the
   same cell with Maxwell-Boltzmann velocities, which is what a drift test needs: a conservative model keeps
   ``E_pot + E_kin`` constant from any start.)
4. ``analyse_md_stability`` calcfunction: per temperature the minimum interatomic distance over all saved frames,
   the temperature statistics after equilibration, the RDF after equilibration, whether a run was stopped early
   by the engine (and why), the NVE drift (first temperature) -> :func:`aiida_mlip.analysis.md.md_verdict`.

An unstable model is a RESULT, not a failure: the workflow finishes with exit status 0 and ``stability['stable']``
False with the reasons, so validation and transferability workflows can compare models (a failed process would
hide the numbers and be indistinguishable from a crash). Set ``fail_on_unstable`` to get exit code 520
``ERROR_UNSTABLE`` instead (the outputs are attached all the same).
"""
from __future__ import annotations

import numpy as np
from aiida import orm
from aiida.common import AttributeDict
from aiida.engine import ToContext, WorkChain, calcfunction

from aiida_mlip.analysis.md import (
    DEFAULT_MD_THRESHOLDS, energy_drift_mev_per_atom_per_ps, md_verdict, minimum_distance, radial_distribution,
    repetitions_for, temperature_statistics,
)
from aiida_mlip.calculations.md import MlipMdCalculation, md_parameters_problem, models_problem
from aiida_mlip.calculations.sampling import make_supercell
from aiida_mlip.workflows.checks import code_problem, structure_problem

#: Defaults of the workflow (a smoke test of minutes, not a production MD; see docs/md_stability.md).
DEFAULT_TEMPERATURES = (300.0, 600.0)
DEFAULT_STEPS = 200
DEFAULT_NVE_STEPS = 200
DEFAULT_TIMESTEP_FS = 1.0
DEFAULT_INTERVAL = 5
DEFAULT_FRICTION = 0.02
DEFAULT_EQUILIBRATION_FRACTION = 0.25
DEFAULT_RDF_R_MAX = 6.0
DEFAULT_RDF_N_BINS = 100


def md_atom_count(inputs) -> int:
    """Atoms of the cell the MD runs on: the structure, times `supercell`, then repeated up to `min_atoms`."""
    n_atoms = len(inputs['structure'].sites)
    if 'supercell' in inputs:
        matrix = np.asarray(inputs['supercell'].get_list())
        n_atoms *= round(abs(np.linalg.det(np.diag(matrix) if matrix.shape == (3,) else matrix)))
    return n_atoms * repetitions_for(n_atoms, int(inputs['min_atoms'].value)) ** 3


#: The MD inputs that the workflow sets itself (not exposed in the `mlip` namespace).
MD_PORTS_SET_BY_WORKFLOW = (
    'structure', 'structures', 'temperatures', 'steps', 'timestep_fs', 'interval', 'seed', 'ensemble', 'friction',
    'min_distance',
)


def _run_arrays(trajectory: orm.TrajectoryData, thermo: orm.ArrayData) -> dict:
    return {
        'times_fs': np.asarray(thermo.get_array('times_fs'), dtype=float),
        'temperature': np.asarray(thermo.get_array('temperature'), dtype=float),
        'total_energy': np.asarray(thermo.get_array('total_energy'), dtype=float),
        'positions': np.asarray(trajectory.get_array('positions'), dtype=float),
        'cells': np.asarray(trajectory.get_array('cells'), dtype=float),
        'pbc': list(trajectory.pbc) if trajectory.pbc is not None else [True, True, True],
    }


def _min_distance(run: dict) -> tuple:
    """(smallest distance over the finite frames or None, number of non-finite frames)."""
    distances, bad = [], 0
    for positions, cell in zip(run['positions'], run['cells']):
        if not (np.all(np.isfinite(positions)) and np.all(np.isfinite(cell))):
            bad += 1
            continue
        if len(positions) < 2 and not any(run['pbc']):
            continue
        distances.append(minimum_distance(positions, cell, run['pbc']))
    return (min(distances) if distances else None), bad


def _stopped_reason(label: str, run_info: dict, steps: int) -> list:
    if not run_info.get('stopped_early'):
        return []
    return [f'{label} run stopped early after {run_info["n_steps_done"]} of {steps} steps: {run_info["reason"]}']


def rdf_r_max(cell, requested: float) -> float:
    """``requested`` capped at half the smallest perpendicular width of ``cell`` (the minimum-image limit)."""
    cell = np.asarray(cell, dtype=float)
    volume = abs(np.linalg.det(cell))
    widths = [volume / np.linalg.norm(np.cross(cell[(k + 1) % 3], cell[(k + 2) % 3])) for k in range(3)]
    return float(min(requested, 0.5 * min(widths) * (1 - 1e-9)))


@calcfunction
def analyse_md_stability(parameters: orm.Dict, nvt_summary: orm.Dict, **runs) -> dict:
    """Per-temperature MD stability verdict and RDF from the outputs of the NVT (and NVE) ``mlip.md`` runs.

    ``parameters``: ``thresholds`` (complete), ``steps``, ``nve_steps``, ``equilibration_fraction``, ``rdf_r_max``,
    ``rdf_n_bins``. ``runs``: ``nvt_trajectory_run_###`` / ``nvt_thermo_run_###`` per temperature, and optionally
    ``nve_summary``, ``nve_trajectory_run_000``, ``nve_thermo_run_000``.

    Returns ``stability`` (Dict) and, for fully periodic cells, ``rdf`` (ArrayData: ``r``, ``edges`` (Å), ``g``
    (n_temperatures, n_bins), ``temperatures``).
    """
    params = parameters.get_dict()
    thresholds = params['thresholds']
    steps, nve_steps = int(params['steps']), int(params.get('nve_steps', 0))
    fraction = float(params['equilibration_fraction'])
    nvt_info = nvt_summary.get_dict()
    nve_info = runs['nve_summary'].get_dict() if 'nve_summary' in runs else None

    per_temperature, reasons, rdf_rows = [], [], []
    rdf_edges, rdf_centres = None, None
    n_atoms = None
    for index, run_info in enumerate(nvt_info['runs']):
        key = run_info['key']
        target = float(run_info['temperature'])
        n_atoms = run_info['n_atoms']
        run = _run_arrays(runs[f'nvt_trajectory_{key}'], runs[f'nvt_thermo_{key}'])
        dmin, n_bad = _min_distance(run)
        production = run['times_fs'] >= fraction * steps * float(nvt_info['timestep_fs'])
        if not production.any():  # stopped before the end of the equilibration: judge what there is
            production = np.ones_like(run['times_fs'], dtype=bool)
        verdict = md_verdict(dmin, None, run['temperature'][production], target, thresholds)
        entry_reasons = [f'NVT: {reason}' for reason in verdict['reasons']]
        entry_reasons += _stopped_reason('NVT', run_info, steps)
        if n_bad:
            entry_reasons.append(f'NVT: {n_bad} saved frame(s) with non-finite positions (the trajectory blew up)')
        if dmin is None and not n_bad:
            entry_reasons.append('NVT: no frame to measure interatomic distances')
        temperatures = run['temperature'][production]
        entry = {
            'temperature': target,
            'run': key,
            'n_steps_done': int(run_info['n_steps_done']),
            'stopped_early': bool(run_info['stopped_early']),
            'stop_reason': run_info['reason'],
            'min_distance_angstrom': dmin,
            'n_production_frames': int(production.sum()),
            'temperature_stats': (
                temperature_statistics(temperatures) if np.all(np.isfinite(temperatures)) else None
            ),
            'temperature_rel_deviation': verdict['checks'].get('temperature_rel_deviation'),
            'drift_mev_per_atom_per_ps': None,
        }

        # RDF over the finite production frames (fully periodic cells only).
        frames = [
            (p, c) for p, c, keep in zip(run['positions'], run['cells'], production)
            if keep and np.all(np.isfinite(p)) and np.all(np.isfinite(c))
        ]
        if all(run['pbc']) and len(run['positions'][0]) >= 2:
            r_max = rdf_r_max(run['cells'][0], float(params['rdf_r_max']))
            if rdf_edges is None:
                rdf_edges = np.linspace(0.0, r_max, int(params['rdf_n_bins']) + 1)
                rdf_centres = 0.5 * (rdf_edges[1:] + rdf_edges[:-1])
            if frames:
                rdf = radial_distribution([f[0] for f in frames], np.array([f[1] for f in frames]),
                                          float(rdf_edges[-1]), int(params['rdf_n_bins']))
                g = np.asarray(rdf['g'])
                entry['rdf_first_peak_angstrom'] = float(rdf_centres[int(np.argmax(g))])
            else:
                g = np.full(int(params['rdf_n_bins']), np.nan)
            rdf_rows.append(g)

        # The NVE drift run belongs to the first temperature.
        if index == 0 and nve_info is not None:
            nve_run_info = nve_info['runs'][0]
            nve = _run_arrays(runs['nve_trajectory_run_000'], runs['nve_thermo_run_000'])
            nve_dmin, nve_bad = _min_distance(nve)
            drift, drift_note = None, None
            finite = np.all(np.isfinite(nve['total_energy']))
            if finite and len(nve['times_fs']) >= 3:
                drift = energy_drift_mev_per_atom_per_ps(nve['times_fs'], nve['total_energy'], n_atoms)
            else:
                drift_note = (
                    'non-finite total energy' if not finite else f'only {len(nve["times_fs"])} saved NVE frame(s)'
                )
            nve_verdict = md_verdict(nve_dmin, drift, None, None, thresholds)
            entry_reasons += [f'NVE: {reason}' for reason in nve_verdict['reasons']]
            entry_reasons += _stopped_reason('NVE', nve_run_info, nve_steps)
            if nve_bad:
                entry_reasons.append(f'NVE: {nve_bad} saved frame(s) with non-finite positions')
            if drift is None:
                entry_reasons.append(f'NVE: energy drift could not be measured ({drift_note})')
            entry['drift_mev_per_atom_per_ps'] = drift
            entry['nve'] = {
                'n_steps_done': int(nve_run_info['n_steps_done']),
                'stopped_early': bool(nve_run_info['stopped_early']),
                'stop_reason': nve_run_info['reason'],
                'min_distance_angstrom': nve_dmin,
                'total_energy_range_ev': float(np.ptp(nve['total_energy'])) if finite else None,
                'mean_temperature': float(np.mean(nve['temperature'])) if finite else None,
            }

        entry['stable'] = not entry_reasons
        entry['reasons'] = entry_reasons
        per_temperature.append(entry)
        reasons += [f'T = {target:g} K: {reason}' for reason in entry_reasons]

    drift = per_temperature[0]['drift_mev_per_atom_per_ps'] if per_temperature else None
    stability = {
        'stable': not reasons,
        'reasons': reasons,
        'per_temperature': per_temperature,
        'temperatures': [entry['temperature'] for entry in per_temperature],
        'drift_mev_per_atom_per_ps': drift,
        'drift_temperature': per_temperature[0]['temperature'] if nve_info is not None else None,
        'min_distance_angstrom': min(
            [e['min_distance_angstrom'] for e in per_temperature if e['min_distance_angstrom'] is not None]
            + [e['nve']['min_distance_angstrom'] for e in per_temperature
               if 'nve' in e and e['nve']['min_distance_angstrom'] is not None],
            default=None,
        ),
        'thresholds': thresholds,
        'n_atoms': n_atoms,
        'steps': steps,
        'nve_steps': nve_steps if nve_info is not None else 0,
        'timestep_fs': float(nvt_info['timestep_fs']),
        'equilibration_fraction': fraction,
        'committee': bool(nvt_info.get('committee', False)),
    }
    outputs = {'stability': orm.Dict(stability)}
    if rdf_rows:
        rdf_node = orm.ArrayData()
        rdf_node.set_array('r', rdf_centres)
        rdf_node.set_array('edges', rdf_edges)
        rdf_node.set_array('g', np.vstack(rdf_rows))
        rdf_node.set_array('temperatures', np.array(stability['temperatures'], dtype=float))
        outputs['rdf'] = rdf_node
    return outputs


def thresholds_problem(thresholds) -> str | None:
    """Unknown or non-positive threshold keys (see DEFAULT_MD_THRESHOLDS)."""
    try:
        md_verdict(None, None, None, None, thresholds.get_dict() if isinstance(thresholds, orm.Dict) else thresholds)
    except (ValueError, TypeError) as exception:
        return f'`thresholds`: {exception}'
    return None


def validate_inputs(inputs, ctx=None) -> str | None:
    """Everything that can be checked before the MD is spent: parameters, structure, models, code, thresholds."""
    if ctx is not None and any(name not in ctx for name in ('structure', 'mlip', 'temperatures')):
        return None
    problem = md_parameters_problem(
        temperatures=inputs['temperatures'], steps=inputs['steps'], timestep_fs=inputs['timestep_fs'],
        interval=inputs['interval'], friction=inputs['friction'],
    )  # fmt: skip
    if problem:
        return problem
    temperatures = [float(t) for t in inputs['temperatures'].get_list()]
    if len(set(temperatures)) != len(temperatures):
        return f'`temperatures` has duplicates: {temperatures}'
    nve_steps = int(inputs['nve_steps'].value)
    interval = int(inputs['interval'].value)
    if nve_steps < 0:
        return f'`nve_steps` must be >= 0 (0 = no drift check), got {nve_steps}'
    if 0 < nve_steps < 2 * interval:
        return (
            f'`nve_steps` = {nve_steps} saves fewer than 3 frames with interval {interval}: the drift fit needs '
            f'nve_steps >= 2 * interval (or 0 to skip the drift check)'
        )
    fraction = float(inputs['equilibration_fraction'].value)
    if not 0 <= fraction < 1:
        return f'`equilibration_fraction` must lie in [0, 1), got {fraction}'
    if not float(inputs['rdf_r_max'].value) > 0 or int(inputs['rdf_n_bins'].value) < 1:
        return '`rdf_r_max` must be > 0 Å and `rdf_n_bins` >= 1'
    if 'thresholds' in inputs:
        problem = thresholds_problem(inputs['thresholds'])
        if problem:
            return problem
    if 'supercell' in inputs:
        matrix = np.asarray(inputs['supercell'].get_list())
        if matrix.shape == (3,):
            if not all(float(n).is_integer() and n >= 1 for n in matrix):
                return f'`supercell` must be 3 positive integers or a 3x3 integer matrix, got {matrix.tolist()}'
        elif matrix.shape != (3, 3) or round(abs(np.linalg.det(matrix))) < 1:
            return f'`supercell` must be 3 positive integers or a non-singular 3x3 matrix, got {matrix.tolist()}'
    problem = structure_problem('structure', inputs['structure'])
    if problem:
        return problem
    if int(inputs['min_atoms'].value) < 1:
        return f'`min_atoms` must be >= 1, got {inputs["min_atoms"].value}'
    if md_atom_count(inputs) < 2:
        return ('the MD would run on one atom: its centre of mass is held fixed, so it cannot move and no stability '
                'is tested; give `min_atoms` (e.g. 50) or a `supercell`')
    mlip = inputs['mlip']
    problem = code_problem(mlip.get('code'), 'mlip.md', 'MdStabilityWorkChain')
    if problem:
        return problem
    return models_problem(mlip.get('models') or {}, {'structure': inputs['structure']})


class MdStabilityWorkChain(WorkChain):
    """MD stability of an MLIP: Langevin NVT at several temperatures and an NVE energy-drift run, with a verdict."""

    @classmethod
    def define(cls, spec):
        super().define(spec)
        spec.input('structure', valid_type=orm.StructureData,
                   help='Starting structure (ideally relaxed with the same model). Fully periodic cells also get '
                        'an RDF.')
        spec.expose_inputs(
            MlipMdCalculation, namespace='mlip', exclude=MD_PORTS_SET_BY_WORKFLOW,
            namespace_options={'help': 'MLIP engine: the `mlip.md` code, the model (or committee) and job options '
                                       '(threads, dtype, metadata.options).'},
        )
        spec.input('temperatures', valid_type=orm.List, default=lambda: orm.List(list(DEFAULT_TEMPERATURES)),
                   help='NVT target temperatures in K (> 0, distinct). The NVE drift run uses the first one.')
        spec.input('steps', valid_type=orm.Int, default=lambda: orm.Int(DEFAULT_STEPS),
                   help='NVT steps per temperature (default 200 = 0.2 ps at 1 fs: a smoke test; use >= 10 ps '
                        'for a production stability claim).')
        spec.input('nve_steps', valid_type=orm.Int, default=lambda: orm.Int(DEFAULT_NVE_STEPS),
                   help='Steps of the NVE energy-drift run at the first temperature; 0 skips the drift check.')
        spec.input('timestep_fs', valid_type=orm.Float, default=lambda: orm.Float(DEFAULT_TIMESTEP_FS),
                   help='Timestep in fs for NVT and NVE (docs/sources.md: 0.5-1 fs, up to 2; refused above 5).')
        spec.input('interval', valid_type=orm.Int, default=lambda: orm.Int(DEFAULT_INTERVAL),
                   help='Save a frame every `interval` steps (the engine checks distances at EVERY step).')
        spec.input('seed', valid_type=orm.Int, default=lambda: orm.Int(1),
                   help='Seed of velocities and Langevin noise (reproducible runs).')
        spec.input('friction', valid_type=orm.Float, default=lambda: orm.Float(DEFAULT_FRICTION),
                   help='Langevin friction in 1/fs (0.02/fs = 50 fs relaxation time: with the default 200 steps '
                        'the thermostat brings the system from the equipartition dip back to the target).')
        spec.input('equilibration_fraction', valid_type=orm.Float,
                   default=lambda: orm.Float(DEFAULT_EQUILIBRATION_FRACTION),
                   help='Leading fraction of every NVT run excluded from the temperature statistics and the RDF '
                        '(the minimum-distance check always uses every frame).')
        spec.input('supercell', valid_type=orm.List, required=False,
                   help='Repeat the structure first: 3 positive integers or a 3x3 integer matrix.')
        spec.input('min_atoms', valid_type=orm.Int, default=lambda: orm.Int(1),
                   help='Then repeat the cell n x n x n, with the smallest n that gives at least this many atoms: '
                        'a primitive cell of one or two atoms is no test of stability (one atom cannot move at all).')
        spec.input('thresholds', valid_type=orm.Dict, required=False,
                   help='Overrides of aiida_mlip.analysis.md.DEFAULT_MD_THRESHOLDS: min_distance_angstrom (1.0), '
                        'drift_mev_per_atom_per_ps (1.0; docs/sources.md 0.1-1), temperature_rel_deviation (0.5).')
        spec.input('rdf_r_max', valid_type=orm.Float, default=lambda: orm.Float(DEFAULT_RDF_R_MAX),
                   help='Largest RDF distance in Å, capped at half the smallest cell width (minimum image).')
        spec.input('rdf_n_bins', valid_type=orm.Int, default=lambda: orm.Int(DEFAULT_RDF_N_BINS),
                   help='Number of RDF bins on [0, r_max].')
        spec.input('fail_on_unstable', valid_type=orm.Bool, default=lambda: orm.Bool(False),
                   help='Exit with 520 ERROR_UNSTABLE when the verdict is unstable (default: exit 0 with '
                        "stability['stable'] False, so comparisons see the numbers).")
        spec.inputs.validator = validate_inputs

        spec.outline(cls.setup, cls.run_md, cls.inspect_md, cls.analyse, cls.results)

        spec.output('stability', valid_type=orm.Dict,
                    help="'stable' (bool), 'reasons' (list), 'per_temperature' (list: temperature, "
                         "min_distance_angstrom, temperature_stats, temperature_rel_deviation, stopped_early, "
                         "stop_reason, n_steps_done, rdf_first_peak_angstrom, drift_mev_per_atom_per_ps and 'nve' "
                         "for the first temperature, stable, reasons), 'drift_mev_per_atom_per_ps', "
                         "'min_distance_angstrom', 'thresholds', ...")
        spec.output('rdf', valid_type=orm.ArrayData, required=False,
                    help="g(r) after equilibration per temperature: 'r', 'edges' (Å), 'g' (n_T, n_bins), "
                         "'temperatures'. Only for fully periodic cells.")
        spec.output('structure', valid_type=orm.StructureData, required=False,
                    help='The supercell the MD ran on (only when `supercell` or `min_atoms` made one).')

        spec.exit_code(410, 'ERROR_MD_FAILED', message='The {ensemble} MD calculation failed: {reason}')
        spec.exit_code(520, 'ERROR_UNSTABLE',
                       message='The model is unstable in MD (outputs are attached): {reasons}')

    def setup(self):
        """The cell the MD runs on (supercell in the graph when asked for) and the complete thresholds."""
        structure = self.inputs.structure
        if 'supercell' in self.inputs:
            structure = make_supercell(structure, self.inputs.supercell, metadata={'call_link_label': 'supercell'})
        repetitions = repetitions_for(len(structure.sites), self.inputs.min_atoms.value)
        if repetitions > 1:
            structure = make_supercell(structure, orm.List([repetitions] * 3),
                                       metadata={'call_link_label': 'supercell_min_atoms'})
            self.report(f'MD on the cell repeated {repetitions}x{repetitions}x{repetitions}: {len(structure.sites)} '
                        f'atoms (min_atoms {self.inputs.min_atoms.value})')
        if structure is not self.inputs.structure:
            self.out('structure', structure)
        self.ctx.structure = structure
        thresholds = dict(DEFAULT_MD_THRESHOLDS)
        if 'thresholds' in self.inputs:
            thresholds.update({key: float(value) for key, value in self.inputs.thresholds.get_dict().items()})
        self.ctx.thresholds = thresholds

    def _md_inputs(self, ensemble: str, temperatures: list, steps: int) -> AttributeDict:
        inputs = AttributeDict(self.exposed_inputs(MlipMdCalculation, namespace='mlip'))
        inputs.structure = self.ctx.structure
        inputs.temperatures = orm.List(temperatures)
        inputs.steps = orm.Int(steps)
        inputs.timestep_fs = self.inputs.timestep_fs
        inputs.interval = self.inputs.interval
        inputs.seed = self.inputs.seed
        inputs.friction = self.inputs.friction
        inputs.ensemble = orm.Str(ensemble)
        # The engine stops a run at the collapse threshold, checked at every step (not only on saved frames).
        inputs.min_distance = orm.Float(self.ctx.thresholds['min_distance_angstrom'])
        inputs.metadata = {**inputs.get('metadata', {}), 'call_link_label': f'md_{ensemble}'}
        return inputs

    def run_md(self):
        """ONE NVT calculation for all temperatures and, in parallel, the NVE drift run at the first temperature."""
        temperatures = [float(t) for t in self.inputs.temperatures.get_list()]
        n_atoms = len(self.ctx.structure.sites)
        futures = {}
        node = self.submit(MlipMdCalculation, **self._md_inputs('nvt', temperatures, self.inputs.steps.value))
        self.report(f'launched MlipMdCalculation<{node.pk}>: NVT at {temperatures} K, {self.inputs.steps.value} '
                    f'steps, {n_atoms} atoms')
        futures['nvt'] = node
        if self.inputs.nve_steps.value > 0:
            inputs = self._md_inputs('nve', temperatures[:1], self.inputs.nve_steps.value)
            node = self.submit(MlipMdCalculation, **inputs)
            self.report(f'launched MlipMdCalculation<{node.pk}>: NVE drift run at {temperatures[0]} K, '
                        f'{self.inputs.nve_steps.value} steps')
            futures['nve'] = node
        return ToContext(**futures)

    def inspect_md(self):
        for ensemble in ('nvt', 'nve'):
            node = self.ctx.get(ensemble)
            if node is not None and not node.is_finished_ok:
                reason = f'{node.process_label}<{node.pk}> exit {node.exit_status}: {node.exit_message}'
                return self.exit_codes.ERROR_MD_FAILED.format(ensemble=ensemble.upper(), reason=reason)
        return None

    def analyse(self):
        nvt = self.ctx.nvt
        runs = {}
        for key in nvt.outputs.trajectories:
            runs[f'nvt_trajectory_{key}'] = nvt.outputs.trajectories[key]
            runs[f'nvt_thermo_{key}'] = nvt.outputs.thermo[key]
        nve = self.ctx.get('nve')
        if nve is not None:
            runs['nve_summary'] = nve.outputs.summary
            runs['nve_trajectory_run_000'] = nve.outputs.trajectories['run_000']
            runs['nve_thermo_run_000'] = nve.outputs.thermo['run_000']
        parameters = orm.Dict({
            'thresholds': self.ctx.thresholds,
            'steps': int(self.inputs.steps.value),
            'nve_steps': int(self.inputs.nve_steps.value),
            'equilibration_fraction': float(self.inputs.equilibration_fraction.value),
            'rdf_r_max': float(self.inputs.rdf_r_max.value),
            'rdf_n_bins': int(self.inputs.rdf_n_bins.value),
        })  # fmt: skip
        results = analyse_md_stability(
            parameters=parameters, nvt_summary=nvt.outputs.summary, **runs,
            metadata={'call_link_label': 'analysis'},
        )  # fmt: skip
        self.out('stability', results['stability'])
        if 'rdf' in results:
            self.out('rdf', results['rdf'])
        self.ctx.stability = results['stability']

    def results(self):
        stability = self.ctx.stability
        drift = stability.get('drift_mev_per_atom_per_ps')
        drift_text = 'not measured' if drift is None else f'{drift:.4f} meV/atom/ps'
        if stability['stable']:
            self.report(f'stable at {stability["temperatures"]} K; NVE drift {drift_text}; minimum distance '
                        f'{stability["min_distance_angstrom"]:.3f} Å')
            return None
        reasons = '; '.join(stability['reasons'])
        self.report(f'UNSTABLE: {reasons}')
        if self.inputs.fail_on_unstable.value:
            return self.exit_codes.ERROR_UNSTABLE.format(reasons=reasons)
        return None
