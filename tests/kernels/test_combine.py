"""combine: every backend runnable here (torch, C++ CPU) against a float64 reference."""
from __future__ import annotations

import warnings

import pytest
import torch
from _combine_common import DTYPES, check_result, load_ext_or_skip, make_inputs
from _inputs import FUZZ, assert_ok_or_documented
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from deis_fast import ops
from deis_fast.kernels import dispatch

BACKENDS_HERE = ["torch", "cpu"]


@pytest.fixture(autouse=True)
def _fresh_dispatch(monkeypatch):
    monkeypatch.delenv("DEIS_FAST_BACKEND", raising=False)
    dispatch.clear_cache()
    yield
    dispatch.clear_cache()


def _need(backend):
    if backend == "cpu":
        load_ext_or_skip()


@pytest.mark.parametrize("backend", BACKENDS_HERE)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("ns", range(1, 7))
@pytest.mark.parametrize("noise", [False, True])
def test_all_variants(backend, dtype, ns, noise):
    _need(backend)
    gen = torch.Generator().manual_seed(1000 * ns + noise)
    srcs, coefs, z, zc = make_inputs((5, 77), dtype, ns, noise, gen)
    out = torch.full_like(srcs[0], float("nan"))
    r = ops.combine(srcs, coefs, out=out, noise=z, noise_coef=zc, backend=backend)
    assert r is out
    check_result(out, srcs, coefs, z, zc)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(0,), (1,), (7,), (3, 0, 2), (33, 5), (70_001,), (2, 3, 5, 7)], ids=str)
def test_shapes_cpu(dtype, shape):
    load_ext_or_skip()
    gen = torch.Generator().manual_seed(sum(shape) + 7)
    srcs, coefs, z, zc = make_inputs(shape, dtype, 3, True, gen)
    out = ops.combine(srcs, coefs, noise=z, noise_coef=zc, backend="cpu")
    assert out.shape == srcs[0].shape and out.dtype == dtype
    check_result(out, srcs, coefs, z, zc)


def test_large_multithreaded_matches_single_thread():
    load_ext_or_skip()
    gen = torch.Generator().manual_seed(3)
    srcs, coefs, z, zc = make_inputs((300_003,), torch.float32, 4, True, gen)
    a = ops.combine(srcs, coefs, noise=z, noise_coef=zc, backend="cpu")
    prev = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        b = ops.combine(srcs, coefs, noise=z, noise_coef=zc, backend="cpu")
    finally:
        torch.set_num_threads(prev)
    assert torch.equal(a, b)
    check_result(a, srcs, coefs, z, zc)


@pytest.mark.parametrize("backend", BACKENDS_HERE)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["transposed", "channels_last", "mixed", "sliced", "expanded_out"])
def test_layouts(backend, dtype, layout):
    _need(backend)
    gen = torch.Generator().manual_seed(11)
    srcs, coefs, z, zc = make_inputs((2, 3, 5, 7), dtype, 3, True, gen)
    if layout == "transposed":
        srcs = [s.transpose(1, 3) for s in srcs]
        z = z.transpose(1, 3)
        out = torch.empty_like(srcs[0])  # preserves the (dense, permuted) strides
        assert out.stride() == srcs[0].stride()
    elif layout == "channels_last":
        srcs = [s.contiguous(memory_format=torch.channels_last) for s in srcs]
        z = z.contiguous(memory_format=torch.channels_last)
        out = torch.empty_like(srcs[0])
    elif layout == "mixed":  # different strides: torch fallback, still correct
        srcs[1] = srcs[1].contiguous(memory_format=torch.channels_last)
        out = torch.empty_like(srcs[0])
    elif layout == "sliced":  # not dense
        big = [(torch.randn(2, 3, 5, 14, generator=gen) + 0.3).to(dtype) for _ in range(3)]
        srcs = [b[..., ::2] for b in big]
        out = torch.empty(2, 3, 5, 14, dtype=dtype)[..., 1::2]
        z = None
    else:
        out = torch.empty(2, 3, 5, 7, dtype=dtype).transpose(0, 2)
        srcs = [s.transpose(0, 2) for s in srcs]
        z = z.transpose(0, 2)
    r = ops.combine(srcs, coefs, out=out, noise=z, noise_coef=zc, backend=backend)
    assert r is out
    check_result(out, srcs, coefs, z, zc)


@pytest.mark.parametrize("backend", BACKENDS_HERE)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("which", [0, 1, 2, "noise"])
def test_out_aliases_input(backend, dtype, which):
    _need(backend)
    gen = torch.Generator().manual_seed(5)
    srcs, coefs, z, zc = make_inputs((1001,), dtype, 3, True, gen)
    orig = [s.clone() for s in srcs]
    zo = z.clone()
    out = z if which == "noise" else srcs[which]
    ops.combine(srcs, coefs, out=out, noise=z, noise_coef=zc, backend=backend)
    check_result(out, orig, coefs, zo, zc)


@pytest.mark.parametrize("backend", BACKENDS_HERE)
def test_out_partially_overlapping_falls_back(backend):
    _need(backend)
    buf = torch.randn(1001) + 0.5
    s0, s1 = buf[:1000], buf[1:]
    o0, o1 = s0.clone(), s1.clone()
    ops.combine([s0, s1], [0.7, -0.3], out=s1, backend=backend)
    check_result(s1, [o0, o1], [0.7, -0.3])


def test_fp64_goes_through_torch():
    gen = torch.Generator().manual_seed(2)
    srcs, coefs, z, zc = make_inputs((100,), torch.float64, 3, True, gen)
    out = ops.combine(srcs, coefs, noise=z, noise_coef=zc)
    ref = sum(c * s for c, s in zip(coefs, srcs)) + zc * z
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    assert dispatch.select("cpu", torch.float64, "cpu") == "torch"


def test_zero_noise_coef_ignores_noise():
    load_ext_or_skip()
    s = torch.randn(10) + 0.5
    z = torch.full((10,), float("inf"))
    for b in BACKENDS_HERE:
        out = ops.combine([s], [2.0], noise=z, noise_coef=0.0, backend=b)
        torch.testing.assert_close(out, 2 * s)


def test_validation_errors():
    a, b = torch.randn(4), torch.randn(4)
    with pytest.raises(ValueError, match="1 to 6"):
        ops.combine([], [])
    with pytest.raises(ValueError, match="1 to 6"):
        ops.combine([a] * 7, [1.0] * 7)
    with pytest.raises(ValueError, match="coefficients"):
        ops.combine([a, b], [1.0])
    with pytest.raises(ValueError, match="shape"):
        ops.combine([a, torch.randn(5)], [1.0, 1.0])
    with pytest.raises(TypeError, match="dtype"):
        ops.combine([a, b.half()], [1.0, 1.0])
    with pytest.raises(ValueError, match="device"):
        ops.combine([a, b.to("meta")], [1.0, 1.0])
    with pytest.raises(ValueError, match="out"):
        ops.combine([a, b], [1.0, 1.0], out=torch.empty(3))
    with pytest.raises(TypeError, match="out"):
        ops.combine([a, b], [1.0, 1.0], out=torch.empty(4, dtype=torch.float64))
    with pytest.raises(ValueError, match="noise"):
        ops.combine([a, b], [1.0, 1.0], noise=torch.randn(5), noise_coef=1.0)
    with pytest.raises(ValueError, match="unknown combine backend"):
        ops.combine([a], [1.0], backend="nope")


def test_explicit_unavailable_backend_raises(monkeypatch):
    a = torch.randn(4)
    with pytest.raises(ops.BackendUnavailableError, match="cuda"):
        ops.combine([a], [1.0], backend="cuda")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ops.BackendUnavailableError, match="triton"):
        ops.combine([a], [1.0], backend="triton")
    monkeypatch.setenv("DEIS_FAST_BACKEND", "cuda")
    dispatch.clear_cache()
    with pytest.raises(ops.BackendUnavailableError):
        ops.combine([a], [1.0])


def test_env_override(monkeypatch):
    load_ext_or_skip()
    monkeypatch.setenv("DEIS_FAST_BACKEND", "torch")
    dispatch.clear_cache()
    a = torch.randn(8)
    ops.combine([a], [2.0])
    assert dispatch._cache[("cpu", torch.float32, "torch")] == "torch"
    monkeypatch.delenv("DEIS_FAST_BACKEND")
    dispatch.clear_cache()
    ops.combine([a], [2.0])
    assert dispatch._cache[("cpu", torch.float32, None)] == "cpu"


def test_missing_extension_warns_once_and_uses_torch(monkeypatch):
    monkeypatch.setattr(dispatch, "_ext", None)
    monkeypatch.setattr(dispatch, "_ext_tried", True)
    monkeypatch.setattr(dispatch, "_ext_error", ImportError("simulated"))
    monkeypatch.setattr(dispatch, "_ext_warned", False)
    monkeypatch.delenv("DEIS_FAST_BACKEND", raising=False)
    a = torch.randn(16) + 0.5
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        dispatch.warn_if_no_ext()  # what `import deis_fast` calls
        dispatch.warn_if_no_ext()
        for dt in (torch.float32, torch.float16):
            out = ops.combine([a.to(dt)], [3.0])
            check_result(out, [a.to(dt)], [3.0])
    msgs = [str(w.message) for w in rec if "deis_fast._C" in str(w.message)]
    assert len(msgs) == 1 and "simulated" in msgs[0] and "compiler" in msgs[0]
    assert "pip install -e" not in msgs[0]  # not the command that just failed
    with pytest.raises(ops.BackendUnavailableError, match="simulated"):
        ops.combine([a], [1.0], backend="cpu")


class _OpLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("backend", [None, "torch", "cpu"])
def test_one_dispatched_op_per_call(backend):
    if backend != "torch":
        load_ext_or_skip()
    srcs = [torch.randn(64) for _ in range(4)]
    out, z = torch.empty(64), torch.randn(64)
    with _OpLog() as log:
        for _ in range(3):
            ops.combine(srcs, [0.1, 0.2, 0.3, 0.4], out=out, noise=z, noise_coef=0.5, backend=backend)
    assert log.ops == ["deis_fast.combine.default"] * 3  # one op per call, and no allocation
    check_result(out, srcs, [0.1, 0.2, 0.3, 0.4], z, 0.5)


def test_torch_compile_fullgraph_no_graph_breaks():
    import torch._dynamo as dynamo

    def loop(x, e1, e2, z, slot):
        for i in range(3):
            ops.combine([x, e1, e2], [0.9, 0.1 * i, -0.05], out=slot, noise=z, noise_coef=0.01)
            x = slot * 1.0
        ops.combine([x, e1], [1.0, 0.5], out=x)  # out aliases a source
        return x

    args = [torch.randn(128) for _ in range(4)]
    ref = loop(*[a.clone() for a in args], torch.empty(128))
    dynamo.reset()
    expl = dynamo.explain(loop)(*[a.clone() for a in args], torch.empty(128))
    assert expl.graph_break_count == 0 and expl.graph_count == 1
    for be in ("eager", "aot_eager"):
        dynamo.reset()
        got = torch.compile(loop, fullgraph=True, backend=be)(*[a.clone() for a in args], torch.empty(128))
        torch.testing.assert_close(got, ref)
    dynamo.reset()


def test_fp16_bf16_bit_conversions_match_torch():
    C = load_ext_or_skip()
    gen = torch.Generator().manual_seed(0)
    bits = torch.randint(-2**31, 2**31 - 1, (6000,), generator=gen, dtype=torch.int64).to(torch.int32)
    special = torch.tensor([0.0, -0.0, 65504.0, 65519.99, 65520.0, 1e-8, 2.0**-25, 2.0**-24, 3 * 2.0**-26,
                            2.0**-14, 2.0**-14 * (1 - 2.0**-11), 1.0 + 2.0**-11, 1.0 + 3 * 2.0**-11,
                            float("inf"), -float("inf"), 3.4e38, 1.0 + 2.0**-8, 1.0 + 3 * 2.0**-8])
    x = torch.cat([bits.view(torch.float32), special, torch.randn(2000, generator=gen) * 1e-5])
    xs = x.tolist()
    for dt, to_bits, from_bits in ((torch.float16, C.f32_to_f16_bits, C.f16_bits_to_f32),
                                   (torch.bfloat16, C.f32_to_bf16_bits, C.bf16_bits_to_f32)):
        ref = x.to(dt)
        nan = torch.isnan(ref)
        got = torch.tensor([to_bits(v) for v in xs], dtype=torch.int32).to(torch.int16).view(dt)
        assert torch.equal(torch.isnan(got), nan)
        assert torch.equal(got[~nan].view(torch.int16), ref[~nan].view(torch.int16))
        back = torch.tensor([from_bits(v) for v in ref[~nan].view(torch.int16).to(torch.int32).__and__(0xFFFF).tolist()])
        assert torch.equal(back, ref[~nan].float())


@settings(max_examples=50, deadline=None)
@given(n=st.integers(0, 5000), ns=st.integers(1, 6), dtype=st.sampled_from(DTYPES), noise=st.booleans(),
       alias=st.integers(-1, 5), offset=st.integers(0, 3), seed=st.integers(0, 2**16))
def test_fuzz_cpu(n, ns, dtype, noise, alias, offset, seed):
    load_ext_or_skip()
    gen = torch.Generator().manual_seed(seed)
    srcs, coefs, z, zc = make_inputs((n + offset,), dtype, ns, noise, gen)
    srcs = [s[offset:] for s in srcs]  # misaligned data pointers when offset > 0
    z = z[offset:] if z is not None else None
    orig = [s.clone() for s in srcs]
    if 0 <= alias < ns:
        out = srcs[alias]
    else:
        out = torch.empty(n + offset, dtype=dtype)[offset:]
    ops.combine(srcs, coefs, out=out, noise=z, noise_coef=zc, backend="cpu")
    check_result(out, orig, coefs, z, zc)


def test_direct_ops_combine_compiles_fullgraph_with_noise():
    """Users may call ops.combine inside their own compiled code: no graph break from input checks."""
    import deis_fast.core.ops as dops

    def f(a, b, z):
        out = torch.empty_like(a)
        dops.combine([a, b], [0.5, -1.25], out=out, noise=z, noise_coef=0.3)
        return out
    a, b, z = (torch.randn(3, 17, generator=torch.Generator().manual_seed(i)) for i in range(3))
    got = torch.compile(f, fullgraph=True, backend="eager")(a, b, z)
    torch.testing.assert_close(got, 0.5 * a - 1.25 * b + 0.3 * z, rtol=1e-6, atol=1e-6)


def test_kernel_constants_agree_between_python_and_cpp():
    """MAX_SOURCES and the dtype codes are declared once per language; the built extension reports its own."""
    from deis_fast.kernels import DTYPE_CODES, MAX_SOURCES
    ext = dispatch.load_ext()
    if ext is None:
        pytest.skip(f"deis_fast._C is not built: {dispatch.ext_error()}")
    assert ext.MAX_SOURCES == MAX_SOURCES == ops.MAX_SOURCES
    assert {str(k).replace("torch.", ""): v for k, v in DTYPE_CODES.items()} == dict(ext.DTYPE_CODES)


# ---------------------------------------------------------------- bad input, layouts, fuzzing
@pytest.mark.parametrize("args, err, match", [
    (([torch.ones(3), torch.ones(4)], [1.0, 1.0]), ValueError, "shape"),
    (([torch.ones(3), torch.ones(3, dtype=torch.half)], [1.0, 1.0]), TypeError, "dtype"),
    (([torch.ones(3), torch.ones(3, device="meta")], [1.0, 1.0]), ValueError, "device"),
    (([torch.ones(3, dtype=torch.int32)], [1.0]), TypeError, "float32"),
    (([torch.ones(3, dtype=torch.complex64)], [1.0]), TypeError, "float32"),
    (([], []), ValueError, "1 to 6"),
    (([torch.ones(3)] * 7, [1.0] * 7), ValueError, "1 to 6"),
    (([torch.ones(3)], [1.0, 2.0]), ValueError, "coefficients"),
    (([torch.ones(3)], [float("nan")]), ValueError, "finite"),
    (([torch.ones(3)], [float("inf")]), ValueError, "finite"),
    (([torch.ones(3)], ["a"]), TypeError, "real number"),
    (([1.0], [1.0]), TypeError, "torch.Tensor"),
    (([torch.ones(3), 1.0], [1.0, 1.0]), TypeError, "torch.Tensor"),
])
def test_bad_combine_inputs(args, err, match):
    with pytest.raises(err, match=match):
        ops.combine(*args)


def test_bad_combine_out_noise_and_backend():
    a = torch.ones(3)
    with pytest.raises(ValueError, match="out"):
        ops.combine([a], [1.0], out=torch.empty(4))
    with pytest.raises(TypeError, match="out"):
        ops.combine([a], [1.0], out=torch.empty(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="noise"):
        ops.combine([a], [1.0], noise=torch.ones(2), noise_coef=1.0)
    with pytest.raises(ValueError, match="finite"):
        ops.combine([a], [1.0], noise=a, noise_coef=float("nan"))
    with pytest.raises(ValueError, match="backend"):
        ops.combine([a], [1.0], backend="nope")


def test_combine_on_meta_tensors_propagates_shapes():
    out = ops.combine([torch.empty(2, 3, device="meta")] * 2, [1.0, 2.0])
    assert out.device.type == "meta" and out.shape == (2, 3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_combine_layouts_match_reference(dtype):
    g = torch.Generator().manual_seed(0)
    base = [torch.randn(2, 3, 5, 4, generator=g).to(dtype) for _ in range(3)]
    coefs = [0.3, -1.2, 0.7]
    ref = sum(c * b.double() for c, b in zip(coefs, base))
    tol = {torch.float16: 2e-3, torch.bfloat16: 2e-2}.get(dtype, 1e-6)
    for layout in ("contiguous", "channels_last", "transposed", "mixed"):
        if layout == "contiguous":
            srcs = base
        elif layout == "channels_last":
            srcs = [b.contiguous(memory_format=torch.channels_last) for b in base]
        elif layout == "transposed":
            srcs = [b.transpose(1, 3).contiguous().transpose(1, 3) for b in base]
        else:
            srcs = [base[0], base[1].contiguous(memory_format=torch.channels_last), base[2][:, :, :, :]]
        out = ops.combine(srcs, coefs)
        torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol * 4)


shapes = st.sampled_from([(3,), (2, 3), (2, 3, 4, 5), (0,), (1, 1), (4, 1)])


cdtypes = st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int32, torch.bool])


coef_st = st.one_of(st.floats(-10, 10), st.sampled_from([float("nan"), float("inf"), 0.0]))


@FUZZ
@given(n=st.integers(0, 8), shapes_=st.lists(shapes, min_size=8, max_size=8), dtypes_=st.lists(cdtypes, min_size=8, max_size=8),
       coefs=st.lists(coef_st, min_size=0, max_size=9), use_out=st.sampled_from(["none", "fresh", "alias", "bad"]),
       use_noise=st.booleans(), noise_coef=coef_st, transpose=st.booleans(), seed=st.integers(0, 3))
def test_fuzz_combine(n, shapes_, dtypes_, coefs, use_out, use_noise, noise_coef, transpose, seed):
    g = torch.Generator().manual_seed(seed)
    # mostly consistent inputs (so that valid calls happen), with random deviations
    same = seed != 3
    shp = shapes_[0]
    srcs = []
    for j in range(n):
        s, d = (shp, dtypes_[0]) if same else (shapes_[j], dtypes_[j])
        t = (torch.randn(s, generator=g) * 3).to(d)
        if transpose and t.ndim >= 2:
            t = t.transpose(0, 1)  # non-contiguous
        srcs.append(t)
    noise = (torch.randn(shp, generator=g).to(dtypes_[0]) if same else torch.randn(shapes_[n % 8], generator=g))
    if transpose and noise.ndim >= 2:
        noise = noise.transpose(0, 1)
    kw = {}
    if use_noise:
        kw.update(noise=noise, noise_coef=noise_coef)
    if use_out == "fresh" and srcs:
        kw["out"] = torch.empty_like(srcs[0])
    elif use_out == "alias" and srcs:
        kw["out"] = srcs[0]
    elif use_out == "bad":
        kw["out"] = torch.empty(7)
    expected = None
    if srcs and len(coefs) == n and all(isinstance(s, torch.Tensor) and s.is_floating_point() for s in srcs):
        try:
            expected = sum(float(c) * s.double() for c, s in zip(coefs, srcs))
            if use_noise and noise_coef != 0:
                expected = expected + noise_coef * noise.double()
        except RuntimeError:  # shapes do not broadcast: the call must fail
            expected = None
    out = assert_ok_or_documented(lambda: ops.combine(srcs, coefs, **kw))
    if out is not None:
        assert expected is not None and out.shape == expected.shape
        tol = {torch.float16: 5e-3, torch.bfloat16: 3e-2}.get(out.dtype, 1e-5)
        torch.testing.assert_close(out.double(), expected, rtol=tol, atol=tol * 10)
