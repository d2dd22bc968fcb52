"""DEISFastScheduler on flow-matching configs (FlowMatchEuler, use_flow_sigmas) and zero-terminal-SNR VP configs,
on the analytic Gaussian mixture (fast): parity with FlowMatchEulerDiscreteScheduler / DDIMScheduler, sigmas and
mu from the pipeline, img2img via scale_noise, config mapping and errors."""
import warnings

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers", reason="needs diffusers: pip install -e '.[test]'")
from diffusers import (DDIMScheduler, DEISMultistepScheduler, DPMSolverMultistepScheduler,  # noqa: E402
                       FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler)

import deis_fast  # noqa: E402
from deis_fast.integrations.diffusers import DEISFastScheduler  # noqa: E402
from deis_fast.core.schedules import FlowSchedule, flux_mu, shift_times  # noqa: E402
from deis_fast.testing import GaussianMixture, reference_solution  # noqa: E402

from _diffusers_common import scheduler_loop  # noqa: E402

ALL_METHODS = list(deis_fast.METHOD_SPECS) + ["pfdiff"]
FLUX_CFG = dict(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                max_image_seq_len=4096)


@pytest.fixture(scope="module")
def mix():
    return GaussianMixture.random(6, 16, 0.3, seed=5)


def _noise(n=8, seed=2):
    return torch.randn(n, 16, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def _flow(method="ddim", **cfg):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return DEISFastScheduler.from_config(FlowMatchEulerDiscreteScheduler(**cfg).config, method=method)


def _stages(method):
    return 1 if method == "pfdiff" else deis_fast.METHOD_SPECS[method].stages


# --- the config mapping -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("source", [FlowMatchEulerDiscreteScheduler(shift=3.0),
                                    DEISMultistepScheduler(use_flow_sigmas=True, flow_shift=3.0,
                                                           prediction_type="flow_prediction"),
                                    DPMSolverMultistepScheduler(use_flow_sigmas=True, flow_shift=3.0,
                                                                prediction_type="flow_prediction"),
                                    UniPCMultistepScheduler(use_flow_sigmas=True, flow_shift=3.0,
                                                            prediction_type="flow_prediction")],
                         ids=["FlowMatchEuler", "DEIS", "DPMSolver", "UniPC"])
def test_flow_configs_are_accepted_and_mapped(source, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # solver_order etc.: the one "ignored keys" warning
        sch = DEISFastScheduler.from_config(source.config, method="tab3")
    assert sch.is_flow and sch.config.prediction_type == "flow_prediction"
    # a FlowMatchEuler config keeps FlowMatch's face (FLUX pipelines pass it their sigmas, as to FlowMatchEuler)
    assert sch.config.use_flow_sigmas == (not isinstance(source, FlowMatchEulerDiscreteScheduler))
    assert sch.schedule.shift == 3.0 and sch.schedule.time_scale == 1000.0
    assert sch.alphas_cumprod is None and sch.init_noise_sigma == 1.0
    sch.set_timesteps(6)
    t = np.asarray(sch.plan.times)
    np.testing.assert_allclose(t, shift_times(np.linspace(1, 0, 7), 3.0), atol=1e-15)  # the FLUX grid, shifted
    assert sch.timesteps.dtype == torch.float64 and float(sch.timesteps[0]) == 1000.0
    np.testing.assert_allclose(sch.timesteps.numpy(), 1000 * t[:-1])
    np.testing.assert_allclose(sch.sigmas.numpy(), t, rtol=1e-6)   # FlowMatch's sigma is t, ending at 0
    sch.save_config(tmp_path)
    back = DEISFastScheduler.from_pretrained(tmp_path)
    assert back.is_flow and back.schedule.shift == 3.0


@pytest.mark.parametrize("case", ["sd3_default", "flux_sigmas", "sd3_sigmas_terminal", "flux_default_linear"])
def test_ddim_equals_flowmatch_euler(mix, case):
    """method='ddim' is FlowMatchEulerDiscreteScheduler on the same sigmas (Euler in t is DDIM for this process):
    SD3's set_timesteps(n) (grid='diffusers'), FLUX's sigmas + mu, shift_terminal, the linear time shift."""
    n, mu, kw, grid = 8, None, {}, "diffusers"
    cfg = dict(shift=3.0)
    if case.startswith("flux"):
        cfg = dict(FLUX_CFG, time_shift_type="linear") if case.endswith("linear") else FLUX_CFG
        mu = flux_mu(1024) if not case.endswith("linear") else 2.5
    if case.endswith("sigmas") or case.endswith("terminal"):
        kw = dict(sigmas=np.linspace(1.0, 1.0 / n, n))
        grid = "auto"
    if case.endswith("terminal"):
        cfg["shift_terminal"] = 0.1
    ref = FlowMatchEulerDiscreteScheduler(**cfg)
    ours = _flow(**cfg)
    ours.register_to_config(grid=grid)
    model, z = mix.model(FlowSchedule(), "flow"), _noise()
    outs = []
    for sch in (ref, ours):
        sch.set_timesteps(None if kw else n, mu=mu, **kw)
        outs.append(scheduler_loop(sch, model, z.clone()))
    np.testing.assert_allclose(ours.timesteps.numpy(), ref.timesteps.double().numpy(), rtol=1e-6)
    np.testing.assert_allclose(ours.sigmas.numpy(), ref.sigmas.numpy(), rtol=1e-6, atol=1e-7)
    assert ours.plan.nfe == n and _rel(outs[1], outs[0]) <= 1e-5


@pytest.mark.parametrize("method", ALL_METHODS)
def test_every_method_from_flow_config(mix, method):
    """Each method makes exactly num_inference_steps calls from the pipeline's sigmas (resampled for Runge-Kutta
    and PFDiff), equals deis_fast.sample on the same plan, and lands near the exact endpoint."""
    n = 6 if _stages(method) < 4 else 8
    sch = _flow(method, **FLUX_CFG)
    mu = flux_mu(1024)
    sch.set_timesteps(sigmas=np.linspace(1.0, 1.0 / n, n), mu=mu)
    assert len(sch.timesteps) == sch.plan.nfe == n
    s = FlowSchedule(mu=mu)
    plan_grid = deis_fast.make_grid(s, "time_uniform", n * 3 - 2 if method == "pfdiff" else n // _stages(method))
    np.testing.assert_allclose(sch.plan.times, plan_grid, atol=1e-12)   # sigmas linspace(1, 1/n, n): uniform
    model, z = mix.model(s, "flow"), _noise()
    calls = []

    def counted(x, t):
        calls.append(float(t[0]))
        return model(x, t)
    x = scheduler_loop(sch, counted, z.clone())
    assert calls == [float(t) for t in sch.timesteps]
    y = deis_fast.Sampler(model, s, plan=sch.plan, prediction="flow")(z, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(x).all()
    if not sch.plan.num_noise:   # same plan; stochastic methods draw other noise
        assert _rel(x, y) <= 1e-12
        ref = reference_solution(mix, s, z, 1.0, 0.0)
        assert _rel(x, ref) < 0.5, method   # measured at 6-8 NFE: 0.10 (ipndm3) to 0.45 (rho_ssprk3)


@pytest.mark.parametrize("method,k", [("ddim", 3), ("tab3", 2), ("rho_heun", 3), ("pfdiff", 4)])
def test_flow_img2img_scale_noise_and_mid_start(mix, method, k):
    """img2img as the SD3 / FLUX img2img pipelines run it: set_begin_index(k), scale_noise at timesteps[k], then
    timesteps[k:]; equals deis_fast.sample(t_start=...) on the same grid, and FlowMatchEuler for ddim."""
    n = 8
    model = mix.model(FlowSchedule(), "flow")
    x0 = mix.sample_data(8, generator=torch.Generator().manual_seed(3)).double()
    z = _noise(seed=4)
    sch = _flow(method, shift=3.0)
    sch.set_timesteps(sigmas=np.linspace(1.0, 1.0 / n, n))
    sch.set_begin_index(k)
    tk = sch.timesteps[k:k + 1]
    xk = sch.scale_noise(x0, tk, z)
    t = float(tk) / 1000
    assert torch.allclose(xk, (1 - t) * x0 + t * z, rtol=0, atol=1e-14)
    out = scheduler_loop(sch, model, xk, start=k)
    ref = deis_fast.sample(model, xk, schedule=sch.schedule, method=method, nfe=n if method == "pfdiff" else None,
                           grid=list(sch.plan.times), t_start=float(sch.plan.evals[k].t), prediction="flow")
    assert _rel(out, ref) <= 1e-12
    if method == "ddim":
        fm = FlowMatchEulerDiscreteScheduler(shift=3.0)
        fm.set_timesteps(sigmas=np.linspace(1.0, 1.0 / n, n))
        fm.set_begin_index(k)
        xf = fm.scale_noise(x0, fm.timesteps[k:k + 1], z)
        assert _rel(scheduler_loop(fm, model, xf, start=k), out) <= 1e-5


def test_flow_errors_are_clear():
    with pytest.raises(ValueError, match="flow_prediction"):   # a flow config with an eps model
        DEISFastScheduler.from_config(FlowMatchEulerDiscreteScheduler().config, prediction_type="epsilon")
    with pytest.raises(ValueError, match="flow_prediction"):
        DEISFastScheduler(use_flow_sigmas=True, prediction_type="epsilon")
    dyn = _flow("tab3", **FLUX_CFG)
    with pytest.raises(ValueError, match="needs set_timesteps.*mu"):
        dyn.set_timesteps(6)
    static = _flow("tab3", shift=3.0)
    with pytest.warns(UserWarning, match="use_dynamic_shifting=False"):   # FluxPipeline passes mu for any config
        static.set_timesteps(6, mu=0.8)
    assert static.schedule.shift == 3.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # warned once per scheduler
        static.set_timesteps(6, mu=0.8)
    with pytest.raises(ValueError, match="only apply to flow"):
        DEISFastScheduler(use_dynamic_shifting=True)
    with pytest.raises(ValueError, match="only apply to flow"):
        DEISFastScheduler(shift_terminal=0.1)
    with pytest.raises(ValueError, match="flow_shift"):
        DEISFastScheduler(prediction_type="flow_prediction", shift=3.0, flow_shift=5.0)
    with pytest.raises(ValueError, match="no betas"):
        DEISFastScheduler(prediction_type="flow_prediction", rescale_betas_zero_snr=True)
    with pytest.raises(ValueError, match="float timesteps"):
        DEISFastScheduler(prediction_type="flow_prediction", timestep_type="int")
    with pytest.raises(ValueError, match="time_shift_type"):
        DEISFastScheduler(prediction_type="flow_prediction", time_shift_type="cubic")
    with pytest.raises(ValueError, match="flow-matching options"):
        DEISFastScheduler().set_timesteps(sigmas=[1.0, 0.5])
    sch = DEISFastScheduler(prediction_type="flow_prediction", method="tab3")
    assert sch.is_flow and sch.config.use_flow_sigmas   # flow_prediction alone means flow
    with pytest.raises(ValueError, match="decrease within"):
        sch.set_timesteps(sigmas=[0.5, 0.8])
    with pytest.raises(ValueError, match="not both"):
        sch.set_timesteps(sigmas=[1.0, 0.5], timesteps=[1000.0, 500.0])
    with pytest.raises(ValueError, match="num_inference_steps=4 but 2 sigmas"):
        sch.set_timesteps(4, sigmas=[1.0, 0.5])
    with pytest.raises(ValueError, match="must end at model time 0"):
        DEISFastScheduler(prediction_type="flow_prediction", grid=[1000.0, 500.0, 100.0]).set_timesteps(2)
    with pytest.raises(ValueError, match="needs the noise"):
        sch.scale_noise(torch.zeros(2), torch.tensor([500.0]))


def test_flow_explicit_timesteps_and_grid_are_model_times(mix):
    sch = DEISFastScheduler(prediction_type="flow_prediction", method="tab2")
    sch.set_timesteps(timesteps=[1000.0, 700.0, 300.0])
    assert sch.plan.times == (1.0, 0.7, 0.3, 0.0)   # as given (no shift) plus the end
    grid = DEISFastScheduler(prediction_type="flow_prediction", method="tab2", grid=[1000.0, 600.0, 200.0, 0.0])
    grid.set_timesteps(3)
    assert grid.plan.times == (1.0, 0.6, 0.2, 0.0)


# --- zero terminal SNR ------------------------------------------------------------------------------------------
ZSNR = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, rescale_betas_zero_snr=True,
            prediction_type="v_prediction")


def test_zero_snr_ddim_equals_diffusers_ddim(mix):
    """rescale_betas_zero_snr=True with a v model: the run starts at alpha = 0 (t = 999); method='ddim' equals
    DDIMScheduler (trailing spacing, the zero-SNR recipe) on the same timesteps; training arrays match."""
    ref = DDIMScheduler(timestep_spacing="trailing", set_alpha_to_one=False, clip_sample=False, **ZSNR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = DEISFastScheduler.from_config(ref.config, method="ddim")
    assert ours.schedule.zero_terminal_snr and float(ours.alphas_cumprod[-1]) == 0.0
    assert torch.allclose(ours.alphas_cumprod, ref.alphas_cumprod, rtol=1e-4, atol=1e-7)
    ref.set_timesteps(10)
    ours.set_timesteps(timesteps=ref.timesteps)
    assert torch.equal(ours.timesteps, ref.timesteps) and int(ours.timesteps[0]) == 999
    s = ours.schedule
    model, z = mix.model(s, "v"), _noise()
    outs = [scheduler_loop(sch, model, z.clone()) for sch in (ref, ours)]
    assert torch.isfinite(outs[1]).all() and _rel(outs[1], outs[0]) <= 1e-5


@pytest.mark.parametrize("method", ALL_METHODS)
def test_zero_snr_every_method_from_pure_noise(mix, method):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sch = DEISFastScheduler(method=method, **ZSNR)
    n = 6 if _stages(method) < 4 else 8
    sch.set_timesteps(n)
    assert sch.plan.evals[0].alpha == 0.0 and sch.plan.nfe == n
    model, z = mix.model(sch.schedule, "v"), _noise()
    x = scheduler_loop(sch, model, z.clone())
    y = deis_fast.Sampler(model, sch.schedule, plan=sch.plan, prediction="v")(z)
    assert torch.isfinite(x).all()
    if not sch.plan.num_noise:   # same plan; stochastic methods draw other noise
        assert _rel(x, y) <= 1e-12
