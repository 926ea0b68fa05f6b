"""ValidationWorkChain: a tiny MACE model trained on pw.x labels vs pw.x itself, on EOS, elastic and phonons."""
import numpy as np
import pytest
from aiida import engine, orm

from .fixtures_mlip import (  # noqa: F401  (fixtures)
    mlip_codes, si_dataset, si_splits, trained, validated, validation_builder,
)

pytestmark = [pytest.mark.pw, pytest.mark.mace]


@pytest.fixture(scope='module')
def si2_structure():
    from ase.build import bulk

    return orm.StructureData(ase=bulk('Si', 'diamond', a=5.45))


def test_comparison_is_complete_and_finite(validated):
    results, node = validated
    assert node.is_finished_ok, node.exit_message
    comparison = results['comparison'].get_dict()
    for key in ('v0_error_percent', 'b0_error_percent'):
        assert np.isfinite(comparison['eos'][key])
    assert np.isfinite(comparison['elastic']['mae_gpa'])
    assert np.isfinite(comparison['phonons']['mae_thz']) and comparison['phonons']['mae_thz'] >= 0
    assert -1.0 <= comparison['phonons']['dos_spearman'] <= 1.0
    assert isinstance(comparison['phonons']['imaginary_mismatch'], bool)
    verdict = comparison['verdict']
    assert verdict['passed'] in (True, False)
    assert set(verdict['checks']) >= {'eos.v0_error_percent', 'phonons.mae_thz', 'elastic.bulk_modulus_error_percent'}
    # A failed check always comes with its reason.
    assert len(verdict['failed']) == sum(1 for passed in verdict['checks'].values() if not passed)


def test_both_engines_ran_and_figures_exist(validated):
    results, node = validated
    from aiida.common.links import LinkType

    labels = sorted(link.link_label for link in node.base.links.get_outgoing(link_type=LinkType.CALL_WORK).all())
    expected = [f'{p}_{e}' for p in ('eos', 'elastic', 'phonons') for e in ('dft', 'mlip')] + ['md_stability_mlip']
    assert labels == sorted(expected)
    md = results['comparison']['md_stability']
    assert isinstance(md['unstable'], bool)
    assert results['mlip']['md_stability']['stable'] == (not md['unstable'])
    md_cell = node.base.links.get_outgoing(link_label_filter='md_stability_mlip').one().node.outputs.structure
    assert len(md_cell.sites) == 54  # Si2 repeated 3x3x3: the protocol's min_atoms 50, not the 2-atom cell
    assert sorted(results['figures']) == ['cij_parity', 'eos_overlay', 'phonon_bands']
    with results['figures']['eos_overlay'].open(mode='rb') as handle:
        assert handle.read(8) == b'\x89PNG\r\n\x1a\n'


def test_reference_reuse_runs_no_new_dft(validated, mlip_codes, trained, si2_structure):  # noqa: F811
    results, _ = validated
    pw_runs = orm.QueryBuilder().append(orm.CalcJobNode, filters={
        'process_type': 'aiida.calculations:quantumespresso.pw'}).count()
    builder = validation_builder(mlip_codes, trained[0]['model'], si2_structure, properties=['eos', 'phonons'])
    builder.reference = {port: results['dft'][port] for port in
                         ('eos', 'eos_curve', 'phonon_bands', 'phonon_dos', 'phonon_summary')}
    again, node = engine.run_get_node(builder)
    assert node.is_finished_ok, node.exit_message
    assert orm.QueryBuilder().append(orm.CalcJobNode, filters={
        'process_type': 'aiida.calculations:quantumespresso.pw'}).count() == pw_runs
    first, second = results['comparison'].get_dict(), again['comparison'].get_dict()
    assert second['eos']['v0_reference'] == pytest.approx(first['eos']['v0_reference'])


def test_validation_without_dft_or_reference_is_refused(mlip_codes, trained, si2_structure):  # noqa: F811
    builder = validation_builder(mlip_codes, trained[0]['model'], si2_structure)
    with pytest.raises(ValueError, match='no DFT engine'):
        engine.run(builder)
    del builder.mlip
    with pytest.raises(ValueError, match='give the `mlip` engine .*, the `dft` engine .*, or both'):
        engine.run(builder)


@pytest.mark.parametrize('thresholds, message', [
    ({'cij_error_pct': 10.0}, "unknown thresholds ['cij_error_pct']; the known ones are v0_error_percent"),
    ({'phonon_mae_thz': 'small'}, "threshold `phonon_mae_thz` must be a finite number, got 'small'"),
    ({'md_drift_mev_per_atom_ps': True}, 'threshold `md_drift_mev_per_atom_ps` must be a finite number'),
    ({'cij_error_percent': -10.0}, 'threshold `cij_error_percent` must not be negative'),
    ({'dos_spearman': 1.5}, 'threshold `dos_spearman` is a rank correlation and must be in [-1, 1], got 1.5'),
])
def test_bad_thresholds_are_refused_before_anything_runs(mlip_codes, si2_structure, tmp_path, thresholds,  # noqa: F811
                                                         message):
    """The `accurate` protocol builds; a bad threshold is refused with its reason, by the builder and by the run."""
    from aiida_mlip.data.model import MlipModel
    from aiida_mlip.workflows.validation import ValidationWorkChain

    from .fixtures_mlip import write_untrained_mace

    model = MlipModel.from_file(write_untrained_mace(tmp_path / 'si.model'), label='untrained-si').store()
    builder = ValidationWorkChain.get_builder_from_protocol(
        mlip_codes['evaluate'], model, si2_structure, protocol='accurate', md_code=mlip_codes['md'])
    assert builder.thresholds['cij_error_percent'] == 10.0 and builder.thresholds['v0_error_percent'] == 0.5
    assert builder.md_stability.temperatures.get_list() == [900]
    assert builder.md_stability.nve_steps.value == 200
    bad = orm.Dict({**builder.thresholds.get_dict(), **thresholds})
    with pytest.raises(ValueError) as info:
        builder.thresholds = bad
    assert message in str(info.value)
    processes = orm.QueryBuilder().append(orm.ProcessNode).count()
    with pytest.raises(ValueError) as info:
        engine.run(ValidationWorkChain, **{**builder, 'thresholds': bad})
    assert message in str(info.value)
    assert orm.QueryBuilder().append(orm.ProcessNode).count() == processes


def test_comparison_judges_cij_and_md_drift_and_stores_a_nan_error_as_a_failure(aiida_profile):
    """compare_properties on hand-made outputs: per-constant checks, the NVE drift, an undefined modulus."""
    from aiida_mlip.workflows.validation import compare_properties

    def elastic(c11, c12, c44, bulk):
        tensor = np.zeros((6, 6))
        tensor[:3, :3] = c12
        np.fill_diagonal(tensor[:3, :3], c11)
        np.fill_diagonal(tensor[3:, 3:], c44)
        return orm.Dict({'elastic_tensor_gpa': tensor.tolist(), 'born_stable': True, 'bulk_modulus_vrh_gpa': bulk,
                         'shear_modulus_vrh_gpa': 40.0, 'constants_gpa': {'C11': c11, 'C12': c12, 'C44': c44}})

    comparison = compare_properties(
        orm.Dict({'cij_error_percent': 10.0, 'elastic_error_percent': 50.0, 'md_drift_mev_per_atom_ps': 1.0}),
        orm.Dict(), mlip_elastic=elastic(105.0, 50.0, 35.0, None), dft_elastic=elastic(100.0, 50.0, 40.0, 66.7),
        mlip_md_stability=orm.Dict({'stable': True, 'reasons': [], 'drift_mev_per_atom_per_ps': -1.5})).get_dict()
    assert comparison['elastic']['cij_error_percent'] == pytest.approx({'C11': 5.0, 'C12': 0.0, 'C44': -12.5})
    assert comparison['elastic']['bulk_modulus_error_percent'] is None  # NaN, not storable: stored as None
    assert comparison['md_stability']['drift_mev_per_atom_ps'] == -1.5
    checks = comparison['verdict']['checks']
    assert {name for name, passed in checks.items() if not passed} == {
        'elastic.cij_error_percent.C44', 'elastic.bulk_modulus_error_percent', 'md_stability.drift_mev_per_atom_ps'}
    assert checks['elastic.cij_error_percent.C11'] and checks['md_stability.unstable']


def test_relax_validates_on_the_dft_relaxed_structure_once(mlip_codes, trained, pw_code, si2_structure):  # noqa: F811
    """`relax`: one pw.x vc-relax of the 0.7 %-compressed Si2, every property on its result; a rerun with that
    structure as reference runs no pw.x, and without DFT or that reference `relax` is refused."""
    builder = validation_builder(mlip_codes, trained[0]['model'], si2_structure, pw_code=pw_code, properties=['eos'])
    builder.relax = orm.Bool(True)
    results, node = engine.run_get_node(builder)
    assert node.is_finished_ok, node.exit_message
    relaxations = [called for called in node.called if called.process_label == 'PwBaseWorkChain']
    assert len(relaxations) == 1 and relaxations[0].inputs.pw.parameters['CONTROL']['calculation'] == 'vc-relax'
    relaxed = results['dft']['relaxed_structure']
    assert relaxed.uuid == relaxations[0].outputs.output_structure.uuid
    eos_runs = [called for called in node.called if called.process_label == 'EquationOfStateWorkChain']
    assert {run.inputs.structure.uuid for run in eos_runs} == {relaxed.uuid}  # both engines, the relaxed cell
    per_atom = relaxed.get_cell_volume() / len(relaxed.sites)
    assert per_atom > si2_structure.get_cell_volume() / 2 + 0.1  # expanded towards the DFT minimum (a0 5.49 Å)
    # the DFT V0 of the scan is the relaxed volume: centred, not on an edge
    assert results['dft']['eos']['v0'] == pytest.approx(per_atom, rel=0.005)
    assert not results['dft']['eos']['minimum_near_edge']

    pw_runs = orm.QueryBuilder().append(orm.CalcJobNode, filters={
        'process_type': 'aiida.calculations:quantumespresso.pw'}).count()
    again = validation_builder(mlip_codes, trained[0]['model'], si2_structure, properties=['eos'])
    again.relax = orm.Bool(True)
    again.reference = {port: results['dft'][port] for port in ('eos', 'eos_curve', 'relaxed_structure')}
    second, second_node = engine.run_get_node(again)
    assert second_node.is_finished_ok, second_node.exit_message
    assert second['dft']['relaxed_structure'].uuid == relaxed.uuid
    assert orm.QueryBuilder().append(orm.CalcJobNode, filters={
        'process_type': 'aiida.calculations:quantumespresso.pw'}).count() == pw_runs

    del again.reference['relaxed_structure']
    with pytest.raises(ValueError, match='`relax` needs the DFT engine'):
        engine.run(again)
