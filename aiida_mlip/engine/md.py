"""Molecular dynamics with a MACE model (or committee) on the compute node.

No AiiDA imports: this runs on remote machines with only torch/mace/ase.
Models are loaded once and reused for every (structure, temperature) run; the
ASE calculator wraps :func:`aiida_mlip.engine.evaluate.evaluate`, so MD and
batch evaluation share exactly one code path.  For committees the dynamics is
driven by the committee-mean energy/forces and the per-frame
``max_force_deviation`` (see ``evaluate.py``) is recorded for active learning.

Run as ``python -m aiida_mlip.engine.md`` or, when copied next to
``evaluate.py`` on a remote machine, as ``python md.py``.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

try:
    from . import evaluate as core
except ImportError:  # executed as a plain script copied next to evaluate.py
    import evaluate as core  # type: ignore[no-redef]

#: Per-run arrays in the MD npz; stored as ``run{k}/{name}``.
MD_RUN_KEYS = (
    'step',
    'times_fs',
    'potential_energy',
    'kinetic_energy',
    'total_energy',
    'temperature',
    'positions',
    'cells',
    'numbers',
    'pbc',
    'stopped_early',
    'reason',
    'n_steps_done',
)
MD_COMMITTEE_KEYS = ('max_force_deviation', 'energy_std')


def _committee_calculator_class():
    """Build the calculator class lazily so importing this module does not import ase."""
    from ase.calculators.calculator import Calculator, all_changes
    from ase.stress import full_3x3_to_voigt_6_stress

    class CommitteeCalculator(Calculator):
        """ASE calculator over already-loaded MACE models; committee mean drives MD.

        Extra results: ``energy_std`` and ``max_force_deviation`` (committees only).
        """

        implemented_properties = ['energy', 'free_energy', 'forces', 'stress']

        def __init__(self, models, compute_stress=True, head=None, **kwargs):
            super().__init__(**kwargs)
            self.models = list(models)
            self.compute_stress = compute_stress
            self.head = head

        def calculate(self, atoms=None, properties=None, system_changes=all_changes):
            super().calculate(atoms, properties, system_changes)
            res = core.evaluate(
                self.models, [self.atoms], batch_size=1, compute_stress=self.compute_stress, head=self.head
            )
            energy = float(res['energies'][:, 0].mean())
            self.results = {
                'energy': energy,
                'free_energy': energy,
                'forces': res['forces'][0].mean(axis=0),
            }
            if res['stresses'] is not None:
                self.results['stress'] = full_3x3_to_voigt_6_stress(res['stresses'][:, 0].mean(axis=0))
            if len(self.models) > 1:
                self.results['energy_std'] = float(res['energy_std'][0])
                self.results['max_force_deviation'] = float(res['max_force_deviation'][0])

    return CommitteeCalculator


def make_calculator(models: Sequence[Any], compute_stress: bool = False, head: Optional[str] = None):
    """ASE calculator around loaded models (MD needs no stress unless NPT is added)."""
    return _committee_calculator_class()(models, compute_stress=compute_stress, head=head)


def min_interatomic_distance(atoms, cutoff: float) -> float:
    """Smallest pair distance below ``cutoff`` (periodic images included), else ``inf``."""
    from ase.neighborlist import neighbor_list

    distances = neighbor_list('d', atoms, cutoff)
    return float(distances.min()) if len(distances) else float('inf')


def run_md(
    model_paths: Sequence[Any],
    atoms,
    temperature_k: float,
    timestep_fs: float,
    n_steps: int,
    interval: int,
    seed: int,
    ensemble: str = 'nvt',
    friction: float = 0.01,
    min_distance: float = 0.3,
    device: str = 'cpu',
    dtype: Optional[str] = None,
    head: Optional[str] = None,
    rng=None,
) -> Dict[str, Any]:
    """Run Langevin NVT (or velocity-Verlet NVE) and return the saved frames as arrays.

    ``model_paths`` are model files or already-loaded models (so several runs reuse
    one load).  ``friction`` is in 1/fs.  Frames are saved at step 0 and every
    ``interval`` steps.  The run stops early -- and records ``stopped_early=True``
    and a ``reason`` instead of raising -- when the energy or forces become
    non-finite or two atoms come closer than ``min_distance`` Å; the offending
    frame is saved as the last one so it can be inspected.  Velocities are drawn
    from Maxwell-Boltzmann with ``np.random.default_rng(seed)`` (or ``rng``), which
    also drives the Langevin noise, so runs are reproducible.
    """
    from ase import units
    from ase.constraints import FixCom
    from ase.md.langevin import Langevin
    from ase.md.velocitydistribution import Stationary
    from ase.md.verlet import VelocityVerlet

    try:  # ase >= 3.29 renamed MaxwellBoltzmannDistribution
        from ase.md.velocitydistribution import thermalize_momenta
    except ImportError:  # pragma: no cover - older ase
        from ase.md.velocitydistribution import MaxwellBoltzmannDistribution as _mb

        def thermalize_momenta(atoms, temperature_K, rng=None):
            _mb(atoms, temperature_K=temperature_K, rng=rng)

    if ensemble not in ('nvt', 'nve'):
        raise ValueError(f"ensemble must be 'nvt' or 'nve', got {ensemble!r}")
    if n_steps < 0 or interval < 1 or timestep_fs <= 0:
        raise ValueError('need n_steps >= 0, interval >= 1 and timestep_fs > 0')

    model_paths = list(model_paths)
    is_path = [isinstance(m, (str, os.PathLike)) for m in model_paths]
    if all(is_path):
        models = core.load_models(model_paths, device=device, dtype=dtype)
    elif not any(is_path):
        models = model_paths
    else:
        raise ValueError('pass either model files or loaded models, not a mix')
    committee = len(models) > 1
    atoms = atoms.copy()
    atoms.calc = None
    core.check_elements(models, [atoms])
    atoms.calc = make_calculator(models, compute_stress=False, head=head)
    if rng is None:
        rng = np.random.default_rng(seed)

    thermalize_momenta(atoms, temperature_K=temperature_k, rng=rng)
    Stationary(atoms)
    atoms.set_constraint(list(atoms.constraints) + [FixCom()])
    if ensemble == 'nvt':
        dyn = Langevin(
            atoms,
            timestep_fs * units.fs,
            temperature_K=temperature_k,
            friction=friction / units.fs,
            fixcm=False,
            rng=rng,
        )
    else:
        dyn = VelocityVerlet(atoms, timestep_fs * units.fs)

    frames: Dict[str, List[Any]] = {k: [] for k in ('step', 'potential_energy', 'kinetic_energy', 'temperature')}
    frames.update(positions=[], cells=[], max_force_deviation=[], energy_std=[])
    state = {'stopped_early': False, 'reason': '', 'step': 0}

    def check(step: int) -> bool:
        """Return False (and record why) if the trajectory is no longer physical."""
        try:
            energy = atoms.get_potential_energy()
            forces = atoms.get_forces()
        except Exception as exc:  # noqa: BLE001 - a blown-up geometry can break the neighbour list
            state.update(stopped_early=True, reason=f'evaluation failed at step {step}: {exc}')
            return False
        if not np.isfinite(energy) or not np.all(np.isfinite(forces)) or not np.all(np.isfinite(atoms.positions)):
            state.update(stopped_early=True, reason=f'non-finite energy/forces/positions at step {step}')
            return False
        if len(atoms) > 1:
            dmin = min_interatomic_distance(atoms, min_distance)
            if dmin < min_distance:
                state.update(
                    stopped_early=True,
                    reason=f'atoms {dmin:.4f} A apart (< {min_distance} A) at step {step}',
                )
                return False
        return True

    def record(step: int) -> None:
        calc_results = atoms.calc.results
        frames['step'].append(step)
        energy = calc_results.get('energy', np.nan)
        frames['potential_energy'].append(energy)
        frames['kinetic_energy'].append(atoms.get_kinetic_energy())
        frames['temperature'].append(atoms.get_temperature())
        frames['positions'].append(atoms.get_positions())
        frames['cells'].append(np.array(atoms.get_cell()))
        frames['max_force_deviation'].append(calc_results.get('max_force_deviation', np.nan))
        frames['energy_std'].append(calc_results.get('energy_std', np.nan))

    ok = check(0)
    record(0)
    step = 0
    if ok:
        for step in range(1, n_steps + 1):
            try:
                dyn.step()
            except Exception as exc:  # noqa: BLE001
                state.update(stopped_early=True, reason=f'integration failed at step {step}: {exc}')
                ok = False
            else:
                ok = check(step)
            if not ok or step % interval == 0:
                record(step)
            if not ok:
                break
    state['step'] = step

    steps = np.asarray(frames['step'], dtype=np.int64)
    potential = np.asarray(frames['potential_energy'], dtype=float)
    kinetic = np.asarray(frames['kinetic_energy'], dtype=float)
    result: Dict[str, Any] = {
        'step': steps,
        'times_fs': steps * float(timestep_fs),
        'potential_energy': potential,
        'kinetic_energy': kinetic,
        'total_energy': potential + kinetic,
        'temperature': np.asarray(frames['temperature'], dtype=float),
        'positions': np.asarray(frames['positions'], dtype=float).reshape(len(steps), len(atoms), 3),
        'cells': np.asarray(frames['cells'], dtype=float).reshape(len(steps), 3, 3),
        'numbers': np.asarray(atoms.numbers, dtype=np.int64),
        'pbc': np.asarray(atoms.pbc, dtype=bool),
        'stopped_early': bool(state['stopped_early']),
        'reason': state['reason'],
        'n_steps_done': int(state['step']),
    }
    if committee:
        result['max_force_deviation'] = np.asarray(frames['max_force_deviation'], dtype=float)
        result['energy_std'] = np.asarray(frames['energy_std'], dtype=float)
    return result


def md_frames_to_atoms(result: Dict[str, Any], info: Optional[Dict[str, Any]] = None) -> list:
    """Saved frames as ase.Atoms (energy and committee deviation in ``info``) for extxyz."""
    from ase import Atoms

    images = []
    for index in range(len(result['step'])):
        atoms = Atoms(
            numbers=result['numbers'],
            positions=result['positions'][index],
            cell=result['cells'][index],
            pbc=result['pbc'],
        )
        atoms.info.update(info or {})
        atoms.info['step'] = int(result['step'][index])
        atoms.info['time_fs'] = float(result['times_fs'][index])
        atoms.info['md_potential_energy'] = float(result['potential_energy'][index])
        atoms.info['md_temperature'] = float(result['temperature'][index])
        if 'max_force_deviation' in result:
            atoms.info['max_force_deviation'] = float(result['max_force_deviation'][index])
        images.append(atoms)
    return images


def _parser() -> argparse.ArgumentParser:
    parser = core.engine_parser(
        'python -m aiida_mlip.engine.md',
        'MD with a MACE model/committee for every (structure frame, temperature) pair.',
        output='md.npz',
    )
    parser.add_argument('--structure', required=True, help='structure file; every frame is a starting point')
    parser.add_argument('--temperature', type=float, nargs='+', required=True, help='one or more temperatures (K)')
    parser.add_argument('--timestep', type=float, default=1.0, help='fs')
    parser.add_argument('--steps', type=int, required=True)
    parser.add_argument('--interval', type=int, default=10, help='save every N steps')
    parser.add_argument('--seed', type=int, default=1)
    parser.add_argument('--ensemble', choices=['nvt', 'nve'], default='nvt')
    parser.add_argument('--friction', type=float, default=0.01, help='Langevin friction (1/fs)')
    parser.add_argument('--min-distance', type=float, default=0.3, help='stop when atoms get closer (A)')
    parser.add_argument('--trajectory', default=None, help='extxyz with all saved frames of all runs')
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """CLI: one model load, one run per (frame, temperature); run k uses seed [seed, k].

    Writes ``run{k}/<key>`` arrays plus ``run_structure_index`` / ``run_temperature``
    to the npz, a JSON summary and optionally an extxyz trajectory.
    Exit codes as in ``evaluate``: 0 ok (also when a run stopped early),
    2 missing element, 3 unreadable model, 4 unreadable structure.
    """
    args = _parser().parse_args(argv)

    def job(models, structures):
        arrays: Dict[str, np.ndarray] = {}
        runs, images = [], []
        pairs = [(s, t) for s in range(len(structures)) for t in args.temperature]
        for k, (s_index, temperature) in enumerate(pairs):
            t_run = time.perf_counter()
            result = run_md(
                models,
                structures[s_index],
                temperature_k=temperature,
                timestep_fs=args.timestep,
                n_steps=args.steps,
                interval=args.interval,
                seed=args.seed,
                ensemble=args.ensemble,
                friction=args.friction,
                min_distance=args.min_distance,
                head=args.head,
                rng=np.random.default_rng([args.seed, k]),
            )
            for key, value in result.items():
                arrays[f'run{k}/{key}'] = np.asarray(value)
            runs.append(
                {
                    'index': k,
                    'structure_index': s_index,
                    'temperature': temperature,
                    'n_frames': int(len(result['step'])),
                    'n_steps_done': result['n_steps_done'],
                    'stopped_early': result['stopped_early'],
                    'reason': result['reason'],
                    'wall_seconds': time.perf_counter() - t_run,
                }
            )
            if args.trajectory:
                images.extend(md_frames_to_atoms(
                    result, {'run': k, 'structure_index': s_index, 'md_target_temperature': temperature}
                ))  # fmt: skip
        arrays['run_structure_index'] = np.array([p[0] for p in pairs], dtype=np.int64)
        arrays['run_temperature'] = np.array([p[1] for p in pairs], dtype=float)

        core.write_npz_atomic(args.output, arrays)
        if args.trajectory:
            import ase.io

            ase.io.write(args.trajectory, images, format='extxyz')
        summary = {
            'n_runs': len(pairs),
            'n_models': len(models),
            'committee': len(models) > 1,
            'ensemble': args.ensemble,
            'timestep_fs': args.timestep,
            'steps': args.steps,
            'interval': args.interval,
            'seed': args.seed,
            'friction_per_fs': args.friction,
            'runs': runs,
            'n_stopped_early': sum(r['stopped_early'] for r in runs),
        }
        return summary, f'{len(pairs)} MD run(s), {summary["n_stopped_early"]} stopped early'

    return core.run_engine(args, args.structure, job)


if __name__ == '__main__':
    core.exit_process(main())
