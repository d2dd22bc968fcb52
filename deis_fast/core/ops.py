"""The public fused op. Every Combine instruction of every plan is one call of :func:`combine`."""
from __future__ import annotations

import math
from typing import Sequence

import torch

from ..kernels import dispatch as _dispatch
from ..kernels.dispatch import BackendUnavailableError  # noqa: F401  (re-export)
from ..kernels.reference import combine_torch  # noqa: F401  (re-export, the reference)

from ..kernels import MAX_SOURCES  # noqa: E402  (re-export)

_is_compiling = torch.compiler.is_compiling
_dispatch_stack_len = torch._C._len_torch_dispatch_stack
_Tensor = torch.Tensor


_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_isfinite = math.isfinite


def _check_like(t: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    if not isinstance(t, _Tensor):
        raise TypeError(f"combine: {what} must be a torch.Tensor, got {type(t).__name__}")
    if t.shape != ref.shape:
        raise ValueError(f"combine: {what} has shape {tuple(t.shape)}, expected {tuple(ref.shape)}")
    if t.dtype != ref.dtype:
        raise TypeError(f"combine: {what} has dtype {t.dtype}, expected {ref.dtype}")
    if t.device != ref.device:
        raise ValueError(f"combine: {what} is on device {t.device}, expected {ref.device}")


def combine(sources: Sequence[torch.Tensor], coefs: Sequence[float], out: torch.Tensor | None = None,
            noise: torch.Tensor | None = None, noise_coef: float = 0.0, backend: str | None = None) -> torch.Tensor:
    """Return ``out = sum_j coefs[j] * sources[j] + noise_coef * noise`` in one pass (fp32 accumulation).

    ``out`` may alias any source. Coefficients are Python floats (passed by value, capture friendly).
    ``backend`` (or env ``DEIS_FAST_BACKEND``): "torch", "cpu", "cuda", "triton"; default automatic.
    When autograd records (grad mode on and a source requires grad) it computes the differentiable torch
    composition instead of a kernel.
    """
    if _is_compiling() and out is not None:
        # traced (torch.compile): the registered op directly, one node per call; the host-side argument checks
        # are skipped (dynamo would trace or graph-break on them; eager calls of the same code checked them)
        torch.ops.deis_fast.combine(list(sources), [float(c) for c in coefs], out, noise, float(noise_coef), backend)
        return out
    ns = len(sources)
    if not 1 <= ns <= MAX_SOURCES:
        raise ValueError(f"combine takes 1 to {MAX_SOURCES} sources, got {ns}")
    if len(coefs) != ns:
        raise ValueError(f"combine got {ns} sources but {len(coefs)} coefficients")
    s0 = sources[0]
    if not isinstance(s0, _Tensor):
        raise TypeError(f"combine: sources[0] must be a torch.Tensor, got {type(s0).__name__}")
    if s0.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"combine: sources must be float32, float16, bfloat16 or float64, got {s0.dtype}")
    if not _is_compiling():  # host-side float checks; dynamo would graph-break on them
        for c in coefs:
            if not _isfinite(c):
                raise ValueError(f"combine: coefficients must be finite, got {list(coefs)}")
        if not _isfinite(noise_coef):
            raise ValueError(f"combine: noise_coef must be finite, got {noise_coef}")
    for j in range(1, ns):
        _check_like(sources[j], s0, f"sources[{j}]")
    if noise is not None:
        _check_like(noise, s0, "noise")
    if out is not None:
        _check_like(out, s0, "out")
    if torch.is_grad_enabled() and not _is_compiling() and (
            any(s.requires_grad for s in sources) or (noise is not None and noise.requires_grad)):
        # autograd: the differentiable torch composition (a new tensor, or copied into ``out``)
        res = combine_torch(sources, coefs, None, noise, noise_coef)
        return res if out is None else out.copy_(res)
    if out is None:
        out = torch.empty_like(s0)
    if _is_compiling() or _dispatch_stack_len() > 0 or type(s0) is not _Tensor:
        # Traced / inspected / subclass / autograd: go through the registered op (one op per call).
        torch.ops.deis_fast.combine(list(sources), [float(c) for c in coefs], out, noise, float(noise_coef),
                                    backend)
        return out
    _dispatch.run(sources, coefs, out, noise, noise_coef, backend)
    return out
