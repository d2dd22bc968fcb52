"""k-diffusion-style samplers on an analytic denoiser (k-diffusion itself is not needed)."""
import pytest
import torch

import deis_fast
from deis_fast.integrations.k_diffusion import (get_sigmas_karras, sample_deis, sample_deis_fast, sample_deis_logrho,
                                                sample_dpmpp_2m, sample_dpmpp_deis, sample_ipndm, sample_pfdiff,
                                                sample_rho_rk)
from deis_fast.testing import GaussianMixture, reference_solution, relative_errors

SMIN, SMAX = 0.002, 80.0
SCHED = deis_fast.VESchedule(SMIN, SMAX)


@pytest.fixture(scope="module")
def problem():
    mix = GaussianMixture.random(8, 16, 0.3, seed=1)
    noise = torch.randn(32, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x_start = noise * SMAX
    ref = reference_solution(mix, SCHED, x_start, SMAX, SMIN)
    calls = []
    base = mix.model(SCHED, "x0")

    def denoiser(x, sigma, scale=1.0):  # k-diffusion convention: sigma is [B], extra_args as kwargs
        assert sigma.shape == (x.shape[0],)
        calls.append(float(sigma[0]))
        return base(x, sigma) * scale
    return denoiser, x_start, ref, calls


def _err(x, ref):
    return float(relative_errors(x, ref).median())


def sample_euler(model, x, sigmas):
    """k-diffusion's sample_euler (deterministic), written out."""
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * x.new_ones([x.shape[0]]))
        x = x + (x - denoised) / sigmas[i] * (sigmas[i + 1] - sigmas[i])
    return x


def sample_dpmpp_2m_reference(model, x, sigmas):
    """k-diffusion's sample_dpmpp_2m, written out: data form in t = -log(sigma), midpoint D1 weight,
    first order on the first step and on the jump to sigma = 0."""
    old = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * x.new_ones([x.shape[0]]))
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            h = float(torch.log(sigmas[i] / sigmas[i + 1]))
            d = denoised
            if old is not None:
                r = float(torch.log(sigmas[i - 1] / sigmas[i])) / h
                d = (1 + 1 / (2 * r)) * denoised - 1 / (2 * r) * old
            x = (sigmas[i + 1] / sigmas[i]) * x - torch.expm1(torch.tensor(-h, dtype=x.dtype)) * d
        old = denoised
    return x


def test_dpmpp_2m_equals_k_diffusion_dpmpp_2m(problem):
    model, x0, _, _ = problem
    for sig in (get_sigmas_karras(10, SMIN, SMAX, dtype=torch.float64),
                get_sigmas_karras(7, SMIN, SMAX, dtype=torch.float64)[:-1]):   # with and without the final 0
        a = sample_dpmpp_2m(model, x0, sig, disable=True)
        b = sample_dpmpp_2m_reference(model, x0, sig)
        assert float((a - b).norm() / b.norm()) < 1e-12


def test_ddim_equals_k_diffusion_euler(problem):
    model, x0, _, _ = problem
    sig = get_sigmas_karras(12, SMIN, SMAX, dtype=torch.float64)
    a = sample_deis_fast(model, x0, sig, method="ddim", disable=True)
    b = sample_euler(model, x0, sig)
    assert float((a - b).norm() / b.norm()) < 1e-12


@pytest.mark.parametrize("fn,kw,tol10", [(sample_deis, {}, 0.08), (sample_deis_logrho, {}, 0.035),
                                         (sample_ipndm, {}, 0.08), (sample_rho_rk, {"method": "rho_rk4"}, 0.01)])
def test_accuracy_against_exact_ode(problem, fn, kw, tol10):
    """Runs ending at sigma_min are compared with the exact ODE endpoint there; a run of the same grid
    with a final step to sigma = 0 lands next to it (the last step moves x by ~sigma_min)."""
    model, x0, ref, calls = problem
    errs = []
    for n in (10, 20):
        sig = get_sigmas_karras(n, SMIN, SMAX, dtype=torch.float64)
        errs.append(_err(fn(model, x0, sig[:-1], disable=True, **kw), ref))
        del calls[:]
        x_zero = fn(model, x0, sig, disable=True, **kw)
        assert torch.isfinite(x_zero).all()
        assert _err(x_zero, ref) <= 1.2 * errs[-1] + 2e-3
        assert calls[-1] in (0.0, pytest.approx(SMIN))  # never calls the denoiser below 0
    assert errs[0] <= tol10, errs
    assert errs[1] < errs[0] / 3, errs


def test_pfdiff_and_dpmpp_run(problem):
    model, x0, ref, calls = problem
    del calls[:]
    x = sample_pfdiff(model, x0, get_sigmas_karras(28, SMIN, SMAX, dtype=torch.float64), disable=True)
    assert len(calls) == 10 and _err(x, ref) < 0.05
    x = sample_dpmpp_deis(model, x0, get_sigmas_karras(20, SMIN, SMAX, dtype=torch.float64), disable=True)
    assert _err(x, ref) < 0.05
    with pytest.raises(ValueError, match="N\\*3 - 2"):
        sample_pfdiff(model, x0, get_sigmas_karras(12, SMIN, SMAX), disable=True)


@pytest.mark.parametrize("name,kw", [("sample_deis", {}), ("sample_deis", {"corrector": True}),
                                     ("sample_unipc", {}), ("sample_rho_rk", {}), ("sample_dpmpp_2m_sde", {}),
                                     ("sample_ipndm", {})])
def test_callback_once_per_step_with_k_diffusion_indices(problem, name, kw):
    """k-diffusion's contract: one callback per step, i = 0, 1, ..., sigma = sigmas[i] — also for predictor-corrector
    plans (UniPC used to report each step twice) and Runge-Kutta (it reported NFE indices and stage sigmas) — made
    right after the step's network call, with x the state before the step (k-diffusion's and ComfyUI's order: a
    progress bar reaches len(sigmas) - 1) and denoised that call's output."""
    import deis_fast.integrations.k_diffusion as dk
    model, x0, _, _ = problem
    sig = get_sigmas_karras(6, SMIN, SMAX, dtype=torch.float64)
    seen = []
    out = getattr(dk, name)(model, x0, sig, callback=seen.append, disable=True, **kw)
    assert [d["i"] for d in seen] == list(range(6)), [d["i"] for d in seen]
    assert [d["sigma"] for d in seen] == pytest.approx(sig[:6].tolist())
    torch.testing.assert_close(seen[0]["x"], x0, rtol=0, atol=0)
    assert all(d["x"] is not x0 for d in seen) and len({id(d["x"]) for d in seen}) == 6  # fresh tensors
    # the denoised of step i is the model at (x before step i, sigma_i)
    torch.testing.assert_close(seen[3]["denoised"], model(seen[3]["x"], sig[3] * x0.new_ones(x0.shape[0])))


def test_sampler_callback_reports_each_step_once():
    """Sampler's callback: once per step for every plan shape (multistep, predictor-corrector in one or two state
    slots, Runge-Kutta stages, PFDiff springboards), the last one being the result."""
    mix = GaussianMixture.random(4, 8, 0.3, 0)
    sched = deis_fast.VPSchedule.discrete("linear")
    z = torch.randn(3, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for method, kw, calls in [("tab3", {}, 6), ("tab3", {"corrector": True}, 6), ("dpmpp3", {"corrector": True}, 6),
                              ("unipc2", {}, 6), ("rho_heun", {}, 3), ("pfdiff", {}, 6)]:
        seen = []
        out = deis_fast.Sampler(mix.model(sched), sched, method, 6, **kw)(z, callback=seen.append)
        assert len(seen) == calls, (method, kw, [d["i"] for d in seen])
        torch.testing.assert_close(seen[-1]["x"], out)
        assert [d["i"] for d in seen] == sorted(d["i"] for d in seen)


def test_callback_extra_args_and_rk_final_euler(problem):
    model, x0, _, calls = problem
    sig = get_sigmas_karras(6, SMIN, SMAX, dtype=torch.float64)
    seen = []
    x = sample_deis(model, x0, sig, extra_args={"scale": 1.0}, callback=seen.append, disable=True)
    assert [d["i"] for d in seen] == list(range(6))
    assert seen[0]["sigma"] == pytest.approx(SMAX) and set(seen[0]) == {"x", "i", "sigma", "sigma_hat", "denoised"}
    assert seen[-1]["denoised"].shape == x.shape
    y = sample_deis(model, x0, sig, extra_args={"scale": 0.5}, disable=True)
    assert not torch.allclose(x, y)
    del calls[:]
    sample_rho_rk(model, x0, sig, disable=True)  # Heun on 5 positive steps + k-diffusion's final Euler step
    assert len(calls) == 2 * 5 + 1 and calls[-1] == pytest.approx(sig[-2].item())
    with pytest.raises(ValueError, match="decreasing"):
        sample_deis(model, x0, sig.flip(0), disable=True)
