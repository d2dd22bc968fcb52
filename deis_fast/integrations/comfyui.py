"""deis_fast inside ComfyUI: a SAMPLER node, a SIGMAS node, and entries on the plain KSampler lists.

Thin glue over :mod:`deis_fast.integrations.k_diffusion`: every sampler here is ``sample_deis_fast`` with the
model's own schedule read from ComfyUI's ``model_sampling`` (so tAB is a polynomial in a DDPM model's own time),
ComfyUI's seed (``extra_args["seed"]``), ComfyUI's callback convention and PFDiff steps counted as network calls.
ComfyUI's guider does classifier-free guidance inside the denoiser it hands over, so deis_fast's own guidance
stays off.

Loading: ComfyUI imports ``custom_nodes/<folder>/__init__.py`` and reads its ``NODE_CLASS_MAPPINGS``; the repo's
``comfyui_node/__init__.py`` is that file (see the README, "ComfyUI"), or write one with
``python -m deis_fast.integrations.comfyui install /path/to/ComfyUI``. Importing this module needs ComfyUI's
``comfy`` package only when :func:`register` runs or a node executes.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
from typing import Any, Callable

import numpy as np
import torch

from ..core.grids import make_grid
from ..core.schedules import FlowSchedule, Schedule, VESchedule, VPSchedule
from ..solvers import PlanOptions, default_method, resolve
from ..solvers.build import builder_options
from ..solvers.pfdiff import check_kh
from . import k_diffusion as dk

__all__ = ["AUTO", "auto_method", "KSAMPLER_ENTRIES", "SCHEDULER_ENTRIES", "NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS",
           "DeisFastSampler", "DeisFastScheduler", "model_schedule", "sampler_function", "sigmas_for", "tuned_sigmas",
           "tuned_steps", "register", "install", "digits_model",
           "flow_mixture_model"]

PREFIX = "deis_fast_"
# the entries on the KSampler sampler list: name -> (method, options). rhoab3 is ipndm_v (bit-identical plans): one
# entry, deis_fast_ipndm_v (ComfyUI's own ipndm_v is its peer); ComfyUI validates a saved workflow's sampler_name
# against this list, so a workflow saved with deis_fast_rhoab3 needs deis_fast_ipndm_v (docs/comfyui.md)
KSAMPLER_ENTRIES: dict[str, tuple[str, dict]] = {
    PREFIX + "tab3": ("tab3", {}),
    PREFIX + "tab3_pc": ("tab3", {"corrector": True}),
    PREFIX + "tab2": ("tab2", {}),
    PREFIX + "rhoabm2": ("rhoabm2", {}),
    PREFIX + "logrho3": ("logrho3", {}),
    PREFIX + "ipndm4": ("ipndm4", {}),
    PREFIX + "ipndm_v": ("ipndm_v", {}),
    PREFIX + "dpmpp2": ("dpmpp2", {}),
    PREFIX + "dpmpp3": ("dpmpp3", {}),
    PREFIX + "unipc2": ("unipc2", {}),
    PREFIX + "unipc3": ("unipc3", {}),
    PREFIX + "pfdiff": ("pfdiff", {}),
    PREFIX + "ddim": ("ddim", {}),
    PREFIX + "ddim_eta": ("ddim_eta", {"eta": 1.0}),
    PREFIX + "dpmpp_2m_sde": ("dpmpp_2m_sde", {}),
    PREFIX + "dpmpp_3m_sde": ("dpmpp_3m_sde", {}),
    PREFIX + "rho_heun": ("rho_heun", {}),
}
# the entries on the KSampler scheduler list: name -> deis_fast grid
SCHEDULER_ENTRIES: dict[str, str] = {PREFIX + g: g for g in ("time_quadratic", "time_uniform", "logsnr", "karras",
                                                             "ays", "kl_optimal")}
NODE_GRIDS = ("time_quadratic", "time_uniform", "logsnr", "karras", "ays", "kl_optimal", "beta", "optimized (file)")
# "auto": the library's default for the model the node samples, read from its model_sampling when it samples:
# rhoabm2 on flow (CONST) models, tab3 otherwise (deis_fast.solvers.default_method)
AUTO = "auto"
AUTO_METHODS = ("tab3", "rhoabm2")
NODE_METHODS = (AUTO, "tab3", "tab2", "tab1", "rhoabm2", "logrho3", "ipndm4", "ipndm_v", "dpmpp2", "dpmpp3", "dpmpp_2m",
                "unipc2", "unipc3", "pfdiff", "ddim", "ddim_eta", "dpmpp_2m_sde", "dpmpp_3m_sde", "rho_heun",
                "rho_rk4")
VARIANTS = ("default", "bh1", "bh2", "midpoint", "heun")


class DeisFastInputError(ValueError):
    """A node input that does not fit; the message names the node and the input, as ComfyUI's UI shows them."""


# ----------------------------------------------------------------------------- the model's schedule


def model_schedule(model_sampling: Any) -> tuple[str, Schedule | None]:
    """(model_type, schedule) for :func:`deis_fast.integrations.k_diffusion.sample_deis_fast` from a ComfyUI
    ``model_sampling``: a discrete-time eps / v model (``ModelSamplingDiscrete``) -> ("eps", the VP schedule of its
    sigmas table); CONST (flow) -> ("const", FlowSchedule with its shift); EDM and continuous-sigma models ->
    ("eps", None): solved in sigma (VE)."""
    import comfy.model_sampling as ms
    if isinstance(model_sampling, ms.CONST):
        if isinstance(model_sampling, getattr(ms, "ModelSamplingFlux", ())):
            return "const", FlowSchedule(mu=float(model_sampling.shift), time_scale=1.0)
        return "const", FlowSchedule(shift=float(getattr(model_sampling, "shift", 1.0)), time_scale=1.0)
    if isinstance(model_sampling, ms.ModelSamplingDiscrete) and not isinstance(
            model_sampling, ms.ModelSamplingDiscreteEDM) and isinstance(model_sampling, ms.EPS) \
            and not isinstance(model_sampling, ms.EDM):
        return "eps", _vp_of(model_sampling)
    return "eps", None


_VP_CACHE: dict[tuple, VPSchedule] = {}


def _vp_of(model_sampling: Any) -> VPSchedule:
    """The VP schedule of a discrete model's sigma table: the DDPM beta preset (diffusers' names) whose sigmas
    rounded to float32 are exactly the table, else the table itself (:func:`vp_schedule_from_sigmas`). ComfyUI
    keeps its float64 schedule as float32 sigmas; the preset is that schedule, the one deis_fast, its diffusers
    scheduler and ``deis-fast tune`` use, so a file tuned there is tuned for this model."""
    sig32 = model_sampling.sigmas.detach().to("cpu", torch.float32)
    sig = sig32.double()
    lo, hi = (getattr(model_sampling, k, None) for k in ("linear_start", "linear_end"))
    key = (sig.numel(), float(sig[0]), float(sig[-1]), float(sig.sum()), lo, hi)
    if key not in _VP_CACHE:
        _VP_CACHE[key] = _preset_of(sig32, lo, hi) or dk.vp_schedule_from_sigmas(sig, name="comfyui")
    return _VP_CACHE[key]


def _preset_of(sig32: torch.Tensor, lo: Any, hi: Any) -> VPSchedule | None:
    n = sig32.numel()
    steps = np.arange(n, dtype=np.float64)
    for preset in ("linear", "scaled_linear", "squaredcos_cap_v2"):  # ComfyUI's "sqrt_linear", "linear", ...
        if preset != "squaredcos_cap_v2" and not (isinstance(lo, float) and isinstance(hi, float)):
            continue
        try:
            vp = VPSchedule.discrete(preset, n, lo, hi)
        except ValueError:
            continue
        if torch.equal(torch.from_numpy(vp.rho(steps)).float(), sig32):
            return vp
    return None


def _model_sampling_of(model: Any) -> Any:
    """The model_sampling behind the denoiser ComfyUI hands a sampler (KSamplerX0Inpaint -> guider -> model)."""
    guider = model.inner_model
    patcher = getattr(guider, "model_patcher", None)
    if patcher is not None:
        return patcher.get_model_object("model_sampling")
    return guider.inner_model.model_sampling


# ----------------------------------------------------------------------------- samplers


def sampler_function(method: str, **options: Any) -> Callable[..., torch.Tensor]:
    """A k-diffusion sampler function (ComfyUI's ``sample_<name>`` signature) running deis_fast ``method`` in the
    model's own schedule. PFDiff counts the sigmas' steps as network calls unless ``pfdiff_steps="base grid"``.
    ``tuned_file``: a deis_fast tuned file run through ``sample_deis_fast(..., tuned=...)``, checked against the
    model's schedule, the method and the steps (refusals as :class:`DeisFastInputError` in the nodes' terms)."""
    opts = dict(options)
    pfdiff_steps = opts.pop("pfdiff_steps", "calls")
    tuned_file = opts.pop("tuned_file", "") or ""
    node = opts.pop("node", "DEIS-fast Sampler")
    if method == AUTO and tuned_file:  # a tuned file fixes the method: the file's own (PFDiff's k and h with it)
        method, opts = _tuned_node_method(tuned_file, opts)
    if method == AUTO:
        _check_auto_options(opts)
    else:
        _check_options(method, opts)
    if tuned_file:
        _check_tuned_method(tuned_file, method, opts)
    given = method

    def sample(model, x, sigmas, extra_args=None, callback=None, disable=None, **kw):
        model_type, schedule = model_schedule(_model_sampling_of(model))
        method = auto_method(model_type, schedule) if given == AUTO else given
        run = {**opts, **kw}
        if not tuned_file:
            schedule = _in_range(schedule, sigmas)
        if tuned_file:
            return _sample_tuned(tuned_file, model, x, sigmas, extra_args, callback, disable, method, model_type,
                                 schedule, pfdiff_steps, run)
        grid = "given"
        if resolve(method, PlanOptions(pfdiff=run.get("pfdiff")))[1].pfdiff is not None:
            grid = "resample" if pfdiff_steps == "calls" else "given"
            if grid == "given":
                _check_pfdiff_steps(len(sigmas) - 1, method, run)
        try:
            return dk.sample_deis_fast(model, x, sigmas, extra_args=extra_args, callback=callback, disable=disable,
                                       method=method, model_type=model_type, schedule=schedule, pfdiff_grid=grid,
                                       **run)
        except DeisFastInputError:
            raise
        except ValueError as e:   # in the node's terms: which node, the SIGMAS it got
            raise DeisFastInputError(
                f"{node}: {e} (the SIGMAS: {len(sigmas) - 1} steps from {float(sigmas[0]):.6g} to "
                f"{float(sigmas[-1]):.6g}; check the scheduler node and its steps / denoise)") from None
    sample.__name__ = f"sample_{PREFIX}{method}"
    sample.__doc__ = f"deis_fast {method} {opts or ''} in the model's own schedule (deis_fast.integrations.comfyui)"
    return sample


def _in_range(schedule: Schedule | None, sigmas: Any) -> Schedule | None:
    """The model's VP schedule, or None (solve in sigma, as k-diffusion and ComfyUI's own samplers do) when the
    SIGMAS' positive values leave its sigma table: ComfyUI's uni_pc writes 0.001 into them, a KarrasScheduler may end
    at sigma_min 0.002, below a DDPM model's smallest sigma (there the model's time does not exist; ComfyUI's model
    rounds such a sigma to its first training step, as it does for every sampler)."""
    if not isinstance(schedule, VPSchedule):
        return schedule
    s = dk._to_numpy(sigmas)
    positive = s[s > 0]
    if positive.size and float(positive.min()) < schedule.rho_min * (1 - 1e-6):
        return None
    return schedule


def auto_method(model_type: str, schedule: Schedule | None) -> str:
    """The method "auto" runs on a model (:func:`model_schedule`'s output): deis_fast's default for its schedule,
    rhoabm2 on flow (CONST) models, tab3 on discrete and EDM / continuous-sigma models."""
    return default_method(schedule if model_type == "const" else None)


def _check_auto_options(opts: dict) -> None:
    """Method "auto" runs tab3 or rhoabm2 (known only when it samples): an option must fit both."""
    for m in AUTO_METHODS:
        try:
            _check_options(m, opts)
        except ValueError as e:
            raise DeisFastInputError(f"DEIS-fast Sampler: method auto runs {' or '.join(AUTO_METHODS)} (by the "
                                     f"model); {e}. Pick the method, or set that input to its default") from None


def _tuned_node_method(path: str, opts: dict) -> tuple[str, dict]:
    """Method "auto" with a tuned file: the file's method, and PFDiff's (k, h) for a PFDiff file."""
    t = _load_tuned(path, "DEIS-fast Sampler")
    kh = t.plan_options.get("pfdiff")
    return _node_method(t), ({**opts, "pfdiff": tuple(kh)} if kh else opts)


# ----------------------------------------------------------------------------- tuned files (deis_fast.tuning)


def _load_tuned(path: str, node: str) -> Any:
    from ..tuning.files import TunedFileError, load_tuned
    try:
        return load_tuned(path)
    except TunedFileError as e:
        raise DeisFastInputError(f"{node}: tuned_file: {e} (a JSON written by deis_fast.tuning.tune / deis-fast "
                                 "tune)") from None


def _node_method(t: Any) -> str:
    """The Sampler node's method for a tuned file: pfdiff for a PFDiff plan (its base method is the file's)."""
    return "pfdiff" if t.options.get("pfdiff") else t.method


def _check_tuned_method(path: str, method: str, opts: dict) -> None:
    """A tuned file fixes the method and its options: refuse a Sampler node set otherwise, in the node's terms."""
    t = _load_tuned(path, "DEIS-fast Sampler")
    want = _node_method(t)
    fo = t.plan_options
    kh = fo.get("pfdiff")
    mine = opts.get("pfdiff")
    pf = f", pfdiff_k {kh[0]}, pfdiff_h {kh[1]}" if kh else ""
    base = resolve(method, PlanOptions(pfdiff=mine))[0].name
    if base != resolve(t.method)[0].name or bool(mine) != bool(kh) or (kh and tuple(mine) != tuple(kh)):
        have = f"{method}, pfdiff_k {mine[0]}, pfdiff_h {mine[1]}" if mine else method
        raise DeisFastInputError(f"DEIS-fast Sampler: tuned_file {path} was tuned for {want}{pf}"
                                 f"{' (base ' + t.method + ')' if kh else ''}, not {have}: set method to {want}{pf}, "
                                 "or clear tuned_file")
    for key, widget, default in (("corrector", "corrector", "default"), ("variant", "variant", "default"),
                                 ("lower_order_final", "lower_order_final", "auto")):
        if key in opts and opts[key] != fo.get(key):
            raise DeisFastInputError(f"DEIS-fast Sampler: tuned_file {path} fixes {widget} (the file: "
                                     f"{fo.get(key, 'the method default')!r}): set {widget} to {default!r}")


def tuned_steps(t: Any, pfdiff_steps: str = "calls") -> int:
    """The scheduler steps (SIGMAS length - 1) the Sampler node runs a tuned file on."""
    spec, po = resolve(t.method, PlanOptions.of(**t.plan_options))
    if po.pfdiff is not None:
        return t.nfe if pfdiff_steps == "calls" else len(t.grid) - 1
    return len(t.grid) if spec.family == "rk" else len(t.grid) - 1


def _as_solved(t: Any, model_type: str, schedule: Schedule | None, model_sampling: Any) -> Any:
    """A flow file tuned in the network's own time (ComfyUI's ``multiplier``: ``deis-fast tune --model flow``'s
    time scale 1000) holds the same grid in the node's time (sigma in [0, 1]): it is that file, for the node's
    schedule. A learned plan keeps the network times it was fitted at, so it is left to be refused."""
    from ..core.schedules import schedule_fingerprint
    scale = float(getattr(model_sampling, "multiplier", 1.0))
    if model_type != "const" or schedule is None or t.kind == "plan" or scale == 1.0:
        return t
    own = schedule.with_time_scale(scale)
    if schedule_fingerprint(own) != t.schedule_fingerprint:
        return t
    return dataclasses.replace(t, schedule_fingerprint=schedule_fingerprint(schedule), schedule=repr(schedule))


def _check_tuned_schedule(t: Any, path: str, node: str, model_type: str, schedule: Schedule | None) -> None:
    if schedule is None:   # EDM / continuous-sigma models: sample_deis_fast checks the VE range of the sigmas
        return
    from ..core.schedules import schedule_fingerprint
    fp = schedule_fingerprint(schedule)
    if fp != t.schedule_fingerprint:
        kind = "flow (CONST) model" if model_type == "const" else "discrete (DDPM) model"
        raise DeisFastInputError(
            f"{node}: tuned_file {path} was tuned for another model schedule: the file's is {t.schedule} "
            f"(fingerprint {t.schedule_fingerprint}), this MODEL is a {kind} with {schedule!r} (fingerprint {fp}). "
            "Load the model the file was tuned for, or tune this one: deis_fast.tuning.tune(model, "
            "deis_fast.integrations.comfyui.model_schedule(model_sampling)[1], ...) or deis-fast tune")


def _sample_tuned(path, model, x, sigmas, extra_args, callback, disable, method, model_type, schedule, pfdiff_steps,
                  run) -> torch.Tensor:
    """The Sampler node with a tuned file: sample_deis_fast(..., tuned=path), its refusals in the node's terms."""
    from ..tuning.files import TunedMismatchError
    t = _as_solved(_load_tuned(path, "DEIS-fast Sampler"), model_type, schedule, _model_sampling_of(model))
    _check_tuned_schedule(t, path, "DEIS-fast Sampler", model_type, schedule)
    grid = "resample" if method == "pfdiff" and pfdiff_steps == "calls" else "given"
    try:
        return dk.sample_deis_fast(model, x, sigmas, extra_args=extra_args, callback=callback, disable=disable,
                                   method=method, model_type=model_type, schedule=schedule, pfdiff_grid=grid,
                                   tuned=t, **run)
    except TunedMismatchError as e:
        steps, need = len(sigmas) - 1, tuned_steps(t, pfdiff_steps)
        if "NFE" in str(e):
            raise DeisFastInputError(
                f"DEIS-fast Sampler: tuned_file {path} is for {t.nfe} network calls ({_node_method(t)}); the SIGMAS "
                f"have {steps} steps, it needs {need}: set the scheduler's steps to {need}, or give the DEIS-fast "
                "Scheduler the same tuned_file") from None
        if "whole grid" in str(e):
            raise DeisFastInputError(
                f"DEIS-fast Sampler: tuned_file {path} samples its whole grid, from the model's largest sigma to the "
                f"end; these SIGMAS run from {float(sigmas[0]):.6g} to {float(sigmas[-1]):.6g}: set denoise to 1.0 "
                "(and start / end steps to the whole run), or clear tuned_file") from None
        raise DeisFastInputError(f"DEIS-fast Sampler: tuned_file {path}: {e}") from None


def tuned_sigmas(model_sampling: Any, path: str, pfdiff_steps: str = "calls") -> torch.Tensor:
    """ComfyUI SIGMAS of a tuned file on a model (checked against its schedule): the sigmas of the tuned grid
    where the plan calls the network, then 0 (Runge-Kutta: every grid time, then 0; PFDiff with ``pfdiff_steps``
    'base grid': its base grid), the list the Sampler node with the same file runs on."""
    model_type, schedule = model_schedule(model_sampling)
    t = _as_solved(_load_tuned(path, "DEIS-fast Scheduler"), model_type, schedule, model_sampling)
    if schedule is None:
        raise DeisFastInputError("DEIS-fast Scheduler: tuned_file needs a discrete (DDPM) or flow (CONST) model; "
                                 "for this MODEL (solved in sigma) use a karras SIGMAS with steps = the file's NFE and "
                                 "the tuned_file on the DEIS-fast Sampler")
    _check_tuned_schedule(t, path, "DEIS-fast Scheduler", model_type, schedule)
    plan = t.make_plan(schedule, check=False)
    sig = _plan_sigmas(plan, t.method, t.plan_options, model_type, schedule, pfdiff_steps)
    if sig.size - 1 != tuned_steps(t, pfdiff_steps):
        raise DeisFastInputError(f"DEIS-fast Scheduler: tuned_file {path}: no SIGMAS for {t.method} on a "
                                 f"{'flow' if model_type == 'const' else 'discrete'} model's grid ending at 0")
    return torch.from_numpy(np.ascontiguousarray(sig)).float()


def _check_options(method: str, opts: dict) -> None:
    """Refuse options that do not apply, with the deis_fast reason, before any sampling."""
    spec, po = resolve(method, PlanOptions.of(**opts))
    if po.pfdiff is not None:
        check_kh(po.pfdiff)
    else:
        builder_options(spec, po)


def _check_pfdiff_steps(steps: int, method: str, opts: dict) -> None:
    po = resolve(method, PlanOptions(pfdiff=opts.get("pfdiff")))[1]
    k, h = check_kh(po.pfdiff)
    if steps < 1 or (steps + k) % (k + 1):
        lo = max((steps + k) // (k + 1), 1)
        raise DeisFastInputError(
            f"DEIS-fast Sampler: PFDiff-({k},{h}) with pfdiff_steps 'base grid' needs {k + 1}N-{k} scheduler steps "
            f"for N network calls; the SIGMAS have {steps} steps. Set the scheduler's steps to "
            f"{lo * (k + 1) - k} or {(lo + 1) * (k + 1) - k}, or pfdiff_steps to 'calls' (steps = network calls)")


# ----------------------------------------------------------------------------- sigmas


def sigmas_for(model_sampling: Any, grid: str, steps: int, denoise: float = 1.0, grid_file: str = "",
               method: str = "", karras_rho: float = 7.0) -> torch.Tensor:
    """ComfyUI SIGMAS (decreasing, ending in 0, ``steps`` + 1 values; float32) of a deis_fast grid on the model's
    own schedule and range: time_quadratic / time_uniform / logsnr / karras / ays / kl_optimal / beta, or
    "optimized (file)": a grid saved by :func:`deis_fast.save_grid` (``grid_file``; the entry for ``method`` and
    ``steps``). ``denoise`` < 1 keeps the last ``steps`` steps of a longer list, as ComfyUI's BasicScheduler."""
    steps = int(steps)
    if steps < 1:
        raise DeisFastInputError(f"DEIS-fast Scheduler: steps must be >= 1, got {steps}")
    if not 0.0 < denoise <= 1.0:
        if denoise <= 0.0:
            return torch.FloatTensor([])
        raise DeisFastInputError(f"DEIS-fast Scheduler: denoise must be in (0, 1], got {denoise}")
    total = steps if denoise >= 0.9999 else int(steps / denoise)
    model_type, schedule = model_schedule(model_sampling)
    if grid == "optimized (file)":
        sig = _sigmas_from_file(model_type, schedule, model_sampling, grid_file, method, total)
    else:
        sig = _named_sigmas(model_type, schedule, model_sampling, grid, total, karras_rho)
    return torch.from_numpy(np.ascontiguousarray(sig[-(steps + 1):])).float()


def _solver_schedule(model_type: str, schedule: Schedule | None, model_sampling: Any) -> Schedule:
    if schedule is not None:
        return schedule
    return VESchedule(float(model_sampling.sigma_min), float(model_sampling.sigma_max))


def _to_sigmas(model_type: str, sched: Schedule, t: np.ndarray) -> np.ndarray:
    return t.copy() if model_type == "const" else sched.rho(t)


def _named_sigmas(model_type: str, schedule: Schedule | None, model_sampling: Any, grid: str, steps: int,
                  karras_rho: float) -> np.ndarray:
    if grid not in NODE_GRIDS:
        raise DeisFastInputError(f"DEIS-fast Scheduler: unknown grid {grid!r}; choose one of {', '.join(NODE_GRIDS)}")
    sched = _solver_schedule(model_type, schedule, model_sampling)
    if model_type == "const":  # flow: t from the model's sigma_max (1) to 0, shifted as the model is
        t = make_grid(sched, grid, steps, float(model_sampling.sigma_max), 0.0, karras_rho=karras_rho)
        return t
    # VP / VE: steps - 1 steps from sigma_max to sigma_min, then 0 (as ComfyUI's karras / exponential)
    if steps == 1:
        return np.array([float(sched.rho(sched.t_max)), 0.0])
    t = make_grid(sched, grid, steps - 1, karras_rho=karras_rho)
    return np.append(_to_sigmas(model_type, sched, t), 0.0)


def _read_grid_file(path: str) -> dict:
    """The entries of a deis_fast.save_grid JSON, each an OptimizedGrid; a bad file as DeisFastInputError naming the
    node, the input and the remedy."""
    from ..tuning.grids import OptimizedGrid
    where = f"DEIS-fast Scheduler: grid_file {path!r}"
    remedy = ("set grid_file to a JSON written by deis_fast.save_grid (or deis_fast.optimize_grid(..., ) then "
              "save_grid), or choose another grid than 'optimized (file)'")
    if not path or not os.path.isfile(path):
        raise DeisFastInputError(f"DEIS-fast Scheduler: grid 'optimized (file)' needs grid_file, the path of a JSON "
                                 f"written by deis_fast.save_grid; got {path!r}" + (" (no such file)" if path else ""))
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise DeisFastInputError(f"{where} is not readable JSON ({e}): {remedy}") from None
    try:
        if not isinstance(data, dict) or not data:
            raise TypeError("not a non-empty object of grids")
        grids = {k: OptimizedGrid.from_json(v) for k, v in data.items()}
        for g in grids.values():
            t = np.asarray(g.times, dtype=np.float64)
            if t.ndim != 1 or t.size < 2 or not np.all(np.isfinite(t)) or np.any(np.diff(t) >= 0):
                raise ValueError(f"grid {g.method} NFE {g.nfe}: times must be >= 2 finite decreasing numbers")
    except (TypeError, ValueError, AttributeError, KeyError) as e:
        raise DeisFastInputError(f"{where} does not hold deis_fast.save_grid grids ({e}): {remedy}") from None
    return grids


def _fingerprint_fits(fp: str, model_type: str, schedule: Schedule, model_sampling: Any) -> bool:
    """Whether a grid made for the schedule ``fp`` is for this model as the node solves it: its schedule, or for a
    flow model the same shift in the network's own time (ComfyUI's ``multiplier``; the times are the same)."""
    from ..core.schedules import schedule_fingerprint
    if fp == schedule_fingerprint(schedule):
        return True
    scale = float(getattr(model_sampling, "multiplier", 1.0))
    return model_type == "const" and isinstance(schedule, FlowSchedule) and scale != 1.0 and \
        fp == schedule_fingerprint(FlowSchedule(schedule.shift, time_scale=scale, mu=schedule.mu))


def _plan_sigmas(plan: Any, method: str, options: dict, model_type: str, sched: Schedule,
                 pfdiff_steps: str = "calls") -> np.ndarray:
    """The SIGMAS that run a grid's plan on ComfyUI: the sigmas where the plan calls the network, then 0 (Runge-Kutta:
    every grid time, then 0; PFDiff with ``pfdiff_steps`` 'base grid': its base grid): the top sigma is the plan's
    first, never dropped."""
    spec, po = resolve(method, PlanOptions.of(**options))
    if spec.family == "rk" or (po.pfdiff is not None and pfdiff_steps != "calls"):
        times = np.asarray(plan.times if spec.family == "rk" else plan.times[:-1], dtype=np.float64)
    else:
        times = np.asarray([op.t for op in plan.evals], dtype=np.float64)
    sig = _to_sigmas(model_type, sched, times)
    return sig if sig[-1] == 0.0 else np.append(sig, 0.0)


def _sigmas_from_file(model_type: str, schedule: Schedule | None, model_sampling: Any, path: str, method: str,
                      steps: int) -> np.ndarray:
    """SIGMAS of the file's grid for ``method`` with ``steps`` network calls, checked against the model: made for its
    schedule (fingerprint, as a tuned file), or, for a file without one, starting at the model's largest sigma; a
    grid in another time convention is refused, never truncated."""
    from ..core.schedules import schedule_fingerprint
    grids = _read_grid_file(path)
    sched = _solver_schedule(model_type, schedule, model_sampling)
    mine = [g for g in grids.values() if not method or g.method == method or (method == "pfdiff" and g.pfdiff)]
    fits = [g for g in mine if int(g.nfe) == steps]
    if len(fits) != 1:
        have = sorted(f"{g.method} NFE {g.nfe}" for g in grids.values())
        raise DeisFastInputError(f"DEIS-fast Scheduler: {path} has {len(fits)} grids for method {method or 'any'!r} "
                                 f"and {steps} steps; it holds: {', '.join(have)}. Set steps (and method) to one of "
                                 "those")
    g = fits[0]
    t = np.asarray(g.times, dtype=np.float64)
    if g.schedule and not _fingerprint_fits(g.schedule, model_type, sched, model_sampling):
        raise DeisFastInputError(
            f"DEIS-fast Scheduler: grid_file {path}: the {g.method} NFE {g.nfe} grid was optimized for another model "
            f"schedule (fingerprint {g.schedule}); this MODEL solves in {sched!r} (fingerprint "
            f"{schedule_fingerprint(sched)}). Load the model the grid was made for, or optimize one for this model "
            "(deis_fast.optimize_grid on deis_fast.integrations.comfyui.model_schedule(model_sampling)[1])")
    top = float(sched.t_max) if model_type != "const" else float(model_sampling.sigma_max)
    lo, hi = (float(sched.t_min), top) if model_type != "const" else (0.0, top)
    if not (lo - 1e-9 * max(1.0, abs(lo)) <= t[-1] and np.isclose(t[0], top, rtol=1e-6, atol=1e-9)):
        raise DeisFastInputError(
            f"DEIS-fast Scheduler: grid_file {path}: the {g.method} NFE {g.nfe} grid runs over times {t[0]:.6g} .. "
            f"{t[-1]:.6g}, but this MODEL's schedule runs from {hi:.6g} down to {lo:.6g}: the grid is in another time "
            "convention (or starts below the model's largest sigma). Optimize the grid on this model's schedule "
            "(deis_fast.integrations.comfyui.model_schedule), or choose another grid")
    from ..sampler import build_plan
    try:
        plan = build_plan(sched, g.method, g.nfe if g.pfdiff else None, list(t), pfdiff=g.pfdiff)
    except ValueError as e:
        raise DeisFastInputError(f"DEIS-fast Scheduler: grid_file {path}: {e}") from None
    if plan.nfe != g.nfe:
        raise DeisFastInputError(f"DEIS-fast Scheduler: grid_file {path}: the {g.method} grid labelled NFE {g.nfe} has "
                                 f"{len(t) - 1} intervals, which {g.method} runs in {plan.nfe} network calls: the file "
                                 "was not written by deis_fast.save_grid (or was edited); optimize the grid again")
    return _plan_sigmas(plan, g.method, {"pfdiff": g.pfdiff} if g.pfdiff else {}, model_type, sched)


# ----------------------------------------------------------------------------- nodes


class DeisFastSampler:
    """SAMPLER for SamplerCustom / SamplerCustomAdvanced: any deis_fast method in the model's own schedule."""

    CATEGORY = "sampling/custom_sampling/samplers"
    RETURN_TYPES = ("SAMPLER",)
    FUNCTION = "get_sampler"
    DESCRIPTION = ("deis_fast few-step samplers (DEIS tAB, iPNDM, DPM-Solver++, UniPC, PFDiff) solved in the model's "
                   "own noise schedule. Steps of the SIGMAS = network calls (Runge-Kutta: steps x stages).")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "method": (list(NODE_METHODS), {"default": AUTO, "tooltip": "auto: deis_fast's default for the "
                                                "model (rhoabm2 on flow models: FLUX, SD3, AuraFlow; tab3 otherwise; "
                                                "with a tuned_file, the file's); tab3: the DEIS paper's best; unipc3 "
                                                "/ dpmpp3 for strong CFG; pfdiff for the fewest steps"}),
                "corrector": (["default", "on", "off"], {"tooltip": "UniC-style corrector after each step (no "
                                                         "extra calls); default: on for unipc*, off otherwise"}),
                "lower_order_final": (["auto", "on", "off"], {"tooltip": "lower orders on the last steps; auto: on "
                                                              "for 3rd-order lambda methods before a final 0"}),
                "eta": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 100.0, "step": 0.01,
                                  "tooltip": "noise of ddim_eta / dpmpp_*_sde (others ignore it)"}),
                "s_noise": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 100.0, "step": 0.01,
                                      "tooltip": "noise scale of dpmpp_*_sde (others ignore it)"}),
                "variant": (list(VARIANTS), {"tooltip": "bh1/bh2 for unipc*, midpoint/heun for dpmpp_2m_sde"}),
                "pfdiff_k": ("INT", {"default": 2, "min": 1, "max": 3, "tooltip": "PFDiff: k+1 grid steps per call"}),
                "pfdiff_h": ("INT", {"default": 1, "min": 1, "max": 3, "tooltip": "PFDiff springboard: 1 <= h <= k"}),
                "pfdiff_steps": (["calls", "base grid"], {"tooltip": "calls: the scheduler's steps are PFDiff's "
                                                          "network calls; base grid: they are its (k+1)N-k grid"}),
            },
            "optional": {
                "tuned_file": ("STRING", {"default": "", "tooltip": "a tuned file (deis_fast.tuning.tune / deis-fast "
                                          "tune JSON): its grid or plan for this model replaces the SIGMAS' interior "
                                          "(steps must be its NFE; the DEIS-fast Scheduler with the same file gives "
                                          "them); it fixes the method and its options"}),
            },
        }

    def get_sampler(self, method=AUTO, corrector="default", lower_order_final="auto", eta=1.0, s_noise=1.0,
                    variant="default", pfdiff_k=2, pfdiff_h=1, pfdiff_steps="calls", **optional):
        import comfy.samplers
        opts = node_options(method, corrector, lower_order_final, eta, s_noise, variant, pfdiff_k, pfdiff_h)
        tuned_file = str(optional.get("tuned_file", "") or "").strip()
        try:
            fn = sampler_function(method, pfdiff_steps=pfdiff_steps, tuned_file=tuned_file, **opts)
        except DeisFastInputError:
            raise
        except ValueError as e:
            raise DeisFastInputError(f"DEIS-fast Sampler: {e}") from None
        return (comfy.samplers.KSAMPLER(fn),)


def node_options(method: str, corrector: str, lower_order_final: str, eta: float, s_noise: float, variant: str,
                 pfdiff_k: int, pfdiff_h: int) -> dict:
    """The deis_fast options of the sampler node's inputs (those that do not apply to the method are left out,
    except a variant or corrector set on a method without one: that raises in :func:`sampler_function`)."""
    spec = None if method == AUTO else resolve(method)[0]   # auto: tab3 / rhoabm2, neither takes eta or s_noise
    opts: dict[str, Any] = {}
    if method == "pfdiff":
        if not 1 <= pfdiff_h <= pfdiff_k:
            raise DeisFastInputError(f"DEIS-fast Sampler: PFDiff needs 1 <= pfdiff_h <= pfdiff_k, got pfdiff_k="
                                     f"{pfdiff_k}, pfdiff_h={pfdiff_h}")
        opts["pfdiff"] = (int(pfdiff_k), int(pfdiff_h))
    if corrector != "default":
        opts["corrector"] = corrector == "on"
    if lower_order_final != "auto":
        opts["lower_order_final"] = lower_order_final == "on"
    if spec is not None and "eta" in spec.options and method != "pfdiff":
        opts["eta"] = float(eta)
    if spec is not None and "s_noise" in spec.options and method != "pfdiff":
        opts["s_noise"] = float(s_noise)
    if variant != "default":
        opts["variant"] = variant
    return opts


class DeisFastScheduler:
    """SIGMAS of a deis_fast grid on the model's own schedule (sigma range and shift from its model_sampling)."""

    CATEGORY = "sampling/custom_sampling/schedulers"
    RETURN_TYPES = ("SIGMAS",)
    FUNCTION = "get_sigmas"
    DESCRIPTION = ("deis_fast time grids on the model's own schedule: time_quadratic (tAB / iPNDM on SD-style "
                   "models), logsnr (dpmpp / unipc), karras, ays, or a grid optimized with deis_fast and saved to a file")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL",),
                "grid": (list(NODE_GRIDS), {"default": "time_quadratic"}),
                "steps": ("INT", {"default": 10, "min": 1, "max": 10000}),
                "denoise": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01}),
            },
            "optional": {
                "grid_file": ("STRING", {"default": "", "tooltip": "grid 'optimized (file)': a deis_fast.save_grid "
                                         "JSON"}),
                "method": ("STRING", {"default": "", "tooltip": "grid 'optimized (file)': the method it was "
                                      "optimized for (empty: the only one with this many steps)"}),
                "tuned_file": ("STRING", {"default": "", "tooltip": "a tuned file (deis_fast.tuning.tune / deis-fast "
                                          "tune JSON): the SIGMAS of its tuned grid on this model (grid and steps "
                                          "are then the file's; denoise 1); give the DEIS-fast Sampler the same "
                                          "file"}),
            },
        }

    def get_sigmas(self, model, grid, steps, denoise=1.0, grid_file="", method="", tuned_file="", **optional):
        ms = model.get_model_object("model_sampling")
        tuned_file = str(tuned_file or "").strip()
        if tuned_file:
            if denoise < 0.9999:
                raise DeisFastInputError("DEIS-fast Scheduler: a tuned_file samples its whole grid: set denoise to "
                                         "1.0, or clear tuned_file")
            return (tuned_sigmas(ms, tuned_file),)
        return (sigmas_for(ms, grid, steps, denoise, grid_file, method),)


NODE_CLASS_MAPPINGS = {"DeisFastSampler": DeisFastSampler, "DeisFastScheduler": DeisFastScheduler}
NODE_DISPLAY_NAME_MAPPINGS = {"DeisFastSampler": "DEIS-fast Sampler", "DeisFastScheduler": "DEIS-fast Scheduler"}


# ----------------------------------------------------------------------------- KSampler lists


def register() -> list[str]:
    """Add the deis_fast samplers and schedulers to ComfyUI's KSampler lists (idempotent); returns the names
    added. Sampler ``deis_fast_<m>`` is ``comfy.k_diffusion.sampling.sample_deis_fast_<m>``, scheduler
    ``deis_fast_<grid>`` a ``SchedulerHandler`` of the model's sampling and the steps."""
    import comfy.k_diffusion.sampling as kds
    import comfy.samplers as cs
    added = []
    for name, (method, opts) in KSAMPLER_ENTRIES.items():
        setattr(kds, f"sample_{name}", sampler_function(method, node=f"KSampler sampler_name {name}", **opts))
        for names in (cs.KSAMPLER_NAMES, cs.SAMPLER_NAMES):
            if name not in names:
                names.append(name)
                added.append(name)
    for name, grid in SCHEDULER_ENTRIES.items():
        if name not in cs.SCHEDULER_HANDLERS:
            cs.SCHEDULER_HANDLERS[name] = cs.SchedulerHandler(_scheduler_handler(grid), use_ms=True)
        if name not in cs.SCHEDULER_NAMES:
            cs.SCHEDULER_NAMES.append(name)
            added.append(name)
    return added


def _scheduler_handler(grid: str) -> Callable[[Any, int], torch.Tensor]:
    def handler(model_sampling, steps):
        return sigmas_for(model_sampling, grid, steps)
    handler.__name__ = f"{PREFIX}{grid}_scheduler"
    return handler


# ----------------------------------------------------------------------------- the embedded digits models


def digits_model(kind: str = "digits", shift: float = 1.0, device: str = "cpu") -> Any:
    """deis_fast's embedded 8x8 digits network as a ComfyUI MODEL (a ``ModelPatcher`` of a ``BaseModel``): "digits"
    is the eps model (ModelSamplingDiscrete on its DDPM betas, 1e-4 .. 0.02), "flow" the rectified-flow model (CONST,
    ModelSamplingDiscreteFlow with ``shift``). Latents are [B, 1, 8, 8]; conditioning is ignored. For trying the
    nodes and measuring samplers inside ComfyUI without a checkpoint."""
    import comfy.latent_formats
    import comfy.model_base
    import comfy.model_patcher
    import comfy.supported_models_base
    from ..zoo.digits import DIGITS_BETA_END, DIGITS_BETA_START, load_digits_model

    class DigitsLatent(comfy.latent_formats.LatentFormat):
        latent_channels = 1

    class DigitsConfig(comfy.supported_models_base.BASE):
        unet_config = {"kind": kind}
        latent_format = DigitsLatent
        sampling_settings = ({"shift": float(shift), "multiplier": 1000} if kind == "flow" else
                             {"beta_schedule": "sqrt_linear", "linear_start": DIGITS_BETA_START,
                              "linear_end": DIGITS_BETA_END})

    class DigitsNet(torch.nn.Module):
        def __init__(self, kind: str, device=None, operations=None, **_: Any):
            super().__init__()
            self.net = load_digits_model(kind=kind)
            self.dtype = torch.float32

        def forward(self, x, timesteps, context=None, control=None, transformer_options=None, **_: Any):
            return self.net(x, timesteps)

    model_type = comfy.model_base.ModelType.FLOW if kind == "flow" else comfy.model_base.ModelType.EPS
    config = DigitsConfig(DigitsConfig.unet_config)
    base = comfy.model_base.BaseModel(config, model_type, device=device, unet_model=DigitsNet)
    base.eval()
    return comfy.model_patcher.ModelPatcher(base, load_device=torch.device(device), offload_device=torch.device(device))


def flow_mixture_model(shift: float = 1.0, seed: int = 1234) -> tuple[Any, Any]:
    """(MODEL, mixture): the flow yardstick's Gaussian mixture (8 components, 64-d, std 0.3, ``seed``) as a ComfyUI
    CONST model with its exact velocity (float64 inside; latents [B, 1, 8, 8]), and the
    :class:`~deis_fast.testing.GaussianMixture` (its exact ODE endpoint: ``deis_fast.testing.reference_solution``).
    ModelSamplingDiscreteFlow with ``shift``; it reads the time from the sigma ComfyUI hands the model, so
    ModelSamplingFlux / SD3 / AuraFlow patches on it stay exact. For measuring samplers inside ComfyUI."""
    import comfy.latent_formats
    import comfy.model_base
    import comfy.model_patcher
    import comfy.supported_models_base
    from ..testing import GaussianMixture
    mix = GaussianMixture.random(8, 64, 0.3, seed)
    vel = mix.model(FlowSchedule(time_scale=1.0), "flow")

    class MixtureLatent(comfy.latent_formats.LatentFormat):
        latent_channels = 1

    class MixtureConfig(comfy.supported_models_base.BASE):
        unet_config = {"kind": "mixture"}
        latent_format = MixtureLatent
        sampling_settings = {"shift": float(shift), "multiplier": 1000}

    class MixtureNet(torch.nn.Module):
        def __init__(self, device=None, operations=None, **_: Any):
            super().__init__()
            self.dtype = torch.float32
            self.anchor = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x, timesteps, context=None, control=None, transformer_options=None, **_: Any):
            sig = (transformer_options or {}).get("sigmas")   # CONST: sigma is the flow time t
            t = sig.double() if sig is not None else timesteps.double() / 1000.0
            v = vel(x.reshape(x.shape[0], -1).double(), t.reshape(-1).expand(x.shape[0]))
            return v.reshape(x.shape).to(x.dtype)

    base = comfy.model_base.BaseModel(MixtureConfig(MixtureConfig.unet_config), comfy.model_base.ModelType.FLOW,
                                      device="cpu", unet_model=MixtureNet)
    base.eval()
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(base, load_device=cpu, offload_device=cpu), mix


# ----------------------------------------------------------------------------- install

# the custom-node loader: the text of the repo's comfyui_node/__init__.py (tests/integrations/test_comfyui.py checks
# the two are equal). It cannot import its "not installed" message from deis_fast, which may be what is missing.
LOADER = '''"""ComfyUI custom-node entry of deis_fast: copy this folder to ComfyUI/custom_nodes/deis_fast (or run
``python -m deis_fast.integrations.comfyui install /path/to/ComfyUI``, which writes the same loader there).
deis_fast itself must be installed in ComfyUI's Python (``pip install deis_fast`` or ``pip install -e <repo>``)."""
try:
    from deis_fast.integrations.comfyui import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS, register
except ImportError as e:  # say what to do in the console ComfyUI prints import failures to
    raise ImportError(f"the deis_fast ComfyUI nodes need the deis_fast package in ComfyUI's Python environment: "
                      f"pip install deis_fast (or pip install -e /path/to/the/deis_fast/repo) ({e})") from e

register()  # deis_fast_* samplers and schedulers on the plain KSampler lists
__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
'''


def install(comfyui_path: str, name: str = "deis_fast") -> str:
    """Write ``custom_nodes/<name>/__init__.py`` (:data:`LOADER`) into a ComfyUI folder (``custom_nodes/`` is created
    in a ComfyUI tree that lacks it: one with ``main.py`` and ``comfy/``); returns its path."""
    nodes_dir = os.path.join(comfyui_path, "custom_nodes")
    if not os.path.isdir(nodes_dir):
        if not (os.path.isfile(os.path.join(comfyui_path, "main.py")) and
                os.path.isdir(os.path.join(comfyui_path, "comfy"))):
            raise FileNotFoundError(f"{comfyui_path} is not a ComfyUI folder (no main.py and comfy/ there): pass the "
                                    "ComfyUI folder (where main.py is)")
        os.makedirs(nodes_dir)
    folder = os.path.join(nodes_dir, name)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "__init__.py")
    with open(path, "w") as f:
        f.write(LOADER)
    return path


def _main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] != "install":
        print("usage: python -m deis_fast.integrations.comfyui install /path/to/ComfyUI", file=sys.stderr)
        return 2
    try:
        print(f"wrote {install(argv[1])}; restart ComfyUI")
    except OSError as e:
        print(f"deis_fast.integrations.comfyui install: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))
