"""A diffusers pipeline: diffusers' own DDPMPipeline running the embedded digits model at 10 steps
with DEISFastScheduler (tab3) against DEISMultistepScheduler (the baseline), DPMSolverMultistepScheduler
and UniPCMultistepScheduler (order 3 each). ``extra_info`` carries the scheduler's share of the wall time
(measured in a separate pass with ``step`` and ``set_timesteps`` timed, synchronized on CUDA) and the ops
each ``step`` dispatches. Every result is checked against a float64 rho_rk4 solve from the same noise.
"""
from __future__ import annotations

import inspect
import time
import warnings
from typing import Any, Callable

import pytest
import torch

import harness

STEPS = 10
SCHEDULERS = {"DEISFastScheduler": {"method": "tab3"}, "DEISMultistepScheduler": {},
              "DPMSolverMultistepScheduler": {}, "UniPCMultistepScheduler": {}}
MAX_MEAN_ABS_ERROR = 0.05   # in [0, 1] image units; the 10-step samplers land at 0.005-0.025


def _accepting_generator(sch: Any) -> Any:
    """DDPMPipeline passes ``generator=`` to ``step``; deterministic schedulers that do not take it get
    a ``step`` that drops it (applied to every scheduler that lacks it, so all rows pay the same)."""
    if "generator" not in inspect.signature(sch.step).parameters:
        step = sch.step

        def step_without_generator(*args: Any, generator: Any = None, **kwargs: Any) -> Any:
            return step(*args, **kwargs)
        sch.step = step_without_generator
    return sch


def _pipeline(name: str, unet: torch.nn.Module) -> Any:
    from diffusers import DDPMPipeline
    pipe = DDPMPipeline(unet=unet, scheduler=_accepting_generator(harness.diffusers_scheduler(name, **SCHEDULERS[name])))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _wrap(sch: Any, attr: str, around: Callable[[Callable, tuple, dict], Any]) -> Callable[[], None]:
    """Route ``sch.<attr>`` through ``around(original, args, kwargs)``; returns the undo function."""
    original = getattr(sch, attr)
    setattr(sch, attr, lambda *a, **k: around(original, a, k))
    return lambda: setattr(sch, attr, original)


def scheduler_share(pipe: Any, run: Callable[[], Any], device: str, reps: int = 3) -> float:
    """Time inside ``set_timesteps`` + ``step`` over the pipeline's wall time (best of ``reps``)."""
    spent = [0.0]

    def timing(fn: Callable, a: tuple, k: dict) -> Any:
        harness.sync(device)
        t0 = time.perf_counter()
        out = fn(*a, **k)
        harness.sync(device)
        spent[0] += time.perf_counter() - t0
        return out
    undo = [_wrap(pipe.scheduler, "step", timing), _wrap(pipe.scheduler, "set_timesteps", timing)]
    shares = []
    for _ in range(reps):
        spent[0] = 0.0
        t0 = time.perf_counter()
        run()
        harness.sync(device)
        shares.append(spent[0] / (time.perf_counter() - t0))
    for u in undo:
        u()
    return min(shares)


def ops_per_step(pipe: Any, run: Callable[[], Any]) -> float:
    """ATen ops dispatched inside ``scheduler.step``, per step."""
    rec = harness.DispatchRecorder()

    def recording(fn: Callable, a: tuple, k: dict) -> Any:
        with rec:
            return fn(*a, **k)
    undo = _wrap(pipe.scheduler, "step", recording)
    run()
    undo()
    return len(rec.ops) / STEPS


@pytest.mark.parametrize("name", SCHEDULERS)
def test_pipeline(benchmark, cfg, nets, batch, dtype_name, dtype, references, name):
    from diffusers.utils.torch_utils import randn_tensor
    unet = harness.DigitsAsUNet(nets("digits", dtype))
    pipe = _pipeline(name, unet)
    shape = (batch, 1, 8, 8)

    def run() -> torch.Tensor:
        g = torch.Generator().manual_seed(batch)
        return pipe(batch_size=batch, generator=g, num_inference_steps=STEPS, output_type="pt").images

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run()
        noise = randn_tensor(shape, generator=torch.Generator().manual_seed(batch), device=torch.device(cfg.device),
                             dtype=dtype)
        benchmark.group = f"DDPMPipeline digits {STEPS} steps b{batch} {dtype_name} {cfg.device}"
        harness.record(benchmark, cfg, label=name + (" (tab3)" if name == "DEISFastScheduler" else " (order 3)"),
                       scheduler=name, steps=STEPS, batch=batch, dtype=dtype_name,
                       scheduler_share=scheduler_share(pipe, run, cfg.device),
                       dispatched_ops_per_nfe=ops_per_step(pipe, run),
                       backend=harness.combine_backend(cfg.device, dtype) if name == "DEISFastScheduler" else "diffusers",
                       role="baseline" if name == "DEISMultistepScheduler" else None)
        images = benchmark(harness.timed(run, cfg.device))
    expected = (references("digits", noise).cpu() / 2 + 0.5).clamp(0, 1)
    err = (images.double().cpu() - expected).abs().mean().item()
    assert err <= MAX_MEAN_ABS_ERROR, f"{name}: mean abs error {err:.3g} to the reference images"
