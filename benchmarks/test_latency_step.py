"""One solver step, and the combine kernel's bandwidth.

Group "order-3 step": the third-order update x' = c0 x + c1 e0 + c2 e1 + c3 e2 on [B, 4, 128, 128]
(coefficients from a logrho3 plan): ``ops.combine`` on each backend, the eager torch composition, and
diffusers' DEIS / DPM-Solver++ 3M / UniPC-3 ``step`` on the same tensors in their third-order regime
(DEISMultistepScheduler.step is the baseline). Group "combine bandwidth": the same 4-source combine on
16M elements against a device-to-device copy (the baseline).
"""
from __future__ import annotations

import warnings

import pytest
import torch

import deis_fast
from deis_fast import ops
from deis_fast.kernels import dispatch

import harness

BACKENDS = ("cpu", "cuda", "triton", "torch")
SCHEDULERS = tuple(harness.DIFFUSERS_ORDER3)
STEP_SHAPE = (4, 128, 128)


def order3_coefs() -> tuple[float, ...]:
    """The four coefficients of a real third-order (logrho3, 20 NFE) update."""
    plan = deis_fast.build_plan(deis_fast.VPSchedule.discrete("linear"), "logrho3", 20)
    return next(op.coefs for op in plan.combines if len(op.srcs) == 4)


def make_sources(shape: tuple[int, ...], device: str, dtype: torch.dtype, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g).to(device, dtype) for _ in range(4)]


def reference(srcs: list[torch.Tensor], coefs) -> torch.Tensor:
    return sum(c * s.double() for c, s in zip(coefs, srcs))


def eager_composition(srcs: list[torch.Tensor], coefs, out: torch.Tensor) -> torch.Tensor:
    """The best eager torch spelling: one mul and three in-place adds."""
    torch.mul(srcs[0], coefs[0], out=out)
    for s, c in zip(srcs[1:], coefs[1:]):
        out.add_(s, alpha=c)
    return out


def assert_close_to_eager_precision(out: torch.Tensor, ref: torch.Tensor, eager: torch.Tensor, what: str) -> None:
    """Error to the float64 reference at most twice that of eager torch at the same precision (+ 1 ulp)."""
    err = (out.double() - ref).abs().max().item()
    eager_err = (eager.double() - ref).abs().max().item()
    ulp = torch.finfo(out.dtype).eps * ref.abs().max().item()
    assert err <= 2 * eager_err + ulp, f"{what}: max error {err:.3g} vs eager torch {eager_err:.3g}"


def _skip_unavailable(backend: str, device: str) -> None:
    why = dispatch.available(backend, device)
    if why is not None:
        pytest.skip(f"combine backend {backend!r} cannot run here: {why}")


# --- order-3 step ----------------------------------------------------------------------------------

@pytest.fixture
def step_inputs(cfg, batch, dtype):
    shape = (batch, *STEP_SHAPE)
    srcs = make_sources(shape, cfg.device, dtype)
    coefs = order3_coefs()
    ref = reference(srcs, coefs)
    eager = eager_composition(srcs, coefs, torch.empty_like(srcs[0]))
    return shape, srcs, coefs, ref, eager


def _step_info(benchmark, cfg, shape, dtype_name, backend, ops_count, label, role=None):
    benchmark.group = f"order-3 step {list(shape)} {dtype_name} {cfg.device}"
    harness.record(benchmark, cfg, label=label, backend=backend, dispatched_ops_per_nfe=ops_count,
                   shape=list(shape), dtype=dtype_name, role=role)


@pytest.mark.parametrize("backend", BACKENDS)
def test_step_combine(benchmark, cfg, step_inputs, dtype_name, backend):
    shape, srcs, coefs, ref, eager = step_inputs
    _skip_unavailable(backend, cfg.device)
    out = torch.empty_like(srcs[0])
    fn = harness.timed(lambda: ops.combine(srcs, coefs, out=out, backend=backend), cfg.device)
    n_ops = harness.ops_per_call(lambda rec: ops.combine(srcs, coefs, out=out, backend=backend))
    _step_info(benchmark, cfg, shape, dtype_name, backend, n_ops, label=f"ops.combine[{backend}]")
    result = benchmark(fn)
    harness.record_bandwidth(benchmark, 5 * out.numel() * out.element_size())
    assert_close_to_eager_precision(result, ref, eager, f"combine[{backend}]")


def test_step_eager_torch(benchmark, cfg, step_inputs, dtype_name):
    shape, srcs, coefs, ref, eager = step_inputs
    out = torch.empty_like(srcs[0])
    fn = harness.timed(lambda: eager_composition(srcs, coefs, out), cfg.device)
    n_ops = harness.ops_per_call(lambda rec: eager_composition(srcs, coefs, out))
    _step_info(benchmark, cfg, shape, dtype_name, "eager torch", n_ops, label="eager torch (mul + 3 add_)")
    result = benchmark(fn)
    harness.record_bandwidth(benchmark, 5 * out.numel() * out.element_size())
    assert_close_to_eager_precision(result, ref, eager, "eager torch")


class ThirdOrderStep:
    """A diffusers scheduler parked on one step of its third-order regime: every call restores the
    scheduler's state (its attributes; lists copied, tensors shared) and runs that same ``step``."""

    def __init__(self, name: str, x: torch.Tensor, eps: list[torch.Tensor], warmup: int = 4):
        self.sch = harness.diffusers_scheduler(name)
        self.sch.set_timesteps(20, device=x.device)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for t, e in zip(self.sch.timesteps[:warmup], eps):
                x = self.sch.step(e, t, x).prev_sample
        assert self.sch.lower_order_nums >= 3, f"{name} is not in its third-order regime"
        self.x, self.eps, self.t = x, eps[warmup], self.sch.timesteps[warmup]
        self.state = dict(vars(self.sch))

    def __call__(self) -> torch.Tensor:
        vars(self.sch).update({k: list(v) if isinstance(v, list) else v for k, v in self.state.items()})
        return self.sch.step(self.eps, self.t, self.x).prev_sample


@pytest.mark.parametrize("name", SCHEDULERS)
def test_step_diffusers(benchmark, cfg, batch, dtype, dtype_name, name):
    shape = (batch, *STEP_SHAPE)
    x, *eps = make_sources(shape, cfg.device, dtype, seed=1) + make_sources(shape, cfg.device, dtype, seed=2)
    step = ThirdOrderStep(name, x, eps)
    expected = step().clone()
    n_ops = harness.ops_per_call(lambda rec: step())
    _step_info(benchmark, cfg, shape, dtype_name, "diffusers", n_ops, label=f"{name}.step",
               role="baseline" if name == "DEISMultistepScheduler" else None)
    result = benchmark(harness.timed(step, cfg.device))
    harness.record_bandwidth(benchmark, 5 * x.numel() * x.element_size())
    assert torch.isfinite(result).all() and torch.equal(result, expected), f"{name}.step is not reproducible"


# --- combine bandwidth ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def big_sources(cfg):
    """Four sources of ``cfg.numel`` fp32 elements, and a strided sample of them for the reference."""
    srcs = make_sources((cfg.numel,), cfg.device, torch.float32, seed=3)
    return srcs, slice(None, None, max(1, cfg.numel // 4099))


def _bandwidth_info(benchmark, cfg, backend, n_ops, label, role=None):
    benchmark.group = f"combine bandwidth {cfg.numel} fp32 {cfg.device}"
    harness.record(benchmark, cfg, label=label, backend=backend, dispatched_ops_per_call=n_ops, numel=cfg.numel,
                   role=role)


def test_bandwidth_copy(benchmark, cfg, big_sources):
    srcs, _ = big_sources
    out = torch.empty_like(srcs[0])
    _bandwidth_info(benchmark, cfg, "copy_", 1, "copy (out.copy_(src))", role="baseline")
    result = benchmark(harness.timed(lambda: out.copy_(srcs[0]), cfg.device))
    harness.record_bandwidth(benchmark, 2 * out.numel() * out.element_size())
    assert torch.equal(result, srcs[0])


@pytest.mark.parametrize("backend", BACKENDS + ("eager torch",))
def test_bandwidth_combine(benchmark, cfg, big_sources, backend):
    srcs, sample = big_sources
    coefs = order3_coefs()
    out = torch.empty_like(srcs[0])
    if backend == "eager torch":
        def fn():
            return eager_composition(srcs, coefs, out)
    else:
        _skip_unavailable(backend, cfg.device)

        def fn():
            return ops.combine(srcs, coefs, out=out, backend=backend)
    label = backend if backend == "eager torch" else f"ops.combine[{backend}]"
    _bandwidth_info(benchmark, cfg, backend, harness.ops_per_call(lambda rec: fn()), label)
    result = benchmark(harness.timed(fn, cfg.device))
    harness.record_bandwidth(benchmark, 5 * out.numel() * out.element_size())
    part = [s[sample] for s in srcs]
    assert_close_to_eager_precision(result[sample], reference(part, coefs),
                                    eager_composition(part, coefs, torch.empty_like(part[0])), backend)
