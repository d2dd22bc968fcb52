"""The CUDA thread body (csrc/combine.h) run on the host over every (block, thread) id, plus the real
GPU tests of the CUDA and Triton backends (skipped without a CUDA device)."""
from __future__ import annotations

import pytest
import torch

from _combine_common import DTYPES, check_result, load_ext_or_skip, make_inputs
from deis_fast import ops
from deis_fast.kernels import dispatch

CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def _body(C, srcs, coefs, z, zc, out, grid, block, begin=0, force_scalar=False):
    return C.cuda_body_on_host(out.data_ptr(), [s.data_ptr() for s in srcs], coefs,
                               0 if z is None else z.data_ptr(), zc, out.numel(), CODES[out.dtype],
                               grid, block, begin, force_scalar)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("ns", range(1, 7))
@pytest.mark.parametrize("noise", [False, True])
@pytest.mark.parametrize("n,grid,block", [(0, 1, 32), (1, 1, 32), (13, 2, 4), (64, 1, 8), (1000, 3, 32),
                                          (4099, 4, 64)])
def test_thread_body_all_threads(dtype, ns, noise, n, grid, block):
    C = load_ext_or_skip()
    gen = torch.Generator().manual_seed(n + 10 * ns + noise)
    srcs, coefs, z, zc = make_inputs((n,), dtype, ns, noise, gen)
    # aligned: fresh tensors are 16-byte aligned -> 128-bit path + scalar tail
    out = torch.full((n,), float("nan"), dtype=dtype)
    vec = _body(C, srcs, coefs, z, zc, out, grid, block)
    assert vec
    check_result(out, srcs, coefs, z, zc)
    # the CPU kernel evaluates the same formula: bitwise identical
    cpu = ops.combine(srcs, coefs, noise=z, noise_coef=zc, backend="cpu")
    assert torch.equal(out.view(torch.int16 if dtype != torch.float32 else torch.int32),
                       cpu.view(torch.int16 if dtype != torch.float32 else torch.int32))
    # forced scalar path gives the same bits
    out2 = torch.full((n,), float("nan"), dtype=dtype)
    assert not _body(C, srcs, coefs, z, zc, out2, grid, block, force_scalar=True)
    assert torch.equal(out, out2)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("which", ["out", "src", "noise"])
def test_thread_body_misaligned(dtype, which):
    C = load_ext_or_skip()
    n = 517
    gen = torch.Generator().manual_seed(4)
    srcs, coefs, z, zc = make_inputs((n + 1,), dtype, 3, True, gen)
    out = torch.full((n + 1,), float("nan"), dtype=dtype)
    srcs = [s[1:] if (which == "src" and j == 1) else s[:n] for j, s in enumerate(srcs)]
    z = z[1:] if which == "noise" else z[:n]
    out = out[1:] if which == "out" else out[:n]
    assert not _body(C, srcs, coefs, z, zc, out, 3, 32)  # falls back to the scalar path
    check_result(out, srcs, coefs, z, zc)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("begin", [2**31 + 8, 2**32 + 3, 2**33 - 16, 3 * 2**40])
@pytest.mark.parametrize("grid,block", [(1, 1), (2, 32)])
def test_thread_body_int64_indices(dtype, begin, grid, block):
    """Element indices beyond 2^31 (the pointers are shifted back by `begin` elements)."""
    C = load_ext_or_skip()
    n = 203
    gen = torch.Generator().manual_seed(begin % 1000)
    srcs, coefs, z, zc = make_inputs((n,), dtype, 4, True, gen)
    out = torch.full((n,), float("nan"), dtype=dtype)
    vec = _body(C, srcs, coefs, z, zc, out, grid, block, begin=begin)
    assert vec == (begin % (16 // out.element_size()) == 0)
    check_result(out, srcs, coefs, z, zc)


def test_thread_body_alias():
    C = load_ext_or_skip()
    gen = torch.Generator().manual_seed(9)
    srcs, coefs, z, zc = make_inputs((999,), torch.float16, 3, True, gen)
    orig = [s.clone() for s in srcs]
    _body(C, srcs, coefs, z, zc, srcs[2], 2, 64)
    check_result(srcs[2], orig, coefs, z, zc)


# --------------------------------------------------------------------------------------------
# Real GPU (skipped here: no CUDA device).
# --------------------------------------------------------------------------------------------
def _gpu_backends():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device: real-GPU combine tests need torch.cuda.is_available()")
    dispatch.clear_cache()
    out = []
    if dispatch.available("cuda", "cuda") is None:
        out.append("cuda")
    if dispatch.available("triton", "cuda") is None:
        out.append("triton")
    if not out:
        pytest.skip("neither the CUDA kernel nor triton is available")
    return out


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("ns", [1, 3, 6])
@pytest.mark.parametrize("n", [1, 1001, 1 << 20])
def test_gpu_backends(dtype, ns, n):
    for backend in _gpu_backends():
        gen = torch.Generator().manual_seed(n + ns)
        srcs, coefs, z, zc = make_inputs((n,), dtype, ns, True, gen, device="cuda")
        out = ops.combine(srcs, coefs, noise=z, noise_coef=zc, backend=backend)
        check_result(out.cpu(), [s.cpu() for s in srcs], coefs, z.cpu(), zc)
        orig = [s.clone() for s in srcs]
        ops.combine(srcs[1:], coefs[1:], out=srcs[-1], backend=backend)
        check_result(srcs[-1].cpu(), [s.cpu() for s in orig[1:]], coefs[1:])
        mis = [s[1:] for s in orig]  # misaligned pointers
        o = ops.combine(mis, coefs, backend=backend)
        check_result(o.cpu(), [s.cpu() for s in mis], coefs)


@pytest.mark.gpu
def test_gpu_non_default_stream():
    for backend in _gpu_backends():
        s = torch.cuda.Stream()
        gen = torch.Generator().manual_seed(1)
        srcs, coefs, z, zc = make_inputs((1 << 22,), torch.float32, 3, True, gen, device="cuda")
        torch.cuda.synchronize()
        with torch.cuda.stream(s):
            out = torch.empty_like(srcs[0])
            torch.cuda._sleep(10_000_000)  # keep the stream busy: the kernel must queue behind it
            ops.combine(srcs, coefs, out=out, noise=z, noise_coef=zc, backend=backend)
            ev = torch.cuda.Event()
            ev.record(s)
        ev.synchronize()
        check_result(out.cpu(), [x.cpu() for x in srcs], coefs, z.cpu(), zc)
        torch.cuda.synchronize()
