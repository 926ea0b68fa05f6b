#!/usr/bin/env python
"""Benchmark: the MLIP side of a Si validation (EOS + elastic + phonons) through the workflow vs one bare process.

  (a) ``ValidationWorkChain`` with the DFT side given as ``reference`` (so only the model is computed): three
      property workflows, each sending all of its cells to ONE ``mlip.evaluate`` job, run concurrently;
  (b) the same cells and the same fits in ONE bare Python process (start-up, imports, one model load,
      evaluation, the same analysis functions), timed from the outside like a user would;
  (c) the per-structure-job alternative: one ``mlip.evaluate`` job per cell (a sample is run, the mean is
      extrapolated to all cells; the output says so).

Goals (issue): a/b <= 2 and c/a >= 10. Runs in a throw-away profile under a temporary AIIDA_PATH.

    OMP_NUM_THREADS=1 python benchmarks/validation_overhead.py [--model FILE] [--sample 3] [--repeat 2]
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

from scratch import scratch_folder  # benchmarks/scratch.py

os.environ.setdefault('OMP_NUM_THREADS', '1')
os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')
HERE = pathlib.Path(__file__).resolve().parent

#: The validation settings of both (a) and (b): the `fast` protocol's property settings.
EOS_STRAINS = [-0.06, -0.03, 0.0, 0.03, 0.06]
ELASTIC_MAGNITUDES = [-0.01, 0.01]
SUPERCELL = [2, 2, 2]
DISPLACEMENT = 0.01


def si2():
    from ase.build import bulk

    return bulk('Si', 'diamond', a=5.45)


def bare_validation(model_path: str) -> dict:
    """(b): every cell of the three properties, evaluated in this process with one model load, then fitted."""
    import numpy as np
    from phonopy import Phonopy
    from phonopy.structure.atoms import PhonopyAtoms

    from aiida_mlip.analysis.elastic import fit_elastic_tensor, strain_to_voigt, stress_to_voigt, voigt_strain_matrices
    from aiida_mlip.analysis.eos import EV_PER_A3_TO_GPA, fit_birch_murnaghan, suggest_scan_centre
    from aiida_mlip.calculations.sampling import strained_copies, volume_scaled_copies
    from aiida_mlip.engine.evaluate import evaluate, load_models

    models = load_models([model_path])
    atoms = si2()
    eos_cells = volume_scaled_copies(atoms, EOS_STRAINS)
    strains = [strain for _, _, strain in voigt_strain_matrices(ELASTIC_MAGNITUDES)]
    elastic_cells = [atoms.copy()] + strained_copies(atoms, strains)
    unit = PhonopyAtoms(symbols=atoms.get_chemical_symbols(), cell=atoms.cell[:], scaled_positions=atoms.get_scaled_positions())
    phonon = Phonopy(unit, np.diag(SUPERCELL))
    phonon.generate_displacements(distance=DISPLACEMENT)
    from ase import Atoms

    phonon_cells = [Atoms(s.symbols, cell=s.cell, scaled_positions=s.scaled_positions, pbc=True)
                    for s in [phonon.supercell] + list(phonon.supercells_with_displacements)]
    results = evaluate(models, eos_cells + elastic_cells + phonon_cells, batch_size=8)
    energies, forces, stresses = results['energies'][0], results['forces'], results['stresses'][0]
    n_eos, n_el = len(eos_cells), len(elastic_cells)
    volumes = [c.get_volume() / len(c) for c in eos_cells]
    eos_energies = energies[:n_eos] / len(atoms)
    for _ in range(2):  # the workflow's re-centring: at most twice more when the minimum is not bracketed
        try:
            eos = fit_birch_murnaghan(volumes, eos_energies)
            break
        except ValueError:
            centre = suggest_scan_centre(volumes, eos_energies) * len(atoms)
            centred = volume_scaled_copies(eos_cells[0], [centre / eos_cells[0].get_volume() - 1.0])[0]
            eos_cells = volume_scaled_copies(centred, EOS_STRAINS)
            volumes = [c.get_volume() / len(c) for c in eos_cells]
            eos_energies = evaluate(models, eos_cells, batch_size=8)['energies'][0] / len(atoms)
    else:
        eos = fit_birch_murnaghan(volumes, eos_energies)
    voigt_strains = [strain_to_voigt(np.zeros((3, 3)))] + [strain_to_voigt(s) for s in strains]
    voigt_stresses = [stress_to_voigt(s) * EV_PER_A3_TO_GPA for s in stresses[n_eos:n_eos + n_el]]
    c_matrix = fit_elastic_tensor(voigt_strains, voigt_stresses)
    phonon_forces = [np.asarray(f)[0] for f in forces[n_eos + n_el:]]
    phonon.forces = [f - phonon_forces[0] for f in phonon_forces[1:]]
    phonon.produce_force_constants()
    phonon.auto_band_structure()
    phonon.run_mesh([8, 8, 8])
    phonon.run_total_dos()
    return {'v0': eos['v0'], 'c11': float(c_matrix[0, 0]), 'n_cells': len(eos_cells) + n_el + len(phonon_cells)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--model', type=pathlib.Path, default=None, help='MACE .model file (default: train one)')
    parser.add_argument('--sample', type=int, default=3, help='cells run as separate jobs in (c)')
    parser.add_argument('--repeat', type=int, default=2, help='repetitions of (a) and (b); the best is reported')
    parser.add_argument('--bare', type=pathlib.Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.bare:
        print(json.dumps(bare_validation(str(args.bare))))
        return 0

    with scratch_folder() as root:
        return _benchmark(args, root)


def _benchmark(args, root: pathlib.Path) -> int:
    sys.path.insert(0, str(HERE))
    from evaluate_batching import run_calculation, train_model  # noqa: E402  (the same tiny-model recipe)

    model_path = (args.model or train_model(root / 'model')).resolve()

    from aiida import engine, orm

    from aiida_mlip.data.model import MlipModel
    from aiida_mlip.setup.environment import ensure_localhost, ensure_mlip_codes, ensure_profile
    from aiida_mlip.workflows.validation import ValidationWorkChain

    ensure_profile('bench', broker=None)
    codes = ensure_mlip_codes(ensure_localhost(workdir=str(root / 'scratch')))
    model = MlipModel.from_file(model_path, origin='imported').store()
    structure = orm.StructureData(ase=si2()).store()

    def validation(reference=None):
        builder = ValidationWorkChain.get_builder_from_protocol(codes['evaluate'], model, structure, protocol='fast')
        if reference is not None:
            builder.reference = reference
        start = time.perf_counter()
        results, node = engine.run_get_node(builder)
        return time.perf_counter() - start, results, node

    # The "DFT" reference is irrelevant to the timing: the model's own results stand in for it.
    from aiida_mlip.workflows.validation import PROPERTY_WORKFLOWS, REFERENCE_OUTPUTS

    reference = {}
    for name, workflow in PROPERTY_WORKFLOWS.items():
        builder = workflow.get_builder()
        builder.structure = structure
        builder.mlip = {'code': codes['evaluate'], 'models': {'model': model}}
        for key, value in ValidationWorkChain.get_protocol_inputs('fast').get(name, {}).items():
            builder[key] = orm.List(value) if isinstance(value, list) else (
                orm.Float(value) if isinstance(value, float) else orm.Int(value))
        outputs = engine.run(builder)
        reference.update({port: outputs[output] for port, output in REFERENCE_OUTPUTS[name].items()})

    workflow_times, bare_times = [], []
    for _ in range(args.repeat):
        elapsed, results, node = validation(reference)
        assert node.is_finished_ok, node.exit_message
        workflow_times.append(elapsed)
        start = time.perf_counter()
        output = subprocess.run([sys.executable, __file__, '--bare', str(model_path)], capture_output=True,
                                text=True, check=True)
        bare_times.append(time.perf_counter() - start)
    bare = json.loads(output.stdout.strip().splitlines()[-1])
    n_cells = bare['n_cells']

    sample = {f's{i}': orm.StructureData(ase=si2()) for i in range(args.sample)}
    job_times = [run_calculation(codes['evaluate'], model, {key: value})[1] for key, value in sample.items()]
    per_job = sum(job_times) / len(job_times)

    a, b, c = min(workflow_times), min(bare_times), per_job * n_cells
    print(f'cells evaluated per validation: {n_cells} (EOS {len(EOS_STRAINS)}, elastic '
          f'{1 + 6 * len(ELASTIC_MAGNITUDES)}, phonons {n_cells - len(EOS_STRAINS) - 1 - 6 * len(ELASTIC_MAGNITUDES)})')
    print(f'(a) ValidationWorkChain, MLIP side, 3 jobs concurrently: {a:7.1f} s  (runs: '
          f'{", ".join(f"{t:.1f}" for t in workflow_times)})')
    print(f'(b) one bare Python process (start-up + imports + model load + evaluation + fits): {b:7.1f} s')
    print(f'(c) one job per cell: {per_job:.1f} s per job measured on {len(job_times)} jobs, x {n_cells} cells '
          f'= {c:7.1f} s (extrapolated)')
    print(f'a/b = {a / b:.2f}  (goal <= 2)')
    print(f'c/a = {c / a:.1f}  (goal >= 10)')
    print(f'load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores')
    return 0


if __name__ == '__main__':
    sys.exit(main())
