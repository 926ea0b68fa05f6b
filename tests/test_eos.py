"""EquationOfStateWorkChain: the DFT engine on Si2 with the real pw.x, and its input checks."""
import pytest
from aiida import engine, orm

from aiida_mlip.workflows.labeling import DftLabelingWorkChain
from aiida_mlip.workflows.properties.eos import EquationOfStateWorkChain

from .conftest import TEST_FAMILY, TEST_PW_OVERRIDES, count_calcjobs


def dft_engine_inputs(pw_code, structure):
    """The `dft` namespace: DftLabelingWorkChain protocol inputs without the structures."""
    builder = DftLabelingWorkChain.get_builder_from_protocol(
        pw_code, [structure], protocol='fast', pseudo_family=TEST_FAMILY, overrides={'pw_base': TEST_PW_OVERRIDES})
    inputs = builder._inputs(prune=True)
    for key in ('structures', 'isolated_atoms', 'config_types'):
        inputs.pop(key, None)
    return inputs


@pytest.fixture
def si2_equilibrium():
    from ase.build import bulk

    return orm.StructureData(ase=bulk('Si', 'diamond', a=5.45))


@pytest.mark.pw
def test_dft_eos_of_silicon(pw_code, pseudo_family, si2_equilibrium):
    builder = EquationOfStateWorkChain.get_builder()
    builder.structure = si2_equilibrium
    builder.n_points = orm.Int(5)
    builder.dft = dft_engine_inputs(pw_code, si2_equilibrium)
    results, node = engine.run_get_node(builder)
    assert node.is_finished_ok, node.exit_message
    eos = results['eos'].get_dict()
    # PBE Si: V0 ~ 20.4 Å³/atom (a = 5.47 Å), B0 ~ 88 GPa; 20 Ry and a 2x2x2-ish mesh are far from converged.
    assert 19.0 < eos['v0'] < 22.0
    assert 50.0 < eos['b0_gpa'] < 130.0
    assert eos['residual_rms'] < 2e-3
    assert results['frames'].n_frames == 5
    assert len(results['curve'].get_array('volumes')) == 5


@pytest.mark.parametrize('change, message', [
    ({'volume_range': -0.05}, 'volume_range must lie in'),
    ({'n_points': 3}, 'n_points must be at least 5'),
])
def test_bad_scan_is_refused_before_compute(pw_code, pseudo_family, si2_equilibrium, change, message):
    builder = EquationOfStateWorkChain.get_builder()
    builder.structure = si2_equilibrium
    builder.dft = dft_engine_inputs(pw_code, si2_equilibrium)
    for key, value in change.items():
        builder[key] = orm.Float(value) if isinstance(value, float) else orm.Int(value)
    before = count_calcjobs()
    with pytest.raises(ValueError, match=message):
        engine.run(builder)
    assert count_calcjobs() == before


def test_an_engine_is_required(si2_equilibrium):
    builder = EquationOfStateWorkChain.get_builder()
    builder.structure = si2_equilibrium
    with pytest.raises(ValueError, match='exactly one engine'):
        engine.run(builder)
