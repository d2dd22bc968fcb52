"""DEISFastScheduler inside Stable Diffusion text-to-image, img2img and inpainting pipelines built from tiny local
components (UNet2DConditionModel, AutoencoderKL, a 1-layer CLIP text encoder, a tokenizer from a local vocabulary):
no download, ~30 ms per UNet call."""
import warnings

import pytest
import torch

diffusers = pytest.importorskip("diffusers", reason="needs diffusers: pip install -e '.[test]'")
pytest.importorskip("transformers", reason="needs transformers: pip install -e '.[test]'")
from diffusers import (DEISMultistepScheduler, StableDiffusionImg2ImgPipeline,  # noqa: E402
                       StableDiffusionInpaintPipeline, StableDiffusionPipeline)

import deis_fast  # noqa: E402
from deis_fast.integrations.diffusers import DEISFastScheduler  # noqa: E402

from _diffusers_common import DEIS64, tiny_sd_components  # noqa: E402

PROMPT, NEGATIVE, GUIDANCE = "a photo of a cat", "blurry", 3.0
ALL_METHODS = list(deis_fast.METHOD_SPECS) + ["pfdiff"]
KINDS = {"t2i": StableDiffusionPipeline, "img2img": StableDiffusionImg2ImgPipeline,
         "inpaint": StableDiffusionInpaintPipeline}


pytestmark = pytest.mark.usefixtures("one_torch_thread")   # tiny networks: one thread is ~7x faster than two


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_sd")
    return {dt: tiny_sd_components(str(folder), dt) for dt in (torch.float64, torch.float32)}


def _pipe(parts, kind, dtype=torch.float64):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return KINDS[kind](scheduler=DEISMultistepScheduler(), **parts[dtype])


def _inputs(kind, dtype):
    g = torch.Generator().manual_seed(11)
    kw = dict(prompt=PROMPT, negative_prompt=NEGATIVE, guidance_scale=GUIDANCE, output_type="latent")
    if kind == "t2i":
        return dict(kw, height=8, width=8)
    kw["image"] = torch.rand(1, 3, 8, 8, generator=g, dtype=dtype)
    if kind == "inpaint":
        mask = torch.zeros(1, 1, 8, 8, dtype=dtype)
        mask[..., 2:6, 1:5] = 1.0  # 1 = repaint
        kw.update(mask_image=mask, height=8, width=8)
    return kw


def _run(pipe, sch, kind, n, strength=None, dtype=torch.float64, seed=0):
    pipe.scheduler = sch
    kw = _inputs(kind, dtype)
    if strength is not None:
        kw["strength"] = strength
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pipe(num_inference_steps=n, generator=torch.Generator().manual_seed(seed), **kw).images


def _from_deis_config(method, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DEIS' solver_order etc.: the one "ignored keys" warning
        return DEISFastScheduler.from_config(DEISMultistepScheduler().config, method=method, **kw)


def _rel(a, b):
    return float((a - b).norm() / b.norm())


class UNetCalls:
    """Counts the UNet's forward calls and keeps each call's (sample, timestep, encoder_hidden_states)."""

    def __init__(self, unet):
        self.calls = []
        self.handle = unet.register_forward_pre_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs):
        sample, t = args[0], args[1]
        self.calls.append((sample.detach().clone(), t, kwargs.get("encoder_hidden_states")))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


# --- parity with DEISMultistepScheduler in each pipeline ---------------------------------------------------------
@pytest.mark.parametrize("order", [1, 2, 3])
def test_text_to_image_cfg_logrho_matches_deis(parts, order):
    pipe = _pipe(parts, "t2i")
    ref = _run(pipe, DEIS64(solver_order=order), "t2i", 8)
    ref_ts = pipe.scheduler.timesteps.clone()
    ours = _from_deis_config(f"logrho{order}")
    out = _run(pipe, ours, "t2i", 8)
    assert torch.equal(ours.timesteps, ref_ts)
    assert _rel(out, ref) <= 1e-4


@pytest.mark.parametrize("strength", [0.3, 0.5, 0.8])
@pytest.mark.parametrize("order", [2, 3])
def test_img2img_logrho_matches_deis(parts, strength, order):
    pipe = _pipe(parts, "img2img")
    ref = _run(pipe, DEIS64(solver_order=order), "img2img", 10, strength)
    ours = _from_deis_config(f"logrho{order}")
    with UNetCalls(pipe.unet) as rec:
        out = _run(pipe, ours, "img2img", 10, strength)
    k = 10 - int(10 * strength)
    assert ours.begin_index == k and len(rec.calls) == 10 - k
    assert _rel(out, ref) <= 1e-4


@pytest.mark.parametrize("strength", [1.0, 0.6])
def test_inpaint_4ch_logrho_matches_deis(parts, strength):
    pipe = _pipe(parts, "inpaint")
    assert pipe.unet.config.in_channels == 4  # the blend-after-each-step path of the pipeline
    ref = _run(pipe, DEIS64(solver_order=3), "inpaint", 10, strength)
    out = _run(pipe, _from_deis_config("logrho3"), "inpaint", 10, strength)
    assert _rel(out, ref) <= 1e-4


# --- every method: exact UNet call counts ------------------------------------------------------------------------
def _nfe(method):
    stages = 1 if method == "pfdiff" else deis_fast.METHOD_SPECS[method].stages
    return {1: 6, 2: 6, 3: 6, 4: 8}[stages]


@pytest.mark.parametrize("kind", list(KINDS))
def test_every_method_makes_exactly_the_requested_unet_calls(parts, kind):
    """NFE = num_inference_steps for text-to-image and inpainting; img2img at strength 0.5 makes the calls of
    timesteps[k:] (inside a Runge-Kutta step for rho_heun: k = 3). Inpainting: the kept region of the result is
    the image's latents, as with diffusers' own scheduler."""
    pipe = _pipe(parts, kind, torch.float32)
    strength = 0.5 if kind == "img2img" else None
    kept = None
    if kind == "inpaint":
        ref = _run(pipe, DEISMultistepScheduler(), kind, 6, dtype=torch.float32)
        mask = torch.ones(1, 4, 8, 8, dtype=torch.bool)
        mask[..., 2:6, 1:5] = False
        kept = ref[mask]
    for method in ALL_METHODS:
        n = _nfe(method)
        sch = DEISFastScheduler(method=method)
        with UNetCalls(pipe.unet) as rec:
            out = _run(pipe, sch, kind, n, strength, dtype=torch.float32)
        expected = n - (n - int(n * 0.5)) if kind == "img2img" else n
        assert len(rec.calls) == expected, method
        assert [float(t) for _, t, _ in rec.calls] == [float(t) for t in sch.timesteps[n - expected:]], method
        assert torch.isfinite(out).all(), method
        if kept is not None:
            assert torch.equal(out[mask], kept), method


@pytest.mark.parametrize("method", ["tab3", "rho_heun", "pfdiff"])
def test_sample_t_start_equals_img2img_pipeline(parts, method):
    """deis_fast.sample(grid=the scheduler's grid, t_start=its time at the start index) from the pipeline's noised
    latents, with the same CFG, equals the img2img pipeline's result."""
    pipe = _pipe(parts, "img2img")
    n = 6
    sch = DEISFastScheduler(method=method, timestep_type="float")
    with UNetCalls(pipe.unet) as rec:
        out = _run(pipe, sch, "img2img", n, 0.5)
    k = sch.begin_index
    x_k, t_first, ehs = rec.calls[0]
    uncond, cond = ehs.chunk(2)

    def unet(x, t, encoder_hidden_states):
        return pipe.unet(x, t, encoder_hidden_states=encoder_hidden_states).sample
    ref = deis_fast.sample(unet, x_k.chunk(2)[0], sch.schedule, method, nfe=n if method == "pfdiff" else None,
                           grid=list(sch.plan.times), t_start=float(sch.plan.evals[k].t), guidance_scale=GUIDANCE,
                           uncond={"encoder_hidden_states": uncond}, model_kwargs={"encoder_hidden_states": cond})
    assert float(t_first) == pytest.approx(float(sch.plan.evals[k].model_t))
    assert _rel(out, ref) <= 1e-10
