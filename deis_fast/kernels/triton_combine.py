"""Triton kernel of the combine op: constexpr number of sources and noise flag, fp32 accumulation.

Runs on CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1`` (set before importing this
module). :func:`aot_compile` compiles a variant ahead of time for a given GPU target without a GPU.
"""
from __future__ import annotations

import os
from typing import Sequence

import torch
import triton
import triton.language as tl

from . import MAX_SOURCES
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
BLOCK = 1024
NUM_WARPS = 4


@triton.jit
def _combine_kernel(out_ptr, s0, s1, s2, s3, s4, s5, z_ptr,
                    c0, c1, c2, c3, c4, c5, cz, n,
                    NS: tl.constexpr, HAS_NOISE: tl.constexpr, BLOCK: tl.constexpr,
                    BF16_SOFT_RNE: tl.constexpr = False):
    # int64 offsets: pid * BLOCK never overflows, whatever n is.
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = offs < n
    acc = tl.load(s0 + offs, mask=mask, other=0.0).to(tl.float32) * c0
    if NS > 1:
        acc += tl.load(s1 + offs, mask=mask, other=0.0).to(tl.float32) * c1
    if NS > 2:
        acc += tl.load(s2 + offs, mask=mask, other=0.0).to(tl.float32) * c2
    if NS > 3:
        acc += tl.load(s3 + offs, mask=mask, other=0.0).to(tl.float32) * c3
    if NS > 4:
        acc += tl.load(s4 + offs, mask=mask, other=0.0).to(tl.float32) * c4
    if NS > 5:
        acc += tl.load(s5 + offs, mask=mask, other=0.0).to(tl.float32) * c5
    if HAS_NOISE:
        acc += tl.load(z_ptr + offs, mask=mask, other=0.0).to(tl.float32) * cz
    if out_ptr.dtype.element_ty == tl.float32:
        tl.store(out_ptr + offs, acc, mask=mask)
    elif BF16_SOFT_RNE:
        # TRITON_INTERPRET only: the interpreter truncates fp32->bf16; round to nearest even by hand.
        bits = acc.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        tl.store(out_ptr + offs, (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=mask)
    else:
        tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)  # cvt.rn


def combine_triton(sources: Sequence[torch.Tensor], coefs: Sequence[float], out: torch.Tensor,
                   noise: torch.Tensor | None = None, noise_coef: float = 0.0) -> torch.Tensor:
    """Launch on flat dense views (the caller guarantees same dtype/strides, dense storage)."""
    ns = len(sources)
    n = out.numel()
    if n == 0:
        return out
    srcs = list(sources) + [sources[0]] * (MAX_SOURCES - ns)
    cs = [float(c) for c in coefs] + [0.0] * (MAX_SOURCES - ns)
    has_noise = noise is not None
    grid = (triton.cdiv(n, BLOCK),)
    _combine_kernel[grid](out, *srcs, noise if has_noise else sources[0], *cs, float(noise_coef), n,
                          NS=ns, HAS_NOISE=has_noise, BLOCK=BLOCK,
                          BF16_SOFT_RNE=_INTERPRET and out.dtype == torch.bfloat16, num_warps=NUM_WARPS)
    return out


_TRITON_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def aot_signature(dtype: torch.dtype, ns: int, has_noise: bool, block: int = BLOCK):
    """(signature, constexprs) for :class:`triton.compiler.ASTSource` of one variant."""
    p = "*" + _TRITON_DTYPES[dtype]
    names = ["out_ptr", "s0", "s1", "s2", "s3", "s4", "s5", "z_ptr"]
    sig = {k: p for k in names}
    sig.update({k: "fp32" for k in ("c0", "c1", "c2", "c3", "c4", "c5", "cz")})
    sig["n"] = "i64"
    sig.update({"NS": "constexpr", "HAS_NOISE": "constexpr", "BLOCK": "constexpr", "BF16_SOFT_RNE": "constexpr"})
    constexprs = {"NS": ns, "HAS_NOISE": has_noise, "BLOCK": block, "BF16_SOFT_RNE": False}
    return sig, constexprs


def aot_compile(dtype: torch.dtype, ns: int, has_noise: bool, arch: int = 90, warp_size: int = 32,
                num_warps: int = NUM_WARPS, aligned: bool = True):
    """Compile one variant for ``sm_<arch>`` without a GPU; returns the CompiledKernel (asm has ptx/cubin).

    ``aligned`` marks the 8 pointers and ``n`` divisible by 16, as the JIT specializes them for fresh
    allocations (this is what enables 128-bit loads)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig, constexprs = aot_signature(dtype, ns, has_noise)
    names = list(sig)
    attrs = {}
    if aligned:
        for name in ("out_ptr", "s0", "s1", "s2", "s3", "s4", "s5", "z_ptr", "n"):
            attrs[(names.index(name),)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=_combine_kernel, signature=sig, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, warp_size), options={"num_warps": num_warps})
