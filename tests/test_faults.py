"""Faults during a run that the workflows must survive (issue 7, part 3).

Where each fault is tested:

* 20% of the DFT runs fail -> labeling completes and reports them:
  ``tests/test_labeling.py::test_labeling_finishes_and_drops_the_broken_frame`` (5 pw.x frames, 1 forced to stop
  after one SCF step with no restart: ``failure_fraction`` 0.2, the frame is listed in ``quality_report.dropped``
  with the exit status, the dataset keeps the other 4); above the tolerated fraction:
  ``test_too_many_failures_fail_with_exit_code_and_keep_the_data`` (exit 501).
* NaN training loss -> restart with a lower learning rate:
  ``tests/test_training.py::test_nan_loss_restarts_with_a_lower_learning_rate`` (lr 1e6 diverges for real, exit
  320, the handler restarts with lr / lr_reduction, the restart finishes with a model).
* Walltime exceeded -> training continues from its checkpoint: here.

The walltime test runs ``MaceTrainBaseWorkChain`` on localhost (``core.direct``) the way SLURM ends a job at its
time limit: ``slurmstepd`` writes ``*** JOB ... CANCELLED AT ... DUE TO TIME LIMIT ***`` to the job's stderr and
kills the step. The job's ``custom_scheduler_commands`` (which the direct scheduler puts in the job script header)
start a watchdog that does exactly that once mace has written a checkpoint and is training again, so the kill is
deterministic and never cuts a checkpoint in half; the direct scheduler, which has no time limit of its own, is
given SLURM's ``parse_output`` (stderr -> ERROR_SCHEDULER_OUT_OF_WALLTIME) for this test. Everything else is real:
mace_run_train is killed mid-training, the parser turns the walltime into exit 400 with the retrieved checkpoints,
and the handler continues the run from them with ``--restart_latest``.
"""
import re

import pytest
from aiida import engine, orm

from .fixtures_mlip import TINY_PARAMETERS, freeze_training_at_a_checkpoint
from .fixtures_mlip import mlip_codes, si_dataset, si_splits  # noqa: F401  (fixtures)

pytestmark = [pytest.mark.pw, pytest.mark.mace]

#: Evaluations (the initial one + epochs) mace must have logged before the "time limit" strikes.
KILL_AFTER_EVALS = 4
EPOCHS = 20

#: The job-script part of slurmstepd at the time limit, at a safe point of the training (never a checkpoint cut in
#: half): the message SLURM writes to the job's stderr, then the kill.
TIME_LIMIT_WATCHDOG = freeze_training_at_a_checkpoint(KILL_AFTER_EVALS, then=(
    'echo "slurmstepd: error: *** JOB 1 ON localhost CANCELLED AT $(date +%FT%T) DUE TO TIME LIMIT ***" >&2; '
    'pkill -KILL -P $$ -f mace.cli.run_train'))


@pytest.fixture
def slurm_like_time_limit(monkeypatch):
    """The direct scheduler reads the job's stderr like SLURM does (time limit -> ERROR_SCHEDULER_OUT_OF_WALLTIME)."""
    from aiida.schedulers.plugins.direct import DirectScheduler
    from aiida.schedulers.plugins.slurm import SlurmScheduler

    monkeypatch.setattr(DirectScheduler, 'parse_output', SlurmScheduler.parse_output)


def test_walltime_exceeded_training_continues_from_its_checkpoint(
        mlip_codes, si_splits, slurm_like_time_limit):  # noqa: F811
    from aiida_mlip.calculations.mace_train import MaceTrainCalculation
    from aiida_mlip.workflows.mace_train_base import MaceTrainBaseWorkChain

    builder = MaceTrainBaseWorkChain.get_builder()
    builder.mace.code = mlip_codes['mace_train']
    builder.mace.train, builder.mace.valid = si_splits['train'], si_splits['valid']
    builder.mace.parameters = orm.Dict({**TINY_PARAMETERS, 'max_num_epochs': EPOCHS})
    builder.mace.metadata.options = {
        'resources': {'num_machines': 1, 'num_mpiprocs_per_machine': 1},
        'max_wallclock_seconds': 600,
        'custom_scheduler_commands': TIME_LIMIT_WATCHDOG,
    }
    results, node = engine.run_get_node(builder)
    assert node.is_finished_ok, (node.exit_status, node.exit_message)
    assert 'model' in results and results['model'].elements == ['Si']

    killed, resumed = sorted((c for c in node.called if c.process_label == 'MaceTrainCalculation'), key=lambda c: c.pk)
    # The first run was stopped by the "time limit": the scheduler's verdict, then the parser's, with checkpoints.
    assert killed.exit_status == MaceTrainCalculation.exit_codes.ERROR_OUT_OF_WALLTIME.status, killed.exit_message
    assert 'restart with `restart_folder`' in killed.exit_message
    scheduler_stderr = killed.outputs.retrieved.base.repository.get_object_content('_scheduler-stderr.txt')
    assert 'DUE TO TIME LIMIT' in scheduler_stderr
    assert 'model' not in killed.outputs  # it did not get to write a model
    checkpoints = killed.outputs.retrieved.base.repository.list_object_names('checkpoints')
    assert len(checkpoints) == 1
    checkpoint_epoch = int(re.search(r'epoch-(\d+)\.pt$', checkpoints[0]).group(1))
    killed_epochs = list(killed.outputs.learning_curve.get_array('epoch'))
    assert killed_epochs[-1] < EPOCHS - 1  # stopped before the end

    # The handler continued from those checkpoints: same inputs plus restart_folder, mace --restart_latest.
    assert resumed.inputs.restart_folder.uuid == killed.outputs.retrieved.uuid
    assert "'--restart_latest'" in resumed.base.repository.get_object_content('_aiidasubmit.sh')
    assert resumed.is_finished_ok, resumed.exit_message
    resumed_epochs = list(resumed.outputs.learning_curve.get_array('epoch'))
    assert resumed_epochs[1] == checkpoint_epoch  # picked up at the checkpoint's epoch, not at 0
    assert resumed_epochs[-1] == EPOCHS - 1
    assert any('restarting from the retrieved checkpoints' in log.message
               for log in orm.Log.collection.get_logs_for(node))
