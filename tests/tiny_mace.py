"""A tiny real MACE committee trained on the fly, for the engine and the CalcJob tests (no AiiDA imports).

No pre-trained model can be downloaded, so two tiny real MACE models (seeds 1, 2) are trained on rattled Si diamond
cells labelled with a Morse potential. The labels only need to be smooth and physical-ish; model quality is irrelevant
for testing the evaluation/MD plumbing. The session fixture ``tiny_mace_committee`` (``tests/conftest.py``) trains
them ONCE per test session for ``tests/engine`` (``trained_models``) and the CalcJob tests (``tiny_mace_files``);
``benchmarks/evaluate_batching.py`` uses the same recipe.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
TRAIN_SEEDS = (1, 2)


def engine_env() -> dict:
    """Environment for engine subprocesses: one thread, repo importable."""
    env = dict(os.environ)
    env['OMP_NUM_THREADS'] = '1'
    env['MKL_NUM_THREADS'] = '1'
    env['PYTHONPATH'] = os.pathsep.join([str(REPO_ROOT), env.get('PYTHONPATH', '')]).rstrip(os.pathsep)
    return env


def morse_calculator():
    """Morse pair potential with a Si-like bond (2.35 A); ase's EMT has no Si."""
    from ase.calculators.morse import MorsePotential

    return MorsePotential(epsilon=2.0, r0=2.35, rho0=6.0)


def rattled_si(n_frames: int, seed: int, sizes=(2, 8), rattle=0.08, strain=0.03, label=True) -> list:
    """Rattled, slightly strained Si diamond cells (primitive 2-atom and cubic 8-atom)."""
    from ase.build import bulk

    rng = np.random.default_rng(seed)
    frames = []
    for index in range(n_frames):
        n_atoms = sizes[index % len(sizes)]
        atoms = bulk('Si', 'diamond', a=5.43, cubic=(n_atoms == 8))
        if n_atoms == 16:
            atoms = bulk('Si', 'diamond', a=5.43, cubic=True) * (2, 1, 1)
        atoms.set_cell(atoms.cell * (1 + rng.uniform(-strain, strain)), scale_atoms=True)
        atoms.positions += rng.normal(0.0, rattle, atoms.positions.shape)
        if label:
            atoms.calc = morse_calculator()
            energy = atoms.get_potential_energy()
            forces = atoms.get_forces()
            stress = atoms.get_stress(voigt=False)
            atoms.calc = None
            atoms.info['REF_energy'] = energy
            atoms.arrays['REF_forces'] = forces
            atoms.info['REF_stress'] = stress
        frames.append(atoms)
    return frames


def train_tiny_mace(train_file: Path, workdir: Path, seed: int) -> Path:
    """Train a tiny MACE (8 channels, L=0, 2 interactions, 5 epochs) in ``workdir``.

    cwd is the work dir because mace_run_train drops *_valid_indices_*.txt,
    checkpoints/, logs/ and results/ into the current directory.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable, '-m', 'mace.cli.run_train',
        '--name', 'tiny',
        '--train_file', str(train_file),
        '--valid_fraction', '0.2',
        '--model', 'MACE',
        '--num_channels', '8',
        '--max_L', '0',
        '--r_max', '4.0',
        '--num_interactions', '2',
        '--max_num_epochs', '5',
        '--batch_size', '5',
        '--valid_batch_size', '10',
        '--default_dtype', 'float32',
        '--E0s', 'average',
        '--energy_key', 'REF_energy',
        '--forces_key', 'REF_forces',
        '--stress_key', 'REF_stress',
        '--compute_stress', 'True',
        '--device', 'cpu',
        '--seed', str(seed),
    ]  # fmt: skip
    log = workdir / 'train.log'
    with open(log, 'w') as handle:
        proc = subprocess.run(cmd, cwd=workdir, env=engine_env(), stdout=handle, stderr=subprocess.STDOUT, timeout=300)
    model = workdir / 'tiny.model'
    if proc.returncode != 0 or not model.exists():
        tail = '\n'.join(log.read_text().splitlines()[-30:])
        pytest.fail(f'mace_run_train failed (rc={proc.returncode}):\n{tail}')
    return model


def train_tiny_committee(root: Path, seeds=TRAIN_SEEDS) -> list:
    """Paths of tiny MACE models (float32) trained in ``root`` on the same 40 Morse-labelled Si frames, one per seed."""
    import ase.io

    root = Path(root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    train_file = root / 'train.extxyz'
    ase.io.write(train_file, rattled_si(40, seed=0), format='extxyz')
    paths = []
    for seed in seeds:
        start = time.perf_counter()
        paths.append(train_tiny_mace(train_file, root / f'seed{seed}', seed))
        print(f'trained tiny MACE seed={seed} in {time.perf_counter() - start:.1f} s')
    return paths
