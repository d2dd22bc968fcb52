"""The k-diffusion functions under ComfyUI's conventions (no ComfyUI needed): seeds from extra_args, one-step
lists, the callback order and count, solving in a VP model's own time, PFDiff steps as network calls, and the
automatic lower-order final step. tests/integrations/test_comfyui.py runs the same paths inside ComfyUI itself."""
import importlib.util

import numpy as np
import pytest
import torch

import deis_fast
from deis_fast.integrations import k_diffusion as dk
from deis_fast.testing import GaussianMixture

VP = deis_fast.VPSchedule.discrete("scaled_linear", beta_start=0.00085, beta_end=0.012)   # SD 1.5's betas
SIGMAS_TABLE = VP.rho(np.arange(1000.0))      # ComfyUI's ModelSamplingDiscrete.sigmas
SMIN, SMAX = float(SIGMAS_TABLE[0]), float(SIGMAS_TABLE[-1])
VE = deis_fast.VESchedule(0.002, 80.0)
MIX = GaussianMixture.random(4, 8, 0.3, seed=3)
# a seed gives dpmpp_*_sde k-diffusion's Brownian-tree noise, which needs torchsde (the [comfyui] extra)
NEEDS_TORCHSDE = pytest.mark.skipif(importlib.util.find_spec("torchsde") is None,
                                    reason="seeded dpmpp_*_sde noise needs torchsde: pip install -e '.[comfyui]'")


def _sde(*methods):
    """Parametrize values: the dpmpp_*_sde ones marked NEEDS_TORCHSDE."""
    return [pytest.param(m, marks=NEEDS_TORCHSDE) if "sde" in m else m for m in methods]


def _denoiser(schedule):
    """A k-diffusion denoiser (x at sigma scale, x = x0 + sigma noise) from the analytic mixture."""
    base = MIX.model(deis_fast.VESchedule(1e-4, 1e4), "x0")

    def den(x, sigma, **kw):
        assert sigma.shape == (x.shape[0],)
        return base(x, sigma)
    return den


DEN = _denoiser(VE)


def _noise(b=6, seed=0):
    return torch.randn(b, 8, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("method", _sde("dpmpp_2m_sde", "dpmpp_3m_sde", "ddim_eta", "pfdiff_eta"))
def test_seed_in_extra_args_reproduces_the_sample(method):
    """ComfyUI passes its seed as extra_args['seed']: the same seed gives the same sample, another seed another."""
    sig = dk.get_sigmas_karras(8, 0.03, 14.6, dtype=torch.float64)
    if method == "pfdiff_eta":
        kw, sig = {"method": "ddim_eta", "pfdiff": (2, 1)}, dk.get_sigmas_karras(22, 0.03, 14.6, dtype=torch.float64)
    else:
        kw = {"method": method}
    x = _noise() * 14.6
    runs = [dk.sample_deis_fast(DEN, x, sig, extra_args={"seed": s}, disable=True, **kw) for s in (7, 7, 8)]
    torch.testing.assert_close(runs[0], runs[1], rtol=0, atol=0)
    assert _rel(runs[0], runs[2]) > 1e-3


@NEEDS_TORCHSDE
def test_brownian_tree_noise_sampler():
    """k-diffusion's Brownian-tree noise: unit variance per increment, reproducible from the seed, additive
    (the increments over [a, b] and [b, c] make the one over [a, c]), one tree per sample with a list of seeds."""
    x = torch.zeros(4, 3000)
    ns = dk.BrownianTreeNoiseSampler(x, 0.03, 14.6, seed=5)
    a = ns(14.6, 3.0)
    assert abs(float(a.std()) - 1) < 0.05
    torch.testing.assert_close(dk.BrownianTreeNoiseSampler(x, 0.03, 14.6, seed=5)(14.6, 3.0), a)
    w = lambda n, s0, s1: n(s0, s1) * abs(s1 - s0) ** 0.5  # noqa: E731
    torch.testing.assert_close(w(ns, 14.6, 3.0) + w(ns, 3.0, 1.0), w(ns, 14.6, 1.0), rtol=1e-4, atol=1e-4)
    per = dk.BrownianTreeNoiseSampler(x, 0.03, 14.6, seed=[1, 2, 3, 1])
    b = per(14.6, 3.0)
    torch.testing.assert_close(b[0], b[3])
    assert not torch.allclose(b[0], b[1])


@pytest.mark.parametrize("method", _sde("tab3", "ddim", "logrho3", "dpmpp3", "unipc3", "ipndm4", "ipndm_v", "rho_heun",
                                         "rho_rk4", "dpmpp_2m", "dpmpp_2m_sde", "ddim_eta", "pfdiff"))
def test_one_step_lists(method):
    """[sigma, 0] (SDTurboScheduler steps=1, karras 1) is one step to the denoised output; CONST [1, 0] too."""
    x = _noise() * 14.6
    out = dk.sample_deis_fast(DEN, x, torch.tensor([14.6, 0.0], dtype=torch.float64), method=method,
                              extra_args={"seed": 1}, disable=True)
    expect = DEN(x, torch.full((6,), 14.6, dtype=torch.float64))
    if method not in ("dpmpp_2m_sde", "ddim_eta"):
        assert _rel(out, expect) < 1e-12
    assert torch.isfinite(out).all()
    flow = MIX.model(deis_fast.FlowSchedule(time_scale=1.0), "x0")
    z = _noise()
    out = dk.sample_deis_fast(flow, z, torch.tensor([1.0, 0.0], dtype=torch.float64), method=method,
                              model_type="const", extra_args={"seed": 1}, disable=True)
    assert torch.isfinite(out).all()
    if method not in ("dpmpp_2m_sde", "ddim_eta"):
        assert _rel(out, flow(z, torch.ones(6, dtype=torch.float64))) < 1e-12
    # one sigma: nothing to do (k-diffusion returns x)
    assert dk.sample_deis_fast(DEN, x, torch.tensor([3.0]), method=method, disable=True) is x


@pytest.mark.parametrize("method", _sde("tab3", "dpmpp3", "unipc3", "rho_heun", "ipndm4", "pfdiff", "dpmpp_3m_sde",
                                         "ddim_eta"))
def test_callback_reaches_the_step_total(method):
    """One callback per step with i = 0 .. len(sigmas) - 2 (ComfyUI's progress total), PFDiff included when its
    steps are the calls (pfdiff_grid='resample')."""
    sig = dk.get_sigmas_karras(9, 0.03, 14.6, dtype=torch.float64)
    seen = []
    kw = {"pfdiff_grid": "resample"} if method == "pfdiff" else {}
    dk.sample_deis_fast(DEN, _noise() * 14.6, sig, method=method, callback=seen.append, disable=True,
                        extra_args={"seed": 0}, **kw)
    assert [d["i"] for d in seen] == list(range(len(sig) - 1))


def test_pfdiff_resample_counts_calls_and_given_grid_still_checks():
    calls = []

    def den(x, sigma):
        calls.append(float(sigma[0]))
        return DEN(x, sigma)
    sig = dk.get_sigmas_karras(11, 0.03, 14.6, dtype=torch.float64)
    dk.sample_pfdiff(den, _noise() * 14.6, sig, pfdiff_grid="resample", disable=True)
    assert len(calls) == 11
    seen = []
    calls.clear()
    base = dk.get_sigmas_karras(10, 0.03, 14.6, dtype=torch.float64)   # 10 = 4 * 3 - 2 steps: 4 calls
    dk.sample_pfdiff(den, _noise() * 14.6, base, callback=seen.append, disable=True)
    assert len(calls) == 4 and [d["i"] for d in seen] == [0, 3, 6, 9]   # the bar over 10 steps ends full
    with pytest.raises(ValueError, match="N\\*3 - 2"):
        dk.sample_pfdiff(den, _noise() * 14.6, sig, disable=True)


@pytest.mark.parametrize("method", ["tab3", "rhoab3", "ipndm4", "dpmpp3", "unipc3", "ddim"])
def test_vp_schedule_solves_in_the_models_own_time(method):
    """schedule=VP: the k-diffusion call (x at sigma scale) equals deis_fast.sample of the eps model in VP time on
    the same grid; tab3 then differs from tab3 in sigma (= rhoab3 in sigma)."""
    sig = dk.get_sigmas_karras(8, SMIN, SMAX, dtype=torch.float64)
    z = _noise()
    x = z * float(np.sqrt(1 + SMAX ** 2))        # ComfyUI's EPS noise scaling at sigma_max
    a = dk.sample_deis_fast(DEN, x, sig, method=method, schedule=VP, disable=True, lower_order_final=False)
    eps_vp = MIX.model(VP, "eps")
    b = deis_fast.sample(eps_vp, z, schedule=VP, method=method, nfe=None, grid={"rho": sig.tolist()},
                         prediction="eps", denoise_to_zero=True)
    assert _rel(a, b) < 1e-10
    if method == "tab3":
        in_sigma = dk.sample_deis_fast(DEN, x, sig, method="tab3", disable=True)
        assert _rel(in_sigma, dk.sample_deis_fast(DEN, x, sig, method="rhoab3", disable=True)) < 1e-12
        assert _rel(a, in_sigma) > 1e-4
    # a run that stops above 0 (ComfyUI splits runs) returns x at sigma scale there
    part = sig[:5]
    c = dk.sample_deis_fast(DEN, x, part, method=method, schedule=VP, disable=True)
    d = deis_fast.sample(eps_vp, z, schedule=VP, method=method, nfe=None, grid={"rho": part.tolist()},
                         prediction="eps")
    assert _rel(c, d * float(np.sqrt(1 + float(part[-1]) ** 2))) < 1e-10


def test_vp_float32_sigma_max_above_the_table():
    """ComfyUI's karras list starts at float32(sigma_max), which can lie a hair above the float64 table's last sigma
    (SD 1.5: t_from_rho gives 999.00002): solved at t_max, the model still gets the caller's sigma."""
    seen = []

    def den(x, sigma):
        seen.append(float(sigma[0]))
        return DEN(x, sigma)
    sig = dk.get_sigmas_karras(6, SMIN, SMAX * (1 + 2e-7), dtype=torch.float64)
    out = dk.sample_deis_fast(den, _noise() * SMAX, sig, schedule=VP, disable=True)
    assert torch.isfinite(out).all() and seen[0] == float(sig[0])


def test_vp_schedule_from_sigmas_round_trips():
    s = dk.vp_schedule_from_sigmas(torch.tensor(SIGMAS_TABLE, dtype=torch.float32))
    t = np.array([0.0, 10.0, 500.0, 999.0])
    np.testing.assert_allclose(s.rho(t), SIGMAS_TABLE[t.astype(int)], rtol=1e-6)
    with pytest.raises(ValueError, match="above the schedule's largest sigma"):
        dk.sample_deis_fast(DEN, _noise(), torch.tensor([2 * SMAX, 0.0]), schedule=VP, disable=True)


def test_lower_order_final_auto():
    """Third-order lambda / log-rho methods take a lower-order final step when the sigmas end in 0 after a small
    sigma (ComfyUI's karras / exponential lists); other methods and lists keep the full order."""
    sig = dk.get_sigmas_karras(8, 0.03, 14.6, dtype=torch.float64)
    x = _noise() * 14.6
    rows = [("unipc3", True), ("dpmpp3", True), ("logrho3", True), ("tab3", False), ("ipndm4", False)]
    if importlib.util.find_spec("torchsde") is not None:   # the seed's Brownian tree (NEEDS_TORCHSDE)
        rows.append(("dpmpp_3m_sde", False))
    for method, on in rows:
        auto = dk.sample_deis_fast(DEN, x, sig, method=method, disable=True, extra_args={"seed": 0})
        forced = dk.sample_deis_fast(DEN, x, sig, method=method, disable=True, lower_order_final=on,
                                     extra_args={"seed": 0})
        torch.testing.assert_close(auto, forced, rtol=0, atol=0, msg=method)
    off = dk.sample_deis_fast(DEN, x, sig[:-1], method="unipc3", disable=True)  # ends at 0.03, not 0: full order
    torch.testing.assert_close(off, dk.sample_deis_fast(DEN, x, sig[:-1], method="unipc3", disable=True,
                                                        lower_order_final=False))
    with pytest.raises(ValueError, match="lower_order_final"):
        dk.sample_deis_fast(DEN, x, sig, method="unipc3", disable=True, lower_order_final="sometimes")


@pytest.mark.parametrize("method", ["tab3", "rhoab3", "ipndm4", "ipndm_v", "tab3_pc"])
def test_final_step_into_zero_is_the_denoised_output(method):
    """k-diffusion's samplers (ComfyUI's ipndm, deis, ...) step into sigma = 0 with x <- denoised: so do these, so a
    list whose last positive sigma is large (ComfyUI's simple / normal) does not extrapolate a cubic over it."""
    kw = {"corrector": True} if method == "tab3_pc" else {}
    m = "tab3" if method == "tab3_pc" else method
    sig = torch.tensor([14.6, 6.0, 3.0, 1.5, 0.6, 0.0], dtype=torch.float64)
    seen = []
    x = _noise() * 14.6
    out = dk.sample_deis_fast(DEN, x, sig, method=m, callback=seen.append, disable=True, **kw)
    torch.testing.assert_close(out, seen[-1]["denoised"], rtol=1e-12, atol=1e-12)
    full = dk.sample_deis_fast(DEN, x, sig, method=m, disable=True, denoise_to_zero=False, **kw)
    assert _rel(full, out) > 1e-4


def test_seed_in_extra_args_reaches_only_a_denoiser_that_names_it():
    """Issue 33 item 17: ComfyUI's extra_args["seed"] seeds the noise; a plain k-diffusion denoiser (whose **kwargs
    go to the network) never gets it, ComfyUI's own denoiser (a named seed parameter) still does."""
    sig = dk.get_sigmas_karras(5, 0.03, 14.6, dtype=torch.float64)
    x = _noise() * 14.6

    def plain(x, sigma, **kw):
        if kw:
            raise TypeError(f"unexpected keyword argument {next(iter(kw))!r}")
        return DEN(x, sigma)
    got = []

    def comfy_like(x, sigma, denoise_mask=None, model_options={}, seed=None):
        got.append(seed)
        return DEN(x, sigma)
    for method in ("tab3", "ddim_eta", "rho_heun"):
        out = dk.sample_deis_fast(plain, x, sig, method=method, extra_args={"seed": 3}, disable=True)
        assert torch.isfinite(out).all()
        dk.sample_deis_fast(comfy_like, x, sig, method=method, extra_args={"seed": 3}, disable=True)
    assert got and set(got) == {3}


@pytest.mark.parametrize("method, kw, label", [("tab3", {"corrector": True}, "deis_fast tab3+corrector"),
                                               ("rho_heun", {}, "deis_fast rho_heun"),
                                               ("ddim", {"pfdiff": (2, 1), "pfdiff_grid": "resample"},
                                                "deis_fast pfdiff21:ddim")])
def test_console_bar_names_the_method_and_counts_steps(method, kw, label):
    """Issue 33 item 12: the console bar (ComfyUI shows it) names the method as configured (tab3_pc: tab3+corrector)
    and counts the SIGMAS' steps (a 10-step rho_heun: 10, not its network calls), reaching its total."""
    from tqdm import tqdm as std_tqdm
    sig = dk.get_sigmas_karras(10, 0.03, 14.6, dtype=torch.float64)
    seen = []

    def den(x, sigma, **k):
        seen.append([(b.desc, b.n, b.total) for b in list(std_tqdm._instances) if not b.disable])
        return DEN(x, sigma)
    dk.sample_deis_fast(den, _noise() * 14.6, sig, method=method, disable=False, **kw)
    assert all(len(s) == 1 and s[0][0] == label and s[0][2] == 10 for s in seen), seen[:3]
    ns = [s[0][1] for s in seen]
    assert ns == sorted(ns) and ns[-1] >= 8   # seen before the call reports: the last step starts after eight
