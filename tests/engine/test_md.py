"""Tests of the MD engine (Langevin NVT / NVE, committee deviation, blow-up detection)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

pytestmark = pytest.mark.mace


@pytest.fixture(scope='module')
def committee(trained_models):
    from aiida_mlip.engine.evaluate import load_models

    return load_models(trained_models)


@pytest.fixture()
def si8():
    from ase.build import bulk

    return bulk('Si', 'diamond', a=5.43, cubic=True)


def test_nvt_300k_stays_finite_and_is_reproducible(committee, si8):
    from aiida_mlip.engine.md import run_md

    result = run_md(committee, si8, temperature_k=300, timestep_fs=1.0, n_steps=20, interval=10, seed=7)
    assert not result['stopped_early'] and result['reason'] == ''
    assert result['n_steps_done'] == 20
    assert result['step'].tolist() == [0, 10, 20]
    np.testing.assert_allclose(result['times_fs'], [0.0, 10.0, 20.0])
    for key in ('potential_energy', 'kinetic_energy', 'total_energy', 'temperature', 'max_force_deviation'):
        assert result[key].shape == (3,) and np.all(np.isfinite(result[key])), key
    assert np.all(result['temperature'][1:] > 0)
    assert result['positions'].shape == (3, 8, 3) and result['cells'].shape == (3, 3, 3)
    assert np.all(result['max_force_deviation'][1:] > 0)  # a real committee disagrees off-lattice
    assert si8.calc is None and np.allclose(si8.positions, result['positions'][0])  # input untouched

    again = run_md(committee, si8, temperature_k=300, timestep_fs=1.0, n_steps=20, interval=10, seed=7)
    np.testing.assert_array_equal(again['positions'], result['positions'])
    other = run_md(committee, si8, temperature_k=300, timestep_fs=1.0, n_steps=20, interval=10, seed=8)
    assert not np.allclose(other['positions'][-1], result['positions'][-1])


def test_nve_single_model_from_path(model_path, si8):
    """Paths are accepted too; NVE with a small step roughly conserves total energy."""
    from aiida_mlip.engine.md import run_md

    result = run_md([model_path], si8, 300, 0.5, 20, 5, seed=3, ensemble='nve')
    assert not result['stopped_early']
    assert 'max_force_deviation' not in result
    drift = np.ptp(result['total_energy'])
    assert drift < 0.01, result['total_energy']


def test_close_atoms_stop_immediately(committee, si8):
    from aiida_mlip.engine.md import run_md

    atoms = si8.copy()
    atoms.positions[1] = atoms.positions[0] + [0.2, 0.0, 0.0]
    result = run_md(committee, atoms, 300, 1.0, 20, 5, seed=1)
    assert result['stopped_early'] is True
    assert 'apart' in result['reason'] and 'step 0' in result['reason']
    assert result['step'].tolist() == [0]


def test_hot_huge_timestep_stops_early(committee, si8):
    from aiida_mlip.engine.md import run_md

    result = run_md(committee, si8, 5000, 20.0, 200, 10, seed=1, ensemble='nve')
    assert result['stopped_early'] is True and result['reason']
    assert result['n_steps_done'] < 200
    assert result['step'][-1] == result['n_steps_done']  # the offending frame is kept


def test_md_cli_multi_frame_multi_temperature_as_plain_script(trained_models, tmp_path, engine_env, repo_root, si8):
    """Run md.py copied next to evaluate.py (how a remote job can ship it, no package)."""
    import ase.io

    for name in ('evaluate.py', 'md.py'):
        shutil.copy(repo_root / 'aiida_mlip' / 'engine' / name, tmp_path / name)
    primitive = si8.copy()
    primitive.rattle(0.02, seed=1)
    ase.io.write(tmp_path / 'in.extxyz', [si8, primitive], format='extxyz')
    env = dict(engine_env)
    env.pop('PYTHONPATH', None)  # plain-script mode must not need the package
    cmd = [sys.executable, 'md.py', '--models', *map(str, trained_models), '--structure', 'in.extxyz']
    cmd += ['--temperature', '300', '600', '--timestep', '1', '--steps', '10', '--interval', '5', '--seed', '1']
    cmd += ['--output', 'md.npz', '--trajectory', 'md.extxyz', '--threads', '1']
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr

    with np.load(tmp_path / 'md.npz') as npz:
        data = dict(npz)
    assert data['run_structure_index'].tolist() == [0, 0, 1, 1]
    assert data['run_temperature'].tolist() == [300.0, 600.0, 300.0, 600.0]
    for k in range(4):
        assert data[f'run{k}/step'].tolist() == [0, 5, 10]
        assert not bool(data[f'run{k}/stopped_early'])
        assert data[f'run{k}/max_force_deviation'].shape == (3,)
    assert not np.allclose(data['run0/positions'][-1], data['run1/positions'][-1])

    frames = ase.io.read(tmp_path / 'md.extxyz', ':')
    assert len(frames) == 12 and frames[-1].info['run'] == 3
    summary = json.loads((tmp_path / 'md.json').read_text())
    assert summary['n_runs'] == 4 and summary['n_stopped_early'] == 0 and len(summary['model_sha256']) == 2
