"""Flow matching (FlowSchedule, prediction 'flow') and zero-terminal-SNR schedules: every method starts at
alpha = 0 with finite coefficients, against the exact ODE endpoint of the analytic mixture."""
import numpy as np
import pytest
import torch

import deis_fast
from deis_fast.core.grids import GRIDS, make_grid
from deis_fast.core.schedules import (FlowSchedule, VPSchedule, flow_schedule_from_diffusers_config, flux_mu,
                                 schedule_from_diffusers_config, shift_times)
from deis_fast.testing import reference_solution, relative_errors

ALL = [m for m in deis_fast.METHOD_SPECS]


def _nfe(method, steps=6):
    return steps * (deis_fast.METHOD_SPECS[method].stages if method != "pfdiff" else 1)


@pytest.fixture(scope="module")
def flow_ref(small_mixture, small_noise):
    s = FlowSchedule()
    return s, reference_solution(small_mixture, s, small_noise, 1.0, 0.0, rtol=1e-12, atol=1e-12)


# --- schedule ----------------------------------------------------------------------------------------------------
def test_flow_schedule_quantities_and_inverses():
    s = FlowSchedule(time_scale=1000.0)
    t = np.random.default_rng(0).uniform(0.01, 0.99, 50)
    np.testing.assert_allclose(s.alpha(t), 1 - t)
    np.testing.assert_allclose(s.sigma(t), t)
    np.testing.assert_allclose(s.rho(t), t / (1 - t))
    np.testing.assert_allclose(s.lam(t), np.log((1 - t) / t))
    np.testing.assert_allclose(s.t_from_rho(s.rho(t)), t, rtol=1e-13)
    np.testing.assert_allclose(s.t_from_lambda(s.lam(t)), t, rtol=1e-12)
    np.testing.assert_allclose(s.model_time(t), 1000 * t)
    assert FlowSchedule(time_scale=1.0).model_time(0.3) == 0.3
    assert s.rho(1.0) == np.inf and s.t_from_rho(np.inf) == 1.0 and s.alpha(1.0) == 0.0
    assert s.sigma_from_rho(np.inf) == 1.0 and s.alpha_from_rho(np.inf) == 0.0


def test_shifts_are_grid_transforms():
    t = np.linspace(0, 1, 11)
    # SD3: t' = s t / (1 + (s - 1) t) multiplies rho by s
    s3 = FlowSchedule(3.0)
    np.testing.assert_allclose(s3.rho(shift_times(t[1:-1], 3.0)), 3 * s3.rho(t[1:-1]), rtol=1e-12)
    # FLUX: e^mu / (e^mu + 1/t - 1) is the same map with shift = e^mu; mu from the token count as diffusers
    mu = flux_mu(1024)
    assert flux_mu(256) == pytest.approx(0.5) and flux_mu(4096) == pytest.approx(1.15)
    np.testing.assert_allclose(FlowSchedule(mu=mu).grid_transform(t[1:]), np.exp(mu) / (np.exp(mu) + 1 / t[1:] - 1))
    assert FlowSchedule.flux(image_seq_len=1024).shift == pytest.approx(np.exp(mu))
    np.testing.assert_allclose(s3.grid_transform(s3.grid_transform(t), inverse=True), t, atol=1e-15)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_default_grid_is_diffusers_flowmatch_grid(shift):
    n = 8
    plan = deis_fast.build_plan(FlowSchedule(shift), "ddim", n)
    sig = shift_times(np.linspace(1.0, 1.0 / n, n), shift)   # FLUX pipeline: linspace(1, 1/N, N), shifted, then 0
    np.testing.assert_allclose(plan.times, np.append(sig, 0.0), atol=1e-14)


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_every_named_grid_and_explicit_lists(grid, shift):
    s = FlowSchedule(shift)
    t = make_grid(s, grid, 7)
    assert t[0] == 1.0 and t[-1] == 0.0 and np.all(np.diff(t) < 0) and t.size == 8
    user = [1.0, 0.8, 0.3, 0.05, 0.0]
    np.testing.assert_array_equal(make_grid(s, user, None), user)      # explicit lists are used as given
    assert make_grid(s, grid, 7, t_start=0.9, t_end=0.05)[[0, -1]].tolist() == [0.9, 0.05]


@pytest.mark.parametrize("dynamic", [False, True])
def test_flow_config_maps_to_diffusers_sigmas(dynamic):
    """FlowMatchEuler configs (SD3 static shift; FLUX dynamic shift with mu and the pipeline's sigma list) give the
    same sigmas as diffusers' set_timesteps."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    n, mu = 7, None
    if dynamic:
        cfg = dict(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                   max_image_seq_len=4096)
        mu = flux_mu(1024)
    else:
        cfg = dict(shift=3.0)
    sch = FlowMatchEulerDiscreteScheduler(**cfg)
    sch.set_timesteps(n, sigmas=np.linspace(1.0, 1.0 / n, n), mu=mu)   # as the FLUX / SD3.5 pipelines call it
    s = flow_schedule_from_diffusers_config(sch.config, mu=mu)
    t = deis_fast.build_plan(s, "ddim", n).times
    np.testing.assert_allclose(t, sch.sigmas.double().numpy(), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(s.model_time(np.asarray(t[:-1])), sch.timesteps.double().numpy(), rtol=1e-6)


def test_flow_config_errors():
    with pytest.raises(ValueError, match="flow_prediction"):
        flow_schedule_from_diffusers_config(dict(use_flow_sigmas=True, prediction_type="epsilon"))
    with pytest.raises(ValueError, match="use_dynamic_shifting=False"):
        flow_schedule_from_diffusers_config(dict(shift=3.0), mu=0.8)
    with pytest.raises(ValueError, match="needs mu"):
        flow_schedule_from_diffusers_config(dict(use_dynamic_shifting=True))
    s = flow_schedule_from_diffusers_config(dict(use_flow_sigmas=True, flow_shift=5.0, prediction_type="flow_prediction"))
    assert s.shift == 5.0 and s.time_scale == 1000.0


def test_bad_flow_input_gets_clear_errors(small_mixture):
    with pytest.raises(ValueError, match="shift"):
        FlowSchedule(shift=0.0)
    with pytest.raises(ValueError, match="either shift or mu"):
        FlowSchedule(shift=2.0, mu=1.0)
    s = FlowSchedule()
    z = torch.randn(2, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match="alpha = 0"):   # an eps model says nothing about x0 at pure noise
        deis_fast.sample(small_mixture.model(s, "eps"), z, schedule=s, method="tab3", nfe=5, prediction="eps")
    with pytest.raises(ValueError, match="flow"):
        deis_fast.sample(small_mixture.model(s, "flow"), z, schedule=s, method="tab3", nfe=5, prediction="v")
    with pytest.raises(ValueError, match="outside the schedule's range"):
        deis_fast.make_grid(s, [1.2, 0.5, 0.0], None)


# --- prediction 'flow' -------------------------------------------------------------------------------------------
def test_flow_prediction_conversions(small_mixture):
    from deis_fast.core.adapters import _to_eps, _to_x0, normalize_prediction
    assert normalize_prediction("flow_prediction") == "flow"
    s = FlowSchedule()
    x = torch.randn(16, 8, dtype=torch.float64)
    for t in (1.0, 0.7, 0.2):
        a, sg = float(s.alpha(t)), float(s.sigma(t))
        eps, x0 = small_mixture.predict(x, a, sg)
        v = small_mixture.model(s, "flow")(x, torch.full((16,), 1000 * t, dtype=torch.float64))
        assert torch.isfinite(v).all()
        ae, be = _to_eps("flow", a, sg, False)
        ax, bx = _to_x0("flow", a, sg, False)
        torch.testing.assert_close(ae * x + be * v, eps, rtol=1e-12, atol=1e-12)   # eps = x + (1 - t) v
        torch.testing.assert_close(ax * x + bx * v, x0, rtol=1e-12, atol=1e-12)    # x0 = x - t v


# --- testing tools ------------------------------------------------------------------------------------------------
def test_reference_is_schedule_free_and_regular_at_pure_noise(small_mixture, small_noise):
    """The ODE in (xhat, rho) is the same for every schedule: flow from t=0.8 to 0.1 equals VP over the same rho."""
    f, vp = FlowSchedule(), VPSchedule.linear()
    small_noise = small_noise[:8]
    r0, r1 = float(f.rho(0.8)), float(f.rho(0.1))
    tv0, tv1 = float(vp.t_from_rho(r0)), float(vp.t_from_rho(r1))
    xf = reference_solution(small_mixture, f, small_noise, 0.8, 0.1)
    xv = reference_solution(small_mixture, vp, small_noise * float(vp.alpha(tv0) / f.alpha(0.8)), tv0, tv1)
    torch.testing.assert_close(xf / float(f.alpha(0.1)), xv / float(vp.alpha(tv1)), rtol=1e-8, atol=1e-8)
    # from exactly t = 1 is the limit of t -> 1
    x1 = reference_solution(small_mixture, f, small_noise, 1.0, 0.0)
    xe = reference_solution(small_mixture, f, small_noise * (1 - 1e-7), 1 - 1e-7, 0.0)
    assert (x1 - xe).abs().max() < 1e-5 and torch.isfinite(x1).all()


# --- every method from t = 1 --------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_every_method_starts_at_t1_with_finite_coefficients_and_converges(shift, small_mixture, small_noise):
    s, small_noise = FlowSchedule(shift), small_noise[:8]
    ref = reference_solution(small_mixture, s, small_noise, 1.0, 0.0)
    m = small_mixture.model(s, "flow")
    for method in ALL:
        plan = deis_fast.build_plan(s, method, _nfe(method))       # raises on a non-finite coefficient
        assert plan.times[0] == 1.0 and plan.evals[0].t == 1.0 and plan.nfe == _nfe(method)
        errs = [float(relative_errors(deis_fast.sample(m, small_noise, schedule=s, method=method, nfe=_nfe(method, n),
                                                       prediction="flow", generator=torch.Generator().manual_seed(0)),
                                      ref).mean()) for n in (6, 24)]
        if deis_fast.METHOD_SPECS[method].family not in ("stochastic", "sde"):  # those reach the data
            # distribution, not the ODE endpoint
            assert errs[1] < errs[0] * 0.5 and errs[1] < 0.1, (method, errs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_no_nan_at_low_precision(dtype, small_mixture, small_noise):
    s = FlowSchedule(3.0)
    m = small_mixture.model(s, "flow")
    for method in ALL + ["pfdiff"]:
        x = deis_fast.sample(m, small_noise.to(dtype), schedule=s, method=method, nfe=_nfe(method), prediction="flow",
                             generator=torch.Generator().manual_seed(0))
        assert x.dtype == dtype and torch.isfinite(x).all(), method


def _slope(nfes, errs):
    return -np.polyfit(np.log(nfes), np.log(errs), 1)[0]


# measured (default grid, NFE 20-80 per stage): the single-evaluation start is first order, so multistep
# methods run at ~2 on the flow mixture, exactly as when they start at t = 0.9 (no singularity); RK methods
# keep their order because the noisy half (rho > 1) runs in data form
FLOW_ORDERS = [("ddim", 1, 0.15), ("tab1", 2, 0.3), ("tab3", 2, 0.3), ("rhoab3", 2, 0.3), ("dpmpp3", 2, 0.4),
               ("logrho3", 2, 0.3), ("ipndm4", 2, 0.4), ("rho_heun", 2, 0.3), ("rho_kutta3", 3, 0.3),
               ("rho_rk4", 4, 0.3)]


@pytest.mark.slow
@pytest.mark.parametrize("method,order,margin", FLOW_ORDERS, ids=[m[0] for m in FLOW_ORDERS])
def test_flow_convergence_from_t1(method, order, margin, small_mixture, small_noise, flow_ref):
    s, ref = flow_ref
    m = small_mixture.model(s, "flow")
    st = deis_fast.METHOD_SPECS[method].stages
    nfes = [st * k for k in (20, 40, 80)]
    errs = [float(relative_errors(deis_fast.sample(m, small_noise, schedule=s, method=method, nfe=n,
                                                   prediction="flow"), ref).mean()) for n in nfes]
    # the same method started off the singularity (t = 0.9) on the same kind of grid
    ref9 = reference_solution(small_mixture, s, 0.9 * small_noise, 0.9, 0.0, rtol=1e-12, atol=1e-12)
    errs9 = [float(relative_errors(deis_fast.sample(m, 0.9 * small_noise, schedule=s, method=method, nfe=n,
                                                    prediction="flow", t_start=0.9), ref9).mean()) for n in nfes]
    slope, slope9 = _slope(nfes, errs), _slope(nfes, errs9)
    assert order - margin <= slope <= order + 0.7, (method, errs, slope)
    assert slope >= slope9 - 0.45, (method, slope, slope9)  # ipndm4 (fixed weights): 1.79 vs 2.20


CORRECTED = ["tab2", "tab3", "rhoab3", "logrho3", "ipndm4", "dpmpp3", "unipc2"]


@pytest.mark.parametrize("zero_snr", [False, True], ids=["flow", "zero_snr"])
def test_corrector_starts_at_pure_noise(zero_snr, small_mixture, small_noise):
    """corrector=True on every multistep family out of alpha = 0 (the eps-form ones take their first step in data
    form and start their eps history at x / sigma): finite coefficients, the first Eval at the singular end, and
    closer to the exact endpoint than without the corrector at NFE 20 (measured here, flow: tab3 2.4e-3 -> 1.5e-3,
    rhoab3 9.5e-3 -> 2.0e-3; zero SNR: tab3 4.3e-3 -> 1.7e-3)."""
    if zero_snr:
        s = schedule_from_diffusers_config(dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                                rescale_betas_zero_snr=True))
        pred, t0, t1 = "v", s.t_max, s.t_min
    else:
        s, pred, t0, t1 = FlowSchedule(), "flow", 1.0, 0.0
    ref = reference_solution(small_mixture, s, small_noise, t0, t1)
    m = small_mixture.model(s, pred)
    for method in CORRECTED:
        plan = deis_fast.build_plan(s, method, 20, corrector=True)
        assert plan.evals[0].alpha == 0.0 and plan.nfe == 20
        e = [float(relative_errors(deis_fast.sample(m, small_noise, schedule=s, method=method, nfe=20,
                                                    prediction=pred, corrector=c), ref).mean()) for c in (False, True)]
        # ipndm4's fixed weights are already close here (1.0e-3 -> 1.3e-3 on flow, 1.3e-3 -> 0.98e-3 on zero SNR)
        assert e[1] < (1.3 if method == "ipndm4" else 0.9) * e[0], (method, e)


def test_multistep_order_on_flow_is_set_by_the_warm_start(small_mixture, small_noise):
    """Why multistep methods measure ~2 on the flow mixture: away from t = 1 too (0.9 -> 0.1, uniform grid) tab2
    and tab3 have the same error (the common first-order first step dominates it) and it falls 4x per halving."""
    s = FlowSchedule()
    x = 0.9 * small_noise
    ref = reference_solution(small_mixture, s, x, 0.9, 0.1, rtol=1e-12, atol=1e-12)
    m = small_mixture.model(s, "flow")

    def err(method, n):
        y = deis_fast.sample(m, x, schedule=s, method=method, nfe=n, grid="time_uniform", prediction="flow",
                             t_start=0.9, t_end=0.1)
        return float(relative_errors(y, ref).mean())
    e2, e3, e3_fine = err("tab2", 80), err("tab3", 80), err("tab3", 160)
    assert abs(e3 / e2 - 1.0) < 0.05, (e2, e3)
    assert 3.5 < e3 / e3_fine < 4.5, (e3, e3_fine)


# --- PFDiff on flow -------------------------------------------------------------------------------------------------
def _official_pfdiff_flow(v_model, x, sigmas, k, h):
    """PFDiff-k_h as the official FLUX code: plain Euler first step, then springboard with the buffered v,
    future v, foresight Euler jump; ``sigmas`` has N(k+1) - k intervals."""
    def v(xx, t):
        return v_model(xx, torch.full((xx.shape[0],), 1000.0 * t, dtype=xx.dtype))
    q = v(x, sigmas[0])
    x = x + (sigmas[1] - sigmas[0]) * q
    i = 1
    while i < len(sigmas) - 1:
        x_sb = x + (sigmas[i + h] - sigmas[i]) * q
        q = v(x_sb, sigmas[i + h])
        x = x + (sigmas[i + k + 1] - sigmas[i]) * q
        i += k + 1
    return x


@pytest.mark.parametrize("k,h", [(1, 1), (2, 1), (2, 2), (3, 1)])
def test_pfdiff_on_flow_is_the_official_flux_algorithm(k, h, small_mixture, small_noise):
    n = 4
    m_int = n * (k + 1) - k
    sig = shift_times(np.linspace(1.0, 1.0 / m_int, m_int), 3.0).tolist() + [0.0]   # the user's full sigma list
    s = FlowSchedule()
    model = small_mixture.model(s, "flow")
    x = deis_fast.sample(model, small_noise, schedule=s, method="pfdiff", pfdiff=(k, h), nfe=n, grid=sig,
                         prediction="flow")
    ref = _official_pfdiff_flow(model, small_noise.clone(), sig, k, h)
    torch.testing.assert_close(x, ref, rtol=1e-12, atol=1e-12)
    plan = deis_fast.build_plan(s, "pfdiff", n, sig, pfdiff=(k, h))
    assert plan.nfe == n and plan.times == tuple(sig)


def test_pfdiff_data_base_from_t1_is_finite(small_mixture, small_noise):
    s = FlowSchedule(3.0)
    for base in ("dpmpp1", "tab1", "rhoab1"):
        x = deis_fast.sample(small_mixture.model(s, "flow"), small_noise, schedule=s, method=base, nfe=5,
                             prediction="flow", pfdiff=(2, 1), pfdiff_experimental=True)
        assert torch.isfinite(x).all()


# --- zero terminal SNR --------------------------------------------------------------------------------------------
def test_zero_terminal_snr_config_matches_diffusers():
    from diffusers import DDIMScheduler
    cfg = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
               rescale_betas_zero_snr=True, prediction_type="v_prediction")
    s = schedule_from_diffusers_config(cfg)
    ac = DDIMScheduler(**cfg).alphas_cumprod.double().numpy()
    assert s.zero_terminal_snr and s.alphas_cumprod[-1] == 0.0 and s.starts_at_pure_noise
    np.testing.assert_allclose(s.alphas_cumprod[:-1], ac[:-1], rtol=1e-4)  # diffusers computes in float32
    t = np.linspace(0, 999, 97)
    np.testing.assert_allclose(s.t_from_rho(s.rho(t)), t, atol=1e-7)   # incl. the alpha-linear last interval
    assert s.rho(999.0) == np.inf and np.isfinite(s.rho(998.5))


@pytest.mark.slow
def test_zero_terminal_snr_every_method_from_t_max(small_mixture, small_noise):
    small_noise = small_noise[:8]
    s = schedule_from_diffusers_config(dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                            rescale_betas_zero_snr=True))
    ref = reference_solution(small_mixture, s, small_noise, s.t_max, s.t_min)
    m = small_mixture.model(s, "v")
    for method in ALL:
        x = [deis_fast.sample(m, small_noise, schedule=s, method=method, nfe=_nfe(method, n), prediction="v",
                              generator=torch.Generator().manual_seed(0)) for n in (6, 24)]
        assert all(torch.isfinite(xx).all() for xx in x), method
        if deis_fast.METHOD_SPECS[method].family not in ("stochastic", "sde"):
            e = [float(relative_errors(xx, ref).mean()) for xx in x]
            assert e[1] < 0.6 * e[0], (method, e)
    with pytest.raises(ValueError, match="alpha = 0"):
        deis_fast.sample(small_mixture.model(s, "eps"), small_noise, schedule=s, method="dpmpp2", nfe=5)


# --- k-diffusion / ComfyUI CONST ----------------------------------------------------------------------------------
def test_flow_grid_that_stops_short_needs_t_end(small_mixture, small_noise):
    """diffusers' FlowMatch sigmas without the final 0 would return (1 - t) x0 + t noise: refused with a message
    naming both fixes; t_end says the early stop is meant (k-diffusion sigmas ending above 0 pass it)."""
    s = FlowSchedule()
    m = small_mixture.model(s, "flow")
    sigmas = list(np.linspace(1.0, 0.25, 13))
    with pytest.raises(ValueError, match=r"ends at t = 0.25.*Append 0.*t_end=0.25"):
        deis_fast.sample(m, small_noise, schedule=s, method="tab2", nfe=None, grid=sigmas, prediction="flow")
    part = deis_fast.sample(m, small_noise, schedule=s, method="tab2", nfe=None, grid=sigmas, prediction="flow",
                            t_end=0.25)
    ref = reference_solution(small_mixture, s, small_noise, 1.0, 0.25)
    assert float(relative_errors(part, ref).mean()) < 0.05
    full = deis_fast.sample(m, small_noise, schedule=s, method="tab2", nfe=None, grid=sigmas + [0.0], prediction="flow")
    assert torch.isfinite(full).all()
    from deis_fast.integrations.k_diffusion import sample_deis
    xk = sample_deis(lambda x, sg: x - sg.reshape(-1, 1) * m(x, 1000 * sg), small_noise, torch.tensor(sigmas),
                     disable=True, model_type="const", method="tab2")
    torch.testing.assert_close(xk, part, rtol=1e-10, atol=1e-10)


def test_k_diffusion_const_convention(small_mixture, small_noise):
    from deis_fast.integrations.k_diffusion import sample_deis, sample_pfdiff, sample_rho_rk
    s = FlowSchedule(time_scale=1.0)

    def denoiser(x, sigma):   # ComfyUI CONST: x = sigma noise + (1 - sigma) x0, returns x0
        return small_mixture.predict(x, 1 - sigma.reshape(-1, 1), sigma.reshape(-1, 1))[1]
    sig = torch.tensor(shift_times(np.linspace(1, 0, 12), 3.0))   # 11 steps (PFDiff-(1,1): 6 NFE)
    ref = reference_solution(small_mixture, s, small_noise, 1.0, 0.0)
    model = small_mixture.model(s, "x0")
    grid = sig.tolist()
    # the k-diffusion path steps into sigma = 0 as k-diffusion does (x <- denoised): denoise_to_zero
    cases = [(sample_deis, {}, dict(method="tab3", nfe=None, grid=grid, denoise_to_zero=True)),
             (sample_pfdiff, {"k": 1, "h": 1}, dict(method="ddim", nfe=6, grid=grid, pfdiff=(1, 1))),
             (sample_rho_rk, {}, dict(method="rho_heun", nfe=None, grid=grid[:-1], t_end=grid[-2]))]
    for fn, kw, direct_kw in cases:
        x = fn(denoiser, small_noise.clone(), sig, disable=True, model_type="const", **kw)
        direct = deis_fast.sample(model, small_noise, schedule=s, prediction="x0", **direct_kw)
        if fn is sample_rho_rk:  # k-diffusion's final Euler step to sigma = 0: x <- denoised
            direct = denoiser(direct, torch.full((direct.shape[0],), grid[-2], dtype=direct.dtype))
        torch.testing.assert_close(x, direct, rtol=1e-12, atol=1e-12)
        assert float(relative_errors(x, ref).mean()) < 0.1, fn.__name__
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        sample_deis(denoiser, small_noise, torch.tensor([2.0, 1.0, 0.0]), disable=True, model_type="const")
