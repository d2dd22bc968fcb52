"""Issue #28 in pipelines: tiny Stable Diffusion (SD 1.5 and SDXL scheduler configs) and SD3 / FLUX pipelines from
local parts give the same images with DEISFastScheduler.from_config(src.config, method=<equivalent>,
grid="diffusers") as with the scheduler it replaces."""
import functools
import warnings

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers", reason="needs diffusers: pip install -e '.[test]'")
pytest.importorskip("transformers", reason="needs transformers: pip install -e '.[test]'")
from diffusers import (DEISMultistepScheduler, DPMSolverMultistepScheduler,  # noqa: E402
                       FlowMatchEulerDiscreteScheduler, FluxPipeline, StableDiffusion3Pipeline,
                       StableDiffusionImg2ImgPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline,
                       UniPCMultistepScheduler)

from deis_fast.integrations.diffusers import DEISFastScheduler  # noqa: E402

from _diffusers_common import (parity_rel, tiny_flux_components, tiny_sd3_components,  # noqa: E402
                               tiny_sd_components, tiny_sdxl_components)

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TOL = 1e-4
SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
SDXL = dict(SD, timestep_spacing="leading", steps_offset=1)


def _promoted(sch):
    """The source scheduler with its float32 sigmas promoted to float64 after set_timesteps (float64 pipeline)."""
    inner = sch.set_timesteps

    @functools.wraps(inner)   # pipelines read its signature (FLUX passes sigmas)
    def set_timesteps(*a, **k):
        inner(*a, **k)
        sch.sigmas = sch.sigmas.double()
    sch.set_timesteps = set_timesteps
    return sch


def _ours(src, method, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return DEISFastScheduler.from_config(src.config, method=method, grid="diffusers", **kw)


_rel = parity_rel   # records the measured differences under DEIS_FAST_PARITY_LOG


@pytest.fixture(scope="module")
def sd_parts(tmp_path_factory):
    return tiny_sd_components(str(tmp_path_factory.mktemp("tiny_sd")), torch.float64)


def _sd(parts, sch, kind="t2i", n=8):
    kw = dict(prompt="a photo of a cat", negative_prompt="blurry", guidance_scale=3.0, height=8, width=8,
              num_inference_steps=n, generator=torch.Generator().manual_seed(11))
    cls = StableDiffusionPipeline
    if kind == "img2img":
        cls = StableDiffusionImg2ImgPipeline
        kw.pop("height"), kw.pop("width")
        kw.update(image=torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64),
                  strength=0.6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = cls(scheduler=sch, **parts)
        lat = pipe(output_type="latent", **kw).images
        kw["generator"] = torch.Generator().manual_seed(11)
        img = pipe(output_type="np", **kw).images
    return lat, img


SD_CASES = [
    ("dpm_karras_sd15", DPMSolverMultistepScheduler, dict(SD, use_karras_sigmas=True), "dpmpp_2m", {}),
    ("dpm_sdxl", DPMSolverMultistepScheduler, dict(SDXL), "dpmpp_2m", {}),
    ("dpm_karras_sdxl_v", DPMSolverMultistepScheduler,
     dict(SDXL, use_karras_sigmas=True, prediction_type="v_prediction"), "dpmpp_2m", {}),
    ("dpm3_lu", DPMSolverMultistepScheduler, dict(SD, solver_order=3, use_lu_lambdas=True), "dpmpp_3m", {}),
    ("dpm_euler_at_final", DPMSolverMultistepScheduler, dict(SDXL, euler_at_final=True, use_karras_sigmas=True),
     "dpmpp_2m", {}),
    ("unipc_sdxl", UniPCMultistepScheduler, dict(SDXL), "unipc2", {}),
    ("unipc3_karras_bh1", UniPCMultistepScheduler, dict(SD, solver_order=3, solver_type="bh1",
                                                        use_karras_sigmas=True, final_sigmas_type="sigma_min"),
     "unipc3", dict(variant="bh1")),
    ("deis_exponential", DEISMultistepScheduler, dict(SD, solver_order=3, use_exponential_sigmas=True), "logrho3", {}),
]


@pytest.mark.parametrize("name,cls,cfg,method,kw", SD_CASES, ids=[c[0] for c in SD_CASES])
def test_sd_pipelines_same_images(sd_parts, name, cls, cfg, method, kw):
    ref_lat, ref_img = _sd(sd_parts, _promoted(cls(**cfg)))
    lat, img = _sd(sd_parts, _ours(cls(**cfg), method, **kw))
    assert _rel(lat, ref_lat) <= TOL and np.abs(img - ref_img).max() <= TOL, (_rel(lat, ref_lat),
                                                                              np.abs(img - ref_img).max())


def test_sd_img2img_same_images(sd_parts):
    cfg = dict(SDXL, use_karras_sigmas=True)
    ref_lat, ref_img = _sd(sd_parts, _promoted(DPMSolverMultistepScheduler(**cfg)), "img2img", 10)
    lat, img = _sd(sd_parts, _ours(DPMSolverMultistepScheduler(**cfg), "dpmpp_2m"), "img2img", 10)
    assert _rel(lat, ref_lat) <= TOL and np.abs(img - ref_img).max() <= TOL


def _embeds(negative=True):
    g = torch.Generator().manual_seed(5)
    e = {k: torch.randn(shape, generator=g, dtype=torch.float64)
         for k, shape in [("prompt_embeds", (1, 5, 16)), ("pooled_prompt_embeds", (1, 16)),
                          ("negative_prompt_embeds", (1, 5, 16)), ("negative_pooled_prompt_embeds", (1, 16))]}
    return e if negative else {k: v for k, v in e.items() if not k.startswith("negative")}


@pytest.fixture(scope="module")
def sdxl_parts():
    return tiny_sdxl_components()


def _sdxl(parts, sch, n=8):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = StableDiffusionXLPipeline(scheduler=sch, **parts)
        out = [pipe(num_inference_steps=n, height=8, width=8, output_type=kind, guidance_scale=3.0,
                    generator=torch.Generator().manual_seed(1), **_embeds()).images for kind in ("latent", "np")]
    return out


SDXL_CASES = [("dpm_karras", DPMSolverMultistepScheduler, dict(SDXL, use_karras_sigmas=True), "dpmpp_2m", {}),
              ("dpm_sde_karras", DPMSolverMultistepScheduler,
               dict(SDXL, use_karras_sigmas=True, algorithm_type="sde-dpmsolver++"), "dpmpp_2m_sde", {}),
              ("unipc", UniPCMultistepScheduler, dict(SDXL), "unipc2", {}),
              ("deis", DEISMultistepScheduler, dict(SDXL, solver_order=3), "logrho3", {})]


@pytest.mark.parametrize("name,cls,cfg,method,kw", SDXL_CASES, ids=[c[0] for c in SDXL_CASES])
def test_sdxl_pipeline_same_images(sdxl_parts, name, cls, cfg, method, kw):
    """StableDiffusionXLPipeline (added time ids, pooled embeddings) from tiny local parts."""
    ref_lat, ref_img = _sdxl(sdxl_parts, _promoted(cls(**cfg)))
    lat, img = _sdxl(sdxl_parts, _ours(cls(**cfg), method, **kw))
    assert _rel(lat, ref_lat) <= TOL and np.abs(img - ref_img).max() <= TOL, (_rel(lat, ref_lat),
                                                                              np.abs(img - ref_img).max())


@pytest.fixture(scope="module")
def flow_parts():
    return {"sd3": tiny_sd3_components(), "flux": tiny_flux_components()}


def _flow(parts, model, sch, n=8):
    e = dict(_embeds(), guidance_scale=3.0) if model == "sd3" else _embeds(negative=False)
    cls = StableDiffusion3Pipeline if model == "sd3" else FluxPipeline
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = cls(**dict(parts[model], scheduler=sch))
        lat = pipe(num_inference_steps=n, height=8, width=8, output_type="latent",
                   generator=torch.Generator().manual_seed(1), **e).images
        img = pipe(num_inference_steps=n, height=8, width=8, output_type="np",
                   generator=torch.Generator().manual_seed(1), **e).images
    return lat, img


FLOW_CASES = [("sd3", FlowMatchEulerDiscreteScheduler, dict(shift=3.0), "ddim"),
              ("sd3", FlowMatchEulerDiscreteScheduler, dict(shift=3.0, use_karras_sigmas=True), "ddim"),
              ("sd3", FlowMatchEulerDiscreteScheduler, dict(shift=3.0, use_exponential_sigmas=True), "ddim"),
              ("flux", FlowMatchEulerDiscreteScheduler,
               dict(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                    max_image_seq_len=4096), "ddim"),
              ("flux", FlowMatchEulerDiscreteScheduler,
               dict(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                    max_image_seq_len=4096, shift_terminal=0.2), "ddim"),
              ("sd3", UniPCMultistepScheduler, dict(use_flow_sigmas=True, flow_shift=3.0,
                                                    prediction_type="flow_prediction"), "unipc2"),
              ("sd3", DPMSolverMultistepScheduler, dict(use_flow_sigmas=True, flow_shift=3.0,
                                                        prediction_type="flow_prediction"), "dpmpp_2m")]


@pytest.mark.parametrize("model,cls,cfg,method", FLOW_CASES,
                         ids=["sd3", "sd3_karras", "sd3_exponential", "flux", "flux_terminal", "sd3_unipc",
                              "sd3_dpm"])
def test_flow_pipelines_same_images(flow_parts, model, cls, cfg, method):
    ref_lat, ref_img = _flow(flow_parts, model, _promoted(cls(**cfg)))
    lat, img = _flow(flow_parts, model, _ours(cls(**cfg), method))
    assert _rel(lat, ref_lat) <= TOL and np.abs(img - ref_img).max() <= TOL, (_rel(lat, ref_lat),
                                                                              np.abs(img - ref_img).max())
