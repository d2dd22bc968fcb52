"""tune(): the search over methods and grids (or learned plans) that writes a tuned file."""
from __future__ import annotations
import dataclasses
import hashlib
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence
import numpy as np
import torch
from ..core.schedules import Schedule, VESchedule, schedule_fingerprint
from .files import Tuned, _finite, _label


__all__ = ["AUTO_METHODS", "reference_solutions", "tune"]


def _median_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    from ..testing import relative_errors
    return float(relative_errors(x, ref).median())


def _rows(cond: Mapping[str, Any], idx: slice, n: int) -> dict:
    return {k: v[idx] if isinstance(v, torch.Tensor) and v.ndim and v.shape[0] == n else v for k, v in cond.items()}


def _modules_of(model: Any) -> list[torch.nn.Module]:
    """The networks a model callable runs: itself, its attributes, or what its closure holds."""
    if isinstance(model, torch.nn.Module):
        return [model]
    objs = list(getattr(model, "__dict__", {}).values())
    objs += [c.cell_contents for c in (getattr(model, "__closure__", None) or ()) if c.cell_contents is not None]
    return [v for v in objs if isinstance(v, torch.nn.Module)]


def _model_digest(model: Any) -> str | None:
    """Identifies a network's weights for the reference cache: every parameter of a small module, the shapes and a
    strided sample of the values of a large one. None for a callable without a module (then only an explicit
    ``cache_key`` identifies it)."""
    mods = _modules_of(model)
    if not mods:
        return None
    h = hashlib.sha256()
    for m in mods:
        params = list(m.state_dict().items())
        big = sum(v.numel() for _, v in params) > 5e7
        for k, v in params:
            v = v.detach().reshape(-1)
            h.update(f"{k}{tuple(v.shape)}{v.dtype}".encode())
            h.update((v[:: max(1, v.numel() // 4096)] if big else v).cpu().double().numpy().tobytes())
    return h.hexdigest()[:16]


def _tensor_digest(*ts: Any) -> str:
    h = hashlib.sha256()
    for t in ts:
        if isinstance(t, torch.Tensor):
            h.update(f"{tuple(t.shape)}{t.dtype}".encode())
            h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        else:
            h.update(repr(t).encode())
    return h.hexdigest()[:16]


def _reference_grid(schedule: Schedule) -> str | None:
    lam = schedule.lam(np.array([schedule.t_max, schedule.t_min], dtype=np.float64))
    return "logsnr" if np.isfinite(lam).all() else None


def reference_solutions(model: Callable[..., torch.Tensor], schedule: Schedule, noise: torch.Tensor, *,
                        prediction: str = "eps", method: str = "rho_rk4", nfe: int = 400,
                        cond: Mapping[str, Any] | None = None, cache_dir: str | os.PathLike | None = None,
                        cache_key: str = "", batch: int = 64, progress: bool = False) -> torch.Tensor:
    """Fine solutions of ``noise`` (``method`` at ``nfe`` NFE on the logsnr grid, the schedule's default grid where
    log-SNR is infinite at an end), in batches of ``batch`` with a progress bar; cached in ``cache_dir`` under a
    key of the model's weights, the schedule, the noise, the conditioning and ``cache_key`` (a model callable
    that holds no ``nn.Module`` is cached only under an explicit ``cache_key``, which must then identify it)."""
    from ..sampler import Sampler
    cond = dict(cond or {})
    path, digest = None, _model_digest(model)
    if cache_dir is not None and (digest is not None or cache_key):
        key = hashlib.sha256("|".join([
            str(digest), schedule_fingerprint(schedule), prediction, method, str(nfe), cache_key,
            _tensor_digest(noise, *[cond[k] for k in sorted(cond)], *sorted(cond))]).encode()).hexdigest()[:24]
        path = Path(cache_dir) / f"reference-{key}.safetensors"
        if path.is_file():
            try:
                from safetensors.torch import load_file
                ref = load_file(str(path))["reference"]
                if ref.shape == noise.shape:
                    return ref.to(noise.device, noise.dtype)
            except Exception:  # noqa: BLE001 - a damaged cache entry is recomputed
                pass
    from tqdm.auto import tqdm
    n = noise.shape[0]
    out = []
    # the bar counts network calls (a batch of a fine reference is minutes of them), its text the samples
    with torch.no_grad(), tqdm(total=-(-n // batch) * nfe, desc=f"reference ({method} @ {nfe} NFE, {n} samples)",
                               unit="call", disable=not progress, file=sys.stderr) as bar:
        sampler = Sampler(_Ticking(model, lambda: bar.update(1)) if progress else model, schedule, method, nfe,
                          _reference_grid(schedule), prediction, check_finite=False)
        for i in range(0, n, batch):
            s = slice(i, min(i + batch, n))
            out.append(sampler(noise[s], **_rows(cond, s, n)))
    ref = torch.cat(out)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
        from safetensors.torch import save_file   # never pickle
        save_file({"reference": ref.detach().cpu().contiguous()}, str(tmp))
        tmp.replace(path)
    return ref


class _Ticking:
    """``model`` that calls ``tick()`` before each network call (a progress bar over a search of unknown length)."""

    def __init__(self, model: Callable[..., torch.Tensor], tick: Callable[[], None]):
        self.model, self.tick = model, tick

    def __call__(self, x: torch.Tensor, t: torch.Tensor, **cond: Any) -> torch.Tensor:
        self.tick()
        return self.model(x, t, **cond)


class _seconds_bar:
    """A tqdm bar of elapsed seconds out of ``budget`` (a time-bounded search); yields its ``tick``."""

    def __init__(self, desc: str, budget: float | None, enabled: bool):
        self.desc, self.budget, self.enabled = desc, budget, enabled

    def __enter__(self) -> Callable[[], None]:
        from tqdm.auto import tqdm
        self.bar = tqdm(total=self.budget, desc=self.desc, unit="s", disable=not self.enabled, file=sys.stderr,
                        bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total:.0f} s")
        self.t0 = time.perf_counter()

        def tick() -> None:
            now = time.perf_counter() - self.t0
            if self.budget is not None:
                now = min(now, self.budget)
            if now - self.bar.n >= 0.5:
                self.bar.update(now - self.bar.n)
        return tick

    def __exit__(self, *exc: Any) -> None:
        self.bar.close()


def _model_dtype(model: Any) -> torch.dtype:
    """The dtype of a module's (floating) parameters; float32 for a plain callable."""
    if isinstance(model, torch.nn.Module):
        for p in model.parameters():
            if p.is_floating_point():
                return p.dtype
    return torch.float32


def _checkpointed(model: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """``model`` with activation checkpointing while grad is on: the network's activations are recomputed in the
    backward pass instead of stored (one more forward per call, a fraction of the memory)."""
    from torch.utils.checkpoint import checkpoint

    def f(x: torch.Tensor, t: torch.Tensor, **cond: Any) -> torch.Tensor:
        if torch.is_grad_enabled():
            return checkpoint(model, x, t, use_reentrant=False, **cond)
        return model(x, t, **cond)
    return f


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, (torch.OutOfMemoryError, MemoryError)) or "out of memory" in str(e).lower()


# the candidates of tune(method=None) / `deis-fast tune` (--method auto): the default method, its corrected form and
# tab2 with and without corrector -- the strongest few-step methods on the embedded VP and flow models
# (benchmarks/RESULTS.md: tab3 + corrector is the best fixed configuration on the digits U-Net at NFE 4-10, an
# optimized tab2 grid beats optimized tab3 there, tab3's optimized grid wins on the mixture and the flow model)
AUTO_METHODS = ("tab3", "tab3+corrector", "tab2", "tab2+corrector")


def _candidates(method: str | Sequence[str] | None, plan_options: Mapping[str, Any]) -> list[tuple[Any, Any]]:
    """``[(spec, PlanOptions)]`` of ``method``: one name, a list of names, or None / ``"auto"`` (AUTO_METHODS); a
    name may end in ``+corrector`` (the UniC-style corrector on)."""
    from ..solvers import PlanOptions, resolve
    if method is None or method == "auto":
        if plan_options:
            raise ValueError(f"plan options {sorted(plan_options)} need a method: the automatic method search "
                             f"tries {', '.join(AUTO_METHODS)}")
        method = AUTO_METHODS
    names = [method] if isinstance(method, str) else list(method)
    if not names:
        raise ValueError("no candidate method")
    out = []
    for m in names:
        name, plus, extra = m.partition("+")
        kw = dict(plan_options)
        if plus:
            if extra != "corrector":
                raise ValueError(f"method {m!r}: only '+corrector' may follow a method name")
            kw["corrector"] = True
        out.append(resolve(name, PlanOptions.of(None, **kw)))
    return out


def _nondefault(o: Any) -> dict:
    from ..solvers import PlanOptions
    return {f.name: getattr(o, f.name) for f in dataclasses.fields(o)
            if getattr(o, f.name) != getattr(PlanOptions(), f.name)}


def tune(model: Callable[..., torch.Tensor], schedule: Schedule, method: str | Sequence[str] | None = "tab3",
         nfe: int = 5, *,
         prediction: str = "eps", noise: torch.Tensor | None = None, held_out_noise: torch.Tensor | None = None,
         shape: Sequence[int] | None = None, calibration: int = 32, held_out: int = 16, seed: int = 0,
         cond: Mapping[str, Any] | None = None, held_out_cond: Mapping[str, Any] | None = None,
         plan: bool = False, plan_iters: int = 200, plan_batch: int = 32, plan_lr: float = 4e-3,
         checkpoint: bool = False, time_budget: float | None = 60.0, reference_method: str = "rho_rk4",
         reference_nfe: int = 400, cache_dir: str | os.PathLike | None = None, cache_key: str = "",
         baseline_plan: Any = None, progress: bool = False, log: Callable[[str], None] | None = None,
         guidance_scale: float | None = None, pipeline: str | None = None, resolution: Sequence[int] | None = None,
         meta: Mapping[str, Any] | None = None, **plan_options: Any) -> Tuned:
    """Tune ``method`` at ``nfe`` for ``model`` (``model(x, t, **cond)`` predicting ``prediction`` on ``schedule``).

    Calibration noises: ``noise`` (and ``held_out_noise``), or ``calibration`` + ``held_out`` per-sample seeded
    noises of ``shape`` (seeds ``seed...``; VE schedules scale them to sigma_max). ``cond`` / ``held_out_cond``: the
    model's keyword arguments, tensors with one row per noise. The held-out rows never enter the fit: the result's
    ``errors`` are median relative errors to the fine reference (``reference_method`` at ``reference_nfe``; cached in
    ``cache_dir``) there, for the untuned configuration (``baseline_plan``, default: the method's default grid) and
    the tuned one; where tuning does not beat the untuned configuration on them the result is the untuned one
    (``kind='untuned'``). Fits the grid with :func:`optimize_grid` (``time_budget`` seconds) and, with ``plan``, the
    plan's coefficients with :func:`learn_plan` (``plan_iters`` Adam steps through the network; ``checkpoint``:
    activation checkpointing when autograd through the network does not fit in memory).

    ``method``: one method, a list of candidates (names, ``"tab3+corrector"`` for the corrector on) or None /
    ``"auto"`` (:data:`AUTO_METHODS`): each candidate gets its optimized grid (the ``time_budget`` shared among them)
    and the one with the lowest median error on the calibration noises is chosen; the held-out noises then only
    compare it with the untuned configuration, the first candidate on its default grid. The file records the method
    and options chosen (``meta['candidates']``: every candidate's calibration and, for the record, held-out error).
    """
    from .._version import __version__
    from .grids import optimize_grid
    from ..sampler import Sampler, build_plan

    say = log or (lambda s: print(s, file=sys.stderr) if progress else None)
    began = time.time()
    cand_specs = _candidates(method, plan_options)
    spec, o = cand_specs[0]
    scale = float(schedule.sigma(schedule.t_max)) if isinstance(schedule, VESchedule) else 1.0
    if noise is None:
        if shape is None:
            raise ValueError("give calibration `noise` (and `held_out_noise`) or the sample `shape`")
        from ..sampler import randn_per_sample
        seeds = range(seed, seed + calibration + held_out)
        z = randn_per_sample((calibration + held_out,) + tuple(shape), seeds, dtype=_model_dtype(model)) * scale
        noise, held_out_noise = z[:calibration], z[calibration:]
        meta = dict(meta or {}, calibration_seeds=[seed, seed + calibration], held_out_seeds=[seed + calibration,
                                                                                              seed + calibration + held_out])
    if held_out_noise is None or held_out_noise.shape[0] < 1 or noise.shape[0] < 4:
        raise ValueError("tuning needs >= 4 calibration noises and >= 1 held-out noise (a few dozen of each is "
                         "typical)")
    n_cal, n_ho = noise.shape[0], held_out_noise.shape[0]
    cond = dict(cond or {})
    per_row = [k for k, v in cond.items() if isinstance(v, torch.Tensor) and v.ndim and v.shape[0] == n_cal]
    if per_row and held_out_cond is None:
        raise ValueError(f"cond has per-noise tensors ({', '.join(per_row)}): give held_out_cond for the held-out "
                         "noises too")
    held_out_cond = dict(held_out_cond if held_out_cond is not None else cond)
    x_all = torch.cat([noise, held_out_noise.to(noise.dtype)])
    cond_all = {k: torch.cat([v, held_out_cond[k]]) if isinstance(v, torch.Tensor) and v.ndim and
                v.shape[0] == n_cal else v for k, v in cond.items()}
    ref = reference_solutions(model, schedule, x_all, prediction=prediction, method=reference_method,
                              nfe=reference_nfe, cond=cond_all, cache_dir=cache_dir, cache_key=cache_key,
                              progress=progress)
    cal, ho = slice(0, n_cal), slice(n_cal, n_cal + n_ho)
    ref_cal, ref_ho = ref[cal], ref[ho]
    c_cal, c_ho = _rows(cond_all, cal, n_cal + n_ho), _rows(cond_all, ho, n_cal + n_ho)

    def median_err(p: Any, rows: slice, ref_rows: torch.Tensor, c: Mapping[str, Any]) -> float:
        with torch.no_grad():
            x = Sampler(model, schedule, plan=p, prediction=prediction, check_finite=False)(x_all[rows], **c)
        e = _median_error(x, ref_rows)
        return e if math.isfinite(e) else math.inf

    def held_err(p: Any) -> float:
        return median_err(p, ho, ref_ho, c_ho)

    base = baseline_plan if baseline_plan is not None else build_plan(schedule, spec.name, nfe, options=o)
    if base.nfe != nfe:
        raise ValueError(f"baseline plan has NFE {base.nfe}, not {nfe}")
    errors: dict[str, float | None] = {"held_out_untuned": held_err(base)}
    say(f"untuned {_label(spec.name, _nondefault(o))} @ NFE {nfe}: held-out error {errors['held_out_untuned']:.4g}")
    # the grid of each candidate: forward passes only
    from ..solvers import default_grid
    fits = []
    for k, (c_spec, c_o) in enumerate(cand_specs):
        dg = default_grid(schedule, c_spec.name)
        starts = (dg,) + tuple(g for g in ("time_quadratic", "logsnr", "karras", "time_uniform") if g != dg)
        if _reference_grid(schedule) is None:
            starts = tuple(g for g in starts if g != "logsnr")   # log-SNR is infinite at an end (flow from t = 1)
        label = _label(c_spec.name, _nondefault(c_o))
        # the budget left, shared by the candidates left (one that converges early leaves its time to the next)
        budget = None if time_budget is None else max(1.0, (time_budget - sum(f["og"].seconds for f in fits))
                                                      / (len(cand_specs) - k))
        with _seconds_bar(f"grid search {label}" if len(cand_specs) > 1 else "grid search", budget,
                          progress) as tick:
            og = optimize_grid(_Ticking(model, tick), schedule, c_spec.name, nfe, x_all[cal], prediction=prediction,
                               reference=ref_cal, time_budget=budget, start_grids=starts, options=c_o, **c_cal)
        p = build_plan(schedule, c_spec.name, nfe if c_o.pfdiff is not None else None, list(og.times), options=c_o)
        fits.append(dict(spec=c_spec, o=c_o, og=og, plan=p, label=label, cal=median_err(p, cal, ref_cal, c_cal)))
        say(f"grid {label} ({og.evaluations} evaluations, {og.seconds:.0f} s, from {og.start_grid}): calibration "
            f"error {fits[-1]['cal']:.4g}")
    # the method: chosen on the calibration noises only (the first candidate wins ties)
    best_fit = min(fits, key=lambda f: f["cal"])
    spec, o, og, grid_plan = best_fit["spec"], best_fit["o"], best_fit["og"], best_fit["plan"]
    errors["held_out_grid"] = held_err(grid_plan)
    if len(fits) > 1:
        for f in fits:   # for the record only: the choice above never saw these
            f["held_out"] = errors["held_out_grid"] if f is best_fit else held_err(f["plan"])
        say(f"chosen on the calibration noises: {best_fit['label']}")
    say(f"grid {best_fit['label']}: held-out error {errors['held_out_grid']:.4g}")
    cands = [("untuned", base, errors["held_out_untuned"], cand_specs[0]),
             ("grid", grid_plan, errors["held_out_grid"], (spec, o))]
    if plan:
        from .plans import learn_plan
        _, start_plan, _, start_cfg = min(cands, key=lambda c: c[2])
        net = _checkpointed(model) if checkpoint else model
        try:
            lp = learn_plan(net, schedule, start_plan, x_all[cal], ref_cal, prediction=prediction, iters=plan_iters,
                            batch=min(plan_batch, max(1, n_cal - max(1, round(n_cal / 4)))), lr=plan_lr,
                            log=say if progress else None, progress=progress, **c_cal)
        except (RuntimeError, MemoryError) as e:
            if not _is_oom(e):
                raise
            raise MemoryError(
                f"learn_plan: autograd through the network at batch {plan_batch} does not fit in memory ({e}). "
                + ("Lower plan_batch, or tune only the grid (plan=False)." if checkpoint else
                   "Pass checkpoint=True (activation checkpointing: one more forward per call, far less memory), "
                   "lower plan_batch, or tune only the grid (plan=False).")) from None
        errors["held_out_plan"] = held_err(lp.plan)
        say(f"plan ({lp.iteration} of {plan_iters} steps kept, {lp.seconds:.0f} s): held-out error "
            f"{errors['held_out_plan']:.4g}")
        cands.append(("plan", lp.plan, errors["held_out_plan"], start_cfg))
    # never worse than untuned on the held-out set: the untuned configuration wins ties
    kind, best, err, (spec, o) = min(cands, key=lambda c: (c[2], c[0] != "untuned"))
    errors["held_out_tuned"] = err
    if kind == "untuned":
        say("tuning did not beat the untuned configuration on the held-out set: keeping the untuned grid")
    # whether the kept grid is the method's default one (the optimizer found nothing better on it): a summary must
    # then not call it a tuned grid (the gain, if any, is the method or its options)
    default_times = build_plan(schedule, spec.name, nfe, options=o).times
    grid_tuned = kind == "plan" or not np.allclose(best.times, default_times, rtol=1e-9, atol=0)
    cand_meta = {} if len(fits) < 2 else {"chosen": best_fit["label"], "candidates": [
        {"method": f["label"], "calibration_error": _finite(f["cal"]), "held_out_error": _finite(f["held_out"]),
         "grid_start": f["og"].start_grid, "grid_seconds": round(f["og"].seconds, 1)} for f in fits]}
    return Tuned(method=spec.name, nfe=int(nfe),
                 grid=[float(t) for t in best.times], schedule_fingerprint=schedule_fingerprint(schedule),
                 kind=kind, plan=best if kind == "plan" else None, options=_nondefault(o), prediction=prediction,
                 schedule=repr(schedule), guidance_scale=None if guidance_scale is None else float(guidance_scale),
                 pipeline=pipeline, resolution=None if resolution is None else [int(r) for r in resolution],
                 errors=errors, deis_fast_version=__version__,
                 meta=dict(meta or {}, **cand_meta, calibration=n_cal, held_out=n_ho,
                           reference=f"{reference_method}@{reference_nfe}",
                           seconds=round(time.time() - began, 1), grid_start=og.start_grid, grid_tuned=grid_tuned,
                           grid_evaluations=og.evaluations))
