"""Whole-loop CUDA-graph capture of a :class:`~deis_fast.sampler.Sampler`.

    sampler = deis_fast.Sampler(unet, schedule, "tab3", nfe=10, guidance_scale=7.5, uncond={...})
    g = sampler.cuda_graph(example_noise, encoder_hidden_states=emb)   # warm-up + capture, cached
    x = g(noise, encoder_hidden_states=emb2, guidance_scale=5.0)        # copy inputs in, one replay

What one replay contains: the entire plan, every network call and every Combine (plus, with CFG,
the doubled-batch ``cat`` and the guided ``lerp``), launched as one graph. Inputs are copied into
static buffers before the replay (noise straight into the state slot, tensor conditioning into its
static copy); the result is copied out (``out=``) or cloned.

Guidance: the captured graph reads the scale from a 0-d float32 device tensor (``guided = u + w (c - u)``
computed with ``torch.lerp(u, c, w, out=slot)``, followed by the conversion Combine when the model's
prediction is not the solver's target), so ``g(..., guidance_scale=s)`` is one ``fill_`` and no re-capture.
Eager samplers with a float scale fold w into the conversion Combine instead (coefficients w, 1 - w);
the two agree to rounding, not bitwise. For bitwise eager/graph equality build the sampler with
``guidance_scale=torch.tensor(w)``.

Stochastic plans: the step noise lives in a static buffer that each call fills before the replay
(in place with ``normal_`` from ``generator`` (default: the device's default generator), or a copy of
the given ``step_noise``), so replays with the same generator state equal the eager sampler.

Warm-up runs the full plan on a side stream (compiling every Triton combine variant the plan uses and
running the sampler's first-call detection of models that reuse an output buffer) before capture.
``DEIS_FAST_CUDA_GRAPH=0`` (or ``enabled=False``, or non-CUDA noise) gives the same interface running
the eager sampler.
"""
from __future__ import annotations

import os
from typing import Any, Mapping

import torch

from .core.executor import Workspace, check_noise, finish_finite_check

__all__ = ["CUDAGraphSampler", "GraphShapeError", "ENV_VAR", "cond_signature"]

ENV_VAR = "DEIS_FAST_CUDA_GRAPH"


class GraphShapeError(ValueError):
    """A captured graph was called with inputs of another shape / dtype / device / conditioning."""


def _env_enabled() -> bool:
    return os.environ.get(ENV_VAR, "1").strip().lower() not in ("0", "false", "no", "off")


def _describe(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, {t.dtype}, {t.device}"


def cond_signature(cond: Mapping[str, Any]) -> tuple:
    """Hashable description of the conditioning: tensor shapes/dtypes/devices, other values by repr."""
    sig = []
    for k in sorted(cond):
        v = cond[k]
        sig.append((k, ("tensor", tuple(v.shape), v.dtype, v.device) if isinstance(v, torch.Tensor) else ("value", repr(v))))
    return tuple(sig)


class CUDAGraphSampler:
    """One CUDA graph holding a whole sampling call of ``sampler`` for noise like ``example_noise``.

    ``enabled``: None = capture when the noise is on CUDA and ``DEIS_FAST_CUDA_GRAPH`` is not 0, else run
    eagerly; True = capture or raise; False = eager. ``check_finite``: None = the sampler's setting; when
    on, the per-NFE sums are part of the graph and the call does one host sync after the replay (pass
    False for a call with no host sync at all). ``warmup_iters`` eager runs on a side stream precede
    the capture; ``pool`` is passed to :class:`torch.cuda.graph` (share one between graphs to save memory).
    """

    def __init__(self, sampler, example_noise: torch.Tensor, *, enabled: bool | None = None,
                 check_finite: bool | None = None, warmup_iters: int = 2, pool: Any = None, **example_cond: Any):
        check_noise(example_noise)
        self.sampler = sampler
        self.plan = sampler.plan
        self.check_finite = sampler.check_finite if check_finite is None else bool(check_finite)
        self.shape, self.dtype, self.device = tuple(example_noise.shape), example_noise.dtype, example_noise.device
        self.cond_sig = cond_signature(example_cond)
        self.fallback_reason: str | None = None
        if enabled is None:
            if not _env_enabled():
                self.fallback_reason = f"{ENV_VAR}=0"
            elif example_noise.device.type != "cuda" or not torch.cuda.is_available():
                self.fallback_reason = f"noise is on {example_noise.device}, CUDA graphs need CUDA tensors"
        elif not enabled:
            self.fallback_reason = "enabled=False"
        elif example_noise.device.type != "cuda" or not torch.cuda.is_available():
            raise ValueError(f"CUDA graph capture needs CUDA noise, got noise on {example_noise.device}")
        self.enabled = self.fallback_reason is None
        self.graph: torch.cuda.CUDAGraph | None = None
        if not self.enabled:
            return

        adapter = sampler.adapter
        dev = example_noise.device
        self.ws = Workspace(sampler.plan, adapter, example_noise)       # private to this graph
        self.x = torch.empty_like(example_noise)                        # the state slot (input and result)
        self.cond = {k: (v.detach().clone() if isinstance(v, torch.Tensor) else v) for k, v in example_cond.items()}
        self.guidance = None
        if adapter.guided:
            w = adapter.guidance_scale
            self.guidance = (w.detach().to(device=dev, dtype=torch.float32).reshape(()).clone()
                             if isinstance(w, torch.Tensor) else torch.tensor(float(w), dtype=torch.float32, device=dev))
        self.z = self.ws.z_views

        with torch.cuda.device(dev):
            # warm-up on a side stream: Triton JIT of every combine variant, cuDNN/cuBLAS handles and
            # autotuning, the sampler's first-call detection; nothing of this may happen during capture
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(max(1, warmup_iters)):
                    self.x.copy_(example_noise)
                    if self.z is not None:
                        self.ws.draw_noise(None)
                    self._body()
            torch.cuda.current_stream().wait_stream(side)
            torch.cuda.synchronize()
            self.graph = torch.cuda.CUDAGraph()
            self.x.copy_(example_noise)
            with torch.cuda.graph(self.graph, pool=pool):
                self._body()
            torch.cuda.synchronize()

    def _body(self) -> None:
        self.sampler.run(self.x, self.ws, self.cond, self.z, self.check_finite, guidance=self.guidance)

    def __repr__(self) -> str:
        mode = "graph" if self.enabled else f"eager ({self.fallback_reason})"
        return f"CUDAGraphSampler({self.plan.method!r}, nfe={self.plan.nfe}, noise {self.shape} {self.dtype}, {mode})"

    def _check_inputs(self, noise: torch.Tensor, cond: Mapping[str, Any]) -> None:
        if not isinstance(noise, torch.Tensor) or tuple(noise.shape) != self.shape or noise.dtype != self.dtype \
                or noise.device != self.device:
            got = _describe(noise) if isinstance(noise, torch.Tensor) else type(noise).__name__
            raise GraphShapeError(f"this CUDA graph was captured for noise of shape {self.shape}, {self.dtype}, "
                                  f"{self.device}; got {got}. Capture another one with "
                                  f"sampler.cuda_graph(noise_like_this, ...) (graphs are cached per shape)")
        sig = cond_signature(cond)
        if sig != self.cond_sig:
            raise GraphShapeError(f"this CUDA graph was captured with conditioning {self.cond_sig}; got {sig} "
                                  "(tensor shapes/dtypes and non-tensor values must match the capture)")

    def __call__(self, noise: torch.Tensor, generator: torch.Generator | None = None,
                 step_noise: torch.Tensor | None = None, *, out: torch.Tensor | None = None,
                 guidance_scale: float | torch.Tensor | None = None, **cond: Any) -> torch.Tensor:
        """Copy the inputs into the static buffers, replay, return the result (a new tensor, or ``out``)."""
        s = self.sampler
        if not self.enabled:
            self._check_inputs(noise, cond)
            return s(noise, generator=generator, step_noise=step_noise, out=out, guidance_scale=guidance_scale,
                     **cond)
        self._check_inputs(noise, cond)
        if guidance_scale is not None:
            if self.guidance is None:
                raise ValueError("guidance_scale given but the sampler has no classifier-free guidance")
            if isinstance(guidance_scale, torch.Tensor):
                self.guidance.copy_(guidance_scale.reshape(()))
            else:
                self.guidance.fill_(float(guidance_scale))
        for k, v in cond.items():
            if isinstance(v, torch.Tensor):
                self.cond[k].copy_(v)
        if self.z is not None:
            if step_noise is not None:
                if tuple(step_noise.shape) != tuple(self.ws.z.shape):
                    raise ValueError(f"step_noise must have shape {tuple(self.ws.z.shape)}, got "
                                     f"{tuple(step_noise.shape)}")
                self.ws.z.copy_(step_noise)
            else:
                self.ws.draw_noise(generator)
        self.x.copy_(noise)
        self.graph.replay()
        if self.check_finite:
            finish_finite_check(self.plan, self.ws, self.x)
        if out is None:
            return self.x.clone()
        return out.copy_(self.x)
