"""SDE multistep solvers: DPM-Solver++(2M) SDE and DPM-Solver++(3M) SDE (Lu et al., 2022; the forms of
k-diffusion's ``sample_dpmpp_2m_sde`` / ``sample_dpmpp_3m_sde`` and diffusers'
``DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++")``), for VP and VE schedules alike.

In lambda = -log rho, with h = lam_{i+1} - lam_i, a step is

    x_{i+1} = s_{i+1}/s_i e^{-eta h} x_i + a_{i+1} (DPM-Solver++ D-weights at (1 + eta) h)
              + s_noise * s_{i+1} sqrt(1 - e^{-2 eta h}) z_i,

so eta = 0 is the ODE solver (2M midpoint = ``dpmpp_2m``, 2M heun = ``dpmpp2``) and eta = 1 the reverse
SDE. A final step to rho = 0 is the jump x = alpha * D without noise. The noise is one draw per step in
the plan, so per-sample generators make a sample depend only on its own seed (as for ``ddim_eta``).
"""
from __future__ import annotations

import math

import numpy as np

from ..core.coefficients import dpmsolver_eps_rows, dpmsolver_rows
from ..core.plan import Plan
from .multistep import _points, multistep_plan
from .unipc import check_variant

VARIANTS = ("midpoint", "heun")


def _check_nonneg(name: str, value: float) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number >= 0, got {value!r}") from None
    if not (math.isfinite(v) and v >= 0.0):
        raise ValueError(f"{name} must be a finite number >= 0 (0 = the ODE solver), got {value!r}")
    return v


def sde_noise_coefs(schedule, rho: np.ndarray, eta: float, s_noise: float) -> list[float]:
    """``s_noise * sigma_{i+1} * sqrt(1 - e^{-2 eta h_i})`` per step; 0 on a final step to rho = 0."""
    alpha = schedule.alpha_from_rho(rho)
    out = []
    for i in range(len(rho) - 1):
        if rho[i + 1] == 0.0 or eta == 0.0:
            out.append(0.0)
            continue
        h = np.log(rho[i]) - np.log(rho[i + 1])
        out.append(float(s_noise * alpha[i + 1] * rho[i + 1] * np.sqrt(-np.expm1(-2.0 * eta * h))))
    return out


def sde_dpmsolver_plan(name: str, schedule, t: np.ndarray, rho: np.ndarray, *, points: int,
                       variant: str = "midpoint", eta: float = 1.0, s_noise: float = 1.0,
                       lower_order_final: bool = False) -> Plan:
    """DPM-Solver++(2M/3M) SDE. ``variant`` is the order-2 weight ('midpoint' or 'heun'; 3M uses 'heun' on
    its second step, as k-diffusion does)."""
    eta, s_noise = _check_nonneg("eta", eta), _check_nonneg("s_noise", s_noise)
    check_variant(variant, VARIANTS, name)
    pts = _points(len(t) - 1, points, rho, lower_order_final, True)
    rows = dpmsolver_rows(schedule, rho, pts, solver_type=variant, eta=eta)
    return multistep_plan(name, schedule, t, rows, "x0", noise_coefs=sde_noise_coefs(schedule, rho, eta, s_noise))


def sde_eps_dpmsolver_plan(name: str, schedule, t: np.ndarray, rho: np.ndarray, *, points: int,
                           variant: str = "midpoint", s_noise: float = 1.0, lower_order_final: bool = False) -> Plan:
    """SDE-DPM-Solver in the eps form (diffusers' ``algorithm_type="sde-dpmsolver"``, orders 1-2):
    ``x_{i+1} = a_{i+1}/a_i x_i - 2 s_{i+1} (phi D0 + w1 D1) + s_noise * s_{i+1} sqrt(e^{2h} - 1) z``. A final step
    to rho = 0 is DDIM's jump without noise; the step out of rho = inf (alpha = 0) is the deterministic jump."""
    s_noise = _check_nonneg("s_noise", s_noise)
    check_variant(variant, VARIANTS, name)
    pts = _points(len(t) - 1, points, rho, lower_order_final, True)
    rows = dpmsolver_eps_rows(schedule, rho, pts, solver_type=variant, scale=2.0)
    alpha = schedule.alpha_from_rho(rho)
    # sigma' sqrt(e^{2h} - 1) = alpha' sqrt(rho^2 - rho'^2)
    noise = [0.0 if rho[i + 1] == 0.0 or np.isinf(rho[i]) else
             float(s_noise * alpha[i + 1] * np.sqrt(rho[i] ** 2 - rho[i + 1] ** 2)) for i in range(len(rho) - 1)]
    return multistep_plan(name, schedule, t, rows, "eps", noise_coefs=noise)
