"""Linear multistep plan builders: tAB / rhoAB / log-rho AB (eps form), lambda-AB and DPM-Solver++ (data form), iPNDM."""
from __future__ import annotations

from typing import Callable

import numpy as np

from ..coefficients import data_ab_rows, eps_ab_rows, ipndm_rows, points_per_step
from ..plan import Plan, multistep_plan


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
