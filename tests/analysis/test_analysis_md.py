"""Tests for MD analysis helpers: drift, temperatures, distances, RDF and verdict."""

import numpy as np
import pytest

from aiida_mlip.analysis.md import (
    DEFAULT_MD_THRESHOLDS,
    energy_drift_mev_per_atom_per_ps,
    md_verdict,
    minimum_distance,
    radial_distribution,
    temperature_statistics,
)


def test_drift_of_linear_series_recovered():
    n_atoms = 64
    times = np.arange(0.0, 2000.0, 2.0)  # fs
    # 0.5 meV/atom/ps * 64 atoms = 32 meV/ps = 3.2e-5 eV/fs
    energies = -250.0 + 3.2e-5 * times
    assert energy_drift_mev_per_atom_per_ps(times, energies, n_atoms) == pytest.approx(0.5, rel=1e-8)
    assert energy_drift_mev_per_atom_per_ps(times, -250.0 - 3.2e-5 * times, n_atoms) == pytest.approx(-0.5, rel=1e-8)


def test_drift_robust_to_bounded_oscillation():
    times = np.arange(0.0, 10000.0, 1.0)
    energies = 1e-3 * np.sin(2 * np.pi * times / 50.0) + 1e-5 * times  # 10 meV/ps, 10 atoms
    assert energy_drift_mev_per_atom_per_ps(times, energies, 10) == pytest.approx(1.0, rel=1e-3)


@pytest.mark.parametrize(
    'times, energies, n_atoms, match',
    [
        ([0, 1], [0, 1], 1, 'at least 3'),
        ([0, 1, 2], [0, 1], 1, 'energies'),
        ([0, 2, 1], [0, 1, 2], 1, 'increasing'),
        ([0, 1, 2], [0, np.nan, 2], 1, 'non-finite'),
        ([0, 1, 2], [0, 1, 2], 0, 'n_atoms'),
    ],
)
def test_drift_bad_input(times, energies, n_atoms, match):
    with pytest.raises(ValueError, match=match):
        energy_drift_mev_per_atom_per_ps(times, energies, n_atoms)


def test_temperature_statistics():
    stats = temperature_statistics([300.0, 310.0, 290.0])
    assert stats['mean'] == pytest.approx(300.0)
    assert stats['std'] == pytest.approx(np.sqrt(200.0 / 3))
    assert (stats['min'], stats['max'], stats['count']) == (290.0, 310.0, 3)
    with pytest.raises(ValueError, match='non-negative'):
        temperature_statistics([-1.0, 300.0])
    with pytest.raises(ValueError, match='empty'):
        temperature_statistics([])


def test_minimum_distance_minimum_image():
    cell = np.eye(3) * 5.0
    positions = [[0.1, 0.0, 0.0], [4.9, 0.0, 0.0], [2.5, 2.5, 2.5]]
    assert minimum_distance(positions, cell, True) == pytest.approx(0.2)
    assert minimum_distance(positions, cell, False) == pytest.approx(np.sqrt(2.4**2 + 2 * 2.5**2))
    # periodic only along y and z: the x-wrap pair is 4.8 apart
    assert minimum_distance(positions[:2], cell, [False, True, True]) == pytest.approx(4.8)


def test_minimum_distance_self_image_in_skewed_cell():
    cell = np.array([[2.0, 0.0, 0.0], [3.0, 0.5, 0.0], [0.0, 0.0, 3.0]])
    # row lengths are 2, 3.04 and 3, but the shortest lattice vector is 2b - 3a = (0, 1, 0)
    assert minimum_distance([[0.3, 0.2, 0.1]], cell, True) == pytest.approx(1.0)
    assert minimum_distance([[0.3, 0.2, 0.1], [0.3, 0.2, 1.05]], cell, True) == pytest.approx(0.95)
    with pytest.raises(ValueError, match='single atom'):
        minimum_distance([[0.0, 0.0, 0.0]], cell, False)
    with pytest.raises(ValueError, match='shape'):
        minimum_distance([0.0, 0.0, 0.0], cell, True)


def simple_cubic_positions(a, n):
    grid = np.arange(n) * a
    return np.array(np.meshgrid(grid, grid, grid, indexing='ij')).reshape(3, -1).T


def test_rdf_coordination_of_simple_cubic_lattice():
    a, n = 2.05, 4
    positions = simple_cubic_positions(a, n)
    cell = np.eye(3) * a * n
    rdf = radial_distribution([positions, positions], cell, r_max=4.1, n_bins=41)
    r = np.array(rdf['r'])
    g = np.array(rdf['g'])
    edges = np.array(rdf['edges'])
    assert r[np.flatnonzero(g)[0]] == pytest.approx(2.05, abs=0.05)  # first peak at NN distance a
    n_atoms, volume = len(positions), np.linalg.det(cell)
    shells = 4 / 3 * np.pi * (edges[1:] ** 3 - edges[:-1] ** 3)
    coordination = np.cumsum(g * shells) * (n_atoms - 1) / volume
    assert coordination[np.searchsorted(r, 2.5)] == pytest.approx(6.0)  # 6 nearest neighbours
    assert coordination[np.searchsorted(r, 3.0)] == pytest.approx(18.0)  # + 12 at a sqrt(2)
    assert np.all(g[r < 1.9] == 0)


def test_rdf_ideal_gas_tends_to_one():
    rng = np.random.default_rng(7)
    cell = np.eye(3) * 10.0
    frames = [rng.uniform(0, 10.0, (200, 3)) for _ in range(10)]
    rdf = radial_distribution(frames, cell, r_max=5.0, n_bins=10)
    g = np.array(rdf['g'])
    assert np.mean(g[4:]) == pytest.approx(1.0, abs=0.03)


def test_rdf_bad_input():
    positions = simple_cubic_positions(2.0, 3)
    with pytest.raises(ValueError, match='half the smallest cell width'):
        radial_distribution([positions], np.eye(3) * 6.0, r_max=3.5, n_bins=10)
    with pytest.raises(ValueError, match='n_bins'):
        radial_distribution([positions], np.eye(3) * 6.0, r_max=2.0, n_bins=0)
    with pytest.raises(ValueError, match='empty'):
        radial_distribution([], np.eye(3) * 6.0, r_max=2.0, n_bins=5)


def test_md_verdict_stable():
    verdict = md_verdict(2.1, 0.3, [290.0, 310.0, 305.0], 300.0)
    assert verdict['stable'] is True
    assert verdict['reasons'] == []
    assert verdict['thresholds'] == DEFAULT_MD_THRESHOLDS
    assert verdict['checks']['temperature']['mean'] == pytest.approx(905.0 / 3)


def test_md_verdict_flags_each_failure():
    collapsed = md_verdict(0.6, 0.3, [300.0], 300.0)
    assert collapsed['stable'] is False
    assert len(collapsed['reasons']) == 1 and 'collapsed' in collapsed['reasons'][0]

    drifting = md_verdict(2.0, -1.5, None, None)
    assert drifting['stable'] is False and 'drift' in drifting['reasons'][0]

    hot = md_verdict(2.0, None, [600.0, 1000.0], 500.0)  # mean 800 K: 60 % off
    assert hot['stable'] is False and 'temperature' in hot['reasons'][0]
    assert md_verdict(2.0, None, [600.0, 800.0], 500.0)['stable'] is True  # 40 % off: allowed

    blown_up = md_verdict(2.0, None, [300.0, np.nan], 300.0)
    assert blown_up['stable'] is False

    everything = md_verdict(0.2, 5.0, [3000.0], 300.0)
    assert len(everything['reasons']) == 3


def test_md_verdict_thresholds():
    assert md_verdict(0.8, None, None, None, {'min_distance_angstrom': 0.7})['stable'] is True
    assert md_verdict(2.0, 0.5, None, None, {'drift_mev_per_atom_per_ps': 0.1})['stable'] is False
    with pytest.raises(ValueError, match='unknown threshold'):
        md_verdict(2.0, None, None, None, {'min_dist': 1.0})
    with pytest.raises(ValueError, match='positive'):
        md_verdict(2.0, None, [300.0], -5.0)


def test_repetitions_for_reach_the_least_count_and_no_more():
    from aiida_mlip.analysis.md import repetitions_for

    assert [repetitions_for(n, 50) for n in (1, 2, 8, 54, 100)] == [4, 3, 2, 1, 1]
    assert repetitions_for(1, 1) == 1 and repetitions_for(1, 2) == 2 and repetitions_for(2, 16) == 2
