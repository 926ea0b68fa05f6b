"""Tests for aiida_mlip.analysis.phonons on toy force-constant models with known answers.

Two toy problems are built here (no calculator packages):

* a 1D diatomic chain whose dynamical matrix is assembled from real-space force constants
  and diagonalised with numpy;
* a simple-cubic one-atom crystal with harmonic central springs to nearest (k1) and
  next-nearest (k2) neighbours, run through a real phonopy finite-displacement calculation
  with forces computed by hand from the displacements.

Flipping the sign of the spring constants makes the crystal dynamically unstable, which must
show up as imaginary (negative) frequencies.
"""

import numpy as np
import pytest

from aiida_mlip.analysis.phonons import (
    IMAGINARY_THRESHOLD_THZ,
    band_centre_shift_percent,
    compare_band_frequencies,
    dos_spearman,
    find_imaginary_modes,
)

# sqrt(eV / (Å^2 amu)) / (2 pi) in THz, from CODATA values
EV = 1.602176634e-19
AMU = 1.66053906660e-27
TO_THZ = np.sqrt(EV / (1e-20 * AMU)) / (2 * np.pi) / 1e12


def signed_frequencies(eigenvalues):
    """omega^2 -> signed frequency (phonopy convention: imaginary shown as negative)."""
    eigenvalues = np.asarray(eigenvalues, dtype=float)
    return np.sign(eigenvalues) * np.sqrt(np.abs(eigenvalues)) * TO_THZ


# --------------------------------------------------------------------------------------
# 1D diatomic chain: atoms A (mass m1) and B (mass m2) per cell of length 1 (units of a);
# spring k1 between A and B in the same cell, spring k2 between B and A of the next cell.
# --------------------------------------------------------------------------------------


def chain_frequencies(k1, k2, m1, m2, n_q=41):
    """Signed frequencies (THz) of the diatomic chain on q in [0, pi] (shape (n_q, 2))."""
    # force constants Phi[(a, b, R)] = d2E / du_a(0) du_b(R)
    phi = {
        (0, 0, 0): k1 + k2,
        (1, 1, 0): k1 + k2,
        (0, 1, 0): -k1,
        (1, 0, 0): -k1,
        (1, 0, 1): -k2,  # B(0) - A(+1)
        (0, 1, -1): -k2,  # A(0) - B(-1)
    }
    masses = np.array([m1, m2])
    qs = np.linspace(0.0, np.pi, n_q)
    freqs = []
    for q in qs:
        dyn = np.zeros((2, 2), dtype=complex)
        for (a, b, cell), value in phi.items():
            dyn[a, b] += value * np.exp(1j * q * cell) / np.sqrt(masses[a] * masses[b])
        freqs.append(signed_frequencies(np.linalg.eigvalsh(dyn)))
    return qs, np.array(freqs)


def test_toy_chain_matches_analytic_zone_boundary():
    """Sanity check of the toy itself: with k1 = k2 = k, at q = pi: w^2 = 2k/m1 and 2k/m2."""
    _, freqs = chain_frequencies(2.0, 2.0, 10.0, 40.0)
    expected = np.sort([np.sqrt(2 * 2.0 / 10.0), np.sqrt(2 * 2.0 / 40.0)]) * TO_THZ
    np.testing.assert_allclose(freqs[-1], expected, rtol=1e-10)
    assert abs(freqs[0, 0]) < 1e-5  # acoustic mode at Gamma


def test_stable_chain_has_no_imaginary_modes():
    qs, freqs = chain_frequencies(2.0, 1.0, 10.0, 40.0)
    result = find_imaginary_modes(freqs, qpoints=np.column_stack([qs, 0 * qs, 0 * qs]))
    assert result['has_imaginary'] is False
    assert result['count'] == 0
    assert result['qpoint_indices'] == []
    assert result['qpoints'] == []
    assert result['min_frequency'] > IMAGINARY_THRESHOLD_THZ


def test_negative_spring_chain_is_flagged():
    qs, freqs = chain_frequencies(2.0, -1.0, 10.0, 40.0)
    result = find_imaginary_modes(freqs, qpoints=np.column_stack([qs, 0 * qs, 0 * qs]))
    assert result['has_imaginary'] is True
    # k1 k2 < 0: the lower branch is imaginary at every q except Gamma
    assert result['qpoint_indices'] == list(range(1, len(qs)))
    assert result['count'] == len(qs) - 1
    assert result['min_frequency'] < -1.0
    assert result['qpoints'][0][0] == pytest.approx(qs[1])


def test_threshold_ignores_acoustic_noise():
    freqs = np.array([[-0.01, 0.0, 0.02], [1.0, 2.0, 3.0]])
    assert find_imaginary_modes(freqs)['has_imaginary'] is False
    assert find_imaginary_modes(freqs, threshold=-0.001)['qpoint_indices'] == [0]
    with pytest.raises(ValueError, match='threshold'):
        find_imaginary_modes(freqs, threshold=0.1)
    with pytest.raises(ValueError, match='qpoints'):
        find_imaginary_modes(freqs, qpoints=np.zeros((3, 3)))
    with pytest.raises(ValueError, match='non-finite'):
        find_imaginary_modes([[np.nan, 1.0]])


def test_compare_band_frequencies_sorts_bands():
    ref = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    model = np.array([[3.0, 1.0, 2.0], [6.0, 5.0, 4.3]])  # same as ref up to band order, +0.3
    result = compare_band_frequencies(model, ref)
    assert result['mae_thz'] == pytest.approx(0.3 / 6)
    assert result['rmse_thz'] == pytest.approx(np.sqrt(0.09 / 6))
    assert result['max_abs_thz'] == pytest.approx(0.3)
    with pytest.raises(ValueError, match='shape'):
        compare_band_frequencies(model[:, :2], ref)


def test_band_centre_shift_and_dos_spearman():
    ref = np.array([[1.0, 2.0], [3.0, 4.0]])
    assert band_centre_shift_percent(ref * 1.1, ref) == pytest.approx(10.0)
    assert band_centre_shift_percent(ref - 0.25, ref) == pytest.approx(-10.0)
    grid = np.linspace(0, 10, 101)
    dos_ref = np.exp(-((grid - 5) ** 2)) + 0.5 * np.exp(-((grid - 8) ** 2) / 0.5)
    assert dos_spearman(2.5 * dos_ref, dos_ref) == pytest.approx(1.0)
    shifted = np.exp(-((grid - 3) ** 2))
    assert dos_spearman(shifted, dos_ref) < 0.9
    with pytest.raises(ValueError, match='same grid'):
        dos_spearman(dos_ref[:-1], dos_ref)
    with pytest.raises(ValueError, match='positive'):
        band_centre_shift_percent(ref, -ref)


# --------------------------------------------------------------------------------------
# Simple cubic crystal with central springs, through phonopy
# --------------------------------------------------------------------------------------

A_SC = 2.5  # Å


def spring_bonds(positions, cell, a):
    """Bonds (i, j, unit vector, shell) of the ideal supercell: shell 0 = NN (a), 1 = NNN (a sqrt 2)."""
    inv = np.linalg.inv(cell)
    bonds = []
    for i in range(len(positions)):
        for j in range(i + 1, len(positions)):
            frac = (positions[j] - positions[i]) @ inv
            vec = (frac - np.round(frac)) @ cell
            dist = np.linalg.norm(vec)
            for shell, length in enumerate((a, a * np.sqrt(2))):
                if abs(dist - length) < 1e-6:
                    bonds.append((i, j, vec / dist, shell))
    return bonds


def spring_forces(displaced, ideal, cell, bonds, k_shells):
    """Harmonic central-spring forces (eV/Å) for displacements (Å) from the ideal positions."""
    inv = np.linalg.inv(cell)
    frac = (displaced - ideal) @ inv
    u = (frac - np.round(frac)) @ cell
    forces = np.zeros_like(u)
    for i, j, n, shell in bonds:
        f = -k_shells[shell] * n * np.dot(n, u[i] - u[j])
        forces[i] += f
        forces[j] -= f
    return forces


def sc_phonopy_bands(k1, k2):
    """Band frequencies (list of path segments) and masses of the SC spring crystal via phonopy."""
    from phonopy import Phonopy
    from phonopy.structure.atoms import PhonopyAtoms

    unitcell = PhonopyAtoms(symbols=['Cu'], cell=np.eye(3) * A_SC, scaled_positions=[[0.0, 0.0, 0.0]])
    phonon = Phonopy(unitcell, supercell_matrix=np.eye(3, dtype=int) * 3, primitive_matrix=None)
    phonon.generate_displacements(distance=0.01)
    ideal = phonon.supercell.positions
    cell = phonon.supercell.cell
    bonds = spring_bonds(ideal, cell, A_SC)
    assert len(bonds) == 27 * (6 + 12) // 2
    phonon.forces = [
        spring_forces(sc.positions, ideal, cell, bonds, (k1, k2)) for sc in phonon.supercells_with_displacements
    ]
    phonon.produce_force_constants()
    g, x, m, r = [0, 0, 0], [0.5, 0, 0], [0.5, 0.5, 0], [0.5, 0.5, 0.5]
    paths = [np.linspace(start, end, 11) for start, end in ((g, x), (x, m), (m, g), (g, r))]
    phonon.run_band_structure(paths)
    bands = phonon.band_structure
    return bands.frequencies, bands.qpoints, float(phonon.primitive.masses[0])


def test_phonopy_spring_crystal_stable_then_unstable():
    k1, k2 = 1.0, 0.5  # eV/Å^2
    freqs, qpoints, mass = sc_phonopy_bands(k1, k2)
    stable = find_imaginary_modes(freqs, qpoints=np.vstack(qpoints))
    assert stable['has_imaginary'] is False
    assert stable['min_frequency'] > IMAGINARY_THRESHOLD_THZ
    # analytic check at X = (1/2, 0, 0): D_xx = (4 k1 + 8 k2)/m, D_yy = D_zz = 4 k2 / m
    x_point = freqs[0][-1]
    expected = np.sort(signed_frequencies(np.array([4 * k2, 4 * k2, 4 * k1 + 8 * k2]) / mass))
    np.testing.assert_allclose(np.sort(x_point), expected, rtol=1e-4)

    freqs_neg, qpoints_neg, _ = sc_phonopy_bands(-k1, -k2)
    unstable = find_imaginary_modes(freqs_neg, qpoints=np.vstack(qpoints_neg))
    assert unstable['has_imaginary'] is True
    all_q = np.vstack(qpoints_neg)
    gamma = set(np.flatnonzero(np.all(np.abs(all_q) < 1e-12, axis=1)).tolist())
    assert gamma == {0, 32, 33}  # segments G-X, X-M, M-G, G-R of 11 points each
    # all springs negative: every q-point except Gamma has imaginary modes
    assert unstable['qpoint_indices'] == sorted(set(range(len(all_q))) - gamma)
    # most negative mode is -sqrt((4 k1 + 8 k2) / m) at X
    assert unstable['min_frequency'] == pytest.approx(-signed_frequencies((4 * k1 + 8 * k2) / mass), rel=1e-4)
