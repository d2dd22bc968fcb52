"""Public sampling API: ``Sampler`` builds a plan once; the one executor runs it."""
from __future__ import annotations

import warnings
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from .graph import CUDAGraphSampler, cond_signature
from .core.grids import MODEL_GRIDS, GridSpec
from .core.adapters import ModelAdapter
from .core.plan import Eval, Plan
from .core.executor import (Generator, Inpaint, NonFiniteError, Workspace, check_noise, check_out, finish_finite_check,
                       inpaint_args, run_plan)
from .core.schedules import Schedule, VESchedule, VPSchedule, schedule_fingerprint
from .solvers import DEFAULT_NFE, MAX_NFE, PlanOptions, build_plan, default_grid, default_method, resolve  # noqa: F401  (re-exported)

__all__ = ["Sampler", "sample", "build_plan", "default_grid", "PlanOptions", "NonFiniteError", "randn_per_sample",
           "MAX_NFE"]


def randn_per_sample(shape: Sequence[int], seeds: Sequence[int], device: torch.device | str = "cpu",
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Initial noise where sample b depends only on seeds[b] (EDM convention), drawn on the CPU."""
    if len(seeds) != shape[0]:
        raise ValueError(f"need one seed per sample: {shape[0]} samples, {len(seeds)} seeds")
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    return torch.stack([torch.randn(tuple(shape[1:]), generator=g, dtype=torch.float32) for g in gens]).to(device, dtype)


class Sampler:
    """A reusable sampler: ``Sampler(model, schedule, method, nfe, grid)(noise) -> sample at t_end``.

    model(x, t, **cond) returns the ``prediction`` ('eps', 'x0'/'sample', 'v', 'score'); t is the
    network's own time input (discrete index units for DDPM models, sigma for VE/EDM) as a float tensor [B]
    (float32, or float64 for float64 states, unless ``time_dtype`` says otherwise).
    ``method`` defaults to "tab3" ("rhoabm2" on a FlowSchedule); ``nfe`` to 10 with a named grid, while a list ``grid`` sets the NFE itself (an
    ``nfe`` that disagrees raises). A ``plan`` (e.g. :func:`deis_fast.load_plan`) or an :class:`OptimizedGrid`
    made for another schedule, method or NFE than the ones given is refused, naming both. The noise must have the
    dtype and device of an ``nn.Module`` model's parameters (outside autocast); otherwise the first call raises.
    The plan is compiled once; the executor has no data-dependent branches and writes every Combine
    into a preallocated slot; after the first call (warm-up) a call allocates nothing but its result
    (nothing at all with ``out=``). ``check_finite`` adds one reduction per NFE (written in place into a
    preallocated buffer) and a single host sync at the end (no per-step syncs) to raise
    :class:`NonFiniteError` naming the first bad step. Under ``torch.compile`` the finite check is skipped.

    ``copy_outputs``: None detects on the first eager call whether the model returns a reused output
    buffer (then its outputs are copied into the workspace); True/False force it. Under torch.compile an
    undetected model is assumed to return fresh tensors (a repeated output object raises).
    ``guidance_scale`` may be a 0-d tensor: it is read at run time (see :class:`ModelAdapter`).
    ``threshold=(ratio, max_value)``: Imagen's dynamic thresholding of the x0 prediction (pixel-space models).
    ``sampler.cuda_graph(example_noise, **cond)`` captures the whole loop in one CUDA graph
    (:class:`deis_fast.graph.CUDAGraphSampler`).

    Sampling runs under ``torch.no_grad()`` whatever the caller's grad mode, so a plain ``nn.Module`` with
    trainable parameters works as is; ``grad=True`` records the whole solve for autograd instead (out-of-place
    combines, e.g. to backpropagate through sampling). ``classifier_grad`` gets grad mode either way.
    """

    def __init__(self, model: Callable[..., torch.Tensor], schedule: Schedule | None = None, method: str | None = None,
                 nfe: int | None = None, grid: GridSpec | None = None, prediction: str = "eps",
                 t_start: float | None = None, t_end: float | None = None, *, options: PlanOptions | None = None,
                 guidance_scale: float | torch.Tensor | None = None, uncond: Mapping[str, Any] | None = None,
                 guidance_rescale: float = 0.0, classifier_grad: Callable[..., torch.Tensor] | None = None,
                 classifier_scale: float = 1.0, check_finite: bool = True, progress: bool = False,
                 time_dtype: torch.dtype | None = None, plan: Plan | None = None, copy_outputs: bool | None = None,
                 calibration_noise: torch.Tensor | None = None, calibration_cond: Mapping[str, Any] | None = None,
                 grad: bool = False, threshold: tuple[float, float] | None = None, **plan_options: Any):
        self.options = PlanOptions.of(options, **plan_options)
        self.grad = bool(grad)
        self.schedule = VPSchedule.discrete("linear") if schedule is None else schedule
        if not isinstance(self.schedule, Schedule):
            raise TypeError(f"schedule must be a deis_fast schedule (VPSchedule / VESchedule), got {type(schedule).__name__}")
        self.optimized_grid = None
        if plan is not None:
            check_plan_for(plan, self.schedule, method, nfe, self.options)
            method = plan.method
        method = default_method(self.schedule) if method is None else method
        self.method = method
        if plan is None and isinstance(grid, str) and grid in MODEL_GRIDS:
            # a grid that needs the model (grid='optimized': registered by deis_fast.tuning.grids)
            self.optimized_grid = grid = MODEL_GRIDS[grid](
                model, self.schedule, method, DEFAULT_NFE if nfe is None else nfe, calibration_noise, t_start, t_end,
                prediction=prediction, options=self.options, **dict(calibration_cond or {}))
            method, self.options = grid.method, PlanOptions.of(self.options, pfdiff=grid.pfdiff)
        check_for = getattr(grid, "check_for", None)  # an OptimizedGrid: made for this schedule, method and NFE?
        if plan is None and callable(check_for):
            nfe = check_for(self.schedule, method, nfe, self.options)
        self.plan = plan if plan is not None else build_plan(self.schedule, method, nfe, grid, t_start, t_end,
                                                             options=self.options)
        self.adapter = ModelAdapter(model, prediction, variance_preserving=self.schedule.variance_preserving,
                                    guidance_scale=guidance_scale, uncond=uncond, guidance_rescale=guidance_rescale,
                                    classifier_grad=classifier_grad, classifier_scale=classifier_scale,
                                    time_dtype=time_dtype, threshold=threshold)
        self.adapter.check_plan(self.plan)
        self.model = model
        self.check_finite = check_finite
        self.progress = progress
        # None until the first eager call has checked whether the model hands back a reused output buffer
        self._copy_outputs: bool | None = copy_outputs
        self._ws: Workspace | None = None
        # VE (alpha = 1): check the noise scale on the first call
        self._scale_checked = not isinstance(self.schedule, VESchedule)
        self._graphs: dict[tuple, Any] = {}
        self._input_checked: tuple | None = None   # (dtype, device) of the noise last checked against the model

    @property
    def nfe(self) -> int:
        return self.plan.nfe

    @property
    def times(self) -> np.ndarray:
        return np.asarray(self.plan.times)

    def __repr__(self) -> str:
        return f"Sampler(method={self.plan.method!r}, nfe={self.nfe}, schedule={self.schedule!r})"

    # --- workspace ----------------------------------------------------------------
    def _workspace(self, x: torch.Tensor, fresh: bool = False) -> "Workspace":
        """The preallocated slots of this (shape, dtype, device, layout); cached unless ``fresh``."""
        key = Workspace.key_of(x)
        if fresh:
            return Workspace(self.plan, self.adapter, x, key)
        if self._ws is None or self._ws.key != key:
            self._ws = Workspace(self.plan, self.adapter, x, key)
        return self._ws

    # --- run ----------------------------------------------------------------------
    def __call__(self, noise: torch.Tensor, generator: Generator = None, step_noise: torch.Tensor | None = None,
                 callback: Callable[[dict[str, Any]], None] | None = None, *, out: torch.Tensor | None = None,
                 guidance_scale: float | torch.Tensor | None = None, known: torch.Tensor | None = None,
                 mask: torch.Tensor | None = None, **cond: Any) -> torch.Tensor:
        """Integrate from ``noise`` (the state at t_start) to t_end and return the result (a new tensor,
        or ``out`` when given; ``out`` may be ``noise`` itself).

        Inpainting: with ``known`` (clean data x0, shaped like the noise) and ``mask`` (broadcastable to it;
        1 = generate, 0 = keep ``known``, diffusers' convention), every state the network sees, and the
        result, has its kept region on the forward process: ``alpha_t * known + sigma_t * z`` with z the
        initial noise of this call.

        Stochastic plans draw their step noise from ``generator`` (one generator, or one per sample so
        that each sample depends only on its own seed) unless ``step_noise`` [num_noise, *noise.shape] is given.
        ``guidance_scale`` overrides the CFG scale for this call.
        """
        check_noise(noise)
        if self._input_checked != (noise.dtype, noise.device) and not torch.compiler.is_compiling():
            check_model_input(self.model, noise)
            self._input_checked = (noise.dtype, noise.device)
        if not self._scale_checked and not torch.compiler.is_compiling():
            self._scale_checked = True
            _check_noise_scale(self.schedule, self.plan, noise)
        try:
            if self.grad:
                with torch.enable_grad():
                    return self._call_grad(noise, generator, step_noise, callback, out, guidance_scale, cond, known,
                                           mask)
            with torch.no_grad():
                return self._call(noise, generator, step_noise, callback, out, guidance_scale, cond, known, mask)
        except RuntimeError as e:   # the network's first layer refused the noise: say so in the noise's terms
            msg = channel_mismatch(e, noise)
            if msg is None:
                raise
            raise ValueError(msg) from e

    def _call_grad(self, noise, generator, step_noise, callback, out, guidance_scale, cond, known=None,
                   mask=None) -> torch.Tensor:
        """The autograd-recording run: a fresh workspace, combines out of place (nothing the graph saved is
        overwritten), the finite check on detached values."""
        ws = self._workspace(noise, fresh=True)
        step_noise = self._step_noise(ws, noise, generator, step_noise)
        inpaint = inpaint_args(known, mask, noise, noise, self.schedule, self.plan)
        x = self.run(noise, ws, cond, step_noise, self.check_finite, callback, self.progress, guidance_scale, inpaint,
                     grad=True)
        if self.check_finite:
            finish_finite_check(self.plan, ws, x)
        if out is not None:
            check_out(out, noise)
            return out.copy_(x)
        return x

    def _call(self, noise, generator, step_noise, callback, out, guidance_scale, cond, known=None,
              mask=None) -> torch.Tensor:
        compiling = torch.compiler.is_compiling()
        # under torch.compile the workspace is local to the traced call (graph intermediates: no mutated
        # inputs, so mode="reduce-overhead" can cudagraph it)
        ws = self._workspace(noise, fresh=compiling)
        step_noise = self._step_noise(ws, noise, generator, step_noise)
        if out is None:
            x = noise.clone()
        else:
            check_out(out, noise)
            x = out if out is noise else out.copy_(noise)
        check = self.check_finite and not compiling
        inpaint = inpaint_args(known, mask, noise, x, self.schedule, self.plan)
        self.run(x, ws, cond, step_noise, check, callback, self.progress and not compiling, guidance_scale, inpaint)
        if check:
            finish_finite_check(self.plan, ws, x)
        return x

    def _step_noise(self, ws: "Workspace", like: torch.Tensor, generator: Generator,
                    step_noise: torch.Tensor | None) -> list[torch.Tensor] | None:
        """The per-draw noise views for one call (the workspace's buffer, filled in place, unless given)."""
        plan = self.plan
        if not plan.num_noise:
            return None
        if step_noise is not None:
            if tuple(step_noise.shape) != (plan.num_noise,) + tuple(like.shape):
                raise ValueError(f"step_noise must have shape {(plan.num_noise,) + tuple(like.shape)}, "
                                 f"got {tuple(step_noise.shape)}")
            return list(step_noise.unbind())
        ws.draw_noise(generator)
        return ws.z_views

    def run(self, x: torch.Tensor, ws: Workspace, cond: Mapping[str, Any],
            step_noise: Sequence[torch.Tensor] | None, check_finite: bool,
            callback: Callable[[dict[str, Any]], None] | None = None, progress: bool = False,
            guidance: float | torch.Tensor | None = None, inpaint: Inpaint | None = None,
            grad: bool = False) -> torch.Tensor:
        """Run the whole plan on ``x`` with workspace ``ws`` (in place, or out of place with ``grad``) through
        :func:`deis_fast.core.executor.run_plan`; the first eager call also detects models that hand back a reused
        output buffer. Used by ``__call__`` and by the CUDA-graph sampler."""
        adapter = self.adapter
        pcond = adapter.prepare_cond(cond)
        times = ws.times
        if adapter.guided:
            def evaluate(xs: torch.Tensor, op: Eval, k: int, buf: torch.Tensor | None) -> torch.Tensor:
                return adapter(xs, op, times[k], pcond, buf, ws.xx, ws.times2[k], guidance, cond)
        else:
            def evaluate(xs: torch.Tensor, op: Eval, k: int, buf: torch.Tensor | None) -> torch.Tensor:
                return adapter(xs, op, times[k], pcond, buf)
        slots = [x] + ([None] * (len(ws.bufs) - 1) if grad else list(ws.bufs[1:]))
        kw = dict(bufs=None if grad else ws.bufs, step_noise=step_noise, finite=ws if check_finite else None,
                  in_place=not grad, callback=callback, progress=progress, inpaint=inpaint)
        if self._copy_outputs is None and not grad and not torch.compiler.is_compiling():
            # first call: copy model outputs and keep the originals alive, so that two outputs sharing
            # storage prove the model reuses a static buffer (then we must keep copying)
            raw: list[torch.Tensor] = []
            out = run_plan(self.plan, slots, evaluate, copy_outputs=True, keep=raw, **kw)
            ptrs = [r.untyped_storage().data_ptr() for r in raw]
            self._copy_outputs = len(set(ptrs)) < len(ptrs)
            return out
        return run_plan(self.plan, slots, evaluate, copy_outputs=bool(self._copy_outputs), **kw)

    def cuda_graph(self, example_noise: torch.Tensor, *, enabled: bool | None = None,
                   check_finite: bool | None = None, **example_cond: Any):
        """A :class:`deis_fast.graph.CUDAGraphSampler` for noise like ``example_noise`` (and conditioning
        like ``example_cond``), cached per (shape, dtype, device, layout, plan, conditioning shapes).
        Falls back to eager when not on CUDA or when ``DEIS_FAST_CUDA_GRAPH=0`` (or ``enabled=False``)."""
        key = (Workspace.key_of(example_noise), id(self.plan), enabled, check_finite,
               cond_signature(example_cond))
        g = self._graphs.get(key)
        if g is None:
            g = self._graphs[key] = CUDAGraphSampler(self, example_noise, enabled=enabled,
                                                     check_finite=check_finite, **example_cond)
        return g


def plan_label(method: str, options: PlanOptions | None = None) -> str:
    """The ``Plan.method`` that :func:`build_plan` gives ``method`` with ``options`` (e.g. "pfdiff21:ddim")."""
    spec, o = resolve(method, options)
    return spec.name if o.pfdiff is None else f"pfdiff{o.pfdiff[0]}{o.pfdiff[1]}:{spec.name}"


def check_plan_for(plan: Plan, schedule: Schedule, method: str | None = None, nfe: int | None = None,
                   options: PlanOptions | None = None) -> None:
    """Refuse a given ``plan`` built for another schedule, or for another method or NFE than those given (None: not
    given), with a ValueError naming both."""
    fp = schedule_fingerprint(schedule)
    if plan.schedule_id and plan.schedule_id != fp:
        raise ValueError(f"the plan was built for another schedule (fingerprint {plan.schedule_id}) than the "
                         f"sampler's {schedule!r} (fingerprint {fp}); pass the schedule the plan was made with")
    if nfe is not None and nfe != plan.nfe:
        raise ValueError(f"the plan makes {plan.nfe} network calls but nfe={nfe} was asked for; drop nfe=")
    base = plan.method[len("learned:"):] if plan.method.startswith("learned:") else plan.method
    if method is not None and plan_label(method, options) != base.split("(")[0]:
        raise ValueError(f"the plan is a {plan.method!r} plan but method={method!r} was asked for; drop method= "
                         "or pass the plan's")


def check_model_input(model: Any, noise: torch.Tensor) -> None:
    """One clear error when ``noise`` has another dtype or device than an ``nn.Module`` model's parameters (torch
    would stop inside the network with 'Input type ... and bias type ... should be the same'), or another channel
    count than the model's declared ``in_channels`` (a ValueError; other models: :func:`channel_mismatch`)."""
    params = getattr(model, "parameters", None)
    if not isinstance(model, torch.nn.Module) or not callable(params):
        return
    c = _in_channels(model)
    if c is not None and noise.ndim >= 3 and noise.shape[1] != c:
        raise ValueError(f"the noise has shape {tuple(noise.shape)} ({noise.shape[1]} channels) but the model takes "
                         f"{c} channels (its in_channels): draw noise of shape "
                         f"{(noise.shape[0], c) + tuple(noise.shape[2:])}")
    p = next(iter(model.parameters()), None)
    if p is None or torch.is_autocast_enabled(noise.device.type):
        return
    if p.dtype != noise.dtype or p.device != noise.device:
        raise TypeError(f"the noise is {noise.dtype} on {noise.device} but the model's parameters are {p.dtype} on "
                        f"{p.device}: pass noise.to({p.device.type!r}, {p.dtype}) (or move the model)")


def _in_channels(model: Any) -> int | None:
    """The input channels an ``nn.Module`` model declares (diffusers' ``config.in_channels``, an ``in_channels``
    attribute); None when it declares none."""
    if not isinstance(model, torch.nn.Module):
        return None
    cfg = getattr(model, "config", None)
    c = cfg.get("in_channels") if isinstance(cfg, Mapping) else getattr(cfg, "in_channels", None)
    c = getattr(model, "in_channels", None) if c is None else c
    return c if isinstance(c, int) and not isinstance(c, bool) else None


def channel_mismatch(err: BaseException, noise: torch.Tensor) -> str | None:
    """The message for torch's convolution error on noise with the wrong channel count (None for any other error)."""
    import re
    m = re.search(r"expected input\[([\d, ]*)\] to have (\d+) channels, but got (\d+) channels", str(err))
    if m is None or noise.ndim < 3:
        return None
    got = tuple(int(v) for v in m.group(1).split(","))
    if got[1:] != tuple(noise.shape[1:]):   # a layer inside the network, not the noise itself: not ours to explain
        return None
    want = int(m.group(2))
    return (f"the noise has shape {tuple(noise.shape)} ({noise.shape[1]} channels) but the model's input "
            f"convolution takes {want} channels: draw noise of shape {(noise.shape[0], want) + tuple(noise.shape[2:])} "
            f"(torch: {str(err).splitlines()[0]})")


def _check_noise_scale(schedule: Schedule, plan: Plan, noise: torch.Tensor) -> None:
    """VE states at t_start are sigma_start-scaled noise; unit noise silently gives a wrong sample, so say so."""
    sigma0 = float(schedule.rho(plan.times[0]))
    if sigma0 > 2.0 and noise.numel() >= 16:
        std = float(noise.detach().float().std())
        if std < 0.25 * sigma0:
            warnings.warn(f"the noise has std {std:.3g} but a VE sample starts at sigma={sigma0:.4g}: scale unit "
                          f"noise by the start sigma (noise * {sigma0:.4g}), as in k-diffusion's "
                          "randn(...) * sigmas[0]", stacklevel=3)


def sample(model: Callable[..., torch.Tensor], noise: torch.Tensor, schedule: Schedule | None = None,
           method: str | None = None, nfe: int | None = None, grid: GridSpec | None = None, prediction: str = "eps",
           t_start: float | None = None, t_end: float | None = None, generator: Generator = None,
           model_kwargs: Mapping[str, Any] | None = None, known: torch.Tensor | None = None,
           mask: torch.Tensor | None = None, **options: Any) -> torch.Tensor:
    """One-shot sampling: ``Sampler(model, ...)(noise)``; returns the state at t_end.

    ``nfe``: 10 with a named grid; a list ``grid`` sets it. ``known``/``mask`` inpaint (see :meth:`Sampler.__call__`);
    with an explicit grid, ``t_start`` starts
    in the middle of it (img2img: ``noise`` is then the noised image at t_start, see :func:`build_plan`).
    ``options`` are :class:`Sampler` keyword options (eta, lower_order_final, pfdiff, guidance_scale, ...).
    """
    s = Sampler(model, schedule, method, nfe, grid, prediction, t_start, t_end, **options)
    return s(noise, generator=generator, known=known, mask=mask, **dict(model_kwargs or {}))
