"""``mlip.md`` CalcJob and ``mlip.md_stability`` WorkChain: real MD with tiny real MACE models on localhost.

The models are the session fixtures of ``tests/evaluate_fixtures.py`` (two tiny MACE models trained on Morse-labelled
rattled Si). The "broken" model is the first one with its learned energy scale inverted (``scale_shift.scale *= -1``):
the same file format, elements and cutoff, but the diamond lattice becomes an energy maximum and the atoms collapse
within ~35 fs -- the failure an MD stability check exists to catch.
"""
from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import count_calcjobs
from tests.evaluate_fixtures import (  # noqa: F401  (fixtures are used by name)
    evaluate_code, mlip_models, rattled_si, tiny_mace_files,
)

pytestmark = pytest.mark.mace


@pytest.fixture
def md_code(localhost):
    """The ``mlip-md`` InstalledCode (the venv python) on localhost."""
    from aiida_mlip.setup.environment import ensure_mlip_codes

    code = ensure_mlip_codes(localhost)['md']
    assert code.default_calc_job_plugin == 'mlip.md'
    return code


@pytest.fixture(scope='session')
def inverted_model_file(tiny_mace_files, tmp_path_factory):
    """The first tiny model with its energy scale negated: a valid MACE file whose dynamics collapses."""
    import torch

    model = torch.load(tiny_mace_files[0], weights_only=False, map_location='cpu')
    with torch.no_grad():
        model.scale_shift.scale.mul_(-1.0)
    path = tmp_path_factory.mktemp('broken_model') / 'inverted.model'
    torch.save(model, path)
    return path


@pytest.fixture
def si8():
    from aiida import orm
    from ase.build import bulk

    return orm.StructureData(ase=bulk('Si', 'diamond', a=5.43, cubic=True))


def _node(value):
    """Plain python values as AiiDA nodes (nodes, and namespaces of nodes, pass unchanged)."""
    from aiida import orm

    if isinstance(value, dict) and any(isinstance(item, orm.Node) for item in value.values()):
        return value
    for kind, node_class in ((bool, orm.Bool), (int, orm.Int), (float, orm.Float), (str, orm.Str), (list, orm.List),
                             (dict, orm.Dict)):
        if isinstance(value, kind):
            return node_class(value)
    return value


def _workflow_builder(md_code, models, structure, **inputs):
    from aiida_mlip.workflows.properties.md_stability import MdStabilityWorkChain

    builder = MdStabilityWorkChain.get_builder()
    builder.structure = structure
    builder.mlip.code = md_code
    builder.mlip.models = models
    builder.mlip.metadata.options.max_wallclock_seconds = 600
    for name, value in inputs.items():
        builder[name] = _node(value)
    return builder


def _md_builder(md_code, models, **inputs):
    from aiida_mlip.calculations.md import MlipMdCalculation

    builder = MlipMdCalculation.get_builder()
    builder.code = md_code
    builder.models = models
    builder.metadata.options.max_wallclock_seconds = 600
    for name, value in inputs.items():
        builder[name] = _node(value)
    return builder


def test_md_calcjob_committee_several_cells(md_code, mlip_models, tiny_mace_files):
    """Two starting cells x two temperatures in ONE job; outputs per run, same numbers as the engine in-process."""
    from aiida import orm
    from aiida.engine import run_get_node

    from aiida_mlip.engine.evaluate import load_models
    from aiida_mlip.engine.md import run_md

    cells = rattled_si(2, seed=5, sizes=(8, 2), label=False)
    structures = {'b_si8': orm.StructureData(ase=cells[0]), 'a_si2': orm.StructureData(ase=cells[1])}
    builder = _md_builder(md_code, mlip_models, structures=structures, temperatures=[300, 500.0], steps=20,
                          interval=5, seed=3)
    _, node = run_get_node(builder)
    assert node.is_finished_ok, (node.exit_status, node.exit_message)

    summary = node.outputs.summary.get_dict()
    assert summary['n_runs'] == 4 and summary['n_stopped_early'] == 0 and summary['committee'] is True
    assert summary['structure_keys'] == ['a_si2', 'b_si8']
    assert [(r['structure_key'], r['temperature']) for r in summary['runs']] == [
        ('a_si2', 300.0), ('a_si2', 500.0), ('b_si8', 300.0), ('b_si8', 500.0)]
    assert [r['n_atoms'] for r in summary['runs']] == [2, 2, 8, 8]
    assert sorted(node.outputs.trajectories) == ['run_000', 'run_001', 'run_002', 'run_003']

    trajectory = node.outputs.trajectories['run_002']
    assert trajectory.get_stepids().tolist() == [0, 5, 10, 15, 20]
    assert trajectory.get_positions().shape == (5, 8, 3) and trajectory.symbols == ['Si'] * 8
    assert tuple(trajectory.pbc) == (True, True, True)
    np.testing.assert_allclose(trajectory.get_times(), [0, 5, 10, 15, 20])
    thermo = node.outputs.thermo['run_002']
    for name in ('potential_energy', 'kinetic_energy', 'total_energy', 'temperature', 'max_force_deviation'):
        assert thermo.get_array(name).shape == (5,) and np.all(np.isfinite(thermo.get_array(name))), name
    assert np.all(thermo.get_array('max_force_deviation')[1:] > 0)
    retrieved = set(node.outputs.retrieved.base.repository.list_object_names())
    assert {'md.npz', 'md.json', 'md.extxyz', 'engine.err'} <= retrieved

    # Run 2 (b_si8, 300 K) is reproducible in-process with the documented seeding default_rng([seed, k]).
    reference = run_md(load_models(tiny_mace_files), cells[0], 300.0, 1.0, 20, 5, seed=3,
                       rng=np.random.default_rng([3, 2]))
    np.testing.assert_allclose(trajectory.get_positions(), reference['positions'], atol=1e-4)
    np.testing.assert_allclose(thermo.get_array('temperature'), reference['temperature'], rtol=1e-3, atol=1e-2)


def test_stable_model_si8_300k(md_code, mlip_models, si8):
    """~60 steps of NVT + NVE at 300 K with the tiny model: finite, stable, small drift, Si-Si peak near 2.35 Å."""
    from aiida import orm
    from aiida.engine import run_get_node

    builder = _workflow_builder(md_code, {'tiny': mlip_models['seed1']}, si8, temperatures=[300.0], steps=60,
                                nve_steps=60, interval=5, friction=0.05, equilibration_fraction=0.3)
    results, node = run_get_node(builder)
    assert node.is_finished_ok, (node.exit_status, node.exit_message)

    stability = results['stability'].get_dict()
    assert stability['stable'] is True, stability['reasons']
    assert stability['reasons'] == []
    entry = stability['per_temperature'][0]
    assert entry['temperature'] == 300.0 and entry['n_steps_done'] == 60 and not entry['stopped_early']
    assert 2.0 < entry['min_distance_angstrom'] < 2.4
    assert entry['temperature_rel_deviation'] < 0.5
    assert entry['nve']['n_steps_done'] == 60
    drift = stability['drift_mev_per_atom_per_ps']
    assert drift is not None and abs(drift) < 0.1, drift  # docs/sources.md: < 0.1-1 meV/atom/ps
    assert stability['thresholds']['drift_mev_per_atom_per_ps'] == 1.0
    print(f'Si8 300 K: NVE drift {drift:.5f} meV/atom/ps, T deviation {entry["temperature_rel_deviation"]:.2f}, '
          f'dmin {entry["min_distance_angstrom"]:.3f} A')

    rdf = results['rdf']
    g, r = rdf.get_array('g'), rdf.get_array('r')
    assert g.shape == (1, 100) and r[-1] < 2.72  # capped at half the cubic cell (5.43 / 2)
    assert abs(entry['rdf_first_peak_angstrom'] - 2.35) < 0.2

    calcs = {link.link_label: link.node for link in node.base.links.get_outgoing(node_class=orm.CalcJobNode).all()}
    assert set(calcs) == {'md_nvt', 'md_nve'}
    assert calcs['md_nve'].inputs.ensemble.value == 'nve' and calcs['md_nvt'].inputs.ensemble.value == 'nvt'
    positions = calcs['md_nvt'].outputs.trajectories['run_000'].get_positions()
    assert positions.shape == (13, 8, 3) and np.all(np.isfinite(positions))
    for label, calc in calcs.items():
        engine = calc.outputs.summary['wall_seconds']
        total = (calc.mtime - calc.ctime).total_seconds()
        print(f'{label}: engine {engine:.1f} s (MD {calc.outputs.summary["runs"][0]["wall_seconds"]:.1f} s), '
              f'process {total:.1f} s')


def test_broken_model_is_flagged_unstable(md_code, inverted_model_file, si8):
    """The inverted model collapses: exit 0 with stable False and the reasons by default, 520 on request."""
    from aiida import orm
    from aiida.engine import run_get_node

    from aiida_mlip.data.model import MlipModel

    broken = MlipModel.from_file(inverted_model_file, label='inverted-energy').store()
    builder = _workflow_builder(md_code, {'broken': broken}, si8, temperatures=[300.0], steps=60, nve_steps=60,
                                interval=5)
    results, node = run_get_node(builder)
    assert node.is_finished_ok, (node.exit_status, node.exit_message)  # a verdict, not a crash
    stability = results['stability'].get_dict()
    assert stability['stable'] is False
    reasons = ' | '.join(stability['reasons'])
    # NVT: the thermostat cannot hold the collapsing lattice (temperature explodes, or atoms meet first);
    # NVE: atoms collapse (the engine stops the run at the 1.0 Å threshold) and the energy is not conserved.
    assert 'NVT: mean temperature' in reasons or 'NVT run stopped early' in reasons, reasons
    assert 'NVE run stopped early' in reasons and 'apart' in reasons, reasons
    entry = stability['per_temperature'][0]
    assert not entry['stable'] and entry['nve']['stopped_early'] and entry['nve']['n_steps_done'] < 60
    assert stability['min_distance_angstrom'] < 1.0
    assert entry['temperature_rel_deviation'] > 0.5 or entry['stopped_early']
    print(f'broken model: {reasons}')

    calc_statuses = sorted(c.exit_status for c in node.called if c.process_label == 'MlipMdCalculation')
    assert calc_statuses == [0, 0]  # stopped-early runs are results of the CalcJob, not failures

    # `fail_on_unstable=True` turns the same verdict into exit 520, outputs attached. The identical MD jobs are
    # taken from the AiiDA cache (each real one costs ~15-30 s here, mostly imports and polling).
    from aiida.manage.caching import enable_caching

    builder.fail_on_unstable = orm.Bool(True)
    with enable_caching(identifier='aiida.calculations:mlip.md'):
        results, node = run_get_node(builder)
    assert node.exit_status == 520, (node.exit_status, node.exit_message)
    assert 'atoms collapsed' in node.exit_message or 'apart' in node.exit_message
    assert results['stability']['stable'] is False and 'rdf' in results
    assert all(c.base.caching.is_created_from_cache for c in node.called if c.process_label == 'MlipMdCalculation')


@pytest.mark.parametrize('temperatures', [[300.0, 0.0], [-50.0]])
def test_non_positive_temperature_refused_before_any_calcjob(md_code, mlip_models, si8, temperatures):
    from aiida.engine import run

    models = {'tiny': mlip_models['seed1']}
    before = count_calcjobs()
    with pytest.raises(ValueError, match=r'must be finite and > 0 K'):
        run(_workflow_builder(md_code, models, si8, temperatures=temperatures))
    with pytest.raises(ValueError, match=r'must be finite and > 0 K'):
        run(_md_builder(md_code, models, structure=si8, temperatures=temperatures, steps=10))
    assert count_calcjobs() == before


def test_element_missing_from_model_refused(md_code, mlip_models):
    from aiida import orm
    from aiida.engine import run
    from ase.build import bulk

    sic = orm.StructureData(ase=bulk('SiC', 'zincblende', a=4.36))
    before = count_calcjobs()
    with pytest.raises(ValueError) as excinfo:
        run(_workflow_builder(md_code, mlip_models, sic))
    message = str(excinfo.value)
    assert 'C (in structure)' in message and 'seed1' in message
    with pytest.raises(ValueError, match=r'does not cover C'):
        run(_md_builder(md_code, mlip_models, structure=sic, temperatures=[300], steps=10))
    assert count_calcjobs() == before


@pytest.mark.parametrize('change, message', [
    ({'timestep_fs': 0.0}, r'timestep_fs` must lie in \(0, 5.0\]'),
    ({'timestep_fs': 10.0}, r'timestep_fs` must lie in'),
    ({'steps': 0}, r'`steps` must be >= 1'),
    ({'temperatures': [300.0, 300.0]}, 'duplicates'),
    ({'temperatures': []}, 'empty'),
    ({'nve_steps': 5, 'interval': 5}, 'nve_steps >= 2 \\* interval'),
    ({'thresholds': {'max_temperature': 1.0}}, 'unknown threshold keys'),
    ({'thresholds': {'drift_mev_per_atom_per_ps': -1.0}}, 'must be positive'),
    ({'supercell': [2, 0, 1]}, 'supercell'),
    ({'equilibration_fraction': 1.0}, 'equilibration_fraction'),
    ({'min_atoms': 0}, '`min_atoms` must be >= 1'),
])
def test_workflow_validator(md_code, mlip_models, si8, change, message):
    from aiida.engine import run

    before = count_calcjobs()
    with pytest.raises(ValueError, match=message):
        run(_workflow_builder(md_code, {'tiny': mlip_models['seed1']}, si8, **change))
    assert count_calcjobs() == before


def test_one_atom_md_is_refused_unless_repeated(md_code, mlip_models):
    """One atom cannot move (its centre of mass is held fixed): a clear error, not an 'unstable' verdict."""
    from aiida import orm
    from aiida.engine import run
    from ase.build import bulk

    one_atom = orm.StructureData(ase=bulk('Si', 'sc', a=2.6))
    before = count_calcjobs()
    with pytest.raises(ValueError, match='the MD would run on one atom'):
        run(_workflow_builder(md_code, {'tiny': mlip_models['seed1']}, one_atom))
    assert count_calcjobs() == before
    from aiida_mlip.workflows.properties.md_stability import md_atom_count

    builder = _workflow_builder(md_code, {'tiny': mlip_models['seed1']}, one_atom, min_atoms=50)
    assert md_atom_count(builder) == 64  # 4x4x4: 3x3x3 = 27 would be short of 50
    builder = _workflow_builder(md_code, {'tiny': mlip_models['seed1']}, one_atom, supercell=[2, 1, 1], min_atoms=3)
    assert md_atom_count(builder) == 16  # 2 atoms after `supercell`, then 2x2x2


def test_calcjob_validator_messages(mlip_models, si8, evaluate_code):
    from aiida import orm

    from aiida_mlip.calculations.md import validate_inputs
    from aiida_mlip.workflows.properties.md_stability import validate_inputs as validate_workflow

    base = {'models': mlip_models, 'structure': si8, 'temperatures': orm.List([300]), 'steps': orm.Int(10)}
    assert validate_inputs(base) is None
    assert 'not both' in validate_inputs({**base, 'structures': {'x': si8}})
    assert 'no starting structure' in validate_inputs({k: v for k, v in base.items() if k != 'structure'})
    assert 'ensemble' in validate_inputs({**base, 'ensemble': orm.Str('npt')})
    assert 'friction' in validate_inputs({**base, 'friction': orm.Float(0.0)})
    assert 'numbers in K' in validate_inputs({**base, 'temperatures': orm.List(['hot'])})
    assert 'at least one model' in validate_inputs({**base, 'models': {}})
    atoms = si8.get_ase()
    atoms.positions[1] = atoms.positions[0] + [0.1, 0.0, 0.0]
    close = orm.StructureData(ase=atoms)
    assert 'apart' in validate_inputs({**base, 'structure': close})

    from aiida_mlip.workflows.properties.md_stability import MdStabilityWorkChain

    spec_inputs = MdStabilityWorkChain.spec().inputs
    inputs = {'structure': si8, 'mlip': {'code': evaluate_code, 'models': mlip_models}}
    for port in ('temperatures', 'steps', 'nve_steps', 'timestep_fs', 'interval', 'friction',
                 'equilibration_fraction', 'rdf_r_max', 'rdf_n_bins', 'min_atoms'):
        inputs[port] = spec_inputs[port].default()
    assert 'needs a `mlip.md` code' in validate_workflow(inputs)


def _synthetic_run(n_frames, temperature, blow_up=False, dt=5.0):
    """A run dict as the engine writes it: Si8 with small vibrations; optionally a last, non-finite frame."""
    from ase.build import bulk

    atoms = bulk('Si', 'diamond', a=5.43, cubic=True)
    rng = np.random.default_rng(0)
    positions = atoms.positions[None] + rng.normal(0, 0.05, (n_frames, 8, 3))
    temperatures = temperature * (1 + rng.normal(0, 0.05, n_frames))
    total = -40.0 + 1e-7 * np.arange(n_frames)
    if blow_up:
        positions[-1] = np.nan
        temperatures[-1] = np.nan
        total[-1] = np.nan
    steps = np.arange(n_frames) * int(dt)
    return {
        'step': steps, 'times_fs': steps * 1.0, 'potential_energy': total - 0.1,
        'kinetic_energy': np.full(n_frames, 0.1),
        'total_energy': total, 'temperature': temperatures, 'positions': positions,
        'cells': np.repeat(np.array(atoms.cell)[None], n_frames, axis=0), 'numbers': atoms.numbers,
        'pbc': np.array([True] * 3), 'stopped_early': blow_up,
        'reason': 'non-finite energy/forces/positions at step 45' if blow_up else '', 'n_steps_done': int(steps[-1]),
    }


def test_analysis_of_a_blown_up_run_and_the_parser_helpers(aiida_profile):
    """Non-finite frames are stored (TrajectoryData keeps the offending frame) and judged, not crashed on."""
    from aiida import orm

    from aiida_mlip.parsers.md import THERMO_ARRAYS, check_md_arrays, trajectory_node
    from aiida_mlip.workflows.properties.md_stability import analyse_md_stability

    good, bad = _synthetic_run(11, 300.0), _synthetic_run(10, 600.0, blow_up=True)
    nve = _synthetic_run(11, 150.0)
    runs = {}
    for prefix, key, run in (('nvt', 'run_000', good), ('nvt', 'run_001', bad), ('nve', 'run_000', nve)):
        runs[f'{prefix}_trajectory_{key}'] = trajectory_node(run).store()
        thermo = orm.ArrayData()
        for name in THERMO_ARRAYS:
            if name in run:
                thermo.set_array(name, np.asarray(run[name]))
        runs[f'{prefix}_thermo_{key}'] = thermo.store()

    def info(run, key, temperature):
        return {'key': key, 'temperature': temperature, 'n_atoms': 8, 'stopped_early': run['stopped_early'],
                'reason': run['reason'], 'n_steps_done': run['n_steps_done']}

    nvt_summary = orm.Dict({'timestep_fs': 1.0, 'runs': [info(good, 'run_000', 300.0), info(bad, 'run_001', 600.0)]})
    runs['nve_summary'] = orm.Dict({'timestep_fs': 1.0, 'runs': [info(nve, 'run_000', 300.0)]})
    parameters = orm.Dict({'thresholds': {'min_distance_angstrom': 1.0, 'drift_mev_per_atom_per_ps': 1.0,
                                          'temperature_rel_deviation': 0.5},
                           'steps': 50, 'nve_steps': 50, 'equilibration_fraction': 0.2, 'rdf_r_max': 6.0,
                           'rdf_n_bins': 50})
    results = analyse_md_stability(parameters=parameters, nvt_summary=nvt_summary, **runs)
    stability = results['stability'].get_dict()
    first, second = stability['per_temperature']
    assert first['stable'] and first['drift_mev_per_atom_per_ps'] == pytest.approx(1e-7 * 1e6 / 5 / 8)
    assert not second['stable'] and stability['stable'] is False
    reasons = ' | '.join(second['reasons'])
    assert 'non-finite' in reasons and 'stopped early after 45 of 50 steps' in reasons
    assert all(reason.startswith('T = 600 K') for reason in stability['reasons'])
    assert results['rdf'].get_array('g').shape == (2, 50)

    arrays = {f'run0/{name}': np.asarray(value) for name, value in good.items()}
    arrays.update(run_temperature=np.array([300.0]), run_structure_index=np.array([0]))
    assert check_md_arrays(arrays, {'runs': [{'temperature': 300.0}]}, {'n_runs': 1}) is None
    assert 'asked for' in check_md_arrays(arrays, {'runs': [{'temperature': 300.0}] * 2}, {})
    arrays['run0/positions'] = arrays['run0/positions'][:, :4]
    assert 'positions' in check_md_arrays(arrays, {}, {})
    del arrays['run0/temperature']
    assert 'temperature' in check_md_arrays(arrays, {}, {})
