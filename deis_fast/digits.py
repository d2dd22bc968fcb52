"""Embedded default model: a small epsilon-prediction U-Net for scikit-learn's digits.

The model is trained by ``scripts/train_digits.py`` (seeded) on the 1797 8x8 grayscale
images of ``sklearn.datasets.load_digits`` and its weights ship with the package as
``deis_fast/assets/digits_unet.safetensors`` (loaded with safetensors only, never pickle).

Conventions
-----------
* Data: pixel values 0..16 are mapped to [-1, 1] by ``x / 8 - 1``.
* Noise schedule: diffusers-style discrete VP, ``betas = linspace(1e-4, 0.02, 1000)``,
  ``alphas_cumprod = cumprod(1 - betas)``  (``DIGITS_SCHEDULE = "linear"``).
* Forward: ``model(x[B,1,8,8], t[B]) -> eps[B,1,8,8]`` where ``t`` is the *discrete*
  timestep index 0..999 as a float; non-integer values are fine (sinusoidal embedding of
  the float ``t``). A 0-dim tensor or a python number is broadcast over the batch.
"""
from __future__ import annotations

import math
import os
from typing import Dict, Optional, Union

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
]

DIGITS_SCHEDULE = "linear"
DIGITS_SHAPE = (1, 8, 8)
DIGITS_NUM_TRAIN_TIMESTEPS = 1000
DIGITS_BETA_START = 1e-4
DIGITS_BETA_END = 0.02
DIGITS_WEIGHTS_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "digits_unet.safetensors")

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
) -> nn.Module:
    """Build :class:`DigitsUNet` and load the shipped safetensors weights (eval mode)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = path or DIGITS_WEIGHTS_PATH
    config = dict(DEFAULT_CONFIG)
    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
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
    from sklearn.datasets import load_digits  # optional dependency (test extra)

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
