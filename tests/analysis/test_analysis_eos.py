"""Tests for the Birch-Murnaghan fit: synthetic data must return the generating parameters."""

import numpy as np
import pytest

from aiida_mlip.analysis.eos import EV_PER_A3_TO_GPA, birch_murnaghan_energy, fit_birch_murnaghan

E0, V0, B0, BP = -13.7, 40.9, 0.55, 4.2


def test_conversion_constant():
    # 1 eV/Å^3 = 1.602176634e-19 J / 1e-30 m^3 = 160.2176634 GPa
    assert EV_PER_A3_TO_GPA == pytest.approx(1.602176634e-19 / 1e-30 / 1e9, rel=1e-12)


def test_bm_energy_minimum_and_curvature():
    """E(V0) = E0, dE/dV(V0) = 0 and V d2E/dV2 at V0 = B0 (definition of the bulk modulus)."""
    assert birch_murnaghan_energy(V0, E0, V0, B0, BP) == pytest.approx(E0)
    h = 1e-3
    e_minus, e_0, e_plus = birch_murnaghan_energy([V0 - h, V0, V0 + h], E0, V0, B0, BP)
    assert (e_plus - e_minus) / (2 * h) == pytest.approx(0.0, abs=1e-6)
    assert V0 * (e_plus - 2 * e_0 + e_minus) / h**2 == pytest.approx(B0, rel=1e-5)


@pytest.mark.parametrize('n_points, span', [(5, 0.06), (11, 0.1)])
def test_fit_recovers_parameters(n_points, span):
    volumes = V0 * np.linspace(1 - span, 1 + span, n_points)
    energies = birch_murnaghan_energy(volumes, E0, V0, B0, BP)
    fit = fit_birch_murnaghan(volumes, energies)
    assert fit['v0'] == pytest.approx(V0, rel=1e-4)
    assert fit['e0'] == pytest.approx(E0, rel=1e-4)
    assert fit['b0_ev_per_a3'] == pytest.approx(B0, rel=1e-4)
    assert fit['b0_gpa'] == pytest.approx(88.12, abs=0.01)
    assert fit['b0_prime'] == pytest.approx(BP, rel=1e-4)
    assert fit['residual_rms'] < 1e-8


def test_fit_with_noise_and_unsorted_input():
    rng = np.random.default_rng(1)
    volumes = V0 * np.linspace(0.92, 1.08, 15)
    rng.shuffle(volumes)
    energies = birch_murnaghan_energy(volumes, E0, V0, B0, BP) + rng.normal(0, 1e-4, volumes.size)
    fit = fit_birch_murnaghan(volumes, energies)
    assert fit['v0'] == pytest.approx(V0, rel=1e-3)
    assert fit['b0_ev_per_a3'] == pytest.approx(B0, rel=2e-2)
    assert 2e-5 < fit['residual_rms'] < 3e-4


def test_fit_requires_five_points():
    volumes = V0 * np.linspace(0.95, 1.05, 4)
    with pytest.raises(ValueError, match='at least 5 points'):
        fit_birch_murnaghan(volumes, birch_murnaghan_energy(volumes, E0, V0, B0, BP))


def test_fit_rejects_minimum_outside_range():
    volumes = V0 * np.linspace(1.05, 1.2, 7)  # all expanded: minimum lies below the range
    energies = birch_murnaghan_energy(volumes, E0, V0, B0, BP)
    with pytest.raises(ValueError, match='below the smallest sampled volume') as info:
        fit_birch_murnaghan(volumes, energies)
    assert 'Å^3' in str(info.value)
    volumes = V0 * np.linspace(0.8, 0.95, 7)
    with pytest.raises(ValueError, match='above the largest sampled volume'):
        fit_birch_murnaghan(volumes, birch_murnaghan_energy(volumes, E0, V0, B0, BP))


@pytest.mark.parametrize(
    'volumes, energies, match',
    [
        ([1, 2, 3, 4, 5], [1, 2, 3, 4], 'energies'),
        ([1, 2, 3, 4, np.nan], [1, 2, 3, 4, 5], 'finite'),
        ([1, 2, 2, 4, 5], [3, 2, 1, 2, 3], 'distinct'),
        ([-1, 2, 3, 4, 5], [3, 2, 1, 2, 3], 'positive'),
        ([1, 2, 3, 4, 5], [0, 1, 1.5, 1, 0], 'no minimum'),
    ],
)
def test_fit_bad_input(volumes, energies, match):
    with pytest.raises(ValueError, match=match):
        fit_birch_murnaghan(volumes, energies)


def test_suggest_scan_centre_finds_an_unbracketed_minimum():
    from aiida_mlip.analysis.eos import birch_murnaghan_energy, suggest_scan_centre

    volumes = np.linspace(42.0, 48.0, 5)  # the minimum (40.9) lies below the scan
    energies = birch_murnaghan_energy(volumes, -10.0, 40.9, 0.55, 4.2)
    centre = suggest_scan_centre(volumes, energies)
    assert centre < 42.0  # points the next scan towards smaller volumes
    assert abs(centre - 40.9) < 2.0
    assert suggest_scan_centre([1.0, 2.0, 3.0], [3.0, 2.5, 1.0]) == 3.0  # concave data: lowest sampled volume


def test_minimum_near_edge_means_the_outermost_interval():
    from aiida_mlip.analysis.eos import minimum_near_edge

    volumes = [18.0, 19.0, 20.0, 21.0, 22.0]
    assert not minimum_near_edge(volumes, 20.0)
    assert not minimum_near_edge(volumes, 19.0) and not minimum_near_edge(volumes, 21.0)
    assert minimum_near_edge(volumes, 18.9) and minimum_near_edge(volumes, 21.1)
    assert minimum_near_edge(list(reversed(volumes)), 21.5)  # order of the scan does not matter


@pytest.mark.parametrize('cubic', [False, True])
def test_conventional_lattice_at_volume_of_diamond(cubic):
    """Primitive or cubic cell: the cubic a0 from the volume per atom, a0 = (8 V0)^(1/3) for diamond."""
    from ase.build import bulk

    from aiida_mlip.analysis.eos import conventional_lattice_at_volume

    atoms = bulk('Si', 'diamond', a=5.40, cubic=cubic)
    lattice = conventional_lattice_at_volume(atoms.cell, atoms.get_scaled_positions(), atoms.numbers, 20.64)
    assert lattice['a'] == pytest.approx((8 * 20.64) ** (1 / 3), rel=1e-9)  # 5.4866 Å
    assert lattice['a'] == pytest.approx(lattice['b'], rel=1e-9) == pytest.approx(lattice['c'], rel=1e-9)


def test_conventional_lattice_at_volume_keeps_the_shape():
    from ase.build import bulk

    from aiida_mlip.analysis.eos import conventional_lattice_at_volume

    atoms = bulk('Mg', 'hcp', a=3.2, c=5.2)
    v0 = atoms.get_volume() / len(atoms) * 1.1 ** 3  # every length 10 % longer
    lattice = conventional_lattice_at_volume(atoms.cell, atoms.get_scaled_positions(), atoms.numbers, v0)
    assert lattice['a'] == pytest.approx(3.52, rel=1e-6) and lattice['c'] == pytest.approx(5.72, rel=1e-6)


def test_sampled_volumes_on_the_eos_scan_are_in_sample():
    from aiida_mlip.analysis.eos import in_sample_volume_strains, scan_volume_strains

    assert scan_volume_strains(0.06, 7) == pytest.approx([-0.06, -0.04, -0.02, 0.0, 0.02, 0.04, 0.06])
    # the README campaign's volumes: three of them are points of the default +-6 %, 7-point scan
    assert in_sample_volume_strains([-0.08, -0.04, 0.0, 0.04, 0.08], 0.06, 7) == [-0.04, 0.0, 0.04]
    assert in_sample_volume_strains([-0.09, -0.05, -0.03, -0.01, 0.01, 0.03, 0.05, 0.09], 0.06, 7) == []
