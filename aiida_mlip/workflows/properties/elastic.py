"""``mlip.elastic``: relaxed-ion (default) and clamped-ion elastic tensors, with the DFT or the MLIP engine.

The unstrained reference cell and 6 Voigt components x ``strain_magnitudes`` homogeneously strained cells
(atoms scaled with the cell) go to the engine in one submission; a linear least-squares fit of the stresses
against the strains (``aiida_mlip.analysis.elastic.fit_elastic_tensor``) gives the CLAMPED-ION C (6x6, GPa).

Relaxed-ion tensor (default; ``clamped_ion`` True switches it off): the cells whose clamped forces exceed
``relax_ions_fmax`` (only those; in diamond the shear strains) are relaxed at fixed cell with the same engine
(DFT: one pw.x ``relax`` PwBaseWorkChain per cell; MLIP: ONE ``mlip.relax`` job, then ONE evaluation of the
relaxed cells for their stresses) and substituted into the fit. Exact: the other cells are already at their
internal minimum to that tolerance. If every atom sits at an inversion centre (fcc, bcc, rocksalt) no strain
creates internal forces and nothing is relaxed (relaxed-ion = clamped-ion). In diamond Si relaxation lowers
C44 (~110 -> ~75 GPa, PBE) and leaves C11, C12 unchanged.

With ``relax`` True the input structure is first relaxed (positions and, with ``relax_cell``, the cell) with the
same engine and the strains are applied to the relaxed structure.
"""
from __future__ import annotations

import numpy as np
from aiida import orm
from aiida.engine import ToContext, WorkChain, calcfunction, if_

from aiida_mlip.analysis.elastic import (
    born_stability, every_atom_at_inversion_centre, fit_elastic_tensor, point_group_rotations, strain_stress_images,
    strain_to_voigt, stress_to_voigt, symmetrize_elastic_tensor, symmetry_reduced_components, voigt_reuss_hill,
    voigt_strain_matrices, voigt_to_strain, voigt_to_stress,
)
from aiida_mlip.calculations.datasets import collect_labeled_frames, frame_link_prefix
from aiida_mlip.calculations.sampling import strain_structure
from aiida_mlip.data.dataset import FORCES_KEY
from aiida_mlip.workflows.checks import structure_problem
from aiida_mlip.workflows.properties.engine import EngineMixin, relax_code_problem, validate_engine, validate_relax

#: eV/Å³ -> GPa
EV_PER_A3_TO_GPA = 160.2176634

#: Largest accepted |strain|: beyond a few % the response is no longer linear (docs/sources.md: 0.5-1% keeps C44
#: linear, 6% shear over-estimates it).
MAX_STRAIN = 0.05

#: More magnitudes add cost (6 cells each), not accuracy: a linear fit needs two.
MAX_MAGNITUDES = 10

#: Symmetry tolerance (Å) of the spglib crystal-system detection and of the orientation of the crystal axes.
SYMPREC = 1e-3

#: Default force tolerance (eV/Å) of the fixed-cell relaxation of the strained cells (docs/elastic.md: C44 of Si
#: moves by < 0.1 GPa between 1e-3 and 3e-4 eV/Å).
RELAX_IONS_FMAX = 1e-3
#: pw.x SCF threshold (Ry per atom) of those relaxations: forces to ~1e-5 Ry/Bohr, well below RELAX_IONS_FMAX.
RELAX_IONS_CONV_THR_PER_ATOM = 1e-10
#: `internal_relaxation` note when no strain can create internal forces.
NO_INTERNAL_RELAXATION = 'not needed (every atom at an inversion centre): relaxed-ion = clamped-ion'

#: The seven crystal systems a user may name.
CRYSTAL_SYSTEMS = ('triclinic', 'monoclinic', 'orthorhombic', 'tetragonal', 'trigonal', 'hexagonal', 'cubic')

VOIGT_LABELS = ('xx', 'yy', 'zz', 'yz', 'xz', 'xy')


# ---- pure helpers (numpy/spglib only) ------------------------------------------------------------------------
def crystal_system_of(space_group: int) -> str:
    """Crystal system of an international space-group number (1-230)."""
    for upper, name in ((2, 'triclinic'), (15, 'monoclinic'), (74, 'orthorhombic'), (142, 'tetragonal'),
                        (167, 'trigonal'), (194, 'hexagonal'), (230, 'cubic')):
        if space_group <= upper:
            return name
    raise ValueError(f'invalid space-group number {space_group}')


def symmetry_projection(crystal_system: str, space_group: int | None = None) -> str:
    """The form of C that ``symmetrize_elastic_tensor`` imposes for this crystal system.

    ``analysis.elastic`` knows cubic, hexagonal, tetragonal (Laue class 4/mmm, space groups 89-142),
    orthorhombic and triclinic. Trigonal (C14, C15 non-zero), monoclinic, and tetragonal 4/m (space groups 75-88,
    C16 non-zero) have no projection there: for them only C = C^T is imposed ('triclinic'), which is exact.
    """
    if crystal_system in ('cubic', 'hexagonal', 'orthorhombic', 'triclinic'):
        return crystal_system
    if crystal_system == 'tetragonal' and (space_group is None or space_group >= 89):
        return 'tetragonal'
    return 'triclinic'


def symmetry_of(atoms, symprec: float = SYMPREC) -> dict:
    """Space group and the rotation from the Cartesian frame of ``atoms`` to spglib's standard frame."""
    import spglib

    cell = (np.asarray(atoms.cell), atoms.get_scaled_positions(), atoms.numbers)
    dataset = spglib.get_symmetry_dataset(cell, symprec=symprec)
    if dataset is None:
        raise ValueError(f'spglib could not determine the symmetry (symprec {symprec} Å)')
    return {
        'number': int(dataset.number),
        'symbol': str(dataset.international),
        'crystal_system': crystal_system_of(int(dataset.number)),
        'rotation': np.asarray(dataset.std_rotation_matrix, dtype=float),
    }


def voigt_rotation_matrices(rotation) -> tuple[np.ndarray, np.ndarray]:
    """(M, N): Voigt stress and engineering-strain vectors in the frame rotated by ``rotation`` (x' = R x).

    ``sigma' = M sigma`` and ``e' = N e``; an elastic tensor transforms as ``C' = M C N^-1``.
    """
    rotation = np.asarray(rotation, dtype=float)
    stress_map, strain_map = np.zeros((6, 6)), np.zeros((6, 6))
    for k in range(6):
        unit = np.zeros(6)
        unit[k] = 1.0
        stress_map[:, k] = stress_to_voigt(rotation @ voigt_to_stress(unit) @ rotation.T)
        strain_map[:, k] = strain_to_voigt(rotation @ voigt_to_strain(unit) @ rotation.T)
    return stress_map, strain_map


def rotate_elastic_tensor(c_matrix, rotation) -> np.ndarray:
    """The 6x6 Voigt tensor (engineering shear strains) in the frame rotated by ``rotation``."""
    stress_map, strain_map = voigt_rotation_matrices(rotation)
    return stress_map @ np.asarray(c_matrix, dtype=float) @ np.linalg.inv(strain_map)


def symmetrize_in_standard_frame(c_matrix, crystal_system: str, rotation) -> np.ndarray:
    """Project C onto its symmetry form in the crystal's standard frame, returned in the input frame.

    ``symmetrize_elastic_tensor`` assumes the standard orientation (cubic axes along x, y, z; hexagonal and
    tetragonal c along z); spglib's ``std_rotation_matrix`` rotates any input orientation there and back.
    """
    rotation = np.asarray(rotation, dtype=float)
    standard = rotate_elastic_tensor(c_matrix, rotation)
    projected = symmetrize_elastic_tensor(standard, crystal_system)
    return rotate_elastic_tensor(projected, rotation.T)


def cell_strain(reference_cell, strained_cell) -> np.ndarray:
    """Symmetric small strain ``eps`` with ``strained = reference @ (I + eps)^T`` (rows are lattice vectors)."""
    deformation = np.linalg.solve(np.asarray(reference_cell, dtype=float), np.asarray(strained_cell, dtype=float)).T
    return 0.5 * (deformation + deformation.T) - np.eye(3)


def named_constants(c_matrix, tolerance: float = 1e-6) -> dict:
    """{'C11': ..., 'C12': ...}: the non-zero upper-triangle constants (1-based Voigt indices)."""
    scale = max(1.0, float(np.abs(c_matrix).max()))
    return {
        f'C{i + 1}{j + 1}': float(c_matrix[i, j])
        for i in range(6) for j in range(i, 6) if abs(c_matrix[i, j]) > tolerance * scale
    }


def elastic_analysis(atoms_list, crystal_system: str | None = None, symprec: float = SYMPREC,
                     clamped_ion: bool = True, symmetry_images: bool = False) -> tuple:
    """Fit, symmetrise and reduce the elastic tensor of evaluated cells; frame 0 is the unstrained reference.

    :returns: (result dict, Voigt strains (N, 6), Voigt stresses (N, 6) in GPa): the computed pairs, not their images.

    ``clamped_ion`` only labels the result (False: the strained cells were relaxed at fixed cell). With
    ``symmetry_images`` the fit also uses every pair under every point-group rotation of frame 0 (the cells of a
    symmetry-reduced strain set: the strains of the components left out are such images).
    Each frame needs ``info['REF_stress']`` (3x3 eV/Å³, ASE sign: positive = tensile). The strain of each frame is
    computed from its cell relative to frame 0, so only (strain, stress) pairs enter the fit.
    """
    if len(atoms_list) < (3 if symmetry_images else 7):
        raise ValueError(f'need the reference and at least {2 if symmetry_images else 6} strained cells, got '
                         f'{len(atoms_list)} frames')
    reference = atoms_list[0]
    strains, stresses = [], []
    for index, atoms in enumerate(atoms_list):
        stress = atoms.info.get('REF_stress')
        if stress is None or not np.all(np.isfinite(stress)):
            raise ValueError(f'frame {index} has no finite stress: the engine must compute stresses')
        if len(atoms) != len(reference):
            raise ValueError(f'frame {index} has {len(atoms)} atoms, the reference {len(reference)}')
        stress = np.asarray(stress, dtype=float).reshape(3, 3)
        strains.append(strain_to_voigt(cell_strain(reference.cell, atoms.cell)))
        stresses.append(stress_to_voigt(0.5 * (stress + stress.T)) * EV_PER_A3_TO_GPA)
    strains, stresses = np.array(strains), np.array(stresses)
    fit_strains, fit_stresses = strains, stresses
    if symmetry_images:
        rotations = point_group_rotations(reference.cell, reference.get_scaled_positions(), reference.numbers, symprec)
        fit_strains, fit_stresses = strain_stress_images(strains, stresses, rotations)

    c_raw = fit_elastic_tensor(fit_strains, fit_stresses, fit_intercept=True, symmetric=True)
    residuals = fit_stresses - fit_strains @ c_raw.T
    intercept = residuals.mean(axis=0)
    fit_rms = float(np.sqrt(np.mean((residuals - intercept) ** 2)))

    symmetry = symmetry_of(reference, symprec)
    system = crystal_system or symmetry['crystal_system']
    projection = symmetry_projection(system, symmetry['number'] if system == symmetry['crystal_system'] else None)
    c_sym = symmetrize_in_standard_frame(c_raw, projection, symmetry['rotation'])
    deviation = float(np.abs(c_raw - c_sym).max())
    try:
        moduli = voigt_reuss_hill(c_sym)
    except ValueError:  # singular C (e.g. C11 = C12): Reuss bounds undefined, Voigt bounds still are
        moduli = {'bulk_voigt': float((np.trace(c_sym[:3, :3]) + 2 * (c_sym[0, 1] + c_sym[0, 2] + c_sym[1, 2])) / 9),
                  'shear_voigt': float((np.trace(c_sym[:3, :3]) - (c_sym[0, 1] + c_sym[0, 2] + c_sym[1, 2])
                                        + 3 * np.trace(c_sym[3:, 3:])) / 15),
                  'bulk_reuss': None, 'shear_reuss': None, 'bulk_hill': None, 'shear_hill': None}
    stability = born_stability(c_sym)
    return {
        'clamped_ion': clamped_ion,
        'elastic_tensor_gpa': c_sym.tolist(),
        'elastic_tensor_raw_gpa': c_raw.tolist(),
        'constants_gpa': named_constants(c_sym),
        'crystal_system': system,
        'crystal_system_source': 'input' if crystal_system else 'spglib',
        'crystal_system_spglib': symmetry['crystal_system'],
        'space_group_number': symmetry['number'],
        'space_group_symbol': symmetry['symbol'],
        'symmetry_projection': projection,
        'symmetry_deviation_gpa': deviation,
        'symprec': symprec,
        'bulk_modulus_vrh_gpa': moduli['bulk_hill'],
        'shear_modulus_vrh_gpa': moduli['shear_hill'],
        'moduli_gpa': moduli,
        'born_stable': stability['stable'],
        'born_min_eigenvalue_gpa': stability['min_eigenvalue'],
        'born_reason': stability['reason'],
        'reference_stress_gpa': stresses[0].tolist(),
        'fitted_residual_stress_gpa': intercept.tolist(),
        'fit_rms_gpa': fit_rms,
        'n_cells': len(atoms_list),
        'n_fitted_pairs': len(fit_strains),
        'symmetry_images': symmetry_images,
        'conventions': 'Voigt order xx,yy,zz,yz,xz,xy; engineering shear strain; stress positive = tensile; GPa; '
                       'tensor in the Cartesian frame of the input structure',
    }, strains, stresses


# ---- calcfunctions -------------------------------------------------------------------------------------------
@calcfunction
def fit_elastic_constants(frames, crystal_system=None, relaxed_frames=None, relaxed_indices=None,
                          internal_relaxation=None, symmetry_images=None) -> dict:
    """Elastic tensor from the evaluated reference (frame 0) and strained cells.

    ``symmetry_images`` (Bool): the cells are a symmetry-reduced set, fit their point-group images too.
    Clamped-ion without ``internal_relaxation``; with it (Str, recorded as ``internal_relaxation``) relaxed-ion:
    the frames at ``relaxed_indices`` (List) are replaced by ``relaxed_frames`` (same order) before the fit.
    Returns ``elastic`` (Dict, see ``elastic_analysis``) and ``stress_strain`` (ArrayData: ``strains`` Voigt with
    engineering shear, ``stresses`` Voigt GPa, positive = tensile, one row per frame).
    """
    atoms_list = frames.to_ase()
    indices = relaxed_indices.get_list() if relaxed_indices is not None else []
    if relaxed_frames is not None:
        for index, atoms in zip(indices, relaxed_frames.to_ase(), strict=True):
            atoms_list[index] = atoms
    result, strains, stresses = elastic_analysis(atoms_list, crystal_system.value if crystal_system else None,
                                                 clamped_ion=internal_relaxation is None,
                                                 symmetry_images=bool(symmetry_images and symmetry_images.value))
    if internal_relaxation is not None:
        result.update(internal_relaxation=internal_relaxation.value, relaxed_cells=indices)
    pairs = orm.ArrayData()
    pairs.set_array('strains', strains)
    pairs.set_array('stresses', stresses)
    return {'elastic': orm.Dict(result), 'stress_strain': pairs}


# ---- workchain -----------------------------------------------------------------------------------------------
def strain_magnitudes_problem(magnitudes) -> str | None:
    """Why a list of strain magnitudes cannot give a trustworthy linear fit, or None."""
    try:
        values = [float(m) for m in magnitudes]
    except (TypeError, ValueError):
        return f'strain_magnitudes must be numbers, got {magnitudes}'
    if not values:
        return 'strain_magnitudes is empty: give e.g. [-0.01, -0.005, 0.005, 0.01]'
    if any(not np.isfinite(m) or m == 0 for m in values):
        return f'strain_magnitudes must be finite and non-zero (the reference cell is added anyway), got {values}'
    if any(abs(m) > MAX_STRAIN for m in values):
        return (f'strain_magnitudes must satisfy |eps| <= {MAX_STRAIN} (linear regime; docs/sources.md recommends '
                f'0.005-0.01), got {values}')
    if len(values) > MAX_MAGNITUDES:
        return f'at most {MAX_MAGNITUDES} strain_magnitudes (6 cells each), got {len(values)}'
    if len(set(values)) != len(values):
        return f'strain_magnitudes must be distinct, got {values}'
    if not (any(m > 0 for m in values) and any(m < 0 for m in values)):
        return (f'strain_magnitudes need both signs (e.g. [-0.01, 0.01]) so that the leading non-linear error '
                f'cancels in the fit, got {values}')
    return None


def validate_inputs(inputs, ctx):
    problem = validate_engine(inputs, ctx)
    if problem:
        return problem
    problem = strain_magnitudes_problem(inputs['strain_magnitudes'].get_list())
    if problem:
        return problem
    if 'crystal_system' in inputs and inputs['crystal_system'].value not in CRYSTAL_SYSTEMS:
        return f'crystal_system must be one of {", ".join(CRYSTAL_SYSTEMS)}, got `{inputs["crystal_system"].value}`'
    if not inputs['relax_ions_fmax'].value > 0:
        return f'`relax_ions_fmax` must be > 0 eV/Å, got {inputs["relax_ions_fmax"].value}'
    problem = structure_problem('structure', inputs['structure']) or validate_relax(inputs, ctx)
    if problem or ('clamped_ion' in inputs and inputs['clamped_ion'].value):
        return problem
    atoms = inputs['structure'].get_ase()
    if every_atom_at_inversion_centre(atoms.cell, atoms.get_scaled_positions(), atoms.numbers, SYMPREC):
        return None  # no strain creates internal forces: nothing will be relaxed
    return relax_code_problem(inputs, 'the relaxed-ion tensor (clamped_ion=False)')


class ElasticWorkChain(EngineMixin, WorkChain):
    """Relaxed-ion (default) and clamped-ion elastic constants from stress-strain pairs of strained cells."""

    @classmethod
    def define(cls, spec):
        super().define(spec)
        spec.input('structure', valid_type=orm.StructureData,
                   help='The structure at (about) its equilibrium; a residual stress is fitted out as an intercept.')
        spec.input('strain_magnitudes', valid_type=orm.List,
                   default=lambda: orm.List([-0.01, -0.005, 0.005, 0.01]),
                   help='Strains applied to each Voigt component (shears as engineering strain 2 eps_ij); both '
                        f'signs, non-zero, |eps| <= {MAX_STRAIN} (docs/sources.md: 0.5-1% keeps C44 linear).')
        spec.input('crystal_system', valid_type=orm.Str, required=False,
                   help=f'One of {", ".join(CRYSTAL_SYSTEMS)}; default: detected with spglib (symprec {SYMPREC} Å). '
                        'Decides the symmetry projection of C.')
        spec.input('clamped_ion', valid_type=orm.Bool, default=lambda: orm.Bool(False),
                   help='True: only the clamped-ion tensor (atoms move with the strain, no relaxation). Default '
                        'False: the strained cells with internal forces are relaxed at fixed cell (relaxed-ion).')
        spec.input('symmetry_reduction', valid_type=orm.Bool, default=lambda: orm.Bool(True),
                   help='Compute only the Voigt components whose strains are not point-group images of one another '
                        '(cubic: xx and yz, 2 of 6) and fit the full tensor from the computed pairs and their '
                        'rotation images: exact for the crystal\'s symmetry, a third of the cells for cubic. False: '
                        'all 6 components.')
        spec.input('relax_ions_fmax', valid_type=orm.Float, default=lambda: orm.Float(RELAX_IONS_FMAX),
                   help='Relaxed-ion: force tolerance (eV/Å) of the fixed-cell relaxation; cells whose clamped forces '
                        f'are below it are not relaxed. Default {RELAX_IONS_FMAX} (docs/elastic.md: C44 of Si '
                        'converged to < 0.1 GPa); pw.x conv_thr is tightened to '
                        f'{RELAX_IONS_CONV_THR_PER_ATOM} Ry/atom for these runs.')
        cls.define_engine(spec)
        cls.define_relax(spec)
        spec.inputs.validator = validate_inputs
        spec.outline(
            if_(cls.should_relax)(cls.run_relax, cls.inspect_relax),
            cls.run_strains, cls.fit,
            if_(cls.should_relax_ions)(cls.run_ion_relaxations, cls.inspect_ion_relaxations),
            cls.fit_relaxed_ion, cls.results,
        )
        spec.output('elastic', valid_type=orm.Dict,
                    help='C (6x6 GPa, raw and symmetrised): relaxed-ion by default (`clamped_ion` False, '
                         '`internal_relaxation` says what was relaxed), crystal system, VRH bulk/shear moduli, '
                         'Born stability verdict and reason, fit diagnostics.')
        spec.output('elastic_clamped_ion', valid_type=orm.Dict,
                    help='The clamped-ion C from the same cells, same format (`clamped_ion` True).')
        spec.output('relaxed_frames', valid_type=orm.Data, required=False,
                    help='Relaxed-ion: the cells relaxed at fixed cell, evaluated (`mlip.dataset`; their positions '
                         'in `frames` are `relaxed_cells` of `elastic`).')
        spec.output('stress_strain', valid_type=orm.ArrayData,
                    help='The fitted pairs: `strains` (Voigt, engineering shear), `stresses` (Voigt, GPa, tensile +).')
        spec.output('frames', valid_type=orm.Data,
                    help='The evaluated cells as an `mlip.dataset` (frame 0 = unstrained reference).')
        spec.exit_code(510, 'ERROR_FIT_FAILED', message='The elastic-tensor fit failed: {reason}')

    def run_strains(self):
        """One calcfunction makes the reference (``structure_000``) and the strained cells; one engine run."""
        components = range(6)
        if self.inputs.symmetry_reduction.value:
            atoms = self.structure_to_compute.get_ase()
            components = symmetry_reduced_components(
                point_group_rotations(atoms.cell, atoms.get_scaled_positions(), atoms.numbers, SYMPREC))
            self.report(f'symmetry-reduced strain set: Voigt components {[VOIGT_LABELS[c] for c in components]} '
                        'computed, the others fitted from their point-group images')
        strains = [np.zeros((3, 3)).tolist()]
        strains += [eps.tolist() for component, _, eps in
                    voigt_strain_matrices(self.inputs.strain_magnitudes.get_list()) if component in components]
        self.ctx.structures = dict(strain_structure(self.structure_to_compute, orm.List(strains)))
        return ToContext(cells=self.submit_engine(self.ctx.structures, 'strained_cells',
                                                  mesh_of=self.structure_to_compute))

    def fit(self):
        """The clamped-ion fit, and the choice of the cells to relax (those with clamped forces > tolerance)."""
        frames, failure = self.engine_frames(self.ctx.cells, self.ctx.structures)
        if failure:
            return failure
        self.out('frames', frames)
        self.ctx.frames = frames
        self.ctx.fit_inputs = {'crystal_system': self.inputs.crystal_system} if 'crystal_system' in self.inputs else {}
        if self.inputs.symmetry_reduction.value:
            self.ctx.fit_inputs['symmetry_images'] = self.inputs.symmetry_reduction
        try:
            fitted = fit_elastic_constants(frames, **self.ctx.fit_inputs)
        except ValueError as exception:
            return self.exit_codes.ERROR_FIT_FAILED.format(reason=str(exception))
        self.out('elastic_clamped_ion', fitted['elastic'])
        self.ctx.clamped = fitted
        self.ctx.relax_keys = []
        if self.inputs.clamped_ion.value:
            return None
        reference = frames.to_ase()[0]
        if every_atom_at_inversion_centre(reference.cell, reference.get_scaled_positions(), reference.numbers,
                                          SYMPREC):
            self.ctx.internal_relaxation = NO_INTERNAL_RELAXATION
            self.report(f'internal relaxation {NO_INTERNAL_RELAXATION}')
            return None
        fmax = self.inputs.relax_ions_fmax.value
        keys = sorted(self.ctx.structures)
        for key, atoms in zip(keys, frames.to_ase(), strict=True):
            if float(np.linalg.norm(atoms.arrays[FORCES_KEY], axis=1).max()) > fmax:
                self.ctx.relax_keys.append(key)
        self.ctx.internal_relaxation = (f'{len(self.ctx.relax_keys)} of {len(keys)} cells relaxed at fixed cell to '
                                        f'fmax {fmax} eV/Å (the others had smaller clamped forces)')
        self.report(f'internal relaxation: {self.ctx.internal_relaxation}')
        return None

    def should_relax_ions(self) -> bool:
        return bool(self.ctx.relax_keys)

    def run_ion_relaxations(self):
        """Fixed-cell relaxation of the cells with internal forces: DFT one pw.x relax each, MLIP one job."""
        structures = {key: self.ctx.structures[key] for key in self.ctx.relax_keys}
        nodes = self.submit_relaxations(structures, False, 'relax_ions', self.inputs.relax_ions_fmax.value,
                                        RELAX_IONS_CONV_THR_PER_ATOM, mesh_of=self.structure_to_compute)
        return ToContext(**{f'relax_ions_{key}': node for key, node in nodes.items()})

    def inspect_ion_relaxations(self):
        """DFT: the relaxed frames from the PwBaseWorkChain outputs; MLIP: ONE evaluation of the relaxed cells."""
        nodes = {key: self.ctx[f'relax_ions_{key}'] for key in self.ctx.relax_keys}
        for node in {node.pk: node for node in nodes.values()}.values():
            if not node.is_finished_ok:
                reason = f'{node.process_label}<{node.pk}> exit {node.exit_status}: {node.exit_message}'
                return self.exit_codes.ERROR_RELAX_FAILED.format(engine=self.engine, reason=reason)
        if self.engine == 'dft':
            frames = {}
            for position, key in enumerate(self.ctx.relax_keys):
                prefix, outputs = frame_link_prefix(position), nodes[key].outputs
                frames[f'{prefix}_structure'] = outputs.output_structure
                frames[f'{prefix}_parameters'] = outputs.output_parameters
                frames[f'{prefix}_trajectory'] = outputs.output_trajectory
            settings = orm.Dict({'config_types': ['elastic_relaxed_ion'] * len(nodes),
                                 'fingerprint': self.ctx.frames.fingerprint})
            self.ctx.relaxed_frames = collect_labeled_frames(settings, **frames,
                                                             metadata={'call_link_label': 'collect_relaxed'})
            return None
        relaxed = next(iter(nodes.values())).outputs.relaxed_structures
        self.ctx.relaxed_structures = {key: relaxed[key] for key in self.ctx.relax_keys}
        return ToContext(relaxed_cells=self.submit_engine(self.ctx.relaxed_structures, 'relaxed_cells'))

    def fit_relaxed_ion(self):
        """The output ``elastic``: relaxed-ion (the relaxed frames substituted), or the clamped-ion tensor."""
        if self.inputs.clamped_ion.value:
            self.out('elastic', self.ctx.clamped['elastic'])
            self.out('stress_strain', self.ctx.clamped['stress_strain'])
            return None
        inputs = dict(self.ctx.fit_inputs, internal_relaxation=orm.Str(self.ctx.internal_relaxation))
        if self.ctx.relax_keys:
            if self.engine == 'mlip':
                relaxed, failure = self.engine_frames(self.ctx.relaxed_cells, self.ctx.relaxed_structures)
                if failure:
                    return failure
            else:
                relaxed = self.ctx.relaxed_frames
            self.out('relaxed_frames', relaxed)
            keys = sorted(self.ctx.structures)
            indices = [keys.index(key) for key in self.ctx.relax_keys]
            inputs.update(relaxed_frames=relaxed, relaxed_indices=orm.List(indices))
        try:
            fitted = fit_elastic_constants(self.ctx.frames, **inputs)
        except ValueError as exception:
            return self.exit_codes.ERROR_FIT_FAILED.format(reason=str(exception))
        self.out('elastic', fitted['elastic'])
        self.out('stress_strain', fitted['stress_strain'])
        return None

    def results(self):
        elastic = self.outputs['elastic']
        constants = ', '.join(f'{key} = {value:.1f}' for key, value in elastic['constants_gpa'].items())
        self.report(
            f'{self.engine}: {"clamped" if elastic["clamped_ion"] else "relaxed"}-ion {constants} GPa '
            f'({elastic["crystal_system"]}); '
            f'B_VRH = {elastic["bulk_modulus_vrh_gpa"]} GPa, G_VRH = {elastic["shear_modulus_vrh_gpa"]} GPa; '
            f'Born {"stable" if elastic["born_stable"] else "UNSTABLE"}: {elastic["born_reason"]}'
        )
