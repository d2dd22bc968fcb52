"""DPM-Solver++(2M/3M) SDE: parity with diffusers (sde-dpmsolver++) and with k-diffusion's published
sample_dpmpp_2m_sde / sample_dpmpp_3m_sde (written out below), eta = 0 reduction, per-sample seeds,
weak convergence on the mixture, bad input."""
from functools import partial

import numpy as np
import pytest
import torch

import deis_fast
from deis_fast.core.coefficients import dpmsolver_rows
from deis_fast.core.grids import grid_rho, make_grid
from deis_fast.integrations.k_diffusion import get_sigmas_karras, sample_dpmpp_2m_sde, sample_dpmpp_3m_sde
from deis_fast.solvers.multistep import data_ab_plan
from deis_fast.testing import GaussianMixture

SCHED = deis_fast.VPSchedule.discrete("linear")


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def mix():
    return GaussianMixture.random(8, 16, 0.3, seed=7)


@pytest.mark.parametrize("n", [6, 12, 20])
@pytest.mark.parametrize("solver_type", ["midpoint", "heun"])
def test_dpmpp_2m_sde_matches_diffusers(mix, n, solver_type):
    """Same timesteps, same noise (diffusers' variance_noise); diffusers steps in float32, hence ~1e-6."""
    diffusers = pytest.importorskip("diffusers", reason="needs diffusers: pip install -e '.[test]'")
    model = mix.model(SCHED)
    noise = torch.randn(8, 16, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    z = torch.randn(n, 8, 16, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    sch = diffusers.DPMSolverMultistepScheduler(solver_order=2, algorithm_type="sde-dpmsolver++",
                                                solver_type=solver_type, final_sigmas_type="sigma_min")
    sch.set_timesteps(n)
    sch.sigmas = sch.sigmas.double()
    ref = noise.clone()
    for k, t in enumerate(sch.timesteps):
        out = model(ref, torch.full((8,), float(t), dtype=torch.float64))
        ref = sch.step(out, t, ref, variance_noise=z[k]).prev_sample.double()
    grid = [float(t) for t in sch.timesteps] + [0.0]
    s = deis_fast.Sampler(model, SCHED, "dpmpp_2m_sde", None, grid, variant=solver_type, lower_order_final=n < 15)
    assert s.plan.num_noise == n
    x = s(noise, step_noise=z)
    assert _rel(x, ref) <= 1e-4, _rel(x, ref)
    other = deis_fast.Sampler(model, SCHED, "dpmpp_2m_sde", None, grid, eta=0.5, variant=solver_type,
                              lower_order_final=n < 15)(noise, step_noise=z)
    assert _rel(other, ref) > 100 * _rel(x, ref)  # a different eta is a different process


def kdiff_dpmpp_sde_reference(model, x, sigmas, noise, order, eta, s_noise, solver_type="midpoint"):
    """k-diffusion's sample_dpmpp_2m_sde (order 2) / sample_dpmpp_3m_sde (order 3), written out (VE,
    t = -log sigma); ``noise`` yields the draws its noise_sampler would give."""
    hist, hs = [], []
    for i in range(len(sigmas) - 1):
        d = model(x, sigmas[i] * x.new_ones([x.shape[0]]))
        if sigmas[i + 1] == 0:
            x = d
        else:
            h = float(torch.log(sigmas[i] / sigmas[i + 1]))
            he = h * (1 + eta)
            x = np.exp(-he) * x + (-np.expm1(-he)) * d
            phi2 = -np.expm1(-he) / -he + 1
            if order == 3 and len(hist) >= 2:
                r0, r1 = hs[-1] / h, hs[-2] / h
                d10, d11 = (d - hist[-1]) / r0, (hist[-1] - hist[-2]) / r1
                x = x + phi2 * (d10 + (d10 - d11) * r0 / (r0 + r1)) - (phi2 / he - 0.5) * (d10 - d11) / (r0 + r1)
            elif hist:
                w = 0.5 * -np.expm1(-he) if (order == 2 and solver_type == "midpoint") else phi2
                x = x + w * (d - hist[-1]) / (hs[-1] / h)
            if eta:
                x = x + next(noise) * sigmas[i + 1] * np.sqrt(-np.expm1(-2 * eta * h)) * s_noise
            hs.append(h)
        hist.append(d)
    return x


@pytest.mark.parametrize("order,solver_type", [(2, "midpoint"), (2, "heun"), (3, "heun")])
@pytest.mark.parametrize("eta,s_noise", [(1.0, 1.0), (0.5, 0.8)])
def test_sde_matches_k_diffusion(mix, order, solver_type, eta, s_noise):
    ve = deis_fast.VESchedule(0.002, 80.0)
    base = mix.model(ve, "x0")
    x0 = torch.randn(8, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 80.0
    sig = get_sigmas_karras(9, 0.002, 80.0, dtype=torch.float64)
    z = list(torch.randn(8, 8, 16, generator=torch.Generator().manual_seed(5), dtype=torch.float64).unbind())
    calls = []

    def noise_sampler(s, s_next):
        calls.append((float(s), float(s_next)))
        return z[len(calls) - 1]
    if order == 2:
        a = sample_dpmpp_2m_sde(base, x0, sig, disable=True, eta=eta, s_noise=s_noise, noise_sampler=noise_sampler,
                                solver_type=solver_type)
    else:
        a = sample_dpmpp_3m_sde(base, x0, sig, disable=True, eta=eta, s_noise=s_noise, noise_sampler=noise_sampler)
    assert calls == [(float(sig[i]), float(sig[i + 1])) for i in range(8)]  # one draw per noisy step, in order
    b = kdiff_dpmpp_sde_reference(base, x0, sig, iter(z), order, eta, s_noise, solver_type)
    assert _rel(a, b) < 1e-12, _rel(a, b)


@pytest.mark.parametrize("method,variant,ode", [("dpmpp_2m_sde", "midpoint", "dpmpp_2m"),
                                                ("dpmpp_2m_sde", "heun", "dpmpp2"), ("dpmpp_3m_sde", None, "3m_heun")])
def test_eta_zero_is_the_ode_solver(method, variant, ode):
    """eta = 0: no noise and the ODE plan's coefficients. 3M SDE's second step uses the heun weight (as
    k-diffusion's code does), so its ODE counterpart is published 3M with a heun warm start."""
    t = make_grid(SCHED, "logsnr", 9)
    a = deis_fast.build_plan(SCHED, method, None, list(t), eta=0.0, variant=variant)
    if ode == "3m_heun":
        b = data_ab_plan("3m", SCHED, t, grid_rho(SCHED, t), points=3, rows=partial(dpmsolver_rows, solver_type="heun"))
    else:
        b = deis_fast.build_plan(SCHED, ode, None, list(t))
    assert a.num_noise == 0 and len(a.ops) == len(b.ops)
    for p, q in zip(a.ops, b.ops):
        assert type(p) is type(q)
        if isinstance(p, deis_fast.Combine):
            np.testing.assert_allclose(p.coefs, q.coefs, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("method", ["dpmpp_2m_sde", "dpmpp_3m_sde"])
def test_per_sample_seeds(mix, method):
    """A sample depends only on its own seed, not on the batch it is drawn in."""
    model = mix.model(SCHED)
    noise = deis_fast.randn_per_sample((3, 16), [10, 11, 12], dtype=torch.float64)
    s = deis_fast.Sampler(model, SCHED, method, 8)
    batch = s(noise, generator=[torch.Generator().manual_seed(k) for k in (1, 2, 3)])
    alone = s(noise[1:2], generator=[torch.Generator().manual_seed(2)])
    torch.testing.assert_close(batch[1:2], alone, rtol=1e-12, atol=1e-12)
    other = s(noise, generator=[torch.Generator().manual_seed(k) for k in (1, 9, 3)])
    assert _rel(other[1:2], batch[1:2]) > 1e-3 and _rel(other[0:1], batch[0:1]) < 1e-12


@pytest.mark.slow
@pytest.mark.parametrize("method", ["dpmpp_2m_sde", "dpmpp_3m_sde"])
def test_weak_convergence_on_mixture(method):
    """Sample mean and covariance of many SDE samples approach the data's as NFE grows (measured: 2M SDE
    0.28 / 0.09 / 0.01, 3M SDE 0.15 / 0.05 / 0.008 at NFE 12 / 24 / 96; exact data samples: ~0.02)."""
    m = GaussianMixture.random(4, 2, 0.3, seed=11)
    mu = m.means.mean(0)
    cov = torch.eye(2, dtype=torch.float64) * 0.3 ** 2 + torch.cov(m.means.T, correction=0)
    n = 20000
    noise = torch.randn(n, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    errs = []
    for nfe in (12, 24, 96):
        x = deis_fast.sample(m.model(SCHED), noise, schedule=SCHED, method=method, nfe=nfe,
                             generator=torch.Generator().manual_seed(nfe))
        errs.append(float((x.mean(0) - mu).norm() + (torch.cov(x.T, correction=0) - cov).norm()))
    assert errs[2] < errs[1] < errs[0], errs
    assert errs[2] < 0.03, errs


@pytest.mark.parametrize("kwargs,match", [
    (dict(method="dpmpp_2m_sde", eta=-0.1), "eta must be a finite number >= 0"),
    (dict(method="dpmpp_3m_sde", s_noise=-1.0), "s_noise must be"),
    (dict(method="dpmpp_2m_sde", variant="rk"), "unknown variant 'rk'.*midpoint, heun"),
    (dict(method="dpmpp_3m_sde", variant="heun"), "has no variants"),
    (dict(method="dpmpp_2m_sde", corrector=True), "is an SDE method"),
    (dict(method="tab3", s_noise=0.5), "s_noise applies to the SDE methods"),
])
def test_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        deis_fast.build_plan(SCHED, nfe=8, **kwargs)
