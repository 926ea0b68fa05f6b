"""``mlip.eos``: energy-volume scan and Birch-Murnaghan fit, with the DFT or the MLIP engine.

When the minimum is not bracketed by the scan (a model far from DFT, or a structure far from equilibrium),
the scan is re-centred on the suggested minimum and repeated, up to ``max_recentring`` times.

With ``relax`` True the structure is first relaxed with the same engine (see
:mod:`aiida_mlip.workflows.properties.engine`) and the scan is centred on the relaxed structure.
"""
from __future__ import annotations

import numpy as np
from aiida import orm
from aiida.engine import ToContext, WorkChain, calcfunction, if_, while_

from aiida_mlip.analysis.eos import (
    MIN_EOS_POINTS, conventional_lattice_at_volume, fit_birch_murnaghan, minimum_near_edge, scan_volume_strains,
    suggest_scan_centre,
)
from aiida_mlip.calculations.sampling import scale_volume, volume_scaled_copies
from aiida_mlip.workflows.checks import structure_problem
from aiida_mlip.workflows.properties.engine import EngineMixin, validate_engine, validate_relax


def _volumes_energies(frames):
    """Volumes (Å³/atom) and energies (eV/atom) of evaluated frames, sorted by volume."""
    atoms_list = frames.to_ase()
    volumes = np.array([atoms.get_volume() / len(atoms) for atoms in atoms_list])
    energies = np.array([atoms.info['REF_energy'] / len(atoms) for atoms in atoms_list])
    order = np.argsort(volumes)
    return volumes[order], energies[order]


@calcfunction
def fit_equation_of_state(frames, structure) -> dict:
    """Birch-Murnaghan fit of the evaluated volume scan of ``structure``; volumes and energies per atom.

    Returns ``eos`` (Dict: v0 Å³/atom, e0 eV/atom, b0 GPa, b0_prime, residual_rms eV/atom, the conventional
    lattice at V0 ``lattice_angstrom`` {a, b, c} and ``a0_angstrom`` = its a, ``minimum_near_edge`` and
    ``warnings``) and ``curve`` (ArrayData: volumes, energies per atom).
    """
    volumes, energies = _volumes_energies(frames)
    fit = {key: float(value) for key, value in fit_birch_murnaghan(volumes, energies).items()}
    atoms = structure.get_ase()
    lattice = conventional_lattice_at_volume(atoms.cell, atoms.get_scaled_positions(), atoms.numbers, fit['v0'])
    near_edge = minimum_near_edge(volumes, fit['v0'])
    warnings = [f'the minimum V0 = {fit["v0"]:.3f} Å³/atom lies in the outermost interval of the scan '
                f'({volumes[0]:.3f}-{volumes[-1]:.3f} Å³/atom): centre it on a relaxed structure'] if near_edge else []
    eos = {**fit, 'lattice_angstrom': lattice, 'a0_angstrom': lattice['a'], 'minimum_near_edge': near_edge,
           'warnings': warnings}
    curve = orm.ArrayData()
    curve.set_array('volumes', volumes)
    curve.set_array('energies', energies)
    return {'eos': orm.Dict(eos), 'curve': curve}


@calcfunction
def recentre_structure(structure: orm.StructureData, frames) -> orm.StructureData:
    """``structure`` scaled isotropically to the volume where the evaluated scan suggests the minimum."""
    volumes, energies = _volumes_energies(frames)
    target = suggest_scan_centre(volumes, energies) * len(structure.sites)
    atoms = structure.get_ase()
    return orm.StructureData(ase=volume_scaled_copies(atoms, [target / atoms.get_volume() - 1.0])[0])


def validate_inputs(inputs, ctx):
    problem = validate_engine(inputs, ctx)
    if problem:
        return problem
    span, points = inputs['volume_range'].value, inputs['n_points'].value
    if not 0 < span < 0.5:
        return f'volume_range must lie in (0, 0.5), got {span}: it is the relative half-width of the scan'
    if points < MIN_EOS_POINTS:
        return f'n_points must be at least {MIN_EOS_POINTS} for a 4-parameter Birch-Murnaghan fit, got {points}'
    return structure_problem('structure', inputs['structure']) or validate_relax(inputs, ctx)


class EquationOfStateWorkChain(EngineMixin, WorkChain):
    """Scan the volume of a structure (isotropically) and fit the 3rd-order Birch-Murnaghan EOS."""

    @classmethod
    def define(cls, spec):
        super().define(spec)
        spec.input('structure', valid_type=orm.StructureData, help='The structure at (about) its equilibrium.')
        spec.input('volume_range', valid_type=orm.Float, default=lambda: orm.Float(0.06),
                   help='Relative half-width of the volume scan: V0*(1-r) ... V0*(1+r) (docs/sources.md: 6-10%).')
        spec.input('n_points', valid_type=orm.Int, default=lambda: orm.Int(7), help='Number of volumes (>= 5).')
        spec.input('max_recentring', valid_type=orm.Int, default=lambda: orm.Int(2),
                   help='How often the scan may be re-centred when its minimum is not bracketed.')
        cls.define_engine(spec)
        cls.define_relax(spec)
        spec.inputs.validator = validate_inputs
        spec.outline(
            if_(cls.should_relax)(cls.run_relax, cls.inspect_relax),
            cls.setup, while_(cls.should_scan)(cls.run_scan, cls.fit), cls.results,
        )
        spec.output('eos', valid_type=orm.Dict, help='v0 (Å³/atom), e0 (eV/atom), b0 (GPa), b0_prime, residual, '
                    'lattice at V0 (a0_angstrom), minimum_near_edge and warnings.')
        spec.output('curve', valid_type=orm.ArrayData, help='Volumes (Å³/atom) and energies (eV/atom) of the scan.')
        spec.output('frames', valid_type=orm.Data, help='The evaluated cells of the final scan (`mlip.dataset`).')
        spec.exit_code(510, 'ERROR_FIT_FAILED', message='The Birch-Murnaghan fit failed: {reason}')

    def setup(self):
        self.ctx.centre = self.structure_to_compute
        self.ctx.scans = 0
        self.ctx.done = False

    def should_scan(self):
        return not self.ctx.done

    def run_scan(self):
        span, points = self.inputs.volume_range.value, self.inputs.n_points.value
        strains = orm.List(scan_volume_strains(span, points))
        self.ctx.structures = dict(scale_volume(self.ctx.centre, strains))
        self.ctx.scans += 1
        return ToContext(scan=self.submit_engine(self.ctx.structures, f'volume_scan_{self.ctx.scans}',
                                                 mesh_of=self.structure_to_compute))

    def fit(self):
        frames, failure = self.engine_frames(self.ctx.scan, self.ctx.structures)
        if failure:
            return failure
        try:  # the pure fit first: a scan that does not bracket the minimum is re-centred, not an excepted node
            fit_birch_murnaghan(*_volumes_energies(frames))
        except ValueError as exception:
            if self.ctx.scans > self.inputs.max_recentring.value:
                return self.exit_codes.ERROR_FIT_FAILED.format(reason=str(exception))
            self.report(f'{exception}: re-centring the scan')
            self.ctx.centre = recentre_structure(self.ctx.centre, frames)
            return None
        fitted = fit_equation_of_state(frames, self.ctx.centre)
        self.ctx.done = True
        for warning in fitted['eos']['warnings']:
            self.report(f'WARNING: {warning}')
        self.out('frames', frames)
        self.out('eos', fitted['eos'])
        self.out('curve', fitted['curve'])
        return None

    def results(self):
        eos = self.outputs['eos']
        self.report(f'{self.engine}: V0 = {eos["v0"]:.3f} Å³/atom (a0 = {eos["a0_angstrom"]:.4f} Å), '
                    f'B0 = {eos["b0_gpa"]:.1f} GPa')
