"""One property workflow, two engines: the cells of a property are evaluated by DFT or by an MLIP.

A property WorkChain makes its cells, hands them to :class:`EngineMixin`, and gets back ONE ``mlip.dataset``
of evaluated frames (energy, forces, stress, in the order of the sorted cell keys), whichever engine ran:

* ``dft``: a ``DftLabelingWorkChain`` (one PwBaseWorkChain per cell, same settings for all cells); its
  output dataset is the result, and doubles as training data;
* ``mlip``: ONE ``MlipEvaluateCalculation`` for all cells (one model load); its arrays are turned into a
  dataset by the ``predictions_to_dataset`` calcfunction.

The fits downstream therefore compare like with like, and every number traces back to its calculation.

Optional relaxation first (:meth:`EngineMixin.define_relax`, inputs ``relax``/``relax_cell``, default OFF): the
input structure is relaxed with the SAME engine before the property cells are made, and the property is computed
on the relaxed structure (output ``relaxed_structure``):

* ``dft``: one ``PwBaseWorkChain`` with ``CONTROL.calculation`` ``'vc-relax'`` (``'relax'`` with ``relax_cell``
  False), built from the ``dft.pw_base`` inputs and the pseudos of ``dft.pseudo_family``; ``forc_conv_thr`` is
  ``relax_fmax`` converted to Ry/Bohr; the result is its ``output_structure``;
* ``mlip``: one ``MlipRelaxCalculation`` (``mlip.relax``) with the models/dtype/threads of the ``mlip`` namespace.
  Its code is the optional input ``relax_code``; without it, the first ``mlip.relax`` code on the computer of
  ``mlip.code`` is used (``aiida-mlip setup`` / ``ensure_mlip_codes`` installs one, label ``mlip-relax``).

:meth:`EngineMixin.submit_relaxations` relaxes several structures the same way (DFT one PwBaseWorkChain each,
MLIP one job for all), e.g. the strained cells of ``mlip.elastic`` at fixed cell.
"""
from __future__ import annotations

from aiida import orm
from aiida.common import AttributeDict
from aiida.engine import ToContext
from aiida.plugins import CalculationFactory

from aiida_mlip.calculations.datasets import predictions_to_dataset
from aiida_mlip.calculations.engine_job import scheduler_options
from aiida_mlip.workflows.labeling import DftLabelingWorkChain, load_pseudo_family

MlipEvaluateCalculation = CalculationFactory('mlip.evaluate')

#: eV/Å -> Ry/Bohr (pw.x forc_conv_thr)
EV_PER_A_TO_RY_PER_BOHR = 1.0 / 25.71104309541616
#: PwBaseWorkChain ERROR_IONIC_CONVERGENCE_REACHED_EXCEPT_IN_FINAL_SCF: the relaxed structure is kept.
DFT_RELAX_FINAL_SCF_EXIT = 501

ENGINE_NAMESPACES = ('dft', 'mlip')


def validate_engine(inputs, _) -> str | None:
    """Exactly one engine namespace must be given."""
    given = [name for name in ENGINE_NAMESPACES if inputs.get(name)]
    if len(given) != 1:
        return f'give exactly one engine, `dft` or `mlip` (got {given or "none"})'
    return None


def find_relax_code(computer):
    """The first (lowest pk) code with the ``mlip.relax`` plugin on ``computer``, or None."""
    query = orm.QueryBuilder().append(
        orm.AbstractCode, filters={'attributes.input_plugin': 'mlip.relax'}, project='*', tag='code'
    ).order_by({'code': {'id': 'asc'}})
    for (code,) in query.iterall():
        if getattr(code, 'computer', None) is not None and code.computer.pk == computer.pk:
            return code
    return None


def validate_relax(inputs, _=None) -> str | None:
    """Checks of the relaxation inputs (only when ``relax`` is True): parameters and, for the MLIP, a relax code."""
    if 'relax' not in inputs or not inputs['relax'].value:
        return None
    if not inputs['relax_fmax'].value > 0:
        return f'`relax_fmax` must be > 0 eV/Å, got {inputs["relax_fmax"].value}'
    if inputs['relax_steps'].value < 1:
        return f'`relax_steps` must be >= 1, got {inputs["relax_steps"].value}'
    return relax_code_problem(inputs, 'relax=True')


def relax_code_problem(inputs, why: str) -> str | None:
    """With the mlip engine: why no `mlip.relax` code is available for a relaxation (``why`` names the cause)."""
    if not inputs.get('mlip'):
        return None
    code = inputs.get('relax_code')
    if code is not None:
        if code.default_calc_job_plugin != 'mlip.relax':
            return f'`relax_code` must be a code for the `mlip.relax` plugin, got `{code.default_calc_job_plugin}`'
        return None
    evaluate_code = inputs['mlip'].get('code')
    if evaluate_code is not None and find_relax_code(evaluate_code.computer) is None:
        return (f'{why} with the mlip engine needs an `mlip.relax` code: give `relax_code`, or install one on '
                f'computer `{evaluate_code.computer.label}` (`aiida-mlip setup`, ensure_mlip_codes)')
    return None


def dft_relax_inputs(dft: dict, structure: orm.StructureData, relax_cell: bool, fmax: float, steps: int,
                     conv_thr_per_atom: float | None = None) -> AttributeDict:
    """PwBaseWorkChain inputs of a (vc-)relax from ``dft`` (the inputs of a ``dft`` namespace exposing
    DftLabelingWorkChain): the same pw_base settings and pseudos as the labels."""
    inputs = AttributeDict(dft['pw_base'])
    inputs.pw = AttributeDict(inputs.pw)
    inputs.pw.structure = structure
    inputs.pw.pseudos = load_pseudo_family(dft['pseudo_family'].value).get_pseudos(structure=structure)
    parameters = inputs.pw.parameters.get_dict()
    control = parameters.setdefault('CONTROL', {})
    control['calculation'] = 'vc-relax' if relax_cell else 'relax'
    control['forc_conv_thr'] = fmax * EV_PER_A_TO_RY_PER_BOHR
    control['nstep'] = steps
    control.setdefault('tstress', True)
    control.setdefault('tprnfor', True)
    parameters.setdefault('IONS', {})
    if relax_cell:
        parameters.setdefault('CELL', {}).setdefault('cell_dofree', 'all')
    electrons = parameters.setdefault('ELECTRONS', {})
    if 'conv_thr_per_atom' in dft:
        electrons['conv_thr'] = dft['conv_thr_per_atom'].value * len(structure.sites)
    if conv_thr_per_atom is not None:
        tight = conv_thr_per_atom * len(structure.sites)
        electrons['conv_thr'] = min(electrons.get('conv_thr', tight), tight)
    inputs.pw.parameters = orm.Dict(parameters)
    if 'clean_workdir' in dft:
        inputs.clean_workdir = dft['clean_workdir']
    return inputs


def dft_relaxed_structure(node, report) -> tuple:
    """(output structure, None) of a finished pw.x (vc-)relax PwBaseWorkChain, or (None, reason).

    Exit 501: the ionic (and cell) minimisation converged, only the final SCF in the new plane-wave basis of a
    vc-relax exceeds the thresholds (Pulay stress at low cutoffs); aiida-quantumespresso's PwBaseWorkChain then keeps
    the structure as final. It is accepted, with a warning through ``report``.
    """
    final_scf_only = node.is_finished and node.exit_status == DFT_RELAX_FINAL_SCF_EXIT
    if not (node.is_finished_ok or final_scf_only) or 'output_structure' not in node.outputs:
        return None, f'{node.process_label}<{node.pk}> exit {node.exit_status}: {node.exit_message}'
    if final_scf_only:
        report(f'warning: {node.process_label}<{node.pk}>: {node.exit_message} The relaxed structure is used; raise '
               'the cutoffs (ecutwfc/ecutrho) to remove the Pulay stress.')
    return node.outputs.output_structure, None


class EngineMixin:
    """Adds the ``dft``/``mlip`` input namespaces and the submit/collect steps to a property WorkChain."""

    @classmethod
    def define_engine(cls, spec):
        spec.expose_inputs(
            DftLabelingWorkChain, namespace='dft', exclude=('structures', 'config_types', 'isolated_atoms'),
            namespace_options={'required': False, 'populate_defaults': False,
                               'help': 'DFT engine: DftLabelingWorkChain inputs (pw.x, pseudo family).'},
        )
        spec.expose_inputs(
            MlipEvaluateCalculation, namespace='mlip', exclude=('structures', 'dataset'),
            namespace_options={'required': False, 'populate_defaults': False,
                               'help': 'MLIP engine: MlipEvaluateCalculation inputs (model or committee, code).'},
        )
        spec.exit_code(410, 'ERROR_ENGINE_FAILED', message='The {engine} evaluation of the cells failed: {reason}')

    @classmethod
    def define_relax(cls, spec):
        """Optional relaxation of the input structure with the same engine (inputs ``relax``... and the output
        ``relaxed_structure``). Use ``if_(cls.should_relax)(cls.run_relax, cls.inspect_relax)`` first in the outline
        and :attr:`structure_to_compute` afterwards; call :func:`validate_relax` in the input validator."""
        spec.input('relax', valid_type=orm.Bool, default=lambda: orm.Bool(False),
                   help='Relax the input structure first with the same engine (default False: use it as given).')
        spec.input('relax_cell', valid_type=orm.Bool, default=lambda: orm.Bool(True),
                   help='With `relax`: relax the cell too (DFT vc-relax, MLIP FrechetCellFilter); False: positions '
                        'only.')
        spec.input('relax_fmax', valid_type=orm.Float, default=lambda: orm.Float(0.005),
                   help='With `relax`: force threshold in eV/Å (docs/sources.md: 0.001-0.005 before phonons); for DFT it '
                        'becomes forc_conv_thr in Ry/Bohr (the cell uses pw.x press_conv_thr, 0.5 kbar by default).')
        spec.input('relax_steps', valid_type=orm.Int, default=lambda: orm.Int(500),
                   help='With `relax` and the mlip engine: maximum optimiser steps (ASE BFGS); DFT: pw.x nstep.')
        spec.input('relax_code', valid_type=orm.AbstractCode, required=False,
                   help='With `relax` and the mlip engine: the `mlip.relax` code; default: the first `mlip.relax` '
                        'code on the computer of `mlip.code`.')
        spec.output('relaxed_structure', valid_type=orm.StructureData, required=False,
                    help='With `relax`: the relaxed structure the property was computed on.')
        spec.exit_code(411, 'ERROR_RELAX_FAILED', message='The {engine} relaxation of the structure failed: {reason}')

    def should_relax(self) -> bool:
        return 'relax' in self.inputs and bool(self.inputs.relax.value)

    @property
    def structure_to_compute(self) -> orm.StructureData:
        """The relaxed structure after :meth:`inspect_relax`, else the input ``structure``."""
        return self.ctx.get('relaxed_structure') or self.inputs.structure

    def run_relax(self):
        """Outline step: relax ``structure`` with the chosen engine."""
        return ToContext(relaxation=self.submit_relax(self.inputs.structure, self.inputs.relax_cell.value, 'relax'))

    def inspect_relax(self):
        """Outline step: the relaxed structure into the context and the outputs, or ERROR_RELAX_FAILED."""
        structure, failure = self.relaxed_structure(self.ctx.relaxation)
        if failure:
            return failure
        self.ctx.relaxed_structure = structure
        self.out('relaxed_structure', structure)
        volumes = (self.inputs.structure.get_cell_volume(), structure.get_cell_volume())
        self.report(f'{self.engine} relaxation: volume {volumes[0]:.3f} -> {volumes[1]:.3f} Å³')
        return None

    def submit_relax(self, structure: orm.StructureData, relax_cell: bool, label: str):
        """Launch the relaxation of ``structure`` (cell too if ``relax_cell``) with the chosen engine."""
        return self.submit_relaxations({'structure': structure}, relax_cell, label)['structure']

    def submit_relaxations(self, structures: dict, relax_cell: bool, label: str, fmax: float | None = None,
                           conv_thr_per_atom: float | None = None, mesh_of: orm.StructureData | None = None) -> dict:
        """Relax every structure of ``structures`` (key -> StructureData): key -> node.

        DFT: one PwBaseWorkChain per structure (labels ``{label}_{key}`` for more than one); MLIP: ONE
        MlipRelaxCalculation for all (the same node under every key). ``fmax`` (eV/Å) defaults to ``relax_fmax``;
        ``conv_thr_per_atom`` (Ry, DFT) to ``dft.conv_thr_per_atom``, and only ever tightens it.
        """
        if fmax is None:
            fmax = self.inputs.relax_fmax.value if 'relax_fmax' in self.inputs else 0.005
        steps = self.inputs.relax_steps.value if 'relax_steps' in self.inputs else 500
        kind = 'positions and cell' if relax_cell else 'positions'
        if self.engine == 'dft':
            from aiida_quantumespresso.workflows.pw.base import PwBaseWorkChain

            nodes = {}
            for key, structure in structures.items():
                inputs = self.dft_relax_inputs(structure, relax_cell, fmax, steps, conv_thr_per_atom, mesh_of)
                link = label if len(structures) == 1 else f'{label}_{key}'
                inputs.metadata = {**inputs.get('metadata', {}), 'call_link_label': link}
                nodes[key] = self.submit(PwBaseWorkChain, **inputs)
                self.report(f'launched PwBaseWorkChain<{nodes[key].pk}> to relax the {kind} ({link})')
            return nodes
        from aiida_mlip.calculations.relax import MlipRelaxCalculation

        mlip = self.exposed_inputs(MlipEvaluateCalculation, namespace='mlip')
        inputs = AttributeDict({'models': mlip['models'], 'structures': dict(structures),
                                'fmax': orm.Float(fmax), 'steps': orm.Int(steps), 'relax_cell': orm.Bool(relax_cell)})
        for name in ('dtype', 'threads'):
            if name in mlip:
                inputs[name] = mlip[name]
        inputs.code = self.inputs.relax_code if 'relax_code' in self.inputs else find_relax_code(
            mlip['code'].computer)
        inputs.metadata = {'options': scheduler_options(mlip.get('metadata', {}).get('options')),
                           'call_link_label': label}
        node = self.submit(MlipRelaxCalculation, **inputs)
        self.report(f'launched MlipRelaxCalculation<{node.pk}> to relax the {kind} of {len(structures)} cells ({label})')
        return {key: node for key in structures}

    def dft_inputs(self, mesh_of: orm.StructureData | None = None) -> AttributeDict:
        """The ``dft`` namespace; with ``mesh_of``, its k-point spacing turned into ONE explicit mesh, that of
        ``mesh_of`` (aiida-quantumespresso's ``create_kpoints_from_distance``, in the graph, made once per workflow).

        Cells that differ by a strain (an EOS scan, strained cells) must share the mesh: with a spacing each gets its
        own, and where a dimension tips over (fcc Cu at 0.3 1/Å: 11^3 below 11.9 Å³, 10^3 above) the energy jumps by
        meV/atom, which the fit reads as curvature (measured: DFT EOS B0 84 GPa against 136 from the elastic tensor)."""
        inputs = AttributeDict(self.exposed_inputs(DftLabelingWorkChain, namespace='dft'))
        pw_base = AttributeDict(inputs.pw_base)
        if mesh_of is None or 'kpoints_distance' not in pw_base:
            return inputs
        if 'fixed_kpoints' not in self.ctx:
            from aiida_quantumespresso.calculations.functions.create_kpoints_from_distance import (
                create_kpoints_from_distance,
            )
            self.ctx.fixed_kpoints = create_kpoints_from_distance(
                mesh_of, pw_base.kpoints_distance, pw_base.get('kpoints_force_parity', orm.Bool(False)),
                metadata={'call_link_label': 'fixed_kpoints'})
            self.report(f'one k-point mesh for every cell: {self.ctx.fixed_kpoints.get_kpoints_mesh()[0]} (spacing '
                        f'{pw_base.kpoints_distance.value} 1/Å on the unstrained cell)')
        pw_base.pop('kpoints_distance')
        pw_base.pop('kpoints_force_parity', None)
        pw_base.kpoints = self.ctx.fixed_kpoints
        inputs.pw_base = pw_base
        return inputs

    def dft_relax_inputs(self, structure: orm.StructureData, relax_cell: bool, fmax: float, steps: int,
                         conv_thr_per_atom: float | None = None, mesh_of: orm.StructureData | None = None
                         ) -> AttributeDict:
        """PwBaseWorkChain inputs of a (vc-)relax from the ``dft`` namespace (:func:`dft_relax_inputs`)."""
        return dft_relax_inputs(self.dft_inputs(mesh_of), structure, relax_cell, fmax, steps, conv_thr_per_atom)

    def relaxed_structure(self, node):
        """(relaxed StructureData, None) or (None, ERROR_RELAX_FAILED) from the node of :meth:`submit_relax`."""
        if self.engine == 'dft':
            structure, reason = dft_relaxed_structure(node, self.report)
            if structure is None:
                return None, self.exit_codes.ERROR_RELAX_FAILED.format(engine='dft', reason=reason)
            return structure, None
        if not node.is_finished_ok or 'relaxed_structures' not in node.outputs \
                or 'structure' not in node.outputs.relaxed_structures:
            reason = f'{node.process_label}<{node.pk}> exit {node.exit_status}: {node.exit_message}'
            return None, self.exit_codes.ERROR_RELAX_FAILED.format(engine='mlip', reason=reason)
        return node.outputs.relaxed_structures['structure'], None

    @property
    def engine(self) -> str:
        return 'dft' if self.inputs.get('dft') else 'mlip'

    def submit_engine(self, structures: dict, label: str, mesh_of: orm.StructureData | None = None):
        """Launch the evaluation of ``structures`` (dict key -> StructureData) with the chosen engine; DFT with the
        k-point mesh of ``mesh_of`` for all of them when given (:meth:`dft_inputs`)."""
        if self.engine == 'dft':
            inputs = self.dft_inputs(mesh_of)
            inputs.structures = structures
            inputs.isolated_atoms = orm.Bool(False)
            process = DftLabelingWorkChain
        else:
            inputs = AttributeDict(self.exposed_inputs(MlipEvaluateCalculation, namespace='mlip'))
            inputs.structures = structures
            process = MlipEvaluateCalculation
        inputs.metadata = {**inputs.get('metadata', {}), 'call_link_label': label}
        node = self.submit(process, **inputs)
        self.report(f'launched {process.__name__}<{node.pk}> for {len(structures)} cells ({label})')
        return node

    def engine_frames(self, node, structures: dict):
        """(dataset of evaluated frames in sorted-key order, None) or (None, exit code) if the engine failed."""
        if self.engine == 'dft':
            if 'dataset' not in node.outputs or node.outputs.dataset.n_frames != len(structures):
                dropped = node.outputs.quality_report.get('dropped', {}) if 'quality_report' in node.outputs else {}
                reason = f'{node.process_label}<{node.pk}> exit {node.exit_status}; dropped cells: {dropped}'
                return None, self.exit_codes.ERROR_ENGINE_FAILED.format(engine='dft', reason=reason)
            return node.outputs.dataset, None
        if not node.is_finished_ok:
            reason = f'{node.process_label}<{node.pk}> exit {node.exit_status}: {node.exit_message}'
            return None, self.exit_codes.ERROR_ENGINE_FAILED.format(engine='mlip', reason=reason)
        structures_sorted = {f'structure_{i:05d}': structures[key] for i, key in enumerate(sorted(structures))}
        optional = {'stresses': node.outputs.stresses} if 'stresses' in node.outputs else {}
        frames = predictions_to_dataset(
            energies=node.outputs.energies, forces=node.outputs.forces, **optional,
            **structures_sorted, metadata={'call_link_label': 'predictions'},
        )
        return frames, None
