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
    reference, model = np.ravel(reference), np.ravel(model)
    fig, ax = _figure(3.8, 3.6)
    ax.plot(reference, model, 'o', color=COLOURS['mlip'], markersize=4)
    low, high = min(reference.min(), model.min()), max(reference.max(), model.max())
    ax.plot([low, high], [low, high], '-', color='grey', linewidth=0.8)
    ax.set_xlabel(f'DFT {label} ({unit})')
    ax.set_ylabel(f'MLIP {label} ({unit})')
    return _png(fig)
