"""Coefficient engine: exponential-integrator multistep weights, float64, once per (schedule, grid, order).

Every multistep method in the library is a row table: step i maps the state and the last few
model outputs to the next state,

    x_{i+1} = state_coef[i] * x_i + sum_j coefs[i][j] * out_{i-j}

with ``out`` = eps (eps-form: tAB, rhoAB, log-rho AB, iPNDM) or the data prediction D (lambda-AB).
The weights are integrals of Lagrange basis polynomials, computed with composite Gauss-Legendre
quadrature split at the schedule's non-smooth points (exact for rhoAB, ~1e-15 elsewhere).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from .schedules import Schedule

__all__ = ["StepRow", "lagrange_integrals", "lagrange_integrals_inf", "pure_noise_row", "points_per_step", "history",
           "eps_ab_rows", "eps_am_rows", "data_ab_rows",
           "dpmsolver_rows", "dpmsolver_differences", "dpmsolver_eps_rows", "ipndm_rows", "IPNDM_WEIGHTS"]

_GL_X, _GL_W = np.polynomial.legendre.leggauss(12)

IPNDM_WEIGHTS: tuple[tuple[float, ...], ...] = (
    (1.0,),
    (3.0 / 2.0, -1.0 / 2.0),
    (23.0 / 12.0, -16.0 / 12.0, 5.0 / 12.0),
    (55.0 / 24.0, -59.0 / 24.0, 37.0 / 24.0, -9.0 / 24.0),
)


@dataclass(frozen=True)
class StepRow:
    """One step's update: ``x_next = state_coef * x + sum_j coefs[j] * out_{i-j}``."""

    state_coef: float
    coefs: tuple[float, ...]


def points_per_step(n_steps: int, points: int, lower_order_final: bool | Sequence[int] = False) -> list[int]:
    """History length per step: warm start (i+1 points at step i), optional lower-order final steps.

    ``lower_order_final``: True caps step i at the steps left (n_steps - i: first order on the last step, at most
    two points on the one before, ...); a sequence gives the caps of the last steps explicitly, the last entry
    for the last step (``(1,)``: only the last step is first order, diffusers' ``euler_at_final``)."""
    if isinstance(lower_order_final, (bool, np.bool_)):
        caps: tuple[int, ...] = tuple(range(n_steps, 0, -1)) if lower_order_final else ()
    else:
        caps = tuple(int(c) for c in lower_order_final)
        if any(c < 1 for c in caps):
            raise ValueError(f"lower_order_final caps must be >= 1, got {caps}")
    out = []
    for i in range(n_steps):
        p = min(points, i + 1)
        left = n_steps - i
        if left <= len(caps):
            p = min(p, caps[len(caps) - left])
        out.append(p)
    return out


def _quad_nodes(a: float, b: float, breaks: np.ndarray, pieces: int) -> tuple[np.ndarray, np.ndarray]:
    """Composite Gauss-Legendre nodes and weights on [a, b] (a > b allowed: signed weights)."""
    inner = np.sort(breaks[(breaks > min(a, b)) & (breaks < max(a, b))])
    if a > b:
        inner = inner[::-1]
    edges = np.concatenate([[a], inner, [b]])
    if pieces > 1:
        edges = np.concatenate([np.linspace(edges[k], edges[k + 1], pieces + 1)[:-1] for k in range(len(edges) - 1)]
                               + [[b]])
    lo, hi = edges[:-1, None], edges[1:, None]
    half = 0.5 * (hi - lo)
    x = (0.5 * (hi + lo) + half * _GL_X[None, :]).ravel()
    w = (half * _GL_W[None, :]).ravel()
    return x, w


def lagrange_integrals(a: float, b: float, nodes: Sequence[float], s_of_u: Callable[[np.ndarray], np.ndarray],
                       weight: Callable[[np.ndarray], np.ndarray] | None = None,
                       breaks: np.ndarray | None = None, pieces: int = 4) -> np.ndarray:
    """``C_j = int_a^b weight(u) * l_j(s(u)) du`` for the Lagrange basis l_j through ``nodes`` (in s)."""
    nodes = np.asarray(nodes, dtype=np.float64)
    if nodes.size == 1 and weight is None:
        return np.array([b - a])
    if np.unique(nodes).size != nodes.size:
        raise ValueError(f"Lagrange nodes must be distinct, got {nodes.tolist()}")
    u, w = _quad_nodes(a, b, np.empty(0) if breaks is None else np.asarray(breaks, dtype=np.float64), pieces)
    s = s_of_u(u)
    if weight is not None:
        w = w * weight(u)
    out = np.empty(nodes.size)
    for j in range(nodes.size):
        lj = np.ones_like(s)
        for m in range(nodes.size):
            if m != j:
                lj *= (s - nodes[m]) / (nodes[j] - nodes[m])
        out[j] = np.dot(w, lj)
    return out


def pure_noise_row(alpha_next: float, rho_target: float, sigma0: float) -> StepRow:
    """The first-order step out of alpha = 0 (rho = inf: flow matching at t = 1, zero terminal SNR), in data
    form: ``x' = alpha' (D + rho' eps)`` with ``eps = x / sigma0`` there (exact, since x = sigma0 eps). The
    limit of DDIM (and of every method's first step); its one output is the data prediction D."""
    return StepRow(float(alpha_next * rho_target / sigma0), (float(alpha_next),))


def history(i: int, p: int, implicit: bool = False) -> np.ndarray:
    """Grid indices of the nodes step i interpolates, newest first: i, i-1, ..., i-p+1 (clipped at 0);
    ``implicit`` prepends the step's end point i+1 (the Adams-Moulton / corrector nodes)."""
    idx = np.arange(i, max(i - p, -1), -1)
    return np.concatenate([[i + 1], idx]) if implicit else idx


def _starts_at_inf(rho: np.ndarray, i: int) -> bool:
    return i == 0 and bool(np.isinf(rho[0]))


def lagrange_integrals_inf(a: float, b: float, nodes: np.ndarray, s_of_u: Callable[[np.ndarray], np.ndarray],
                           **kw) -> np.ndarray:
    """:func:`lagrange_integrals` where infinite nodes (rho = inf or lambda = -inf at alpha = 0) are the limit of
    a node going to infinity: their basis polynomial vanishes and the others lose that factor (weight 0)."""
    nodes = np.asarray(nodes, dtype=np.float64)
    ok = np.isfinite(nodes)
    out = np.zeros(nodes.size)
    out[ok] = lagrange_integrals(a, b, nodes[ok], s_of_u, **kw)
    return out


def eps_ab_rows(schedule: Schedule, t: np.ndarray, rho: np.ndarray, points: Sequence[int], variable: str) -> list[StepRow]:
    """Eps-form exponential AB: ``x_{i+1} = a_{i+1}/a_i x_i + a_{i+1} sum_j C_ij eps_{i-j}``.

    ``C_ij = int_{rho_i}^{rho_{i+1}} l_j(s(rho)) d rho`` with the polynomial in ``variable``:
    't' (tAB-DEIS), 'rho' (rhoAB-DEIS) or 'logrho' (diffusers' DEIS).
    """
    def step(i: int, p: int, alpha: np.ndarray) -> StepRow:
        a, b = rho[i], rho[i + 1]
        hist = history(i, p)
        if variable == "rho":
            c = lagrange_integrals_inf(a, b, rho[hist], lambda u: u, pieces=1)
        elif variable == "logrho":
            if b == 0.0 and p > 1:
                raise ValueError("log-rho multistep cannot integrate to rho = 0 with more than one point")
            if p == 1:
                c = np.array([b - a])
            else:  # in s = log rho, d rho = e^s ds: a smooth integrand even over decades of rho (Beta grids)
                c = lagrange_integrals_inf(np.log(a), np.log(b), np.log(rho[hist]), lambda u: u, weight=np.exp,
                                           pieces=4)
        elif variable == "t":
            br = schedule.rho(schedule.knots(t[i + 1], t[i])) if schedule.discrete else None
            c = lagrange_integrals(a, b, t[hist], schedule.t_from_rho, breaks=br,
                                   pieces=1 if schedule.discrete else 6)
        else:
            raise ValueError(f"unknown interpolation variable {variable!r}")
        return StepRow(float(alpha[i + 1] / alpha[i]), tuple(float(alpha[i + 1] * x) for x in c))
    return _eps_rows(schedule, rho, points, step)


def eps_am_rows(schedule: Schedule, rho: np.ndarray, points: Sequence[int]) -> list[StepRow]:
    """Eps-form rho-Adams-Moulton rows (the corrector of rhoABM): row i recomputes point i+1 from x_i and
    eps_{i+1}, eps_i, ..., eps_{i-p+1}: ``C_ij = int_{rho_i}^{rho_{i+1}} l_j(rho) d rho`` (exact). Out of
    rho = inf (alpha = 0) the row is the data-form jump of :func:`pure_noise_row` over the new data prediction
    D_{i+1} (implicit Euler in u = alpha / sigma, where eps says nothing)."""
    alpha = schedule.alpha_from_rho(rho)
    rows = []
    for i, p in enumerate(points):
        if _starts_at_inf(rho, i):
            rows.append(pure_noise_row(alpha[1], rho[1], float(schedule.sigma_from_rho(rho[0]))))
            continue
        c = lagrange_integrals_inf(rho[i], rho[i + 1], rho[history(i, p, implicit=True)], lambda u: u, pieces=1)
        rows.append(StepRow(float(alpha[i + 1] / alpha[i]), tuple(float(alpha[i + 1] * x) for x in c)))
    return rows


def _data_form_rows(schedule: Schedule, rho: np.ndarray, points: Sequence[int],
                    weights: Callable[[np.ndarray, int, int], np.ndarray], eta: float = 0.0,
                    implicit: bool = False) -> list[StepRow]:
    """Rows ``x_{i+1} = s_{i+1}/s_i e^{-eta h} x_i + a_{i+1} sum_j E_ij D_{i-j}`` with ``E_i = weights(lam, i, p)``.

    A step that ends at rho = 0 is the exact first-order jump x = alpha * D. ``eta`` > 0 is the
    deterministic part of the data-form SDE step (its noise is added by the plan); ``implicit`` rows
    weigh ``D_{i+1}, D_i, ...`` (corrector) and have no first-order shortcut.
    """
    alpha = schedule.alpha_from_rho(rho)
    sigma = schedule.sigma_from_rho(rho)
    with np.errstate(divide="ignore"):
        lam = -np.log(rho)
    rows = []
    for i, p in enumerate(points):
        if rho[i + 1] == 0.0 or _starts_at_inf(rho, i):
            if implicit:   # no corrector on a step out of rho = inf (a step to rho = 0 has no Eval after it)
                rows.append(None)
                continue
            if eta > 0.0 and rho[i + 1] > 0.0:   # SDE out of rho = inf: e^{-eta h} = 0, the noise is the plan's
                rows.append(StepRow(0.0, (float(alpha[i + 1]),)))
            else:
                rows.append(pure_noise_row(alpha[i + 1], rho[i + 1], float(schedule.sigma_from_rho(rho[i]))))
            continue
        h = lam[i + 1] - lam[i]
        e = np.array([-np.expm1(-(1.0 + eta) * h)]) if p == 1 and not implicit else weights(lam, i, p)
        rows.append(StepRow(float(sigma[i + 1] / sigma[i] * np.exp(-eta * h)), tuple(float(alpha[i + 1] * x) for x in e)))
    return rows


def data_ab_rows(schedule: Schedule, rho: np.ndarray, points: Sequence[int], implicit: bool = False) -> list[StepRow]:
    """Data-form lambda-AB: ``E_ij = int_{lam_i}^{lam_{i+1}} exp(lam - lam_{i+1}) l_j(lam) d lam``, the exact
    integral of the Lagrange polynomial in lambda through the last ``p`` data predictions (``implicit``:
    and D_{i+1}, the lambda-Adams-Moulton corrector rows)."""
    def exact(lam: np.ndarray, i: int, p: int) -> np.ndarray:
        lb = lam[i + 1]
        return lagrange_integrals_inf(lam[i], lb, lam[history(i, p, implicit)], lambda u: u,
                                      weight=lambda u: np.exp(u - lb), pieces=2)
    return _data_form_rows(schedule, rho, points, exact, implicit=implicit)


def dpmsolver_rows(schedule: Schedule, rho: np.ndarray, points: Sequence[int],
                   solver_type: str = "midpoint", eta: float = 0.0) -> list[StepRow]:
    """DPM-Solver++ multistep (2M / 3M) exactly as published (Lu et al.; diffusers' and k-diffusion's code).

    Same data form as :func:`data_ab_rows`, but the history enters through the finite differences
    D1 = (D_i - D_{i-1}) / r0 (and D2) with the phi weights of the DPM-Solver code. Order-2 steps:
    ``solver_type="midpoint"`` weighs D1 by phi_1 / 2 (the paper's 2M); "heun" by phi_2 (= the exact
    lambda-AB step of ``data_ab_rows``). Order-3 steps (3M) weigh D2 by phi_3, which is half the
    exact integral of the quadratic interpolant, so 3M is not exact for quadratic D (see the tests).
    ``eta`` > 0: the deterministic part of the SDE variants (DPM-Solver++(2M/3M) SDE): the phi weights
    are taken at (1 + eta) h, the state is damped by e^{-eta h} (k-diffusion's ``sample_dpmpp_*_sde``).
    """
    if solver_type not in ("midpoint", "heun"):
        raise ValueError(f"solver_type must be 'midpoint' or 'heun', got {solver_type!r}")

    def published(lam: np.ndarray, i: int, p: int) -> np.ndarray:
        h = lam[i + 1] - lam[i]
        he = (1.0 + eta) * h
        phi1 = -np.expm1(-he)                 # 1 - e^{-h}
        phi2 = 1.0 - phi1 / he                # (e^{-h} - 1) / h + 1
        if np.isinf(lam[i - 1]):                 # the previous output was at alpha = 0: D1 -> 0 in the limit
            return np.array([phi1] + [0.0] * (p - 1))
        d1, d2 = dpmsolver_differences(lam, i, p)
        if p == 2:
            return np.array([phi1, 0.0]) + (0.5 * phi1 if solver_type == "midpoint" else phi2) * d1
        if np.isinf(lam[i - 2]):                 # r1 -> inf: D1 -> D1_0 and D2 -> 0
            return np.array([phi1, 0.0, 0.0]) + phi2 * np.array([1.0, -1.0, 0.0]) * d1[0]
        phi3 = (he - phi1) / he ** 2 - 0.5   # (e^{-h} - 1 + h) / h^2 - 1/2
        return np.array([phi1, 0.0, 0.0]) + phi2 * d1 - phi3 * d2
    return _data_form_rows(schedule, rho, points, published, eta=eta)


def dpmsolver_differences(lam: np.ndarray, i: int, p: int) -> tuple[np.ndarray, np.ndarray | None]:
    """DPM-Solver's history terms of step i over (out_i, out_{i-1}, ...), as weight vectors: p = 2,
    D1 = (out_i - out_{i-1}) / r0; p = 3, D1 = D1_0 + r0 / (r0 + r1) (D1_0 - D1_1) and D2 = (D1_0 - D1_1) / (r0 + r1),
    with r_k the previous lambda steps over this one (the forms of the DPM-Solver code, both algorithm types)."""
    h = lam[i + 1] - lam[i]
    r0 = (lam[i] - lam[i - 1]) / h
    d10 = np.array([1.0, -1.0] + [0.0] * (p - 2)) / r0
    if p == 2:
        return d10, None
    r1 = (lam[i - 1] - lam[i - 2]) / h
    d11 = np.array([0.0, 1.0, -1.0]) / r1
    return d10 + r0 / (r0 + r1) * (d10 - d11), (d10 - d11) / (r0 + r1)


def dpmsolver_eps_rows(schedule: Schedule, rho: np.ndarray, points: Sequence[int], solver_type: str = "midpoint",
                       scale: float = 1.0) -> list[StepRow]:
    """DPM-Solver multistep in the noise-prediction form (diffusers' ``algorithm_type="dpmsolver"``, orders 1-3):
    ``x_{i+1} = a_{i+1}/a_i x_i - s_{i+1} (phi D0 + w1 D1 + w2 D2)`` over eps, with phi = e^h - 1, w1 = phi / 2
    (midpoint) or phi / h - 1 (heun; always at order 3) and w2 = (phi - h) / h^2 - 1/2. ``scale`` = 2 is the
    deterministic part of ``"sde-dpmsolver"`` (its noise is the plan's). Order 1 is DDIM; a step to rho = 0 is
    DDIM's jump (never scaled)."""
    if solver_type not in ("midpoint", "heun"):
        raise ValueError(f"solver_type must be 'midpoint' or 'heun', got {solver_type!r}")
    with np.errstate(divide="ignore"):
        lam = -np.log(rho)

    def step(i: int, p: int, alpha: np.ndarray) -> StepRow:
        state = float(alpha[i + 1] / alpha[i])
        if rho[i + 1] == 0.0:
            return StepRow(state, (float(alpha[i + 1] * (rho[i + 1] - rho[i])),))
        if p == 1:   # -sigma' (e^h - 1) = alpha' (rho' - rho)
            return StepRow(state, (float(scale * alpha[i + 1] * (rho[i + 1] - rho[i])),))
        h = lam[i + 1] - lam[i]
        phi = np.expm1(h)
        d1, d2 = dpmsolver_differences(lam, i, p)
        w = np.zeros(p)
        w[0] = phi
        if p == 2:
            w += (0.5 * phi if solver_type == "midpoint" else phi / h - 1.0) * d1
        else:
            w += (phi / h - 1.0) * d1 + ((phi - h) / h ** 2 - 0.5) * d2
        sig = alpha[i + 1] * rho[i + 1]
        return StepRow(state, tuple(float(-scale * sig * x) for x in w))
    return _eps_rows(schedule, rho, points, step)


def ipndm_rows(schedule: Schedule, rho: np.ndarray, points: Sequence[int]) -> list[StepRow]:
    """iPNDM: fixed Adams-Bashforth weights on the rho grid (exact only on uniform rho steps)."""
    def step(i: int, p: int, alpha: np.ndarray) -> StepRow:
        h = rho[i + 1] - rho[i]
        return StepRow(float(alpha[i + 1] / alpha[i]), tuple(float(alpha[i + 1] * h * w) for w in IPNDM_WEIGHTS[p - 1]))
    return _eps_rows(schedule, rho, points, step)


def _eps_rows(schedule: Schedule, rho: np.ndarray, points: Sequence[int],
              step: Callable[[int, int, np.ndarray], StepRow]) -> list[StepRow]:
    """The rows of an eps-form multistep method: ``step(i, points_i, alpha)`` for each step, except a step out
    of rho = inf (alpha = 0: flow matching at t = 1, zero terminal SNR), which is the exact data-form jump."""
    alpha = schedule.alpha_from_rho(rho)
    rows = []
    for i, p in enumerate(points):
        if _starts_at_inf(rho, i):
            rows.append(pure_noise_row(alpha[1], rho[1], float(schedule.sigma_from_rho(rho[0]))))
        else:
            rows.append(step(i, p, alpha))
    return rows
