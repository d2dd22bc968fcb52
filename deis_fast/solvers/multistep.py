"""Linear multistep plan builders: tAB / rhoAB / log-rho AB (eps form), lambda-AB and DPM-Solver++ (data form), iPNDM.

Every builder here takes ``corrector=True``: the UniC idea (Zhao et al., 2023) on the method itself. After
the network is called at a new point, the state there is recomputed with the new output included (no NFE)
and the next step starts from the corrected state. The corrector of a step with p points is UniC's
data-form step in lambda with p + 1 points (exactly: the lambda-Adams-Moulton step, the integral of the
Lagrange polynomial in lambda through D_{i+1}, D_i, ... against e^{lambda}; UniC-p solves the same order
conditions for p >= 2), so its local error is one order higher than the predictor's. Data-form methods
(dpmpp*) apply it in place (one Combine). Eps-form methods (tab*, rhoab*, logrho*, ipndm*) store the data
prediction D_j = x_j / alpha_j - rho_j eps_j of each evaluated state, recompute the state from the previous
corrected one, and then replace eps_j by the eps consistent with the corrected state and the same D_j
(three Combines). That last part matters: a stale eps (evaluated at the uncorrected state) carries the
correction through the next eps-form step undamped, whereas the true flow shrinks x - D by rho_{j+1}/rho_j;
without it the corrector multiplied tab3's error on the digits U-Net by 100 at NFE 20 (measured). An
Adams-Moulton corrector in the eps form itself (in t / rho / log rho) raised the order on the mixture too
but was as harmful on the digits model (its weight on the new output scales with the step in rho).
"""
from __future__ import annotations

from functools import partial
from typing import Callable, Sequence

import numpy as np

from ..core.coefficients import (StepRow, data_ab_rows, dpmsolver_eps_rows, eps_ab_rows, eps_am_rows, ipndm_rows,
                                 points_per_step)
from ..core.plan import Plan, PlanBuilder


def _points(n_steps: int, points: int, rho: np.ndarray, lower_order_final: bool, single_point_to_zero: bool) -> list[int]:
    pts = points_per_step(n_steps, points, lower_order_final)
    if single_point_to_zero and rho[-1] == 0.0:
        pts[-1] = 1
    return pts


def corrections(pred: Sequence[StepRow], corr: Sequence[StepRow] | None,
                disable_corrector: Sequence[int] = ()) -> list[tuple[float, ...]] | None:
    """Corrector Combines for :func:`multistep_plan`: at point j (1 <= j < N) the implicit row of step j-1
    minus its predictor row, over out_j, out_{j-1}, ... Steps in ``disable_corrector`` (diffusers'
    convention: the result of step i is not corrected) get none."""
    if corr is None:
        return None
    out: list[tuple[float, ...]] = [()] * len(pred)
    for j in range(1, len(pred)):
        p, c = pred[j - 1], corr[j - 1]
        if j - 1 in disable_corrector or c is None:
            continue
        if not np.isclose(p.state_coef, c.state_coef, rtol=1e-12, atol=0.0):
            raise ValueError("internal: predictor and corrector rows disagree on the state coefficient")
        base = (0.0,) + p.coefs + (0.0,) * (len(c.coefs) - 1 - len(p.coefs))
        out[j] = tuple(cc - pp for cc, pp in zip(c.coefs, base))
    return out


def check_disable_corrector(disable_corrector: Sequence[int]) -> tuple[int, ...]:
    try:
        out = tuple(int(i) for i in disable_corrector)
    except (TypeError, ValueError):
        raise ValueError(f"disable_corrector must be a list of step indices, got {disable_corrector!r}") from None
    if any(i < 0 for i in out):
        raise ValueError(f"disable_corrector holds 0-based step indices (>= 0), got {list(out)}")
    return out


def eps_unic_plan(name: str, schedule, t: np.ndarray, rho: np.ndarray, rows: Sequence[StepRow], pts: Sequence[int],
                  disable_corrector: Sequence[int] = (), corrector_form: str = "data") -> Plan:
    """An eps-form multistep predictor (``rows``) with the data-form lambda corrector after each Eval.

    Slot 0 holds the (corrected) state, as in every plan; a prediction that will be corrected goes to slot 1
    (``x'``) and is evaluated there. Per Eval j: ``D[j] = x'_j / alpha_j - rho_j eps_j``; then (corrected steps)
    ``x_j <- s_j/s_{j-1} x_{j-1} + a_j sum_k E_k D[j-k]`` in slot 0 from the previous state, and eps_j is
    made consistent with it; then the predictor writes x_{j+1} (to slot 1 when step j+1 will be corrected, else
    to slot 0, where it is final). ``corrector_form="eps"`` (rhoABM): the correction is the rho-Adams-Moulton
    step over eps_j, eps_{j-1}, ... instead (:func:`~deis_fast.core.coefficients.eps_am_rows`); out of alpha = 0 it is
    the data-form jump over D_1, so the first step is corrected too.
    """
    disable = check_disable_corrector(disable_corrector)
    n = len(rows)
    alpha = schedule.alpha_from_rho(rho)
    # out of alpha = 0 (flow matching, zero terminal SNR) the first Eval is the data prediction D_0 itself and the
    # first step is the data-form limit (rows[0] is coefficients.pure_noise_row); eps_0 = x_0 / sigma_0 exactly;
    # the step out of rho = inf has no corrector (corr[0] is None)
    pure_noise = alpha[0] == 0.0
    if corrector_form not in ("data", "eps"):
        raise ValueError(f"internal: corrector_form must be 'data' or 'eps', got {corrector_form!r}")
    eps_form = corrector_form == "eps"
    corr = (eps_am_rows if eps_form else partial(data_ab_rows, implicit=True))(schedule, rho, pts[:-1])
    de, dd = max(len(r.coefs) for r in rows), max(pts) + 1
    if eps_form:
        de = max([de] + [len(c.coefs) for c in corr])

    def corrected(j: int) -> bool:
        return 1 <= j < n and j - 1 not in disable and corr[j - 1] is not None

    def eps(k: int) -> int:
        return 2 + k % de

    def dat(k: int) -> int:
        return 2 + de + k % dd

    b = PlanBuilder(schedule, "eps")
    for j, row in enumerate(rows):
        dst = 1 if corrected(j + 1) else 0
        if j == 0 and pure_noise:
            b.eval(0, dat(0), t[0], "x0")
            if n > 1:
                b.combine(eps(0), [(1.0 / float(schedule.sigma_from_rho(rho[0])), 0)])
            b.combine(dst, [(row.state_coef, 0), (row.coefs[0], dat(0))])
            continue
        src = 1 if corrected(j) else 0
        b.eval(src, eps(j), t[j])
        if j < n - 1 or corrected(j):
            b.combine(dat(j), [(1.0 / alpha[j], src), (-rho[j], eps(j))])
        if corrected(j):
            c = corr[j - 1]
            out = eps if eps_form and not (j == 1 and pure_noise) else dat
            b.combine(0, [(c.state_coef, 0)] + [(e, out(j - k)) for k, e in enumerate(c.coefs)])
            # keep D_j, make eps_j consistent with the corrected state (a stale eps would not decay like x - D)
            b.combine(eps(j), [(1.0 / (alpha[j] * rho[j]), 0), (-1.0 / rho[j], dat(j))])
        b.combine(dst, [(row.state_coef, 0)] + [(c, eps(j - k)) for k, c in enumerate(row.coefs)])
    names = ["x", "x'"] + [f"eps[{k}]" for k in range(de)] + [f"D[{k}]" for k in range(dd)]
    return b.build(name, 2 + de + dd, t, names, state_slots=(0, 1))


def eps_ab_plan(name: str, schedule, t: np.ndarray, rho: np.ndarray, *, points: int, variable: str,
                lower_order_final: bool = False, corrector: bool = False, disable_corrector: Sequence[int] = (),
                denoise_to_zero: bool = False) -> Plan:
    pts = _points(len(t) - 1, points, rho, lower_order_final, variable == "logrho" or denoise_to_zero)
    rows = eps_ab_rows(schedule, t, rho, pts, variable)
    if corrector:
        return eps_unic_plan(name, schedule, t, rho, rows, pts, disable_corrector)
    return multistep_plan(name, schedule, t, rows, "eps")


def rhoabm_plan(name: str, schedule, t: np.ndarray, rho: np.ndarray, *, points: int, lower_order_final: bool = False,
                corrector: bool = True, disable_corrector: Sequence[int] = (), denoise_to_zero: bool = False) -> Plan:
    """rhoABM: the rhoAB predictor with ``points`` points and the rho-Adams-Moulton corrector through the new eps
    (``points`` + 1 points, no extra NFE); out of alpha = 0 (flow matching) the first step is corrected in data
    form. ``corrector=False``: rhoAB alone."""
    pts = _points(len(t) - 1, points, rho, lower_order_final, denoise_to_zero)
    rows = eps_ab_rows(schedule, t, rho, pts, "rho")
    if not corrector:
        return multistep_plan(name, schedule, t, rows, "eps")
    return eps_unic_plan(name, schedule, t, rho, rows, pts, disable_corrector, corrector_form="eps")


def data_ab_plan(name: str, schedule, t: np.ndarray, rho: np.ndarray, *, points: int,
                 lower_order_final: bool = False, rows: Callable[..., list] = data_ab_rows,
                 corrector: bool = False, disable_corrector: Sequence[int] = ()) -> Plan:
    """Data-form multistep plan; ``rows`` is the weight table: exact lambda-AB or ``dpmsolver_rows``."""
    pts = _points(len(t) - 1, points, rho, lower_order_final, True)
    pred = rows(schedule, rho, pts)
    corr = data_ab_rows(schedule, rho, pts[:-1], implicit=True) if corrector else None
    return multistep_plan(name, schedule, t, pred, "x0",
                          corrections=corrections(pred, corr, check_disable_corrector(disable_corrector)))


def eps_dpmsolver_plan(name: str, schedule, t: np.ndarray, rho: np.ndarray, *, points: int, variant: str = "midpoint",
                       lower_order_final: bool = False) -> Plan:
    """DPM-Solver multistep in the eps form (diffusers' ``algorithm_type="dpmsolver"``); ``variant`` is the order-2
    weight ('midpoint' or 'heun'; order 3 has one form). A final step to rho = 0 is first order."""
    pts = _points(len(t) - 1, points, rho, lower_order_final, True)
    return multistep_plan(name, schedule, t, dpmsolver_eps_rows(schedule, rho, pts, solver_type=variant), "eps")


def ipndm_plan(name: str, schedule, t: np.ndarray, rho: np.ndarray, *, points: int,
               lower_order_final: bool = False, corrector: bool = False, disable_corrector: Sequence[int] = (),
               denoise_to_zero: bool = False) -> Plan:
    pts = _points(len(t) - 1, points, rho, lower_order_final, denoise_to_zero)
    rows = ipndm_rows(schedule, rho, pts)
    if corrector:
        return eps_unic_plan(name, schedule, t, rho, rows, pts, disable_corrector)
    return multistep_plan(name, schedule, t, rows, "eps")


def multistep_plan(method: str, schedule, times: Sequence[float], rows: Sequence[StepRow], target: str,
                   noise_coefs: Sequence[float] | None = None,
                   corrections: Sequence[Sequence[float]] | None = None) -> Plan:
    """Plan of a linear multistep method: one Eval per step into a ring buffer of model outputs,
    then one Combine ``x <- state_coef * x + sum_j c_j * out_{i-j} (+ noise)``.

    ``corrections[i]`` (a corrector, UniC-style): right after Eval i, one more Combine
    ``x <- x + sum_j d_j * out_{i-j}`` corrects the state just evaluated (no extra NFE); empty = none.
    """
    corrections = corrections or [()] * len(rows)
    depth = max(max(len(r.coefs) for r in rows), max(len(c) for c in corrections))
    b = PlanBuilder(schedule, target)
    pure_noise = float(schedule.alpha(times[0])) == 0.0
    for i, row in enumerate(rows):
        # out of alpha = 0 the step is in data form (rows[0] is coefficients.pure_noise_row)
        b.eval(0, 1 + i % depth, times[i], "x0" if i == 0 and pure_noise else None)
        if any(corrections[i]):
            b.combine(0, [(1.0, 0)] + [(d, 1 + (i - j) % depth) for j, d in enumerate(corrections[i])])
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

