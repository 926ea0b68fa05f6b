"""PhononWorkChain: the DFT engine on Si2 with the real pw.x, the phonopy plumbing on a toy potential, input checks."""
import numpy as np
import pytest
from aiida import engine, orm

from aiida_mlip.analysis.phonons import IMAGINARY_THRESHOLD_THZ
from aiida_mlip.workflows.properties.phonons import (
    PhononWorkChain, SYMPREC, ase_atoms, forces_vanish_by_symmetry, make_phonopy, phonon_analysis, seekpath_band_path,
    supercell_matrix_of,
)

from .conftest import count_calcjobs
from .test_elastic import insulator_dft_inputs
from .test_eos import dft_engine_inputs

#: k-point spacing (1/Å) of the 16-atom supercells in the DFT test: 0.6 (as for Si2) gives a 2x2x2 mesh. The Gamma
#: point alone (spacing >= 1.0) is too crude: it gave imaginary modes all along the path for equilibrium Si.
SUPERCELL_KPOINTS_DISTANCE = 0.6


@pytest.fixture
def si2_equilibrium():
    from ase.build import bulk

    return orm.StructureData(ase=bulk('Si', 'diamond', a=5.45))


def emt_phonons(atoms, repetitions=(3, 3, 3), mesh=(8, 8, 8), perfect=True):
    """phonon_analysis of ``atoms`` with ASE's EMT potential as the engine (no AiiDA, ~1 s); ``perfect=False``: the
    perfect supercell is not evaluated, its forces taken as zero by symmetry."""
    from ase.calculators.emt import EMT

    matrix = supercell_matrix_of(list(repetitions))
    phonon = make_phonopy(atoms, matrix)
    phonon.generate_displacements(distance=0.01)
    setup = {
        'supercell_matrix': matrix.tolist(), 'primitive_matrix': np.asarray(phonon.primitive_matrix).tolist(),
        'symprec': SYMPREC, 'displacement': 0.01,
        'displacement_dataset': {'natom': phonon.dataset['natom'], 'first_atoms': [
            {'number': d['number'], 'displacement': d['displacement'].tolist()}
            for d in phonon.dataset['first_atoms']]},
        'pristine_forces_zero_by_symmetry': not perfect,
    }

    def evaluate(cell):
        frame = ase_atoms(cell)
        frame.calc = EMT()
        frame.arrays['REF_forces'] = frame.get_forces()
        frame.calc = None
        return frame

    displaced = [evaluate(cell) for cell in phonon.supercells_with_displacements]
    return phonon_analysis(atoms, setup, displaced, evaluate(phonon.supercell) if perfect else None, list(mesh))


def test_forces_vanish_by_symmetry_only_where_no_site_has_a_free_direction():
    from ase.build import bulk

    for atoms in (bulk('Si', 'diamond', a=5.45), bulk('Cu', 'fcc', a=3.6), bulk('Fe', 'bcc', a=2.87),
                  bulk('NaCl', 'rocksalt', a=5.64), bulk('Si', 'diamond', a=5.45, cubic=True)):
        assert forces_vanish_by_symmetry(atoms), atoms
    wurtzite = bulk('ZnO', 'wurtzite', a=3.25, c=5.2, u=0.38)  # the free u parameter: a force along c is allowed
    rattled = bulk('Si', 'diamond', a=5.45, cubic=True)
    rattled.rattle(0.01, seed=1)
    assert not forces_vanish_by_symmetry(wurtzite) and not forces_vanish_by_symmetry(rattled)


def test_perfect_supercell_skipped_by_symmetry_changes_nothing():
    """fcc Cu: zero forces by symmetry instead of the evaluated perfect supercell give the same phonons; without
    the setup's word for it, no perfect supercell is an error, not zeros."""
    from ase.build import bulk

    copper = bulk('Cu', 'fcc', a=3.6)
    evaluated, skipped = emt_phonons(copper, mesh=(4, 4, 4)), emt_phonons(copper, mesh=(4, 4, 4), perfect=False)
    np.testing.assert_allclose(skipped['band_frequencies'], evaluated['band_frequencies'], atol=1e-6)
    assert skipped['summary']['pristine_forces_zero_by_symmetry'] and not skipped['summary']['residual_forces_subtracted']
    assert skipped['summary']['n_atoms_supercell'] == evaluated['summary']['n_atoms_supercell'] == 27
    with pytest.raises(ValueError, match='do not vanish by symmetry'):
        phonon_analysis(copper, {'pristine_forces_zero_by_symmetry': False}, [], None, [4, 4, 4])


def test_phonopy_plumbing_on_fcc_copper_with_emt():
    from ase.build import bulk

    result = emt_phonons(bulk('Cu', 'fcc', a=3.6))
    summary = result['summary']
    assert not summary['has_imaginary'] and summary['imaginary_threshold_thz'] == IMAGINARY_THRESHOLD_THZ
    assert summary['gamma_acoustic_max_abs_thz'] < 1e-3
    assert 6.0 < summary['max_frequency_thz'] < 10.0  # EMT Cu ~8 THz (experiment 7.3)
    assert [label for _, label in result['labels']][:2] == ['GAMMA', 'X']
    assert result['qpoints'].shape[0] == result['band_frequencies'].shape[0]
    thermal = result['thermal']
    np.testing.assert_allclose(thermal['temperatures'], np.arange(0, 1001, 50))
    assert thermal['heat_capacity'][-1] == pytest.approx(3 * 8.314462618, rel=0.02)  # Dulong-Petit, J/K/mol


def test_band_path_does_not_depend_on_orientation_or_basis():
    """seekpath's points are mapped into the input cell's reciprocal basis: a rotated cell or another choice of
    primitive vectors gives the same frequencies along the path."""
    from ase.build import bulk
    from scipy.spatial.transform import Rotation

    copper = bulk('Cu', 'fcc', a=3.6)
    rotated = copper.copy()
    rotated.set_cell(np.asarray(copper.cell) @ Rotation.from_euler('xyz', [20, 35, -50], degrees=True).as_matrix().T,
                     scale_atoms=True)
    other_basis = copper.copy()
    cell = np.asarray(copper.cell)
    other_basis.set_cell([cell[0], cell[1], cell[0] + cell[2]], scale_atoms=False)
    reference = emt_phonons(copper, mesh=(4, 4, 4))['band_frequencies']
    for atoms, repetitions in ((rotated, (3, 3, 3)), (other_basis, (3, 3, 3))):
        frequencies = emt_phonons(atoms, repetitions, mesh=(4, 4, 4))['band_frequencies']
        assert frequencies.shape == reference.shape
        # a 3x3x3 supercell of another basis is another supercell: compare at the special points only
        tolerance = 1e-6 if atoms is rotated else 0.3
        np.testing.assert_allclose(np.sort(frequencies, axis=1), np.sort(reference, axis=1), atol=tolerance)
    path = seekpath_band_path(other_basis.cell, other_basis.get_scaled_positions(), other_basis.numbers)
    x_point = path['segments'][0][-1]  # GAMMA-X ends at X: |q| = 2 pi / a
    assert np.linalg.norm(x_point @ (2 * np.pi * np.linalg.inv(np.asarray(other_basis.cell)).T)) == pytest.approx(
        2 * np.pi / 3.6)


@pytest.mark.pw
def test_dft_phonons_of_silicon(pw_code, pseudo_family, si2_equilibrium):
    builder = PhononWorkChain.get_builder()
    builder.structure = si2_equilibrium
    builder.dft = insulator_dft_inputs(pw_code, si2_equilibrium, SUPERCELL_KPOINTS_DISTANCE)
    results, node = engine.run_get_node(builder)
    assert node.is_finished_ok, node.exit_message
    summary = results['phonon_summary'].get_dict()
    print('phonons', {k: v for k, v in summary.items() if 'qpoints' not in k})
    assert summary['n_displacements'] == 1 and summary['n_atoms_supercell'] == 16
    # diamond: every site is -43m, the perfect supercell's forces are zero by symmetry: one pw.x, not two
    assert summary['pristine_forces_zero_by_symmetry'] and results['frames'].n_frames == 1
    assert sum(1 for d in node.called_descendants if d.process_type == 'aiida.calculations:quantumespresso.pw') == 1
    # equilibrium Si is dynamically stable: nothing below the threshold anywhere on the path or the mesh
    assert not summary['has_imaginary'], summary
    assert summary['min_frequency_thz'] > IMAGINARY_THRESHOLD_THZ
    # acoustic modes at Gamma ~ 0, even before the acoustic sum rule is imposed
    gamma = np.sort(summary['gamma_frequencies_thz'])
    assert np.all(np.abs(gamma[:3]) < 0.3)
    assert summary['gamma_acoustic_max_abs_unsymmetrised_thz'] < 0.3
    # optical modes: PBE Si ~15.0-15.5 THz at Gamma; 20 Ry, coarse k and a 2x2x2 supercell shift it
    assert np.all(gamma[3:] > 12.0)
    assert 12.0 < summary['max_frequency_thz'] < 17.0
    bands = results['band_structure']
    labels = [label for _, label in bands.labels]
    assert labels[0] == 'GAMMA' and {'X', 'L', 'K'} <= set(labels)
    assert bands.get_bands().shape == (len(bands.get_kpoints()), 6)
    assert bands.units == 'THz'
    dos = results['dos']
    frequencies, density = dos.get_x()[1], dos.get_y()[0][1]
    assert len(frequencies) == len(density) and density.min() >= -1e-8
    # 6 modes per primitive cell: the DOS integrates to 6
    assert np.trapezoid(density, frequencies) == pytest.approx(6.0, rel=0.05)
    thermal = results['thermal_properties']
    assert len(thermal.get_array('temperatures')) == 21
    assert thermal.get_array('heat_capacity')[-1] == pytest.approx(2 * 3 * 8.314462618, rel=0.05)
    assert results['force_constants'].get_array('force_constants').shape == (16, 16, 3, 3)
    assert 'displacement_dataset' in results['phonopy_setup'].get_dict()


@pytest.mark.parametrize('change, message', [
    ({'supercell_matrix': [0, 2, 2]}, 'determinant 0'),
    ({'supercell_matrix': [2, 2]}, '3 integers or a 3x3 integer matrix'),
    ({'supercell_matrix': [2.5, 2, 2]}, '3 integers or a 3x3 integer matrix'),
    ({'displacement': 0.0}, r'displacement must lie in \(0, 0.1\]'),
    ({'displacement': -0.01}, r'displacement must lie in \(0, 0.1\]'),
    ({'mesh': [12, 0, 12]}, 'mesh must be 3 positive integers'),
])
def test_bad_phonon_inputs_are_refused_before_compute(pw_code, pseudo_family, si2_equilibrium, change, message):
    builder = PhononWorkChain.get_builder()
    builder.structure = si2_equilibrium
    builder.dft = dft_engine_inputs(pw_code, si2_equilibrium)
    for key, value in change.items():
        builder[key] = orm.Float(value) if isinstance(value, float) else orm.List(value)
    before = count_calcjobs()
    with pytest.raises(ValueError, match=message):
        engine.run(builder)
    assert count_calcjobs() == before


def test_an_engine_is_required(si2_equilibrium):
    builder = PhononWorkChain.get_builder()
    builder.structure = si2_equilibrium
    with pytest.raises(ValueError, match='exactly one engine'):
        engine.run(builder)
