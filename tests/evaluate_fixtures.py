"""Fixtures for the ``mlip.evaluate`` CalcJob tests: tiny real MACE models and the engine code on localhost.

Import the fixtures into a test module (``from tests.evaluate_fixtures import *``-style, by name). The models are
the session fixture ``tiny_mace_committee`` of ``tests/conftest.py`` (recipe: ``tests/tiny_mace.py``; Morse-labelled
rattled Si, 8 channels, 5 epochs, ~8 s each), trained once per session and shared with ``tests/engine``; model files
are session-scoped, the AiiDA nodes are made per test (cheap) so a cleaned database never leaves
stale nodes behind.
"""
from __future__ import annotations

import pytest

from tests.tiny_mace import TRAIN_SEEDS, rattled_si

__all__ = ('tiny_mace_files', 'mlip_models', 'evaluate_code', 'rattled_si', 'si_structures', 'make_structures')

#: Training seeds of the committee members.
SEEDS = TRAIN_SEEDS


@pytest.fixture(scope='session')
def tiny_mace_files(tiny_mace_committee) -> list:
    """Paths of two tiny MACE models (float32) that differ only in the training seed."""
    return list(tiny_mace_committee)


@pytest.fixture
def mlip_models(aiida_profile, tiny_mace_files) -> dict:
    """Stored ``mlip.model`` nodes of the two tiny models, keyed 'seed1', 'seed2'."""
    from aiida_mlip.data.model import MlipModel

    return {
        f'seed{seed}': MlipModel.from_file(path, origin='trained', label=f'tiny-si-seed{seed}').store()
        for seed, path in zip(SEEDS, tiny_mace_files)
    }


@pytest.fixture
def evaluate_code(localhost):
    """The ``mlip-evaluate`` InstalledCode (the venv python) on localhost."""
    from aiida_mlip.setup.environment import ensure_mlip_codes

    codes = ensure_mlip_codes(localhost)
    matching = [code for code in codes.values() if code.default_calc_job_plugin == 'mlip.evaluate']
    assert matching, f'ensure_mlip_codes made no code for mlip.evaluate: {list(codes)}'
    return matching[0]


def make_structures(n: int, seed: int, sizes=(2, 8, 16)) -> list:
    """Unlabelled rattled Si cells (ase.Atoms) of several sizes."""
    return rattled_si(n, seed=seed, sizes=sizes, label=False)


@pytest.fixture
def si_structures(aiida_profile) -> dict:
    """Six StructureData keyed so that insertion order differs from the sorted (= output row) order."""
    from aiida import orm

    keys = ['c_05', 'a_00', 'b_03', 'a_10', 'd_01', 'b_02']
    return {key: orm.StructureData(ase=atoms) for key, atoms in zip(keys, make_structures(len(keys), seed=77))}
