"""DEISFastScheduler as a drop-in for the schedulers users replace (issue #28): from_config(src.config,
method=<equivalent>, grid="diffusers") against the source scheduler in the same loop, with the same model outputs
(the analytic Gaussian mixture), over the source's documented keys; config round trips; the key table."""
import inspect
import json
import warnings

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers", reason="needs diffusers: pip install -e '.[test]'")
from diffusers import (DEISMultistepScheduler, DPMSolverMultistepScheduler,  # noqa: E402
                       FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler)

from deis_fast.integrations.diffusers import config as dc  # noqa: E402
from deis_fast.integrations.diffusers import DEISFastScheduler  # noqa: E402
from deis_fast.core.schedules import flux_mu  # noqa: E402
from deis_fast.testing import GaussianMixture  # noqa: E402

from _diffusers_common import parity_rel  # noqa: E402

TOL = 1e-5
PRED = {"epsilon": "epsilon", "v_prediction": "v_prediction", "sample": "sample", "flow_prediction": "flow"}


@pytest.fixture(scope="module")
def mix():
    return GaussianMixture.random(8, 16, 0.3, seed=7)


def _noise(seed=3):
    """Image-shaped states [16, 1, 4, 4] (diffusers' thresholding reshapes by channels)."""
    return torch.randn(16, 1, 4, 4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _loop(sch, model, x):
    for t in sch.timesteps:
        out = model(x.reshape(16, 16), torch.full((16,), float(t), dtype=torch.float64)).reshape(x.shape)
        x = sch.step(out, t, x).prev_sample
    return x


_rel = parity_rel   # records the measured differences under DEIS_FAST_PARITY_LOG


def _compare(mix, src, method, n, set_kw=None, **ours_kw):
    """Run the source scheduler (its float32 sigmas promoted to float64 after set_timesteps: its step arithmetic
    is float64 on float64 samples then) and DEISFastScheduler.from_config(src.config, method, grid='diffusers')."""
    set_kw = set_kw or {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # solver keys replaced by method=, the zero-SNR eps clamp: warned elsewhere
        ours = DEISFastScheduler.from_config(src.config, method=method, grid="diffusers", **ours_kw)
    src.set_timesteps(n, **set_kw)
    ours.set_timesteps(n if "sigmas" not in set_kw else None, **set_kw)
    np.testing.assert_allclose(ours.timesteps.double().numpy(), src.timesteps.double().numpy(), rtol=1e-6)
    np.testing.assert_allclose(ours.sigmas.numpy(), src.sigmas.float().numpy(), rtol=1e-6)
    src.sigmas = src.sigmas.double()
    pred = PRED[src.config.get("prediction_type", "flow_prediction")]
    model = mix.model(ours.schedule, pred)
    ref = _loop(src, model, _noise())
    x = _loop(ours, model, _noise())
    assert torch.isfinite(ref).all()
    return _rel(x, ref)


SPACINGS = [{}, dict(use_karras_sigmas=True), dict(use_exponential_sigmas=True), dict(use_beta_sigmas=True)]
SPACING_IDS = ["default", "karras", "exponential", "beta"]
FINALS = [dict(final_sigmas_type="zero"), dict(final_sigmas_type="sigma_min")]


@pytest.mark.parametrize("spacing", SPACINGS + [dict(use_lu_lambdas=True)], ids=SPACING_IDS + ["lu"])
@pytest.mark.parametrize("final", FINALS, ids=["zero", "sigma_min"])
@pytest.mark.parametrize("order,solver_type,method", [(1, "midpoint", "dpmpp1"), (2, "midpoint", "dpmpp_2m"),
                                                      (2, "heun", "dpmpp2"), (3, "midpoint", "dpmpp_3m")])
@pytest.mark.parametrize("n", [8, 20])
def test_dpmsolver_spacings(mix, spacing, final, order, solver_type, method, n):
    if (order == 3 or solver_type == "heun") and n >= 15 and final["final_sigmas_type"] == "sigma_min" and spacing:
        pytest.skip("diffusers' heun / 3M step of zero length (Karras-type sigmas ending at sigma_min) is 0/0 = nan")
    src = DPMSolverMultistepScheduler(solver_order=order, solver_type=solver_type, **spacing, **final)
    assert _compare(mix, src, method, n) <= TOL


@pytest.mark.parametrize("algo,order,solver_type,method,kw", [
    ("dpmsolver", 1, "midpoint", "dpmsolver1", {}), ("dpmsolver", 2, "midpoint", "dpmsolver2", {}),
    ("dpmsolver", 2, "heun", "dpmsolver2", dict(variant="heun")), ("dpmsolver", 3, "midpoint", "dpmsolver3", {}),
    ("sde-dpmsolver", 1, "midpoint", "sde_dpmsolver1", {}), ("sde-dpmsolver", 2, "midpoint", "sde_dpmsolver2", {}),
    ("sde-dpmsolver", 2, "heun", "sde_dpmsolver2", dict(variant="heun")),
    ("sde-dpmsolver++", 1, "midpoint", "dpmpp_1m_sde", {}), ("sde-dpmsolver++", 2, "midpoint", "dpmpp_2m_sde", {})])
@pytest.mark.parametrize("spacing", [{}, dict(use_karras_sigmas=True)], ids=["default", "karras"])
@pytest.mark.parametrize("n", [8, 20])
def test_dpmsolver_algorithm_types(mix, algo, order, solver_type, method, kw, spacing, n):
    """The eps-form DPM-Solver (orders 1-3), SDE-DPM-Solver (1-2) and first-order SDE-DPM-Solver++; the SDE ones
    draw their step noise from the same generator in the same order."""
    final = dict(final_sigmas_type="sigma_min") if algo in ("dpmsolver", "sde-dpmsolver") else {}
    if final and spacing and n >= 15 and (order == 3 or solver_type == "heun"):
        pytest.skip("diffusers' heun / order-3 step of zero length (Karras sigmas ending at sigma_min) is 0/0 = nan")
    src = DPMSolverMultistepScheduler(algorithm_type=algo, solver_order=order, solver_type=solver_type, **final,
                                      **spacing)
    from deis_fast.integrations.diffusers import equivalent_method
    assert equivalent_method(dict(src.config)) == method
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = DEISFastScheduler.from_config(src.config, method=method, grid="diffusers", **kw)
    src.set_timesteps(n)
    ours.set_timesteps(n)
    src.sigmas = src.sigmas.double()
    model, outs = mix.model(ours.schedule), []
    for sch in (src, ours):
        x, g = _noise(), torch.Generator().manual_seed(7)
        for t in sch.timesteps:
            out = model(x.reshape(16, 16), torch.full((16,), float(t), dtype=torch.float64)).reshape(x.shape)
            x = sch.step(out, t, x, generator=g).prev_sample
        outs.append(x)
    assert torch.isfinite(outs[0]).all() and _rel(outs[1], outs[0]) <= TOL


@pytest.mark.parametrize("kw", [dict(prediction_type="v_prediction"), dict(prediction_type="sample"),
                                dict(prediction_type="v_prediction", rescale_betas_zero_snr=True),
                                dict(prediction_type="v_prediction", rescale_betas_zero_snr=True,
                                     use_karras_sigmas=True),
                                dict(rescale_betas_zero_snr=True),   # eps: diffusers clamps alphas_cumprod[-1]
                                dict(thresholding=True, sample_max_value=1.5, prediction_type="sample"),
                                dict(thresholding=True, sample_max_value=0.8, dynamic_thresholding_ratio=1.0),
                                dict(thresholding=True, dynamic_thresholding_ratio=0.0),
                                dict(euler_at_final=True), dict(euler_at_final=True, use_karras_sigmas=True),
                                dict(lower_order_final=False, final_sigmas_type="sigma_min"),
                                dict(timestep_spacing="trailing"), dict(timestep_spacing="leading", steps_offset=1),
                                dict(beta_schedule="squaredcos_cap_v2", lambda_min_clipped=-5.1),
                                dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                     use_karras_sigmas=True),
                                dict(trained_betas=np.linspace(1e-4, 0.02, 1000).tolist())],
                         ids=["v", "sample", "v_zero_snr", "v_zero_snr_karras", "eps_zero_snr", "threshold",
                              "threshold_max_below_1", "threshold_ratio_0", "euler_at_final", "euler_at_final_karras",
                              "no_lower_order_final", "trailing", "leading", "cosine_lambda_clip", "sd_karras",
                              "trained_betas"])
@pytest.mark.parametrize("n", [6, 16])
def test_dpmsolver_keys(mix, kw, n):
    src = DPMSolverMultistepScheduler(solver_order=2, **kw)
    assert _compare(mix, src, "dpmpp_2m", n) <= TOL


@pytest.mark.parametrize("spacing", SPACINGS, ids=SPACING_IDS)
@pytest.mark.parametrize("final", FINALS, ids=["zero", "sigma_min"])
@pytest.mark.parametrize("order,variant", [(1, "bh2"), (2, "bh2"), (2, "bh1"), (3, "bh2"), (3, "bh1")])
@pytest.mark.parametrize("n", [8, 20])
def test_unipc_spacings(mix, spacing, final, order, variant, n):
    if variant == "bh1" and order > 1 and final["final_sigmas_type"] == "zero":
        pytest.skip("diffusers' bh1 corrector is nan on a final step to sigma = 0")
    src = UniPCMultistepScheduler(solver_order=order, solver_type=variant, **spacing, **final)
    assert _compare(mix, src, f"unipc{order}", n, variant=variant) <= TOL


@pytest.mark.parametrize("kw", [dict(prediction_type="v_prediction"),
                                dict(prediction_type="v_prediction", rescale_betas_zero_snr=True),
                                dict(thresholding=True, sample_max_value=0.9),
                                dict(lower_order_final=False, final_sigmas_type="sigma_min"),  # zero: nan there
                                dict(disable_corrector=[0, 2]), dict(timestep_spacing="trailing")],
                         ids=["v", "v_zero_snr", "threshold", "no_lower_order_final", "disable_corrector",
                              "trailing"])
def test_unipc_keys(mix, kw):
    src = UniPCMultistepScheduler(solver_order=2, **kw)
    extra = dict(disable_corrector=kw["disable_corrector"]) if "disable_corrector" in kw else {}
    assert _compare(mix, src, "unipc2", 10, **extra) <= TOL


@pytest.mark.parametrize("spacing", SPACINGS, ids=SPACING_IDS)
@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("n", [8, 20])
def test_deis_spacings(mix, spacing, order, n):
    src = DEISMultistepScheduler(solver_order=order, **spacing)
    assert _compare(mix, src, f"logrho{order}", n) <= TOL


@pytest.mark.parametrize("kw", [dict(prediction_type="v_prediction"), dict(thresholding=True, sample_max_value=0.9),
                                dict(lower_order_final=False), dict(timestep_spacing="trailing")],
                         ids=["v", "threshold", "no_lower_order_final", "trailing"])
def test_deis_keys(mix, kw):
    assert _compare(mix, DEISMultistepScheduler(solver_order=3, **kw), "logrho3", 10) <= TOL


FLUX = dict(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)


@pytest.mark.parametrize("kw,set_kw", [(dict(shift=3.0), {}), (dict(shift=1.0), {}),
                                       (dict(shift=3.0, use_karras_sigmas=True), {}),
                                       (dict(shift=3.0, use_exponential_sigmas=True), {}),
                                       (dict(shift=3.0, use_beta_sigmas=True), {}),
                                       (dict(shift=3.0, shift_terminal=0.1), {}),
                                       (FLUX, dict(mu=flux_mu(1024))),
                                       (dict(FLUX, time_shift_type="linear"), dict(mu=1.5)),
                                       (FLUX, dict(mu=flux_mu(4096), sigmas=np.linspace(1.0, 1 / 8, 8)))],
                         ids=["sd3", "no_shift", "karras", "exponential", "beta", "shift_terminal", "flux",
                              "flux_linear", "flux_sigmas"])
def test_flowmatch_euler(mix, kw, set_kw):
    assert _compare(mix, FlowMatchEulerDiscreteScheduler(**kw), "ddim", 8, set_kw=set_kw) <= TOL


@pytest.mark.parametrize("cls,method", [(DPMSolverMultistepScheduler, "dpmpp_2m"), (UniPCMultistepScheduler, "unipc2"),
                                        (DEISMultistepScheduler, "logrho2")])
@pytest.mark.parametrize("kw", [dict(flow_shift=3.0), dict(flow_shift=1.0, use_karras_sigmas=True),
                                dict(flow_shift=3.0, use_karras_sigmas=True, sigma_min=0.01, sigma_max=200.0)],
                         ids=["shift", "karras", "karras_range"])
def test_multistep_flow_sigmas(mix, cls, method, kw):
    if "sigma_min" in kw and cls is not UniPCMultistepScheduler:
        pytest.skip("sigma_min / sigma_max are UniPC's keys")
    if "use_karras_sigmas" in kw and cls is not UniPCMultistepScheduler:
        pytest.skip("only UniPC maps Karras sigmas to flow times")
    src = cls(use_flow_sigmas=True, prediction_type="flow_prediction", solver_order=2, **kw)
    if cls is DEISMultistepScheduler:
        with pytest.raises(ValueError, match="not a clean sample"):  # DEIS' flow sigmas end at the last one, not 0
            DEISFastScheduler.from_config(src.config, method=method, grid="diffusers")
        return
    assert _compare(mix, src, method, 10) <= TOL


def test_flow_karras_range_first_time():
    """UniPC's flow Karras sigmas between sigma_min and sigma_max, mapped to t = sigma / (1 + sigma)."""
    src = UniPCMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction", use_karras_sigmas=True,
                                  sigma_min=0.01, sigma_max=200.0)
    ours = DEISFastScheduler.from_config(src.config, method="unipc2", grid="diffusers")
    ours.set_timesteps(10)
    assert abs(float(ours.sigmas[0]) - 200 / 201) < 1e-6 and abs(ours.plan.times[0] - 200 / 201) < 1e-6


# --- the karras timesteps of the issue, and the end of a run -------------------------------------------------------
def test_karras_timesteps_end_with_the_final_sigma():
    src = DPMSolverMultistepScheduler(use_karras_sigmas=True)
    ours = DEISFastScheduler.from_config(src.config, method="dpmpp_2m", grid="diffusers")
    src.set_timesteps(10)
    ours.set_timesteps(10)
    assert ours.timesteps.tolist() == src.timesteps.tolist() and ours.timesteps[0] == 999 and ours.timesteps[-1] == 0
    assert ours.plan.nfe == 10


def test_zero_length_last_step_changes_almost_nothing(mix):
    """Karras sigmas ending at sigma_min: the last call is at the final sigma; its step has (almost) zero length."""
    src = DPMSolverMultistepScheduler(use_karras_sigmas=True, final_sigmas_type="sigma_min")
    ours = DEISFastScheduler.from_config(src.config, method="dpmpp_2m", grid="diffusers")
    ours.set_timesteps(6)
    assert ours.plan.nfe == 6 and ours.timesteps[-1] == 0
    model, x = mix.model(ours.schedule), _noise().reshape(16, 16)
    for t in ours.timesteps[:-1]:
        x = ours.step(model(x, torch.full((16,), float(t), dtype=torch.float64)), t, x).prev_sample
    last = ours.step(torch.randn_like(x), ours.timesteps[-1], x).prev_sample
    assert _rel(last, x) < 1e-9


def test_step_at_a_timestep_not_in_timesteps_falls_back_to_the_last(mix):
    ours = DEISFastScheduler(method="dpmpp_2m")
    ours.set_timesteps(5)
    assert ours.index_for_timestep(12345) == 4 and ours.index_for_timestep(torch.tensor(0)) == 4
    x = _noise()
    ours.step(torch.zeros_like(x), 12345, x)   # a pipeline's step(..., timestep) off the grid: the last step
    assert ours.step_index == 5


def test_step_with_a_batch_of_timesteps(mix):
    """Some pipelines pass the timestep once per sample: the first step reads the first."""
    a, b = DEISFastScheduler(method="dpmpp_2m"), DEISFastScheduler(method="dpmpp_2m")
    a.set_timesteps(5)
    b.set_timesteps(5)
    model, x, y = mix.model(a.schedule), _noise().reshape(16, 16), _noise().reshape(16, 16)
    for t in a.timesteps:
        tt = torch.full((16,), float(t), dtype=torch.float64)
        x = a.step(model(x, tt), t, x).prev_sample
        y = b.step(model(y, tt), tt.long(), y).prev_sample
    assert torch.equal(x, y)


def test_index_for_timestep_flowmatch_api():
    src = FlowMatchEulerDiscreteScheduler(shift=3.0)
    ours = DEISFastScheduler.from_config(src.config, method="ddim", grid="diffusers")
    src.set_timesteps(6)
    ours.set_timesteps(6)
    for k in (0, 3, 5):
        assert ours.index_for_timestep(ours.timesteps[k]) == k == src.index_for_timestep(src.timesteps[k])
        assert ours.index_for_timestep(src.timesteps[k], src.timesteps) == k
    batch = ours.timesteps[[4, 1, 1, 0]]
    assert ours.index_for_timestep(batch).tolist() == [4, 1, 1, 0]
    x0, z = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    t = ours.timesteps[[4, 1, 1, 0]]
    np.testing.assert_allclose(ours.scale_noise(x0, t, z).numpy(),
                               src.scale_noise(x0, src.timesteps[[4, 1, 1, 0]], z).numpy(), rtol=1e-6)


def test_learned_variance_output_is_split(mix):
    src = DPMSolverMultistepScheduler(variance_type="learned_range")
    ours = DEISFastScheduler.from_config(src.config, method="dpmpp_2m", grid="diffusers")
    src.set_timesteps(6)
    ours.set_timesteps(6)
    src.sigmas = src.sigmas.double()
    model = mix.model(ours.schedule)
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    outs = []
    for sch in (src, ours):
        y = x.clone()
        for t in sch.timesteps:
            eps = model(y.reshape(2, -1)[:, :16], torch.full((2,), float(t), dtype=torch.float64))
            eps = torch.cat([eps.repeat(1, 3)[:, :48].reshape(2, 3, 4, 4), torch.randn(2, 3, 4, 4, dtype=y.dtype)], 1)
            y = sch.step(eps, t, y).prev_sample
        outs.append(y)
    assert _rel(outs[1], outs[0]) <= TOL


# --- construction: accepted and refused configs ---------------------------------------------------------------------
def test_valid_configs_are_accepted():
    DEISFastScheduler(thresholding=True, sample_max_value=0.5, dynamic_thresholding_ratio=0.0)
    DEISFastScheduler(thresholding=True, dynamic_thresholding_ratio=1.0)
    s = DEISFastScheduler(trained_betas=[0.1, 0.2], num_train_timesteps=2, method="ddim")
    s.set_timesteps(1)
    with pytest.warns(UserWarning, match="2\\*\\*-24"):
        s = DEISFastScheduler(rescale_betas_zero_snr=True)
    assert 0 < float(s.alphas_cumprod[-1]) <= 2 ** -24
    s.set_timesteps(6)  # an eps model no longer refused


def test_refused_key_raises_naming_it():
    with pytest.raises(ValueError, match="solver_p"):
        DEISFastScheduler.from_config(UniPCMultistepScheduler(solver_p=diffusers.DDIMScheduler()).config)
    with pytest.raises(ValueError, match="variance_type"):
        DEISFastScheduler(variance_type="fixed_large")


def test_every_documented_key_has_a_row():
    """Every __init__ key of the four source schedulers is in the one table (honoured, mapped or refused)."""
    for name in dc.SOURCES:
        params = set(inspect.signature(getattr(diffusers, name).__init__).parameters) - {"self", "kwargs"}
        missing = sorted(params - set(dc.KEYS))
        assert not missing, (name, missing)


@pytest.mark.parametrize("src", [DPMSolverMultistepScheduler(use_karras_sigmas=True, solver_order=3),
                                 UniPCMultistepScheduler(), DEISMultistepScheduler(),
                                 FlowMatchEulerDiscreteScheduler(shift=3.0)], ids=["dpm", "unipc", "deis", "flow"])
def test_config_round_trip_keeps_keys_and_metadata(src, tmp_path):
    src.save_config(tmp_path / "src")
    loaded = type(src).from_pretrained(tmp_path / "src")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = DEISFastScheduler.from_config(loaded.config, method="dpmpp_2m" if src.config.get("beta_start") else
                                             "ddim", grid="diffusers")
    ours.save_config(tmp_path / "ours")
    back = DEISFastScheduler.from_pretrained(tmp_path / "ours")
    saved = json.loads((tmp_path / "ours" / "scheduler_config.json").read_text())
    assert saved["_class_name"] == "DEISFastScheduler" and "_diffusers_version" in saved
    assert back.config["_class_name"] == "DEISFastScheduler" and "_diffusers_version" in back.config
    assert ours.config["_class_name"] == "DEISFastScheduler" and "_diffusers_version" in ours.config
    for k, v in ours.config.items():
        if not k.startswith("_"):
            assert back.config[k] == v or (isinstance(v, tuple) and list(v) == back.config[k]), k
    assert back.config.source_scheduler == type(src).__name__
    ours.set_timesteps(8)
    back.set_timesteps(8)
    assert torch.equal(ours.timesteps, back.timesteps)


def test_keys_on_deis_fast_grids():
    """Without grid='diffusers' the keys still act: lu spacing is the logsnr grid, lambda_min_clipped caps the first
    time, euler_at_final makes the last step first order."""
    import deis_fast
    lu = DEISFastScheduler.from_config(DPMSolverMultistepScheduler(use_lu_lambdas=True).config, method="dpmpp_2m",
                                       timestep_type="float")
    lu.set_timesteps(6)
    np.testing.assert_allclose(lu.plan.times[:-1], deis_fast.make_grid(lu.schedule, "logsnr", 6)[:-1])
    cos = DPMSolverMultistepScheduler(beta_schedule="squaredcos_cap_v2", lambda_min_clipped=-5.1)
    clipped = DEISFastScheduler.from_config(cos.config, method="tab3")
    clipped.set_timesteps(6)
    cos.set_timesteps(6)
    assert clipped.plan.times[0] == float(cos.timesteps[0]) < 999
    plain, euler = (DEISFastScheduler(method="dpmpp_2m", euler_at_final=e) for e in (False, True))
    for s in (plain, euler):
        s.set_timesteps(20)
    assert len(plain.plan.combines[-1].coefs) == 3 and len(euler.plan.combines[-1].coefs) == 2
    assert plain.plan.combines[-2].coefs == euler.plan.combines[-2].coefs


# --- issue 33: drop-in leftovers ------------------------------------------------------------------------------------
@pytest.mark.parametrize("grid", ["auto", "diffusers"])
def test_flow_karras_range_built_directly(grid):
    """Item 13: sigma_min / sigma_max given to the constructor (not through a UniPC config) are honoured: UniPC's flow
    Karras sigmas, first 200 / 201 = 0.995 (it was 1.0: the range was ignored)."""
    kw = dict(use_flow_sigmas=True, use_karras_sigmas=True, sigma_min=0.01, sigma_max=200.0,
              prediction_type="flow_prediction")
    src = UniPCMultistepScheduler(**kw)
    ours = DEISFastScheduler(method="unipc2", grid=grid, **kw)
    src.set_timesteps(10)
    ours.set_timesteps(10)
    assert abs(float(ours.sigmas[0]) - 200 / 201) < 1e-6
    np.testing.assert_allclose(ours.sigmas.double().numpy(), src.sigmas.double().numpy(), rtol=1e-6, atol=1e-7)


def test_index_for_timestep_of_a_batch_is_a_tensor():
    """Item 14: a batch of timesteps gives a LongTensor of indices (diffusers' vectorized lookups), on their device."""
    ours = DEISFastScheduler(method="tab3")
    ours.set_timesteps(6)
    got = ours.index_for_timestep(ours.timesteps[[4, 1, 1, 0]])
    assert isinstance(got, torch.Tensor) and got.dtype == torch.long and got.tolist() == [4, 1, 1, 0]
    assert ours.index_for_timestep(ours.timesteps[2]) == 2


def test_eta_on_a_deterministic_method_is_refused_as_sample_refuses_it():
    """Item 15: eta away from its default on a method without noise is an error (deis_fast.sample refuses it too)."""
    import deis_fast
    with pytest.raises(ValueError, match="eta"):
        deis_fast.sample(lambda x, t: x, torch.zeros(1, 2), method="tab3", nfe=3, eta=0.5)
    with pytest.raises(ValueError, match="eta=0.5 applies to stochastic methods"):
        DEISFastScheduler(method="tab3", eta=0.5)
    with pytest.raises(ValueError, match="eta"):
        DEISFastScheduler(method="ddim", pfdiff=(2, 1), eta=0.5)
    DEISFastScheduler(method="ddim_eta", eta=0.5)
    DEISFastScheduler(method="ddim_eta", pfdiff=(2, 1), eta=0.5)
    DEISFastScheduler(method="tab3", eta=1.0)   # the default: nothing set


@pytest.mark.parametrize("bad", ["sample", "model_output"])
def test_step_with_nan_raises_at_the_end_of_the_run(bad):
    """Item 16: NaN in a step()'s sample or model output raises NonFiniteError naming the step, through the
    executor's deferred check (one reduction per step, one host sync at the last step), not a NaN image."""
    from deis_fast import NonFiniteError
    sch = DEISFastScheduler(method="tab3")
    sch.set_timesteps(5)
    x = torch.randn(2, 4)
    with pytest.raises(NonFiniteError, match="step\\(\\) 2 .*" + bad):
        for i, t in enumerate(sch.timesteps):
            eps = torch.zeros_like(x)
            if i == 2:
                (x if bad == "sample" else eps)[0, 0] = float("nan")
            x = sch.step(eps, t, x).prev_sample
    sch.set_timesteps(5)   # a clean run afterwards is not blamed
    x = torch.randn(2, 4)
    for t in sch.timesteps:
        x = sch.step(torch.zeros_like(x), t, x).prev_sample
    assert torch.isfinite(x).all()
