"""Shared helpers of the combine kernel tests."""
from __future__ import annotations

import os

import pytest
import torch

LOW = (torch.float16, torch.bfloat16)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
EPS32 = torch.finfo(torch.float32).eps


def load_ext_or_skip():
    """deis_fast._C, or skip (fail when DEIS_FAST_REQUIRE_EXT is set)."""
    try:
        from deis_fast import _C  # noqa: F401
        return _C
    except Exception as e:  # pragma: no cover - depends on the build
        msg = f"deis_fast._C not built ({e!r}); run `pip install -e .`"
        if os.environ.get("DEIS_FAST_REQUIRE_EXT", "0") not in ("", "0"):
            pytest.fail(msg)
        pytest.skip(msg)


def make_inputs(shape, dtype, ns, noise, gen, device="cpu"):
    """Fresh random sources (never zeros), coefficients and optional noise."""
    srcs = [(torch.randn(shape, generator=gen, dtype=torch.float64) + 0.25).to(dtype).to(device) for _ in range(ns)]
    coefs = [float(c) for c in (torch.rand(ns, generator=gen, dtype=torch.float64) * 4 - 2)]
    coefs = [c if abs(c) > 1e-3 else 0.5 for c in coefs]
    z = (torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype).to(device)) if noise else None
    zc = float(torch.rand((), generator=gen, dtype=torch.float64)) + 0.1 if noise else 0.0
    return srcs, coefs, z, zc


def reference64(srcs, coefs, z=None, zc=0.0):
    acc = torch.zeros(srcs[0].shape, dtype=torch.float64, device=srcs[0].device)
    mag = torch.zeros_like(acc)
    for s, c in zip(srcs, coefs):
        acc += c * s.double()
        mag += abs(c) * s.double().abs()
    if z is not None and zc != 0.0:
        acc += zc * z.double()
        mag += abs(zc) * z.double().abs()
    return acc, mag


def eager_lowp(srcs, coefs, z=None, zc=0.0):
    """The eager composition c0*s0 + c1*s1 ... done in the tensors' own dtype."""
    acc = coefs[0] * srcs[0]
    for s, c in zip(srcs[1:], coefs[1:]):
        acc = acc + c * s
    if z is not None and zc != 0.0:
        acc = acc + zc * z
    return acc


def check_result(out, srcs, coefs, z=None, zc=0.0):
    """fp32: within fp32 accumulation error of the fp64 reference. fp16/bf16: every element within one
    output ulp (+ accumulation slack) and max-abs error <= 2x the eager low-precision composition's."""
    ref, mag = reference64(srcs, coefs, z, zc)
    if out.numel() == 0:
        return
    got = out.double()
    err = (got - ref).abs()
    ns = len(srcs) + (z is not None)
    bound = 2 * (ns + 1) * EPS32 * mag + 1e-30
    if out.dtype in LOW:
        fi = torch.finfo(out.dtype)
        bound = bound + fi.eps * ref.abs() + fi.smallest_normal * fi.eps
    assert torch.all(err <= bound), f"max err {err.max().item()} (dtype {out.dtype}, ns {ns})"
    if out.dtype in LOW:
        e_eager = (eager_lowp(srcs, coefs, z, zc).double() - ref).abs().max().item()
        e_kernel = err.max().item()
        floor = 1e-3 * torch.finfo(out.dtype).eps * ref.abs().max().item()
        assert e_kernel <= 2 * e_eager + floor, f"kernel err {e_kernel} > 2x eager err {e_eager}"
