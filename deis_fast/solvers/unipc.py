"""UniPC (Zhao et al., 2023, "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of
Diffusion Models"): predictor UniP-p plus corrector UniC, in the data-prediction form.

Both are data-form multistep rows in lambda = -log rho: ``x_{i+1} = s_{i+1}/s_i x_i + a_{i+1} sum_j E_j D_j``.
The history enters through divided differences ``(D_{i-k} - D_i) / r_k``, ``r_k = (lam_{i-k} - lam_i) / h``,
weighted by ``B(h) * rho_k`` where ``B(h) = h`` (variant bh1) or ``e^h - 1`` (bh2) and the rho_k solve the
order conditions ``R rho = b`` (``R_mk = r_k^m``, ``b_m = m! h phi_{m+1}(h) / B(h)``); UniP of order 2 uses
rho = 1/2 and UniC of order 1 rho = 1/2, as the paper and diffusers do. In the plan the corrector is one
extra Combine after each Eval (the corrected state minus the predicted one, applied in place), so the
next predictor starts from the corrected state at no extra NFE.
"""
from __future__ import annotations

from functools import partial
from typing import Sequence

import numpy as np

from ..core.coefficients import _data_form_rows
from ..core.plan import Plan
from .multistep import _points, check_disable_corrector, corrections, multistep_plan

VARIANTS = ("bh2", "bh1")


def _order_conditions(h: float, p: int, variant: str) -> tuple[float, np.ndarray]:
    """B(h) and b_m = m! * h phi_{m+1}(h) / B(h), m = 1..p, in the data form (the step variable is -h)."""
    hh = -h
    h_phi_k = np.expm1(hh) / hh - 1.0
    big_b = hh if variant == "bh1" else np.expm1(hh)
    b, fact = [], 1.0
    for m in range(1, p + 1):
        b.append(h_phi_k * fact / big_b)
        fact *= m + 1
        h_phi_k = h_phi_k / hh - 1.0 / fact
    return big_b, np.array(b)


def unipc_weights(lam: np.ndarray, i: int, p: int, *, variant: str, corrector: bool) -> np.ndarray:
    """Weights E of step i (p history points) over D_i, D_{i-1}, ... (UniP-p), or for the corrector
    (UniC-p) over D_{i+1}, D_i, D_{i-1}, ... A history point at lambda = -inf (alpha = 0, the start of a
    flow schedule) is the limit of a node going to infinity: it gets weight 0 and the order drops by one."""
    n_out = p + int(corrector)
    while p > 1 and np.isinf(lam[i - p + 1]):
        p -= 1
    w = _unipc_weights(lam, i, p, variant, corrector)
    return np.concatenate([w, np.zeros(n_out - w.size)])


def _unipc_weights(lam: np.ndarray, i: int, p: int, variant: str, corrector: bool) -> np.ndarray:
    h = lam[i + 1] - lam[i]
    r = (lam[i - np.arange(1, p)] - lam[i]) / h                      # r_1 .. r_{p-1}
    big_b, b = _order_conditions(h, p, variant)
    big_r = np.vander(np.append(r, 1.0), p, increasing=True).T        # R_mk = r_k^m
    off = int(corrector)
    w = np.zeros(p + off)
    w[off] = -np.expm1(-h)                                            # the first-order part, on D_i
    if corrector:
        rhos = np.array([0.5]) if p == 1 else np.linalg.solve(big_r, b)
        w[0] -= big_b * rhos[-1]                                      # rho_p (D_{i+1} - D_i)
        w[off] += big_b * rhos[-1]
        rhos = rhos[:-1]
    else:
        rhos = np.array([0.5]) if p == 2 else (np.linalg.solve(big_r[:-1, :-1], b[:-1]) if p > 2 else np.zeros(0))
    for k in range(1, p):                                             # rho_k (D_{i-k} - D_i) / r_k
        c = big_b * rhos[k - 1] / r[k - 1]
        w[off + k] -= c
        w[off] += c
    return w


def check_variant(variant: str, variants: Sequence[str], method: str) -> str:
    if variant not in variants:
        raise ValueError(f"unknown variant {variant!r} for {method!r}; valid variants: {', '.join(variants)}")
    return variant


def unipc_plan(name: str, schedule, t: np.ndarray, rho: np.ndarray, *, points: int, variant: str = "bh2",
               corrector: bool = True, disable_corrector: Sequence[int] = (), lower_order_final: bool = False) -> Plan:
    """UniPC-p: UniP-p predictor rows, UniC-p corrections after every Eval (``corrector=False``: UniP alone).
    A final step to rho = 0 is the exact first-order jump x = alpha * D."""
    check_variant(variant, VARIANTS, name)
    pts = _points(len(t) - 1, points, rho, lower_order_final, True)
    pred = _data_form_rows(schedule, rho, pts, partial(unipc_weights, variant=variant, corrector=False))
    corr = (_data_form_rows(schedule, rho, pts[:-1], partial(unipc_weights, variant=variant, corrector=True),
                            implicit=True) if corrector else None)
    return multistep_plan(name, schedule, t, pred, "x0",
                          corrections=corrections(pred, corr, check_disable_corrector(disable_corrector)))
