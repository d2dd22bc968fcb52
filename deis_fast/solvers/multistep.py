"""Linear multistep plan builders: tAB / rhoAB / log-rho AB (eps form), lambda-AB and DPM-Solver++ (data form), iPNDM."""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from ..coefficients import data_ab_rows, eps_ab_rows, ipndm_rows, points_per_step
from ..coefficients import StepRow
from ..plan import Plan, PlanBuilder


def _points(n_steps: int, points: int, rho: np.ndarray, lower_order_final: bool, single_point_to_zero: bool) -> list[int]:
    pts = points_per_step(n_steps, points, lower_order_final)
    if single_point_to_zero and rho[-1] == 0.0:
        pts[-1] = 1
    return pts


def eps_ab_plan(name: str, schedule, t: np.ndarray, rho: np.ndarray, *, points: int, variable: str,
                lower_order_final: bool = False) -> Plan:
    pts = _points(len(t) - 1, points, rho, lower_order_final, variable == "logrho")
    return multistep_plan(name, schedule, t, eps_ab_rows(schedule, t, rho, pts, variable), "eps")


def data_ab_plan(name: str, schedule, t: np.ndarray, rho: np.ndarray, *, points: int,
                 lower_order_final: bool = False, rows: Callable[..., list] = data_ab_rows) -> Plan:
    """Data-form multistep plan; ``rows`` is the weight table: exact lambda-AB or ``dpmsolver_rows``."""
    pts = _points(len(t) - 1, points, rho, lower_order_final, True)
    return multistep_plan(name, schedule, t, rows(schedule, rho, pts), "x0")


def ipndm_plan(name: str, schedule, t: np.ndarray, rho: np.ndarray, *, points: int,
               lower_order_final: bool = False) -> Plan:
    pts = points_per_step(len(t) - 1, points, lower_order_final)
    return multistep_plan(name, schedule, t, ipndm_rows(schedule, rho, pts), "eps")


def multistep_plan(method: str, schedule, times: Sequence[float], rows: Sequence[StepRow], target: str,
                   noise_coefs: Sequence[float] | None = None) -> Plan:
    """Plan of a linear multistep method: one Eval per step into a ring buffer of model outputs,
    then one Combine ``x <- state_coef * x + sum_j c_j * out_{i-j} (+ noise)``."""
    depth = max(len(r.coefs) for r in rows)
    b = PlanBuilder(schedule, target)
    pure_noise = float(schedule.alpha(times[0])) == 0.0
    for i, row in enumerate(rows):
        # out of alpha = 0 the step is in data form (rows[0] is coefficients.pure_noise_row)
        b.eval(0, 1 + i % depth, times[i], "x0" if i == 0 and pure_noise else None)
        terms = [(row.state_coef, 0)] + [(c, 1 + (i - j) % depth) for j, c in enumerate(row.coefs)]
        b.combine(0, terms, 0.0 if noise_coefs is None else noise_coefs[i])
        if i == 0 and pure_noise and target == "eps" and depth > 1 and len(rows) > 1:
            b.combine(1, start_eps_terms(schedule, times, row, state_slot=0, d_slot=1))
    names = ["x"] + [f"{target}[{k}]" for k in range(depth)]
    return b.build(method, 1 + depth, times, names)


def start_eps_terms(schedule, times: Sequence[float], row: StepRow, state_slot: int, d_slot: int
                    ) -> list[tuple[float, int]]:
    """After the pure-noise step x1 = c x0 + d D0, the history's eps0 = x0 / sigma0 = (x1 - d D0) / (c sigma0)."""
    k = 1.0 / (row.state_coef * float(schedule.sigma(times[0])))
    return [(k, state_slot), (-k * row.coefs[0], d_slot)]

