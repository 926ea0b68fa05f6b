"""ElasticWorkChain: the DFT engine on Si2 with the real pw.x, the pure fit on a known tensor, input checks."""
import numpy as np
import pytest
from aiida import engine, orm

from aiida_mlip.analysis.elastic import voigt_strain_matrices, voigt_to_stress
from aiida_mlip.calculations.sampling import strained_copies
from aiida_mlip.workflows.properties.elastic import (
    EV_PER_A3_TO_GPA, ElasticWorkChain, elastic_analysis, rotate_elastic_tensor, strain_to_voigt,
)

from .conftest import count_calcjobs
from .test_eos import dft_engine_inputs

#: PBE relaxed-ion reference of Si (GPa), for the synthetic test only.
C_SI = np.zeros((6, 6))
C_SI[:3, :3] = 57.0
np.fill_diagonal(C_SI, [153.0, 153.0, 153.0, 75.0, 75.0, 75.0])


def insulator_dft_inputs(pw_code, structure, kpoints_distance=None):
    """The test DFT engine with fixed occupations: Si is an insulator, so no smearing and no empty bands.

    Half the bands of the smeared run, and no restart: with smearing, PwBaseWorkChain's band-occupation check
    restarted every 16-atom phonon supercell with more bands. The cold smearing of the `fast` protocol (0.0275 Ry)
    also leaks occupation across the small gap of a coarse-k Si supercell and softened the optical phonon at
    Gamma from 15.5 to 14.5 THz.
    """
    inputs = dft_engine_inputs(pw_code, structure)
    parameters = inputs['pw_base']['pw']['parameters'].get_dict()
    system = parameters['SYSTEM']
    system['occupations'] = 'fixed'
    system.pop('smearing', None)
    system.pop('degauss', None)
    inputs['pw_base']['pw']['parameters'] = orm.Dict(parameters)
    if kpoints_distance is not None:
        inputs['pw_base']['kpoints_distance'] = orm.Float(kpoints_distance)
    return inputs


@pytest.fixture
def si2_equilibrium():
    from ase.build import bulk

    return orm.StructureData(ase=bulk('Si', 'diamond', a=5.45))


def synthetic_frames(atoms, c_matrix, residual_gpa=0.0):
    """Reference + strained cells of ``atoms`` with stresses from a linear C (plus a constant residual stress)."""
    strains = [np.zeros((3, 3))] + [eps for _, _, eps in voigt_strain_matrices()]
    frames = strained_copies(atoms, strains)
    for frame, eps in zip(frames, strains):
        stress = c_matrix @ strain_to_voigt(eps) + residual_gpa * np.array([1, 1, 1, 0, 0, 0])
        frame.info['REF_stress'] = voigt_to_stress(stress) / EV_PER_A3_TO_GPA
    return frames


@pytest.mark.parametrize('euler', [(0, 0, 0), (20, 35, -50)])
def test_fit_recovers_a_known_cubic_tensor_in_any_orientation(euler):
    """A rotated crystal: the symmetry projection happens in spglib's standard frame, C comes back rotated."""
    from ase.build import bulk
    from scipy.spatial.transform import Rotation

    rotation = Rotation.from_euler('xyz', euler, degrees=True).as_matrix()
    atoms = bulk('Si', 'diamond', a=5.45)
    atoms.set_cell(np.asarray(atoms.cell) @ rotation.T, scale_atoms=True)
    c_rotated = rotate_elastic_tensor(C_SI, rotation)
    result, strains, stresses = elastic_analysis(synthetic_frames(atoms, c_rotated, residual_gpa=-2.0))
    assert result['crystal_system'] == 'cubic' and result['symmetry_projection'] == 'cubic'
    assert result['space_group_number'] == 227
    np.testing.assert_allclose(result['elastic_tensor_gpa'], c_rotated, atol=1e-6)
    np.testing.assert_allclose(rotate_elastic_tensor(result['elastic_tensor_gpa'], rotation.T), C_SI, atol=1e-6)
    assert result['bulk_modulus_vrh_gpa'] == pytest.approx((153 + 2 * 57) / 3)
    assert result['born_stable'] and result['clamped_ion']
    np.testing.assert_allclose(result['fitted_residual_stress_gpa'], [-2, -2, -2, 0, 0, 0], atol=1e-6)
    assert strains.shape == stresses.shape == (25, 6)


def test_an_unstable_tensor_is_reported_with_its_reason():
    from ase.build import bulk

    unstable = C_SI.copy()
    unstable[:3, :3] = 170.0  # C12 > C11: tetragonal shear lowers the energy
    np.fill_diagonal(unstable[:3, :3], 160.0)
    result, _, _ = elastic_analysis(synthetic_frames(bulk('Si', 'diamond', a=5.45), unstable))
    assert not result['born_stable']
    assert 'not positive definite' in result['born_reason']
    assert result['born_min_eigenvalue_gpa'] == pytest.approx(-10.0)


def test_a_singular_tensor_still_gets_a_verdict():
    from ase.build import bulk

    singular = C_SI.copy()
    singular[:3, :3] = 160.0  # C11 = C12: Reuss averages undefined
    result, _, _ = elastic_analysis(synthetic_frames(bulk('Si', 'diamond', a=5.45), singular))
    assert not result['born_stable']
    assert result['bulk_modulus_vrh_gpa'] is None and result['moduli_gpa']['bulk_voigt'] == pytest.approx(160.0)


@pytest.mark.pw
def test_dft_elastic_constants_of_silicon(pw_code, pseudo_family, si2_equilibrium):
    builder = ElasticWorkChain.get_builder()
    builder.structure = si2_equilibrium
    builder.strain_magnitudes = orm.List([-0.01, 0.01])  # 13 pw.x runs; the default 4 magnitudes give 25
    builder.dft = insulator_dft_inputs(pw_code, si2_equilibrium)
    results, node = engine.run_get_node(builder)
    assert node.is_finished_ok, node.exit_message
    elastic = results['elastic'].get_dict()
    print('elastic', {k: elastic[k] for k in ('constants_gpa', 'bulk_modulus_vrh_gpa', 'shear_modulus_vrh_gpa',
                                             'symmetry_deviation_gpa', 'fit_rms_gpa', 'reference_stress_gpa')})
    constants = elastic['constants_gpa']
    c11, c12, c44 = constants['C11'], constants['C12'], constants['C44']
    assert elastic['crystal_system'] == 'cubic' and elastic['crystal_system_source'] == 'spglib'
    assert elastic['clamped_ion'] is True
    assert c11 > c12 > 0 and c44 > 0
    # cubic after symmetrisation: the three diagonal constants agree, the forbidden ones are zero
    c_sym = np.array(elastic['elastic_tensor_gpa'])
    np.testing.assert_allclose(np.diag(c_sym)[:3], c11, rtol=1e-9)
    np.testing.assert_allclose(np.diag(c_sym)[3:], c44, rtol=1e-9)
    assert np.abs(c_sym[:3, 3:]).max() < 1e-6 and np.abs(c_sym[3:, 3:] - np.diag(np.diag(c_sym)[3:])).max() < 1e-6
    # the raw fit was already nearly cubic: the DFT noise is small compared with the constants
    assert elastic['symmetry_deviation_gpa'] < 0.1 * c11
    assert elastic['born_stable']
    bulk_modulus = (c11 + 2 * c12) / 3
    assert 50.0 < bulk_modulus < 130.0  # PBE 88 GPa; 20 Ry, coarse k
    assert elastic['bulk_modulus_vrh_gpa'] == pytest.approx(bulk_modulus, rel=1e-6)
    # clamped-ion C44 of diamond Si is ~110 GPa in PBE (relaxed-ion ~75): loose bounds for the test settings
    assert 60.0 < c44 < 150.0
    assert results['frames'].n_frames == 13
    assert results['stress_strain'].get_array('strains').shape == (13, 6)


@pytest.mark.parametrize('magnitudes, message', [
    ([], 'strain_magnitudes is empty'),
    ([-0.01, -0.005], 'need both signs'),
    ([0.0, 0.01], 'non-zero'),
    ([-0.1, 0.1], r'\|eps\| <= 0.05'),
    ([-0.01, 0.01, 0.01], 'distinct'),
])
def test_bad_strains_are_refused_before_compute(pw_code, pseudo_family, si2_equilibrium, magnitudes, message):
    builder = ElasticWorkChain.get_builder()
    builder.structure = si2_equilibrium
    builder.dft = dft_engine_inputs(pw_code, si2_equilibrium)
    builder.strain_magnitudes = orm.List(magnitudes)
    before = count_calcjobs()
    with pytest.raises(ValueError, match=message):
        engine.run(builder)
    assert count_calcjobs() == before


def test_unknown_crystal_system_is_refused(pw_code, pseudo_family, si2_equilibrium):
    builder = ElasticWorkChain.get_builder()
    builder.structure = si2_equilibrium
    builder.dft = dft_engine_inputs(pw_code, si2_equilibrium)
    builder.crystal_system = orm.Str('cubical')
    with pytest.raises(ValueError, match='crystal_system must be one of'):
        engine.run(builder)


def test_an_engine_is_required(si2_equilibrium):
    builder = ElasticWorkChain.get_builder()
    builder.structure = si2_equilibrium
    with pytest.raises(ValueError, match='exactly one engine'):
        engine.run(builder)
