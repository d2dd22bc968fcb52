"""DEISFastScheduler and the rest of the diffusers scheduler contract, on the analytic Gaussian mixture (fast):
img2img from the middle, inpainting blends, attributes, spacing switches, thresholding, dense step counts, config."""
import json
import os
import warnings

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers", reason="needs diffusers: pip install -e '.[test]'")
from diffusers import DEISMultistepScheduler  # noqa: E402

import deis_fast  # noqa: E402
from deis_fast.integrations.diffusers import DEISFastScheduler  # noqa: E402
from deis_fast.core.adapters import convert_output, dynamic_threshold  # noqa: E402
from deis_fast.core.plan import Eval  # noqa: E402
from deis_fast.testing import GaussianMixture, reference_solution  # noqa: E402

from _diffusers_common import DEIS64, scheduler_loop as _loop  # noqa: E402

SCHED = deis_fast.VPSchedule.discrete("linear")
ALL_METHODS = [m for m in deis_fast.METHOD_SPECS] + ["pfdiff"]


@pytest.fixture(scope="module")
def mix():
    return GaussianMixture.random(6, 16, 0.3, seed=5)


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def _stages(method):
    return 1 if method == "pfdiff" else deis_fast.METHOD_SPECS[method].stages


# --- img2img: starting in the middle ---------------------------------------------------------------------------
@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("k", [1, 5, 8])
def test_mid_start_matches_deis_multistep(mix, order, k):
    """set_begin_index(k) then timesteps[k:]: logrho{order} equals DEISMultistepScheduler (cold history, lower-order
    warm start, lower-order final steps where the full run has them); before this fix sum|x| was 546 vs 315."""
    model = mix.model(SCHED)
    x0 = mix.sample_data(8, generator=torch.Generator().manual_seed(1)).double()
    z = torch.randn(x0.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    ref_s, ours = DEIS64(solver_order=order), DEISFastScheduler(method=f"logrho{order}")
    outs = []
    for sch in (ref_s, ours):
        sch.set_timesteps(10)
        sch.set_begin_index(k)
        outs.append(_loop(sch, model, sch.add_noise(x0, z, sch.timesteps[k:k + 1]), start=k))
    assert torch.equal(ours.timesteps, ref_s.timesteps)
    assert _rel(outs[1], outs[0]) <= 1e-5
    assert ours.step_index == 10 and ours.begin_index == k


@pytest.mark.parametrize("method,k", [("tab3", 4), ("logrho3", 8), ("dpmpp_3m", 3), ("ipndm4", 6), ("rho_heun", 4),
                                      ("rho_rk4", 1), ("rho_ssprk3", 2), ("rho_kutta3", 7), ("pfdiff", 2),
                                      ("rho_heun", 5), ("rho_heun", 11)])
def test_sample_t_start_equals_scheduler_img2img(mix, method, k):
    """deis_fast.sample(grid=the scheduler's grid, t_start=that Eval's time) == the scheduler run from timesteps[k]
    (with a begin index, and with the index found from the first timestep); RK starts inside a step included."""
    model = mix.model(SCHED)
    x0 = mix.sample_data(4, generator=torch.Generator().manual_seed(3)).double()
    z = torch.randn(x0.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    sch = DEISFastScheduler(method=method, timestep_type="float", lower_order_final=False)
    sch.set_timesteps(12)
    xk = sch.add_noise(x0, z, sch.timesteps[k:k + 1])
    sch.set_begin_index(k)
    a = _loop(sch, model, xk, start=k)
    sch.set_timesteps(12)
    b = _loop(sch, model, xk, start=k) if sch.index_for_timestep(sch.timesteps[k]) == k else a
    assert _rel(a, b) == 0.0
    calls = []

    def counted(x, t):
        calls.append(float(t[0]))
        return model(x, t)
    t_k = float(sch.plan.evals[k].t)
    ref = deis_fast.sample(counted, xk, schedule=SCHED, method=method, nfe=12 if method == "pfdiff" else None,
                           grid=list(sch.plan.times), t_start=t_k, lower_order_final=False)
    if method == "rho_heun" and k % 2 and k < 11:  # t_k is also the next step's first Eval: sample starts there
        assert len(calls) == 12 - k - 1
        return
    assert np.allclose(calls, sch.timesteps[k:].numpy(), rtol=1e-12, atol=1e-9)
    assert _rel(a, ref) <= 1e-12


@pytest.mark.slow
@pytest.mark.parametrize("method", ["tab3", "logrho3", "dpmpp3", "ipndm4", "rho_rk4", "rho_ssprk3", "pfdiff"])
def test_mid_start_converges_to_the_exact_ode_solution(method):
    """From the noised state at timesteps[k] (k ~ 40% in, inside an RK step when possible), the error to the
    exact probability-flow endpoint from that state shrinks as the grid is refined. (Mixture std 0.6: with
    std 0.3 dpmpp3 is still pre-asymptotic at 29 steps from t=500, for a fresh grid as well.)"""
    mix = GaussianMixture.random(6, 16, 0.6, seed=5)
    model = mix.model(SCHED)
    x0 = mix.sample_data(8, generator=torch.Generator().manual_seed(5)).double()
    z = torch.randn(x0.shape, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    errs = []
    for n in (12, 36):
        sch = DEISFastScheduler(method=method, timestep_type="float")
        sch.set_timesteps(n)
        k = int(0.4 * n) + (1 if _stages(method) > 1 else 0)
        t_k = float(sch.plan.evals[k].t)
        xk = sch.add_noise(x0, z, sch.timesteps[k:k + 1])
        sch.set_begin_index(k)
        x = _loop(sch, model, xk, start=k)
        exact = reference_solution(mix, SCHED, xk, t_k, float(sch.plan.times[-1]))
        errs.append(_rel(x, exact))
    assert errs[1] < errs[0] / 2 and errs[1] < 1e-2, errs  # PFDiff: first-order base, ~3x per 3x NFE


def test_set_begin_index_validates():
    sch = DEISFastScheduler(method="tab3")
    sch.set_timesteps(5)
    with pytest.raises(ValueError, match="past the last"):
        sch.set_begin_index(5)
    with pytest.raises(ValueError, match="int >= 0"):
        sch.set_begin_index(-1)
    sch.set_begin_index(0)
    x = torch.randn(2, 3)
    fresh = DEISFastScheduler(method="tab3")
    fresh.set_timesteps(5)
    fresh.step(x, 3, x)   # not one of its timesteps: the last step, as diffusers' multistep schedulers do
    assert fresh.step_index == 5


def test_add_noise_exact_at_float_timesteps():
    sch = DEISFastScheduler()
    x0, z = torch.randn(3, 5, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)
    t = torch.tensor([0.0, 321.25, 998.5], dtype=torch.float64)
    y = sch.add_noise(x0, z, t)
    a, s = SCHED.alpha(t.numpy()), SCHED.sigma(t.numpy())
    assert torch.allclose(y, torch.from_numpy(a)[:, None] * x0 + torch.from_numpy(s)[:, None] * z, rtol=0, atol=1e-15)
    # integer timesteps: the same as diffusers' training-time add_noise (float32 alphas_cumprod)
    ref = diffusers.DDPMScheduler().add_noise(x0.float(), z.float(), torch.tensor([0, 321, 998]))
    assert torch.allclose(sch.add_noise(x0, z, torch.tensor([0, 321, 998])).float(), ref, atol=1e-5)


# --- inpainting ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["tab3", "logrho3", "dpmpp3", "rho_heun", "rho_rk4", "pfdiff", "ipndm4"])
def test_inpainting_blend_between_steps_equals_core_known_mask(mix, method):
    """The inpainting pipelines overwrite the state's known region with add_noise(known, noise, next timestep)
    after every step; the scheduler keeps model outputs (not states) in its history, so this equals the core API
    Sampler(...)(noise, known=, mask=), which blends every state the network sees."""
    model = mix.model(SCHED)
    known = mix.sample_data(4, generator=torch.Generator().manual_seed(7)).double()
    noise = torch.randn(known.shape, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    mask = (torch.arange(16) % 3 == 0).double()  # 1 = generate
    sch = DEISFastScheduler(method=method, timestep_type="float")
    sch.set_timesteps(12)

    def blend(x, t_next):
        target = known if t_next is None else sch.add_noise(known, noise, t_next.reshape(1))
        return (1 - mask) * target + mask * x
    x = _loop(sch, model, blend(noise, sch.timesteps[0]), blend=blend)
    s = deis_fast.Sampler(model, SCHED, plan=sch.plan)
    y = s(noise, known=known, mask=mask)
    keep = mask == 0
    a_end, s_end = float(SCHED.alpha(sch.plan.times[-1])), float(SCHED.sigma(sch.plan.times[-1]))
    assert torch.allclose(y[:, keep], a_end * known[:, keep] + s_end * noise[:, keep], atol=1e-12)
    assert _rel(x[:, ~keep], y[:, ~keep]) <= 1e-12
    assert _rel(deis_fast.sample(model, noise, SCHED, plan=sch.plan, known=known, mask=mask), y) <= 1e-14


def test_inpainting_bad_inputs():
    model = GaussianMixture.random(2, 4, 0.3, seed=0).model(SCHED)
    noise = torch.randn(2, 4)
    s = deis_fast.Sampler(model, SCHED, nfe=3)
    with pytest.raises(ValueError, match="both known"):
        s(noise, known=noise)
    with pytest.raises(ValueError, match="shaped like the noise"):
        s(noise, known=noise[:1], mask=torch.ones(4))
    with pytest.raises(ValueError, match="does not broadcast"):
        s(noise, known=noise, mask=torch.ones(3))


# --- attributes and options ------------------------------------------------------------------------------------
@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_training_attributes_match_diffusers(beta_schedule):
    ref = DEISMultistepScheduler(beta_schedule=beta_schedule)
    ours = DEISFastScheduler(beta_schedule=beta_schedule, method="logrho2", beta_start=ref.config.beta_start,
                             beta_end=ref.config.beta_end)
    for name in ("betas", "alphas", "alphas_cumprod"):
        a, b = getattr(ours, name), getattr(ref, name)
        assert a.dtype == torch.float32 and a.shape == b.shape
        assert torch.allclose(a, b, rtol=2e-5, atol=1e-7), name
    assert torch.allclose(ours.sigmas, ref.sigmas, rtol=1e-3)  # diffusers: float32 1 - alphas_cumprod at small t
    ours.set_timesteps(7)
    ref.set_timesteps(7)
    assert torch.equal(ours.timesteps, ref.timesteps)
    # the last: sigma at t = 0, where diffusers' float32 alphas_cumprod (1 - 1e-4) is off by ~1e-4 relative
    assert torch.allclose(ours.sigmas[:-1], ref.sigmas[:-1], rtol=1e-5)
    assert torch.allclose(ours.sigmas[-1:], ref.sigmas[-1:], rtol=1e-3)
    assert ours.init_noise_sigma == 1.0 and ours.order == 1 and ours.num_inference_steps == 7
    assert ours.step_index is None and ours.begin_index is None


@pytest.mark.parametrize("key,grid", [("use_exponential_sigmas", "logsnr"), ("use_beta_sigmas", "beta"),
                                      ("use_karras_sigmas", "karras")])
def test_spacing_switches_choose_the_grid(key, grid):
    sch = DEISFastScheduler(method="tab3", timestep_type="float", **{key: True})
    sch.set_timesteps(8)
    assert np.allclose(sch.plan.times[:-1], deis_fast.make_grid(SCHED, grid, 8)[:-1], rtol=1e-12)
    with pytest.raises(ValueError, match="only one of"):
        DEISFastScheduler(use_beta_sigmas=True, use_karras_sigmas=True)


@pytest.mark.parametrize("key", ["use_exponential_sigmas", "use_beta_sigmas"])
def test_spacing_grids_equal_diffusers_sigmas(key):
    """diffusers spaces n sigmas from sigma_max to sigma_min (then repeats the last): our grid of n-1 steps."""
    n = 9
    ref = DEISMultistepScheduler(**{key: True})
    ref.set_timesteps(n)
    grid = {"use_exponential_sigmas": "logsnr", "use_beta_sigmas": "beta"}[key]
    rho = SCHED.rho(deis_fast.make_grid(SCHED, grid, n - 1))
    assert np.allclose(rho, ref.sigmas[:n].double().numpy(), rtol=2e-4)  # its sigma_min: float32, 8e-5 off


def test_beta_grid_parameters():
    a = deis_fast.make_grid(SCHED, "beta", 6)
    b = deis_fast.make_grid(SCHED, "beta", 6, beta_ab=(2.0, 2.0))
    assert a[0] == b[0] and a[-1] == b[-1] and not np.allclose(a, b)
    sch = DEISFastScheduler(method="tab3", use_beta_sigmas=True, beta_alpha=2.0, beta_beta=2.0, timestep_type="float")
    sch.set_timesteps(6)
    assert np.allclose(sch.plan.times[:-1], b[:-1])
    with pytest.raises(ValueError, match="Beta parameters"):
        deis_fast.make_grid(SCHED, "beta", 6, beta_ab=(0.0, 1.0))
    x = deis_fast.sample(GaussianMixture.random(2, 4, 0.3, seed=0).model(SCHED), torch.randn(2, 4), SCHED, "tab3",
                         nfe=6, grid="beta")
    assert torch.isfinite(x).all()


@pytest.mark.parametrize("method", ALL_METHODS)
def test_final_sigmas_type(method):
    n = 12
    zero = DEISFastScheduler(method=method, final_sigmas_type="zero")
    zero.set_timesteps(n)
    smin = DEISFastScheduler(method=method)
    smin.set_timesteps(n)
    assert float(zero.sigmas[-1]) == 0.0 and zero.plan.nfe == n
    assert float(smin.sigmas[-1]) == pytest.approx(float(SCHED.rho(0.0)))
    with pytest.raises(ValueError, match="final_sigmas_type"):
        DEISFastScheduler(final_sigmas_type="max")


@pytest.mark.parametrize("order", [1, 2, 3])
def test_thresholding_matches_deis_multistep(mix, order):
    """Dynamic thresholding on the x0 prediction (active here: |x0| quantiles exceed 1) == DEIS(thresholding=True)."""
    flat = mix.model(SCHED)

    def model(x, t):  # diffusers' thresholding wants (batch, channels, ...) states
        return flat(x.reshape(len(x), -1), t).reshape(x.shape)
    noise = torch.randn(8, 1, 16, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    kw = dict(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=1.3)
    ref_s = DEIS64(solver_order=order, **kw)
    ours = DEISFastScheduler(method=f"logrho{order}", **kw)
    plain = DEISFastScheduler(method=f"logrho{order}")
    xs = []
    for sch in (ref_s, ours, plain):
        sch.set_timesteps(10)
        xs.append(_loop(sch, model, noise.clone()))
    assert _rel(xs[1], xs[0]) <= 1e-5
    assert _rel(xs[2], xs[0]) > 1e-2  # thresholding changed the result


@pytest.mark.parametrize("pred", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize("target", ["eps", "x0"])
def test_threshold_applies_to_x0_before_conversion(pred, target):
    g = torch.Generator().manual_seed(0)
    x, raw = 3 * torch.randn(4, 50, generator=g, dtype=torch.float64), torch.randn(4, 50, generator=g, dtype=torch.float64)
    alpha = 0.6
    op = Eval(0, 1, 400.0, 400.0, alpha, (1 - alpha ** 2) ** 0.5, target)
    p = deis_fast.core.adapters.normalize_prediction(pred)
    x0 = convert_output(p, Eval(0, 1, 400.0, 400.0, op.alpha, op.sigma, "x0"), x, [(1.0, raw)])
    want = dynamic_threshold(x0, 0.9, 1.5)
    assert want.abs().max() <= 1.0 + 1e-12 and not torch.allclose(want, x0)
    got = convert_output(p, op, x, [(1.0, raw)], threshold=(0.9, 1.5))
    if target == "eps":
        got = (x - op.sigma * got) / op.alpha
    assert torch.allclose(got, want, atol=1e-12)


@pytest.mark.parametrize("method", ALL_METHODS)
def test_thresholding_runs_for_every_method(mix, method):
    model = mix.model(SCHED)
    noise = torch.randn(4, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    sch = DEISFastScheduler(method=method, thresholding=True, sample_max_value=1.2)
    sch.set_timesteps(12)
    x = _loop(sch, model, noise.clone())
    y = deis_fast.Sampler(model, SCHED, plan=sch.plan, threshold=(0.995, 1.2))(noise)
    assert torch.isfinite(x).all()
    if not sch.plan.num_noise:  # same plan and thresholding, different noise draws otherwise
        assert _rel(x, y) <= 1e-12


@pytest.mark.parametrize("n_train,n", [(25, 25), (25, 24), (1000, 999), (1000, 1000)])
@pytest.mark.parametrize("method,ttype", [("logrho3", "auto"), ("tab3", "int"), ("tab3", "auto"), ("ddim", "int")])
def test_dense_step_counts_deduplicate(n_train, n, method, ttype):
    sch = DEISFastScheduler(num_train_timesteps=n_train, method=method, timestep_type=ttype)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        sch.set_timesteps(n)
    dup = [w for w in rec if "round to an integer" in str(w.message)]
    ts = sch.timesteps.double().numpy()
    assert len(dup) <= 1 and np.all(np.diff(ts) < 0) and len(ts) <= n
    assert (len(ts) < n) == bool(dup)
    assert sch.plan.nfe == len(ts)


# --- config ------------------------------------------------------------------------------------------------------
def test_config_round_trips_and_subfolder(tmp_path):
    sch = DEISFastScheduler(method="dpmpp3", grid="logsnr", use_beta_sigmas=True, thresholding=True,
                            final_sigmas_type="zero", pfdiff=None, trained_betas=np.linspace(1e-4, 0.02, 1000))
    assert "kwargs" not in sch.config and "kwargs" not in sch.config.get("_use_default_values", [])
    assert DEISFastScheduler._deprecated_kwargs and "stochastic_sampling" in DEISFastScheduler._deprecated_kwargs
    sch.save_config(tmp_path / "scheduler")
    back = DEISFastScheduler.from_pretrained(tmp_path, subfolder="scheduler")
    assert {k: v for k, v in back.config.items() if not k.startswith("_")} == \
        {k: v for k, v in sch.config.items() if not k.startswith("_")}
    back.save_config(tmp_path / "again")
    first = json.loads(open(os.path.join(tmp_path, "scheduler", "scheduler_config.json")).read())
    second = json.loads(open(os.path.join(tmp_path, "again", "scheduler_config.json")).read())
    assert first == second and "kwargs" not in first
    assert {"DEISMultistepScheduler", "DPMSolverMultistepScheduler", "DDIMScheduler"} <= set(sch._compatibles)
    assert "EDMEulerScheduler" not in DEISFastScheduler._compatibles


@pytest.mark.parametrize("key", ["invert_sigmas", "stochastic_sampling"])
def test_process_changing_flow_keys_stay_refused(key):
    """FlowMatch's invert_sigmas / stochastic_sampling change the sampling process: refused, never ignored."""
    with pytest.raises(ValueError, match=key):
        DEISFastScheduler(**{key: True})
    cfg = dict(diffusers.FlowMatchEulerDiscreteScheduler(**{key: True}).config)
    with pytest.raises(ValueError, match=key):
        DEISFastScheduler.from_config(cfg)
