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
