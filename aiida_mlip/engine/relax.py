"""Relax structures (positions, and the cell unless fixed) with a MACE model or committee on the compute node.

No AiiDA imports: this runs on remote machines with only torch/mace/ase.
The models are loaded ONCE (:func:`aiida_mlip.engine.evaluate.run_engine`) and every structure of the input file is
relaxed with ASE's BFGS optimiser (``--optimizer FIRE`` as an option) through the same ASE calculator as MD
(:func:`aiida_mlip.engine.md.make_calculator`: committee MEAN energy/forces/stress for a committee). With the cell
free, the optimiser works on ``ase.filters.FrechetCellFilter`` (positions and cell, zero external pressure); with
``--fix-cell`` on the positions only. A structure is converged when the largest atomic force AND (with the cell free)
the largest generalised force of the filter (atomic and cell forces, the cell part being stress x volume / N in eV/Å)
are below ``fmax`` within ``steps`` optimiser steps. Not converging is a *result* recorded per structure
(``converged``, ``n_steps``, ``residual_fmax``), not an engine failure.

Outputs: ``--output`` extxyz of the relaxed structures (energy, forces and stress as ASE single-point results, i.e.
``atoms.get_forces()`` after ``ase.io.read``; info ``converged``, ``n_steps``, ``residual_fmax``), ``--arrays`` npz
(default: ``--output`` with the suffix ``.npz``) with the same numbers as fixed-shape arrays for the parser, and the
JSON ``--summary``.

Exit codes as in ``evaluate``: 0 ok (also when a structure did not converge), 2 missing element, 3 unreadable model,
4 unreadable structures.

Run as ``python -m aiida_mlip.engine.relax``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import numpy as np

try:
    from . import evaluate as core
    from . import md as md_engine
except ImportError:  # executed as a plain script copied next to evaluate.py and md.py
    import evaluate as core  # type: ignore[no-redef]
    import md as md_engine  # type: ignore[no-redef]

#: Default force threshold (eV/Å): docs/sources.md, relax to fmax <= 0.001-0.005 eV/Å before phonons.
DEFAULT_FMAX = 0.005
DEFAULT_STEPS = 500


def _max_norm(forces) -> float:
    forces = np.asarray(forces, dtype=float).reshape(-1, 3)
    return float(np.sqrt((forces**2).sum(axis=1)).max()) if len(forces) else 0.0


def relax_atoms(models: Sequence[Any], atoms, fmax: float = DEFAULT_FMAX, steps: int = DEFAULT_STEPS,
                relax_cell: bool = True, head: Optional[str] = None, optimizer: str = 'BFGS') -> Dict[str, Any]:
    """Relax a copy of ``atoms`` with already-loaded ``models`` (committee mean); returns the relaxed atoms and data.

    :returns: dict with ``atoms`` (relaxed copy, no calculator), ``energy`` (eV), ``forces`` (N, 3 eV/Å), ``stress``
        (3x3 eV/Å³, ASE sign), ``converged``, ``n_steps``, ``residual_fmax`` (largest optimiser force, eV/Å; with the
        cell free it includes the cell degrees of freedom), ``max_force`` (largest atomic force, eV/Å).
    """
    from ase.filters import FrechetCellFilter
    from ase.optimize import BFGS, FIRE
    from ase.stress import voigt_6_to_full_3x3_stress

    if optimizer not in ('FIRE', 'BFGS'):
        raise ValueError(f"optimizer must be 'FIRE' or 'BFGS', got {optimizer!r}")
    if fmax <= 0 or steps < 0:
        raise ValueError(f'need fmax > 0 and steps >= 0, got fmax={fmax}, steps={steps}')
    atoms = atoms.copy()
    atoms.calc = md_engine.make_calculator(models, compute_stress=True, head=head)
    target = FrechetCellFilter(atoms) if relax_cell else atoms
    dyn = (FIRE if optimizer == 'FIRE' else BFGS)(target, logfile=None)
    # The filter's generalised forces (atomic forces in the deformed frame + cell forces) can meet fmax while the
    # plain atomic forces are still just above it: tighten the optimiser's threshold (within ``steps``) until both do.
    threshold = fmax
    for _ in range(4):
        dyn.run(fmax=threshold, steps=max(0, steps - dyn.nsteps))
        residual = _max_norm(target.get_forces())
        max_force = _max_norm(atoms.get_forces())
        converged = residual < fmax and max_force < fmax
        if converged or dyn.nsteps >= steps:
            break
        threshold *= 0.5
    forces = np.asarray(atoms.get_forces(), dtype=float)
    energy = float(atoms.get_potential_energy())
    stress = np.asarray(voigt_6_to_full_3x3_stress(atoms.get_stress()), dtype=float)
    relaxed = atoms.copy()
    relaxed.calc = None
    return {
        'atoms': relaxed,
        'energy': energy,
        'forces': forces,
        'stress': stress,
        'converged': converged,
        'n_steps': int(dyn.nsteps),
        'residual_fmax': residual,
        'max_force': _max_norm(forces),
    }


def _parser():
    parser = core.engine_parser(
        'python -m aiida_mlip.engine.relax',
        'Relax every structure of a file (positions and cell) with a MACE model or committee (committee mean).',
        output='relaxed.extxyz',
    )
    parser.add_argument('--structures', required=True, help='structure file, all frames are relaxed')
    parser.add_argument('--arrays', default=None, help='npz with the results (default: --output with suffix .npz)')
    parser.add_argument('--fmax', type=float, default=DEFAULT_FMAX, help='force threshold (eV/A)')
    parser.add_argument('--steps', type=int, default=DEFAULT_STEPS, help='maximum optimiser steps per structure')
    parser.add_argument('--fix-cell', action='store_true', help='relax the positions only')
    parser.add_argument('--optimizer', choices=['BFGS', 'FIRE'], default='BFGS',
                        help='ASE optimiser (BFGS: about half the steps of FIRE for small cells)')
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """CLI entry point; returns the exit code (0 ok, 2 missing element, 3 bad model, 4 bad structures)."""
    args = _parser().parse_args(argv)
    if args.fmax <= 0 or args.steps < 0:
        return core.fail(f'need --fmax > 0 and --steps >= 0, got {args.fmax}, {args.steps}', 1)
    arrays_path = Path(args.arrays) if args.arrays else Path(args.output).with_suffix('.npz')

    def job(models, atoms_list):
        import ase.io

        t_relax = time.perf_counter()
        results, per_structure = [], []
        for index, atoms in enumerate(atoms_list):
            t_one = time.perf_counter()
            result = relax_atoms(models, atoms, fmax=args.fmax, steps=args.steps, relax_cell=not args.fix_cell,
                                 head=args.head, optimizer=args.optimizer)
            results.append(result)
            per_structure.append({
                'index': index,
                'energy': result['energy'],
                'converged': result['converged'],
                'n_steps': result['n_steps'],
                'residual_fmax': result['residual_fmax'],
                'max_force': result['max_force'],
                'volume_initial': float(atoms.get_volume()) if atoms.pbc.all() else None,
                'volume_final': float(result['atoms'].get_volume()) if atoms.pbc.all() else None,
                'wall_seconds': time.perf_counter() - t_one,
            })  # fmt: skip

        from ase.calculators.singlepoint import SinglePointCalculator
        from ase.stress import full_3x3_to_voigt_6_stress

        images = []
        for result in results:
            image = result['atoms'].copy()
            image.info.update({'converged': result['converged'], 'n_steps': result['n_steps'],
                               'residual_fmax': result['residual_fmax']})
            image.calc = SinglePointCalculator(image, energy=result['energy'], forces=result['forces'],
                                               stress=full_3x3_to_voigt_6_stress(result['stress']))
            images.append(image)
        ase.io.write(args.output, images, format='extxyz')

        n = len(results)
        arrays = {
            'n_atoms': np.array([len(r['atoms']) for r in results], dtype=np.int64),
            'atomic_numbers': np.concatenate([r['atoms'].numbers for r in results]).astype(np.int64)
            if n else np.zeros(0, dtype=np.int64),
            'positions': np.concatenate([r['atoms'].positions for r in results]) if n else np.zeros((0, 3)),
            'cells': np.array([np.asarray(r['atoms'].cell) for r in results], dtype=float).reshape(n, 3, 3),
            'pbc': np.array([r['atoms'].pbc for r in results], dtype=bool).reshape(n, 3),
            'energies': np.array([r['energy'] for r in results], dtype=float),
            'forces': np.concatenate([r['forces'] for r in results]) if n else np.zeros((0, 3)),
            'stresses': np.array([r['stress'] for r in results], dtype=float).reshape(n, 3, 3),
            'converged': np.array([r['converged'] for r in results], dtype=bool),
            'n_steps': np.array([r['n_steps'] for r in results], dtype=np.int64),
            'residual_fmax': np.array([r['residual_fmax'] for r in results], dtype=float),
        }
        core.write_npz_atomic(arrays_path, arrays)
        n_converged = sum(r['converged'] for r in results)
        summary = {
            'n_structures': n,
            'n_models': len(models),
            'committee': len(models) > 1,
            'n_converged': n_converged,
            'all_converged': n_converged == n,
            'fmax': args.fmax,
            'steps': args.steps,
            'relax_cell': not args.fix_cell,
            'optimizer': args.optimizer,
            'cell_filter': 'FrechetCellFilter' if not args.fix_cell else None,
            'arrays': arrays_path.name,
            'structures': per_structure,
            'threads': args.threads,
            'relax_seconds': time.perf_counter() - t_relax,
        }
        return summary, f'relaxed {n} structure(s), {n_converged} converged to fmax {args.fmax} eV/A'

    return core.run_engine(args, args.structures, job)


if __name__ == '__main__':
    core.exit_process(main())
