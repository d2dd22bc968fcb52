"""Time grids: N+1 decreasing times t_0 = t_start > ... > t_N = t_end for an N-step solver."""
from __future__ import annotations

import warnings
from typing import Any, Mapping, Sequence, Union

import numpy as np

from .schedules import Schedule

GRIDS = ("time_uniform", "time_quadratic", "logsnr", "karras")
GridSpec = Union[str, Sequence[float], np.ndarray, Mapping[str, Sequence[float]]]

__all__ = ["GRIDS", "make_grid", "default_t_range", "validate_times", "grid_rho"]


def default_t_range(schedule: Schedule, t_start: float | None, t_end: float | None) -> tuple[float, float]:
    """Fill in t_start / t_end: the schedule's full range unless given, validated."""
    ts = schedule.t_max if t_start is None else float(t_start)
    te = schedule.t_min if t_end is None else float(t_end)
    schedule.check_times(np.array([ts, te]), "t_start/t_end")
    if not ts > te:
        raise ValueError(f"t_start ({ts}) must be greater than t_end ({te}): sampling runs from noise to data")
    return ts, te


def make_grid(schedule: Schedule, grid: GridSpec, steps: int | None, t_start: float | None = None,
              t_end: float | None = None, karras_rho: float = 7.0, integer_timesteps: bool = False) -> np.ndarray:
    """Return the float64 array of N+1 decreasing times for ``steps`` = N solver steps.

    ``grid`` is a name from :data:`GRIDS`, a sequence of times, or ``{"t": [...]}`` / ``{"rho": [...]}``
    (``"sigma"`` is accepted as an alias of ``"rho"`` for VE schedules). ``integer_timesteps`` rounds
    the times of a discrete schedule to the training timesteps (diffusers style), dropping duplicates.
    """
    if isinstance(grid, str):
        if grid not in GRIDS:
            raise ValueError(f"unknown grid {grid!r}; valid grids: {', '.join(GRIDS)}, or a list of times")
        if steps is None or int(steps) < 1:
            raise ValueError(f"a named grid needs steps >= 1, got {steps}")
        n = int(steps)
        ts, te = default_t_range(schedule, t_start, t_end)
        u = np.arange(n + 1, dtype=np.float64) / n
        if grid == "time_uniform":
            t = ts + u * (te - ts)
        elif grid == "time_quadratic":
            t = (np.sqrt(ts) + u * (np.sqrt(te) - np.sqrt(ts))) ** 2
        elif grid == "logsnr":
            la, lb = float(schedule.lam(ts)), float(schedule.lam(te))
            if not np.isfinite(lb):
                raise ValueError("the logsnr grid cannot end at rho = 0; use karras or give t_end > 0")
            t = schedule.t_from_lambda(la + u * (lb - la))
        else:  # karras
            if karras_rho <= 0:
                raise ValueError(f"karras_rho must be > 0, got {karras_rho}")
            p = 1.0 / karras_rho
            ra, rb = float(schedule.rho(ts)), float(schedule.rho(te))
            t = schedule.t_from_rho((ra ** p + u * (rb ** p - ra ** p)) ** karras_rho)
        t[0], t[-1] = ts, te  # exact endpoints despite round-off of the inverse maps
    else:
        t = _times_from_user(schedule, grid)
        if steps is not None and len(t) - 1 != int(steps):
            raise ValueError(f"the given grid has {len(t) - 1} steps but {steps} steps were asked for; "
                             "pass nfe=None with an explicit grid")
    if integer_timesteps:
        if not schedule.discrete:
            raise ValueError("integer_timesteps applies only to discrete schedules")
        t = _round_unique(t)
    validate_times(schedule, t)
    return t


def _times_from_user(schedule: Schedule, grid: Any) -> np.ndarray:
    if isinstance(grid, Mapping):
        keys = set(grid)
        if keys == {"t"}:
            return np.asarray(grid["t"], dtype=np.float64).copy()
        if keys in ({"rho"}, {"sigma"}):
            rho = np.asarray(grid[keys.pop()], dtype=np.float64)
            if np.any(rho < 0):
                raise ValueError("rho/sigma values must be >= 0")
            t = schedule.t_from_rho(rho)
            # a final rho = 0 is the denoised endpoint: keep it even if slightly outside [t_min, t_max]
            return t
        raise ValueError(f"a grid mapping needs exactly one key of 't', 'rho' or 'sigma', got {sorted(keys)}")
    try:
        return np.asarray(grid, dtype=np.float64).reshape(-1).copy()
    except (TypeError, ValueError) as e:
        raise ValueError(f"grid must be one of {GRIDS} or a sequence of times, got {grid!r}") from e


def _round_unique(t: np.ndarray) -> np.ndarray:
    r = np.round(t)
    keep = np.concatenate([[True], np.diff(r) != 0])
    if not np.all(keep):
        warnings.warn(f"rounding the grid to integer timesteps produced {int((~keep).sum())} duplicate(s); "
                      f"they were removed, so the grid now has {int(keep.sum()) - 1} steps", stacklevel=3)
    return r[keep]


def validate_times(schedule: Schedule, t: np.ndarray) -> None:
    """Raise a clear error for grids that are too short, non-finite, non-monotone or out of range."""
    if t.ndim != 1 or t.size < 2:
        raise ValueError(f"a grid needs at least 2 times (1 step), got {t.size}")
    if not np.all(np.isfinite(t)):
        raise ValueError("grid contains non-finite times")
    d = np.diff(t)
    if np.any(d >= 0):
        i = int(np.argmax(d >= 0))
        raise ValueError(f"grid times must be strictly decreasing (noise to data); t[{i}]={t[i]} is followed by "
                         f"t[{i + 1}]={t[i + 1]}")
    inner = t[:-1] if _is_zero_rho_end(schedule, t) else t
    schedule.check_times(inner, "grid time")


def _is_zero_rho_end(schedule: Schedule, t: np.ndarray) -> bool:
    if t[-1] >= schedule.t_min:
        return False
    with np.errstate(invalid="ignore"):
        r = float(schedule.rho(t[-1]))
    return abs(r) < 1e-12


def grid_rho(schedule: Schedule, t: np.ndarray) -> np.ndarray:
    """rho at the grid times, with a final 'denoise to rho = 0' point snapped to exactly 0."""
    rho = schedule.rho(t[:-1]) if _is_zero_rho_end(schedule, t) else schedule.rho(t)
    return np.append(rho, 0.0) if rho.size < t.size else rho
