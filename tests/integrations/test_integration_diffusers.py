"""DEISFastScheduler inside real diffusers pipelines (tiny UNet2DModel built from a config, no download)."""
import inspect
import warnings

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers", reason="needs diffusers: pip install -e '.[test]'")
from diffusers import (DDIMPipeline, DDIMScheduler, DDPMPipeline, DDPMScheduler, DEISMultistepScheduler,  # noqa: E402
                       UNet2DModel)
from diffusers.models.unets.unet_2d import UNet2DOutput  # noqa: E402

import deis_fast  # noqa: E402
from deis_fast.integrations.diffusers import DEISFastScheduler  # noqa: E402
from deis_fast.testing import GaussianMixture  # noqa: E402

from _diffusers_common import DEIS64  # noqa: E402


class NearIdentityUNet(UNet2DModel):
    """A randomly initialised UNet2DModel whose eps prediction is x + 0.1 * unet(x, t): the sampled images then
    stay inside [0, 1] (a bare random UNet gives states of size ~100 that the pipeline clamps away)."""

    def forward(self, sample, timestep, *args, **kwargs):
        out = super().forward(sample, timestep, *args, **kwargs)
        return UNet2DOutput(sample=sample + 0.1 * out.sample)


def _unet(dtype=torch.float64):
    torch.manual_seed(0)
    unet = NearIdentityUNet(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=8)
    return unet.to(dtype).eval()


class Recorder:
    """Wraps a scheduler's step to keep the final, unclamped state (pipelines clamp the returned image).
    DDIMPipeline passes eta/generator, which DEISMultistepScheduler.step does not take: those are dropped
    for it (DEISFastScheduler takes and ignores them)."""

    def __init__(self, sch):
        self.sch, self.last = sch, None
        inner = sch.step
        accepted = set(inspect.signature(inner).parameters)
        takes_any = any(p.kind == p.VAR_KEYWORD for p in inspect.signature(inner).parameters.values())

        def step(*a, **k):
            if not takes_any:
                k = {n: v for n, v in k.items() if n in accepted}
            out = inner(*a, **k)
            self.last = out.prev_sample if hasattr(out, "prev_sample") else out[0]
            return out
        sch.step = step


def _run(pipe, sch, n, seed=0, batch=4):
    pipe.scheduler = sch
    rec = Recorder(sch)
    img = pipe(batch_size=batch, generator=torch.Generator().manual_seed(seed), num_inference_steps=n,
               output_type="np").images
    return img, rec.last


@pytest.fixture(scope="module")
def unet():
    return _unet()


@pytest.mark.parametrize("n", [5, 10, 20])
def test_logrho3_pipeline_matches_diffusers_deis(unet, n):
    """float64 UNet and states; diffusers' DEIS sigmas promoted to float64: the final unclamped states agree
    to 1e-5 relative (measured ~1.1e-6: the remainder is diffusers computing its betas/alphas_cumprod in float32),
    and so do the images."""
    pipe = DDIMPipeline(unet=unet, scheduler=DEISMultistepScheduler())
    ref_img, ref = _run(pipe, DEIS64(solver_order=3), n)
    deis_cfg = DEISMultistepScheduler(solver_order=3).config
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the one "ignored keys" warning, tested below
        ours = DEISFastScheduler.from_config(deis_cfg, method="logrho3")
    img, x = _run(pipe, ours, n)
    assert torch.equal(ours.timesteps, pipe.scheduler.timesteps)
    ref_ts = DEIS64(solver_order=3)
    ref_ts.set_timesteps(n)
    assert torch.equal(ours.timesteps, ref_ts.timesteps)
    assert x.dtype == torch.float64 and torch.isfinite(x).all()
    rel = float((x - ref).norm() / ref.norm())
    assert rel <= 1e-5, rel
    assert np.abs(img - ref_img).max() <= 1e-5


def test_logrho3_float32_close_to_diffusers_float32():
    """Plain float32 pipelines, diffusers' own float32 coefficients: agreement at the 1e-4 level."""
    unet = _unet(torch.float32)
    pipe = DDIMPipeline(unet=unet, scheduler=DEISMultistepScheduler())
    _, ref = _run(pipe, DEISMultistepScheduler(solver_order=3), 10)
    _, x = _run(pipe, DEISFastScheduler(method="logrho3"), 10)
    assert float((x - ref).norm() / ref.norm()) <= 5e-4


@pytest.mark.parametrize("method", ["tab3", "pfdiff", "dpmpp3", "rho_heun", "ddim_eta"])
def test_methods_end_to_end(unet, method):
    pipe = DDPMPipeline(unet=unet, scheduler=DEISFastScheduler())
    sch = DEISFastScheduler(method=method)
    pipe.scheduler = sch
    gen = torch.Generator().manual_seed(1)
    out = pipe(batch_size=3, generator=gen, num_inference_steps=6, output_type="pt").images
    noise = torch.randn((3, 1, 8, 8), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert out.shape == (3, 1, 8, 8)
    assert torch.isfinite(out).all()
    assert sch.plan.nfe == 6 and len(sch.timesteps) == 6
    assert not torch.allclose(out, (noise / 2 + 0.5).clamp(0, 1))


def test_step_walk_equals_deis_fast_sampler():
    """The generic Eval-by-Eval walk reproduces deis_fast.Sampler for multistep, RK and PFDiff plans."""
    sched = deis_fast.VPSchedule.discrete("linear")
    mix = GaussianMixture.random(4, 16, 0.3, seed=2)
    noise = torch.randn(8, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for method, pred in [("tab3", "epsilon"), ("pfdiff", "epsilon"), ("rho_rk4", "v_prediction"),
                         ("dpmpp2", "sample"), ("ipndm4", "v_prediction")]:
        model = mix.model(sched, pred)
        sch = DEISFastScheduler(method=method, prediction_type=pred, timestep_type="float")
        sch.set_timesteps(8)
        x = noise.clone()
        for t in sch.timesteps:
            x = sch.step(model(x, torch.full((8,), float(t), dtype=torch.float64)), t, x).prev_sample
        ref = deis_fast.Sampler(model, sched, plan=sch.plan, prediction=pred)(noise)
        assert float((x - ref).norm() / ref.norm()) < 1e-12, method


def test_config_keys_warning_only_for_user_set_behaviour_changing_keys():
    def ignored_warnings(cfg, **kw):
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            sch = DEISFastScheduler.from_config(cfg, **kw)
        return sch, [str(w.message) for w in rec if "ignores the config keys" in str(w.message)]

    # defaults of the source scheduler (listed in _use_default_values, or equal to its defaults): no warning
    for cfg in (DEISMultistepScheduler().config, DDPMScheduler().config, DDIMScheduler(clip_sample=True).config):
        assert ignored_warnings(cfg)[1] == []
    sch, msgs = ignored_warnings(DEISMultistepScheduler(solver_order=3).config, method="tab3")
    assert len(msgs) == 1 and "solver_order=3" in msgs[0] and "method='logrho3'" in msgs[0]
    assert msgs[0].endswith(".")  # a complete sentence
    assert sch.config.method == "tab3"
    assert ignored_warnings(sch.config)[1] == []


def test_from_config_honours_use_default_values():
    """A default DDPMScheduler's timestep_spacing='leading' is a default, not a choice: as diffusers' own
    from_config, the new scheduler keeps its own default, so logrho3 matches DEISMultistepScheduler."""
    ddpm = DDPMScheduler()
    ours = DEISFastScheduler.from_config(ddpm.config, method="logrho3")
    theirs = DEISMultistepScheduler.from_config(ddpm.config, solver_order=3)
    assert ours.config.timestep_spacing == theirs.config.timestep_spacing == "linspace"
    ours.set_timesteps(10)
    theirs.set_timesteps(10)
    assert ours.timesteps.tolist() == theirs.timesteps.tolist()
    explicit = DEISFastScheduler.from_config(DDPMScheduler(timestep_spacing="leading").config)
    assert explicit.config.timestep_spacing == "leading"


def test_interface_bits():
    sch = DEISFastScheduler(method="tab3", prediction_type="v_prediction")
    assert sch.init_noise_sigma == 1.0 and sch.order == 1
    sch.set_timesteps(10)
    assert sch.timesteps.dtype == torch.int64 and len(sch.timesteps) == 10
    x = torch.randn(2, 3)
    assert sch.scale_model_input(x, sch.timesteps[0]) is x
    x0, z = torch.randn(2, 3, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64)
    y = sch.add_noise(x0, z, torch.tensor([0, 500]))
    ac = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)
    assert torch.allclose(y[1], ac[500].sqrt() * x0[1] + (1 - ac[500]).sqrt() * z[1])
    float_sch = DEISFastScheduler(method="rho_midpoint")
    float_sch.set_timesteps(10)
    assert float_sch.timesteps.dtype == torch.float64  # RK midpoint stages are off the integer grid
    with pytest.raises(ValueError, match="unknown method"):
        DEISFastScheduler(method="nope")
    with pytest.raises(ValueError, match="multiple of 2"):
        DEISFastScheduler(method="rho_heun").set_timesteps(5)


def test_schedule_changing_config_keys_are_honored_not_ignored():
    import diffusers
    from deis_fast.integrations.diffusers import DEISFastScheduler
    cfg = dict(diffusers.DDIMScheduler(rescale_betas_zero_snr=True).config)
    v_cfg = diffusers.DDIMScheduler(rescale_betas_zero_snr=True, prediction_type="v_prediction").config
    s = DEISFastScheduler.from_config(v_cfg)   # zero terminal SNR: the process starts at alpha = 0
    assert s.schedule.zero_terminal_snr and float(s.alphas_cumprod[-1]) == 0.0
    with pytest.warns(UserWarning, match="clamped to 2"):   # an eps model says nothing about x0 at alpha = 0:
        s = DEISFastScheduler.from_config(cfg)             # alphas_cumprod[-1] = 2**-24, as diffusers' DPM-Solver
    assert not s.schedule.zero_terminal_snr and 0 < float(s.alphas_cumprod[-1]) <= 2 ** -24
    s.set_timesteps(6)
    cfg = dict(diffusers.DPMSolverMultistepScheduler(use_karras_sigmas=True).config)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a key it honours: nothing to warn about
        s = DEISFastScheduler.from_config(cfg, method="tab3", timestep_type="float")
    assert s.config.grid == "auto" and s.config.use_karras_sigmas  # honored as the karras grid
    s.set_timesteps(6)
    karras = deis_fast.make_grid(s.schedule, "karras", 6)
    assert np.allclose(s.plan.times[:-1], karras[:-1])


@pytest.mark.parametrize("name", ["ScoreSdeVeScheduler", "EDMEulerScheduler"])
def test_ve_scheduler_configs_are_refused(name):
    import diffusers
    from deis_fast.integrations.diffusers import DEISFastScheduler
    with pytest.raises(ValueError, match="VE / EDM noise schedule.*VESchedule"):
        DEISFastScheduler.from_config(getattr(diffusers, name)().config)
    cfg = dict(diffusers.EulerDiscreteScheduler(sigma_max=14.6, sigma_min=0.03).config)  # VP, clamped range
    with pytest.warns(UserWarning, match="sigma_max"):  # Euler's default timestep_type is not carried over
        s = DEISFastScheduler.from_config(cfg)
    assert s.config.timestep_type == "auto"
    cfg = dict(diffusers.EulerDiscreteScheduler(timestep_type="continuous").config)  # set: another meaning here
    with pytest.warns(UserWarning, match="timestep_type='continuous'"):
        s = DEISFastScheduler.from_config(cfg)
    assert s.config.timestep_type == "auto"


@pytest.mark.filterwarnings("error:DEISFastScheduler ignores")
def test_lower_order_final_is_not_carried_over_from_other_schedulers():
    import diffusers
    from deis_fast.integrations.diffusers import DEISFastScheduler
    cfg = dict(diffusers.DEISMultistepScheduler().config)
    assert cfg["lower_order_final"] is True
    s = DEISFastScheduler.from_config(cfg, method="tab3")  # defaults only: no warning (filterwarnings=error)
    assert s.config.lower_order_final is None
    s = DEISFastScheduler.from_config(dict(diffusers.DEISMultistepScheduler(lower_order_final=True).config))
    assert s.config.lower_order_final is None
    s2 = DEISFastScheduler.from_config(cfg, method="tab3", lower_order_final=True)
    assert s2.config.lower_order_final is True
    own = DEISFastScheduler.from_config(s2.config)
    assert own.config.lower_order_final is True


@pytest.mark.parametrize("name,kw,method", [("DEISMultistepScheduler", dict(solver_order=2), "logrho2"),
                                            ("DPMSolverMultistepScheduler", dict(solver_order=2), "dpmpp_2m"),
                                            ("DPMSolverMultistepScheduler", dict(solver_order=2, solver_type="heun"),
                                             "dpmpp2"),
                                            ("DPMSolverMultistepScheduler", dict(solver_order=3), "dpmpp_3m"),
                                            ("DPMSolverMultistepScheduler",
                                             dict(solver_order=2, algorithm_type="sde-dpmsolver++"), "dpmpp_2m_sde"),
                                            ("UniPCMultistepScheduler", dict(solver_order=3), "unipc3"),
                                            ("UniPCMultistepScheduler", dict(solver_order=2, solver_type="bh1"),
                                             "unipc2")])
def test_ignored_keys_warning_names_the_equivalent_method(name, kw, method):
    import diffusers
    from deis_fast.integrations.diffusers import DEISFastScheduler, equivalent_method
    cfg = getattr(diffusers, name)(**kw).config
    assert equivalent_method(dict(cfg)) == method
    if kw.get("solver_order") != 2 or "solver_type" in kw or "algorithm_type" in kw:  # set away from the defaults
        with pytest.warns(UserWarning, match=f"method='{method}'"):
            DEISFastScheduler.from_config(cfg)
    assert equivalent_method(dict(diffusers.UniPCMultistepScheduler(predict_x0=False).config)) is None
    if kw.get("solver_type") == "bh1":
        with pytest.warns(UserWarning, match="variant='bh1'"):
            DEISFastScheduler.from_config(cfg)


def test_stable_diffusion_pndm_config_converts_without_a_warning():
    """Item 5 of issue 27: every SD PNDM config has skip_prk_steps=True, which says how PNDM warms up its own solver:
    method= replaces that, so it is dropped without the 'ignores the config keys' warning."""
    import warnings

    from diffusers import PNDMScheduler
    cfg = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True,
                        set_alpha_to_one=False, steps_offset=1).config
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # any warning fails the test
        sch = DEISFastScheduler.from_config(cfg, method="tab3")
    assert sch.config.method == "tab3" and "skip_prk_steps" not in sch.config
