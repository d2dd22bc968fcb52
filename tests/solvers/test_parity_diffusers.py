"""Parity with diffusers where both implement the same method, configured identically."""
import numpy as np
import pytest
import torch

import deis_fast

diffusers = pytest.importorskip("diffusers", reason="needs diffusers: pip install -e '.[test]'")

SCHED = deis_fast.VPSchedule.discrete("linear")


@pytest.fixture(scope="module")
def problem(discrete_vp_problem):
    return discrete_vp_problem


def _run_diffusers(sch, model, noise):
    x = noise.clone()
    for t in sch.timesteps:
        eps = model(x, torch.full((x.shape[0],), float(t), dtype=torch.float64))
        x = sch.step(eps, t, x).prev_sample
    return x


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("n", [5, 8, 10, 20, 25])
def test_logrho3_matches_diffusers_deis(problem, n):
    """diffusers evaluates its closed-form DEIS coefficients in float32 from float32 sigmas; the
    difference ind_fn(rho_t) - ind_fn(rho_s0) cancels badly (up to ~6e-5 relative error in the
    result). With its sigmas promoted to float64 the same formulas agree with ours to < 1e-6."""
    model, noise = problem
    grid = None
    for promote, tol in ((True, 1e-5), (False, 2e-4)):
        sch = diffusers.DEISMultistepScheduler(solver_order=3)
        sch.set_timesteps(n)
        if promote:
            sch.sigmas = sch.sigmas.double()
        ref = _run_diffusers(sch, model, noise)
        grid = [float(t) for t in sch.timesteps] + [0.0]
        x = deis_fast.sample(model, noise, schedule=SCHED, method="logrho3", nfe=None, grid=grid,
                             lower_order_final=n < 15)
        assert _rel(x, ref) <= tol, (promote, _rel(x, ref))


@pytest.mark.parametrize("order", [1, 2])
def test_logrho_lower_orders_match_diffusers_deis(problem, order):
    model, noise = problem
    sch = diffusers.DEISMultistepScheduler(solver_order=order, lower_order_final=False)
    sch.set_timesteps(12)
    sch.sigmas = sch.sigmas.double()
    ref = _run_diffusers(sch, model, noise)
    grid = [float(t) for t in sch.timesteps] + [0.0]
    x = deis_fast.sample(model, noise, schedule=SCHED, method=f"logrho{order}", nfe=None, grid=grid)
    assert _rel(x, ref) <= 1e-5


@pytest.mark.parametrize("set_alpha_to_one", [False, True])
def test_ddim_matches_diffusers_ddim(problem, set_alpha_to_one):
    model, noise = problem
    sch = diffusers.DDIMScheduler(clip_sample=False, set_alpha_to_one=set_alpha_to_one, timestep_spacing="trailing")
    sch.set_timesteps(10)
    ref = _run_diffusers(sch, model, noise)
    ts = [float(t) for t in sch.timesteps]
    grid = {"rho": list(SCHED.rho(np.array(ts))) + [0.0 if set_alpha_to_one else float(SCHED.rho(0.0))]}
    x = deis_fast.sample(model, noise, schedule=SCHED, method="ddim", nfe=None, grid=grid)
    assert _rel(x, ref) <= 1e-5


def test_dpmpp1_equals_ddim(problem):
    model, noise = problem
    a = deis_fast.sample(model, noise, schedule=SCHED, method="dpmpp1", nfe=10, grid="logsnr")
    b = deis_fast.sample(model, noise, schedule=SCHED, method="ddim", nfe=10, grid="logsnr")
    assert _rel(a, b) <= 1e-12


@pytest.mark.parametrize("n", [6, 10, 20])
@pytest.mark.parametrize("method,order,solver_type", [("dpmpp_2m", 2, "midpoint"), ("dpmpp2", 2, "heun"),
                                                      ("dpmpp_3m", 3, "midpoint")])
def test_dpm_solver_pp_matches_diffusers(problem, n, method, order, solver_type):
    """DPM-Solver++ 2M/3M as diffusers runs them (its own lower_order_final rule below 15 steps).
    diffusers upcasts the sample to float32 inside step(), so agreement is ~1e-5, not 1e-12."""
    model, noise = problem
    sch = diffusers.DPMSolverMultistepScheduler(solver_order=order, algorithm_type="dpmsolver++",
                                                solver_type=solver_type, final_sigmas_type="sigma_min")
    sch.set_timesteps(n)
    sch.sigmas = sch.sigmas.double()
    ref = _run_diffusers(sch, model, noise)
    grid = [float(t) for t in sch.timesteps] + [0.0]
    x = deis_fast.sample(model, noise, schedule=SCHED, method=method, nfe=None, grid=grid, lower_order_final=n < 15)
    assert _rel(x, ref) <= 1e-4, _rel(x, ref)
    other = "dpmpp3" if order == 3 else ("dpmpp2" if solver_type == "midpoint" else "dpmpp_2m")
    y = deis_fast.sample(model, noise, schedule=SCHED, method=other, nfe=None, grid=grid, lower_order_final=n < 15)
    assert _rel(y, ref) > 10 * _rel(x, ref)  # the neighbouring variant is a different method
