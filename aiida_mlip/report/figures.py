"""Matplotlib figures (PNG bytes) of model-vs-DFT comparisons; no AiiDA, so reports and workflows share them."""
from __future__ import annotations

import io

import numpy as np

COLOURS = {'dft': 'black', 'mlip': 'tab:red'}


def _figure(width=4.5, height=3.5):
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(width, height), dpi=110)


def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format='png')
    plt.close(fig)
    return buffer.getvalue()


def eos_overlay(curves: dict, fits: dict | None = None) -> bytes:
    """E(V) points per engine (``{label: (volumes, energies)}``, per atom) and their Birch-Murnaghan fits."""
    from aiida_mlip.analysis.eos import birch_murnaghan_energy

    fig, ax = _figure()
    for label, (volumes, energies) in curves.items():
        colour = COLOURS.get(label)
        e_min = np.min(energies)
        ax.plot(volumes, np.asarray(energies) - e_min, 'o', color=colour, label=label)
        if fits and label in fits:
            fit = fits[label]
            grid = np.linspace(np.min(volumes), np.max(volumes), 100)
            curve = birch_murnaghan_energy(grid, fit['e0'], fit['v0'], fit['b0_ev_per_a3'], fit['b0_prime'])
            ax.plot(grid, curve - e_min, '-', color=colour,
                    label=f'{label}: V0 {fit["v0"]:.2f} Å³, B0 {fit["b0_gpa"]:.0f} GPa')
    ax.set_xlabel('volume (Å³/atom)')
    ax.set_ylabel('E - E_min (eV/atom)')
    ax.legend(fontsize=7)
    return _png(fig)


def band_overlay(distances, bands: dict, ticks: list | None = None) -> bytes:
    """Phonon bands of several engines on one path (``{label: (n_q, n_branches) THz}``)."""
    fig, ax = _figure(5.5, 3.8)
    for label, frequencies in bands.items():
        colour = COLOURS.get(label)
        lines = ax.plot(distances, frequencies, '-', color=colour, linewidth=1.0)
        lines[0].set_label(label)
    for position, _ in ticks or []:
        ax.axvline(position, color='grey', linewidth=0.5)
    if ticks:
        ax.set_xticks([p for p, _ in ticks], [name for _, name in ticks])
    ax.axhline(0, color='grey', linewidth=0.5)
    ax.set_xlim(np.min(distances), np.max(distances))
    ax.set_ylabel('frequency (THz)')
    ax.legend(fontsize=7)
    return _png(fig)


def parity(reference, model, label: str, unit: str) -> bytes:
    """Model vs reference values with the y = x line (e.g. Cij in GPa, forces in eV/Å)."""
    from matplotlib.ticker import MaxNLocator

    reference, model = np.ravel(reference), np.ravel(model)
    fig, ax = _figure(3.8, 3.6)
    ax.plot(reference, model, 'o', color=COLOURS['mlip'], markersize=4)
    low, high = min(reference.min(), model.min()), max(reference.max(), model.max())
    ax.plot([low, high], [low, high], '-', color='grey', linewidth=0.8)
    ax.set_xlabel(f'DFT {label} ({unit})')
    ax.set_ylabel(f'MLIP {label} ({unit})')
    # Total energies per atom sit far from zero with a small spread: plain tick labels, few of them, slanted,
    # instead of matplotlib's offset notation that overlaps the axis title.
    ax.ticklabel_format(useOffset=False, style='plain')
    ax.xaxis.set_major_locator(MaxNLocator(4))
    ax.yaxis.set_major_locator(MaxNLocator(5))
    ax.tick_params(axis='x', labelrotation=30)
    return _png(fig)


def error_histogram(reference, model, label: str, unit: str, bins: int = 40) -> bytes:
    """Distribution of the model - reference errors per component, with their MAE and RMSE in the title."""
    from aiida_mlip.analysis.metrics import error_metrics

    reference, model = np.ravel(reference), np.ravel(model)
    metrics = error_metrics(model, reference)
    fig, ax = _figure(3.8, 3.0)
    ax.hist(model - reference, bins=bins, color=COLOURS['mlip'])
    ax.axvline(0, color='grey', linewidth=0.8)
    ax.set_xlabel(f'MLIP - DFT {label} ({unit})')
    ax.set_ylabel('count')
    ax.set_title(f'MAE {metrics["mae"]:.3g}, RMSE {metrics["rmse"]:.3g} {unit} (n = {metrics["count"]})', fontsize=8)
    return _png(fig)


def learning_curve(curves: dict) -> bytes:
    """Training and validation loss (log scale) and validation force RMSE per epoch, one colour per model.

    ``curves``: ``{label: {'epoch': ..., 'train_loss': ..., 'valid_loss': ..., 'valid_rmse_f': ...}}`` as in the
    ``learning_curve`` output of ``mlip.mace_train`` (epoch -1 = before training; forces in meV/Å).
    """
    fig, single = _figure(8.0, 3.2)
    single.remove()
    loss_ax, force_ax = fig.subplots(1, 2)
    for index, (label, arrays) in enumerate(curves.items()):
        colour = f'C{index}'
        epochs = np.asarray(arrays['epoch'])
        loss_ax.plot(epochs, arrays['train_loss'], '-', color=colour, label=f'{label} train')
        loss_ax.plot(epochs, arrays['valid_loss'], '--', color=colour, label=f'{label} valid')
        if 'valid_rmse_f' in arrays:
            force_ax.plot(epochs, arrays['valid_rmse_f'], 'o-', color=colour, markersize=3, label=label)
    loss_ax.set_yscale('log')
    loss_ax.set_xlabel('epoch (-1: before training)')
    loss_ax.set_ylabel('loss')
    loss_ax.legend(fontsize=6)
    force_ax.set_xlabel('epoch (-1: before training)')
    force_ax.set_ylabel('validation forces RMSE (meV/Å)')
    if force_ax.lines:
        force_ax.legend(fontsize=6)
    return _png(fig)


def heatmap(matrix, row_labels, column_labels, title: str, unit: str) -> bytes:
    """A rows x columns matrix as coloured cells with the values written in (e.g. models x test classes).

    Missing entries (None/NaN) stay blank and are marked `n/a`.
    """
    values = np.array([[np.nan if value is None else value for value in row] for row in matrix], dtype=float)
    fig, ax = _figure(1.6 + 0.9 * len(column_labels), 1.4 + 0.5 * len(row_labels))
    image = ax.imshow(np.ma.masked_invalid(values), cmap='viridis', aspect='auto')
    fig.colorbar(image, ax=ax, label=unit)
    ax.set_xticks(range(len(column_labels)), [str(label) for label in column_labels])
    ax.set_yticks(range(len(row_labels)), [str(label) for label in row_labels])
    ax.set_xlabel('test class')
    ax.set_ylabel('model')
    finite = values[np.isfinite(values)]
    middle = (finite.min() + finite.max()) / 2 if finite.size else 0.0
    for (i, j), value in np.ndenumerate(values):
        text = 'n/a' if np.isnan(value) else f'{value:.3g}'
        colour = 'black' if np.isnan(value) or value > middle else 'white'
        ax.text(j, i, text, ha='center', va='center', fontsize=8, color=colour)
    ax.set_title(title, fontsize=9)
    return _png(fig)


#: The errors a refinement plot shows, per validation section (keys of the iteration records), and their unit.
REFINEMENT_ERRORS = {
    'eos': (('v0_error_percent', 'b0_error_percent'), '|error| (%)'),
    'elastic': (('cij_error_percent.', 'bulk_modulus_error_percent', 'shear_modulus_error_percent'), '|error| (%)'),
    'phonons': (('mae_thz',), 'MAE (THz)'),
    'md_stability': (('drift_mev_per_atom_ps',), '|NVE drift| (meV/atom/ps)'),
}


def refinement_errors(dft_labels, errors: dict) -> bytes:
    """Each validation error of a refinement against the DFT labels used, one panel per property section.

    ``errors``: ``{'section.key': [value per iteration]}`` (``summary.errors_vs_labels`` of one structure); keys
    ending in ``.`` in :data:`REFINEMENT_ERRORS` are prefixes (one line per elastic constant).
    """
    sections = [section for section, (keys, _) in REFINEMENT_ERRORS.items()
                if any(name.startswith(f'{section}.{key}') for name in errors for key in keys)]
    fig, single = _figure(3.2 * max(len(sections), 1), 3.0)
    if not sections:
        single.text(0.5, 0.5, 'no validation errors recorded', ha='center', va='center')
        return _png(fig)
    single.remove()
    axes = np.atleast_1d(fig.subplots(1, len(sections)))
    for ax, section in zip(axes, sections):
        keys, unit = REFINEMENT_ERRORS[section]
        for name, values in errors.items():
            if not any(name == f'{section}.{key}' or (key.endswith('.') and name.startswith(f'{section}.{key}'))
                       for key in keys):
                continue
            points = [(labels, abs(value)) for labels, value in zip(dft_labels, values) if value is not None]
            if points:
                ax.plot(*zip(*points), 'o-', markersize=3, label=name.split('.', 1)[1])
        ax.set_title(section, fontsize=9)
        ax.set_xlabel('DFT labels in the training data')
        ax.set_ylabel(unit)
        ax.legend(fontsize=6)
    return _png(fig)
