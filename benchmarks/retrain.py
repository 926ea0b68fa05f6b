#!/usr/bin/env python
"""Issue 13's retraining question: in a refinement iteration, go on from the previous models or train from scratch?

Takes a finished refinement that ran at least one iteration: iteration 0's committee and splits, and iteration 1's
targeted labels. Both arms train on the SAME splits (iteration 0's, extended by iteration 1's labels with
``extend_splits``, as the refinement itself now does) and are validated against the same DFT reference (reused:
no pw.x), one after the other on an otherwise idle machine:

(a) ``previous``: member i starts from iteration 0's member i, for ``epoch_fraction`` of the training's epochs
    (the refinement protocol's ``retrain``);
(b) ``scratch``: random weights, all the epochs.

Decision rule, fixed before the first run: (a) becomes the default when its verdict is at least as good as (b)'s
(it passes whenever (b) passes, or both fail on the same checks) and its training takes less wall time; otherwise
(b). One refinement and one seed per run: replicates are separate runs on other campaigns or seeds.

    AIIDA_PATH=$PWD/.aiida OMP_NUM_THREADS=1 .venv/bin/python benchmarks/retrain.py --campaign PK
"""
from __future__ import annotations

import argparse
import json
import time

from refinement import called, refinement_of


def extended_splits(refinement):
    """Iteration 0's splits with iteration 1's labels added, and the merged dataset they partition."""
    from aiida import orm

    from aiida_mlip.calculations.datasets import extend_splits, merge_datasets

    training = called(refinement, 'training_0')
    labeled = called(refinement, 'label_1').outputs.dataset
    splits = extend_splits(training.inputs.split_fractions, orm.Int(refinement.inputs.seed.value + 1), labeled,
                           **dict(training.outputs.split))
    dataset = merge_datasets(dataset_0=refinement.inputs.dataset, dataset_1=labeled)
    return training, dict(splits), dataset


def run_arm(refinement, start: str, epoch_fraction: float, training, splits, dataset) -> dict:
    """Train one committee (``previous`` or ``scratch``) and validate it with the reused DFT reference."""
    from aiida import engine, orm

    from aiida_mlip.workflows.finetune import validation_key_errors
    from aiida_mlip.workflows.loop_helpers import test_errors

    builder = training.get_builder_restart()
    builder.dataset = dataset
    builder.splits = splits
    parameters = builder.training.mace.parameters.get_dict()
    if start == 'previous':
        builder.initial_models = dict(training.outputs.models)
        parameters['max_num_epochs'] = max(1, round(epoch_fraction * parameters.get('max_num_epochs', 2048)))
    builder.training.mace.parameters = orm.Dict(parameters)
    begin = time.time()
    trained, node = engine.run_get_node(builder)
    if not node.is_finished_ok:
        raise SystemExit(f'{start}: training failed: {node.exit_status} {node.exit_message}')
    training_s = time.time() - begin

    label = sorted(refinement.inputs.structures)[0]
    validation = called(refinement, f'validation_{label}_1').get_builder_restart()
    validation.mlip.models = dict(trained['models'])
    begin = time.time()
    validated, node = engine.run_get_node(validation)
    if not node.is_finished_ok:
        raise SystemExit(f'{start}: validation failed: {node.exit_status} {node.exit_message}')
    comparison = validated['comparison'].get_dict()
    return {'start': start, 'epochs': parameters['max_num_epochs'], 'training_s': round(training_s, 1),
            'validation_s': round(time.time() - begin, 1), 'test': test_errors(trained['test_metrics'].get_dict()),
            'passed': comparison['verdict']['passed'], 'failed': comparison['verdict']['failed'],
            'errors': validation_key_errors(comparison), 'validation_pk': node.pk}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--campaign', type=int, required=True, help='pk of a refinement campaign with >= 1 iteration')
    parser.add_argument('--epoch-fraction', type=float, default=None,
                        help='fraction of the epochs for (a); default: the refinement protocol\'s')
    parser.add_argument('--order', choices=('ab', 'ba'), default='ab', help='which arm runs first')
    parser.add_argument('--json', help='write the figures to this file too')
    args = parser.parse_args()

    from aiida import load_profile, orm
    load_profile()
    from aiida_mlip.workflows.refinement import DEFAULT_RETRAIN

    refinement = refinement_of(orm.load_node(args.campaign))
    if not any(link.link_label == "label_1" for link in refinement.base.links.get_outgoing().all()):
        raise SystemExit(f'{refinement.process_label}<{refinement.pk}> ran no refinement iteration: nothing to retrain')
    fraction = args.epoch_fraction or DEFAULT_RETRAIN['epoch_fraction']
    training, splits, dataset = extended_splits(refinement)
    print(f'{refinement.process_label}<{refinement.pk}>: {dataset.n_frames} frames, splits '
          + ', '.join(f'{name} {node.n_frames}' for name, node in sorted(splits.items())))
    arms = {'a': 'previous', 'b': 'scratch'}
    results = {}
    for key in args.order:
        result = run_arm(refinement, arms[key], fraction, training, splits, dataset)
        results[arms[key]] = result
        print(f'({key}) {arms[key]:8s} {result["epochs"]:4d} epochs: training {result["training_s"]:.0f} s, test F RMSE '
              f'{result["test"].get("forces_rmse_mev_per_a"):.2f} meV/Å, passed {result["passed"]} '
              f'{result["failed"] or ""}\n    {json.dumps(result["errors"])}')
    a, b = results['previous'], results['scratch']
    at_least_as_good = a['passed'] or (not b['passed'] and set(a['failed']) <= set(b['failed']))
    print(f'training time (a)/(b): {a["training_s"] / b["training_s"]:.2f}; verdict of (a) at least as good: '
          f'{at_least_as_good} -> default: {"previous" if at_least_as_good and a["training_s"] < b["training_s"] else "scratch"}')
    if args.json:
        with open(args.json, 'w', encoding='utf8') as handle:
            json.dump(results, handle, indent=1)


if __name__ == '__main__':
    main()
