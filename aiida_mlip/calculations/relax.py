"""``mlip.relax``: relax many structures (positions, and the cell unless fixed) with an MLIP or committee in ONE job.

All structures go into one extxyz and the models into the job folder; the job runs
``<python> -m aiida_mlip.engine.relax`` (:mod:`aiida_mlip.engine.relax`), which loads the model(s) once and relaxes
every structure with ASE BFGS (through ``FrechetCellFilter`` when ``relax_cell`` is True) to ``fmax`` within
``steps``; a committee relaxes on its MEAN energy/forces/stress.

Outputs (parser :mod:`aiida_mlip.parsers.relax`): ``relaxed_structures`` (same keys as ``structures``) and ``summary``
(per structure energy, converged, n_steps, residual fmax). A structure that did not reach ``fmax`` gives exit code
501 ``ERROR_NOT_CONVERGED``, with every output still attached.
"""
from __future__ import annotations

from typing import Optional

from aiida import orm

from aiida_mlip.calculations.engine_job import (
    EngineCalcJob, _value, check_models_cover, engine_options_problem, models_type_problem, structure_to_atoms,
)

#: Files of the job folder (names are part of the parser contract).
STRUCTURES_FILENAME = 'relax_input.extxyz'
KEYS_FILENAME = 'relax_keys.json'
RESULTS_FILENAME = 'relaxed.npz'
SUMMARY_FILENAME = 'relax.json'
RELAXED_FILENAME = 'relaxed.extxyz'
ENGINE_MODULE = 'aiida_mlip.engine.relax'

#: Default force threshold (eV/Å); docs/sources.md: fmax <= 0.001-0.005 eV/Å before phonons.
DEFAULT_FMAX = 0.005
DEFAULT_STEPS = 500


def relax_parameters_problem(fmax=None, steps=None, threads=None, dtype=None) -> Optional[str]:
    """``fmax > 0`` (eV/Å), ``steps >= 1``, and the shared engine options; None-valued arguments are skipped."""
    if fmax is not None and not float(_value(fmax)) > 0:
        return f'`fmax` must be > 0 eV/Å, got {_value(fmax)}'
    if steps is not None and int(_value(steps)) < 1:
        return f'`steps` must be >= 1, got {_value(steps)}'
    return engine_options_problem(threads=threads, dtype=dtype)


def validate_inputs(value, ctx=None) -> Optional[str]:
    """Refuse impossible relaxations before any CalcJob node exists: parameters, models, structures, elements."""
    problem = relax_parameters_problem(value.get('fmax'), value.get('steps'), value.get('threads'),
                                       value.get('dtype'))
    if problem:
        return problem
    # Exposed in a WorkChain with the structure/model ports excluded: those checks move to the WorkChain.
    if ctx is not None and any(name not in ctx for name in ('models', 'structures')):
        return None
    models = value.get('models') or {}
    problem = models_type_problem(models)
    if problem:
        return problem
    if not value.get('structures'):
        return 'nothing to relax: give a non-empty `structures` namespace'
    return check_models_cover(models, structures=value['structures'])


class MlipRelaxCalculation(EngineCalcJob):
    """Relax many structures with an MLIP (or committee mean) in one job and one model load."""

    ENGINE_MODULE = ENGINE_MODULE
    PARSER_NAME = 'mlip.relax'
    ENGINE_LABEL = 'relaxation'
    MODELS_HELP = ('MLIP models by key: one = single model, several = committee (the committee MEAN energy, forces '
                   'and stress drive the relaxation).')
    STRUCTURES_FILENAME = STRUCTURES_FILENAME
    RESULTS_FILENAME = RESULTS_FILENAME
    SUMMARY_FILENAME = SUMMARY_FILENAME
    KEYS_FILENAME = KEYS_FILENAME
    EXTRA_RETRIEVE = (RELAXED_FILENAME,)

    @classmethod
    def define(cls, spec):
        super().define(spec)
        spec.input_namespace('structures', valid_type=orm.StructureData, dynamic=True, required=False,
                             help='The structures to relax, by key (relaxed in sorted-key order).')
        spec.input('fmax', valid_type=orm.Float, default=lambda: orm.Float(DEFAULT_FMAX),
                   help='Force threshold in eV/Å (with the cell free also on the cell forces of FrechetCellFilter); '
                        'docs/sources.md: 0.001-0.005 eV/Å before phonons.')
        spec.input('steps', valid_type=orm.Int, default=lambda: orm.Int(DEFAULT_STEPS),
                   help='Maximum optimiser (ASE BFGS) steps per structure.')
        spec.input('relax_cell', valid_type=orm.Bool, default=lambda: orm.Bool(True),
                   help='Relax the cell too (FrechetCellFilter, zero pressure); False: positions only.')
        spec.inputs.validator = validate_inputs

        spec.output_namespace('relaxed_structures', valid_type=orm.StructureData, dynamic=True,
                              help='The relaxed structures, same keys as `structures`.')
        spec.output('summary', valid_type=orm.Dict,
                    help="'structures': per key energy (eV), converged, n_steps, residual_fmax (eV/Å), max_force, "
                         'volumes, stress (eV/Å³); n_converged, all_converged, fmax, steps, relax_cell, '
                         'model_sha256...')
        spec.default_output_node = 'summary'
        spec.exit_code(501, 'ERROR_NOT_CONVERGED',
                       message='Not every structure reached fmax within `steps` (outputs attached): {message}')

    # ---- the job folder (EngineCalcJob.prepare_for_submission) ---------------------------------------
    def _keys(self) -> list:
        return sorted(self.inputs.get('structures', {}))

    def engine_frames(self) -> list:
        return [structure_to_atoms(self.inputs.structures[key]) for key in self._keys()]

    def job_keys(self) -> dict:
        return {'keys': self._keys()}

    def engine_arguments(self) -> list:
        arguments = ['--structures', STRUCTURES_FILENAME, '--output', RELAXED_FILENAME,
                     '--arrays', RESULTS_FILENAME, '--summary', SUMMARY_FILENAME,
                     '--fmax', repr(float(self.inputs.fmax.value)), '--steps', str(int(self.inputs.steps.value))]
        if not self.inputs.relax_cell.value:
            arguments.append('--fix-cell')
        return arguments
