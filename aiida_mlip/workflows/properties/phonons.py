"""``mlip.phonons``: harmonic phonons by finite displacements (phonopy), with the DFT or the MLIP engine.

1. ``phonopy_displacements`` (calcfunction): phonopy builds the supercell of the input cell and the
   symmetry-reduced set of displaced supercells; outputs them as StructureData plus a Dict with the phonopy setup
   (supercell and primitive matrices, symprec, the displacement dataset), so the phonon calculation can be
   reproduced from the graph alone.
2. One engine submission evaluates the displaced supercells AND the perfect supercell -- unless the site symmetry
   of every atom forbids a force (diamond, fcc, bcc, rock salt: no vector is left unchanged by all the rotations
   of the site), where the perfect supercell's forces are zero by symmetry and its evaluation (with pw.x, a job as
   long as a displaced one) is skipped.
3. ``phonopy_postprocess`` (calcfunction): force constants from the forces of the displaced supercells minus the
   residual forces of the perfect one (removes the error of an imperfectly relaxed cell or of a noisy engine to
   first order; zero where symmetry makes them zero), symmetrised (phonopy ``symmetrize_force_constants``: index-permutation symmetry and the
   acoustic sum rule); band structure on the seekpath (HPKOT) path, DOS and thermal properties on a q-mesh,
   imaginary-mode detection (``analysis.phonons.find_imaginary_modes``).

Only the evaluated ``frames`` (positions, ``REF_forces``) are used: nothing here depends on the engine.
"""
from __future__ import annotations

import numpy as np
from aiida import orm
from aiida.engine import ToContext, WorkChain, calcfunction, if_

from aiida_mlip.analysis.phonons import IMAGINARY_THRESHOLD_THZ, find_imaginary_modes
from aiida_mlip.workflows.checks import structure_problem
from aiida_mlip.workflows.properties.engine import EngineMixin, validate_engine, validate_relax

#: Symmetry tolerance (Å) of phonopy (displacements, primitive cell) and of seekpath/spglib (band path).
SYMPREC = 1e-5
#: Displacements accepted by the validator (Å); docs/sources.md: 0.01-0.03 Å is the usual range.
MAX_DISPLACEMENT = 0.1
#: q-points on the longest segment of the band path; shorter segments get proportionally fewer (>= 2).
BAND_POINTS_LONGEST_SEGMENT = 51
#: Temperatures (K) of the thermal properties: 0, 50, ..., 1000.
T_MIN, T_MAX, T_STEP = 0.0, 1000.0, 50.0
#: Residual force (eV/Å) of the perfect supercell above which the cell is reported as not relaxed
#: (docs/sources.md: relax to fmax <= 0.001-0.005 eV/Å before phonons).
RELAXED_FORCE_LIMIT = 0.005

PRISTINE_KEY = 'pristine'


def displacement_key(index: int) -> str:
    return f'displacement_{index:04d}'


# ---- pure helpers (phonopy/seekpath/spglib, no AiiDA) ----------------------------------------------------------
def supercell_matrix_of(value) -> np.ndarray:
    """3x3 integer matrix from 3 repetitions (diagonal) or a 3x3 matrix; ValueError if not a proper supercell."""
    try:
        matrix = np.asarray(value, dtype=float)
    except (TypeError, ValueError):
        raise ValueError(f'supercell_matrix must be 3 integers or a 3x3 integer matrix, got {value}') from None
    if matrix.shape == (3,):
        matrix = np.diag(matrix)
    if matrix.shape != (3, 3) or not np.all(np.isfinite(matrix)) or not np.allclose(matrix, np.round(matrix)):
        raise ValueError(f'supercell_matrix must be 3 integers or a 3x3 integer matrix, got {value}')
    matrix = np.round(matrix).astype(int)
    determinant = round(np.linalg.det(matrix))
    if determinant < 1:
        raise ValueError(
            f'supercell_matrix {matrix.tolist()} has determinant {determinant}: it must be >= 1 '
            '(positive repetitions, e.g. [2, 2, 2]; docs/sources.md: 2^3-4^3 supercells)'
        )
    return matrix


def phonopy_atoms(atoms):
    """PhonopyAtoms of an ASE Atoms, keeping its masses (those of the StructureData kinds)."""
    from phonopy.structure.atoms import PhonopyAtoms

    return PhonopyAtoms(symbols=atoms.get_chemical_symbols(), cell=np.asarray(atoms.cell),
                        scaled_positions=atoms.get_scaled_positions(wrap=False), masses=atoms.get_masses())


def ase_atoms(cell):
    """ASE Atoms of a PhonopyAtoms (periodic)."""
    from ase import Atoms

    return Atoms(symbols=cell.symbols, cell=cell.cell, scaled_positions=cell.scaled_positions, masses=cell.masses,
                 pbc=True)


def make_phonopy(atoms, supercell_matrix, primitive_matrix='auto', symprec: float = SYMPREC):
    from phonopy import Phonopy

    return Phonopy(phonopy_atoms(atoms), supercell_matrix=supercell_matrix, primitive_matrix=primitive_matrix,
                   symprec=symprec, log_level=0)


def forces_vanish_by_symmetry(atoms, symprec: float = SYMPREC) -> bool:
    """True when no atom of ``atoms`` can feel a force: the rotations of each atom's site-symmetry group average to
    zero, so the only vector they all leave unchanged is zero (diamond, fcc, bcc, rock salt)."""
    from phonopy.structure.symmetry import Symmetry

    symmetry = Symmetry(phonopy_atoms(atoms), symprec=symprec)
    return all(np.allclose(np.mean(symmetry.get_site_symmetry(index), axis=0), 0.0) for index in range(len(atoms)))


def seekpath_band_path(cell, scaled_positions, numbers, symprec: float = SYMPREC,
                       points_longest: int = BAND_POINTS_LONGEST_SEGMENT) -> dict:
    """The seekpath (HPKOT) band path in reduced coordinates of the reciprocal lattice of ``cell``.

    seekpath gives its special points in the basis of ITS standardised primitive cell, which may be a different
    basis and a rotated frame relative to ``cell`` (phonopy's ``get_band_qpoints_by_seekpath`` uses those
    coordinates as they are, which is only right for cells already in seekpath's setting). Here each point is
    taken to Cartesian coordinates in seekpath's frame, rotated back with spglib's ``std_rotation_matrix`` and
    expressed in the reciprocal basis of ``cell``, so any orientation and choice of primitive vectors works.

    :returns: dict with ``segments`` (list of (n_i, 3) arrays of q-points, end points included), ``labels``
        (list of (start, end) label pairs, seekpath names such as ``GAMMA``, ``X``), ``connections`` (segment i
        continues into i+1), ``bravais_lattice``, ``space_group``.
    """
    import seekpath
    import spglib

    cell = np.asarray(cell, dtype=float)
    structure = (cell, np.asarray(scaled_positions, dtype=float), np.asarray(numbers, dtype=int))
    path = seekpath.get_path(structure, with_time_reversal=True, symprec=symprec)
    dataset = spglib.get_symmetry_dataset(structure, symprec=symprec)
    rotation = np.asarray(dataset.std_rotation_matrix, dtype=float)
    reciprocal_seekpath = np.asarray(path['reciprocal_primitive_lattice'], dtype=float)  # rows, with 2 pi
    # reduced q (input basis) = a_i . q / (2 pi), with q Cartesian in the input frame = R^T q_seekpath
    to_input = reciprocal_seekpath @ rotation @ cell.T / (2 * np.pi)
    points = {label: np.asarray(coords, dtype=float) @ to_input for label, coords in path['point_coords'].items()}

    reciprocal_input = 2 * np.pi * np.linalg.inv(cell).T
    lengths = [np.linalg.norm((points[end] - points[start]) @ reciprocal_input) for start, end in path['path']]
    longest = max(lengths)
    segments, labels = [], []
    for (start, end), length in zip(path['path'], lengths):
        count = max(2, int(round(points_longest * length / longest)) if longest > 0 else 2)
        segments.append(np.array([points[start] + (points[end] - points[start]) * i / (count - 1)
                                  for i in range(count)]))
        labels.append((start, end))
    connections = [labels[i][1] == labels[i + 1][0] for i in range(len(labels) - 1)] + [False]
    return {'segments': segments, 'labels': labels, 'connections': connections,
            'bravais_lattice': path['bravais_lattice_extended'], 'space_group': int(path['spacegroup_number'])}


def join_band_segments(segments, labels, connections, frequencies) -> tuple:
    """One list of q-points/frequencies; the shared end point of connected segments appears once.

    :returns: (qpoints (n, 3), frequencies (n, n_bands), [(index, label), ...]) in the BandsData convention: a
        discontinuity is two consecutive labelled points (e.g. ``U`` then ``K``).
    """
    qpoints, bands, point_labels = [], [], []
    continues = False
    for segment, (start, end), connected, freqs in zip(segments, labels, connections, frequencies):
        segment, freqs = np.asarray(segment), np.asarray(freqs)
        if continues:
            segment, freqs = segment[1:], freqs[1:]
        else:
            point_labels.append((len(qpoints), start))
        qpoints.extend(segment)
        bands.extend(freqs)
        point_labels.append((len(qpoints) - 1, end))
        continues = connected
    return np.array(qpoints), np.array(bands), point_labels


def phonon_analysis(unitcell, setup: dict, displaced_atoms: list, pristine_atoms, mesh) -> dict:
    """Force constants, bands, DOS, thermal properties and imaginary modes from evaluated supercells.

    :param unitcell: ASE Atoms of the input cell.
    :param setup: the phonopy setup written by ``phonopy_displacements``.
    :param displaced_atoms: evaluated displaced supercells (``arrays['REF_forces']``), in displacement order.
    :param pristine_atoms: the evaluated perfect supercell, whose residual forces are subtracted; None where the
        setup says they vanish by symmetry (``pristine_forces_zero_by_symmetry``).
    :param mesh: q-mesh (3 integers) of DOS and thermal properties.
    """
    by_symmetry = pristine_atoms is None
    if by_symmetry and not setup.get('pristine_forces_zero_by_symmetry'):
        raise ValueError('no evaluated perfect supercell, and its forces do not vanish by symmetry')
    phonon = make_phonopy(unitcell, setup['supercell_matrix'], setup['primitive_matrix'], setup['symprec'])
    dataset = setup['displacement_dataset']
    phonon.dataset = {
        'natom': dataset['natom'],
        'first_atoms': [{'number': int(d['number']), 'displacement': np.array(d['displacement'])}
                        for d in dataset['first_atoms']],
    }
    expected = phonon.supercells_with_displacements
    if len(displaced_atoms) != len(expected):
        raise ValueError(f'{len(displaced_atoms)} evaluated displaced cells for {len(expected)} displacements')
    forces = []
    reference_forces = np.zeros((dataset['natom'], 3)) if by_symmetry else _forces_of(pristine_atoms, 'perfect supercell')
    for index, (atoms, cell) in enumerate(zip(displaced_atoms, expected)):
        _check_same_cell(atoms, cell, index)
        forces.append(_forces_of(atoms, f'displaced cell {index}') - reference_forces)
    phonon.forces = np.array(forces)
    phonon.produce_force_constants(show_drift=False)
    phonon.run_qpoints([[0.0, 0.0, 0.0]])
    gamma_raw = np.array(phonon.qpoints.frequencies[0])
    phonon.symmetrize_force_constants(show_drift=False)
    phonon.run_qpoints([[0.0, 0.0, 0.0]])
    gamma = np.array(phonon.qpoints.frequencies[0])

    primitive = phonon.primitive
    path = seekpath_band_path(primitive.cell, primitive.scaled_positions, primitive.numbers, setup['symprec'])
    phonon.run_band_structure(path['segments'], path_connections=path['connections'])
    qpoints, band_frequencies, labels = join_band_segments(
        path['segments'], path['labels'], path['connections'], phonon.band_structure.frequencies)

    phonon.run_mesh(list(mesh), is_gamma_center=True)
    mesh_frequencies, mesh_qpoints = np.asarray(phonon.mesh.frequencies), np.asarray(phonon.mesh.qpoints)
    phonon.run_total_dos()
    dos = phonon.total_dos
    # the three zero-frequency acoustic modes at Gamma carry no heat but make log(frequency) terms noisy
    phonon.run_thermal_properties(t_min=T_MIN, t_max=T_MAX, t_step=T_STEP, exclude_gamma_acoustic=True)
    thermal = phonon.thermal_properties

    imaginary_band = find_imaginary_modes(band_frequencies, qpoints)
    imaginary_mesh = find_imaginary_modes(mesh_frequencies, mesh_qpoints)
    n_acoustic = 3
    pristine_force = float(np.max(np.linalg.norm(reference_forces, axis=1)))
    summary = {
        'has_imaginary': imaginary_band['has_imaginary'] or imaginary_mesh['has_imaginary'],
        'imaginary_count': imaginary_band['count'] + imaginary_mesh['count'],
        'imaginary_threshold_thz': IMAGINARY_THRESHOLD_THZ,
        'imaginary_qpoints_band': imaginary_band.get('qpoints', []),
        'imaginary_qpoints_mesh': imaginary_mesh.get('qpoints', []),
        'min_frequency_thz': min(imaginary_band['min_frequency'], imaginary_mesh['min_frequency']),
        'max_frequency_thz': float(max(np.max(band_frequencies), np.max(mesh_frequencies))),
        'gamma_frequencies_thz': gamma.tolist(),
        'gamma_acoustic_max_abs_thz': float(np.max(np.abs(np.sort(gamma)[:n_acoustic]))),
        'gamma_acoustic_max_abs_unsymmetrised_thz': float(np.max(np.abs(np.sort(gamma_raw)[:n_acoustic]))),
        'pristine_max_force_ev_per_angstrom': pristine_force,
        'pristine_forces_zero_by_symmetry': by_symmetry,
        'pristine_relaxed': pristine_force <= RELAXED_FORCE_LIMIT,
        'pristine_force_limit_ev_per_angstrom': RELAXED_FORCE_LIMIT,
        'n_displacements': len(displaced_atoms),
        'n_atoms_supercell': int(dataset['natom']),
        'n_atoms_primitive': len(primitive),
        'supercell_matrix': np.asarray(setup['supercell_matrix']).tolist(),
        'displacement_angstrom': setup['displacement'],
        'mesh': [int(m) for m in mesh],
        'band_path': [f'{start}-{end}' for start, end in path['labels']],
        'bravais_lattice': path['bravais_lattice'],
        'space_group_number': path['space_group'],
        'force_constants_symmetrised': True,
        'residual_forces_subtracted': not by_symmetry,
        'units': 'frequencies THz (imaginary as negative); forces eV/Å',
    }
    return {
        'phonon': phonon,
        'primitive': ase_atoms(primitive),
        'qpoints': qpoints,
        'band_frequencies': band_frequencies,
        'labels': labels,
        'dos_frequencies': np.asarray(dos.frequency_points),
        'dos': np.asarray(dos.dos),
        'thermal': {name: np.asarray(getattr(thermal, name))
                    for name in ('temperatures', 'free_energy', 'entropy', 'heat_capacity')},
        'summary': summary,
    }


def _forces_of(atoms, what: str) -> np.ndarray:
    forces = atoms.arrays.get('REF_forces')
    if forces is None or not np.all(np.isfinite(forces)):
        raise ValueError(f'the {what} has no finite forces')
    return np.asarray(forces, dtype=float)


def _check_same_cell(atoms, expected, index: int, tolerance: float = 1e-4):
    """The evaluated frame must be phonopy's displaced supercell (atom order and positions)."""
    if list(atoms.get_chemical_symbols()) != list(expected.symbols):
        raise ValueError(f'displaced cell {index}: atoms differ from phonopy supercell (order or species)')
    delta = atoms.get_scaled_positions(wrap=False) - expected.scaled_positions
    delta -= np.round(delta)
    largest = float(np.max(np.linalg.norm(delta @ np.asarray(expected.cell), axis=1)))
    if largest > tolerance or not np.allclose(np.asarray(atoms.cell), expected.cell, atol=tolerance):
        raise ValueError(f'displaced cell {index} differs from phonopy\'s by {largest:.2g} Å')


def _jsonable(value):
    if isinstance(value, dict):
        return {key: _jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


# ---- calcfunctions -------------------------------------------------------------------------------------------
@calcfunction
def phonopy_displacements(structure: orm.StructureData, supercell_matrix: orm.List, displacement: orm.Float):
    """Displaced supercells (``displacement_NNNN``), the perfect one (``pristine``, unless its forces vanish by
    symmetry) and ``phonopy_setup``.

    ``phonopy_setup`` (Dict): ``supercell_matrix``, ``primitive_matrix`` (from phonopy's 'auto'), ``symprec``,
    ``displacement`` (Å), ``displacement_dataset`` (phonopy's ``natom``/``first_atoms``),
    ``pristine_forces_zero_by_symmetry``, ``structure_keys``.
    """
    matrix = supercell_matrix_of(supercell_matrix.get_list())
    phonon = make_phonopy(structure.get_ase(), matrix)
    phonon.generate_displacements(distance=displacement.value, is_plusminus='auto')
    dataset = phonon.dataset
    by_symmetry = forces_vanish_by_symmetry(structure.get_ase())
    outputs = {} if by_symmetry else {PRISTINE_KEY: orm.StructureData(ase=ase_atoms(phonon.supercell))}
    for index, cell in enumerate(phonon.supercells_with_displacements):
        outputs[displacement_key(index)] = orm.StructureData(ase=ase_atoms(cell))
    outputs['phonopy_setup'] = orm.Dict({
        'supercell_matrix': matrix.tolist(),
        'primitive_matrix': np.asarray(phonon.primitive_matrix).tolist(),
        'symprec': SYMPREC,
        'displacement': displacement.value,
        'is_plusminus': 'auto',
        'displacement_dataset': _jsonable({
            'natom': dataset['natom'],
            'first_atoms': [{'number': d['number'], 'displacement': d['displacement']}
                            for d in dataset['first_atoms']],
        }),
        'pristine_forces_zero_by_symmetry': by_symmetry,
        'structure_keys': sorted(key for key in outputs if key != 'phonopy_setup'),
        'phonopy_version': __import__('phonopy').__version__,
    })
    return outputs


@calcfunction
def phonopy_postprocess(structure: orm.StructureData, phonopy_setup: orm.Dict, frames, mesh: orm.List):
    """Force constants, band structure, DOS, thermal properties and summary from the evaluated ``frames``.

    ``frames`` holds the cells of ``phonopy_setup['structure_keys']`` in that (sorted) order.
    """
    setup = phonopy_setup.get_dict()
    atoms_list = frames.to_ase()
    keys = setup['structure_keys']
    if len(atoms_list) != len(keys):
        raise ValueError(f'{len(atoms_list)} evaluated frames for {len(keys)} cells')
    by_key = dict(zip(keys, atoms_list))
    displaced = [by_key[key] for key in keys if key != PRISTINE_KEY]
    result = phonon_analysis(structure.get_ase(), setup, displaced, by_key.get(PRISTINE_KEY), mesh.get_list())

    bands = orm.BandsData()
    bands.set_cell(np.asarray(result['primitive'].cell), pbc=(True, True, True))
    bands.set_kpoints(result['qpoints'], cartesian=False)
    bands.set_bands(result['band_frequencies'], units='THz')
    bands.labels = result['labels']

    dos = orm.XyData()
    dos.set_x(result['dos_frequencies'], 'frequency', 'THz')
    dos.set_y(result['dos'], 'dos', 'states/THz per primitive cell')

    thermal = orm.ArrayData()
    for name, values in result['thermal'].items():
        thermal.set_array(name, values)
    thermal.base.attributes.set('units', {'temperatures': 'K', 'free_energy': 'kJ/mol', 'entropy': 'J/K/mol',
                                          'heat_capacity': 'J/K/mol'})
    thermal.base.attributes.set('per', 'mole of primitive cells (phonopy convention)')

    force_constants = orm.ArrayData()
    force_constants.set_array('force_constants', np.asarray(result['phonon'].force_constants))
    force_constants.base.attributes.set('units', 'eV/Å²')
    force_constants.base.attributes.set('shape', 'supercell atoms x supercell atoms x 3 x 3 (phonopy full)')
    force_constants.base.attributes.set('supercell_matrix', setup['supercell_matrix'])
    force_constants.base.attributes.set('primitive_matrix', setup['primitive_matrix'])

    return {
        'band_structure': bands,
        'dos': dos,
        'thermal_properties': thermal,
        'force_constants': force_constants,
        'phonon_summary': orm.Dict(_jsonable(result['summary'])),
    }


# ---- workchain -----------------------------------------------------------------------------------------------
def validate_inputs(inputs, ctx):
    problem = validate_engine(inputs, ctx)
    if problem:
        return problem
    try:
        supercell_matrix_of(inputs['supercell_matrix'].get_list())
    except ValueError as exception:
        return str(exception)
    displacement = inputs['displacement'].value
    if not 0 < displacement <= MAX_DISPLACEMENT:
        return (f'displacement must lie in (0, {MAX_DISPLACEMENT}] Å (docs/sources.md: 0.01-0.03 Å), '
                f'got {displacement}')
    mesh = inputs['mesh'].get_list()
    if len(mesh) != 3 or not all(isinstance(m, int) and m >= 1 for m in mesh):
        return f'mesh must be 3 positive integers, got {mesh}'
    return structure_problem('structure', inputs['structure']) or validate_relax(inputs, ctx)


class PhononWorkChain(EngineMixin, WorkChain):
    """Harmonic phonons by finite displacements (phonopy): bands, DOS, thermal properties, imaginary modes."""

    @classmethod
    def define(cls, spec):
        super().define(spec)
        spec.input('structure', valid_type=orm.StructureData,
                   help='The (tightly relaxed) unit cell, ideally primitive; phonopy finds the primitive cell.')
        spec.input('supercell_matrix', valid_type=orm.List, default=lambda: orm.List([2, 2, 2]),
                   help='Supercell of the input cell: 3 repetitions (diagonal) or a 3x3 integer matrix, '
                        'determinant >= 1 (docs/sources.md: 2^3-4^3 supercells).')
        spec.input('displacement', valid_type=orm.Float, default=lambda: orm.Float(0.01),
                   help=f'Atomic displacement in Å, in (0, {MAX_DISPLACEMENT}] (docs/sources.md: 0.01-0.03 Å).')
        spec.input('mesh', valid_type=orm.List, default=lambda: orm.List([12, 12, 12]),
                   help='Gamma-centred q-mesh of the DOS and the thermal properties.')
        cls.define_engine(spec)
        cls.define_relax(spec)
        spec.inputs.validator = validate_inputs
        spec.outline(
            if_(cls.should_relax)(cls.run_relax, cls.inspect_relax),
            cls.run_displacements, cls.postprocess, cls.results,
        )
        spec.output('phonopy_setup', valid_type=orm.Dict,
                    help='Supercell/primitive matrices, symprec, displacement dataset: the phonopy input.')
        spec.output('band_structure', valid_type=orm.BandsData,
                    help='Frequencies (THz, imaginary as negative) on the seekpath path, labelled special points.')
        spec.output('dos', valid_type=orm.XyData, help='Total phonon DOS (tetrahedron method) on `mesh`.')
        spec.output('thermal_properties', valid_type=orm.ArrayData,
                    help='temperatures (K), free_energy (kJ/mol), entropy and heat_capacity (J/K/mol).')
        spec.output('force_constants', valid_type=orm.ArrayData, help='Symmetrised force constants (eV/Å²).')
        spec.output('phonon_summary', valid_type=orm.Dict,
                    help='Imaginary modes (threshold, count, min frequency), Gamma and max frequencies, checks.')
        spec.output('frames', valid_type=orm.Data,
                    help='The evaluated supercells as an `mlip.dataset` (displaced cells, then the perfect one if evaluated).')
        spec.exit_code(510, 'ERROR_PHONOPY_FAILED', message='The phonopy post-processing failed: {reason}')

    def run_displacements(self):
        """phonopy's displaced supercells and the perfect supercell (unless symmetry zeroes its forces), evaluated in
        one engine submission."""
        made = dict(phonopy_displacements(self.structure_to_compute, self.inputs.supercell_matrix,
                                          self.inputs.displacement))
        setup = made.pop('phonopy_setup')
        self.out('phonopy_setup', setup)
        self.ctx.structures = made
        perfect = ('(the perfect one has zero forces by symmetry: not evaluated)'
                   if setup['pristine_forces_zero_by_symmetry'] else '+ the perfect one')
        self.report(f'{len(made) - (1 if PRISTINE_KEY in made else 0)} displaced supercells of '
                    f'{setup["displacement_dataset"]["natom"]} atoms {perfect}')
        return ToContext(supercells=self.submit_engine(self.ctx.structures, 'supercells'))

    def postprocess(self):
        frames, failure = self.engine_frames(self.ctx.supercells, self.ctx.structures)
        if failure:
            return failure
        self.out('frames', frames)
        try:
            results = phonopy_postprocess(self.structure_to_compute, self.outputs['phonopy_setup'], frames,
                                          self.inputs.mesh)
        except (ValueError, RuntimeError, KeyError, np.linalg.LinAlgError) as exception:
            return self.exit_codes.ERROR_PHONOPY_FAILED.format(reason=f'{type(exception).__name__}: {exception}')
        for name, node in results.items():
            self.out(name, node)
        return None

    def results(self):
        summary = self.outputs['phonon_summary']
        self.report(
            f'{self.engine}: max frequency {summary["max_frequency_thz"]:.2f} THz, '
            f'min {summary["min_frequency_thz"]:.3f} '
            f'THz; imaginary modes: {summary["imaginary_count"]} (threshold {summary["imaginary_threshold_thz"]} THz)'
        )
        if not summary['pristine_relaxed']:
            self.report(
                f'warning: residual force {summary["pristine_max_force_ev_per_angstrom"]:.4f} eV/Å in the perfect '
                f'supercell: relax the structure (fmax <= {RELAXED_FORCE_LIMIT} eV/Å) before trusting the phonons'
            )
