"""Calcfunction that scores MLIP predictions against DFT labels, so every reported error has provenance."""
from __future__ import annotations

import numpy as np
from aiida import orm
from aiida.engine import calcfunction

from aiida_mlip.analysis.metrics import (
    energy_per_atom_metrics, error_metrics, force_metrics, grouped_metrics, per_element_force_metrics, spearman,
    stress_metrics,
)

EV_TO_MEV = 1000.0


def _scaled(metrics: dict, factor: float) -> dict:
    """Metrics dict with mae/rmse/max_abs scaled (eV -> meV); r2 and count unchanged."""
    return {key: (value * factor if key in ('mae', 'rmse', 'max_abs') and value is not None else value)
            for key, value in metrics.items()}


def score_predictions(frames, energies: np.ndarray, forces: np.ndarray, stresses: np.ndarray | None) -> dict:
    """Errors of one set of predictions (one model, or the committee mean) against labeled ``frames``.

    ``energies`` (N,) eV, ``forces`` (total_atoms, 3) eV/Å in frame order, ``stresses`` (N, 3, 3) eV/Å³ or None.
    Energies are compared per atom. Reported in meV/atom, meV/Å and meV/Å³.
    """
    n_atoms = np.array([len(frame) for frame in frames])
    offsets = np.concatenate([[0], np.cumsum(n_atoms)])
    predicted_forces = [forces[offsets[i]:offsets[i + 1]] for i in range(len(frames))]
    reference_forces = [frame.arrays['REF_forces'] for frame in frames]
    reference_energies = np.array([frame.info['REF_energy'] for frame in frames])
    result = {
        'n_frames': len(frames),
        'energy_per_atom_mev': _scaled(energy_per_atom_metrics(energies, reference_energies, n_atoms), EV_TO_MEV),
        'forces_mev_per_a': _scaled(force_metrics(predicted_forces, reference_forces), EV_TO_MEV),
        'forces_per_element_mev_per_a': {
            element: _scaled(values, EV_TO_MEV) for element, values in per_element_force_metrics(
                predicted_forces, reference_forces, [frame.get_chemical_symbols() for frame in frames]).items()
        },
        'energy_per_atom_by_config_type_mev': {
            str(key): _scaled(values, EV_TO_MEV) for key, values in grouped_metrics(
                energies / n_atoms, reference_energies / n_atoms, [f.info['config_type'] for f in frames]).items()
        },
    }
    with_stress = [i for i, frame in enumerate(frames) if 'REF_stress' in frame.info]
    if stresses is not None and with_stress:
        result['stress_mev_per_a3'] = _scaled(stress_metrics(
            [stresses[i] for i in with_stress], [frames[i].info['REF_stress'] for i in with_stress]), EV_TO_MEV)
    return result


@calcfunction
def prediction_metrics(reference, energies: orm.ArrayData, forces: orm.ArrayData, stresses: orm.ArrayData = None,
                       committee: orm.ArrayData = None) -> orm.Dict:
    """Score an MlipEvaluateCalculation run on ``reference`` (an ``mlip.dataset``, rows in frame order).

    Gives the committee-mean errors, each member's errors and, for committees, how well the committee
    deviation ranks the true force error (Spearman over frames; docs/sources.md: check calibration).
    """
    frames = reference.to_ase()
    per_model_energies = energies.get_array('energies')
    per_model_forces = forces.get_array('forces')
    per_model_stresses = stresses.get_array('stresses') if stresses is not None else None
    mean_stress = stresses.get_array('stress_mean') if stresses is not None else None
    result = score_predictions(frames, energies.get_array('energy_mean'), forces.get_array('forces_mean'), mean_stress)
    result['members'] = [
        score_predictions(frames, per_model_energies[m], per_model_forces[m],
                          None if per_model_stresses is None else per_model_stresses[m])
        for m in range(per_model_energies.shape[0])
    ]
    if committee is not None:
        deviation = committee.get_array('max_force_deviation')
        n_atoms = np.array([len(frame) for frame in frames])
        offsets = np.concatenate([[0], np.cumsum(n_atoms)])
        mean_forces = forces.get_array('forces_mean')
        true_error = np.array([
            np.max(np.linalg.norm(mean_forces[offsets[i]:offsets[i + 1]] - frame.arrays['REF_forces'], axis=1))
            for i, frame in enumerate(frames)
        ])
        result['committee'] = {
            'mean_max_force_deviation': float(deviation.mean()),
            'mean_energy_std_per_atom_mev': float(committee.get_array('energy_std_per_atom').mean() * EV_TO_MEV),
            'max_force_error_metrics_mev_per_a': _scaled(error_metrics(deviation, true_error), EV_TO_MEV),
        }
        if len(frames) >= 3 and np.ptp(deviation) > 0 and np.ptp(true_error) > 0:
            result['committee']['spearman_deviation_vs_error'] = float(spearman(deviation, true_error))
    return orm.Dict(result)
