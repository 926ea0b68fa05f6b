"""Helpers shared by the learning loops (``mlip.finetune``, ``mlip.active_learning``, ``mlip.refinement``).

One format for test errors; one way to hand an MD job's runs to the frame selection.
"""
from __future__ import annotations

#: prediction_metrics section -> (name stem, unit suffix) of the test-error keys.
TEST_ERROR_SECTIONS = (
    ('energy_per_atom_mev', 'energy', 'mev_per_atom'),
    ('forces_mev_per_a', 'forces', 'mev_per_a'),
    ('stress_mev_per_a3', 'stress', 'mev_per_a3'),
)


def test_errors(metrics: dict) -> dict:
    """Headline numbers of a ``prediction_metrics`` result (e.g. a TrainingWorkChain's ``test_metrics``).

    Keys ``n_frames`` and ``<energy|forces|stress>_<rmse|mae>_<unit>`` (``energy_rmse_mev_per_atom``,
    ``forces_rmse_mev_per_a``, ``stress_mae_mev_per_a3``, ...) for every quantity the metrics hold.
    """
    result = {'n_frames': metrics.get('n_frames')}
    for section, stem, unit in TEST_ERROR_SECTIONS:
        for statistic in ('rmse', 'mae'):
            value = (metrics.get(section) or {}).get(statistic)
            if value is not None:
                result[f'{stem}_{statistic}_{unit}'] = float(value)
    return result


def md_run_outputs(node) -> dict:
    """``trajectory_<key>`` and ``thermo_<key>`` of every run of a finished ``mlip.md`` job, for ``select_md_frames``."""
    runs = {}
    for key in node.outputs.trajectories:
        runs[f'trajectory_{key}'] = node.outputs.trajectories[key]
        runs[f'thermo_{key}'] = node.outputs.thermo[key]
    return runs
