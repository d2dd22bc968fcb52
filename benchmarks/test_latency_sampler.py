"""The sampler around a network: a full tab3 NFE-10 sampling call, side by side per (network, batch,
dtype, guidance):

- ``network``: the same 10 network calls alone (what sampling cannot go below);
- ``diffusers``: diffusers' DEISMultistepScheduler (order 3) loop around the same network, with
  ``set_timesteps`` per call as a pipeline does (the baseline);
- ``sample``: ``deis_fast.sample(...)`` one-shot (plan, workspace and finite check every call);
- ``static``: a reusable ``Sampler(..., check_finite=False)`` writing into ``out=`` (no allocation);
- ``compile``: ``torch.compile(sampler, fullgraph=True)`` (inductor ``reduce-overhead`` on CUDA);
- ``cuda_graph``: ``sampler.cuda_graph(noise)`` replaying the whole loop (CUDA only).

Networks: ``null`` (returns a fixed eps: the sampler's own cost; checked against the exact solution),
``digits`` (the embedded U-Net; checked against a float64 rho_rk4 solve) and ``unet`` (diffusers'
UNet2DModel in the DDPM CIFAR-10 configuration, random weights; checked against rho_rk4 at 80 NFE).
Guidance ``cfg`` runs classifier-free guidance (scale 7.5, one call on the doubled batch) with identical
conditional and unconditional inputs: the same ODE as ``nocfg`` for ``digits`` and ``unet``; the null
network's two halves differ, and its exact solution uses the guided (constant) eps.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Callable

import pytest
import torch

import deis_fast

import harness

NFE = 10
GUIDANCE = 7.5
MODES = ("network", "diffusers", "sample", "static", "compile", "cuda_graph")
LABELS = {"network": "network calls alone", "diffusers": "diffusers DEISMultistepScheduler loop",
          "sample": "deis_fast.sample() one-shot", "static": "Sampler, static workspace", "compile": "torch.compile",
          "cuda_graph": "CUDA graph replay"}
# median relative error to the reference that a correct NFE-10 sampler stays within
TOLERANCE = {"null": {"fp32": 1e-4, "fp16": 2e-2, "bf16": 2e-2}, "digits": 0.1, "unet": 0.3}


@dataclass
class Case:
    """One (network, batch, dtype, guidance) configuration and its reference endpoint."""
    net_name: str
    net: Callable[..., torch.Tensor]
    noise: torch.Tensor
    guided: bool
    device: str
    reference: torch.Tensor
    tolerance: float

    def guidance(self) -> dict[str, Any]:
        return {"guidance_scale": GUIDANCE, "uncond": {}} if self.guided else {}

    def sampler(self, copy_outputs: bool | None = None, net: Callable | None = None) -> deis_fast.Sampler:
        return deis_fast.Sampler(net or self.net, method="tab3", nfe=NFE, check_finite=False,
                                 copy_outputs=copy_outputs, **self.guidance())

    def model_input(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, x]) if self.guided else x

    def guide(self, out: torch.Tensor) -> torch.Tensor:
        """CFG on a doubled-batch output in deis_fast's order [cond; uncond]."""
        c, u = out.chunk(2)
        return u + GUIDANCE * (c - u)


def _reference(net_name: str, nets, noise: torch.Tensor, guided: bool, references) -> torch.Tensor:
    if net_name == "null":
        eps = nets("null", noise.dtype).effective_eps(noise.shape[0], GUIDANCE if guided else None)
        return harness.exact_null_solution(noise, eps)
    return references(net_name, noise)   # digits and unet: the same ODE with and without CFG


@pytest.fixture
def case(cfg, nets, net_name, batch, dtype_name, dtype, guided, references) -> Case:
    g = torch.Generator().manual_seed(batch)
    noise = torch.randn((batch, *harness.NET_SHAPES[net_name]), generator=g).to(cfg.device, dtype)
    net = nets(net_name, dtype)
    if net_name == "null":
        net.fixed(batch), net.fixed(2 * batch)
    tol = TOLERANCE[net_name]
    return Case(net_name, net, noise, guided, cfg.device, _reference(net_name, nets, noise, guided, references),
                tol[dtype_name] if isinstance(tol, dict) else tol)


# --- the modes: each returns (function to time, ops-counting function or None) ----------------------

def _network(case: Case) -> tuple[Callable, Callable | None]:
    plan = deis_fast.build_plan(deis_fast.VPSchedule.discrete("linear"), "tab3", NFE)
    x = case.model_input(case.noise)
    times = [torch.full((x.shape[0],), op.model_t, device=case.device) for op in plan.evals]

    def run():
        for t in times:
            out = case.net(x, t)
        return out
    return run, None


def _diffusers(case: Case) -> tuple[Callable, Callable | None]:
    sch = harness.diffusers_scheduler("DEISMultistepScheduler")

    def run(net=case.net):
        sch.set_timesteps(NFE, device=case.device)
        x = case.noise
        for t in sch.timesteps:
            e = case.guide(net(torch.cat([x, x]), t)) if case.guided else net(x, t)
            x = sch.step(e, t, x).prev_sample
        return x
    return run, lambda rec: run(rec.mark(case.net))


def _sample(case: Case) -> tuple[Callable, Callable | None]:
    def run(net=case.net):
        return deis_fast.sample(net, case.noise, method="tab3", nfe=NFE, **case.guidance())
    return run, lambda rec: run(rec.mark(case.net))


def _static(case: Case) -> tuple[Callable, Callable | None]:
    # the null network returns one tensor object every call: no output copies needed
    copy_outputs = False if case.net_name == "null" else None
    s = case.sampler(copy_outputs)
    out = torch.empty_like(case.noise)

    def count(rec):
        counted = case.sampler(copy_outputs, net=rec.mark(case.net))
        counted(case.noise, out=out)      # the first call warms up; count the second
        rec.clear()
        counted(case.noise, out=out)
    return lambda: s(case.noise, out=out), count


def _compile(case: Case, backend: str) -> tuple[Callable, Callable | None]:
    torch._dynamo.reset()   # a fresh cache: earlier cases must not count against the recompile limit
    s = case.sampler(copy_outputs=True if case.net_name == "null" else None)
    s(case.noise)           # eager first call: detects models that reuse an output buffer
    mode = "reduce-overhead" if case.device == "cuda" and backend == "inductor" else None
    c = torch.compile(s, fullgraph=True, backend=backend, mode=mode, dynamic=False)
    for _ in range(3):      # compile, then (reduce-overhead) record the CUDA graph
        c(case.noise)
    return lambda: c(case.noise), None


def _cuda_graph(case: Case) -> tuple[Callable, Callable | None]:
    if case.device != "cuda":
        pytest.skip("CUDA graphs need a CUDA device (--bench-device cuda)")
    s = case.sampler(copy_outputs=False if case.net_name == "null" else None)
    g = s.cuda_graph(case.noise)
    out = torch.empty_like(case.noise)
    return lambda: g(case.noise, out=out), None


@pytest.mark.parametrize("mode", MODES)
def test_sampler(benchmark, cfg, case, net_name, batch, dtype_name, guided, mode):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fn, count = (_compile(case, cfg.compile_backend) if mode == "compile" else
                     {"network": _network, "diffusers": _diffusers, "sample": _sample, "static": _static,
                      "cuda_graph": _cuda_graph}[mode](case))
        first = fn().clone()
        cfg_name = "cfg" if guided else "nocfg"
        benchmark.group = f"sampler tab3 NFE {NFE} {net_name} b{batch} {dtype_name} {cfg_name} {cfg.device}"
        label = LABELS[mode] + (f"[{cfg.compile_backend}]" if mode == "compile" else "")
        info = dict(label=label, mode=mode, net=net_name, batch=batch, dtype=dtype_name,
                    guidance=GUIDANCE if guided else None, nfe=NFE,
                    backend=harness.combine_backend(cfg.device, case.noise.dtype),
                    role={"network": "network", "diffusers": "baseline"}.get(mode))
        if count is not None:
            info["dispatched_ops_per_nfe"] = harness.ops_per_call(count) / NFE
        if mode == "compile":
            info["compile_backend"] = cfg.compile_backend
        if cfg.device == "cuda":
            info["cuda_kernels_per_nfe"] = harness.cuda_kernels_per_call(fn) / NFE
        harness.record(benchmark, cfg, **info)
        result = benchmark(harness.timed(fn, cfg.device))
    if mode == "network":
        assert torch.isfinite(result).all() and torch.allclose(result, first, rtol=1e-3, atol=1e-3), \
            "network output is not finite or not reproducible"
    else:
        harness.assert_matches_reference(result, case.reference, case.tolerance, f"{mode} ({net_name})")
