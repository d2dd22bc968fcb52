"""Shared by the bad-input and fuzzing tests of several areas: every bad input must give a documented error
(ValueError, TypeError, deis_fast.NonFiniteError; SystemExit(2) from the argument parsers) or a correct result,
never a deep IndexError/ZeroDivisionError/AttributeError/RuntimeError, never a silent NaN."""
from __future__ import annotations

import torch
from hypothesis import HealthCheck, settings

from deis_fast import NonFiniteError

DOCUMENTED = (ValueError, TypeError, NonFiniteError)
FUZZ = settings(deadline=None, max_examples=60, suppress_health_check=[HealthCheck.too_slow], derandomize=True)


def eps_model(x, t):
    return 0.5 * x


def make_noise(shape=(3, 2, 4, 4), dtype=torch.float32, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def assert_ok_or_documented(fn):
    """Run ``fn``: a documented exception is fine (returns None); otherwise a float result must be finite."""
    try:
        out = fn()
    except DOCUMENTED:
        return None
    if isinstance(out, torch.Tensor) and out.is_floating_point():
        assert torch.isfinite(out).all(), "silent non-finite result"
    return out
