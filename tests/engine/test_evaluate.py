"""Tests of the batched (committee) evaluation engine against mace's own ASE calculator."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

pytestmark = pytest.mark.mace


def _ase_reference(model_path, structures):
    """Per-structure MACECalculator results: the ground truth the batched path must match."""
    from mace.calculators import MACECalculator

    calc = MACECalculator(model_paths=[str(model_path)], device='cpu', default_dtype='float32')
    energies, forces, stresses = [], [], []
    for atoms in structures:
        atoms = atoms.copy()
        atoms.calc = calc
        energies.append(atoms.get_potential_energy())
        forces.append(atoms.get_forces())
        stresses.append(atoms.get_stress(voigt=False))
    return np.array(energies), forces, np.array(stresses)


def test_import_does_not_pull_aiida_or_torch(engine_env, repo_root):
    """The engine runs where AiiDA is absent; the AiiDA side imports it cheaply (no torch)."""
    code = (
        'import sys\n'
        'import aiida_mlip.engine.evaluate, aiida_mlip.engine.md\n'
        "bad = sorted(m for m in sys.modules if m == 'aiida' or m.startswith('aiida.'))\n"
        "assert not bad, bad\n"
        "assert 'torch' not in sys.modules and 'mace' not in sys.modules\n"
    )
    proc = subprocess.run([sys.executable, '-c', code], env=engine_env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    for name in ('evaluate.py', 'md.py', '__init__.py'):
        source = (repo_root / 'aiida_mlip' / 'engine' / name).read_text()
        assert 'import aiida\n' not in source and 'from aiida ' not in source and 'from aiida.' not in source


def test_light_mace_tools_skips_the_training_stack(model_path, engine_env):
    """The engine command loads and runs a model without mace's training stack; other names still resolve."""
    code = (
        'import sys\n'
        'from aiida_mlip.engine.evaluate import evaluate, light_mace_tools, load_models\n'
        'assert light_mace_tools()\n'
        'models = load_models([sys.argv[1]])\n'
        'from ase.build import bulk\n'
        "result = evaluate(models, [bulk('Si', 'diamond', a=5.43)], compute_stress=False)\n"
        "assert result['energies'].shape == (1, 1)\n"
        "heavy = sorted(m for m in ('torchmetrics', 'matplotlib', 'mace.tools.train') if m in sys.modules)\n"
        'assert not heavy, heavy\n'
        'from mace.tools import AtomicNumberTable, build_default_arg_parser  # the second runs the real __init__\n'
        "assert 'mace.tools.train' in sys.modules and not light_mace_tools()\n"
    )
    proc = subprocess.run([sys.executable, '-c', code, str(model_path)], env=engine_env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr


def test_batched_matches_ase_calculator(model_path, test_structures):
    from aiida_mlip.engine.evaluate import evaluate, load_models

    models = load_models([model_path])
    result = evaluate(models, test_structures, batch_size=4)
    ref_e, ref_f, ref_s = _ase_reference(model_path, test_structures)

    assert sorted(set(result['n_atoms'].tolist())) == [2, 8, 16]
    assert result['energies'].shape == (1, len(test_structures))
    assert result['stresses'].shape == (1, len(test_structures), 3, 3)
    np.testing.assert_allclose(result['energies'][0], ref_e, atol=1e-4, rtol=0)
    for index, forces in enumerate(result['forces']):
        assert forces.shape == (1, len(test_structures[index]), 3)
        np.testing.assert_allclose(forces[0], ref_f[index], atol=1e-4, rtol=0)
    np.testing.assert_allclose(result['stresses'][0], ref_s, atol=1e-5, rtol=0)
    assert 'max_force_deviation' not in result  # single model: no committee statistics
    # Batch size must not change anything (graphs are split by ptr correctly).
    single = evaluate(models, test_structures, batch_size=1)
    np.testing.assert_allclose(single['energies'], result['energies'], atol=1e-5)


def test_float64_conversion(model_path, test_structures):
    from aiida_mlip.engine.evaluate import evaluate, load_models

    model32 = load_models([model_path])
    model64 = load_models([model_path], dtype='float64')
    assert next(model64[0].parameters()).dtype.is_floating_point
    assert str(next(model64[0].parameters()).dtype) == 'torch.float64'
    r32 = evaluate(model32, test_structures[:4], compute_stress=False)
    r64 = evaluate(model64, test_structures[:4], compute_stress=False)
    assert r64['stresses'] is None
    np.testing.assert_allclose(r64['energies'], r32['energies'], atol=1e-3)


def test_committee_statistics(trained_models, model_path, test_structures):
    from aiida_mlip.engine.evaluate import evaluate, load_models

    committee = evaluate(load_models(trained_models), test_structures, batch_size=5)
    assert committee['energies'].shape == (2, len(test_structures))
    for key in ('energy_std', 'max_force_deviation'):
        assert np.all(np.isfinite(committee[key])) and np.all(committee[key] > 0), key
    assert np.all(np.isfinite(committee['stress_std'])) and committee['stress_std'].max() > 0
    # max_force_deviation = max_i sqrt(mean_m |F_i^m - <F_i>|^2), checked by hand
    for index, forces in enumerate(committee['forces']):
        deviation = np.sqrt(((forces - forces.mean(axis=0)) ** 2).sum(axis=-1).mean(axis=0)).max()
        assert committee['max_force_deviation'][index] == pytest.approx(deviation, rel=1e-10)
        np.testing.assert_allclose(committee['forces_mean'][index], forces.mean(axis=0))

    same = evaluate(load_models([model_path, model_path]), test_structures, batch_size=5)
    np.testing.assert_allclose(same['energy_std'], 0.0, atol=1e-12)
    np.testing.assert_allclose(same['max_force_deviation'], 0.0, atol=1e-12)
    np.testing.assert_allclose(same['stress_std'], 0.0, atol=1e-12)


def test_missing_element_refused(model_path, test_structures):
    from aiida_mlip.engine.evaluate import MissingElementsError, evaluate, load_models

    bad = test_structures[1].copy()
    bad.symbols[0] = 'Ge'
    with pytest.raises(ValueError, match=r'\bGe\b') as info:
        evaluate(load_models([model_path]), [test_structures[0], bad], batch_size=2)
    assert isinstance(info.value, MissingElementsError)
    assert 'structures 1' in str(info.value)


def test_cli_writes_npz_and_json(trained_models, test_structures, tmp_path, engine_env):
    import ase.io

    from aiida_mlip.engine.evaluate import NPZ_COMMITTEE_KEYS, file_sha256, split_per_atom

    structures = tmp_path / 'input.extxyz'
    ase.io.write(structures, test_structures, format='extxyz')
    output = tmp_path / 'results.npz'
    cmd = [sys.executable, '-m', 'aiida_mlip.engine.evaluate', '--models', *map(str, trained_models)]
    cmd += ['--structures', str(structures), '--output', str(output), '--batch-size', '4', '--threads', '1']
    proc = subprocess.run(cmd, cwd=tmp_path, env=engine_env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr

    n_struct, n_total = len(test_structures), sum(len(a) for a in test_structures)
    with np.load(output) as npz:
        data = dict(npz)
    assert data['energies'].shape == (2, n_struct)
    assert data['forces'].shape == (2, n_total, 3)
    assert data['stresses'].shape == (2, n_struct, 3, 3)
    assert data['n_atoms'].tolist() == [len(a) for a in test_structures]
    assert data['pbc'].shape == (n_struct, 3) and data['pbc'].all()
    assert data['atomic_numbers'].shape == (n_total,) and set(data['atomic_numbers'].tolist()) == {14}
    assert set(NPZ_COMMITTEE_KEYS) <= set(data)
    assert data['max_force_deviation'].shape == (n_struct,)
    per_structure = split_per_atom(data['forces'], data['n_atoms'], axis=1)
    assert [f.shape[1] for f in per_structure] == data['n_atoms'].tolist()

    summary = json.loads((tmp_path / 'results.json').read_text())
    assert summary['n_structures'] == n_struct and summary['n_models'] == 2
    assert summary['model_sha256'] == [file_sha256(p) for p in trained_models]
    assert summary['mace_version'] and summary['wall_seconds'] > 0


def test_cli_bad_model_exit_3(test_structures, tmp_path, engine_env):
    import ase.io

    structures = tmp_path / 'input.extxyz'
    ase.io.write(structures, test_structures[:2], format='extxyz')
    not_a_model = tmp_path / 'garbage.model'
    not_a_model.write_text('not a torch file')
    cmd = [sys.executable, '-m', 'aiida_mlip.engine.evaluate', '--models', str(tmp_path / 'missing.model')]
    cmd += ['--structures', str(structures), '--output', str(tmp_path / 'r.npz')]
    proc = subprocess.run(cmd, cwd=tmp_path, env=engine_env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 3, proc.stderr
    error_lines = [line for line in proc.stderr.splitlines() if line.startswith('ERROR: ')]
    assert len(error_lines) == 1 and 'missing.model' in error_lines[0]
    assert not (tmp_path / 'r.npz').exists()

    from aiida_mlip.engine.evaluate import main

    argv = ['--models', str(not_a_model), '--structures', str(structures), '--output', str(tmp_path / 'r.npz')]
    assert main(argv) == 3


def test_cli_missing_element_exit_2(model_path, test_structures, tmp_path, capsys):
    import ase.io

    from aiida_mlip.engine.evaluate import main

    bad = test_structures[0].copy()
    bad.symbols[1] = 'Ge'
    structures = tmp_path / 'input.extxyz'
    ase.io.write(structures, [test_structures[1], bad], format='extxyz')
    code = main(['--models', str(model_path), '--structures', str(structures), '--output', str(tmp_path / 'r.npz')])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith('ERROR: ') and 'Ge' in err[0]
    assert not (tmp_path / 'r.npz').exists()

    # a readable file that is not a structure file -> 4
    (tmp_path / 'junk.extxyz').write_text('this is not\nan xyz file\n')
    assert main(['--models', str(model_path), '--structures', str(tmp_path / 'junk.extxyz')]) == 4


def test_cli_no_stress_single_model(model_path, test_structures, tmp_path):
    import ase.io

    from aiida_mlip.engine.evaluate import main

    structures = tmp_path / 'input.extxyz'
    ase.io.write(structures, test_structures[:3], format='extxyz')
    output = tmp_path / 'single.npz'
    argv = ['--models', str(model_path), '--structures', str(structures), '--output', str(output), '--no-stress']
    assert main(argv) == 0
    with np.load(output) as npz:
        keys = set(npz.files)
    assert {'energies', 'forces', 'n_atoms', 'atomic_numbers'} <= keys
    assert 'stresses' not in keys and 'max_force_deviation' not in keys
    assert json.loads((tmp_path / 'single.json').read_text())['compute_stress'] is False
