"""Embedded models: two small U-Nets (same architecture) for scikit-learn's digits.

Both are trained by ``scripts/train_digits.py`` (seeded; ``--objective eps|flow``) on the 1797 8x8
grayscale images of ``sklearn.datasets.load_digits`` and ship with the package as safetensors
(loaded with safetensors only, never pickle):

* ``"digits"`` (objective ``eps``, ``assets/digits_unet.safetensors``): epsilon prediction under a
  diffusers-style discrete VP schedule, ``betas = linspace(1e-4, 0.02, 1000)`` (``DIGITS_SCHEDULE =
  "linear"``); the network time is the *discrete* timestep index 0..999 as a float.
* ``"flow"`` (objective ``flow``, ``assets/digits_flow_unet.safetensors``): rectified flow,
  ``x_t = (1 - t) x0 + t eps`` on t in [0, 1], velocity prediction ``v = eps - x0``; the network time
  is ``1000 t`` (diffusers' FlowMatch convention, :class:`deis_fast.FlowSchedule` default).

Conventions
-----------
* Data: pixel values 0..16 are mapped to [-1, 1] by ``x / 8 - 1``.
* Forward: ``model(x[B,1,8,8], t[B]) -> [B,1,8,8]``; non-integer ``t`` is fine (sinusoidal embedding
  of the float ``t``). A 0-dim tensor or a python number is broadcast over the batch.
"""
from __future__ import annotations

import math
import os
import struct
import zlib
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "DigitsUNet",
    "load_digits_model",
    "load_digits_data",
    "to_image",
    "digits_betas",
    "digits_alphas_cumprod",
    "DIGITS_SCHEDULE",
    "DIGITS_SHAPE",
    "DIGITS_NUM_TRAIN_TIMESTEPS",
    "DIGITS_BETA_START",
    "DIGITS_BETA_END",
    "DIGITS_WEIGHTS_PATH",
    "DEFAULT_CONFIG",
    "DigitsKind",
    "DIGITS_KINDS",
    "DIGITS_FLOW_WEIGHTS_PATH",
    "digits_kind",
    "training_example",
    "png_bytes",
]

DIGITS_SCHEDULE = "linear"
DIGITS_SHAPE = (1, 8, 8)
DIGITS_NUM_TRAIN_TIMESTEPS = 1000
DIGITS_BETA_START = 1e-4
DIGITS_BETA_END = 0.02
_ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
DIGITS_WEIGHTS_PATH = os.path.join(_ASSETS, "digits_unet.safetensors")
DIGITS_FLOW_WEIGHTS_PATH = os.path.join(_ASSETS, "digits_flow_unet.safetensors")
FLOW_TIME_SCALE = 1000.0

DEFAULT_CONFIG: Dict[str, int] = {
    "in_channels": 1,
    "base_channels": 32,
    "mid_channels": 64,
    "time_dim": 128,
    "groups": 8,
}


def digits_betas(dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Linear (diffusers ``"linear"``) betas used to train the digits model."""
    return torch.linspace(DIGITS_BETA_START, DIGITS_BETA_END, DIGITS_NUM_TRAIN_TIMESTEPS, dtype=torch.float64).to(dtype)


def digits_alphas_cumprod(dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.cumprod(1.0 - digits_betas(torch.float64), dim=0).to(dtype)


@dataclass(frozen=True)
class DigitsKind:
    """One embedded digits model: its training objective, weights file and the prediction it makes."""

    name: str          # CLI name: --model digits | flow
    objective: str     # train_digits.py --objective
    weights: str
    prediction: str    # deis_fast prediction type

    def schedule(self) -> Any:
        """The :class:`deis_fast.Schedule` the model was trained under."""
        from ..core.schedules import FlowSchedule, VPSchedule
        if self.objective == "flow":
            return FlowSchedule(shift=1.0, time_scale=FLOW_TIME_SCALE)
        return VPSchedule.discrete(DIGITS_SCHEDULE)


DIGITS_KINDS: Dict[str, DigitsKind] = {
    "digits": DigitsKind("digits", "eps", DIGITS_WEIGHTS_PATH, "eps"),
    "flow": DigitsKind("flow", "flow", DIGITS_FLOW_WEIGHTS_PATH, "flow"),
}


def digits_kind(name_or_objective: str) -> DigitsKind:
    """The :class:`DigitsKind` called ``name`` (``"digits"``/``"flow"``) or trained with that objective (``"eps"``)."""
    for k in DIGITS_KINDS.values():
        if name_or_objective in (k.name, k.objective):
            return k
    raise ValueError(f"unknown digits model {name_or_objective!r}; use one of {', '.join(DIGITS_KINDS)} "
                     f"(objectives: {', '.join(k.objective for k in DIGITS_KINDS.values())})")


def training_example(objective: str, x0: torch.Tensor, eps: torch.Tensor,
                     t: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_t, network time, regression target) of a training objective at per-sample times ``t``.

    ``eps``: ``t`` = integer timesteps 0..999, target eps. ``flow``: ``t`` in [0, 1], x_t = (1 - t) x0 + t eps,
    network time 1000 t, target the velocity eps - x0.
    """
    shape = (-1,) + (1,) * (x0.dim() - 1)
    if objective == "eps":
        ac = digits_alphas_cumprod(torch.float64)[t.long()].view(shape)
        return ac.sqrt().to(x0.dtype) * x0 + (1.0 - ac).sqrt().to(x0.dtype) * eps, t.to(x0.dtype), eps
    if objective == "flow":
        tt = t.to(x0.dtype).view(shape)
        return (1.0 - tt) * x0 + tt * eps, FLOW_TIME_SCALE * t.to(x0.dtype), eps - x0
    raise ValueError(f"unknown objective {objective!r}; use eps or flow")


# ----------------------------------------------------------------------------- model


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of a (possibly fractional) float timestep ``t`` [B] -> [B, dim]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None, :]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class ResBlock(nn.Module):
    """GroupNorm -> SiLU -> conv, + time embedding, GroupNorm -> SiLU -> conv, residual."""

    def __init__(self, cin: int, cout: int, time_dim: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.temb = nn.Linear(time_dim, cout)
        self.norm2 = nn.GroupNorm(groups, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb(emb)[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class DigitsUNet(nn.Module):
    """Small U-Net, 8x8 -> 4x4 -> 2x2, channels base/mid/mid, epsilon prediction."""

    def __init__(
        self,
        in_channels: int = 1,
        base_channels: int = 32,
        mid_channels: int = 64,
        time_dim: int = 128,
        groups: int = 8,
    ):
        super().__init__()
        c0, c1 = base_channels, mid_channels
        self.config = dict(
            in_channels=in_channels, base_channels=c0, mid_channels=c1, time_dim=time_dim, groups=groups
        )
        self.emb_dim = c0
        self.time_mlp = nn.Sequential(nn.Linear(c0, time_dim), nn.SiLU(), nn.Linear(time_dim, time_dim))
        self.conv_in = nn.Conv2d(in_channels, c0, 3, padding=1)
        # encoder
        self.down0 = ResBlock(c0, c0, time_dim, groups)  # 8x8
        self.pool0 = nn.Conv2d(c0, c0, 3, stride=2, padding=1)  # -> 4x4
        self.down1 = ResBlock(c0, c1, time_dim, groups)  # 4x4
        self.pool1 = nn.Conv2d(c1, c1, 3, stride=2, padding=1)  # -> 2x2
        # bottleneck
        self.mid0 = ResBlock(c1, c1, time_dim, groups)  # 2x2
        self.mid1 = ResBlock(c1, c1, time_dim, groups)
        # decoder
        self.up1 = ResBlock(c1 + c1, c1, time_dim, groups)  # 4x4
        self.up0 = ResBlock(c1 + c0, c0, time_dim, groups)  # 8x8
        self.norm_out = nn.GroupNorm(groups, c0)
        self.conv_out = nn.Conv2d(c0, in_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, x: torch.Tensor, t: Union[torch.Tensor, float, int]) -> torch.Tensor:
        B = x.shape[0]
        if not torch.is_tensor(t):
            t = torch.tensor(float(t), device=x.device)
        t = t.to(device=x.device, dtype=torch.float32).reshape(-1)
        if t.numel() == 1 and B != 1:
            t = t.expand(B)
        # embedding computed in fp32 (t up to 999), then cast to the parameter dtype
        wdtype = self.conv_in.weight.dtype
        emb = self.time_mlp(timestep_embedding(t, self.emb_dim).to(wdtype))
        h0 = self.down0(self.conv_in(x), emb)  # c0, 8x8
        h1 = self.down1(self.pool0(h0), emb)  # c1, 4x4
        h = self.pool1(h1)  # c1, 2x2
        h = self.mid1(self.mid0(h, emb), emb)
        h = F.interpolate(h, scale_factor=2, mode="nearest")  # 4x4
        h = self.up1(torch.cat([h, h1], dim=1), emb)
        h = F.interpolate(h, scale_factor=2, mode="nearest")  # 8x8
        h = self.up0(torch.cat([h, h0], dim=1), emb)
        return self.conv_out(F.silu(self.norm_out(h)))


# ----------------------------------------------------------------------------- loading


def load_digits_model(
    device: Union[str, torch.device] = "cpu",
    dtype: torch.dtype = torch.float32,
    path: Optional[str] = None,
    kind: str = "digits",
) -> nn.Module:
    """Build :class:`DigitsUNet` and load shipped safetensors weights (eval mode): ``kind="digits"`` the eps
    model, ``kind="flow"`` the rectified-flow velocity model (or ``path``, whose metadata must match ``kind``)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    k = digits_kind(kind)
    path = path or k.weights
    config = dict(DEFAULT_CONFIG)
    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("prediction", "epsilon") not in (k.prediction, {"eps": "epsilon"}.get(k.prediction)):
        raise ValueError(f"{path} holds a {meta.get('prediction')!r}-prediction model, not the {k.name!r} model "
                         f"({k.prediction}); pass the matching kind=")
    for k in config:
        if k in meta:
            config[k] = int(meta[k])
    model = DigitsUNet(**config)
    state = load_file(path, device="cpu")
    model.load_state_dict(state, strict=True)
    model.to(device=device, dtype=dtype)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


# ----------------------------------------------------------------------------- data helpers


def load_digits_data() -> torch.Tensor:
    """The 1797 scikit-learn digits as float32 [1797, 1, 8, 8] in [-1, 1] (x / 8 - 1)."""
    try:
        from sklearn.datasets import load_digits  # optional dependency (test extra; ships the data)
    except ImportError:
        raise ImportError("load_digits_data() reads scikit-learn's digits: pip install scikit-learn") from None

    images = load_digits().images.astype(np.float32)  # [1797, 8, 8], values 0..16
    return torch.from_numpy(images / 8.0 - 1.0).reshape(-1, *DIGITS_SHAPE).contiguous()


def to_image(x: Union[torch.Tensor, np.ndarray]) -> np.ndarray:
    """Inverse of the data scaling: [-1, 1] -> uint8 0..255 (clamped), same shape as ``x``.

    The model-space value v corresponds to the digits pixel value 8 * (v + 1) in 0..16,
    which is rescaled to 0..255.
    """
    if torch.is_tensor(x):
        x = x.detach().float().cpu().numpy()
    x = np.asarray(x, dtype=np.float32)
    v = np.clip((x + 1.0) * 0.5, 0.0, 1.0)
    return np.round(v * 255.0).astype(np.uint8)


def png_bytes(img: np.ndarray) -> bytes:
    """A PNG file (8-bit gray / RGB / RGBA) for a uint8 array [C, H, W] (e.g. ``to_image(x)[i]``); no imaging
    library needed. Other channel counts are a ValueError."""
    c, h, w = img.shape
    color = {1: 0, 3: 2, 4: 6}.get(c)
    if color is None:
        raise ValueError(f"PNG output needs 1, 3 or 4 channels, the samples have {c}")
    rows = np.ascontiguousarray(np.transpose(img, (1, 2, 0))).reshape(h, w * c)
    raw = b"".join(b"\x00" + rows[y].tobytes() for y in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, color, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))
