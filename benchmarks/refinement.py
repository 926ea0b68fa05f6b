#!/usr/bin/env python
"""Issue 13's benchmark: DFT labels to PASSED, validation-driven refinement vs one-shot random sampling.

(a) **refinement**: a finished refinement campaign (``aiida-mlip campaign run workflows/si_refinement.yaml``): its
    seed labels plus the targeted labels of every iteration, and whether and when it passed.
(b) **one-shot random**: the same seed labels plus as many new cells as (a) targeted, drawn at random from the
    campaign's sampling space *before any training* (no model feedback), labeled with the same pw.x settings,
    trained ONCE with the same training inputs and validated against the same DFT reference (reused: no pw.x
    for the validation).

Goal (fixed before the run): (a) passes with at most 1/2 of the labels (b) needs, or (b) does not pass at all at
(a)'s count. The script prints the ratio, or the bound when (b) does not pass. One seed per run (``--seed``);
replicates are separate runs.

The sampling space of (b), from workflows/si_refinement.yaml's sampling and the refinement's target kinds, each
new cell one of four kinds with equal probability: a volume change uniform in [-0.09, 0.09]; a strain in a
random Voigt direction with norm uniform in [0.005, 0.015]; the validated (primitive) cell rattled by the
campaign's 0.05 Å; the conventional cell rattled by 0.05 Å.

Run on the campaign's profile (the machine is shared: one run at a time)::

    AIIDA_PATH=$PWD/.aiida OMP_NUM_THREADS=1 .venv/bin/python benchmarks/refinement.py --campaign PK --seed 1
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np

#: The four kinds of random cells of (b) (see the module docstring).
KINDS = ('volume', 'strain', 'rattle_primitive', 'rattle_conventional')
VOLUME_RANGE = 0.09
STRAIN_NORMS = (0.005, 0.015)
RATTLE_AMPLITUDE = 0.05


def random_plan(count: int, seed: int) -> list[dict]:
    """``count`` random cell recipes of the sampling space, fixed by ``seed`` alone (no model involved)."""
    rng = np.random.default_rng(seed)
    plan = []
    for _ in range(count):
        kind = KINDS[int(rng.integers(len(KINDS)))]
        if kind == 'volume':
            plan.append({'kind': kind, 'volume': float(rng.uniform(-VOLUME_RANGE, VOLUME_RANGE))})
        elif kind == 'strain':
            direction = rng.normal(size=6)
            plan.append({'kind': kind, 'strain': (direction / np.linalg.norm(direction)
                                                  * rng.uniform(*STRAIN_NORMS)).tolist()})
        else:
            plan.append({'kind': kind, 'seed': int(rng.integers(2**31))})
    return plan


def random_cells(structure, plan):
    """The cells of ``plan`` made by the pipeline's own sampling calcfunctions (every cell has a creator)."""
    from aiida import orm

    from aiida_mlip.calculations.refinement import conventional_cell
    from aiida_mlip.calculations.sampling import rattle_structure, scale_volume, strain_structure

    conventional = orm.StructureData(ase=conventional_cell(structure.get_ase())).store()
    cells, config_types = {}, {}
    for index, recipe in enumerate(plan):
        key = f'random_{index:03d}'
        if recipe['kind'] == 'volume':
            cell = scale_volume(structure, orm.List([recipe['volume']]))['structure_000']
        elif recipe['kind'] == 'strain':
            cell = strain_structure(structure, orm.List([recipe['strain']]))['structure_000']
        else:
            source = structure if recipe['kind'] == 'rattle_primitive' else conventional
            cell = rattle_structure(source, orm.Float(RATTLE_AMPLITUDE), orm.Int(1),
                                    orm.Int(recipe['seed']))['structure_000']
        cells[key], config_types[key] = cell, f'random_{recipe["kind"]}'
    return cells, config_types


def refinement_of(campaign):
    """The RefinementWorkChain called by the campaign."""
    found = [node for node in campaign.called_descendants if node.process_label == 'RefinementWorkChain']
    if not found:
        raise SystemExit(f'{campaign.process_label}<{campaign.pk}> ran no refinement: give a refinement campaign')
    return found[0]


def called(node, label: str):
    """The process ``node`` called with link label ``label``."""
    for link in node.base.links.get_outgoing().all():
        if link.link_label == label:
            return link.node
    raise SystemExit(f'{node.process_label}<{node.pk}> has no call `{label}`')


def run_one_shot(refinement, count: int, seed: int) -> dict:
    """(b): label ``count`` random cells, merge with the seed, train once, validate with the reused reference."""
    from aiida import engine, orm

    from aiida_mlip.calculations.datasets import merge_datasets

    summary = refinement.outputs.summary.get_dict()
    label = sorted(refinement.inputs.structures)[0]
    structure = refinement.inputs.structures[label]
    timings = {}

    start = time.time()
    cells, config_types = random_cells(structure, random_plan(count, seed))
    labeling = called(refinement, 'label_1').get_builder_restart()
    labeling.structures = cells
    labeling.config_types = orm.Dict(config_types)
    labeling.isolated_atoms = orm.Bool(False)
    labeled, node = engine.run_get_node(labeling)
    if not node.is_finished_ok:
        raise SystemExit(f'labeling the random cells failed: {node.exit_status} {node.exit_message}')
    timings['labeling_s'] = time.time() - start
    dataset = merge_datasets(dataset_0=refinement.inputs.dataset, dataset_1=labeled['dataset'])

    start = time.time()
    training = called(refinement, 'training_0').get_builder_restart()
    training.dataset = dataset
    trained, node = engine.run_get_node(training)
    if not node.is_finished_ok:
        raise SystemExit(f'training failed: {node.exit_status} {node.exit_message}')
    timings['training_s'] = time.time() - start

    start = time.time()
    last = summary['n_iterations']
    validation = called(refinement, f'validation_{label}_{last}').get_builder_restart()
    validation.mlip.models = dict(trained['models'])
    validated, node = engine.run_get_node(validation)
    if not node.is_finished_ok:
        raise SystemExit(f'validation failed: {node.exit_status} {node.exit_message}')
    timings['validation_s'] = time.time() - start
    verdict = validated['comparison']['verdict']
    return {'labels': dataset.n_frames, 'new_labels': count, 'passed': verdict['passed'], 'failed': verdict['failed'],
            'timings': timings, 'dataset_pk': dataset.pk, 'validation_pk': node.pk}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--campaign', type=int, required=True, help='pk of a finished refinement campaign (a)')
    parser.add_argument('--seed', type=int, default=1, help='seed of the random cells of (b)')
    parser.add_argument('--json', help='write the figures to this file too')
    args = parser.parse_args()

    from aiida import load_profile, orm
    load_profile()
    campaign = orm.load_node(args.campaign)
    refinement = refinement_of(campaign)
    summary = refinement.outputs.summary.get_dict()
    seed_labels = refinement.inputs.dataset.n_frames
    new_labels = refinement.outputs.dataset.n_frames - seed_labels
    refined = {'labels': refinement.outputs.dataset.n_frames, 'new_labels': new_labels, 'passed': summary['passed'],
               'iterations': summary['n_iterations'], 'stop_reason': summary.get('stop_reason'),
               'wall_s': (refinement.mtime - refinement.ctime).total_seconds()}
    print(f'(a) refinement {refinement.process_label}<{refinement.pk}>: {refined["labels"]} labels '
          f'({seed_labels} seed + {new_labels} targeted), passed {refined["passed"]} after '
          f'{refined["iterations"]} iteration(s), {refined["wall_s"]:.0f} s')
    if new_labels == 0:
        raise SystemExit('(a) added no targeted labels (it passed, or stopped, on its seed): nothing to compare')

    one_shot = run_one_shot(refinement, new_labels, args.seed)
    failed = '' if one_shot['passed'] else f' (failed {one_shot["failed"]})'
    print(f'(b) one-shot random (seed {args.seed}): {one_shot["labels"]} labels ({seed_labels} seed + '
          f'{one_shot["new_labels"]} random), passed {one_shot["passed"]}{failed}; '
          + ', '.join(f'{key} {value:.0f}' for key, value in one_shot['timings'].items()))
    if refined['passed'] and not one_shot['passed']:
        print(f'ratio (a)/(b) labels to PASSED: < {refined["labels"]}/{refined["labels"]} = 1 '
              '((b) does not pass at (a)\'s count: goal met)')
    elif refined['passed'] and one_shot['passed']:
        print(f'ratio (a)/(b) labels to PASSED: 1.0 at equal counts ((b) passes too: goal NOT met at this count)')
    else:
        print('(a) did not pass: no ratio')
    if args.json:
        with open(args.json, 'w', encoding='utf8') as handle:
            json.dump({'refinement': refined, 'one_shot': one_shot, 'seed': args.seed}, handle, indent=1)


if __name__ == '__main__':
    main()
