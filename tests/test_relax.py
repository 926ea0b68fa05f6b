"""Optional relaxation first: the ``aiida_mlip.engine.relax`` engine, ``mlip.relax`` and ``relax=True`` in EOS.

(a) the engine in-process (and its CLI) with a tiny real MACE model; (b) MlipRelaxCalculation through AiiDA on two
structures (and 501 when ``steps`` is too small); (c) EquationOfStateWorkChain with the mlip engine and relax=True;
(d) the same with the DFT engine (pw.x vc-relax of Si2, then the scan).
"""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from tests.evaluate_fixtures import (  # noqa: F401  (fixtures are used by name)
    evaluate_code, mlip_models, tiny_mace_files,
)


def compressed_rattled_si2(scale=0.98, rattle=0.03, seed=1):
    from ase.build import bulk

    atoms = bulk('Si', 'diamond', a=5.43 * scale)
    atoms.rattle(rattle, seed=seed)
    return atoms


def test_engine_relax_imports_no_aiida_and_no_torch():
    code = (
        'import sys\n'
        'import aiida_mlip.engine.relax\n'
        "bad = sorted(m for m in sys.modules if m == 'aiida' or m.startswith('aiida.'))\n"
        "assert not bad, bad\n"
        "assert 'torch' not in sys.modules\n"
    )
    subprocess.run([sys.executable, '-c', code], check=True)


@pytest.mark.mace
def test_engine_relaxes_cell_and_positions_in_process(tiny_mace_files):
    from aiida_mlip.engine.evaluate import load_models
    from aiida_mlip.engine.relax import relax_atoms

    models = load_models(tiny_mace_files[:1])
    atoms = compressed_rattled_si2()
    fmax = 0.005
    result = relax_atoms(models, atoms, fmax=fmax, steps=300, relax_cell=True)
    assert result['converged'], result
    assert 0 < result['n_steps'] <= 300
    assert np.abs(result['forces']).max() < fmax
    assert np.sqrt((result['forces'] ** 2).sum(axis=1)).max() < fmax
    assert result['residual_fmax'] < fmax
    assert abs(result['atoms'].get_volume() - atoms.get_volume()) > 0.1  # the cell moved
    # positions only: the cell is kept
    fixed = relax_atoms(models, atoms, fmax=fmax, steps=300, relax_cell=False)
    assert fixed['converged'] and fixed['max_force'] < fmax
    assert np.allclose(fixed['atoms'].cell, atoms.cell)
    assert atoms.calc is None  # the input is not modified


@pytest.mark.mace
def test_engine_cli_writes_extxyz_npz_summary_and_exit_codes(tiny_mace_files, tmp_path):
    import ase.io
    from ase.build import bulk

    from aiida_mlip.engine import relax

    structures = tmp_path / 'in.extxyz'
    ase.io.write(structures, [compressed_rattled_si2(seed=1), compressed_rattled_si2(1.01, seed=2)], format='extxyz')
    output, summary = tmp_path / 'relaxed.extxyz', tmp_path / 'relax.json'
    status = relax.main(['--models', str(tiny_mace_files[0]), '--structures', str(structures),
                         '--output', str(output), '--summary', str(summary), '--fmax', '0.005', '--steps', '200',
                         '--fix-cell', '--threads', '1'])
    assert status == 0
    frames = ase.io.read(output, index=':')
    assert len(frames) == 2
    data = json.loads(summary.read_text())
    assert data['n_structures'] == 2 and data['relax_cell'] is False and data['all_converged']
    for frame, row in zip(frames, data['structures']):
        assert bool(frame.info['converged']) and row['converged']
        assert np.sqrt((frame.get_forces() ** 2).sum(axis=1)).max() < 0.005
    with np.load(tmp_path / 'relaxed.npz') as npz:
        assert npz['converged'].all() and npz['cells'].shape == (2, 3, 3) and npz['positions'].shape == (4, 3)

    germanium = tmp_path / 'ge.extxyz'
    ase.io.write(germanium, bulk('Ge', 'diamond', a=5.65), format='extxyz')
    status = relax.main(['--models', str(tiny_mace_files[0]), '--structures', str(germanium),
                         '--output', str(tmp_path / 'ge_out.extxyz')])
    assert status == 2  # missing element, like the other engine modules


def _run_relax(code, models, structures, **inputs):
    from aiida import orm
    from aiida.engine import run_get_node

    from aiida_mlip.calculations.relax import MlipRelaxCalculation

    builder = MlipRelaxCalculation.get_builder()
    builder.code = code
    builder.models = models
    builder.structures = structures
    for name, value in inputs.items():
        setattr(builder, name, orm.to_aiida_type(value))
    builder.metadata.options.max_wallclock_seconds = 600
    return run_get_node(builder)


@pytest.fixture
def relax_code(localhost):
    from aiida_mlip.setup.environment import ensure_mlip_codes

    return ensure_mlip_codes(localhost)['relax']


@pytest.mark.mace
def test_mlip_relax_calculation_on_two_structures(relax_code, mlip_models):
    from aiida import orm

    structures = {'b_expanded': orm.StructureData(ase=compressed_rattled_si2(1.02, seed=2)),
                  'a_compressed': orm.StructureData(ase=compressed_rattled_si2(0.98, seed=1))}
    results, node = _run_relax(relax_code, {'seed1': mlip_models['seed1']}, structures, fmax=0.005, steps=300)
    assert node.is_finished_ok, (node.exit_status, node.exit_message)
    relaxed = results['relaxed_structures']
    assert set(relaxed) == set(structures)
    summary = results['summary'].get_dict()
    assert summary['all_converged'] and summary['n_structures'] == 2
    for key, structure in structures.items():
        assert abs(relaxed[key].get_cell_volume() - structure.get_cell_volume()) > 0.1
        row = summary['structures'][key]
        assert row['converged'] and row['residual_fmax'] < 0.005 and row['n_steps'] > 0
        assert relaxed[key].get_formula() == structure.get_formula()

    # Too few steps: exit 501, outputs still attached.
    one = {'si': orm.StructureData(ase=compressed_rattled_si2(0.96, seed=3))}
    results, node = _run_relax(relax_code, {'seed1': mlip_models['seed1']}, one, fmax=0.001, steps=1)
    assert node.exit_status == 501, node.exit_message
    assert 'si' in results['relaxed_structures']
    assert results['summary']['structures']['si']['converged'] is False


@pytest.mark.mace
def test_bad_relax_parameters_are_refused(relax_code, mlip_models):
    from aiida import orm

    with pytest.raises(ValueError, match='`fmax` must be > 0'):
        _run_relax(relax_code, {'seed1': mlip_models['seed1']},
                   {'si': orm.StructureData(ase=compressed_rattled_si2())}, fmax=-0.01)


@pytest.mark.mace
def test_eos_with_mlip_engine_relaxes_first(evaluate_code, relax_code, mlip_models):
    from aiida import engine, orm

    from aiida_mlip.workflows.properties.eos import EquationOfStateWorkChain

    structure = orm.StructureData(ase=compressed_rattled_si2(1.03, rattle=0.0))
    builder = EquationOfStateWorkChain.get_builder()
    builder.structure = structure
    builder.n_points = orm.Int(5)
    builder.mlip = {'code': evaluate_code, 'models': {'seed1': mlip_models['seed1']}}
    builder.relax = orm.Bool(True)
    results, node = engine.run_get_node(builder)  # relax_code: found on the computer of the evaluate code
    assert node.is_finished_ok, (node.exit_status, node.exit_message)
    relaxed = results['relaxed_structure']
    assert abs(relaxed.get_cell_volume() - structure.get_cell_volume()) > 0.1
    relax_calcs = [c for c in node.called if c.process_type == 'aiida.calculations:mlip.relax']
    assert len(relax_calcs) == 1 and relax_calcs[0].inputs.code.uuid == relax_code.uuid
    # the scan is centred on the relaxed cell, whose volume is the minimum of the same model
    v0 = results['eos']['v0']
    assert abs(v0 - relaxed.get_cell_volume() / 2) / v0 < 0.02


def test_relax_is_off_by_default_and_needs_a_relax_code_only_when_asked():
    from aiida_mlip.workflows.properties.elastic import ElasticWorkChain
    from aiida_mlip.workflows.properties.eos import EquationOfStateWorkChain
    from aiida_mlip.workflows.properties.phonons import PhononWorkChain

    for process in (EquationOfStateWorkChain, ElasticWorkChain, PhononWorkChain):
        spec = process.spec()
        assert spec.inputs['relax'].default().value is False
        assert spec.inputs['relax_cell'].default().value is True
        assert 'relaxed_structure' in spec.outputs and not spec.outputs['relaxed_structure'].required


@pytest.mark.pw
def test_eos_with_dft_engine_vc_relaxes_si2_first(pw_code, pseudo_family):
    from aiida import engine, orm

    from aiida_mlip.workflows.properties.eos import EquationOfStateWorkChain
    from tests.test_elastic import insulator_dft_inputs

    structure = orm.StructureData(ase=compressed_rattled_si2(0.97, rattle=0.0))  # a = 5.27 Å, V = 36.6 Å³
    builder = EquationOfStateWorkChain.get_builder()
    builder.structure = structure
    builder.n_points = orm.Int(5)
    builder.dft = insulator_dft_inputs(pw_code, structure)
    builder.relax = orm.Bool(True)
    results, node = engine.run_get_node(builder)
    assert node.is_finished_ok, (node.exit_status, node.exit_message)
    relax = [c for c in node.called if c.process_label == 'PwBaseWorkChain']
    assert len(relax) == 1
    assert relax[0].inputs.pw.parameters['CONTROL']['calculation'] == 'vc-relax'
    relaxed = results['relaxed_structure']
    # PBE Si at 20 Ry: ~20 Å³/atom; the input was compressed to 18.3 Å³/atom
    assert relaxed.get_cell_volume() / 2 > structure.get_cell_volume() / 2 + 0.8
    v0 = results['eos']['v0']
    assert abs(v0 - relaxed.get_cell_volume() / 2) / v0 < 0.03
