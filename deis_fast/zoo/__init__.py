"""The embedded models (``digits``: two 8x8 U-Nets shipped as safetensors in ``assets/``) and
:func:`load_model`, which also loads a diffusers ``UNet2DModel`` folder with the schedule it was trained under."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Callable

import torch

__all__ = ["LoadedModel", "load_model", "MODEL_SCHEDULES"]

MODEL_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


@dataclass
class LoadedModel:
    """What :func:`load_model` returns: ``model(x, t)`` (t in the model's own units) with the ``schedule`` it was
    trained under, its ``prediction`` type, the ``shape`` of one sample [C, H, W] and an id (name or folder)."""

    model: Callable[..., Any]
    schedule: Any
    prediction: str
    shape: tuple[int, ...]
    model_id: str


def _scheduler_config(root: str) -> dict | None:
    for cand in (os.path.join(root, "scheduler", "scheduler_config.json"), os.path.join(root, "scheduler_config.json")):
        if os.path.isfile(cand):
            try:
                with open(cand) as f:
                    return json.load(f)
            except (OSError, ValueError) as e:
                raise ValueError(f"cannot read {cand}: {e}") from None
    return None


def load_model(spec: str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
               prediction: str | None = None, schedule: str | None = None) -> LoadedModel:
    """An embedded digits model (``spec='digits'``: eps on DDPM's linear betas, ``'flow'``: rectified flow,
    velocity, network time 1000 t; both [1, 8, 8], ~1 ms a call on a CPU) or a diffusers ``UNet2DModel`` folder,
    frozen and in eval mode, with its schedule, prediction type and sample shape (``deis_fast.load_model``).
    A bad spec or folder raises a ValueError that says which and how to fix it."""
    from .digits import DIGITS_KINDS
    from ..core.schedules import VPSchedule, schedule_from_diffusers_config
    if spec in DIGITS_KINDS:
        from .digits import DIGITS_SHAPE, load_digits_model
        kind = DIGITS_KINDS[spec]
        sched = kind.schedule()
        if schedule is not None:
            if kind.objective != "eps":
                raise ValueError(f"schedule= is for VP models; the embedded {spec!r} model is a rectified-flow "
                                 "model (x_t = (1 - t) x0 + t eps): drop schedule=")
            sched = VPSchedule.discrete(schedule)
        return LoadedModel(load_digits_model(device=device, dtype=dtype, kind=spec), sched,
                           prediction or kind.prediction, tuple(DIGITS_SHAPE), spec)
    root = os.path.abspath(spec)
    if not os.path.isdir(root):
        raise ValueError(f"{spec!r}: not one of {', '.join(map(repr, DIGITS_KINDS))} and not a directory")
    unet_dir = os.path.join(root, "unet") if os.path.isdir(os.path.join(root, "unet")) else root
    cfg = _scheduler_config(root)
    if cfg is None and schedule is None:
        raise ValueError(f"{spec!r} has no scheduler/scheduler_config.json: pass schedule= "
                         f"({'|'.join(MODEL_SCHEDULES)}) and, unless it predicts eps, prediction=")
    if schedule is not None:
        cfg = dict(cfg or {}, beta_schedule=schedule)
    try:
        from diffusers import UNet2DModel
    except ImportError:
        raise ValueError(f"loading the folder {spec!r} needs diffusers: pip install 'deis_fast[diffusers]'") from None
    try:
        unet = UNet2DModel.from_pretrained(unet_dir, use_safetensors=True)  # safetensors only, never pickle
    except (OSError, ValueError, EnvironmentError) as e:
        raise ValueError(f"{spec!r}: cannot load a UNet2DModel with safetensors weights: {e}") from None
    unet = unet.to(device=device, dtype=dtype).eval().requires_grad_(False)
    size = unet.config.sample_size
    size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
    shape = (int(unet.config.in_channels),) + tuple(int(s) for s in size)
    pred = prediction or cfg.get("prediction_type", "epsilon")
    try:
        sched = schedule_from_diffusers_config(cfg)
    except (ValueError, TypeError, KeyError) as e:
        raise ValueError(f"{spec!r}: unusable scheduler config: {e}") from None
    return LoadedModel(unet, sched, pred, shape, root)
