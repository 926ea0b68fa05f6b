"""``mlip.mace_train_base``: MaceTrainCalculation wrapped in a BaseRestartWorkChain.

Training can diverge (NaN loss) or run out of walltime; neither should lose the run. A NaN loss restarts
from scratch with the learning rate divided by ``lr_reduction``; a walltime kill restarts from the
checkpoints the calculation retrieved.
"""
from __future__ import annotations

from aiida import orm
from aiida.common import AttributeDict
from aiida.engine import BaseRestartWorkChain, ProcessHandlerReport, process_handler, while_
from aiida.plugins import CalculationFactory

MaceTrainCalculation = CalculationFactory('mlip.mace_train')

#: mace-torch's default learning rate (mace/tools/arg_parser.py, --lr).
MACE_DEFAULT_LR = 0.01


class MaceTrainBaseWorkChain(BaseRestartWorkChain):
    """Train one MACE model, restarting on NaN loss (lower learning rate) and walltime (from checkpoint)."""

    _process_class = MaceTrainCalculation

    @classmethod
    def define(cls, spec):
        super().define(spec)
        spec.expose_inputs(MaceTrainCalculation, namespace='mace')
        spec.input('lr_reduction', valid_type=orm.Float, default=lambda: orm.Float(10.0),
                   help='Divide the learning rate by this after a NaN loss.')
        spec.outline(
            cls.setup,
            while_(cls.should_run_process)(
                cls.run_process,
                cls.inspect_process,
            ),
            cls.results,
        )
        spec.expose_outputs(MaceTrainCalculation)
        spec.exit_code(300, 'ERROR_UNRECOVERABLE_FAILURE',
                       message='The training calculation failed with an unrecoverable error.')

    def setup(self):
        super().setup()
        self.ctx.inputs = AttributeDict(self.exposed_inputs(MaceTrainCalculation, 'mace'))

    def report_error_handled(self, calculation, action):
        self.report(f'{calculation.process_label}<{calculation.pk}> failed with exit status '
                    f'{calculation.exit_status}: {calculation.exit_message}')
        self.report(f'Action taken: {action}')

    @process_handler(priority=600, exit_codes=[MaceTrainCalculation.exit_codes.ERROR_NAN_LOSS])
    def handle_nan_loss(self, calculation):
        """Restart from scratch with a lower learning rate."""
        parameters = self.ctx.inputs.parameters.get_dict()
        old = float(parameters.get('lr', MACE_DEFAULT_LR))
        parameters['lr'] = old / self.inputs.lr_reduction.value
        self.ctx.inputs.parameters = orm.Dict(parameters)
        self.ctx.inputs.pop('restart_folder', None)
        self.report_error_handled(calculation, f'restarting with learning rate {old:g} -> {parameters["lr"]:g}')
        return ProcessHandlerReport(do_break=True)

    @process_handler(priority=500, exit_codes=[MaceTrainCalculation.exit_codes.ERROR_OUT_OF_WALLTIME])
    def handle_out_of_walltime(self, calculation):
        """Continue from the checkpoints of the killed run."""
        self.ctx.inputs.restart_folder = calculation.outputs.retrieved
        self.report_error_handled(calculation, 'restarting from the retrieved checkpoints')
        return ProcessHandlerReport(do_break=True)
