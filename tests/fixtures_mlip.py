"""Fixtures shared by the model and training tests: a small Si dataset labeled with the real pw.x, and a tiny
MACE model trained on it with the real MaceTrainCalculation.

Import the fixtures you use into a test module (``from .fixtures_mlip import si_splits, ...``). The expensive
results are memoised per profile in ``_CACHE``, so two modules importing the same session fixture share one
labeling and one training run.
"""
import time

import pytest
from aiida import engine, orm

from .conftest import TEST_FAMILY, TEST_PW_OVERRIDES

#: A model small enough to train in seconds on one CPU thread (DESIGN.md: ~22 s for 60 frames, 20 epochs).
TINY_PARAMETERS = {
    'model': 'ScaleShiftMACE', 'num_channels': 8, 'max_L': 0, 'r_max': 4.0, 'num_interactions': 2,
    'max_num_epochs': 10, 'batch_size': 4, 'valid_batch_size': 4, 'default_dtype': 'float32', 'seed': 1,
    'loss': 'stress', 'error_table': 'PerAtomRMSEstressvirials',
}

_CACHE = {}
TIMINGS = {}

#: Job-script lines that freeze mace_run_train (SIGSTOP) at a point where its checkpoint on disk is complete, once
#: mace has logged AFTER_EVALS evaluations, then run FROZEN. Armed only in a fresh run (no checkpoint in the job
#: folder: the restart, which starts from uploaded checkpoints, runs to the end). A last `opt` record in the results
#: file means mace is training, past the checkpoint save of the previous evaluation; else it is let go on. pkill
#: only targets children of this job script.
_FREEZE_AT_A_CHECKPOINT = r"""
if ! ls checkpoints/*.pt > /dev/null 2>&1; then (
  while kill -0 $$ 2> /dev/null; do
    sleep 0.05
    evals=$(cat results/*_train.txt 2> /dev/null | grep -c '"mode": "eval"')
    [ "${evals:-0}" -ge AFTER_EVALS ] || continue
    pkill -STOP -P $$ -f mace.cli.run_train || continue
    if tail -n 1 results/*_train.txt | grep -q '"mode": "opt"' && ls checkpoints/*.pt > /dev/null 2>&1; then
      FROZEN
      break
    fi
    pkill -CONT -P $$ -f mace.cli.run_train
  done ) &
fi
"""


def freeze_training_at_a_checkpoint(after_evals: int, then: str = ':') -> str:
    """``custom_scheduler_commands`` of a MaceTrainCalculation whose first run stops for good at a safe point (a
    complete checkpoint on disk), after which the shell command ``then`` runs (e.g. the kill of a time limit)."""
    return _FREEZE_AT_A_CHECKPOINT.replace('AFTER_EVALS', str(after_evals)).replace('FROZEN', then)


def _memoised(key, function):
    if key not in _CACHE:
        start = time.perf_counter()
        _CACHE[key] = function()
        TIMINGS[key] = time.perf_counter() - start
    return _CACHE[key]


@pytest.fixture(scope='session')
def mlip_codes(localhost):
    from aiida_mlip.setup.environment import ensure_mlip_codes

    return ensure_mlip_codes(localhost)


def label_si(pw_code):
    """Si2 at 4 volumes, 8 rattled Si2 and the isolated Si atom, labeled with pw.x (one workchain, 13 pw.x jobs).

    Only 2-atom cells: a rattled Si8 costs ~7x a rattled Si2 in pw.x (36 k-points, 4x the atoms).
    """
    from ase.build import bulk

    from aiida_mlip.calculations.sampling import rattle_structure, scale_volume
    from aiida_mlip.workflows.labeling import DftLabelingWorkChain

    si2 = orm.StructureData(ase=bulk('Si', 'diamond', a=5.43))
    volumes = scale_volume(si2, orm.List([-0.06, -0.02, 0.02, 0.06]))
    rattled = rattle_structure(si2, orm.Float(0.08), orm.Int(8), orm.Int(11))
    structures = {f'volume_{i}': s for i, s in enumerate(volumes.values())}
    structures.update({f'rattle_{i}': s for i, s in enumerate(rattled.values())})
    builder = DftLabelingWorkChain.get_builder_from_protocol(
        pw_code, structures, protocol='fast', pseudo_family=TEST_FAMILY,
        overrides={'pw_base': TEST_PW_OVERRIDES, 'isolated_atoms': True},
    )
    builder.config_types = orm.Dict({key: key.split('_')[0] for key in structures})
    results, node = engine.run_get_node(builder)
    assert node.is_finished_ok, node.exit_message
    return results['dataset']


@pytest.fixture(scope='session')
def si_dataset(pw_code, pseudo_family):
    """The labeled Si dataset (13 frames incl. the isolated atom)."""
    return _memoised('label_si', lambda: label_si(pw_code))


@pytest.fixture(scope='session')
def si_splits(si_dataset):
    """Seeded train/valid/test split of the Si dataset (the isolated atom stays in train)."""
    from aiida_mlip.calculations.datasets import split_dataset

    return _memoised('split_si', lambda: split_dataset(
        si_dataset, orm.Dict({'train': 0.7, 'valid': 0.15, 'test': 0.15}), orm.Int(1)))


def train_builder(code, splits, parameters=None, **inputs):
    from aiida_mlip.calculations.mace_train import MaceTrainCalculation

    builder = MaceTrainCalculation.get_builder()
    builder.code = code
    builder.train = splits['train']
    builder.valid = splits['valid']
    builder.test = splits['test']
    builder.parameters = orm.Dict({**TINY_PARAMETERS, **(parameters or {})})
    builder.metadata.options.max_wallclock_seconds = 600
    for key, value in inputs.items():
        builder[key] = value
    return builder


@pytest.fixture(scope='session')
def trained(mlip_codes, si_splits):
    """(results, node) of the tiny MACE model trained on the Si splits with the real MaceTrainCalculation."""
    return _memoised('train_tiny', lambda: engine.run_get_node(train_builder(mlip_codes['mace_train'], si_splits)))


@pytest.fixture(scope='session')
def trained_committee(mlip_codes, si_dataset):
    """(results, node) of a TrainingWorkChain: a committee of 2 tiny models on the Si dataset, scored on its test
    split by one evaluation job (shared by the training and report tests)."""
    from aiida_mlip.workflows.training import TrainingWorkChain

    def run():
        return engine.run_get_node(TrainingWorkChain.get_builder_from_protocol(
            mlip_codes['mace_train'], si_dataset, protocol='fast',
            overrides={'committee_size': 2, 'split_fractions': {'train': 0.7, 'valid': 0.15, 'test': 0.15},
                       'mace': {'max_num_epochs': 8}},
            evaluate_code=mlip_codes['evaluate'],
        ))

    return _memoised('training_committee', run)


def validation_builder(mlip_codes, model, structure, pw_code=None, **overrides):
    from aiida_quantumespresso.common.types import ElectronicType

    from aiida_mlip.workflows.validation import ValidationWorkChain

    return ValidationWorkChain.get_builder_from_protocol(
        mlip_codes['evaluate'], model, structure, protocol='fast', pw_code=pw_code, pseudo_family=TEST_FAMILY,
        dft_overrides={'pw_base': TEST_PW_OVERRIDES}, overrides=overrides, md_code=mlip_codes['md'],
        electronic_type=ElectronicType.INSULATOR,  # Si: fixed occupations, no extra bands for the 16-atom cells
    )


@pytest.fixture(scope='session')
def validated(mlip_codes, trained, pw_code, pseudo_family):
    """(results, node) of a ValidationWorkChain of the `trained` model vs pw.x on Si2 (a = 5.45 Å): EOS, elastic,
    phonons and MD stability (shared by the validation and report tests)."""
    from ase.build import bulk

    def run():
        structure = orm.StructureData(ase=bulk('Si', 'diamond', a=5.45))
        return engine.run_get_node(validation_builder(
            mlip_codes, trained[0]['model'], structure, pw_code=pw_code,
            properties=['eos', 'elastic', 'phonons', 'md_stability']))

    return _memoised('validation_si2', run)


def write_untrained_mace(path, elements=('Si',), r_max=4.0, seed=0):
    """A real (randomly initialised, untrained) MACE model file: for data-type tests that need no DFT."""
    import mace  # noqa: F401  (must come before e3nn: it allows full-pickle torch.load)
    import numpy as np
    import torch
    from ase.data import atomic_numbers
    from e3nn import o3
    from mace import modules

    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        numbers = sorted(atomic_numbers[element] for element in elements)
        block = modules.interaction_classes['RealAgnosticResidualInteractionBlock']
        model = modules.MACE(
            r_max=r_max, num_bessel=4, num_polynomial_cutoff=5, max_ell=1, interaction_cls=block,
            interaction_cls_first=block, num_interactions=1, num_elements=len(numbers),
            hidden_irreps=o3.Irreps('4x0e'), MLP_irreps=o3.Irreps('4x0e'), atomic_energies=np.full(len(numbers), -1.0),
            avg_num_neighbors=8.0, atomic_numbers=numbers, correlation=2, gate=torch.nn.functional.silu,
        )
        torch.save(model, path)
    finally:
        torch.set_default_dtype(previous)
    return path


@pytest.fixture(scope='session')
def untrained_si_ge(tmp_path_factory):
    """Path of an untrained two-element (Ge, Si) MACE model file."""
    return write_untrained_mace(tmp_path_factory.mktemp('models') / 'si_ge.model', elements=('Si', 'Ge'))


def diamond(element='Si', a=5.45):
    from ase.build import bulk

    return orm.StructureData(ase=bulk(element, 'diamond', a=a))


def finetune_builder(foundation, structure, pw_code, mlip_codes, **overrides):  # noqa: F811
    from aiida_mlip.workflows.finetune import FineTuningWorkChain

    return FineTuningWorkChain.get_builder_from_protocol(
        foundation, structure, pw_code, mlip_codes['mace_train'], mlip_codes['evaluate'], mlip_codes['md'],
        TEST_FAMILY, protocol='fast', overrides={'labeling': {'pw_base': TEST_PW_OVERRIDES}, **overrides})


@pytest.fixture(scope='session')
def finetuned(trained, pw_code, pseudo_family, mlip_codes):  # noqa: F811
    """(foundation, results, node) of one real FineTuningWorkChain iteration of the `trained` model on Si2 (naive,
    compare_with_scratch): test_finetune.py checks the workflow, test_query.py queries its graph."""
    def run():
        foundation = trained[0]['model']
        builder = finetune_builder(foundation, diamond(), pw_code, mlip_codes, compare_with_scratch=True)
        results, node = engine.run_get_node(builder)
        print(f'\nFineTuningWorkChain<{node.pk}>: {(node.mtime - node.ctime).total_seconds():.0f} s wall')  # with -s
        return foundation, results, node

    return _memoised('finetune_si', run)


def pw_ancestors(node) -> set:
    """UUIDs of every PwCalculation in the data provenance of ``node`` (QueryBuilder ``with_descendants``)."""
    query = orm.QueryBuilder().append(orm.Node, filters={'id': node.pk}, tag='node')
    query.append(orm.CalcJobNode, with_descendants='node', project='uuid',
                 filters={'process_type': 'aiida.calculations:quantumespresso.pw'})
    return set(query.all(flat=True))
