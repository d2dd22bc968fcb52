"""tune_pipeline(): deis_fast.tuning.tune for a diffusers pipeline (its denoiser under guidance, its own text encoder and scheduler)."""
from __future__ import annotations
from typing import Any, Sequence
import torch
from ...tuning.files import Tuned
from ...tuning.search import _candidates, tune


__all__ = ["tune_pipeline"]


class _GuidedUNet(torch.nn.Module):
    """A Stable Diffusion pipeline's denoiser as the scheduler sees it: classifier-free guidance
    ``uncond + g (cond - uncond)`` of its UNet, batched as the pipeline batches it (negative first)."""

    def __init__(self, unet: torch.nn.Module, guidance_scale: float):
        super().__init__()
        self.unet, self.g = unet, float(guidance_scale)

    def forward(self, x: torch.Tensor, t: torch.Tensor, prompt_embeds: torch.Tensor,
                negative_embeds: torch.Tensor | None = None) -> torch.Tensor:
        x, prompt_embeds = x.to(self.unet.dtype), prompt_embeds.to(self.unet.dtype)
        negative_embeds = None if negative_embeds is None else negative_embeds.to(self.unet.dtype)
        t = t.reshape(-1).expand(x.shape[0]) if t.numel() in (1, x.shape[0]) else t
        if self.g > 1.0 and negative_embeds is not None:
            out = self.unet(torch.cat([x, x]), torch.cat([t, t]),
                            encoder_hidden_states=torch.cat([negative_embeds, prompt_embeds])).sample
            u, c = out.chunk(2)
            return u + self.g * (c - u)
        return self.unet(x, t, encoder_hidden_states=prompt_embeds).sample


def tune_pipeline(pipe: Any, prompts: Sequence[str], held_out_prompts: Sequence[str],
                  method: str | Sequence[str] | None = "tab3",
                  nfe: int = 8, *, guidance_scale: float = 7.5, negative_prompt: str | None = None,
                  height: int | None = None, width: int | None = None, noises_per_prompt: int = 1, seed: int = 0,
                  **kw: Any) -> Tuned:
    """:func:`tune` for a Stable Diffusion-style diffusers pipeline (``pipe.unet``, ``pipe.encode_prompt``):
    ``prompts`` are the calibration prompts, ``held_out_prompts`` the held-out ones (never seen by the fit), each with
    ``noises_per_prompt`` latent noises; the model tuned is the pipeline's UNet under classifier-free guidance at
    ``guidance_scale``, through the pipeline's own text encoder; the schedule and prediction type are what
    ``DEISFastScheduler.from_config(pipe.scheduler.config)`` runs, and the untuned configuration is that scheduler's
    own plan. Other keywords go to :func:`tune` (``plan=True``, ``checkpoint=True``, ``cache_dir``, ...)."""
    from .scheduler import DEISFastScheduler
    from ...sampler import randn_per_sample
    if not hasattr(pipe, "unet") or not hasattr(pipe, "encode_prompt"):
        raise NotImplementedError(f"tune_pipeline handles Stable Diffusion-style pipelines (a UNet and "
                                  f"encode_prompt); {type(pipe).__name__} is not one yet: wrap its denoiser as "
                                  "model(x, t, **cond) and call deis_fast.tuning.tune")
    if len(prompts) < 2 or len(held_out_prompts) < 1:
        raise ValueError("need >= 2 calibration prompts and >= 1 held-out prompt")
    # the untuned configuration: the scheduler's own plan of the (first) candidate method
    sch = DEISFastScheduler.from_config(pipe.scheduler.config, method=_candidates(method, {})[0][0].name)
    sch.set_timesteps(nfe)
    vae_scale = getattr(pipe, "vae_scale_factor", 8)
    size = pipe.unet.config.sample_size
    height = height or size * vae_scale
    width = width or size * vae_scale
    shape = (pipe.unet.config.in_channels, height // vae_scale, width // vae_scale)
    dev, dtype = pipe.unet.device, pipe.unet.dtype
    do_cfg = guidance_scale > 1.0

    def embeds(ps: Sequence[str]) -> dict:
        ps = [p for p in ps for _ in range(noises_per_prompt)]
        with torch.no_grad():
            pos, neg = pipe.encode_prompt(list(ps), dev, 1, do_cfg,
                                          None if negative_prompt is None else [negative_prompt] * len(ps))
        return {"prompt_embeds": pos, **({"negative_embeds": neg} if do_cfg else {})}

    n_cal, n_ho = len(prompts) * noises_per_prompt, len(held_out_prompts) * noises_per_prompt
    z = randn_per_sample((n_cal + n_ho,) + shape, range(seed, seed + n_cal + n_ho), dev, dtype)
    model = _GuidedUNet(pipe.unet, guidance_scale)
    meta = dict(kw.pop("meta", None) or {}, prompts=list(prompts), held_out_prompts=list(held_out_prompts),
                latent_shape=list(shape),
                noises_per_prompt=noises_per_prompt, seed=seed, negative_prompt=negative_prompt)
    return tune(model, sch.schedule, method, nfe, prediction=sch.prediction, noise=z[:n_cal],
                held_out_noise=z[n_cal:], cond=embeds(prompts), held_out_cond=embeds(held_out_prompts),
                baseline_plan=sch.plan, guidance_scale=guidance_scale, pipeline=type(pipe).__name__,
                resolution=(height, width), meta=meta, cache_key=f"cfg{guidance_scale}", **kw)
