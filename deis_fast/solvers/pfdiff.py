"""PFDiff-k_h (Wang et al., 2024): timestep skipping with past-output reuse and a foresight jump.

For N NFE the base grid has M = N(k+1) - k intervals t_0 > ... > t_M. Step 0 is a plain first-order
step whose output fills the buffer Q. Then, for i = 1, k+2, 2k+3, ...:

    springboard  x~ = phi(Q, x_i, t_i -> t_{i+h})        (a Combine, no NFE)
    future       F  = model(x~, t_{i+h})                  (the only NFE)
    foresight    x_{i+k+1} = phi(F, x_i, t_i -> t_{i+k+1}) (a Combine, from x_i)
    Q = F

phi is the base solver's first-order step: DDIM in eps form, DDIM in data form ('dpmpp1'), or
stochastic DDIM (the springboard is deterministic, the foresight jump carries the eta noise).
The buffer holds what the base consumes: eps, D, or the CFG-guided combination of either.

Experimental (``experimental=True``): multistep eps-form bases (tab*, rhoab*, ipndm*). phi then
integrates the Lagrange polynomial through the last P buffered outputs at the times they were
evaluated (springboard times), in the base's variable (t for tab, rho for rhoab and ipndm).
"""
from __future__ import annotations

import numpy as np

from ..core.coefficients import lagrange_integrals_inf, pure_noise_row
from ..core.grids import BETA_AB, grid_rho, make_grid
from ..core.plan import Plan, PlanBuilder
from .multistep import start_eps_terms
from ..core.schedules import FlowSchedule
from .stochastic import ancestral_split

DEFAULT_KH = (2, 1)
FIRST_ORDER_BASES = ("ddim", "tab0", "rhoab0", "ipndm1", "logrho1", "rho_euler", "dpmpp1", "ddim_eta")


def pfdiff_preset(method: str, pfdiff: tuple[int, int] | None) -> tuple[str, tuple[int, int]]:
    """'pfdiff' = PFDiff-(2,1) on DDIM (the paper's usual recommendation) unless (k, h) is given."""
    return "ddim", tuple(pfdiff) if pfdiff is not None else DEFAULT_KH


def check_kh(kh) -> tuple[int, int]:
    try:
        k, h = (int(v) for v in kh)
    except (TypeError, ValueError):
        raise ValueError(f"pfdiff must be a pair (k, h) of ints, got {kh!r}") from None
    if k not in (1, 2, 3):
        raise ValueError(f"PFDiff k must be 1, 2 or 3, got k={k}")
    if not 1 <= h <= k:
        raise ValueError(f"PFDiff h must satisfy 1 <= h <= k (k={k}), got h={h}")
    return k, h


def pfdiff_plan(spec, schedule, nfe, grid, t_start, t_end, kh, *, eta: float = 1.0, karras_rho: float = 7.0,
                integer_timesteps: bool = False, experimental: bool = False, beta_ab=BETA_AB) -> Plan:
    k, h = check_kh(kh)
    if isinstance(nfe, bool) or not isinstance(nfe, (int, np.integer)) or nfe < 1:
        raise ValueError(f"PFDiff needs an integer nfe >= 1, got {nfe!r}")
    nfe = int(nfe)
    multistep = spec.family in ("eps_ab", "ipndm") and not spec.first_order
    if not spec.first_order and not (experimental and multistep):
        raise ValueError(f"PFDiff wraps a first-order base ({', '.join(FIRST_ORDER_BASES)}); {spec.name!r} is not. "
                         "Pass pfdiff_experimental=True to try it on a multistep eps-form base (tab*, rhoab*, ipndm*)")
    intervals = nfe * (k + 1) - k
    if nfe > 100_000:
        raise ValueError(f"nfe={nfe} is absurdly large")
    if integer_timesteps and schedule.discrete and intervals > schedule.num_train_timesteps - 1:
        raise ValueError(f"PFDiff-({k},{h}) with nfe={nfe} needs {intervals} grid intervals, more than the "
                         f"{schedule.num_train_timesteps - 1} integer timesteps; lower nfe or k")
    t = make_grid(schedule, grid, intervals, t_start, t_end, karras_rho=karras_rho, integer_timesteps=integer_timesteps,
                  beta_ab=beta_ab)
    if len(t) - 1 != intervals:
        raise ValueError(f"PFDiff-({k},{h}) with nfe={nfe} needs {intervals} grid intervals but the grid has "
                         f"{len(t) - 1} (integer rounding removed duplicates?); lower nfe or use a finer schedule")
    rho = grid_rho(schedule, t)
    # on flow matching DDIM is Euler in t; PFDiff then buffers the velocity v = eps - x0, as the official FLUX code
    flow_euler = isinstance(schedule, FlowSchedule) and spec.first_order and spec.family != "stochastic" \
        and spec.family != "data_ab"
    target = "x0" if spec.family == "data_ab" else ("flow" if flow_euler else "eps")
    stochastic = spec.family == "stochastic"
    points = spec.points if multistep else 1
    variable = spec.variable if multistep else "rho"  # ipndm -> exact AB in rho
    alpha = schedule.alpha_from_rho(rho)

    def s_of(tt: float, rr: float) -> float:
        return {"t": tt, "rho": rr, "logrho": float(np.log(rr))}[variable]

    b = PlanBuilder(schedule, target)
    x_slot, sb_slot = 0, 1
    hist = [2 + j for j in range(points)]            # ring of buffered outputs
    taus: list[tuple[float, float]] = []              # (t, rho) at which each buffered output was evaluated

    sig = schedule.sigma_from_rho(rho)

    def phi(dst: int, a: int, c: int, n_hist: int, noise: bool) -> None:
        """x_c (into dst) from x_a and the newest n_hist buffered outputs."""
        newest_slot = hist[(len(taus) - 1) % points]
        if target == "flow":                                        # Euler in t with the buffered velocity
            b.combine(dst, [(1.0, x_slot), (t[c] - t[a], newest_slot)])
            return
        if target == "x0":
            if rho[c] == 0.0:
                terms = [(alpha[c], newest_slot)]
            else:
                hstep = np.log(rho[a]) - np.log(rho[c])
                terms = [(sig[c] / sig[a], x_slot), (alpha[c] * -np.expm1(-hstep), newest_slot)]
            b.combine(dst, terms)
            return
        newest = [len(taus) - 1 - j for j in range(n_hist)]
        if noise and stochastic:
            down, up = ancestral_split(np.array([rho[a], rho[c]]), eta)
            rho_target, noise_coef = float(down[0]), float(alpha[c] * up[0])
        else:
            rho_target, noise_coef = rho[c], 0.0
        if n_hist == 1:
            cs = [rho_target - rho[a]]
        else:
            nodes = [s_of(*taus[j]) for j in newest]
            f = (lambda u: u) if variable == "rho" else (np.log if variable == "logrho" else schedule.t_from_rho)
            cs = list(lagrange_integrals_inf(rho[a], rho_target, nodes, f,
                                         breaks=schedule.rho(schedule.knots(t[c], t[a])) if schedule.discrete else None,
                                         pieces=1 if schedule.discrete else 6))
        terms = [(alpha[c] / alpha[a], x_slot)] + [(alpha[c] * cj, hist[j % points]) for cj, j in zip(cs, newest)]
        b.combine(dst, terms, noise_coef)

    # step 0: plain step
    taus.append((t[0], rho[0]))
    if np.isinf(rho[0]) and target == "eps":  # out of alpha = 0: data form, then eps0 = x0 / sigma0 in the buffer
        if stochastic:
            raise ValueError("PFDiff on ddim_eta cannot start at alpha = 0 (t_start = t_max of a flow or zero-SNR "
                             "schedule); use base 'ddim' or 'dpmpp1', or t_start < t_max")
        b.eval(x_slot, hist[0], t[0], "x0")
        row = pure_noise_row(alpha[1], rho[1], float(sig[0]))
        b.combine(x_slot, [(row.state_coef, x_slot), (row.coefs[0], hist[0])])
        b.combine(hist[0], start_eps_terms(schedule, t, row, x_slot, hist[0]))
    else:
        b.eval(x_slot, hist[0], t[0])
        phi(x_slot, 0, 1, 1, True)
    i = 1
    while i < intervals:
        n_hist = min(points, len(taus))
        phi(sb_slot, i, i + h, n_hist, False)                           # springboard from the past output(s)
        b.eval(sb_slot, hist[len(taus) % points], t[i + h])             # the future output F
        taus.append((t[i + h], rho[i + h]))
        phi(x_slot, i, i + k + 1, min(points, len(taus)), True)         # foresight jump from x_i
        i += k + 1
    names = ["x", "springboard"] + [f"{target}[{j}]" for j in range(points)]
    label = f"pfdiff{k}{h}:{spec.name}" + ("" if spec.first_order else "(experimental)")
    return b.build(label, 2 + points, t, names)
