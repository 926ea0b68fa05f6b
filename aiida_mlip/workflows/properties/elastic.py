"""``mlip.elastic``: clamped-ion elastic tensor from stress-strain pairs, with the DFT or the MLIP engine.

The unstrained reference cell and 6 Voigt components x ``strain_magnitudes`` homogeneously strained cells
(atoms scaled with the cell, NOT relaxed) go to the engine in one submission; a linear least-squares fit of the
stresses against the strains (``aiida_mlip.analysis.elastic.fit_elastic_tensor``) gives C (6x6, GPa).

Internal relaxation is not done: the engines evaluate single points, so the result is the CLAMPED-ION tensor
(output attribute ``clamped_ion: True``). For crystals whose atoms are not all at centres of inversion, some
constants relax: in diamond Si the clamped-ion C44 is ~110 GPa against ~75 GPa relaxed-ion (PBE), while C11
and C12 are unaffected. Compare an MLIP with DFT like for like (both clamped-ion), not with experiment.

With ``relax`` True the structure is first relaxed (positions and, with ``relax_cell``, the cell) with the same
engine and the strains are applied to the relaxed structure; the strained cells themselves are still NOT relaxed
internally, so the tensor stays clamped-ion.
"""
from __future__ import annotations

import numpy as np
from aiida import orm
from aiida.engine import ToContext, WorkChain, calcfunction, if_

from aiida_mlip.analysis.elastic import (
    born_stability, fit_elastic_tensor, strain_to_voigt, stress_to_voigt, symmetrize_elastic_tensor,
    voigt_reuss_hill, voigt_strain_matrices, voigt_to_strain, voigt_to_stress,
)
from aiida_mlip.calculations.sampling import strain_structure
from aiida_mlip.workflows.checks import structure_problem
from aiida_mlip.workflows.properties.engine import EngineMixin, validate_engine, validate_relax

#: eV/Å³ -> GPa
EV_PER_A3_TO_GPA = 160.2176634

#: Largest accepted |strain|: beyond a few % the response is no longer linear (DOMAIN.md: 0.5-1% keeps C44
#: linear, 6% shear over-estimates it).
MAX_STRAIN = 0.05

#: More magnitudes add cost (6 cells each), not accuracy: a linear fit needs two.
MAX_MAGNITUDES = 10

#: Symmetry tolerance (Å) of the spglib crystal-system detection and of the orientation of the crystal axes.
SYMPREC = 1e-3

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


def elastic_analysis(atoms_list, crystal_system: str | None = None, symprec: float = SYMPREC) -> tuple:
    """Fit, symmetrise and reduce the elastic tensor of evaluated cells; frame 0 is the unstrained reference.

    :returns: (result dict, Voigt strains (N, 6), Voigt stresses (N, 6) in GPa).

    Each frame needs ``info['REF_stress']`` (3x3 eV/Å³, ASE sign: positive = tensile). The strain of each frame is
    computed from its cell relative to frame 0, so only (strain, stress) pairs enter the fit.
    """
    if len(atoms_list) < 7:
        raise ValueError(f'need the reference and at least 6 strained cells, got {len(atoms_list)} frames')
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

    c_raw = fit_elastic_tensor(strains, stresses, fit_intercept=True, symmetric=True)
    residuals = stresses - strains @ c_raw.T
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
        'clamped_ion': True,
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
        'conventions': 'Voigt order xx,yy,zz,yz,xz,xy; engineering shear strain; stress positive = tensile; GPa; '
                       'tensor in the Cartesian frame of the input structure',
    }, strains, stresses


# ---- calcfunctions -------------------------------------------------------------------------------------------
@calcfunction
def fit_elastic_constants(frames, crystal_system=None) -> dict:
    """Clamped-ion elastic tensor from the evaluated reference (frame 0) and strained cells.

    Returns ``elastic`` (Dict, see ``elastic_analysis``) and ``stress_strain`` (ArrayData: ``strains`` Voigt with
    engineering shear, ``stresses`` Voigt GPa, positive = tensile, one row per frame).
    """
    result, strains, stresses = elastic_analysis(frames.to_ase(), crystal_system.value if crystal_system else None)
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
        return (f'strain_magnitudes must satisfy |eps| <= {MAX_STRAIN} (linear regime; DOMAIN.md recommends '
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
    return structure_problem('structure', inputs['structure']) or validate_relax(inputs, ctx)


class ElasticWorkChain(EngineMixin, WorkChain):
    """Clamped-ion elastic constants from stress-strain pairs: reference + 6 components x magnitudes, one fit."""

    @classmethod
    def define(cls, spec):
        super().define(spec)
        spec.input('structure', valid_type=orm.StructureData,
                   help='The structure at (about) its equilibrium; a residual stress is fitted out as an intercept.')
        spec.input('strain_magnitudes', valid_type=orm.List,
                   default=lambda: orm.List([-0.01, -0.005, 0.005, 0.01]),
                   help='Strains applied to each Voigt component (shears as engineering strain 2 eps_ij); both '
                        f'signs, non-zero, |eps| <= {MAX_STRAIN} (DOMAIN.md: 0.5-1% keeps C44 linear).')
        spec.input('crystal_system', valid_type=orm.Str, required=False,
                   help=f'One of {", ".join(CRYSTAL_SYSTEMS)}; default: detected with spglib (symprec {SYMPREC} Å). '
                        'Decides the symmetry projection of C.')
        cls.define_engine(spec)
        cls.define_relax(spec)
        spec.inputs.validator = validate_inputs
        spec.outline(if_(cls.should_relax)(cls.run_relax, cls.inspect_relax), cls.run_strains, cls.fit, cls.results)
        spec.output('elastic', valid_type=orm.Dict,
                    help='Clamped-ion C (6x6 GPa, raw and symmetrised), crystal system, VRH bulk/shear moduli, '
                         'Born stability verdict and reason, fit diagnostics.')
        spec.output('stress_strain', valid_type=orm.ArrayData,
                    help='The fitted pairs: `strains` (Voigt, engineering shear), `stresses` (Voigt, GPa, tensile +).')
        spec.output('frames', valid_type=orm.Data,
                    help='The evaluated cells as an `mlip.dataset` (frame 0 = unstrained reference).')
        spec.exit_code(510, 'ERROR_FIT_FAILED', message='The elastic-tensor fit failed: {reason}')

    def run_strains(self):
        """One calcfunction makes the reference (``structure_000``) and the strained cells; one engine run."""
        strains = [np.zeros((3, 3)).tolist()]
        strains += [eps.tolist() for _, _, eps in voigt_strain_matrices(self.inputs.strain_magnitudes.get_list())]
        self.ctx.structures = dict(strain_structure(self.structure_to_compute, orm.List(strains)))
        self._warn_if_kpoint_meshes_differ()
        return ToContext(cells=self.submit_engine(self.ctx.structures, 'strained_cells'))

    def _warn_if_kpoint_meshes_differ(self):
        """DFT with a k-point spacing: a strain that tips a mesh dimension over makes a stress jump, not a slope."""
        if self.engine != 'dft' or 'kpoints_distance' not in self.inputs.dft.pw_base:
            return
        distance = self.inputs.dft.pw_base.kpoints_distance.value
        meshes = {}
        for key, structure in self.ctx.structures.items():
            kpoints = orm.KpointsData()
            kpoints.set_cell_from_structure(structure)
            kpoints.set_kpoints_mesh_from_density(distance)
            meshes.setdefault(tuple(kpoints.get_kpoints_mesh()[0]), []).append(key)
        if len(meshes) > 1:
            self.report(
                f'warning: k-point spacing {distance} 1/Å gives different meshes for the strained cells '
                f'({ {mesh: len(keys) for mesh, keys in meshes.items()} }): the fitted constants carry the jump. '
                'Pass an explicit mesh (dft.pw_base.kpoints) or another spacing.'
            )

    def fit(self):
        frames, failure = self.engine_frames(self.ctx.cells, self.ctx.structures)
        if failure:
            return failure
        self.out('frames', frames)
        inputs = {'crystal_system': self.inputs.crystal_system} if 'crystal_system' in self.inputs else {}
        try:
            fitted = fit_elastic_constants(frames, **inputs)
        except ValueError as exception:
            return self.exit_codes.ERROR_FIT_FAILED.format(reason=str(exception))
        self.out('elastic', fitted['elastic'])
        self.out('stress_strain', fitted['stress_strain'])
        return None

    def results(self):
        elastic = self.outputs['elastic']
        constants = ', '.join(f'{key} = {value:.1f}' for key, value in elastic['constants_gpa'].items())
        self.report(
            f'{self.engine}: clamped-ion {constants} GPa ({elastic["crystal_system"]}); '
            f'B_VRH = {elastic["bulk_modulus_vrh_gpa"]} GPa, G_VRH = {elastic["shear_modulus_vrh_gpa"]} GPa; '
            f'Born {"stable" if elastic["born_stable"] else "UNSTABLE"}: {elastic["born_reason"]}'
        )
