#!/usr/bin/env python
"""Benchmark (a): active learning by committee vs random sampling from the same pool of MD frames.

Question: how many labels does the active-learning selection of ``mlip.active_learning`` need to reach a force
RMSE target on a fixed test set, compared with labeling frames drawn at random from the same pool? Goal: AL needs
at most half the labels of random sampling.

Setup (pool-based, both strategies see the same frames and the same training recipe):

* **Oracle.** ASE's EMT potential for fcc Cu-Au stands in for DFT, so that every pool frame can be labeled in
  milliseconds and the benchmark fits in ~20 minutes on 2 cores; the selection and the training are the project's
  own. (pw.x labels of the ~300 frames needed would take hours on this machine.) The label *counts* compared are
  what DFT would cost.
* **Pool.** Langevin MD with the oracle of 8-atom fcc Cu(1-x)Au(x) cells (x = 0, 1/4, 1/2, 3/4, 1, random
  occupation) at 300/900/1500 K and -8/0/+8 % volume (45 conditions), frames every 20 fs: correlated frames within
  a trajectory, as exploration MD produces them. The **test set** (and a small validation set used by mace for
  checkpoint selection) come from independent trajectories with other seeds under the same 45 conditions; neither
  is counted as labels.
* **Training.** ``mace_run_train`` (mace-torch, the same options mechanism as ``MaceTrainCalculation``): a small
  MACE (16 channels, L=0, r_max 4.5 Å, 2 interactions, float32), energy + forces, ``E0s=average``, the same number of
  optimiser steps (``--steps``) for every training-set size (epochs = steps / batches per epoch).
* **Random.** Uniform random subsets of the pool, nested, at growing sizes; one model (seed 1) per size.
* **Active learning.** The same random seed set, then per iteration: a committee of 3 (seeds 1, 2, 3) trained on
  the labels so far, evaluated on the unlabeled pool frames (``aiida_mlip.engine.evaluate``), the trust window and
  farthest-point sampling of ``aiida_mlip.analysis.selection.select_candidates`` pick up to ``--per-iteration``
  frames, whose labels are revealed. The reported AL error is that of the committee member with seed 1, the same
  recipe as the random models.
* **Labels needed** to reach a target: log-log interpolation of each learning curve (force RMSE on the test set vs
  number of labels). Primary target: the RMSE random sampling reaches with its largest budget.

Run (about 25-30 min on 2 cores shared with other jobs: 23 trainings of 600 steps)::

    OMP_NUM_THREADS=1 python benchmarks/data_efficiency.py [--json out.json] [--window 0.03 2.0] [--steps 600]

With the defaults the AL budget (48 labels) is half the largest random budget (96): AL either reaches the
random-96 error within its budget (ratio <= 0.5, goal met) or the script says it did not.

Everything happens in a temporary folder that is deleted at the end (``--keep`` keeps it).

Part (b), fine-tuning a foundation model vs training from scratch (labels needed for a test force RMSE target;
goal: fine-tuning needs at most 1/5), is described at ``# ==== part (b)`` below. Select the parts with
``--part a|b|all`` (default ``a``); the options of part (b) start with ``--b-``::

    OMP_NUM_THREADS=1 python benchmarks/data_efficiency.py --part b [--b-json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

os.environ.setdefault('OMP_NUM_THREADS', '1')
os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')
REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402

TEMPERATURES = (300.0, 900.0, 1500.0)
STRAINS = (-0.08, 0.0, 0.08)
GOLD_FRACTIONS = (0.0, 0.25, 0.5, 0.75, 1.0)
LATTICE = {'Cu': 3.61, 'Au': 4.08}  # Å; alloys by Vegard's law

MACE_OPTIONS = {
    'model': 'ScaleShiftMACE', 'num_channels': 16, 'max_L': 0, 'r_max': 4.5, 'num_interactions': 2,
    'correlation': 3, 'batch_size': 4, 'valid_batch_size': 16, 'default_dtype': 'float32',
    'energy_weight': 1.0, 'forces_weight': 100.0, 'E0s': 'average', 'loss': 'weighted',
    'plot': False, 'energy_key': 'REF_energy', 'forces_key': 'REF_forces', 'device': 'cpu',
    'error_table': 'PerAtomRMSE', 'atomic_numbers': '[29, 79]',  # both elements even if a small set lacks one
}


# ---- data ---------------------------------------------------------------------------------------------------


def conditions():
    """(gold fraction, temperature, volume strain) of every pool/test trajectory."""
    return [(x, t, s) for x in GOLD_FRACTIONS for t in TEMPERATURES for s in STRAINS]


def run_md(gold_fraction: float, temperature: float, strain: float, n_frames: int, seed: int, every: int = 10,
           equilibrate: int = 50):
    """Langevin MD (2 fs steps) of an 8-atom fcc Cu(1-x)Au(x) cell (random occupation) with EMT; labeled frames."""
    from ase import units
    from ase.build import bulk
    from ase.calculators.emt import EMT
    from ase.md.langevin import Langevin
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution

    rng = np.random.default_rng(seed)
    lattice = (1 - gold_fraction) * LATTICE['Cu'] + gold_fraction * LATTICE['Au']
    atoms = bulk('Cu', 'fcc', a=lattice, cubic=True) * (2, 1, 1)
    n_gold = int(round(gold_fraction * len(atoms)))
    symbols = np.array(['Cu'] * len(atoms), dtype=object)
    symbols[rng.permutation(len(atoms))[:n_gold]] = 'Au'
    atoms.set_chemical_symbols(list(symbols))
    atoms.set_cell(atoms.cell * (1 + strain) ** (1 / 3), scale_atoms=True)
    atoms.calc = EMT()
    MaxwellBoltzmannDistribution(atoms, temperature_K=temperature, rng=rng)
    dyn = Langevin(atoms, 2 * units.fs, temperature_K=temperature, friction=0.02 / units.fs, rng=rng)
    dyn.run(equilibrate)
    frames = []
    for _ in range(n_frames):
        dyn.run(every)
        frame = atoms.copy()
        frame.calc = None
        frame.info = {'REF_energy': float(atoms.get_potential_energy())}
        frame.arrays['REF_forces'] = atoms.get_forces().copy()
        frames.append(frame)
    return frames


def make_sets(per_condition: int, test_per_condition: int, valid_per_condition: int):
    pool, test, valid = [], [], []
    for index, (x, temperature, strain) in enumerate(conditions()):
        pool += run_md(x, temperature, strain, per_condition, seed=100 + index)
        test += run_md(x, temperature, strain, test_per_condition, seed=200 + index, every=25)
        if valid_per_condition:
            valid += run_md(x, temperature, strain, valid_per_condition, seed=300 + index, every=25)
    return pool, test, valid


# ---- training and evaluation ----------------------------------------------------------------------------------


def epochs_for(n_frames: int, steps: int) -> int:
    """Epochs that give about ``steps`` optimiser steps: every training set size gets the same number of updates
    (fixed epochs would under-train the small sets and bias the comparison towards the larger random sets)."""
    per_epoch = max(1, -(-n_frames // MACE_OPTIONS['batch_size']))
    return max(5, -(-steps // per_epoch))


def start_training(workdir: pathlib.Path, name: str, train, valid_file: pathlib.Path, seed: int, steps: int):
    """Start ``mace_run_train`` in its own folder; returns (Popen, model path)."""
    from ase.io import write

    from aiida_mlip.calculations.mace_train import mace_argv

    folder = workdir / name
    folder.mkdir(parents=True, exist_ok=True)
    write(folder / 'train.xyz', train, format='extxyz')
    epochs = epochs_for(len(train), steps)
    options = {**MACE_OPTIONS, 'name': 'model', 'seed': seed, 'max_num_epochs': epochs, 'patience': epochs,
               'eval_interval': max(1, epochs // 10), 'scheduler_patience': max(5, epochs // 10),
               'train_file': 'train.xyz', 'valid_file': str(valid_file)}
    argv = [sys.executable, '-m', 'mace.cli.run_train', *mace_argv(options)]
    log = open(folder / 'mace.out', 'w')  # noqa: SIM115
    process = subprocess.Popen(argv, cwd=folder, stdout=log, stderr=subprocess.STDOUT,
                               env={**os.environ, 'OMP_NUM_THREADS': '1'})
    return process, folder / 'model.model'


def train_many(jobs, workdir, valid_file, steps, parallel=2):
    """Train ``jobs`` [(name, frames, seed)] with at most ``parallel`` concurrent processes; {name: model path}."""
    pending, running, done = list(jobs), [], {}
    while pending or running:
        while pending and len(running) < parallel:
            name, frames, seed = pending.pop(0)
            process, path = start_training(workdir, name, frames, valid_file, seed, steps)
            running.append((name, process, path))
        time.sleep(0.5)
        for entry in list(running):
            name, process, path = entry
            if process.poll() is not None:
                running.remove(entry)
                if process.returncode != 0 or not path.exists():
                    tail = (path.parent / 'mace.out').read_text()[-2000:]
                    raise RuntimeError(f'training {name} failed ({process.returncode}):\n{tail}')
                done[name] = path
    return done


def predict(model_paths, frames):
    from aiida_mlip.engine.evaluate import evaluate, load_models

    models = load_models([str(p) for p in model_paths])
    return evaluate(models, frames, batch_size=16, compute_stress=False)


def force_rmse_mev(model_path, frames) -> float:
    result = predict([model_path], frames)
    predicted = np.concatenate([f[0] for f in result['forces']])
    reference = np.concatenate([frame.arrays['REF_forces'] for frame in frames])
    return float(np.sqrt(np.mean((predicted - reference) ** 2)) * 1000)


def labels_needed(sizes, rmses, target):
    """Smallest label count at which the learning curve reaches ``target`` (log-log interpolation), or None."""
    for index, (size, rmse) in enumerate(zip(sizes, rmses)):
        if rmse <= target:
            if index == 0:
                return float(size)
            s0, s1, r0, r1 = sizes[index - 1], size, rmses[index - 1], rmse
            if r0 == r1:
                return float(s1)
            fraction = (np.log(r0) - np.log(target)) / (np.log(r0) - np.log(r1))
            return float(np.exp(np.log(s0) + fraction * (np.log(s1) - np.log(s0))))
    return None


# ---- the two strategies -----------------------------------------------------------------------------------------


def random_curve(pool, test, sizes, seed_indices, rng, workdir, valid_file, steps):
    remaining = [i for i in range(len(pool)) if i not in set(seed_indices)]
    order = list(seed_indices) + list(rng.permutation(remaining))
    jobs = [(f'random_{size:03d}', [pool[i] for i in order[:size]], 1) for size in sizes]
    paths = train_many(jobs, workdir, valid_file, steps)
    return [force_rmse_mev(paths[f'random_{size:03d}'], test) for size in sizes]


def active_learning_curve(pool, test, seed_indices, per_iteration, max_labels, window, workdir, valid_file, steps,
                          seed):
    from aiida_mlip.analysis.selection import frame_descriptors, select_candidates

    labeled = list(seed_indices)
    descriptors = frame_descriptors([(a.numbers, a.positions, a.cell.array, a.pbc) for a in pool])
    sizes, rmses, log = [], [], []
    iteration = 0
    while True:
        iteration += 1
        jobs = [(f'al_{iteration:02d}_m{m}', [pool[i] for i in labeled], 1 + m) for m in range(3)]
        paths = train_many(jobs, workdir, valid_file, steps)
        member0 = paths[f'al_{iteration:02d}_m0']
        sizes.append(len(labeled))
        rmses.append(force_rmse_mev(member0, test))
        unlabeled = [i for i in range(len(pool)) if i not in set(labeled)]
        entry = {'iteration': iteration, 'labels': len(labeled), 'test_force_rmse_mev': rmses[-1]}
        if len(labeled) >= max_labels or not unlabeled:
            log.append(entry)
            break
        committee = predict([paths[f'al_{iteration:02d}_m{m}'] for m in range(3)], [pool[i] for i in unlabeled])
        deviation = committee['max_force_deviation']
        result = select_candidates(deviation, descriptors[unlabeled], window[0], window[1],
                                   min(per_iteration, max_labels - len(labeled)), seed + iteration)
        entry.update({'counts': result['counts'], 'candidate_fraction': result['candidate_fraction'],
                      'deviation_median': float(np.median(deviation)), 'deviation_max': float(np.max(deviation)),
                      'n_selected': len(result['selected'])})
        log.append(entry)
        print(f'  AL iteration {iteration}: {len(labeled)} labels, test force RMSE {rmses[-1]:.1f} meV/Å, '
              f'window counts {result["counts"]}, deviation median {entry["deviation_median"]:.3f} eV/Å',
              flush=True)
        if not result['selected']:
            entry['stopped'] = 'no candidate in the trust window'
            break
        labeled += [unlabeled[i] for i in result['selected']]
    return sizes, rmses, log


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--pool-per-condition', type=int, default=8)
    parser.add_argument('--test-per-condition', type=int, default=3)
    parser.add_argument('--valid-per-condition', type=int, default=1)
    parser.add_argument('--seed-labels', type=int, default=8)
    parser.add_argument('--per-iteration', type=int, default=8)
    parser.add_argument('--max-al-labels', type=int, default=48)
    parser.add_argument('--random-sizes', type=int, nargs='+', default=[8, 16, 32, 64, 96])
    parser.add_argument('--window', type=float, nargs=2, default=[0.03, 2.0],
                        help='trust window [lo, hi] eV/Å (lo: the 10-30 meV/Å of a good model, DOMAIN.md)')
    parser.add_argument('--steps', type=int, default=600, help='optimiser steps per training')
    parser.add_argument('--seed', type=int, default=1)
    parser.add_argument('--json', type=pathlib.Path)
    parser.add_argument('--keep', action='store_true')
    parser.add_argument('--skip-al', action='store_true', help='random learning curve only (for pilots)')
    args = parser.parse_args(argv)

    workdir = pathlib.Path(tempfile.mkdtemp(prefix='data_efficiency_'))
    start = time.perf_counter()
    try:
        from ase.io import write

        pool, test, valid = make_sets(args.pool_per_condition, args.test_per_condition, args.valid_per_condition)
        valid_file = workdir / 'valid.xyz'
        write(valid_file, valid, format='extxyz')
        print(f'pool {len(pool)} frames, test {len(test)}, valid {len(valid)} (EMT Cu-Au, 8 atoms, '
              f'{len(conditions())} conditions); data in {time.perf_counter() - start:.0f} s',
              flush=True)
        rng = np.random.default_rng(args.seed)
        seed_indices = [int(i) for i in rng.choice(len(pool), args.seed_labels, replace=False)]

        t0 = time.perf_counter()
        random_rmse = random_curve(pool, test, args.random_sizes, seed_indices, rng, workdir, valid_file, args.steps)
        random_seconds = time.perf_counter() - t0
        for size, rmse in zip(args.random_sizes, random_rmse):
            print(f'  random {size:4d} labels: test force RMSE {rmse:.1f} meV/Å', flush=True)

        if args.skip_al:
            return 0
        t0 = time.perf_counter()
        al_sizes, al_rmse, al_log = active_learning_curve(
            pool, test, seed_indices, args.per_iteration, args.max_al_labels, args.window, workdir, valid_file,
            args.steps, args.seed)
        al_seconds = time.perf_counter() - t0

        targets = {f'random@{size}': rmse for size, rmse in zip(args.random_sizes, random_rmse)}
        comparison = {}
        for name, target in targets.items():
            needed_random = labels_needed(args.random_sizes, random_rmse, target)
            needed_al = labels_needed(al_sizes, al_rmse, target)
            comparison[name] = {
                'target_mev_per_a': target, 'labels_random': needed_random, 'labels_al': needed_al,
                'ratio_al_over_random': None if needed_al is None or not needed_random else needed_al / needed_random,
            }
        primary = f'random@{args.random_sizes[-1]}'
        result = {
            'setup': {'oracle': 'ASE EMT (Cu-Au), stand-in for DFT', 'cell_atoms': 8,
                      'gold_fractions': GOLD_FRACTIONS, 'temperatures': TEMPERATURES, 'volume_strains': STRAINS,
                      'pool': len(pool), 'test': len(test), 'valid': len(valid),
                      'seed_labels': args.seed_labels, 'per_iteration': args.per_iteration, 'window': args.window,
                      'steps': args.steps, 'mace': MACE_OPTIONS, 'committee': 3},
            'random': {'sizes': args.random_sizes, 'test_force_rmse_mev': random_rmse, 'seconds': random_seconds},
            'active_learning': {'sizes': al_sizes, 'test_force_rmse_mev': al_rmse, 'log': al_log,
                                'seconds': al_seconds},
            'comparison': comparison,
            'primary_target': primary,
            'wall_seconds': time.perf_counter() - start,
        }
        print('\nlabels needed to reach the test force RMSE that random sampling reaches with N labels:')
        for name, entry in comparison.items():
            ratio = entry['ratio_al_over_random']
            shown_al = 'not reached' if entry['labels_al'] is None else f'{entry["labels_al"]:.0f}'
            print(f'  {name:12s} target {entry["target_mev_per_a"]:6.1f} meV/Å: random {entry["labels_random"]:.0f}, '
                  f'AL {shown_al}, ratio AL/random {"-" if ratio is None else f"{ratio:.2f}"}')
        ratio = comparison[primary]['ratio_al_over_random']
        verdict = 'not reached by AL within its budget' if ratio is None else (
            f'{ratio:.2f} ({"met" if ratio <= 0.5 else "NOT met"}: goal <= 0.5)')
        print(f'\nprimary ({primary}): ratio AL/random = {verdict}')
        print(f'wall time {result["wall_seconds"]:.0f} s (random {random_seconds:.0f} s, AL {al_seconds:.0f} s)')
        if args.json:
            args.json.write_text(json.dumps(result, indent=1, default=float))
        return 0
    finally:
        if args.keep:
            print(f'kept {workdir}')
        else:
            shutil.rmtree(workdir, ignore_errors=True)


# ==== part (b): fine-tuning a foundation vs training from scratch ===============================================
# Question: how many labels does fine-tuning a foundation model need to reach a force RMSE target on a fixed test
# set, compared with training the same architecture from scratch? Goal (DOMAIN.md: ~200 vs ~2500 labels, an order
# of magnitude): fine-tuning needs at most 1/5 of the labels.
#
# * Oracle ("DFT") of the target: ASE's EMT for fcc Cu, the same 9 MD conditions as part (a).
# * Foundation: a MACE model (same architecture as the target models) trained on ~500 frames of 7 fcc metals and
#   4 binary alloys labeled by a *shifted* EMT (Wigner-Seitz radii +1.5 %, V0 +15 %, E0 +0.05 eV for every metal):
#   a different "functional", the way MACE-MP (PBE/VASP) differs from a user's QE labels. It has seen Cu, but not
#   the target's Cu.
# * Fine-tuning: mace_run_train with --foundation_model (naive, --multiheads_finetuning=False, E0s=estimated), the
#   options mlip.finetune uses for a multi-element foundation. From scratch: the same options without foundation,
#   E0s=average. Both get the same label subsets (nested, one random order) and the same budget of optimiser steps.
# * Labels needed for a target: log-log interpolation of the learning curves (as in part (a)); a curve reaches a
#   target at the first size at or below it. Primary target: the best test force RMSE of the from-scratch curve;
#   every from-scratch point is reported as a target too.

B_METALS = ('Al', 'Cu', 'Ag', 'Au', 'Ni', 'Pd', 'Pt')
B_ALLOYS = (('Cu', 'Ni'), ('Cu', 'Ag'), ('Ag', 'Au'), ('Pd', 'Pt'))
B_TEMPERATURES = (300.0, 800.0, 1300.0)
B_STRAINS = (-0.06, 0.0, 0.06)
#: Architecture and training options shared by foundation, fine-tuned and from-scratch models.
B_MACE = {
    'model': 'ScaleShiftMACE', 'num_channels': 16, 'max_L': 0, 'r_max': 4.5, 'num_interactions': 2,
    'correlation': 3, 'valid_batch_size': 16, 'default_dtype': 'float32', 'energy_weight': 1.0,
    'forces_weight': 100.0, 'loss': 'weighted', 'eval_interval': 10, 'plot': False, 'energy_key': 'REF_energy',
    'forces_key': 'REF_forces', 'device': 'cpu', 'error_table': 'PerAtomRMSE',
}
#: Options the foundation fixes when fine-tuning (as aiida_mlip.workflows.finetune.FIXED_BY_FOUNDATION).
B_ARCHITECTURE = ('model', 'num_channels', 'max_L', 'r_max', 'num_interactions', 'correlation')


class _ShiftedEmt:
    """Context manager: EMT with every metal's s0 x 1.015, V0 x 1.15, E0 + 0.05 eV (the foundation's oracle)."""

    def __enter__(self):
        from ase.calculators import emt

        self.saved = dict(emt.parameters)
        for symbol in B_METALS:
            e0, s0, v0, *rest = self.saved[symbol]
            emt.parameters[symbol] = (e0 + 0.05, s0 * 1.015, v0 * 1.15, *rest)
        return self

    def __exit__(self, *_):
        from ase.calculators import emt

        emt.parameters.clear()
        emt.parameters.update(self.saved)


def b_md_frames(symbols, temperature, strain, n_frames, seed, every=10, equilibrate=50):
    """Langevin MD (2 fs) of an 8-atom fcc cell (random occupation for alloys) with the EMT in effect."""
    from ase import units
    from ase.build import bulk
    from ase.calculators.emt import EMT
    from ase.data import atomic_numbers, reference_states
    from ase.md.langevin import Langevin
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution

    rng = np.random.default_rng(seed)
    lattice = float(np.mean([reference_states[atomic_numbers[s]]['a'] for s in symbols]))
    atoms = bulk(symbols[0], 'fcc', a=lattice, cubic=True) * (2, 1, 1)
    if len(symbols) > 1:
        atoms.symbols = [symbols[int(i)] for i in rng.permutation(np.arange(len(atoms)) % len(symbols))]
    atoms.set_cell(atoms.cell * (1 + strain) ** (1 / 3), scale_atoms=True)
    atoms.calc = EMT()
    MaxwellBoltzmannDistribution(atoms, temperature_K=temperature, rng=rng)
    dyn = Langevin(atoms, 2 * units.fs, temperature_K=temperature, friction=0.02 / units.fs, rng=rng)
    dyn.run(equilibrate)
    frames = []
    for _ in range(n_frames):
        dyn.run(every)
        frame = atoms.copy()
        frame.calc = None
        frame.info = {'REF_energy': float(atoms.get_potential_energy())}
        frame.arrays['REF_forces'] = atoms.get_forces().copy()
        frames.append(frame)
    return frames


def b_foundation_data(per_condition: int, seed: int):
    """(train, valid) of the foundation: 7 metals and 4 alloys x 3 volumes x 2 temperatures, shifted EMT."""
    train, valid = [], []
    systems = [(m,) for m in B_METALS] + list(B_ALLOYS)
    with _ShiftedEmt():
        for index, symbols in enumerate(systems):
            for position, (temperature, strain) in enumerate((t, s) for t in (300.0, 1000.0) for s in B_STRAINS):
                count = per_condition if len(symbols) == 1 else max(2, per_condition // 2)
                frames = b_md_frames(symbols, temperature, strain, count + 1, seed=seed + 100 * index + position)
                train += frames[:-1]
                valid.append(frames[-1])
    return train, valid


def b_target_data(per_condition: int, test_per_condition: int, valid_per_condition: int, seed: int):
    """(pool, test, valid) of the target: Cu with the true EMT at 3 temperatures x 3 volumes."""
    pool, test, valid = [], [], []
    for index, (temperature, strain) in enumerate((t, s) for t in B_TEMPERATURES for s in B_STRAINS):
        pool += b_md_frames(('Cu',), temperature, strain, per_condition, seed=seed + 1000 + index)
        test += b_md_frames(('Cu',), temperature, strain, test_per_condition, seed=seed + 2000 + index, every=25)
        valid += b_md_frames(('Cu',), temperature, strain, valid_per_condition, seed=seed + 3000 + index, every=25)
    return pool, test, valid


def b_epochs(n_frames: int, batch_size: int, steps: int) -> int:
    """Epochs giving about ``steps`` optimiser steps (20 ... 400 epochs)."""
    import math

    return int(np.clip(math.ceil(steps * batch_size / max(n_frames, 1)), 20, 400))


def b_train_many(jobs, workdir: pathlib.Path, parallel: int = 2) -> dict:
    """Run ``jobs`` [(name, train frames, valid frames, options)] with mace_run_train, ``parallel`` at a time."""
    from ase.io import write

    from aiida_mlip.calculations.mace_train import mace_argv

    pending, running, done = list(jobs), [], {}
    while pending or running:
        while pending and len(running) < parallel:
            name, train, valid, options = pending.pop(0)
            folder = workdir / name
            folder.mkdir(parents=True, exist_ok=True)
            write(folder / 'train.xyz', train, format='extxyz')
            write(folder / 'valid.xyz', valid, format='extxyz')
            arguments = {**options, 'name': 'model', 'train_file': 'train.xyz', 'valid_file': 'valid.xyz'}
            log = open(folder / 'mace.out', 'w')  # noqa: SIM115
            process = subprocess.Popen([sys.executable, '-m', 'mace.cli.run_train', *mace_argv(arguments)],
                                       cwd=folder, stdout=log, stderr=subprocess.STDOUT,
                                       env={**os.environ, 'OMP_NUM_THREADS': '1'})
            running.append((name, process, folder / 'model.model', time.perf_counter()))
        time.sleep(0.5)
        for entry in list(running):
            name, process, path, started = entry
            if process.poll() is None:
                continue
            running.remove(entry)
            if process.returncode != 0 or not path.exists():
                tail = (path.parent / 'mace.out').read_text()[-3000:]
                raise RuntimeError(f'training {name} failed ({process.returncode}):\n{tail}')
            done[name] = path
            print(f'    trained {name} in {time.perf_counter() - started:.0f} s', flush=True)
    return done


def b_compare(finetune_sizes, finetune, scratch_sizes, scratch) -> dict:
    """Labels each strategy needs for each target: the from-scratch RMSE at each of its sizes, and its best one."""
    targets = {f'scratch@{size}': rmse for size, rmse in zip(scratch_sizes, scratch)}
    targets['scratch best'] = min(scratch)
    comparison = {}
    for name, target in targets.items():
        needed_scratch = labels_needed(scratch_sizes, scratch, target)
        needed_finetune = labels_needed(finetune_sizes, finetune, target)
        comparison[name] = {
            'target_mev_per_a': target, 'labels_scratch': needed_scratch, 'labels_finetune': needed_finetune,
            'ratio_finetune_over_scratch': None if needed_finetune is None or not needed_scratch
            else needed_finetune / needed_scratch,
            # reached at the smallest fine-tuning size: the true count may be lower, the ratio is an upper bound
            'ratio_is_upper_bound': needed_finetune is not None and needed_finetune <= finetune_sizes[0],
        }
    return comparison


def part_b(argv=None) -> int:
    """Fine-tuning vs from scratch: labels needed for a test force RMSE target (prints the ratio)."""
    parser = argparse.ArgumentParser(prog='data_efficiency.py --part b', description=part_b.__doc__)
    parser.add_argument('--b-finetune-sizes', type=int, nargs='+', default=[2, 4, 8, 16, 32, 64])
    parser.add_argument('--b-scratch-sizes', type=int, nargs='+', default=[8, 16, 32, 64, 128, 256])
    parser.add_argument('--b-pool-per-condition', type=int, default=30)
    parser.add_argument('--b-test-per-condition', type=int, default=15)
    parser.add_argument('--b-foundation-per-condition', type=int, default=8)
    parser.add_argument('--b-foundation-epochs', type=int, default=60)
    parser.add_argument('--b-steps', type=int, default=600, help='optimiser steps per model (epochs adapt)')
    parser.add_argument('--b-seed', type=int, default=1)
    parser.add_argument('--b-json', type=pathlib.Path)
    parser.add_argument('--b-keep', action='store_true')
    args = parser.parse_args(argv)

    workdir = pathlib.Path(tempfile.mkdtemp(prefix='data_efficiency_b_'))
    start = time.perf_counter()
    try:
        print(f'part (b): fine-tuning vs from scratch; load average {os.getloadavg()[0]:.1f}', flush=True)
        foundation_train, foundation_valid = b_foundation_data(args.b_foundation_per_condition, args.b_seed)
        pool, test, valid = b_target_data(args.b_pool_per_condition, args.b_test_per_condition, 2, args.b_seed)
        print(f'  foundation data {len(foundation_train)} frames ({len(B_METALS)} metals, {len(B_ALLOYS)} alloys, '
              f'shifted EMT); target pool {len(pool)}, test {len(test)}, valid {len(valid)} (true EMT Cu); '
              f'{time.perf_counter() - start:.0f} s', flush=True)

        t0 = time.perf_counter()
        foundation = b_train_many([('foundation', foundation_train, foundation_valid, {
            **B_MACE, 'batch_size': 8, 'max_num_epochs': args.b_foundation_epochs, 'patience': args.b_foundation_epochs,
            'E0s': 'average', 'seed': args.b_seed})], workdir)['foundation']
        foundation_seconds = time.perf_counter() - t0
        zero_shot = force_rmse_mev(foundation, test)
        print(f'  foundation trained in {foundation_seconds:.0f} s; zero-shot test force RMSE on true-EMT Cu '
              f'{zero_shot:.1f} meV/Å', flush=True)

        order = [int(i) for i in np.random.default_rng(args.b_seed).permutation(len(pool))]
        jobs = []
        for size in args.b_finetune_sizes:
            batch = min(4, size)
            options = {key: value for key, value in B_MACE.items() if key not in B_ARCHITECTURE}
            options.update({'batch_size': batch, 'max_num_epochs': b_epochs(size, batch, args.b_steps),
                            'E0s': 'estimated', 'foundation_model': str(foundation),
                            'multiheads_finetuning': False, 'seed': args.b_seed})
            jobs.append((f'finetune_{size:03d}', [pool[i] for i in order[:size]], valid, options))
        for size in args.b_scratch_sizes:
            batch = min(4, size)
            options = {**B_MACE, 'batch_size': batch, 'max_num_epochs': b_epochs(size, batch, args.b_steps),
                       'E0s': 'average', 'seed': args.b_seed}
            jobs.append((f'scratch_{size:03d}', [pool[i] for i in order[:size]], valid, options))
        for _, _, _, options in jobs:
            options['patience'] = options['max_num_epochs']
        t0 = time.perf_counter()
        paths = b_train_many(jobs, workdir)
        training_seconds = time.perf_counter() - t0
        finetune = [force_rmse_mev(paths[f'finetune_{s:03d}'], test) for s in args.b_finetune_sizes]
        scratch = [force_rmse_mev(paths[f'scratch_{s:03d}'], test) for s in args.b_scratch_sizes]
        print('\n  labels  fine-tuned  from scratch   (test force RMSE, meV/Å)')
        for size in sorted(set(args.b_finetune_sizes) | set(args.b_scratch_sizes)):
            shown = []
            for sizes, curve in ((args.b_finetune_sizes, finetune), (args.b_scratch_sizes, scratch)):
                shown.append(f'{curve[sizes.index(size)]:10.1f}' if size in sizes else ' ' * 10)
            print(f'  {size:6d}  {shown[0]}    {shown[1]}')

        comparison = b_compare(args.b_finetune_sizes, finetune, args.b_scratch_sizes, scratch)
        print('\n  labels needed to reach the test force RMSE that training from scratch reaches with N labels:')
        for name, entry in comparison.items():
            ratio = entry['ratio_finetune_over_scratch']
            shown = 'not reached' if entry['labels_finetune'] is None else f'{entry["labels_finetune"]:.1f}'
            bound = '<= ' if entry['ratio_is_upper_bound'] else ''
            print(f'    {name:12s} target {entry["target_mev_per_a"]:6.1f} meV/Å: '
                  f'scratch {entry["labels_scratch"]:.0f}, fine-tune {bound}{shown}, '
                  f'ratio {"-" if ratio is None else f"{bound}{ratio:.3f}"}')
        ratio = comparison['scratch best']['ratio_finetune_over_scratch']
        bound = '<= ' if comparison['scratch best']['ratio_is_upper_bound'] else ''
        verdict = 'not reached by fine-tuning within its budget' if ratio is None else (
            f'{bound}{ratio:.3f} ({"met" if ratio <= 0.2 else "NOT met" if not bound else "not resolved"}: '
            'goal <= 1/5)')
        print(f'\n  primary (best from-scratch RMSE): labels fine-tune / from scratch = {verdict}')
        if any(later > earlier * 1.1 for earlier, later in zip(scratch, scratch[1:])):
            print('  caution: the from-scratch curve is not monotonic (>10 % rises): single-seed noise; compare '
                  'several targets, not one ratio')
        wall = time.perf_counter() - start
        print(f'  wall time {wall:.0f} s (foundation {foundation_seconds:.0f} s, {len(jobs)} trainings '
              f'{training_seconds:.0f} s); load average {os.getloadavg()[0]:.1f}')
        if args.b_json:
            args.b_json.write_text(json.dumps({
                'setup': {'oracle_target': 'ASE EMT Cu', 'oracle_foundation': 'EMT, s0 x1.015, V0 x1.15, E0 +0.05 eV',
                          'foundation_frames': len(foundation_train), 'pool': len(pool), 'test': len(test),
                          'mace': B_MACE, 'steps': args.b_steps},
                'zero_shot_mev_per_a': zero_shot,
                'finetune': {'sizes': args.b_finetune_sizes, 'test_force_rmse_mev': finetune},
                'scratch': {'sizes': args.b_scratch_sizes, 'test_force_rmse_mev': scratch},
                'comparison': comparison, 'primary_target': 'scratch best', 'wall_seconds': wall,
            }, indent=1, default=float))
        return 0
    finally:
        if args.b_keep:
            print(f'kept {workdir}')
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def main_with_parts(argv=None) -> int:
    """``--part a`` (active learning vs random, the default), ``b`` (fine-tuning vs from scratch) or ``all``.

    Options of part (b) start with ``--b-``; the others go to part (a).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    selector = argparse.ArgumentParser(add_help=False)
    selector.add_argument('--part', choices=('a', 'b', 'all'), default='a')
    known, rest = selector.parse_known_args(argv)
    if '-h' in rest or '--help' in rest:
        print('--part {a,b,all}: a = active learning vs random (default), b = fine-tuning vs from scratch\n')
        for function in (main, part_b):
            try:
                function(['--help'])
            except SystemExit:
                pass
        return 0
    a_argv, b_argv, in_b = [], [], False
    for item in rest:
        if item.startswith('--'):
            in_b = item.startswith('--b-')
        (b_argv if in_b else a_argv).append(item)
    status = 0
    if known.part in ('a', 'all'):
        status = main(a_argv) or status
    if known.part in ('b', 'all'):
        status = part_b(b_argv) or status
    return status


if __name__ == '__main__':
    sys.exit(main_with_parts())
