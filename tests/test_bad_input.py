"""Bad input is refused with a clear message before any compute is spent (issue 7, part 4; docs/errors.md).

Each case asserts the key phrases of the message, how it is refused (``aiida-mlip`` exit code 2, or a ``ValueError``
from the process's input validation, which means no process node is made) and that no CalcJob or other process
node was created. Nothing here runs pw.x or trains a model: the models are untrained MACE files written in
seconds, the datasets carry made-up labels that are never used.
"""
import numpy as np
import pytest
from aiida import engine, orm
from click.testing import CliRunner

from .conftest import TEST_FAMILY, TEST_PW_OVERRIDES, count_calcjobs
from .fixtures_mlip import mlip_codes, write_untrained_mace  # noqa: F401  (fixture)


def count_processes() -> int:
    return orm.QueryBuilder().append(orm.ProcessNode).count()


def refused(launch, *phrases) -> str:
    """Run ``launch``; it must raise ValueError naming every phrase, and leave no CalcJob / process node behind."""
    before = count_calcjobs(), count_processes()
    with pytest.raises(ValueError) as info:
        launch()
    message = str(info.value)
    for phrase in phrases:
        assert phrase in message, (phrase, message)
    assert (count_calcjobs(), count_processes()) == before
    return message


def cli_refused(profile, arguments, *phrases) -> str:
    """``aiida-mlip ARGUMENTS`` must exit with 2 and name every phrase; no process node is made."""
    from aiida_mlip.cli import cli

    before = count_calcjobs(), count_processes()
    result = CliRunner().invoke(cli, ['-p', profile.name, *arguments])
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    for phrase in phrases:
        assert phrase in result.output, (phrase, result.output)
    assert (count_calcjobs(), count_processes()) == before
    return result.output


def labeled_frames(symbols='Si2', n_frames=4, a=5.43):
    """Diamond cells with made-up labels (never trained on: only for refusals)."""
    from ase.build import bulk

    frames = []
    for index in range(n_frames):
        atoms = bulk(symbols[:2], 'diamond', a=a * (1 + 0.01 * index))
        atoms.info['REF_energy'] = -10.0 - index
        atoms.arrays['REF_forces'] = np.zeros((len(atoms), 3))
        frames.append(atoms)
    return frames


@pytest.fixture(scope='module')
def si_model_file(tmp_path_factory):
    return write_untrained_mace(tmp_path_factory.mktemp('bad_input') / 'si.model', elements=('Si',))


@pytest.fixture
def si_model(aiida_profile, si_model_file):
    from aiida_mlip.data.model import MlipModel

    return MlipModel.from_file(si_model_file, label='untrained-si').store()


@pytest.fixture
def si2():
    from ase.build import bulk

    return orm.StructureData(ase=bulk('Si', 'diamond', a=5.43))


def labeling_builder(code, structures):
    from aiida_mlip.workflows.labeling import DftLabelingWorkChain

    return DftLabelingWorkChain.get_builder_from_protocol(
        code, structures, protocol='fast', pseudo_family=TEST_FAMILY, overrides={'pw_base': TEST_PW_OVERRIDES})


# ---- the cases ------------------------------------------------------------------------------------------------------

def test_malformed_campaign_file_is_refused(aiida_profile, tmp_path):
    """``aiida-mlip campaign validate FILE``: broken YAML, and a misspelled section, are named with file and line."""
    import pathlib

    broken = tmp_path / 'broken.yaml'
    broken.write_text('name: x\nclasses: [a\n')
    cli_refused(aiida_profile, ['campaign', 'validate', str(broken)], '1 problem(s) in the campaign file',
                f'{broken}:line 3: not valid YAML')
    shipped = pathlib.Path(__file__).resolve().parents[1] / 'workflows' / 'si_ge_test.yaml'
    typo = tmp_path / 'typo.yaml'
    typo.write_text(shipped.read_text().replace('\ntraining:', '\ntrainng:'))
    cli_refused(aiida_profile, ['campaign', 'validate', str(typo)],
                f'{typo}:trainng: unknown key; did you mean `training`?')


def test_missing_pseudo_is_named(pw_code, pseudo_family, si2):
    from ase.build import bulk

    gold = orm.StructureData(ase=bulk('Au', 'fcc', a=4.08))
    phrases = (f'pseudo family `{TEST_FAMILY}` has no pseudopotential for Au', 'it covers', 'Si')
    refused(lambda: labeling_builder(pw_code, {'gold': gold}), *phrases)
    builder = labeling_builder(pw_code, {'si': si2})
    builder.structures = {'gold': gold}
    refused(lambda: engine.run(builder), *phrases)  # the spec's validator says the same at launch


def test_missing_pseudo_family_is_named(pw_code, pseudo_family, si2):
    from aiida_mlip.workflows.labeling import DftLabelingWorkChain

    refused(lambda: DftLabelingWorkChain.get_builder_from_protocol(pw_code, [si2], protocol='fast',
                                                                  pseudo_family='SSSP-missing'),
            'pseudo family `SSSP-missing` is not installed', TEST_FAMILY, 'aiida-mlip setup pseudos')


def test_model_lacking_an_element_is_refused(mlip_codes, si_model):  # noqa: F811
    from ase.build import bulk

    from aiida_mlip.calculations.evaluate import MlipEvaluateCalculation

    germanium = orm.StructureData(ase=bulk('Ge', 'diamond', a=5.66))
    refused(lambda: engine.run(MlipEvaluateCalculation, code=mlip_codes['evaluate'], models={'si': si_model},
                               structures={'ge_bulk': germanium}),
            'elements missing from the model', f'MlipModel<{si_model.pk}>', 'elements Si', 'does not cover Ge',
            'ge_bulk')


def test_tampered_model_file_is_refused(aiida_profile, si_model_file, tmp_path):
    """A model file changed after its sha256 was recorded is refused by ``aiida-mlip model import --sha256``."""
    import hashlib
    import shutil

    copy = tmp_path / 'si.model'
    shutil.copy(si_model_file, copy)
    pinned = hashlib.sha256(copy.read_bytes()).hexdigest()
    with open(copy, 'ab') as handle:
        handle.write(b'\0')
    found = hashlib.sha256(copy.read_bytes()).hexdigest()
    cli_refused(aiida_profile, ['model', 'import', str(copy), '--label', 'tampered', '--sha256', pinned],
                'has changed', f'expected sha256 {pinned}', f'found {found}')


def test_model_tampered_in_the_repository_is_refused_before_the_job(mlip_codes, si_model, si2):  # noqa: F811
    """A stored model whose file changed in the repository: refused at launch, no CalcJob node."""
    from aiida_mlip.calculations.evaluate import MlipEvaluateCalculation
    from aiida_mlip.calculations.mace_train import MaceTrainCalculation
    from aiida_mlip.data.dataset import TrainingSet
    from aiida_mlip.data.model import MlipModel

    container = si_model.backend.get_repository()._container  # noqa: SLF001
    key = si_model.base.repository.get_object(MlipModel.FILENAME).key
    loose = container._get_loose_path_from_hashkey(key)  # noqa: SLF001
    original = open(loose, 'rb').read()
    try:
        with open(loose, 'r+b') as handle:
            handle.seek(len(original) // 2)
            handle.write(b'\xff' * 16)
        phrases = (f'model file of MlipModel<{si_model.pk}> has changed in the repository',
                   f'expected sha256 {si_model.sha256}', 'refusing to use it')
        refused(lambda: engine.run(MlipEvaluateCalculation, code=mlip_codes['evaluate'], models={'si': si_model},
                                   structures={'si': si2}), '`models.si`', *phrases)
        refused(lambda: engine.run(MaceTrainCalculation, code=mlip_codes['mace_train'], foundation_model=si_model,
                                   train=TrainingSet.from_ase(labeled_frames(n_frames=6)),
                                   parameters=orm.Dict({'batch_size': 2})), 'foundation_model', *phrases)
    finally:
        with open(loose, 'wb') as handle:
            handle.write(original)


def test_negative_volume_range_is_refused(mlip_codes, si_model, si2):  # noqa: F811
    from aiida_mlip.workflows.properties.eos import EquationOfStateWorkChain

    refused(lambda: engine.run(EquationOfStateWorkChain, structure=si2, volume_range=orm.Float(-0.05),
                               mlip={'code': mlip_codes['evaluate'], 'models': {'si': si_model}}),
            'volume_range must lie in (0, 0.5), got -0.05', 'relative half-width')


def test_one_sided_strain_range_is_refused(mlip_codes, si_model, si2):  # noqa: F811
    from aiida_mlip.workflows.properties.elastic import ElasticWorkChain

    refused(lambda: engine.run(ElasticWorkChain, structure=si2, strain_magnitudes=orm.List([-0.01, -0.005]),
                               mlip={'code': mlip_codes['evaluate'], 'models': {'si': si_model}}),
            'strain_magnitudes need both signs', 'got [-0.01, -0.005]')


def test_zero_temperature_md_is_refused(mlip_codes, si_model, si2):  # noqa: F811
    from aiida_mlip.calculations.md import MlipMdCalculation

    refused(lambda: engine.run(MlipMdCalculation, code=mlip_codes['md'], models={'si': si_model}, structure=si2,
                               temperatures=orm.List([0.0]), steps=orm.Int(10)),
            'temperature 0.0 K is not allowed', 'finite and > 0 K')


def test_empty_dataset_is_refused(mlip_codes):  # noqa: F811
    from aiida_mlip.data.dataset import TrainingSet
    from aiida_mlip.workflows.training import TrainingWorkChain

    refused(lambda: TrainingSet.from_ase([]), 'a dataset needs at least one frame')
    single = TrainingSet.from_ase(labeled_frames(n_frames=1))
    refused(lambda: engine.run(TrainingWorkChain.get_builder_from_protocol(mlip_codes['mace_train'], single,
                                                                          protocol='fast')),
            'the dataset has 1 frame(s): too few to train on')


def test_dataset_of_isolated_atoms_only_is_refused(mlip_codes):  # noqa: F811
    from ase import Atoms

    from aiida_mlip.calculations.mace_train import MaceTrainCalculation
    from aiida_mlip.data.dataset import TrainingSet

    atom = Atoms('Si', cell=[10, 10, 10], pbc=False)
    atom.info.update(REF_energy=-100.0, config_type='IsolatedAtom')
    refused(lambda: engine.run(MaceTrainCalculation, code=mlip_codes['mace_train'],
                               train=TrainingSet.from_ase([atom]), parameters=orm.Dict({'batch_size': 1})),
            'holds only IsolatedAtom frames', 'nothing to fit')


def test_unknown_mace_option_is_refused(mlip_codes):  # noqa: F811
    from aiida_mlip.calculations.mace_train import MaceTrainCalculation
    from aiida_mlip.data.dataset import TrainingSet

    refused(lambda: engine.run(MaceTrainCalculation, code=mlip_codes['mace_train'],
                               train=TrainingSet.from_ase(labeled_frames(n_frames=6)),
                               parameters=orm.Dict({'num_chanels': 8, 'batch_size': 2})),
            'unknown MACE option `num_chanels`', 'did you mean `num_channels`?')


def test_wrong_code_type_is_refused(pw_code, pseudo_family, mlip_codes, si2):  # noqa: F811
    evaluate = mlip_codes['evaluate']
    phrases = (f'code `{evaluate.full_label}` runs `mlip.evaluate`', 'DFT labeling needs a `quantumespresso.pw` code')
    refused(lambda: labeling_builder(evaluate, [si2]), *phrases)
    builder = labeling_builder(pw_code, [si2])
    builder.pw_base.pw.code = evaluate
    refused(lambda: engine.run(builder), *phrases)


def test_overlapping_atoms_are_refused(pw_code, pseudo_family):
    from ase import Atoms

    atoms = Atoms('Si2', positions=[[0, 0, 0], [0.3, 0, 0]], cell=[5, 5, 5], pbc=True)
    refused(lambda: labeling_builder(pw_code, {'clash': orm.StructureData(ase=atoms)}),
            'structure `clash`: atoms 0 (Si) and 1 (Si) are 0.300 Å apart', 'closer than 0.5 Å')


def test_empty_structure_list_is_refused(pw_code, pseudo_family):
    refused(lambda: labeling_builder(pw_code, []), 'no structures given: the structure list is empty')


# ---- docs/errors.md stays true ---------------------------------------------------------------------------------

def test_errors_doc_lists_every_exit_code():
    """The exit-code tables of docs/errors.md are those generated from the process specs of every entry point."""
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / 'scripts' / 'errors_reference.py'
    spec = importlib.util.spec_from_file_location('errors_reference', path)
    reference = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(reference)
    current = reference.DOC.read_text()
    generated = reference.generate()
    assert reference.replace_generated(current, generated) == current, \
        'docs/errors.md is out of date: run `python scripts/errors_reference.py --write`'
    for _, name, _ in reference.declared_entry_points():
        assert f'### `{name}`' in generated
    assert '| 400 | `ERROR_OUT_OF_WALLTIME` |' in generated and '| 320 | `ERROR_NAN_LOSS` |' in generated
