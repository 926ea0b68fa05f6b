"""Refinement policy (aiida_mlip.analysis.refinement) and the targeted cells it makes
(aiida_mlip.calculations.refinement cell makers): each failed check gives its own kind of cell, and no targeted
cell is one of the validation's own cells."""
from fractions import Fraction

import numpy as np
import pytest
from ase.build import bulk

from aiida_mlip.analysis import refinement as policy
from aiida_mlip.analysis.elastic import voigt_strain_matrices
from aiida_mlip.calculations.refinement import elastic_cells, eos_cells, phonon_cells
from aiida_mlip.calculations.sampling import strained_copies, volume_scaled_copies

VALIDATION_VOLUMES = list(np.linspace(-0.06, 0.06, 5))
VALIDATION_MAGNITUDES = [-0.01, 0.01]


@pytest.fixture
def si2():
    return bulk('Si', 'diamond', a=5.47)


def validation_cells(atoms):
    """The cells the validation evaluates: the EOS scan and the single-component strains (with the reference)."""
    strains = [np.zeros((3, 3))] + [eps for _, _, eps in voigt_strain_matrices(VALIDATION_MAGNITUDES)]
    return volume_scaled_copies(atoms, VALIDATION_VOLUMES) + strained_copies(atoms, strains)


def same_cell(first, second, tolerance=1e-6) -> bool:
    return np.allclose(first.cell.array, second.cell.array, atol=tolerance) and np.allclose(
        first.positions, second.positions, atol=tolerance)


def test_failed_sections_in_priority_order_only_failed_checks():
    verdict = {'checks': {'phonons.mae_thz': False, 'eos.v0_error_percent': True, 'eos.b0_error_percent': False,
                          'md_stability.unstable': False, 'elastic.c44_error_percent': True}}
    assert policy.failed_sections(verdict) == ['eos', 'phonons', 'md_stability']
    assert policy.failed_sections({'checks': {}}) == []
    assert policy.failed_sections({'passed': None}) == []


@pytest.mark.parametrize('budget, expected', [
    (100, {'eos': 4, 'elastic': 6}),
    (7, {'eos': 4, 'elastic': 3}),
    (3, {'eos': 2, 'elastic': 1}),
    (1, {'eos': 1}),
    (0, {}),
])
def test_allocation_is_round_robin_within_the_budget(budget, expected):
    assert policy.allocate_cells(['eos', 'elastic'], {'eos': 4, 'elastic': 6, 'phonons': 2}, budget) == expected


def test_eos_failing_side():
    volumes = [1.0, 2.0, 3.0, 4.0, 5.0]
    reference = [4.0, 1.0, 0.0, 1.0, 4.0]
    # a constant offset between the two levels of theory is no deviation
    assert policy.eos_failing_side(volumes, np.array(reference) + 7.0, reference) == 'both'
    assert policy.eos_failing_side(volumes, [6.0, 1.5, 0.0, 1.0, 4.0], reference) == 'compressed'
    assert policy.eos_failing_side(volumes[::-1], [6.0, 1.5, 0.0, 1.0, 4.0][::-1], reference[::-1]) == 'compressed'
    assert policy.eos_failing_side(volumes, [4.0, 1.0, 0.0, 1.2, 5.0], reference) == 'expanded'


@pytest.mark.parametrize('side', ['compressed', 'expanded', 'both'])
def test_eos_targets_are_off_the_validation_grid_failing_side_first(side):
    targets = policy.eos_target_strains(VALIDATION_VOLUMES, 8, side)
    assert len(targets) == 8 == len(set(targets))
    assert min(abs(t - v) for t in targets for v in VALIDATION_VOLUMES) > 0.01
    if side == 'compressed':
        assert targets[0] < -0.06 and all(t < 0 for t in targets[:3])
    elif side == 'expanded':
        assert targets[0] > 0.06 and all(t > 0 for t in targets[:3])
    else:
        assert targets[0] < -0.06 < 0.06 < targets[1]


def test_random_elastic_strains_are_never_single_component():
    rng = np.random.default_rng(3)
    strains = np.array(policy.random_elastic_strains(VALIDATION_MAGNITUDES, 50, rng))
    norms = np.linalg.norm(strains, axis=1)
    assert np.all((norms >= 0.005 - 1e-12) & (norms <= 0.015 + 1e-12))
    assert np.all(np.max(np.abs(strains), axis=1) / norms <= policy.MAX_DOMINANT_COMPONENT)


def test_deviatoric_strain_keeps_the_volume_to_first_order():
    strain = np.array(policy.deviatoric_strain(0.01, np.random.default_rng(0)))
    assert abs(strain[:3].sum()) < 1e-12
    assert np.linalg.norm(strain) == pytest.approx(0.01)


def test_md_target_temperatures():
    assert policy.md_target_temperatures([300, 600]) == [600.0, 900.0]
    assert policy.md_target_temperatures([300], factors=(1.0, 2.0)) == [300.0, 600.0]


def test_targeted_cells_are_never_validation_cells(si2):
    rng = np.random.default_rng(7)
    cells = eos_cells(si2, {'count': 6, 'validation_strains': VALIDATION_VOLUMES, 'side': 'both',
                            'deviatoric': 0.01}, rng)
    cells += elastic_cells(si2, {'count': 6, 'validation_magnitudes': VALIDATION_MAGNITUDES, 'rattle': 0.0}, rng)
    assert len(cells) == 12
    for cell in cells:
        assert not any(same_cell(cell, other) for other in validation_cells(si2))


def test_eos_cells_alternate_pure_volumes_and_sheared_volumes(si2):
    cells = eos_cells(si2, {'count': 4, 'validation_strains': VALIDATION_VOLUMES, 'deviatoric': 0.01},
                      np.random.default_rng(0))
    expected = policy.eos_target_strains(VALIDATION_VOLUMES, 4)
    volume = si2.get_volume()
    for cell, strain in zip(cells, expected):
        assert cell.get_volume() / volume - 1 == pytest.approx(strain, abs=2e-4)
    cubic = [np.allclose(np.abs(np.linalg.solve(si2.cell.array, c.cell.array)),
                         np.abs(np.linalg.solve(si2.cell.array, c.cell.array))[0, 0] * np.eye(3), atol=1e-9)
             for c in cells]
    assert cubic == [True, False, True, False]


def test_elastic_cells_are_rattled_around_the_strained_positions(si2):
    cells = elastic_cells(si2, {'count': 3, 'validation_magnitudes': VALIDATION_MAGNITUDES, 'rattle': 0.01},
                          np.random.default_rng(0))
    for cell in cells:
        unrattled = cell.copy()
        unrattled.set_scaled_positions(si2.get_scaled_positions())
        shift = np.linalg.norm(cell.positions - unrattled.positions, axis=1)
        assert np.all(shift > 0) and shift.max() < 0.1


def test_phonon_cells_displace_every_atom_of_the_supercell(si2):
    cells = phonon_cells(si2, {'count': 2, 'supercell_matrix': [2, 2, 2], 'rattle': 0.03, 'cell': 'supercell'},
                         np.random.default_rng(0))
    assert len(cells) == 2 and all(len(cell) == 16 for cell in cells)
    from ase.build import make_supercell
    pristine = make_supercell(si2, 2 * np.eye(3, dtype=int))
    for cell in cells:
        shift = np.linalg.norm(cell.positions - pristine.positions, axis=1)
        assert np.count_nonzero(shift > 1e-6) == 16  # phonopy moves ONE atom; these move all
    assert not np.allclose(cells[0].positions, cells[1].positions)


@pytest.mark.parametrize('diagonal', [(2, 2, 2), (3, 3, 3), (4, 4, 4), (2, 2, 4)])
def test_each_commensurate_qpoint_repeats_in_its_small_cell(diagonal):
    for k in np.ndindex(*diagonal):
        qpoint = np.array(k) / np.array(diagonal)
        matrix = policy.qpoint_supercell_matrix(qpoint)
        order = np.lcm.reduce([Fraction(float(x)).limit_denominator(100).denominator for x in qpoint])
        assert round(abs(np.linalg.det(matrix))) == order  # the fewest primitive cells a phonon at q can repeat in
        phases = matrix @ qpoint
        assert np.allclose(phases, np.round(phases))  # q . R integer for every vector of the cell


def test_no_small_cell_where_no_component_is_prime_to_the_order():
    assert policy.qpoint_supercell_matrix([0.5, 1 / 3, 0.0]) is None
    assert np.array_equal(policy.qpoint_supercell_matrix([0.0, 0.0, 1.0]), np.eye(3))


def test_fcc_2x2x2_qpoints_are_the_l_and_x_stars(si2):
    stars = policy.commensurate_qpoint_stars(si2.cell[:], si2.get_scaled_positions(), si2.numbers, [2, 2, 2])
    assert [count for _, count in stars] == [4, 3]  # 4 L points, 3 X points; with Gamma the 8 of the supercell
    reciprocal = si2.cell.reciprocal()  # 1/Å, without 2 pi
    lengths = [np.linalg.norm(np.array(q) @ reciprocal) * si2.cell.cellpar()[0] * np.sqrt(2) for q, _ in stars]
    assert np.allclose(lengths, [np.sqrt(3) / 2, 1.0])  # |L| = sqrt(3)/2 and |X| = 1 in units of 2 pi / a


def test_phonon_cells_rattle_the_qpoint_cells_in_turn_by_default(si2):
    cells = phonon_cells(si2, {'count': 4, 'supercell_matrix': [2, 2, 2], 'rattle': 0.03}, np.random.default_rng(0))
    assert [len(cell) for cell in cells] == [4, 4, 4, 4]  # L, X, L, X cells: 2 primitive cells each
    assert all(np.isclose(cell.get_volume(), 2 * si2.get_volume()) for cell in cells)
    assert not np.allclose(cells[0].cell.array, cells[1].cell.array)
    for cell in cells:
        neighbours = np.sort(cell.get_all_distances(mic=True), axis=1)[:, 1]
        assert np.all(np.abs(neighbours - 2.37) < 0.25)  # rattled diamond bonds, no atom on top of another


def test_phonon_cells_rattle_the_conventional_cell_on_request(si2):
    cells = phonon_cells(si2, {'count': 3, 'supercell_matrix': [2, 2, 2], 'rattle': 0.03, 'cell': 'conventional'},
                         np.random.default_rng(0))
    assert len(cells) == 3 and all(len(cell) == 8 for cell in cells)
    assert np.isclose(cells[0].get_volume(), 4 * si2.get_volume())
    cell = cells[0].cell.cellpar()
    assert np.allclose(cell[3:], 90.0) and np.allclose(cell[:3], cell[0])  # cubic, the conventional cell
    neighbours = np.sort(cells[0].get_all_distances(mic=True), axis=1)[:, 1]
    assert np.all(np.abs(neighbours - 2.37) < 0.25)  # rattled diamond bonds, no atom on top of another


def test_phonon_cells_fall_back_to_the_supercell_without_a_larger_conventional_cell():
    from ase.build import bulk
    cubic = bulk('Po', 'sc', a=3.3)
    cells = phonon_cells(cubic, {'count': 1, 'supercell_matrix': [2, 2, 2], 'rattle': 0.03, 'cell': 'conventional'},
                         np.random.default_rng(0))
    assert len(cells[0]) == 8
