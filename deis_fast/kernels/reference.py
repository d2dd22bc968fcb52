"""Torch eager implementation of the combine op: the reference every backend is tested against."""
from __future__ import annotations

from typing import Sequence

import torch


def combine_torch(sources: Sequence[torch.Tensor], coefs: Sequence[float], out: torch.Tensor | None,
                  noise: torch.Tensor | None = None, noise_coef: float = 0.0) -> torch.Tensor:
    """out = sum_j coefs[j] * sources[j] (+ noise_coef * noise), accumulated in fp32 (or fp64 for fp64 inputs).

    ``out=None`` returns a new tensor (differentiable: what autograd-recording sampling uses)."""
    dtype = sources[0].dtype if out is None else out.dtype
    acc_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    # upcast before multiplying: the first product must not be rounded to the low precision
    acc = sources[0].to(acc_dtype) * coefs[0] if sources[0].dtype != acc_dtype else sources[0] * coefs[0]
    for s, c in zip(sources[1:], coefs[1:]):
        acc.add_(s.to(acc_dtype) if s.dtype != acc_dtype else s, alpha=c)
    if noise is not None and noise_coef != 0.0:
        acc.add_(noise.to(acc_dtype) if noise.dtype != acc_dtype else noise, alpha=noise_coef)
    if out is None:
        return acc.to(dtype)
    out.copy_(acc)
    return out
