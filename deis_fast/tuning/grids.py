"""Training-free time-grid optimization.

Given a model, a method and an NFE budget, choose the grid that minimizes the distance of the
method's endpoint to a fine reference solution from the same calibration noises. The free
parameters are the grid's increments in lambda (half log-SNR) through a softmax, so every
candidate is strictly monotone with exact endpoints; the search is derivative-free (Nelder-Mead)
from every fixed starting grid in turn, then restarted around the best point found, so the result is
never worse than the best fixed grid on the calibration set.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ..core.grids import MODEL_GRIDS, make_grid
from .. import solvers as _solvers
from ..sampler import Sampler, build_plan
from ..core.schedules import Schedule, VPSchedule, schedule_fingerprint

__all__ = ["OptimizedGrid", "optimize_grid", "grid_intervals", "grid_from_theta", "theta_from_grid", "save_grid",
           "load_grid"]


@dataclass
class OptimizedGrid:
    """A grid found by :func:`optimize_grid`; pass it as ``grid=`` to ``sample`` / ``Sampler``."""

    times: list[float]
    method: str
    nfe: int
    pfdiff: tuple[int, int] | None = None
    model_id: str = ""
    calibration_error: float = math.nan   # geometric-mean relative error on the fitting noises
    start_error: float = math.nan         # same, for the best fixed grid it started from
    validation_error: float = math.nan    # on the held-out part of the calibration noise (nan: none held out)
    start_validation_error: float = math.nan  # same, for the best fixed grid
    start_grid: str = ""
    evaluations: int = 0
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)
    schedule: str = ""                    # schedule_fingerprint of its schedule ("": a file saved before it existed)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        return np.asarray(self.times, dtype=dtype or np.float64)

    def __len__(self) -> int:
        return len(self.times)

    def __getitem__(self, i):
        return self.times[i]

    def check_for(self, schedule: Schedule, method: str, nfe: int | None, options: Any = None) -> int:
        """This grid's NFE if it was made for ``schedule``, ``method`` (with ``options``) and ``nfe`` (None: any);
        else a ValueError naming both."""
        spec, o = _solvers.resolve(method, options)
        pf = tuple(o.pfdiff) if o.pfdiff is not None else None
        mine = (self.method, tuple(self.pfdiff) if self.pfdiff else None)
        if (spec.name, pf) != mine:
            raise ValueError(f"this grid was optimized for method={self.method!r}" + (f" with pfdiff={mine[1]}" if mine[1]
                             else "") + f", not {method!r}" + (f" with pfdiff={pf}" if pf else "") +
                             "; optimize one for this method or sample with the grid's")
        fp = schedule_fingerprint(schedule)
        if self.schedule and self.schedule != fp:
            raise ValueError(f"this grid was optimized for another schedule (fingerprint {self.schedule}) than "
                             f"{schedule!r} (fingerprint {fp}); optimize one for this schedule")
        if nfe is not None and nfe != self.nfe:
            raise ValueError(f"this grid was optimized for nfe={self.nfe}, not nfe={nfe}; drop nfe= or optimize one "
                             f"for {nfe}")
        return self.nfe

    def to_json(self) -> dict:
        d = asdict(self)
        d["pfdiff"] = list(self.pfdiff) if self.pfdiff else None
        return d

    @classmethod
    def from_json(cls, d: dict) -> "OptimizedGrid":
        d = dict(d)
        d["pfdiff"] = tuple(d["pfdiff"]) if d.get("pfdiff") else None
        return cls(**d)


def grid_intervals(method: str, nfe: int, pfdiff: tuple[int, int] | None = None) -> int:
    """Number of grid intervals a (method, nfe[, pfdiff]) plan uses."""
    return _solvers.grid_intervals(method, nfe, _solvers.PlanOptions(pfdiff=pfdiff))


def _key(model_id: str, method: str, nfe: int, pfdiff) -> str:
    return f"{model_id}|{method}|{nfe}" + (f"|pfdiff{pfdiff[0]}{pfdiff[1]}" if pfdiff else "")


def save_grid(path: str | Path, grid: OptimizedGrid) -> None:
    """Add or replace ``grid`` in a JSON file keyed by (model_id, method, nfe[, pfdiff])."""
    p = Path(path)
    data = json.loads(p.read_text()) if p.exists() else {}
    data[_key(grid.model_id, grid.method, grid.nfe, grid.pfdiff)] = grid.to_json()
    tmp = p.with_suffix(p.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    tmp.replace(p)


def load_grid(path: str | Path, model_id: str, method: str, nfe: int,
              pfdiff: tuple[int, int] | None = None) -> OptimizedGrid:
    data = json.loads(Path(path).read_text())
    key = _key(model_id, method, nfe, pfdiff)
    if key not in data:
        raise KeyError(f"no optimized grid for {key!r} in {path}; available: {sorted(data)}")
    return OptimizedGrid.from_json(data[key])


def _rel_err(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    x = x.reshape(x.shape[0], -1).double()
    ref = ref.reshape(ref.shape[0], -1).double()
    return (x - ref).norm(dim=1) / ref.norm(dim=1).clamp_min(1e-30)


def optimize_grid(model: Callable[..., torch.Tensor], schedule: Schedule | None = None, method: str = "tab3",
                  nfe: int = 5, noise: torch.Tensor | None = None, t_start: float | None = None,
                  t_end: float | None = None, *, prediction: str = "eps", pfdiff: tuple[int, int] | None = None,
                  pfdiff_experimental: bool = False, shape: Sequence[int] | None = None, seed: int = 0,
                  reference: torch.Tensor | None = None, reference_method: str = "tab3", reference_nfe: int = 500,
                  max_evals: int | None = None, max_restarts: int = 3, time_budget: float | None = 60.0, model_id: str = "",
                  start_grids: Sequence[str] = ("time_quadratic", "logsnr", "karras", "time_uniform"),
                  min_gain: float = 0.05, validation_fraction: float = 0.25, plan_options: dict | None = None,
                  options: "_solvers.PlanOptions | None" = None,
                  **cond: Any) -> OptimizedGrid:
    """Choose the grid minimizing the (geometric) mean relative error of ``method`` at ``nfe`` on calibration noises.

    noise: calibration noise at t_start (or give ``shape`` and ``seed``). reference: the fine endpoint for
    that noise; by default ``reference_method`` at ``reference_nfe`` NFE on the logsnr grid. One
    Nelder-Mead run starts from each of ``start_grids`` (the best fixed grid is not always in the best
    basin), then up to ``max_restarts`` runs restart around the incumbent while that still helps; each
    run stops after ``max_evals`` evaluations (default 40 per grid interval). Deterministic for a given
    noise / seed as long as ``time_budget`` (seconds, a wall-clock guard; ``None``: no limit) does not
    cut the search short; where it does, the point reached depends on the machine's speed. The optimized
    grid replaces the best fixed grid only if its calibration error is lower by more than ``min_gain``
    (relative); smaller gains are within the calibration noise and do not carry over to held-out noise.
    ``validation_fraction`` of the noises (the last rows; at least one, when there are 4 or more) is held out
    of the fit: the optimized grid is kept only if it also beats the best fixed grid there. Both errors are
    reported (``validation_error``, ``start_validation_error``). ``options`` (a PlanOptions) and
    ``plan_options`` (its fields): further plan options of the method (``corrector``, ``variant``, ...); pass
    the same ones when sampling on the result.
    """
    from scipy.optimize import minimize  # here, not at import: `import deis_fast` stays light (~0.7 s less)

    schedule = VPSchedule.discrete("linear") if schedule is None else schedule
    if not 0.0 <= min_gain < 1.0:
        raise ValueError(f"min_gain is a relative calibration gain in [0, 1), got {min_gain}")
    if not 0.0 <= validation_fraction < 1.0:
        raise ValueError(f"validation_fraction is the held-out share of the noises, in [0, 1), got "
                         f"{validation_fraction}")
    if noise is None:
        if shape is None:
            raise ValueError("give calibration `noise` or its `shape` (and `seed`)")
        noise = torch.randn(tuple(shape), generator=torch.Generator().manual_seed(seed), dtype=torch.float32)
    extra = dict(plan_options or {})
    if pfdiff is not None:
        extra["pfdiff"] = pfdiff
    if pfdiff_experimental:
        extra["pfdiff_experimental"] = True
    spec, o = _solvers.resolve(method, _solvers.PlanOptions.of(options, **extra))
    method, pfdiff = spec.name, o.pfdiff
    n = _solvers.grid_intervals(method, nfe, o)
    t0 = time.perf_counter()
    common = dict(prediction=prediction, check_finite=False)
    if reference is None:
        ref_sampler = Sampler(model, schedule, reference_method, reference_nfe, "logsnr", t_start=t_start,
                              t_end=t_end, **common)
        with torch.no_grad():
            reference = ref_sampler(noise, **cond)
    n_val = int(round(noise.shape[0] * validation_fraction)) if noise.shape[0] >= 4 else 0
    n_val = min(max(n_val, 1 if validation_fraction > 0 and noise.shape[0] >= 4 else 0), noise.shape[0] - 1)
    fit = slice(0, noise.shape[0] - n_val)
    held = slice(noise.shape[0] - n_val, noise.shape[0])
    evals = 0

    def error_of(times: np.ndarray, rows: slice = fit) -> float:
        nonlocal evals
        evals += 1
        try:
            plan = build_plan(schedule, method, None if pfdiff is None else nfe, list(times), options=o)
        except ValueError:
            return math.inf
        with torch.no_grad():
            x = Sampler(model, schedule, plan=plan, **common)(noise[rows], **_rows(cond, rows, noise.shape[0]))
        # geometric mean: robust to the few samples that cross a mode boundary at low NFE, which
        # would otherwise dominate (and be chased by) an arithmetic mean
        e = float(_rel_err(x, reference[rows]).clamp_min(1e-12).log().mean().exp())
        return e if math.isfinite(e) else math.inf

    starts = []                                   # (error, name, times) of every fixed starting grid
    for g in start_grids:
        t = make_grid(schedule, g, n, t_start, t_end)
        starts.append((error_of(t), g, t))
    starts = sorted((s for s in starts if math.isfinite(s[0])), key=lambda s: s[0])
    if not starts:
        raise ValueError("every starting grid failed; check the model and the time range")
    best_e, best_name, best_t = starts[0]
    start_e, out_of_time = best_e, False
    if n >= 2:
        def times_of(theta: np.ndarray) -> np.ndarray:
            return grid_from_theta(schedule, best_t[0], best_t[-1], theta)

        cache: dict[bytes, float] = {}

        def objective(theta: np.ndarray) -> float:
            if time_budget is not None and time.perf_counter() - t0 > time_budget:
                raise _OutOfTime
            k = np.round(theta, 12).tobytes()
            if k not in cache:
                cache[k] = error_of(times_of(theta))
            return cache[k]

        def incumbent() -> tuple[np.ndarray, float]:
            k, f = min(cache.items(), key=lambda kv: kv[1])
            return np.frombuffer(k, dtype=np.float64).copy(), f

        def descend(theta: np.ndarray, step: float) -> None:
            minimize(objective, theta, method="Nelder-Mead",
                     options={"maxfev": budget, "xatol": 1e-3, "fatol": 1e-8, "adaptive": True,
                              "initial_simplex": _simplex(theta, step)})

        budget = max_evals or 40 * n
        try:
            # multi-start: the best fixed grid is not always in the best basin (on the digits model
            # ipndm4 from time_quadratic ends 1.3x lower than from the better-starting logsnr grid)
            for _, _, t in starts:
                descend(theta_from_grid(schedule, t), 0.3)
            theta_best, f_best = incumbent()
            for restart in range(max_restarts):   # fresh, smaller simplices around the incumbent
                descend(theta_best, 0.3 / (2 + restart))
                theta, f = incumbent()
                if f >= f_best * (1 - 1e-3):
                    break
                theta_best, f_best = theta, f
        except _OutOfTime:
            out_of_time = True
        if cache:
            theta_best, e = incumbent()
            # a calibration gain within noise does not generalize (tab3 at NFE 4 on the mixture: -1.6% on
            # calibration, +40% held-out), so the grid must buy at least min_gain to replace the fixed one,
            # and it must also win on the held-out noises
            if e < best_e * (1.0 - min_gain):
                cand = times_of(theta_best)
                if n_val == 0:
                    best_t, best_e = cand, e
                else:
                    val_e, val_start = error_of(cand, held), error_of(best_t, held)
                    if val_e < val_start:
                        best_t, best_e = cand, e
    val = error_of(best_t, held) if n_val else math.nan
    val_start = error_of(starts[0][2], held) if n_val else math.nan
    return OptimizedGrid([float(v) for v in best_t], method, int(nfe), pfdiff, model_id, best_e, start_e, val,
                         val_start, best_name, evals, time.perf_counter() - t0,
                         {"stopped_by_time_budget": out_of_time, "fit_noises": fit.stop, "held_out_noises": n_val},
                         schedule_fingerprint(schedule))


def _rows(cond: dict, rows: slice, batch: int) -> dict:
    """The conditioning of the selected noise rows (per-sample tensors are sliced, the rest passed as is)."""
    return {k: v[rows] if isinstance(v, torch.Tensor) and v.ndim and v.shape[0] == batch else v
            for k, v in cond.items()}


def _coordinate(schedule: Schedule, t_start: float, t_end: float):
    """(u(t), t(u)): the variable whose increments the optimizer parametrizes. lambda (half log-SNR) where it is
    finite at both ends; else (flow matching at t = 1, a grid ending at sigma = 0) the angle
    arctan(rho) = atan2(sigma, alpha), which is finite on the whole process."""
    if np.isfinite(schedule.lam(np.array([t_start, t_end], dtype=np.float64))).all():
        return schedule.lam, schedule.t_from_lambda
    return (lambda t: np.arctan(schedule.rho(t))), (lambda u: schedule.t_from_rho(np.tan(u)))


def grid_from_theta(schedule: Schedule, t_start: float, t_end: float, theta: np.ndarray) -> np.ndarray:
    """The grid whose increments in u (lambda, or the angle where lambda is infinite at an end) are
    softmax([0, *theta]) of u(t_end) - u(t_start)."""
    u_of, t_of = _coordinate(schedule, t_start, t_end)
    u0, u1 = float(u_of(np.float64(t_start))), float(u_of(np.float64(t_end)))
    z = np.concatenate([[0.0], np.asarray(theta, dtype=np.float64)])
    w = np.exp(z - z.max())
    w /= w.sum()
    t = np.asarray(t_of(u0 + (u1 - u0) * np.concatenate([[0.0], np.cumsum(w)])), dtype=np.float64)
    t[0], t[-1] = t_start, t_end
    return t


def theta_from_grid(schedule: Schedule, times: Sequence[float]) -> np.ndarray:
    """Inverse of :func:`grid_from_theta` (increments floored at 1e-12 of the total)."""
    times = np.asarray(times, dtype=np.float64)
    u = np.asarray(_coordinate(schedule, times[0], times[-1])[0](times), dtype=np.float64)
    th = np.log(np.maximum(np.diff(u) / (u[-1] - u[0]), 1e-12))
    return th[1:] - th[0]


class _OutOfTime(Exception):
    pass


def _simplex(x0: np.ndarray, step: float) -> np.ndarray:
    s = np.tile(x0, (len(x0) + 1, 1))
    for i in range(len(x0)):
        s[i + 1, i] += step
    return s


def _resolve_optimized(model: Callable[..., torch.Tensor], schedule: Schedule, method: str, nfe: int,
                       calibration_noise: torch.Tensor | None, t_start: float | None, t_end: float | None,
                       **kw: Any) -> OptimizedGrid:
    """``Sampler(..., grid="optimized", calibration_noise=z)``: optimize on construction."""
    if calibration_noise is None:
        raise ValueError("grid='optimized' needs calibration_noise (a few noise samples shaped like the real "
                         "input); or call deis_fast.optimize_grid(...) and pass its result as grid=")
    return optimize_grid(model, schedule, method, nfe, calibration_noise, t_start, t_end, **kw)


MODEL_GRIDS["optimized"] = _resolve_optimized
