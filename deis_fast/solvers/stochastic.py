"""Stochastic DDIM (eta > 0): ancestral step in rho space, valid for VP and VE alike.

rho_up = eta * sqrt(rho_{i+1}^2 (rho_i^2 - rho_{i+1}^2) / rho_i^2) (clamped to rho_{i+1}),
rho_down = sqrt(rho_{i+1}^2 - rho_up^2);  xhat_{i+1} = xhat_i + (rho_down - rho_i) eps_i + rho_up z.
For VP this is exactly DDIM's sigma_t(eta); eta = 1 is ancestral DDPM.
"""
from __future__ import annotations

import numpy as np

from ..core.coefficients import StepRow, pure_noise_row
from ..core.plan import Plan
from .multistep import multistep_plan


def ancestral_split(rho: np.ndarray, eta: float) -> tuple[np.ndarray, np.ndarray]:
    """(rho_down, rho_up) for every step of the grid."""
    a, b = rho[:-1], rho[1:]
    up = np.minimum(b, eta * b * np.sqrt(np.maximum(1.0 - (b / a) ** 2, 0.0)))  # a = inf (alpha = 0): eta * b
    down = np.sqrt(np.maximum(b * b - up * up, 0.0))
    return down, up


def ddim_eta_plan(name: str, schedule, t: np.ndarray, rho: np.ndarray, *, eta: float = 1.0) -> Plan:
    if not (eta >= 0.0 and np.isfinite(eta)):
        raise ValueError(f"eta must be a finite number >= 0, got {eta}")
    alpha = schedule.alpha_from_rho(rho)
    down, up = ancestral_split(rho, eta)
    rows = [StepRow(float(alpha[i + 1] / alpha[i]), (float(alpha[i + 1] * (down[i] - rho[i])),))
            if np.isfinite(rho[i]) else pure_noise_row(alpha[i + 1], down[i], float(schedule.sigma_from_rho(rho[i])))
            for i in range(len(t) - 1)]
    noise = [float(alpha[i + 1] * up[i]) for i in range(len(t) - 1)]
    return multistep_plan(name, schedule, t, rows, "eps", noise_coefs=noise)
