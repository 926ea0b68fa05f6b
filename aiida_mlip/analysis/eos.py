"""Third-order Birch-Murnaghan equation of state (E-V curve) fitting.

The energy-volume curve of a solid near equilibrium is fitted to the 3rd-order
Birch-Murnaghan form to obtain the equilibrium volume ``v0`` (Å³), minimum energy ``e0``
(eV), bulk modulus ``b0`` and its pressure derivative ``b0_prime``; these are standard
benchmarks for an interatomic potential against DFT. Energies are in eV and volumes in Å³
(per cell — per-atom quantities work equally well as long as they are consistent); the bulk
modulus is reported both in eV/Å³ and GPa (1 eV/Å³ = 160.2176634 GPa, exact from the SI
value of the elementary charge). The fit uses ``scipy.optimize.least_squares`` started from
a parabola fit, and refuses to extrapolate: if the minimum lies outside the sampled volume
range the caller must re-sample around a better guess.
"""

from __future__ import annotations

import numpy as np

__all__ = ['EV_PER_A3_TO_GPA', 'birch_murnaghan_energy', 'conventional_lattice_at_volume', 'fit_birch_murnaghan',
           'minimum_near_edge']

#: Conversion factor from eV/Å³ to GPa (1.602176634e-19 J / 1e-30 m³ = 1.602176634e11 Pa).
EV_PER_A3_TO_GPA = 160.2176634

#: Minimum number of (V, E) points accepted by :func:`fit_birch_murnaghan` (4 parameters + 1).
MIN_EOS_POINTS = 5


def scan_volume_strains(volume_range: float, n_points: int) -> list[float]:
    """The relative volume changes of an EOS scan: ``n_points`` evenly over [-volume_range, +volume_range]."""
    return [float(strain) for strain in np.linspace(-volume_range, volume_range, n_points)]


def in_sample_volume_strains(sampled, volume_range: float, n_points: int, tolerance: float = 1e-4) -> list[float]:
    """The sampled relative volume changes that are points of the EOS scan: labels there put the EOS check in sample."""
    scan = scan_volume_strains(volume_range, n_points)
    return [float(strain) for strain in sampled if any(abs(strain - point) <= tolerance for point in scan)]


def birch_murnaghan_energy(volume, e0, v0, b0, b0_prime):
    """3rd-order Birch-Murnaghan energy ``E(V)``.

    ``E = e0 + 9 v0 b0 / 16 * {[x - 1]^3 b0' + [x - 1]^2 [6 - 4 x]}`` with ``x = (v0/V)^(2/3)``.
    Units: volume and ``v0`` in Å³, ``e0`` in eV, ``b0`` in eV/Å³ (so the result is in eV),
    ``b0_prime`` dimensionless. Works element-wise on arrays of volumes.
    """
    volume = np.asarray(volume, dtype=float)
    x = (v0 / volume) ** (2.0 / 3.0)
    return e0 + 9.0 * v0 * b0 / 16.0 * ((x - 1.0) ** 3 * b0_prime + (x - 1.0) ** 2 * (6.0 - 4.0 * x))


def fit_birch_murnaghan(volumes, energies) -> dict:
    """Fit the 3rd-order Birch-Murnaghan EOS to energy-volume data.

    :param volumes: cell volumes in Å³ (at least 5 distinct, positive values).
    :param energies: total energies in eV at those volumes.
    :returns: dict with ``v0`` (Å³), ``e0`` (eV), ``b0_ev_per_a3``, ``b0_gpa``, ``b0_prime``
        and ``residual_rms`` (eV, RMS of fit residuals — a large value means the data are
        noisy or not BM-like, e.g. a phase transition or a broken potential).
    :raises ValueError: with fewer than 5 points, duplicate/non-positive volumes, non-finite
        values, a curve without a minimum (negative curvature), a minimum outside the sampled
        volume range (the message says by how much), or a failed least-squares fit.
    """
    from scipy.optimize import least_squares

    vol = np.asarray(volumes, dtype=float).ravel()
    ene = np.asarray(energies, dtype=float).ravel()
    if vol.size != ene.size:
        raise ValueError(f'got {vol.size} volumes but {ene.size} energies')
    if vol.size < MIN_EOS_POINTS:
        raise ValueError(f'Birch-Murnaghan fit needs at least {MIN_EOS_POINTS} points, got {vol.size}')
    if not (np.all(np.isfinite(vol)) and np.all(np.isfinite(ene))):
        raise ValueError('volumes and energies must be finite (no NaN/inf)')
    if np.any(vol <= 0):
        raise ValueError('volumes must be positive')
    if np.unique(vol).size != vol.size:
        raise ValueError('volumes must be distinct')

    order = np.argsort(vol)
    vol, ene = vol[order], ene[order]
    v_lo, v_hi = float(vol[0]), float(vol[-1])

    def _check_in_range(v_min: float, what: str) -> None:
        if v_min < v_lo:
            raise ValueError(
                f'{what} minimum at V = {v_min:.4f} Å^3 lies {v_lo - v_min:.4f} Å^3 '
                f'({100 * (v_lo - v_min) / v_lo:.2f} %) below the smallest sampled volume {v_lo:.4f} Å^3; '
                'sample smaller volumes'
            )
        if v_min > v_hi:
            raise ValueError(
                f'{what} minimum at V = {v_min:.4f} Å^3 lies {v_min - v_hi:.4f} Å^3 '
                f'({100 * (v_min - v_hi) / v_hi:.2f} %) above the largest sampled volume {v_hi:.4f} Å^3; '
                'sample larger volumes'
            )

    # Initial guess from a parabola E = a V^2 + b V + c; B = V d2E/dV2 = 2 a V0.
    a, b, c = np.polyfit(vol, ene, 2)
    if a <= 0:
        raise ValueError('energy-volume data have no minimum (parabola fit has non-positive curvature)')
    v0_guess = -b / (2.0 * a)
    _check_in_range(v0_guess, 'parabola')
    e0_guess = c - b * b / (4.0 * a)
    b0_guess = 2.0 * a * v0_guess
    guess = np.array([e0_guess, v0_guess, b0_guess, 4.0])

    # Fit in scaled variables so that all parameters are O(1) for the optimiser.
    e_scale = max(float(np.ptp(ene)), 1e-12)
    scale = np.array([e_scale, v0_guess, b0_guess, 1.0])

    def residuals(p_scaled):
        e0, v0, b0, bp = guess + p_scaled * scale
        return (birch_murnaghan_energy(vol, e0, v0, b0, bp) - ene) / e_scale

    result = least_squares(residuals, np.zeros(4), method='lm', xtol=1e-15, ftol=1e-15, gtol=1e-15, max_nfev=20000)
    if not result.success:
        raise ValueError(f'Birch-Murnaghan least-squares fit failed: {result.message}')
    e0, v0, b0, bp = guess + result.x * scale
    if not np.all(np.isfinite([e0, v0, b0, bp])) or b0 <= 0 or v0 <= 0:
        raise ValueError(f'Birch-Murnaghan fit gave unphysical parameters v0={v0}, b0={b0}')
    _check_in_range(float(v0), 'fitted Birch-Murnaghan')
    residual = birch_murnaghan_energy(vol, e0, v0, b0, bp) - ene
    return {
        'v0': float(v0),
        'e0': float(e0),
        'b0_ev_per_a3': float(b0),
        'b0_gpa': float(b0 * EV_PER_A3_TO_GPA),
        'b0_prime': float(bp),
        'residual_rms': float(np.sqrt(np.mean(residual**2))),
    }


def suggest_scan_centre(volumes, energies) -> float:
    """Volume to centre a new scan on when the minimum was not bracketed.

    The vertex of a parabola through the data when it curves upwards; otherwise (no minimum in sight) the
    sampled volume of lowest energy, so the next scan moves towards it.
    """
    vol = np.asarray(volumes, dtype=float).ravel()
    ene = np.asarray(energies, dtype=float).ravel()
    if vol.size < 3 or vol.size != ene.size:
        raise ValueError(f'need at least 3 (V, E) points, got {vol.size} volumes and {ene.size} energies')
    a, b, _ = np.polyfit(vol, ene, 2)
    if a > 0:
        return float(-b / (2.0 * a))
    return float(vol[np.argmin(ene)])


def minimum_near_edge(volumes, v0) -> bool:
    """True if ``v0`` lies in the outermost interval of the scan at either end.

    There the fit is constrained by one point on that side only: V0 and, more, B0 lean on the functional form
    rather than on data, so the scan should be centred on V0 (e.g. a validation on an unrelaxed cell).
    """
    vol = np.sort(np.asarray(volumes, dtype=float).ravel())
    if vol.size < 3:
        raise ValueError(f'need at least 3 volumes, got {vol.size}')
    return bool(v0 < vol[1] or v0 > vol[-2])


def conventional_lattice_at_volume(cell, scaled_positions, numbers, v0_per_atom: float,
                                   symprec: float = 1e-3) -> dict:
    """Lattice parameters a, b, c (Å) of the conventional standard cell (spglib) scaled isotropically to V0.

    The EOS scans volumes isotropically, so the equilibrium lattice is the scanned cell's shape at V0: e.g. the
    cubic lattice constant a0 of diamond Si from a 2-atom primitive cell.
    """
    import spglib

    lattice, positions, _ = spglib.standardize_cell(
        (np.asarray(cell, dtype=float), np.asarray(scaled_positions, dtype=float), np.asarray(numbers)),
        to_primitive=False, symprec=symprec)
    volume = abs(float(np.linalg.det(lattice)))
    factor = (v0_per_atom * len(positions) / volume) ** (1.0 / 3.0)
    a, b, c = (float(length) * factor for length in np.linalg.norm(lattice, axis=1))
    return {'a': a, 'b': b, 'c': c}
