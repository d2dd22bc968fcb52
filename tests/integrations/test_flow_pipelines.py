"""DEISFastScheduler in flow-matching pipelines built from tiny random-weight parts (no download): SD3 and FLUX,
text-to-image and img2img. method='ddim' equals FlowMatchEulerDiscreteScheduler; every method makes exactly the
requested transformer calls."""
import warnings

import pytest
import torch

diffusers = pytest.importorskip("diffusers", reason="needs diffusers: pip install -e '.[test]'")
from diffusers import (FlowMatchEulerDiscreteScheduler, FluxImg2ImgPipeline, FluxPipeline,  # noqa: E402
                       StableDiffusion3Img2ImgPipeline, StableDiffusion3Pipeline)

import deis_fast  # noqa: E402
from deis_fast.integrations.diffusers import DEISFastScheduler  # noqa: E402

from _diffusers_common import tiny_flux_components, tiny_sd3_components  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")   # tiny networks: one thread is ~7x faster than two

ALL_METHODS = list(deis_fast.METHOD_SPECS) + ["pfdiff"]
PIPES = {("sd3", "t2i"): StableDiffusion3Pipeline, ("sd3", "img2img"): StableDiffusion3Img2ImgPipeline,
         ("flux", "t2i"): FluxPipeline, ("flux", "img2img"): FluxImg2ImgPipeline}
CASES = list(PIPES)
IDS = [f"{m}-{k}" for m, k in CASES]


@pytest.fixture(scope="module")
def parts():
    return {"sd3": tiny_sd3_components(), "flux": tiny_flux_components()}


def _embeds(model):
    g = torch.Generator().manual_seed(5)
    e = {k: torch.randn(shape, generator=g, dtype=torch.float64)
         for k, shape in [("prompt_embeds", (1, 5, 16)), ("pooled_prompt_embeds", (1, 16)),
                          ("negative_prompt_embeds", (1, 5, 16)), ("negative_pooled_prompt_embeds", (1, 16))]}
    if model == "sd3":   # classifier-free guidance on a doubled batch
        return dict(e, guidance_scale=3.0)
    return {k: v for k, v in e.items() if not k.startswith("negative")}   # FLUX: no CFG


def _run(parts, model, kind, scheduler, n, strength=0.5):
    comps = dict(parts[model], scheduler=scheduler)
    kw = dict(_embeds(model), num_inference_steps=n, height=8, width=8, output_type="latent",
              generator=torch.Generator().manual_seed(1))
    if kind == "img2img":
        kw.update(image=torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64),
                  strength=strength)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PIPES[model, kind](**comps)(**kw).images


class Calls:
    """Counts the transformer's forward calls and keeps each call's timestep input."""

    def __init__(self, transformer):
        self.timesteps = []
        self.handle = transformer.register_forward_pre_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs):
        self.timesteps.append(float(kwargs["timestep"].reshape(-1)[0]))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def _ours(parts, model, method, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return DEISFastScheduler.from_config(parts[model]["scheduler"].config, method=method, **kw)


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("model,kind", CASES, ids=IDS)
def test_ddim_equals_flowmatch_euler_in_pipeline(parts, model, kind):
    """Same sigmas as FlowMatchEuler: SD3 calls set_timesteps(n) (grid='diffusers' is FlowMatch's own spacing),
    FLUX passes its sigmas linspace(1, 1/n, n) and mu, as to FlowMatchEuler (DEISFastScheduler from a FlowMatch
    config keeps use_flow_sigmas=False, so the pipeline does not leave the spacing to it)."""
    n = 8
    ref_s = FlowMatchEulerDiscreteScheduler.from_config(parts[model]["scheduler"].config)
    with Calls(parts[model]["transformer"]) as ref_calls:
        ref = _run(parts, model, kind, ref_s, n)
    ours_s = _ours(parts, model, "ddim", **({"grid": "diffusers"} if model == "sd3" else {}))
    with Calls(parts[model]["transformer"]) as calls:
        out = _run(parts, model, kind, ours_s, n)
    assert len(calls.timesteps) == len(ref_calls.timesteps) == (n if kind == "t2i" else n // 2)
    assert calls.timesteps == pytest.approx(ref_calls.timesteps, rel=1e-6)
    assert _rel(out, ref) <= 1e-5


@pytest.mark.parametrize("model,kind", CASES, ids=IDS)
def test_every_method_makes_exactly_the_requested_transformer_calls(parts, model, kind):
    """NFE = num_inference_steps (text-to-image; FLUX img2img passes sigmas, resampled for RK / PFDiff grids);
    img2img at strength 0.5 calls timesteps[k:]."""
    for method in ALL_METHODS:
        stages = 1 if method == "pfdiff" else deis_fast.METHOD_SPECS[method].stages
        n = 8 if stages == 4 else 6
        sch = _ours(parts, model, method)
        with Calls(parts[model]["transformer"]) as calls:
            out = _run(parts, model, kind, sch, n)
        k = n - int(n * 0.5) if kind == "img2img" else 0
        scale = 1000.0 if model == "flux" else 1.0   # FLUX's transformer takes t, SD3's 1000 t
        assert sch.plan.nfe == n and len(calls.timesteps) == n - k, method
        assert calls.timesteps == pytest.approx([float(t) / scale for t in sch.timesteps[k:]], rel=1e-6), method
        assert torch.isfinite(out).all(), method
