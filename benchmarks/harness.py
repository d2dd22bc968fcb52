"""Shared pieces of the latency suite (benchmarks/test_latency_*.py): configuration, networks,
op / kernel counters and result checks.

This is the one module of the suite that imports deis_fast's tooling (``DispatchRecorder``); if it
moves, only the import below changes.
"""
from __future__ import annotations

import os
import types
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch

import deis_fast
from deis_fast.testing import DispatchRecorder  # the suite's one import of deis_fast tooling
from deis_fast.kernels import dispatch

__all__ = ["BenchConfig", "DispatchRecorder", "DTYPES", "OPTIONS", "config_from", "versions", "sync", "timed",
           "ops_per_call", "cuda_kernels_per_call", "make_net", "NET_SHAPES", "combine_backend", "fine_reference",
           "exact_null_solution", "assert_matches_reference", "median_relative_error", "record",
           "record_bandwidth", "diffusers_scheduler", "DIFFUSERS_ORDER3"]

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
NETS = ("null", "digits", "unet")
COMPILE_BACKENDS = ("inductor", "aot_eager", "eager")

# option name -> (env var, help); defaults depend on the device (see _defaults)
OPTIONS: dict[str, tuple[str, str]] = {
    "device": ("DEIS_FAST_BENCH_DEVICE", "cpu or cuda (default cpu)"),
    "dtype": ("DEIS_FAST_BENCH_DTYPE", "comma list of fp32, fp16, bf16 (default: fp32 on cpu, fp16,bf16 on cuda)"),
    "batch": ("DEIS_FAST_BENCH_BATCH", "comma list of batch sizes (default: 1,4 on cpu, 1,8 on cuda)"),
    "nets": ("DEIS_FAST_BENCH_NETS", "comma list of null, digits, unet for the sampler group "
                                     "(default: null,digits on cpu, null,digits,unet on cuda)"),
    "cfg": ("DEIS_FAST_BENCH_CFG", "comma list of off, on: sampling without / with classifier-free guidance "
                                   "(default: off on cpu, off,on on cuda)"),
    "compile-backend": ("DEIS_FAST_BENCH_COMPILE_BACKEND", "torch.compile backend of the compile mode (default: "
                                                           "inductor on cuda; eager (dynamo capture only) on cpu, "
                                                           "where inductor compiles the digits U-Net for minutes)"),
    "numel": ("DEIS_FAST_BENCH_NUMEL", "elements per tensor in the combine-bandwidth group (default 16777216)"),
    "threads": ("DEIS_FAST_BENCH_THREADS", "torch CPU threads (default: torch's own choice)"),
}


def _defaults(device: str) -> dict[str, str]:
    cuda = device == "cuda"
    return {"dtype": "fp16,bf16" if cuda else "fp32", "batch": "1,8" if cuda else "1,4",
            "nets": "null,digits,unet" if cuda else "null,digits", "cfg": "off,on" if cuda else "off",
            "compile-backend": "inductor" if cuda else "eager", "numel": str(1 << 24), "threads": ""}


@dataclass(frozen=True)
class BenchConfig:
    """What the suite runs on: from ``--bench-*`` options, else ``DEIS_FAST_BENCH_*`` env vars, else defaults."""
    device: str
    dtypes: tuple[str, ...]
    batches: tuple[int, ...]
    nets: tuple[str, ...]
    cfgs: tuple[bool, ...]
    compile_backend: str
    numel: int
    threads: int | None


def _split(value: str, allowed: tuple[str, ...], what: str) -> tuple[str, ...]:
    items = tuple(v.strip() for v in value.split(",") if v.strip())
    bad = [v for v in items if v not in allowed]
    if bad or not items:
        raise ValueError(f"{what}: {value!r} is not a comma list of {', '.join(allowed)}")
    return items


def _positive_ints(value: str, what: str) -> tuple[int, ...]:
    try:
        items = tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        items = ()
    if not items or min(items) < 1:
        raise ValueError(f"{what}: {value!r} is not a comma list of positive integers")
    return items


def config_from(option: Callable[[str], str | None], env: Mapping[str, str] = os.environ,
                cuda_available: bool | None = None) -> BenchConfig:
    """Resolve the configuration; ``option(name)`` returns the command-line value or None.
    Raises ValueError (with the option and env var to fix) on bad values."""
    def get(name: str, default: str | None) -> str:
        v = option(name)
        return v if v is not None else env.get(OPTIONS[name][0]) or default

    device = get("device", "cpu")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"--bench-device / DEIS_FAST_BENCH_DEVICE must be cpu or cuda, got {device!r}")
    if device == "cuda" and not (torch.cuda.is_available() if cuda_available is None else cuda_available):
        raise ValueError("--bench-device cuda (or DEIS_FAST_BENCH_DEVICE=cuda) but torch.cuda.is_available() is "
                         "False: run on a machine with a GPU and a CUDA build of torch, or use --bench-device cpu")
    d = _defaults(device)
    backend = get("compile-backend", d["compile-backend"])
    if backend not in COMPILE_BACKENDS:
        raise ValueError(f"--bench-compile-backend: {backend!r} is not one of {', '.join(COMPILE_BACKENDS)}")
    numel = _positive_ints(get("numel", d["numel"]), "--bench-numel / DEIS_FAST_BENCH_NUMEL")
    threads = get("threads", d["threads"])
    return BenchConfig(
        device=device,
        dtypes=_split(get("dtype", d["dtype"]), tuple(DTYPES), "--bench-dtype / DEIS_FAST_BENCH_DTYPE"),
        batches=_positive_ints(get("batch", d["batch"]), "--bench-batch / DEIS_FAST_BENCH_BATCH"),
        nets=_split(get("nets", d["nets"]), NETS, "--bench-nets / DEIS_FAST_BENCH_NETS"),
        cfgs=tuple(v == "on" for v in _split(get("cfg", d["cfg"]), ("off", "on"), "--bench-cfg / DEIS_FAST_BENCH_CFG")),
        compile_backend=backend, numel=numel[0],
        threads=_positive_ints(threads, "--bench-threads / DEIS_FAST_BENCH_THREADS")[0] if threads else None)


def versions() -> dict[str, str | None]:
    try:
        import diffusers
        dv = diffusers.__version__
    except ImportError:
        dv = None
    return {"torch": torch.__version__, "diffusers": dv, "deis_fast": deis_fast.__version__}


# --- timing and counting --------------------------------------------------------------------------

def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], device: str) -> Callable[[], Any]:
    """``fn`` followed by a device synchronize (so that a CUDA benchmark times the work, not the launch)."""
    if device != "cuda":
        return fn

    def run() -> Any:
        out = fn()
        torch.cuda.synchronize()
        return out
    return run


def ops_per_call(fn: Callable[[DispatchRecorder], Any]) -> int:
    """ATen / custom ops dispatched by one ``fn(rec)`` outside what ``rec.mark`` wraps (the network)."""
    rec = DispatchRecorder()
    with rec:
        fn(rec)
    return len(rec.ops)


def cuda_kernels_per_call(fn: Callable[[], Any]) -> int:
    """CUDA kernels one ``fn()`` launches (torch.profiler, CUDA activity only)."""
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def combine_backend(device: str, dtype: torch.dtype) -> str:
    """The backend ``ops.combine`` picks automatically for these tensors."""
    return dispatch.select(device, dtype, None)


def record(benchmark: Any, cfg: BenchConfig, **info: Any) -> None:
    """Set ``benchmark.extra_info``: the given items plus device and library versions."""
    benchmark.extra_info.update(device=cfg.device, threads=torch.get_num_threads(), **versions(), **info)


def record_bandwidth(benchmark: Any, nbytes: int) -> None:
    """Bytes the operation must move, and GB/s at the best and median round (when timed)."""
    benchmark.extra_info["bytes"] = nbytes
    stats = getattr(benchmark, "stats", None)
    if stats:
        benchmark.extra_info["gbps_best"] = nbytes / stats.stats.min / 1e9
        benchmark.extra_info["gbps_median"] = nbytes / stats.stats.median / 1e9


# --- networks -------------------------------------------------------------------------------------

NET_SHAPES = {"null": (3, 16, 16), "digits": (1, 8, 8), "unet": (3, 32, 32)}


class NullNet:
    """An eps network that costs nothing: returns a fixed tensor per batch size (the same object each call;
    row i is the same in every batch size)."""

    def __init__(self, shape: tuple[int, ...], device: str, dtype: torch.dtype):
        self.shape, self.device, self.dtype = shape, device, dtype
        self.eps: dict[int, torch.Tensor] = {}

    def fixed(self, batch: int) -> torch.Tensor:
        if batch not in self.eps:
            rows = [torch.randn(self.shape, generator=torch.Generator().manual_seed(1000 + i)) for i in range(batch)]
            self.eps[batch] = torch.stack(rows).to(self.device, self.dtype)
        return self.eps[batch]

    def effective_eps(self, batch: int, guidance: float | None = None) -> torch.Tensor:
        """The eps a sampler integrates: the output, or with CFG over [cond; uncond] u + w (c - u)."""
        if guidance is None:
            return self.fixed(batch).double()
        c, u = self.fixed(2 * batch).double().chunk(2)
        return u + guidance * (c - u)

    def __call__(self, x: torch.Tensor, t: Any) -> torch.Tensor:
        return self.eps[x.shape[0]]


def _unet(device: str, dtype: torch.dtype) -> Callable[..., torch.Tensor]:
    """diffusers' UNet2DModel with the DDPM CIFAR-10 configuration (35.7M parameters, 32x32), seeded
    random weights (built from its config: no download)."""
    from diffusers import UNet2DModel
    torch.manual_seed(0)
    m = UNet2DModel(sample_size=32, in_channels=3, out_channels=3, layers_per_block=2,
                    block_out_channels=(128, 256, 256, 256),
                    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
                    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"))
    m = m.to(device, dtype).eval()

    def net(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return m(x, t, return_dict=False)[0]
    return net


def make_net(name: str, device: str, dtype: torch.dtype) -> Callable[..., torch.Tensor]:
    """``model(x, t) -> eps`` for the sampler group: 'null', 'digits' (the embedded U-Net) or 'unet'."""
    if name == "null":
        return NullNet(NET_SHAPES["null"], device, dtype)
    if name == "digits":
        from deis_fast.zoo.digits import load_digits_model
        return load_digits_model(device=device, dtype=dtype)
    if name == "unet":
        return _unet(device, dtype)
    raise ValueError(f"unknown network {name!r}; choose one of {NETS}")


class DigitsAsUNet(torch.nn.Module):
    """The embedded digits model dressed as a diffusers UNet2DModel (``config``, ``dtype``, ``device``,
    ``.sample`` output), so that diffusers' own DDPMPipeline can run it."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net
        self.config = types.SimpleNamespace(sample_size=8, in_channels=1)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.net.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> Any:
        from diffusers.models.unets.unet_2d import UNet2DOutput
        return UNet2DOutput(sample=self.net(x, t))


# --- diffusers schedulers -------------------------------------------------------------------------

# third-order configurations of the diffusers multistep schedulers (DPM-Solver++ 3M, UniPC-3)
DIFFUSERS_ORDER3 = {"DEISMultistepScheduler": {"solver_order": 3},
                    "DPMSolverMultistepScheduler": {"solver_order": 3, "algorithm_type": "dpmsolver++"},
                    "UniPCMultistepScheduler": {"solver_order": 3}}


def diffusers_scheduler(name: str, **kw: Any) -> Any:
    """A diffusers scheduler for the DDPM 'linear' betas (the digits model's and deis_fast's default)."""
    import diffusers
    if name == "DEISFastScheduler":
        from deis_fast.integrations.diffusers import DEISFastScheduler
        return DEISFastScheduler(num_train_timesteps=1000, beta_schedule="linear", **kw)
    return getattr(diffusers, name)(num_train_timesteps=1000, beta_schedule="linear", **{**DIFFUSERS_ORDER3[name], **kw})


# --- correctness ----------------------------------------------------------------------------------

def fine_reference(model: Callable[..., torch.Tensor], noise: torch.Tensor, nfe: int = 100) -> torch.Tensor:
    """The ODE endpoint from ``noise`` (t = 999 -> 0): rho_rk4 at ``nfe`` NFE on the logSNR grid."""
    return deis_fast.Sampler(model, method="rho_rk4", nfe=nfe, grid="logsnr", check_finite=False)(noise)


def exact_null_solution(noise: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Exact ODE endpoint (t = 999 -> 0) for a constant eps: x/alpha moves by (rho_end - rho_start) * eps."""
    s = deis_fast.VPSchedule.discrete("linear")
    a0, a1 = float(s.alpha(s.t_max)), float(s.alpha(s.t_min))
    r0, r1 = float(s.rho(s.t_max)), float(s.rho(s.t_min))
    return a1 * (noise.double() / a0 + (r1 - r0) * eps.double())


def median_relative_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Median over samples of ||x - ref|| / ||ref||."""
    x, ref = x.detach().double().cpu(), ref.detach().double().cpu()
    return float(((x - ref).flatten(1).norm(dim=1) / ref.flatten(1).norm(dim=1)).median())


def assert_matches_reference(x: torch.Tensor, ref: torch.Tensor, rtol: float, what: str) -> None:
    """The sample is finite and within ``rtol`` (median per-sample relative error) of ``ref``."""
    assert torch.isfinite(x).all(), f"{what}: result has NaN/Inf"
    err = median_relative_error(x, ref)
    assert err <= rtol, f"{what}: median relative error {err:.3g} to the reference exceeds {rtol:g}"
