"""One property workflow, two engines: the cells of a property are evaluated by DFT or by an MLIP.

A property WorkChain makes its cells, hands them to :class:`EngineMixin`, and gets back ONE ``mlip.dataset``
of evaluated frames (energy, forces, stress, in the order of the sorted cell keys), whichever engine ran:

* ``dft``: a ``DftLabelingWorkChain`` (one PwBaseWorkChain per cell, same settings for all cells); its
  output dataset is the result, and doubles as training data;
* ``mlip``: ONE ``MlipEvaluateCalculation`` for all cells (one model load); its arrays are turned into a
  dataset by the ``predictions_to_dataset`` calcfunction.

The fits downstream therefore compare like with like, and every number traces back to its calculation.
"""
from __future__ import annotations

from aiida import orm
from aiida.common import AttributeDict
from aiida.plugins import CalculationFactory

from aiida_mlip.calculations.datasets import predictions_to_dataset
from aiida_mlip.workflows.labeling import DftLabelingWorkChain

MlipEvaluateCalculation = CalculationFactory('mlip.evaluate')

ENGINE_NAMESPACES = ('dft', 'mlip')


def validate_engine(inputs, _) -> str | None:
    """Exactly one engine namespace must be given."""
    given = [name for name in ENGINE_NAMESPACES if inputs.get(name)]
    if len(given) != 1:
        return f'give exactly one engine, `dft` or `mlip` (got {given or "none"})'
    return None


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

    @property
    def engine(self) -> str:
        return 'dft' if self.inputs.get('dft') else 'mlip'

    def submit_engine(self, structures: dict, label: str):
        """Launch the evaluation of ``structures`` (dict key -> StructureData) with the chosen engine."""
        if self.engine == 'dft':
            inputs = AttributeDict(self.exposed_inputs(DftLabelingWorkChain, namespace='dft'))
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
