"""Tests for elastic-tensor fitting, symmetrisation, VRH averages and Born stability."""

import numpy as np
import pytest

from aiida_mlip.analysis import elastic as el


def cubic(c11, c12, c44):
    c = np.zeros((6, 6))
    c[:3, :3] = c12
    c[[0, 1, 2], [0, 1, 2]] = c11
    c[[3, 4, 5], [3, 4, 5]] = c44
    return c


C_CUBIC = cubic(153.0, 57.0, 75.0)


def stress_strain_data(c_matrix, magnitudes=(-0.01, -0.005, 0.005, 0.01), offset=None):
    strains = np.array([el.strain_to_voigt(eps) for _, _, eps in el.voigt_strain_matrices(magnitudes)])
    stresses = strains @ c_matrix.T
    if offset is not None:
        stresses = stresses + offset
    return strains, stresses


def test_voigt_strain_matrices_engineering_shear():
    strains = el.voigt_strain_matrices((-0.01, 0.02))
    assert len(strains) == 12
    component, magnitude, eps = strains[7]  # component 3 (yz), magnitude 0.02
    assert (component, magnitude) == (3, 0.02)
    expected = np.zeros((3, 3))
    expected[1, 2] = expected[2, 1] = 0.01  # eps_yz = e4 / 2
    np.testing.assert_array_equal(eps, expected)
    component, magnitude, eps = strains[0]
    assert (component, magnitude) == (0, -0.01)
    assert eps[0, 0] == -0.01 and np.count_nonzero(eps) == 1
    with pytest.raises(ValueError, match='non-zero'):
        el.voigt_strain_matrices((0.0, 0.01))
    with pytest.raises(ValueError, match='at least one'):
        el.voigt_strain_matrices(())


def test_voigt_round_trips():
    eps = np.array([[0.01, 0.002, -0.003], [0.002, -0.02, 0.004], [-0.003, 0.004, 0.005]])
    voigt = el.strain_to_voigt(eps)
    np.testing.assert_allclose(voigt, [0.01, -0.02, 0.005, 0.008, -0.006, 0.004])
    np.testing.assert_allclose(el.voigt_to_strain(voigt), eps)
    sig = eps * 100
    np.testing.assert_allclose(el.stress_to_voigt(sig), [1.0, -2.0, 0.5, 0.4, -0.3, 0.2])
    np.testing.assert_allclose(el.voigt_to_stress(el.stress_to_voigt(sig)), sig)
    with pytest.raises(ValueError, match='symmetric'):
        el.strain_to_voigt(np.arange(9.0).reshape(3, 3))
    with pytest.raises(ValueError, match='3x3'):
        el.stress_to_voigt(np.zeros(6))


def test_engineering_convention_gives_energy_density():
    """With engineering shear, e.C.e/2 equals the tensor contraction eps:sigma/2."""
    eps = el.voigt_to_strain([0, 0, 0, 0.01, 0, 0])
    e = el.strain_to_voigt(eps)
    sigma = el.voigt_to_stress(C_CUBIC @ e)
    assert 0.5 * e @ C_CUBIC @ e == pytest.approx(0.5 * np.sum(eps * sigma))
    assert sigma[1, 2] == pytest.approx(75.0 * 0.01)  # sigma_yz = C44 * 2 eps_yz


@pytest.mark.parametrize('fit_intercept', [True, False])
def test_fit_recovers_cubic_tensor(fit_intercept):
    strains, stresses = stress_strain_data(C_CUBIC)
    c_fit = el.fit_elastic_tensor(strains, stresses, fit_intercept=fit_intercept)
    np.testing.assert_allclose(c_fit, C_CUBIC, atol=1e-6)


def test_fit_removes_residual_stress_and_recovers_triclinic():
    rng = np.random.default_rng(3)
    a = rng.normal(size=(6, 6))
    c_tric = a @ a.T * 20 + np.eye(6) * 50
    offset = np.array([0.3, -0.2, 0.1, 0.05, 0.0, -0.04])
    strains, stresses = stress_strain_data(c_tric, offset=offset)
    np.testing.assert_allclose(el.fit_elastic_tensor(strains, stresses), c_tric, atol=1e-6)
    # without the intercept the residual stress biases the fit only if strains are not symmetric
    strains, stresses = stress_strain_data(c_tric, magnitudes=(0.005, 0.01), offset=offset)
    biased = el.fit_elastic_tensor(strains, stresses, fit_intercept=False)
    assert np.abs(biased - c_tric).max() > 1.0
    np.testing.assert_allclose(el.fit_elastic_tensor(strains, stresses), c_tric, atol=1e-6)


def test_fit_orientation_without_symmetrisation():
    """sigma = C @ e, not C.T @ e: a non-symmetric C must come back unchanged (row = stress)."""
    c_asym = C_CUBIC.copy()
    c_asym[0, 3] = 10.0  # sigma_xx responds to e_yz, but sigma_yz not to e_xx
    strains, stresses = stress_strain_data(c_asym)
    np.testing.assert_allclose(el.fit_elastic_tensor(strains, stresses, symmetric=False), c_asym, atol=1e-6)
    sym = el.fit_elastic_tensor(strains, stresses)
    assert sym[0, 3] == pytest.approx(5.0) and sym[3, 0] == pytest.approx(5.0)


def test_fit_rejects_insufficient_strains():
    strains, stresses = stress_strain_data(C_CUBIC)
    no_shear = strains[:, 3] == 0
    no_shear &= strains[:, 4] == 0
    with pytest.raises(ValueError, match='rank-deficient'):
        el.fit_elastic_tensor(strains[no_shear], stresses[no_shear])
    with pytest.raises(ValueError, match='at least 7'):
        el.fit_elastic_tensor(strains[:6], stresses[:6])
    with pytest.raises(ValueError, match='shape'):
        el.fit_elastic_tensor(strains, stresses[:, :5])


def test_symmetrize_cubic_averages_and_zeroes():
    rng = np.random.default_rng(4)
    noisy = C_CUBIC + rng.normal(0, 1.0, (6, 6))
    sym = el.symmetrize_elastic_tensor(noisy, 'cubic')
    assert sym[0, 0] == pytest.approx(np.mean(np.diag(noisy)[:3]))
    assert sym[3, 3] == pytest.approx(np.mean(np.diag(noisy)[3:]))
    off = [noisy[i, j] for i in range(3) for j in range(3) if i != j]
    assert sym[0, 1] == pytest.approx(np.mean(off))
    np.testing.assert_allclose(np.diag(sym)[:3], sym[0, 0])
    np.testing.assert_allclose(np.diag(sym)[3:], sym[3, 3])
    assert sym[0, 3] == 0 and sym[3, 4] == 0 and sym[5, 0] == 0
    np.testing.assert_allclose(el.symmetrize_elastic_tensor(C_CUBIC, 'cubic'), C_CUBIC, atol=1e-12)


def test_symmetrize_hexagonal_enforces_c66():
    c = np.zeros((6, 6))
    c[0, 0] = c[1, 1] = 200.0
    c[2, 2] = 180.0
    c[0, 1] = c[1, 0] = 80.0
    c[0, 2] = c[2, 0] = c[1, 2] = c[2, 1] = 60.0
    c[3, 3] = c[4, 4] = 45.0
    c[5, 5] = 60.0  # = (200 - 80) / 2
    np.testing.assert_allclose(el.symmetrize_elastic_tensor(c, 'hexagonal'), c, atol=1e-10)
    perturbed = c.copy()
    perturbed[5, 5] = 70.0
    sym = el.symmetrize_elastic_tensor(perturbed, 'hexagonal')
    assert sym[5, 5] == pytest.approx((sym[0, 0] - sym[0, 1]) / 2)
    assert sym[0, 0] == pytest.approx(sym[1, 1])
    # the cubic projection of a hexagonal tensor is different (C33 != C11)
    assert not np.allclose(el.symmetrize_elastic_tensor(c, 'cubic'), c)


@pytest.mark.parametrize('system', ['tetragonal', 'orthorhombic', 'triclinic'])
def test_symmetrize_other_systems_keep_compatible_tensor(system):
    c = cubic(150.0, 60.0, 70.0)
    c[2, 2] = 170.0
    c[5, 5] = 40.0
    projected = el.symmetrize_elastic_tensor(c + np.diag([0, 0, 0, 0, 0, 0.0]), system)
    np.testing.assert_allclose(projected, c, atol=1e-10)
    noisy = c.copy()
    noisy[0, 5] = noisy[5, 0] = 3.0
    if system == 'triclinic':
        np.testing.assert_allclose(el.symmetrize_elastic_tensor(noisy, system), noisy, atol=1e-10)
    else:
        assert el.symmetrize_elastic_tensor(noisy, system)[0, 5] == pytest.approx(0.0, abs=1e-12)


def test_symmetrize_unknown_system():
    with pytest.raises(ValueError, match='supported'):
        el.symmetrize_elastic_tensor(C_CUBIC, 'monoclinicish')
    with pytest.raises(ValueError, match='6x6'):
        el.symmetrize_elastic_tensor(np.eye(3), 'cubic')


def test_vrh_isotropic_gives_lame_values():
    lam, mu = 60.0, 40.0
    iso = cubic(lam + 2 * mu, lam, mu)
    vrh = el.voigt_reuss_hill(iso)
    bulk = lam + 2 * mu / 3
    for key in ('bulk_voigt', 'bulk_reuss', 'bulk_hill'):
        assert vrh[key] == pytest.approx(bulk, rel=1e-12)
    for key in ('shear_voigt', 'shear_reuss', 'shear_hill'):
        assert vrh[key] == pytest.approx(mu, rel=1e-12)


def test_vrh_anisotropic_cubic_bounds():
    vrh = el.voigt_reuss_hill(C_CUBIC)
    # cubic: K_V = K_R = (C11 + 2 C12) / 3; G_V = (C11 - C12 + 3 C44) / 5
    assert vrh['bulk_voigt'] == pytest.approx(89.0)
    assert vrh['bulk_reuss'] == pytest.approx(89.0)
    assert vrh['shear_voigt'] == pytest.approx((153 - 57 + 3 * 75) / 5)
    # G_R = 5 (C11 - C12) C44 / (4 C44 + 3 (C11 - C12))
    assert vrh['shear_reuss'] == pytest.approx(5 * 96 * 75 / (4 * 75 + 3 * 96))
    assert vrh['shear_reuss'] < vrh['shear_hill'] < vrh['shear_voigt']
    with pytest.raises(ValueError, match='singular'):
        el.voigt_reuss_hill(np.zeros((6, 6)))


def test_born_stability():
    ok = el.born_stability(C_CUBIC)
    assert ok['stable'] is True
    # eigenvalues of cubic C: C11+2C12, C11-C12 (x2), C44 (x3) -> min = 75
    assert ok['min_eigenvalue'] == pytest.approx(75.0)
    bad = el.born_stability(cubic(100.0, 120.0, 50.0))  # C12 > C11
    assert bad['stable'] is False
    assert bad['min_eigenvalue'] == pytest.approx(-20.0)
    assert 'not positive definite' in bad['reason']
    assert el.born_stability(cubic(100.0, 50.0, -1.0))['stable'] is False


def test_compare_elastic():
    model = cubic(160.0, 57.0, 60.0)
    result = el.compare_elastic(model, C_CUBIC)
    rel = result['rel_error_percent']
    assert rel['C11'] == pytest.approx(100 * 7 / 153)
    assert rel['C12'] == pytest.approx(0.0)
    assert rel['C44'] == pytest.approx(-20.0)
    assert set(rel) == {'C11', 'C12', 'C44', 'C22', 'C33', 'C55', 'C66'}
    assert result['abs_error_gpa'][3][3] == pytest.approx(15.0)
    assert len(result['abs_error_gpa']) == 6
    # 21 independent entries: 3 x 7 + 3 x 15 = 66
    assert result['mae_gpa'] == pytest.approx(66 / 21)
    assert result['mae_principal_gpa'] == pytest.approx(66 / 9)
