"""rhoRK-DEIS: explicit Runge-Kutta on d xhat / d rho = eps(xhat, rho), xhat = x / alpha."""
from __future__ import annotations

import numpy as np

from ..core.plan import Plan, PlanBuilder

# name: (A lower-triangular rows, b, c, order)
TABLEAUS: dict[str, tuple[tuple[tuple[float, ...], ...], tuple[float, ...], tuple[float, ...], int]] = {
    "rho_euler": ((), (1.0,), (0.0,), 1),
    "rho_heun": (((1.0,),), (0.5, 0.5), (0.0, 1.0), 2),
    "rho_midpoint": (((0.5,),), (0.0, 1.0), (0.0, 0.5), 2),
    "rho_kutta3": (((0.5,), (-1.0, 2.0)), (1 / 6, 2 / 3, 1 / 6), (0.0, 0.5, 1.0), 3),
    "rho_ralston3": (((0.5,), (0.0, 0.75)), (2 / 9, 1 / 3, 4 / 9), (0.0, 0.5, 0.75), 3),
    "rho_heun3": (((1 / 3,), (0.0, 2 / 3)), (0.25, 0.0, 0.75), (0.0, 1 / 3, 2 / 3), 3),
    "rho_ssprk3": (((1.0,), (0.25, 0.25)), (1 / 6, 1 / 6, 2 / 3), (0.0, 1.0, 0.5), 3),
    "rho_rk4": (((0.5,), (0.0, 0.5), (0.0, 0.0, 1.0)), (1 / 6, 1 / 3, 1 / 3, 1 / 6), (0.0, 0.5, 0.5, 1.0), 4),
}


def stages(name: str) -> int:
    return len(TABLEAUS[name][1])


def rk_plan(name: str, schedule, t: np.ndarray, rho: np.ndarray) -> Plan:
    """Each stage state is ``alpha_k * (xhat_i + h * sum_l a_kl eps_l)``; slots: x, eps[0..s-1], stage.
    Plans that start at alpha = 0 take their steps with rho > 1 in data form (:func:`_data_form_rk_step`)."""
    A, bw, c, _ = TABLEAUS[name]
    s = len(bw)
    stage_slot = 1 + s
    alpha = schedule.alpha_from_rho(rho)
    b = PlanBuilder(schedule, "eps")
    for i in range(len(t) - 1):
        if np.isinf(rho[0]) and rho[i] > 1.0 and rho[i + 1] > 0.0:
            # from pure noise (alpha = 0) the noisy half runs in data form: regular at rho = inf, and steps
            # uniform in time near t_max are uniform in u = 1 / rho (they double rho in the eps form)
            _data_form_rk_step(b, schedule, t, rho, i, A, bw, c, stage_slot)
            continue
        h = rho[i + 1] - rho[i]
        b.eval(0, 1, t[i])
        for k in range(1, s):
            rk = rho[i] + c[k] * h
            ak = float(schedule.alpha_from_rho(rk))
            terms = [(ak / alpha[i], 0)] + [(ak * h * a, 1 + l) for l, a in enumerate(A[k - 1])]
            b.combine(stage_slot, terms)
            b.eval(stage_slot, 1 + k, float(schedule.t_from_rho(rk)))
        terms = [(alpha[i + 1] / alpha[i], 0)] + [(alpha[i + 1] * h * w, 1 + l) for l, w in enumerate(bw)]
        b.combine(0, terms)
    names = ["x"] + [f"eps[{k}]" for k in range(s)] + ["stage"]
    return b.build(name, s + 2, t, names)


def _data_form_rk_step(b: PlanBuilder, schedule, t: np.ndarray, rho: np.ndarray, i: int, A, bw, c,
                       stage_slot: int) -> None:
    """The same Runge-Kutta on d xbar / d u = D with xbar = x / sigma and u = 1 / rho, regular at u = 0 (alpha = 0,
    rho = inf); stage k sits at u_i + c_k (u_{i+1} - u_i). Evals target the data prediction D."""
    u0, u1 = 1.0 / rho[i], 1.0 / rho[i + 1]
    s0 = float(schedule.sigma_from_rho(rho[i]))

    def terms(rk: float, weights) -> list[tuple[float, int]]:
        sk = float(schedule.sigma_from_rho(rk))
        return [(sk / s0, 0)] + [(sk * (u1 - u0) * w, 1 + l) for l, w in enumerate(weights)]
    b.eval(0, 1, t[i], "x0")
    for k in range(1, len(bw)):
        rk = 1.0 / (u0 + c[k] * (u1 - u0))
        b.combine(stage_slot, terms(rk, A[k - 1]))
        b.eval(stage_slot, 1 + k, float(schedule.t_from_rho(rk)), "x0")
    b.combine(0, terms(rho[i + 1], bw))
