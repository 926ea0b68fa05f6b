"""``mlip.md``: molecular dynamics with one MLIP or a committee, every (starting cell, temperature) pair in ONE job.

The job runs ``<python> -m aiida_mlip.engine.md`` (:mod:`aiida_mlip.engine.md`), which loads the model(s) once and
runs one trajectory per (starting cell, temperature) pair: Langevin NVT (``ensemble='nvt'``) or velocity-Verlet NVE
(``ensemble='nve'``). A trajectory that blows up (non-finite energy/forces, or two atoms closer than
``min_distance``) is stopped by the engine and reported with ``stopped_early`` and a ``reason``; that is a *result*
(the calculation still finishes with exit status 0, see the parser), so a stability workflow can judge the model.

Run order (the ``run_###`` keys of the output namespaces): for every starting cell (sorted ``structures`` keys, or
the single ``structure``), every temperature in the given order, i.e. run ``k = cell_index * n_temperatures +
temperature_index``. The map is in ``md_keys.json`` and in the ``summary`` output. Run ``k`` draws its velocities and
Langevin noise from ``numpy.random.default_rng([seed, k])``: the same inputs give the same trajectories.
"""
from __future__ import annotations

import numbers
from typing import Any, Mapping, Optional

from aiida import orm

from aiida_mlip.calculations.engine_job import (  # noqa: F401  (re-exported)
    DTYPES, EXIT_CODE_FILENAME, MODEL_FILENAME, STDERR_FILENAME, STDOUT_FILENAME, EngineCalcJob, _value,
    check_models_cover, engine_options_problem, model_filename, models_type_problem, structure_to_atoms,
)
from aiida_mlip.workflows.checks import structure_problem

#: Files of the job folder (names are part of the parser contract).
STRUCTURES_FILENAME = 'md_input.extxyz'
KEYS_FILENAME = 'md_keys.json'
RESULTS_FILENAME = 'md.npz'
SUMMARY_FILENAME = 'md.json'
TRAJECTORY_FILENAME = 'md.extxyz'
ENGINE_MODULE = 'aiida_mlip.engine.md'

ENSEMBLES = ('nvt', 'nve')
#: Largest accepted timestep (fs). docs/sources.md: 0.5-1 fs is customary, up to 2 fs; beyond ~5 fs no atomistic MD of
#: anything but the heaviest elements integrates stably, so a larger value is taken for a unit mistake.
MAX_TIMESTEP_FS = 5.0
#: Default engine stop distance (Å): closer atoms end the trajectory as ``stopped_early``.
DEFAULT_MIN_DISTANCE = 0.3


def run_key(index: int) -> str:
    """Output namespace key of run ``index`` (zero-padded so that sorted keys follow the run order)."""
    return f'run_{index:03d}'


def temperatures_problem(temperatures) -> Optional[str]:
    """Why a temperature list cannot be run (empty, not numbers, zero/negative/non-finite), or None."""
    values = temperatures.get_list() if isinstance(temperatures, orm.List) else list(temperatures)
    if not values:
        return '`temperatures` is empty: give at least one temperature in K'
    for value in values:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            return f'`temperatures` must be numbers in K, got {value!r}'
        if not float(value) > 0 or float(value) == float('inf'):
            return (
                f'temperature {value} K is not allowed: temperatures must be finite and > 0 K (a Langevin thermostat '
                'and Maxwell-Boltzmann velocities need a positive temperature; for a structure at rest use a '
                'relaxation)'
            )
    return None


def md_parameters_problem(
    temperatures=None, steps=None, timestep_fs=None, interval=None, ensemble=None, friction=None, threads=None,
    min_distance=None, dtype=None,
) -> Optional[str]:
    """Checks of the scalar MD parameters shared by the CalcJob and the workflows; arguments that are None are
    skipped. Returns the first problem as a message, or None."""
    if temperatures is not None:
        problem = temperatures_problem(temperatures)
        if problem:
            return problem
    if steps is not None and int(_value(steps)) < 1:
        return f'`steps` must be >= 1, got {_value(steps)}'
    if timestep_fs is not None:
        dt = float(_value(timestep_fs))
        if not 0 < dt <= MAX_TIMESTEP_FS:
            return (
                f'`timestep_fs` must lie in (0, {MAX_TIMESTEP_FS}] fs, got {dt}: MLIP MD uses 0.5-1 fs (up to 2 fs); '
                'the value is in femtoseconds'
            )
    if interval is not None and int(_value(interval)) < 1:
        return f'`interval` must be >= 1, got {_value(interval)}'
    if ensemble is not None and _value(ensemble) not in ENSEMBLES:
        return f'`ensemble` must be one of {ENSEMBLES}, got {_value(ensemble)!r}'
    if friction is not None and not float(_value(friction)) > 0:
        return f'`friction` (Langevin, 1/fs) must be > 0, got {_value(friction)}'
    if min_distance is not None and not float(_value(min_distance)) > 0:
        return f'`min_distance` must be > 0 Å, got {_value(min_distance)}'
    return engine_options_problem(threads=threads, dtype=dtype)


def models_problem(models: Mapping[str, Any], structures: Mapping[str, orm.StructureData]) -> Optional[str]:
    """At least one ``MlipModel``; every element of every structure known to every model (names what is missing)."""
    return models_type_problem(models) or check_models_cover(models, structures)


def starting_structures(inputs: Mapping[str, Any]) -> dict:
    """``{key: StructureData}`` of the starting cells: the ``structures`` namespace, or ``{'structure': ...}``."""
    if inputs.get('structures'):
        return dict(inputs['structures'])
    if inputs.get('structure') is not None:
        return {'structure': inputs['structure']}
    return {}


def validate_inputs(value, ctx=None) -> Optional[str]:
    """Refuse impossible MD before any CalcJob node exists.

    Temperatures finite and > 0 K; ``0 < timestep_fs <= 5``; ``steps >= 1``; ``interval >= 1``; ensemble nvt|nve;
    exactly one of ``structure`` / ``structures``, each with atoms and no overlapping atoms; every element covered
    by every model (the message names the elements, the model and the structures).
    """
    problem = md_parameters_problem(
        temperatures=value.get('temperatures'), steps=value.get('steps'), timestep_fs=value.get('timestep_fs'),
        interval=value.get('interval'), ensemble=value.get('ensemble'), friction=value.get('friction'),
        threads=value.get('threads'), min_distance=value.get('min_distance'), dtype=value.get('dtype'),
    )  # fmt: skip
    if problem:
        return problem
    # Exposed in a WorkChain with the structure/model ports excluded: those checks move to the WorkChain.
    if ctx is not None and any(name not in ctx for name in ('models', 'structure', 'structures')):
        return None
    has_one = value.get('structure') is not None
    has_many = bool(value.get('structures'))
    if has_one and has_many:
        return 'give either `structure` or `structures`, not both'
    if not has_one and not has_many:
        return 'no starting structure: give `structure` or a non-empty `structures` namespace'
    structures = starting_structures(value)
    for key in sorted(structures):
        problem = structure_problem(key, structures[key])
        if problem:
            return problem
    return models_problem(value.get('models') or {}, structures)


class MlipMdCalculation(EngineCalcJob):
    """Langevin-NVT or NVE molecular dynamics with an MLIP (or committee) for several temperatures in one job."""

    ENGINE_MODULE = ENGINE_MODULE
    PARSER_NAME = 'mlip.md'
    ENGINE_LABEL = 'MD'
    MODELS_HELP = ('MLIP models by key: one = single model, several = committee (the committee mean drives the '
                   'dynamics; the per-frame committee deviation is recorded).')
    STRUCTURES_FILENAME = STRUCTURES_FILENAME
    RESULTS_FILENAME = RESULTS_FILENAME
    SUMMARY_FILENAME = SUMMARY_FILENAME
    KEYS_FILENAME = KEYS_FILENAME
    EXTRA_RETRIEVE = (TRAJECTORY_FILENAME,)

    @classmethod
    def define(cls, spec):
        super().define(spec)
        spec.input('structure', valid_type=orm.StructureData, required=False,
                   help='The starting structure. Exclusive with `structures`.')
        spec.input_namespace(
            'structures', valid_type=orm.StructureData, dynamic=True, required=False,
            help='Several starting structures by key (runs follow the sorted keys). Exclusive with `structure`.',
        )  # fmt: skip
        spec.input('temperatures', valid_type=orm.List,
                   help='Target temperatures in K (> 0), one run per temperature and starting structure, in order.')
        spec.input('steps', valid_type=orm.Int, help='MD steps per run (>= 1).')
        spec.input('timestep_fs', valid_type=orm.Float, default=lambda: orm.Float(1.0),
                   help='Timestep in fs, 0 < dt <= 5 (docs/sources.md: 0.5-1 fs is customary, up to 2 fs).')
        spec.input('interval', valid_type=orm.Int, default=lambda: orm.Int(10),
                   help='Save a frame every `interval` steps (and step 0, and the last frame of a stopped run).')
        spec.input('seed', valid_type=orm.Int, default=lambda: orm.Int(1),
                   help='Seed of the velocities and the Langevin noise; run k uses default_rng([seed, k]).')
        spec.input('ensemble', valid_type=orm.Str, default=lambda: orm.Str('nvt'),
                   help="'nvt' (Langevin thermostat) or 'nve' (velocity Verlet; energy conservation tests).")
        spec.input('friction', valid_type=orm.Float, default=lambda: orm.Float(0.01),
                   help='Langevin friction in 1/fs (0.01/fs = 100 fs relaxation time); ignored for NVE.')
        spec.input('min_distance', valid_type=orm.Float, default=lambda: orm.Float(DEFAULT_MIN_DISTANCE),
                   help='Stop a run (stopped_early, with the reason) when two atoms come closer than this (Å); '
                        'checked every step, not only on saved frames.')
        spec.inputs.validator = validate_inputs

        spec.output_namespace(
            'trajectories', valid_type=orm.TrajectoryData, dynamic=True,
            help="One TrajectoryData per run, keyed run_000, run_001, ... (see `summary['runs']`): saved frames with "
                 "positions, cells, pbc, step ids and times (fs); the extra arrays 'potential_energy' (eV) and "
                 "'temperature' (K) per frame.",
        )  # fmt: skip
        spec.output_namespace(
            'thermo', valid_type=orm.ArrayData, dynamic=True,
            help="One ArrayData per run (same keys): 'step', 'times_fs', 'potential_energy', 'kinetic_energy', "
                 "'total_energy' (eV), 'temperature' (K); committees also 'max_force_deviation' (eV/Å), "
                 "'energy_std' (eV).",
        )  # fmt: skip
        spec.output(
            'summary', valid_type=orm.Dict,
            help="'runs': per run key, structure_key, temperature, stopped_early, reason, n_steps_done, n_frames, "
                 "n_atoms, wall_seconds; n_runs, n_stopped_early, ensemble, timestep_fs, steps, seed, model_sha256, "
                 "versions, ...",
        )  # fmt: skip
        spec.default_output_node = 'summary'

    # ---- the job folder (EngineCalcJob.prepare_for_submission) ---------------------------------------
    def engine_frames(self) -> list:
        structures = starting_structures(self.inputs)
        return [structure_to_atoms(structures[key]) for key in sorted(structures)]

    def job_keys(self) -> dict:
        structure_keys = sorted(starting_structures(self.inputs))
        temperatures = self._temperatures()
        pairs = [(s, t) for s in structure_keys for t in temperatures]
        runs = [
            {'key': run_key(index), 'structure_key': structure_key, 'temperature': temperature}
            for index, (structure_key, temperature) in enumerate(pairs)
        ]
        return {'structure_keys': structure_keys, 'temperatures': temperatures, 'runs': runs}

    def engine_arguments(self) -> list:
        return ['--structure', STRUCTURES_FILENAME,
                '--temperature', *[repr(t) for t in self._temperatures()],
                '--steps', str(int(self.inputs.steps.value)),
                '--timestep', repr(float(self.inputs.timestep_fs.value)),
                '--interval', str(int(self.inputs.interval.value)),
                '--seed', str(int(self.inputs.seed.value)),
                '--ensemble', self.inputs.ensemble.value,
                '--friction', repr(float(self.inputs.friction.value)),
                '--min-distance', repr(float(self.inputs.min_distance.value)),
                '--output', RESULTS_FILENAME, '--summary', SUMMARY_FILENAME, '--trajectory', TRAJECTORY_FILENAME]

    def _temperatures(self) -> list:
        return [float(t) for t in self.inputs.temperatures.get_list()]
