"""tune_pipeline(): deis_fast.tuning.tune for a diffusers pipeline (its denoiser under guidance, its own text encoders
and scheduler). One small adapter per pipeline family (Stable Diffusion, SDXL, SD3, FLUX) says how the pipeline calls
its network, encodes prompts, shapes latents and sets its scheduler's timesteps; tune() does the rest."""
from __future__ import annotations
import dataclasses
from typing import Any, Callable, Sequence
import numpy as np
import torch
from ...tuning.files import Tuned
from ...tuning.search import _candidates, tune


__all__ = ["tune_pipeline"]

_NEG = "negative_"


class _PipelineDenoiser(torch.nn.Module):
    """A pipeline's denoiser as its scheduler sees it: ``call(net, x, t, **cond)`` as the pipeline calls its network,
    under classifier-free guidance ``uncond + g (cond - uncond)`` when ``negative_*`` conditioning is given (one batch,
    negative first, as the SD / SDXL / SD3 pipelines batch it)."""

    def __init__(self, net: torch.nn.Module, call: Callable[..., torch.Tensor], guidance_scale: float | None):
        super().__init__()
        self.net, self.call, self.g = net, call, None if guidance_scale is None else float(guidance_scale)

    def forward(self, x: torch.Tensor, t: torch.Tensor, **cond: Any) -> torch.Tensor:
        dt = self.net.dtype
        x = x.to(dt)
        cond = {k: v.to(dt) if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in cond.items()}
        t = t.reshape(-1).expand(x.shape[0]) if t.numel() == 1 else t
        pos = {k: v for k, v in cond.items() if not k.startswith(_NEG)}
        neg = {k[len(_NEG):]: v for k, v in cond.items() if k.startswith(_NEG)}
        if not neg or self.g is None or self.g <= 1.0:
            return self.call(self.net, x, t, **pos)
        both = {k: torch.cat([neg[k], v]) for k, v in pos.items()}
        u, c = self.call(self.net, torch.cat([x, x]), torch.cat([t, t]), **both).chunk(2)
        return u + self.g * (c - u)


@dataclasses.dataclass
class _Family:
    """What tune() needs of one pipeline family: the denoiser's network call, the prompt encoder (per-row cond of a
    list of prompts, ``negative_*`` rows for CFG), one latent's shape as the scheduler sees it, the image size, how
    the pipeline sets its scheduler's timesteps, and the guidance scale the file records."""
    name: str
    net: torch.nn.Module
    call: Callable[..., torch.Tensor]
    encode: Callable[[list[str]], dict]
    shape: tuple[int, ...]
    resolution: tuple[int, int]
    set_timesteps: Callable[[Any, int], None]
    guidance: float | None


def _set_timesteps(sch: Any, nfe: int, sigmas: Any = None, **kw: Any) -> None:
    """diffusers' ``retrieve_timesteps``: ``sigmas`` replace the step count when given."""
    if sigmas is not None:
        sch.set_timesteps(sigmas=sigmas, **kw)
    else:
        sch.set_timesteps(nfe, **kw)


def _calculate_shift(seq_len: int, cfg: Any, max_shift_default: float) -> float:
    """The pipelines' ``calculate_shift`` on the scheduler config's keys (and the pipeline's defaults)."""
    from ...core.schedules import flux_mu
    return flux_mu(seq_len, cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
                   cfg.get("base_shift", 0.5), cfg.get("max_shift", max_shift_default))


def _size(pipe: Any, height: int | None, width: int | None, default: int, multiple: int) -> tuple[int, int]:
    h, w = height or default, width or default
    if h % multiple or w % multiple:
        raise ValueError(f"{type(pipe).__name__}: height and width must be multiples of {multiple}, got {h}x{w}")
    return h, w


def _cfg_encoder(encode: Callable[..., tuple], do_cfg: bool, names: Sequence[str]) -> Callable[[list[str]], dict]:
    """Per-row cond from a pipeline's ``encode_prompt`` that returns (pos_1, neg_1, pos_2, neg_2, ...), as the SD,
    SDXL and SD3 pipelines do."""
    def f(ps: list[str]) -> dict:
        with torch.no_grad():
            out = encode(ps)
        d = {n: out[2 * i] for i, n in enumerate(names)}
        if do_cfg:
            d.update({_NEG + n: out[2 * i + 1] for i, n in enumerate(names)})
        return d
    return f


def _sd(pipe: Any, g: float, neg: str | None, height: int | None, width: int | None) -> _Family:
    """Stable Diffusion 1.x / 2.x: UNet with the prompt embeddings as cross-attention."""
    unet, vsf, dev = pipe.unet, pipe.vae_scale_factor, pipe._execution_device
    if unet.config.time_cond_proj_dim is not None:
        raise NotImplementedError("a UNet with time_cond_proj_dim (LCM-style guidance embedding) is not tuned yet")
    h, w = _size(pipe, height, width, unet.config.sample_size * vsf, vsf)
    do_cfg = g > 1.0

    def encode(ps: list[str]) -> tuple:
        return pipe.encode_prompt(ps, dev, 1, do_cfg, None if neg is None else [neg] * len(ps))

    def call(net, x, t, prompt_embeds):
        return net(x, t, encoder_hidden_states=prompt_embeds, return_dict=False)[0]
    return _Family("sd", unet, call, _cfg_encoder(encode, do_cfg, ["prompt_embeds"]),
                   (unet.config.in_channels, h // vsf, w // vsf), (h, w), _set_timesteps, g)


def _sdxl(pipe: Any, g: float, neg: str | None, height: int | None, width: int | None) -> _Family:
    """SDXL: UNet with the pooled text embedding and the size / crop ids (``add_time_ids``) as added conditioning;
    original and target size = the image size, crop (0, 0), as the pipeline's defaults."""
    unet, vsf, dev = pipe.unet, pipe.vae_scale_factor, pipe._execution_device
    if unet.config.time_cond_proj_dim is not None:
        raise NotImplementedError("a UNet with time_cond_proj_dim (LCM-style guidance embedding) is not tuned yet")
    h, w = _size(pipe, height, width, pipe.default_sample_size * vsf, vsf)
    do_cfg = g > 1.0

    def encode(ps: list[str]) -> tuple:
        pe, npe, pooled, npooled = pipe.encode_prompt(prompt=ps, device=dev, num_images_per_prompt=1,
                                                      do_classifier_free_guidance=do_cfg,
                                                      negative_prompt=None if neg is None else [neg] * len(ps))
        proj = (int(pooled.shape[-1]) if pipe.text_encoder_2 is None else pipe.text_encoder_2.config.projection_dim)
        ids = pipe._get_add_time_ids((h, w), (0, 0), (h, w), dtype=pe.dtype,
                                     text_encoder_projection_dim=proj).to(dev).repeat(len(ps), 1)
        return pe, npe, pooled, npooled, ids, ids

    def call(net, x, t, prompt_embeds, text_embeds, time_ids):
        return net(x, t, encoder_hidden_states=prompt_embeds, return_dict=False,
                   added_cond_kwargs={"text_embeds": text_embeds, "time_ids": time_ids})[0]
    return _Family("sdxl", unet, call, _cfg_encoder(encode, do_cfg, ["prompt_embeds", "text_embeds", "time_ids"]),
                   (unet.config.in_channels, h // vsf, w // vsf), (h, w), _set_timesteps, g)


def _sd3(pipe: Any, g: float, neg: str | None, height: int | None, width: int | None) -> _Family:
    """SD3 / SD3.5: joint-attention transformer on the concatenated CLIP + T5 embeddings and the pooled CLIP
    projections; mu from the image token count where the scheduler has dynamic shifting (SD3.5 configs)."""
    tr, vsf, dev = pipe.transformer, pipe.vae_scale_factor, pipe._execution_device
    patch = tr.config.patch_size
    h, w = _size(pipe, height, width, pipe.default_sample_size * vsf, vsf * patch)
    do_cfg = g > 1.0

    def encode(ps: list[str]) -> tuple:
        return pipe.encode_prompt(prompt=ps, prompt_2=None, prompt_3=None, device=dev, num_images_per_prompt=1,
                                  do_classifier_free_guidance=do_cfg,
                                  negative_prompt=None if neg is None else [neg] * len(ps), max_sequence_length=256)

    def call(net, x, t, prompt_embeds, pooled_projections):
        return net(hidden_states=x, timestep=t, encoder_hidden_states=prompt_embeds,
                   pooled_projections=pooled_projections, return_dict=False)[0]

    def set_timesteps(sch: Any, nfe: int) -> None:
        kw = {}
        if sch.config.get("use_dynamic_shifting", None):
            kw["mu"] = _calculate_shift((h // vsf // patch) * (w // vsf // patch), sch.config, 1.16)
        _set_timesteps(sch, nfe, **kw)
    return _Family("sd3", tr, call, _cfg_encoder(encode, do_cfg, ["prompt_embeds", "pooled_projections"]),
                   (tr.config.in_channels, h // vsf, w // vsf), (h, w), set_timesteps, g)


def _flux(pipe: Any, g: float, neg: str | None, height: int | None, width: int | None) -> _Family:
    """FLUX: transformer on packed latents (2x2 patches: [tokens, 4 C]) with latent image ids and text ids, CLIP's
    pooled embedding and T5's; distilled guidance as the guidance embedding (no CFG batch); the scheduler gets the
    pipeline's sigmas and mu from the image token count."""
    if neg is not None:
        raise NotImplementedError("FLUX pipelines are tuned with their distilled guidance (guidance_scale); true CFG "
                                  "with a negative prompt is not tuned yet: drop the negative prompt")
    tr, vsf, dev = pipe.transformer, pipe.vae_scale_factor, pipe._execution_device
    h, w = _size(pipe, height, width, pipe.default_sample_size * vsf, vsf * 2)
    lh, lw = 2 * (h // (vsf * 2)), 2 * (w // (vsf * 2))
    tokens = (lh // 2) * (lw // 2)
    img_ids = pipe._prepare_latent_image_ids(1, lh // 2, lw // 2, dev, tr.dtype)
    guided = bool(tr.config.guidance_embeds)
    txt_ids: list[torch.Tensor] = []   # one row per text token, the same for every prompt: set by encode

    def encode(ps: list[str]) -> dict:
        with torch.no_grad():
            pe, pooled, ids = pipe.encode_prompt(prompt=ps, prompt_2=None, device=dev, num_images_per_prompt=1,
                                                 max_sequence_length=512)
        txt_ids[:] = [ids]
        return {"prompt_embeds": pe, "pooled_projections": pooled}

    def call(net, x, t, prompt_embeds, pooled_projections):
        guidance = torch.full([1], g, device=x.device, dtype=torch.float32).expand(x.shape[0]) if guided else None
        return net(hidden_states=x, timestep=t.to(x.dtype) / 1000, guidance=guidance,
                   pooled_projections=pooled_projections, encoder_hidden_states=prompt_embeds, txt_ids=txt_ids[0],
                   img_ids=img_ids, return_dict=False)[0]

    def set_timesteps(sch: Any, nfe: int) -> None:
        sigmas = None if sch.config.get("use_flow_sigmas", False) else np.linspace(1.0, 1 / nfe, nfe)
        _set_timesteps(sch, nfe, sigmas=sigmas, mu=_calculate_shift(tokens, sch.config, 1.15))
    return _Family("flux", tr, call, encode, (tokens, tr.config.in_channels), (h, w), set_timesteps,
                   g if guided else None)


def _family_of(pipe: Any) -> Callable[..., _Family]:
    """The adapter of a pipeline: by its network's class (FLUX / SD3 transformers) or its UNet's added conditioning
    (SDXL's text_time); NotImplementedError for the rest."""
    net = getattr(pipe, "transformer", None)
    kind = type(net).__name__ if net is not None else None
    if kind == "FluxTransformer2DModel" and hasattr(pipe, "_prepare_latent_image_ids"):
        return _flux
    if kind == "SD3Transformer2DModel" and hasattr(pipe, "encode_prompt"):
        return _sd3
    unet = getattr(pipe, "unet", None)
    if unet is not None and hasattr(pipe, "encode_prompt"):
        if unet.config.get("addition_embed_type") == "text_time" and hasattr(pipe, "_get_add_time_ids"):
            return _sdxl
        if unet.config.get("addition_embed_type") is None:
            return _sd
    raise NotImplementedError(f"tune_pipeline handles Stable Diffusion, SDXL, SD3 and FLUX-style pipelines; "
                              f"{type(pipe).__name__} is not one yet: wrap its denoiser as model(x, t, **cond) and "
                              "call deis_fast.tuning.tune")


# each family's guidance_scale default, as its pipeline's __call__ has it
_DEFAULT_GUIDANCE = {"_sd": 7.5, "_sdxl": 5.0, "_sd3": 7.0, "_flux": 3.5}


def tune_pipeline(pipe: Any, prompts: Sequence[str], held_out_prompts: Sequence[str],
                  method: str | Sequence[str] | None = "tab3",
                  nfe: int = 8, *, guidance_scale: float | None = None, negative_prompt: str | None = None,
                  height: int | None = None, width: int | None = None, noises_per_prompt: int = 1, seed: int = 0,
                  **kw: Any) -> Tuned:
    """:func:`tune` for a diffusers pipeline: Stable Diffusion (``pipe.unet``), SDXL (``add_time_ids``), SD3 (joint
    transformer, CFG with pooled projections) or FLUX (packed latents, guidance embedding, ``mu`` from the image
    size). ``prompts`` are the calibration prompts, ``held_out_prompts`` the held-out ones (never seen by the fit),
    each with ``noises_per_prompt`` latent noises; the model tuned is the pipeline's network as its ``__call__`` calls
    it, under its guidance at ``guidance_scale`` (default: the pipeline's own; FLUX: the distilled guidance
    embedding), on the pipeline's own text encoders, at ``height`` x ``width`` (default: the pipeline's); the schedule
    and prediction type are what ``DEISFastScheduler.from_config(pipe.scheduler.config)`` runs in that pipeline (FLUX:
    with its mu for this resolution), and the untuned configuration is that scheduler's own plan. Other keywords go to
    :func:`tune` (``plan=True``, ``checkpoint=True``, ``cache_dir``, ...)."""
    from .scheduler import DEISFastScheduler
    from ...sampler import randn_per_sample
    adapter = _family_of(pipe)
    if len(prompts) < 2 or len(held_out_prompts) < 1:
        raise ValueError("need >= 2 calibration prompts and >= 1 held-out prompt")
    g = _DEFAULT_GUIDANCE[adapter.__name__] if guidance_scale is None else float(guidance_scale)
    fam = adapter(pipe, g, negative_prompt, height, width)
    # the untuned configuration: the scheduler's own plan of the (first) candidate method, its timesteps set as the
    # pipeline sets them
    sch = DEISFastScheduler.from_config(pipe.scheduler.config, method=_candidates(method, {})[0][0].name)
    fam.set_timesteps(sch, nfe)
    dev, dtype = fam.net.device, fam.net.dtype

    def embeds(ps: Sequence[str]) -> dict:
        return fam.encode([p for p in ps for _ in range(noises_per_prompt)])

    n_cal, n_ho = len(prompts) * noises_per_prompt, len(held_out_prompts) * noises_per_prompt
    z = randn_per_sample((n_cal + n_ho,) + fam.shape, range(seed, seed + n_cal + n_ho), dev, dtype)
    cond, held_out_cond = embeds(prompts), embeds(held_out_prompts)
    model = _PipelineDenoiser(fam.net, fam.call, fam.guidance)
    meta = dict(kw.pop("meta", None) or {}, prompts=list(prompts), held_out_prompts=list(held_out_prompts),
                latent_shape=list(fam.shape), noises_per_prompt=noises_per_prompt, seed=seed,
                negative_prompt=negative_prompt)
    return tune(model, sch.schedule, method, nfe, prediction=sch.prediction, noise=z[:n_cal],
                held_out_noise=z[n_cal:], cond=cond, held_out_cond=held_out_cond, baseline_plan=sch.plan,
                guidance_scale=fam.guidance, pipeline=type(pipe).__name__, resolution=fam.resolution, meta=meta,
                cache_key=f"{fam.name}|cfg{fam.guidance}|{fam.resolution}", **kw)
