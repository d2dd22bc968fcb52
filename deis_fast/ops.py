"""The public fused op. Every Combine instruction of every plan is one call of :func:`combine`."""
from __future__ import annotations

from typing import Sequence

import torch

from .kernels.reference import combine_torch

MAX_SOURCES = 6


def combine(sources: Sequence[torch.Tensor], coefs: Sequence[float], out: torch.Tensor | None = None,
            noise: torch.Tensor | None = None, noise_coef: float = 0.0, backend: str | None = None) -> torch.Tensor:
    """Return ``out = sum_j coefs[j] * sources[j] + noise_coef * noise`` in one pass (fp32 accumulation).

    ``out`` may alias any source. Coefficients are Python floats (passed by value, capture friendly).
    """
    if not 1 <= len(sources) <= MAX_SOURCES:
        raise ValueError(f"combine takes 1 to {MAX_SOURCES} sources, got {len(sources)}")
    if len(coefs) != len(sources):
        raise ValueError(f"combine got {len(sources)} sources but {len(coefs)} coefficients")
    if out is None:
        out = torch.empty_like(sources[0])
    return combine_torch(sources, coefs, out, noise, noise_coef)
