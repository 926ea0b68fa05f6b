"""TrainingWorkChain: seeded split, a committee of 2 real MACE models, scored on the test split by one job."""
import numpy as np
import pytest
from aiida import engine, orm

from aiida_mlip.workflows.training import TrainingWorkChain

from .fixtures_mlip import mlip_codes, si_dataset, si_splits, trained_committee  # noqa: F401  (fixtures)

pytestmark = [pytest.mark.pw, pytest.mark.mace]


def test_committee_trains_and_is_scored(trained_committee):  # noqa: F811
    results, node = trained_committee
    assert node.is_finished_ok, node.exit_message
    models = results['models']
    assert sorted(models) == ['member_0', 'member_1']
    assert models['member_0'].sha256 != models['member_1'].sha256  # different seeds, different weights
    metrics = results['test_metrics'].get_dict()
    assert metrics['n_frames'] == results['split']['test'].n_frames
    for key in ('energy_per_atom_mev', 'forces_mev_per_a'):
        assert np.isfinite(metrics[key]['rmse']) and metrics[key]['rmse'] > 0
    assert len(metrics['members']) == 2
    assert metrics['committee']['mean_max_force_deviation'] > 0
    assert np.isfinite(metrics['committee']['mean_max_force_deviation'])


def test_split_is_seeded_and_keeps_isolated_atoms_in_train(trained_committee, si_dataset):  # noqa: F811
    split = trained_committee[0]['split']
    assert sum(split[name].n_frames for name in split) == si_dataset.n_frames
    assert split['train'].config_types.get('IsolatedAtom') == 1
    members = [node for node in trained_committee[1].called if node.process_label == 'MaceTrainBaseWorkChain']
    seeds = sorted(m.inputs.mace.parameters['seed'] for m in members)
    assert seeds == [1, 2]


def test_model_lineage_reaches_every_pw_calculation(trained_committee, si_dataset):  # noqa: F811
    model = trained_committee[0]['models']['member_0']
    training = model.creator
    assert training.process_type == 'aiida.calculations:mlip.mace_train'
    train = training.inputs.train
    assert train.creator.process_label == 'split_dataset'
    assert train.creator.inputs.dataset.uuid == si_dataset.uuid
    for uuid in train.source_uuids:
        assert orm.load_node(uuid).process_type == 'aiida.calculations:quantumespresso.pw'


def test_given_splits_and_initial_models_are_checked_before_training(mlip_codes, si_dataset, si_splits,  # noqa: F811
                                                                     trained_committee):  # noqa: F811
    builder = TrainingWorkChain.get_builder_from_protocol(mlip_codes['mace_train'], si_dataset, protocol='fast')
    builder.splits = {'train': si_splits['train'], 'test': si_splits['test']}  # the valid frames are missing
    with pytest.raises(ValueError, match='they must be a partition of `dataset`'):
        engine.run(builder)
    builder.splits = dict(si_splits)
    builder.initial_models = {'member_3': trained_committee[0]['models']['member_0']}
    with pytest.raises(ValueError, match=r"initial_models: \['member_3'\] are not members of a committee of 1"):
        engine.run(builder)


def test_bad_committee_size_is_refused(mlip_codes, si_dataset):  # noqa: F811
    builder = TrainingWorkChain.get_builder_from_protocol(mlip_codes['mace_train'], si_dataset, protocol='fast')
    builder.committee_size = orm.Int(0)
    with pytest.raises(ValueError, match='committee_size must be >= 1'):
        engine.run(builder)


def test_unknown_mace_option_is_refused_before_training(mlip_codes, si_dataset):  # noqa: F811
    with pytest.raises(ValueError, match='num_chanels'):
        builder = TrainingWorkChain.get_builder_from_protocol(
            mlip_codes['mace_train'], si_dataset, protocol='fast', overrides={'mace': {'num_chanels': 8}})
        engine.run(builder)


def test_nan_loss_restarts_with_a_lower_learning_rate(mlip_codes, si_splits):  # noqa: F811
    """A diverging run (lr = 1e6) ends with exit 320; the handler restarts it with lr / lr_reduction."""
    from aiida_mlip.calculations.mace_train import MaceTrainCalculation
    from aiida_mlip.workflows.mace_train_base import MaceTrainBaseWorkChain

    from .fixtures_mlip import TINY_PARAMETERS

    builder = MaceTrainBaseWorkChain.get_builder()
    builder.mace.code = mlip_codes['mace_train']
    builder.mace.train, builder.mace.valid = si_splits['train'], si_splits['valid']
    builder.mace.parameters = orm.Dict({**TINY_PARAMETERS, 'lr': 1e6, 'max_num_epochs': 2})
    builder.mace.metadata.options = {'resources': {'num_machines': 1, 'num_mpiprocs_per_machine': 1}}
    builder.lr_reduction = orm.Float(1e8)
    results, node = engine.run_get_node(builder)
    assert node.is_finished_ok, node.exit_message
    first, second = sorted((c for c in node.called if c.process_label == 'MaceTrainCalculation'), key=lambda c: c.pk)
    assert first.exit_status == MaceTrainCalculation.exit_codes.ERROR_NAN_LOSS.status
    assert second.inputs.parameters['lr'] == pytest.approx(0.01)
    assert 'model' in results
