"""Fixtures for the compute-node engine tests: a tiny real MACE committee trained on the fly.

The committee (two tiny MACE models, seeds 1 and 2, Morse-labelled rattled Si) is the session fixture
``tiny_mace_committee`` of ``tests/conftest.py``, trained once per session and shared with the CalcJob tests
(recipe: ``tests/tiny_mace.py``). No AiiDA imports here: the engine must work where AiiDA is absent.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.tiny_mace import REPO_ROOT, TRAIN_SEEDS, engine_env as _engine_env, rattled_si  # noqa: F401


@pytest.fixture(scope='session')
def engine_env() -> dict:
    """Environment for engine subprocesses (OMP_NUM_THREADS=1, repo on PYTHONPATH)."""
    return _engine_env()


@pytest.fixture(scope='session')
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope='session')
def trained_models(tiny_mace_committee) -> list:
    """Two tiny MACE models differing only in the training seed (a real committee)."""
    return list(tiny_mace_committee)


@pytest.fixture(scope='session')
def model_path(trained_models) -> Path:
    return trained_models[0]


@pytest.fixture(scope='session')
def test_structures() -> list:
    """Unlabelled structures of several sizes (2, 8, 16 atoms) unseen in training."""
    return rattled_si(12, seed=123, sizes=(2, 8, 16, 8), label=False)
