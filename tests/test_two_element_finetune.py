"""Fine-tuning from a two-element foundation trained in the test on pw.x labels (Si/Ge), for real."""
import pytest
from aiida import engine, orm

from aiida_mlip.calculations.datasets import merge_datasets, split_dataset

from .conftest import TEST_FAMILY, TEST_PW_OVERRIDES
from .fixtures_mlip import TINY_PARAMETERS, mlip_codes, si_dataset, si_splits, train_builder  # noqa: F401

pytestmark = [pytest.mark.pw, pytest.mark.mace]


@pytest.fixture(scope='module')
def ge_dataset(pw_code, pseudo_family):
    """Ge2 at three volumes and rattled, plus the isolated Ge atom, labeled with pw.x."""
    from ase.build import bulk

    from aiida_mlip.calculations.sampling import rattle_structure, scale_volume
    from aiida_mlip.workflows.labeling import DftLabelingWorkChain

    ge2 = orm.StructureData(ase=bulk('Ge', 'diamond', a=5.66))
    volumes = scale_volume(ge2, orm.List([-0.04, 0.0, 0.04]))
    rattled = rattle_structure(ge2, orm.Float(0.08), orm.Int(4), orm.Int(5))
    structures = {f'ge_volume_{i}': s for i, s in enumerate(volumes.values())}
    structures.update({f'ge_rattle_{i}': s for i, s in enumerate(rattled.values())})
    builder = DftLabelingWorkChain.get_builder_from_protocol(
        pw_code, structures, protocol='fast', pseudo_family=TEST_FAMILY,
        overrides={'pw_base': TEST_PW_OVERRIDES, 'isolated_atoms': True})
    results, node = engine.run_get_node(builder)
    assert node.is_finished_ok, node.exit_message
    return results['dataset']


def test_finetuning_a_two_element_foundation_on_si(mlip_codes, si_dataset, si_splits, ge_dataset):  # noqa: F811
    both = merge_datasets(si=si_dataset, ge=ge_dataset)  # same family and settings: allowed
    assert both.elements == ['Ge', 'Si']
    splits = split_dataset(both, orm.Dict({'train': 0.8, 'valid': 0.2}), orm.Int(3))
    parts = {'train': splits['train'], 'valid': splits['valid'], 'test': splits['valid']}
    builder = train_builder(mlip_codes['mace_train'], parts, parameters={'max_num_epochs': 5})
    foundation_results, node = engine.run_get_node(builder)
    assert node.is_finished_ok, node.exit_message
    foundation = foundation_results['model']
    assert foundation.elements == ['Ge', 'Si']

    fixed_by_foundation = ('model', 'num_channels', 'max_L', 'r_max', 'num_interactions')
    builder = train_builder(mlip_codes['mace_train'], si_splits, foundation_model=foundation,
                            finetune=orm.Str('naive'))
    builder.parameters = orm.Dict({key: value for key, value in {**TINY_PARAMETERS, 'max_num_epochs': 3}.items()
                                   if key not in fixed_by_foundation})
    results, node = engine.run_get_node(builder)
    assert node.is_finished_ok, node.exit_message
    tuned = results['model']
    assert node.inputs.foundation_model.uuid == foundation.uuid  # provenance: fine-tuned model -> foundation
    assert tuned.sha256 != foundation.sha256
    assert set(tuned.elements) <= {'Ge', 'Si'} and 'Si' in tuned.elements
