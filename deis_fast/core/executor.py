"""The one executor: walks a plan (or one segment of it) over tensor slots.

:class:`~deis_fast.sampler.Sampler` runs whole plans with a preallocated :class:`Workspace`; the CUDA-graph
sampler captures the same loop; :class:`~deis_fast.integrations.diffusers.DEISFastScheduler` runs one
segment per ``step()`` (the ops from Eval k up to Eval k+1) with the pipeline's own network output.
Evals are handed to an ``evaluate`` callback; every Combine is one :func:`deis_fast.core.ops.combine`.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import numpy as np
import torch

from . import ops
from .grids import grid_rho
from .plan import Combine, Eval, Plan

__all__ = ["NonFiniteError", "Workspace", "run_plan", "segments", "Inpaint", "inpaint_args", "check_noise",
           "check_out", "draw_step_noise", "finish_finite_check", "Generator"]

Generator = torch.Generator | Sequence[torch.Generator] | None
# evaluate(state, eval_op, eval_index, buffer or None) -> the solver's target at that state
Evaluate = Callable[[torch.Tensor, Eval, int, "torch.Tensor | None"], torch.Tensor]


class NonFiniteError(FloatingPointError):
    """Raised when the noise, a model output or the result is NaN or infinite."""


def draw_step_noise(n: int, like: torch.Tensor, generator: Generator) -> torch.Tensor | None:
    """[n, *like.shape] standard normal noise in float32 (then like's dtype); a list of generators draws
    sample b's noise from generator b, so that a sample depends only on its own seed."""
    if n == 0:
        return None
    shape = (n,) + tuple(like.shape)
    if generator is None or isinstance(generator, torch.Generator):
        gdev = generator.device if generator is not None else like.device
        return torch.randn(shape, generator=generator, device=gdev, dtype=torch.float32).to(like.device, like.dtype)
    gens = list(generator)
    if len(gens) != like.shape[0]:
        raise ValueError(f"a list of generators needs one per sample: batch {like.shape[0]}, got {len(gens)}")
    per = [torch.randn((n,) + tuple(like.shape[1:]), generator=g, device=g.device, dtype=torch.float32) for g in gens]
    return torch.stack(per, dim=1).to(like.device, like.dtype)


class Workspace:
    """Everything a call needs, allocated once per (shape, dtype, device, layout) and plan: model-output /
    stage slots, time inputs, the doubled CFG batch, the step-noise buffer, the finite-check sums."""

    @staticmethod
    def key_of(x: torch.Tensor) -> tuple:
        return (tuple(x.shape), x.dtype, x.device, x.ndim == 4 and x.is_contiguous(memory_format=torch.channels_last)
                and not x.is_contiguous())

    def __init__(self, plan: Plan, adapter: Any, x: torch.Tensor, key: tuple | None = None):
        self.key = Workspace.key_of(x) if key is None else key
        fmt = torch.channels_last if self.key[3] else torch.contiguous_format
        shape, dt, dev = tuple(x.shape), x.dtype, x.device

        def empty(s: tuple) -> torch.Tensor:
            t = torch.empty(s, dtype=dt, device=dev)
            return t.contiguous(memory_format=fmt) if fmt is torch.channels_last else t

        self.bufs: list[torch.Tensor | None] = [None] + [empty(shape) for _ in range(plan.num_slots - 1)]
        tdt = adapter.time_dtype or (torch.float64 if dt == torch.float64 else torch.float32)
        b = shape[0]
        self.times = [torch.full((b,), op.model_t, dtype=tdt, device=dev) for op in plan.evals]
        guided = adapter.guided
        self.times2 = [torch.full((2 * b,), op.model_t, dtype=tdt, device=dev) for op in plan.evals] if guided else None
        self.xx = empty((2 * b,) + shape[1:]) if guided else None
        n = plan.num_noise
        self.z = torch.empty((n,) + shape, dtype=dt, device=dev) if n else None
        self.z32 = torch.empty((n,) + shape, dtype=torch.float32, device=dev) if n and dt != torch.float32 else None
        self.z_views = list(self.z.unbind()) if n else None
        sdt = torch.float32 if dev.type == "mps" else torch.float64
        self.fin = torch.zeros(plan.nfe + 2, dtype=sdt, device=dev)
        self.fin_views = list(self.fin.unbind())
        self.fin_total = torch.zeros((), dtype=sdt, device=dev)

    def draw_noise(self, generator: Generator) -> torch.Tensor:
        """Step noise for one call, N(0, 1) drawn in float32 (same values as ``torch.randn``), in place."""
        z = self.z
        if generator is None or (isinstance(generator, torch.Generator) and generator.device == z.device):
            if self.z32 is None:
                return z.normal_(generator=generator)
            return z.copy_(self.z32.normal_(generator=generator))
        return z.copy_(draw_step_noise(z.shape[0], z[0], generator))


def check_out(out: Any, noise: torch.Tensor) -> None:
    if not isinstance(out, torch.Tensor) or out.shape != noise.shape or out.dtype != noise.dtype \
            or out.device != noise.device:
        got = (tuple(out.shape), out.dtype, out.device) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"out must be a tensor like the noise {(tuple(noise.shape), noise.dtype, noise.device)}, "
                         f"got {got}")


def check_noise(noise: Any) -> None:
    if not isinstance(noise, torch.Tensor):
        raise TypeError(f"noise must be a torch.Tensor, got {type(noise).__name__}")
    if not noise.is_floating_point():
        raise TypeError(f"noise must be a floating-point tensor, got {noise.dtype}")
    if noise.device.type == "meta":
        raise ValueError("noise is on the 'meta' device (no data); sample with real CPU or CUDA tensors")
    if noise.ndim < 1 or noise.shape[0] == 0:
        raise ValueError(f"noise must have a non-empty batch dimension, got shape {tuple(noise.shape)}")
    if noise.numel() == 0:
        raise ValueError(f"noise has no elements (shape {tuple(noise.shape)})")


def segments(plan: Plan) -> list[tuple[int, int]]:
    """Op-index ranges [start, stop) of the segments: Eval k and the Combines up to Eval k+1 (or the end).
    Ops before the first Eval (none in current plans) belong to no segment."""
    starts = [i for i, op in enumerate(plan.ops) if type(op) is Eval]
    return list(zip(starts, starts[1:] + [len(plan.ops)]))


def run_plan(plan: Plan, slots: list, evaluate: Evaluate, *, bufs: Sequence[torch.Tensor | None] | None = None,
             span: tuple[int, int] | None = None, first_eval: int = 0,
             step_noise: Sequence[torch.Tensor] | None = None, finite: Workspace | None = None,
             in_place: bool = True, copy_outputs: bool = False, keep: list | None = None,
             callback: Callable[[dict[str, Any]], None] | None = None, progress: bool = False,
             inpaint: "Inpaint | None" = None) -> torch.Tensor:
    """Walk ``plan.ops`` (or ``plan.ops[span[0]:span[1]]``, whose first Eval is number ``first_eval``) over
    ``slots`` (slot 0: the state); returns the state slot.

    Static: no host syncs, no data-dependent branches. In place (the default), every Combine writes into its
    destination slot (``x`` or a preallocated buffer) and a model output that already is the solver's target is
    used as is (zero copy) unless ``copy_outputs`` (models that return a reused buffer; it is copied into
    ``bufs[dst]``); ``keep`` collects those outputs. Out of place (``in_place=False``: autograd recording, or a
    scheduler that returns fresh tensors), every Combine makes a new tensor. ``finite``: the workspace whose
    ``fin`` sums (input, one per NFE, result) and their total feed the deferred finite check
    (:func:`finish_finite_check`). ``step_noise`` is indexed by a Combine's ``noise_index``.
    ``inpaint`` keeps the known region on the forward process in every Eval's input and in the result.
    ``callback({"x", "i", "t"})`` runs once per segment that advanced the solution (wrote one of
    ``plan.state_slots``), before the next Eval, with the state written last, ``i`` the number of network calls so
    far and ``t`` the time of the last one: once per step for every method (Runge-Kutta stages and PFDiff
    springboards are not reported).
    """
    bufs = bufs if bufs is not None else [None] * len(slots)
    lo, hi = span if span is not None else (0, len(plan.ops))
    whole = span is None
    compiling = torch.compiler.is_compiling()
    fin = finite.fin_views if finite is not None else None
    if fin is not None and whole:
        x0 = slots[0]
        torch.sum(x0 if in_place else x0.detach(), dim=None, dtype=fin[0].dtype, out=fin[0])
    seen: list[torch.Tensor] = []
    bar = None
    if progress and not compiling:
        from tqdm.auto import tqdm
        bar = tqdm(total=plan.nfe, desc=f"deis_fast {plan.method}", leave=False)
    k = first_eval
    state_slots = plan.state_slots
    advanced = -1  # the state slot written last in this segment (-1: none), for the callback
    for op in plan.ops[lo:hi]:
        if type(op) is Eval:
            if advanced >= 0:
                _report(callback, plan, slots, advanced, k)
                advanced = -1
            if inpaint is not None:
                slots[op.src] = inpaint.blend(slots[op.src], op.alpha, op.sigma, inplace=in_place)
            buf = bufs[op.dst]
            out = evaluate(slots[op.src], op, k, buf)
            if out is not buf:
                if keep is not None:
                    keep.append(out)
                if compiling and not copy_outputs:
                    for prev in seen:
                        if out is prev:
                            raise RuntimeError("the model returned the same output tensor twice (it reuses an output "
                                               "buffer): run the sampler once eagerly before torch.compile, or pass "
                                               "Sampler(..., copy_outputs=True)")
                    seen.append(out)
                if copy_outputs or out is slots[op.src]:
                    out = out.clone() if buf is None else buf.copy_(out)
            slots[op.dst] = out
            if fin is not None:
                torch.sum(out if in_place else out.detach(), dim=None, dtype=fin[k + 1].dtype, out=fin[k + 1])
            k += 1
            if bar is not None:
                bar.update(1)
        else:
            _run_combine(op, slots, step_noise, in_place)
            if callback is not None and op.dst in state_slots:
                advanced = op.dst
    if advanced >= 0:
        _report(callback, plan, slots, advanced, k)
    if bar is not None:
        bar.close()
    if inpaint is not None and hi == len(plan.ops):
        slots[0] = inpaint.blend(slots[0], *inpaint.end, inplace=in_place)
    x = slots[0]
    if fin is not None and whole:
        torch.sum(x if in_place else x.detach(), dim=None, dtype=fin[-1].dtype, out=fin[-1])
        torch.sum(finite.fin, dim=None, out=finite.fin_total)
    return x


def _report(callback: Callable[[dict[str, Any]], None], plan: Plan, slots: list, slot: int, k: int) -> None:
    callback({"x": slots[slot], "i": k, "t": plan.evals[k - 1].t if k else plan.times[0]})


def _run_combine(op: Combine, slots: list, step_noise: Sequence[torch.Tensor] | None, in_place: bool) -> None:
    srcs = [slots[s] for s in op.srcs]
    noise = step_noise[op.noise_index] if op.noise_index >= 0 else None
    coef = op.noise_coef if noise is not None else 0.0
    if in_place:
        ops.combine(srcs, op.coefs, out=slots[op.dst], noise=noise, noise_coef=coef)
    else:
        slots[op.dst] = ops.combine(srcs, op.coefs, noise=noise, noise_coef=coef)


class Inpaint:
    """The known region of an inpainting call: ``x <- x + keep * (alpha * known + sigma * z - x)``
    before every Eval (two ops per NFE: the forward-process sample, then a lerp with the mask)."""

    def __init__(self, known: torch.Tensor, keep: torch.Tensor, z: torch.Tensor, end: tuple[float, float]):
        self.known, self.keep, self.z, self.end = known, keep, z, end
        self.tmp = torch.empty_like(z)

    def blend(self, x: torch.Tensor, alpha: float, sigma: float, inplace: bool = True) -> torch.Tensor:
        """``x`` with its kept region set to ``alpha * known + sigma * z`` (in place unless recording autograd)."""
        if not inplace:
            return torch.lerp(x, ops.combine([self.known, self.z], [alpha, sigma]), self.keep)
        ops.combine([self.known, self.z], [alpha, sigma], out=self.tmp)
        return x.lerp_(self.tmp, self.keep)


def inpaint_args(known: torch.Tensor | None, mask: torch.Tensor | None, noise: torch.Tensor, x: torch.Tensor,
                 schedule: Any, plan: Plan) -> Inpaint | None:
    """The :class:`Inpaint` of a call (None without ``known``/``mask``), with its inputs checked."""
    if known is None and mask is None:
        return None
    if known is None or mask is None:
        raise ValueError("inpainting needs both known= (the clean data to keep) and mask= (1 = generate, 0 = keep)")
    if not isinstance(known, torch.Tensor) or known.shape != noise.shape:
        got = tuple(known.shape) if isinstance(known, torch.Tensor) else type(known).__name__
        raise ValueError(f"known must be a tensor shaped like the noise {tuple(noise.shape)}, got {got}")
    try:
        keep = (1.0 - torch.as_tensor(mask, device=noise.device, dtype=noise.dtype)).expand_as(noise)
    except RuntimeError:
        raise ValueError(f"mask of shape {tuple(torch.as_tensor(mask).shape)} does not broadcast to the noise "
                         f"{tuple(noise.shape)}") from None
    z = noise.clone() if x is noise else noise
    rho_end = float(grid_rho(schedule, np.asarray(plan.times))[-1])
    alpha_end = float(schedule.alpha_from_rho(rho_end))
    return Inpaint(known.to(device=noise.device, dtype=noise.dtype), keep, z, (alpha_end, alpha_end * rho_end))


def finish_finite_check(plan: Plan, ws: Workspace, x: torch.Tensor) -> None:
    """The one host sync of a checked call: reads the total of the per-NFE sums (NaN/Inf propagate)."""
    if not math.isfinite(ws.fin_total.item()):
        _raise_non_finite(plan, torch.isfinite(ws.fin).cpu().tolist(), x)


def _raise_non_finite(plan: Plan, flags: list[bool], x: torch.Tensor) -> None:
    evals = plan.evals
    if not flags[0]:
        raise NonFiniteError("the input noise contains NaN or Inf")
    for k, ok in enumerate(flags[1:-1]):
        if not ok:
            op = evals[k]
            raise NonFiniteError(f"the model output at step {k} (NFE {k + 1} of {plan.nfe}, t={op.t:.6g}, "
                                 f"model time {op.model_t:.6g}) contains NaN or Inf; check the model, its dtype "
                                 f"(fp16 overflow?) and its time input. Pass check_finite=False to skip this check")
    hint = " (fp16 overflow: sample in float32 or bfloat16)" if x.dtype == torch.float16 else ""
    raise NonFiniteError(f"the sampler's result contains NaN or Inf although every model output was finite{hint}")
