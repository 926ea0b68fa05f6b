#!/usr/bin/env python
"""Benchmark: DFT labeling through ``DftLabelingWorkChain`` vs the bare pw.x command lines of the same inputs.

For each case the same N structures are
  (a) labeled by ``mlip.labeling`` (one PwBaseWorkChain + PwCalculation per structure, launched together,
      then the dataset calcfunction), timed around ``engine.run``;
  (b) run as bare ``pw.x -in aiida.in > aiida.out`` with the very input files and pseudopotentials of (a),
      copied to fresh folders and launched together as the direct scheduler does (one process each).
The ratio a/b is the AiiDA overhead. Cases: a tiny cell (Si2, 12 Ry, Gamma: pw.x needs well under a second, so
the engine's fixed cost per job dominates), a small realistic cell (rattled Si8, 30 Ry, k spacing 0.3 1/Å) and a
production-setting one (rattled Si8 at the pseudopotential family's recommended cutoffs, as the protocols use them,
k spacing 0.2 1/Å, between the `fast` 0.5 and `balanced` 0.15 protocols). Goal (issue 7): overhead <= 10 % for
realistic cells. (a) and (b) alternate, --repeat times, and the best of each is reported, so that a load change on
a shared machine hits both alike (odd repetitions in reverse order). CPU seconds are printed too: the engine's
own CPU time during (a) (this process) and that of the shell commands it runs (scheduler polls and submissions: its
waited-for children; pw.x runs detached under the direct scheduler, so it is not counted), against the pw.x CPU time
of (b). ``--poll-interval`` sets how often the engine polls the scheduler and the process (default 1 s, as
``aiida-mlip setup`` sets for short jobs): every poll stores the job's scheduler state (SQLite commits), so polling
costs CPU for every second a job runs, on the cores pw.x runs on. Variants of (a), side by side in the same run:
``--compare-poll-interval S`` adds (a'') on a second localhost computer polled every S seconds;
``--compare-login-shell`` adds (a') on one whose transport runs its commands in a login shell (``bash -l -c``,
aiida-core's default, which ``aiida-mlip setup`` used before it set ``use_login_shell=False``): every scheduler
poll then also reads the shell's profile files. ``--pin`` keeps the engine off the cores pw.x runs on, as on a
cluster where the daemon runs on another node: this process (the engine) on the first CPU, every pw.x of (a), (a'),
(a'') and (b) on the others (``taskset`` in the job script, CPU affinity of the bare processes). ``--timeline``
prints when each step of one structure's chain happened (node times, pw.x's own start and end): where the engine's
fixed cost per job goes.

Runs in a throw-away SQLite profile under a temporary AIIDA_PATH (no services needed), pw.x serial:

    OMP_NUM_THREADS=1 python benchmarks/labeling_overhead.py [--tiny 4] [--realistic 2] [--production 0]
        [--poll-interval 1] [--compare-poll-interval 5] [--compare-login-shell] [--pin] [--timeline]
        [--repeat 2]
"""
from __future__ import annotations

import argparse
import os
import pathlib
import re
import resource
import shutil
import subprocess
import sys
import time

from scratch import scratch_folder  # benchmarks/scratch.py

os.environ.setdefault('OMP_NUM_THREADS', '1')
os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')

#: name -> (atoms per cell, cubic, rattle amplitude Å, ecutwfc Ry, ecutrho Ry, k-point spacing 1/Å); cutoffs of
#: None: the family's recommended ones (what get_builder_from_protocol uses)
CASES = {
    'tiny Si2, 12 Ry, Gamma': (2, False, 0.05, 12.0, 48.0, 1.0),
    'realistic Si8 rattled, 30 Ry, k 0.3': (8, True, 0.05, 30.0, 240.0, 0.3),
    'production Si8 rattled, family cutoffs, k 0.2': (8, True, 0.05, None, None, 0.2),
}


def structures(atoms_count: int, cubic: bool, rattle: float, count: int) -> dict:
    from aiida import orm
    from ase.build import bulk

    cells = {}
    for index in range(count):
        atoms = bulk('Si', 'diamond', a=5.43, cubic=cubic)
        atoms.rattle(rattle, seed=index)
        cells[f'si{atoms_count}_{index}'] = orm.StructureData(ase=atoms)
    return cells


def run_labeling(code, family: str, cells: dict, ecutwfc: float | None, ecutrho: float | None, spacing: float):
    """(a): the workchain in this process; (wall s, engine CPU s, CPU s of the shell commands it ran, node)."""
    from aiida import engine, orm
    from aiida_quantumespresso.common.types import ElectronicType

    from aiida_mlip.workflows.labeling import DftLabelingWorkChain

    cutoffs = {} if ecutwfc is None else {'ecutwfc': ecutwfc, 'ecutrho': ecutrho}
    builder = DftLabelingWorkChain.get_builder_from_protocol(
        code, cells, protocol='fast', pseudo_family=family, electronic_type=ElectronicType.INSULATOR,
        overrides={'pw_base': {'kpoints_distance': spacing, 'pw': {'parameters': {'SYSTEM': cutoffs}}}},
    )
    builder.conv_thr_per_atom = orm.Float(1e-8)
    start, cpu, shell_cpu = time.perf_counter(), time.process_time(), children_cpu_seconds()
    _, node = engine.run_get_node(builder)
    return time.perf_counter() - start, time.process_time() - cpu, children_cpu_seconds() - shell_cpu, node


def pin_engine() -> set:
    """Pin this process (the engine: before it starts threads) to its first allowed CPU; the others, for pw.x."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        raise SystemExit(f'--pin needs at least 2 CPUs, this process may use {cpus}')
    os.sched_setaffinity(0, cpus[:1])
    return set(cpus[1:])


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def pw_calculations(node) -> list:
    from aiida import orm

    return [calc for calc in node.called_descendants
            if isinstance(calc, orm.CalcJobNode) and calc.process_type.endswith('quantumespresso.pw')]


def timeline(node) -> list[tuple[str, float]]:
    """Seconds from the start of labeling ``node`` to each step of its first structure: node creation and storage
    times, and pw.x's own start and end (its output file's time, less the wall time it reports)."""
    import datetime

    calc = sorted(pw_calculations(node), key=lambda calc: calc.ctime)[0]
    output = pathlib.Path(calc.outputs.remote_folder.get_remote_path()) / 'aiida.out'
    pw_end = datetime.datetime.fromtimestamp(output.stat().st_mtime, tz=datetime.timezone.utc)
    pw_start = pw_end - datetime.timedelta(seconds=calc.outputs.output_parameters['wall_time_seconds'])
    events = [
        ('PwBaseWorkChain created', calc.caller.ctime), ('PwCalculation created', calc.ctime),
        ('uploaded (remote_folder stored)', calc.outputs.remote_folder.ctime), ('pw.x starts', pw_start),
        ('pw.x ends', pw_end), ('retrieved stored', calc.outputs.retrieved.ctime),
        ('parsed (output_parameters stored)', calc.outputs.output_parameters.ctime),
        ('PwBaseWorkChain ends', calc.caller.mtime), ('dataset stored', node.outputs.dataset.ctime),
        ('labeling ends', node.mtime),
    ]
    return [(label, (time - node.ctime).total_seconds()) for label, time in events]


def pw_wall_seconds(stdout: str) -> float:
    """The wall time pw.x reports for itself (``PWSCF : ... CPU ... WALL``), parsed as aiida-quantumespresso does."""
    from aiida_quantumespresso.parsers.parse_raw.base import convert_qe_time_to_sec

    return convert_qe_time_to_sec(re.search(r'PWSCF\s+:[\s\S]+CPU\s+([\s.\d|s|m|d|h]+)\sWALL', stdout).group(1))


def run_bare(calculations, folder: pathlib.Path, executable: str, cpus: set | None) -> tuple[float, float, float]:
    """(b): copy each job's aiida.in and pseudo/ to a fresh folder; start all pw.x at once (on ``cpus`` if given),
    wait for the last.

    :returns: (wall seconds, pw.x CPU seconds, the longest wall time a pw.x reports for itself)
    """
    folders = []
    for calc in calculations:
        source = pathlib.Path(calc.outputs.remote_folder.get_remote_path())
        target = folder / f'pk{calc.pk}'
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir(parents=True)
        shutil.copy(source / 'aiida.in', target / 'aiida.in')
        shutil.copytree(source / 'pseudo', target / 'pseudo')
        folders.append(target)
    start, cpu = time.perf_counter(), children_cpu_seconds()
    processes = []
    for target in folders:
        with open(target / 'aiida.out', 'w') as output:
            processes.append(subprocess.Popen(
                [executable, '-in', 'aiida.in'], cwd=target, stdout=output, stderr=subprocess.STDOUT,
                preexec_fn=None if cpus is None else lambda: os.sched_setaffinity(0, cpus)))
    codes = [process.wait() for process in processes]
    elapsed, cpu = time.perf_counter() - start, children_cpu_seconds() - cpu
    if any(codes) or not all('JOB DONE' in (target / 'aiida.out').read_text() for target in folders):
        raise RuntimeError(f'a bare pw.x run failed in {folder}')
    own = max(pw_wall_seconds((target / 'aiida.out').read_text()) for target in folders)
    return elapsed, cpu, own


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--tiny', type=int, default=4, help='structures of the tiny case')
    parser.add_argument('--realistic', type=int, default=2, help='structures of the realistic case')
    parser.add_argument('--production', type=int, default=0,
                        help='structures of the production-setting case (pw.x several minutes each; default: skip)')
    parser.add_argument('--poll-interval', type=float, default=None,
                        help='seconds between scheduler and runner polls (default: 1, what `aiida-mlip setup` sets)')
    parser.add_argument('--compare-poll-interval', type=float, default=None, metavar='SECONDS',
                        help="also run (a'') on a computer polled every SECONDS")
    parser.add_argument('--compare-login-shell', action='store_true',
                        help="also run (a') on a computer whose commands run in a login shell (aiida-core's default)")
    parser.add_argument('--pin', action='store_true',
                        help='engine on the first CPU, pw.x on the others (the daemon off the compute cores)')
    parser.add_argument('--timeline', action='store_true',
                        help='print when each step of the first structure happened in the last run of each (a)')
    parser.add_argument('--repeat', type=int, default=2, help='alternating repetitions of (a) and (b); best is shown')
    args = parser.parse_args(argv)
    with scratch_folder() as root:
        return _benchmark(args, root)


def _benchmark(args, root: pathlib.Path) -> int:
    from aiida.manage import get_manager

    from aiida_mlip.setup.environment import ensure_localhost, ensure_profile, ensure_pw_code, find_pw_executable
    from aiida_mlip.setup.pseudos import DEFAULT_PSEUDO_DIRS, install_family, scan_upf_files, select_pseudos

    pw_cpus = pin_engine() if args.pin else None
    ensure_profile('bench', broker=None)
    localhost = ensure_localhost(workdir=str(root / 'scratch'))
    computers = {'(a) mlip.labeling': localhost}
    if args.compare_login_shell:
        computers["(a') login shell"] = ensure_localhost('localhost-login-shell', workdir=str(root / 'scratch-login'))
        computers["(a') login shell"].configure(safe_interval=0, use_login_shell=True)
    if args.poll_interval is not None:  # before the first engine.run, which creates the runner
        get_manager().get_profile().set_option('runner.poll.interval', args.poll_interval)
        for computer in computers.values():
            computer.set_minimum_job_poll_interval(args.poll_interval)
    if args.compare_poll_interval is not None:
        variant = f"(a'') poll {args.compare_poll_interval:g} s"
        computers[variant] = ensure_localhost('localhost-slow-poll', workdir=str(root / 'scratch-slow-poll'))
        computers[variant].set_minimum_job_poll_interval(args.compare_poll_interval)
    if pw_cpus is not None:
        for computer in computers.values():  # the job script moves itself, hence pw.x, onto the pw.x CPUs
            cpu_list = ','.join(map(str, sorted(pw_cpus)))
            computer.set_prepend_text(f'{computer.get_prepend_text()}\ntaskset -pc {cpu_list} $$ > /dev/null')
    codes = {variant: ensure_pw_code(computer) for variant, computer in computers.items()}
    family, _ = install_family('PBE-bench', select_pseudos(
        scan_upf_files([d for d in DEFAULT_PSEUDO_DIRS if d.is_dir()]), 'PBE'), 'PBE')
    polling = localhost.get_minimum_job_poll_interval(), get_manager().get_option('runner.poll.interval')
    print(f'pseudopotential: {family.get_pseudo("Si").filename}; pw.x serial, OMP_NUM_THREADS='
          f'{os.environ["OMP_NUM_THREADS"]}, {os.cpu_count()} cores; polling every {polling[0]} s '
          f'(runner: {polling[1]} s)' + ('' if pw_cpus is None else
                                          f'; engine pinned to CPU {sorted(os.sched_getaffinity(0))}, '
                                          f'pw.x to CPUs {sorted(pw_cpus)}'))
    summary = []
    for (name, (atoms_count, cubic, rattle, ecutwfc, ecutrho, spacing)), count in zip(
            CASES.items(), (args.tiny, args.realistic, args.production)):
        if count <= 0:
            continue
        cells = structures(atoms_count, cubic, rattle, count)
        aiida_runs = {variant: [] for variant in codes}  # per repetition: (wall s, CPU s, shell CPU s, pw.x wall)
        bare_runs, last_labeling = [], {}
        order = [*codes, '(b)']
        for repeat in range(args.repeat):
            for variant in order if repeat % 2 == 0 else order[::-1]:
                if variant == '(b)':
                    bare_runs.append(run_bare(calculations, root / 'bare' / str(repeat), find_pw_executable(),
                                               pw_cpus))
                    print(f'  repetition {repeat + 1}: (b) {bare_runs[-1][0]:.2f} s', flush=True)
                    continue
                elapsed, cpu, shell_cpu, node = run_labeling(
                    codes[variant], family.label, cells, ecutwfc, ecutrho, spacing)
                if not node.is_finished_ok:
                    raise RuntimeError(f'labeling failed: {node.exit_status} {node.exit_message}')
                calculations = pw_calculations(node)
                if len(calculations) != count:  # a PwBaseWorkChain restart would make the comparison unfair
                    raise RuntimeError(f'{len(calculations)} pw.x jobs for {count} structures: restarts happened')
                own = max(calc.outputs.output_parameters['wall_time_seconds'] for calc in calculations)
                aiida_runs[variant].append((elapsed, cpu, shell_cpu, own))
                last_labeling[variant] = node
                print(f'  repetition {repeat + 1}: {variant} {elapsed:.2f} s, pw.x {own:.2f} s', flush=True)
        b, _, own_b = min(bare_runs)
        pw_cpu = min(run[1] for run in bare_runs)
        system = calculations[0].inputs.parameters['SYSTEM']
        print(f'{name}: {count} structures, ecutwfc/ecutrho {system["ecutwfc"]}/{system["ecutrho"]} Ry, '
              f'k-points {calculations[0].inputs.kpoints.get_kpoints_mesh()[0]}')
        print(f'  {"(b) bare pw.x":22s} {b:8.2f} s   (runs {", ".join(f"{run[0]:.2f}" for run in bare_runs)}); '
              f'pw.x reports {own_b:.2f} s for its longest job, CPU {pw_cpu:.2f} s')
        for variant, runs in aiida_runs.items():
            a, _, _, own_a = min(runs)
            engine_cpu, shell_cpu = (min(run[index] for run in runs) for index in (1, 2))
            summary.append((f'{name} {variant}', a / b))
            print(f'  {variant:22s} {a:8.2f} s   (runs {", ".join(f"{run[0]:.2f}" for run in runs)})')
            print(f'      a/b = {a / b:.3f}: overhead {100 * (a / b - 1):+.1f} % '
                  f'({(a - b) / count:.2f} s per structure)')
            print(f'      pw.x reports {own_a:.2f} s for its longest job ({100 * (own_a / own_b - 1):+.1f} % vs bare), '
                  f'the engine outside pw.x {a - own_a:.2f} s')
            print(f'      CPU: engine {engine_cpu:.2f} s + its shell commands {shell_cpu:.2f} s '
                  f'({(engine_cpu + shell_cpu) / count:.2f} s per structure, '
                  f'{100 * (engine_cpu + shell_cpu) / pw_cpu:.1f} % of the pw.x CPU time)')
            if args.timeline:
                print('      timeline of its first structure (s from the labeling start): ' + ', '.join(
                    f'{label} {seconds:.2f}' for label, seconds in timeline(last_labeling[variant])))
    print('summary: ' + '; '.join(f'{name}: a/b {ratio:.3f}' for name, ratio in summary)
          + ' (goal: overhead <= 10 % for realistic cells)')
    print(f'load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores')
    return 0


if __name__ == '__main__':
    sys.exit(main())
