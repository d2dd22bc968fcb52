"""Convergence order of every method against the exact ODE endpoint of an analytic mixture.

The asymptotic range (NFE 40-160) and margins were chosen from measured slopes: multistep methods
with a lower-order warm start approach their order from below; fixed-weight iPNDM is only order 2
on non-uniform grids, so it is tested on a grid uniform in rho, where its weights are exact.
"""
import numpy as np
import pytest

import deis_fast
from deis_fast.core.schedules import VESchedule, VPSchedule
from deis_fast.testing import reference_solution, relative_errors

# ODE-order tests: any initial state will do, so unit noise on the VE schedules is intended here
pytestmark = pytest.mark.filterwarnings("ignore:the noise has std")

CASES = {
    "vp_continuous": (VPSchedule.linear(), "logsnr", None),
    "ve": (VESchedule(0.02, 20.0), "karras", None),
    "vp_discrete": (VPSchedule.discrete("linear"), "logsnr", 1.0),
}
# (method, order, margin below the order allowed for the fitted slope)
METHODS = [("ddim", 1, 0.15), ("tab1", 2, 0.3), ("tab2", 3, 0.4), ("tab3", 4, 0.6), ("rhoab1", 2, 0.3),
           ("rhoab3", 4, 0.8), ("logrho2", 2, 0.25), ("logrho3", 3, 0.4), ("dpmpp2", 2, 0.25), ("dpmpp3", 3, 0.3),
           ("dpmpp_2m", 2, 0.25), ("unipc1", 2, 0.15), ("unipc2", 3, 0.2), ("unipc3", 4, 0.15),
           # "+c": corrector=True (UniC-style Adams-Moulton corrector, one order more); measured slopes in
           # benchmarks/RESULTS.md (tab3+c reaches ~4.5 of 5 in this NFE range: the warm-start steps dominate)
           ("ddim+c", 2, 0.25), ("tab2+c", 4, 0.4), ("tab3+c", 5, 1.0), ("rhoab3+c", 5, 1.0), ("logrho3+c", 4, 0.2),
           ("dpmpp2+c", 3, 0.3), ("dpmpp_2m+c", 3, 0.2),
           ("rho_euler", 1, 0.15), ("rho_heun", 2, 0.2), ("rho_midpoint", 2, 0.2), ("rho_kutta3", 3, 0.2),
           ("rho_ralston3", 3, 0.2), ("rho_heun3", 3, 0.2), ("rho_ssprk3", 3, 0.2), ("rho_rk4", 4, 0.2)]


@pytest.fixture(scope="module")
def references(small_mixture, small_noise):
    out = {}
    for name, (s, _, t_end) in CASES.items():
        te = s.t_min if t_end is None else t_end
        out[name] = reference_solution(small_mixture, s, small_noise, s.t_max, te, rtol=1e-12, atol=1e-12)
    return out


def _slope(nfes, errs):
    return -np.polyfit(np.log(nfes), np.log(errs), 1)[0]


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("method,order,margin", METHODS, ids=[m[0] for m in METHODS])
def test_convergence_order(case, method, order, margin, small_mixture, small_noise, references):
    s, grid, t_end = CASES[case]
    method, corrected, _ = method.partition("+c")
    opts = {"corrector": True} if corrected else {}
    stages = deis_fast.METHOD_SPECS[method].stages
    nfes = [stages * k for k in (20, 40, 80)] if stages > 1 else ([40, 80, 160] if order > 2 else [20, 40, 80])
    model = small_mixture.model(s)
    errs = [float(relative_errors(deis_fast.sample(model, small_noise, schedule=s, method=method, nfe=n, grid=grid,
                                                   t_end=t_end, **opts), references[case]).mean()) for n in nfes]
    slope = _slope(nfes, errs)
    assert order - margin <= slope <= order + 0.6, f"{method} on {case}: errors {errs}, slope {slope:.2f}"


@pytest.mark.parametrize("case", list(CASES))
def test_published_dpm_solver_pp_3m_is_second_order(case, small_mixture, small_noise, references):
    """DPM-Solver++(3M) as published weighs its second difference by half the exact integral; measured
    slopes over NFE 80-320 are 1.7-2.3 (tending to 2), the exact 3-point lambda-AB (dpmpp3) ~3 on the same grids."""
    s, grid, t_end = CASES[case]
    model = small_mixture.model(s)
    nfes = [80, 160, 320]
    slopes = {}
    for m in ("dpmpp_3m", "dpmpp3"):
        errs = [float(relative_errors(deis_fast.sample(model, small_noise, schedule=s, method=m, nfe=n, grid=grid,
                                                       t_end=t_end), references[case]).mean()) for n in nfes]
        slopes[m] = _slope(nfes, errs)
    assert 1.6 <= slopes["dpmpp_3m"] <= 2.5 and slopes["dpmpp3"] >= slopes["dpmpp_3m"] + 0.5, slopes


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_ipndm_order_on_uniform_rho_grid(k, small_mixture, small_noise):
    s = VESchedule(0.05, 5.0)
    ref = reference_solution(small_mixture, s, small_noise, 5.0, 0.05, rtol=1e-12, atol=1e-12)
    nfes = [40, 80, 160]
    errs = []
    for n in nfes:
        grid = {"rho": np.linspace(5.0, 0.05, n + 1)}
        x = deis_fast.sample(small_mixture.model(s), small_noise, schedule=s, method=f"ipndm{k}", nfe=n, grid=grid)
        errs.append(float(relative_errors(x, ref).mean()))
    slope = _slope(nfes, errs)
    margin = {1: 0.15, 2: 0.25, 3: 0.4, 4: 0.6}[k]  # the order-1 warm-start step caps the asymptote; see module doc
    assert k - margin <= slope <= k + 0.6, f"ipndm{k}: errors {errs}, slope {slope:.2f}"


def test_ipndm_v_is_exact_ab_and_beats_fixed_weights_on_nonuniform_grid(small_mixture, small_noise):
    s = VPSchedule.linear()
    ref = reference_solution(small_mixture, s, small_noise, s.t_max, s.t_min, rtol=1e-12, atol=1e-12)
    m = small_mixture.model(s)
    ev = relative_errors(deis_fast.sample(m, small_noise, schedule=s, method="ipndm_v", nfe=160, grid="logsnr"), ref).mean()
    e4 = relative_errors(deis_fast.sample(m, small_noise, schedule=s, method="ipndm4", nfe=160, grid="logsnr"), ref).mean()
    assert ev < 0.5 * e4
